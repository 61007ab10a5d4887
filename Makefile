# Two entry points that work on a fresh machine with only Python 3.10+:
#   make demo   -- train, save, reload and merge a LoRA delta on a real MiniLM, offline
#   make test   -- the whole test suite (CPU; Triton kernels run in Triton's interpreter)
# CI (.ci/run) also runs `make test-floor`: the frontend tests against the lowest transformers and
# peft that pyproject.toml declares, in a second environment.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FLOOR_VENV := .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed
# Where to get torch when the machine has no CUDA GPU: the CPU build (no multi-GB CUDA wheels).
# Default: the pinned release (served from PyPI / a local mirror); set TORCH_INDEX_URL to the
# PyTorch CPU index on machines where PyPI's Linux wheel is the CUDA build.
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
# What "the frontend" is: methods x architectures, prefix and soft prompt, checkpoints, PEFT interop.
FRONTEND_TESTS := tests/test_methods.py tests/test_prefix_soft_prompt.py tests/test_checkpoint.py \
	tests/test_peft_interop.py tests/test_lifecycle.py tests/test_merge_exactness.py tests/test_reliability.py \
	tests/test_structure.py tests/test_addressing.py tests/test_gradient_checkpointing.py tests/test_moe_lora.py

.PHONY: demo test test-floor bench gpu-check install clean

# $(1): the virtual environment; $(2): extra pip requirements (pins)
define make_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	@if $(1)/bin/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(1)/bin/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing the default torch build"; $(1)/bin/python -m pip install -q torch; \
	else \
		echo "no CUDA GPU: installing the CPU build $(TORCH_CPU_SPEC)"; \
		$(1)/bin/python -m pip install -q "$(TORCH_CPU_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); \
	fi
	$(1)/bin/python -m pip install -q -e ".[dev,demo]" $(2)
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml
	$(call make_venv,$(VENV),)

$(FLOOR_STAMP): pyproject.toml .ci/floor_versions.py
	$(call make_venv,$(FLOOR_VENV),$$($(PYTHON) .ci/floor_versions.py))

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/odelta-fast demo

test: $(STAMP)
	$(PY) -m pytest -q

test-floor: $(FLOOR_STAMP)
	@$(FLOOR_VENV)/bin/python -c "import transformers, peft; print('floor: transformers', transformers.__version__, '| peft', peft.__version__)"
	$(FLOOR_VENV)/bin/python -m pytest -q $(FRONTEND_TESTS)

bench: $(STAMP)
	$(PY) bench/cpu_train_step.py
	$(PY) bench/run.py $(if $(shell command -v nvidia-smi),,--small)

# On a GPU machine whose Python already has torch/Triton/transformers: no venv, no downloads.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .pytest_cache .hypothesis .benchmarks
