"""The toy method of docs/adding_a_method.md, run exactly as written there: it passes the checks
every built-in method passes, and the config, AutoDelta* and command-line plumbing pick it up."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from helpers import check_method_on_architecture

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"


@pytest.fixture(scope="module")
def toy():
    code = re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    module = types.ModuleType("toy_shift_method")
    sys.modules[module.__name__] = module  # dataclasses resolve annotations through the module
    try:
        exec(compile(code, str(GUIDE), "exec"), module.__dict__)
        yield module
    finally:
        from odelta_fast.auto import DELTA_MODEL_MAPPING

        DELTA_MODEL_MAPPING.pop("shift", None)
        sys.modules.pop(module.__name__, None)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_the_guides_method_passes_the_method_checks(toy, arch, tmp_path):
    check_method_on_architecture(arch, lambda model: toy.ShiftModel(model, scale=0.5), tmp_path)


def test_the_guides_method_joins_configs_auto_and_the_cli(toy):
    from odelta_fast import AutoDeltaConfig, AutoDeltaModel
    from odelta_fast.commands.train import method_hyperparameters
    from tiny_models import tiny_model

    config = AutoDeltaConfig.from_dict({"delta_type": "shift", "scale": 2.0, "modified_modules": ["ff.w2"]})
    assert isinstance(config, toy.ShiftConfig) and config.scale == 2.0
    model, _ = tiny_model("llama")
    delta = AutoDeltaModel.from_config(config, model)
    assert isinstance(delta, toy.ShiftModel) and delta.scale == 2.0 and len(delta.slots) == 2
    assert method_hyperparameters("shift") == {"scale": "float"}
    with pytest.raises(ValueError, match="scale must be positive"):
        toy.ShiftModel(model, scale=-1.0, name="other")
    with pytest.warns(UserWarning, match="does not take 'scael' \\(did you mean 'scale'"):
        AutoDeltaConfig.from_dict({"delta_type": "shift", "scael": 1})
