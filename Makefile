# Two entry points that work on a fresh machine with only Python 3.10+:
#   make demo   -- train, save, reload and merge a LoRA delta on a real MiniLM, offline
#   make test   -- the whole test suite (CPU; Triton kernels run in Triton's interpreter)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where to get torch when the machine has no CUDA GPU: the CPU build (no multi-GB CUDA wheels).
# Default: the pinned release (served from PyPI / a local mirror); set TORCH_INDEX_URL to the
# PyTorch CPU index on machines where PyPI's Linux wheel is the CUDA build.
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=

.PHONY: demo test bench gpu-check install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing the default torch build"; $(PY) -m pip install -q torch; \
	else \
		echo "no CUDA GPU: installing the CPU build $(TORCH_CPU_SPEC)"; \
		$(PY) -m pip install -q "$(TORCH_CPU_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); \
	fi
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/odelta-fast demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/cpu_train_step.py
	$(PY) bench/run.py $(if $(shell command -v nvidia-smi),,--small)

# On a GPU machine whose Python already has torch/Triton/transformers: no venv, no downloads.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
