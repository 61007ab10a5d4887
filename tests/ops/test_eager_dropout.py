"""The eager LoRA dropout mask: right rate, reproducible from its seed, independent across seeds."""
from __future__ import annotations

import math

import pytest
import torch

from odelta_fast.ops.lora import dropout_keep_scale, dropout_mask, effective_dropout_p


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3, 0.5, 0.9])
def test_mask_drops_at_the_requested_rate(p):
    n = 1_000_003  # not a multiple of the four lanes per random word
    mask = dropout_mask((n,), p, seed=11, device="cpu", dtype=torch.float32)
    dropped = 1.0 - mask.mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 5 * sigma + abs(effective_dropout_p(p) - p)
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_mask_is_a_function_of_the_seed():
    a = dropout_mask((37, 50), 0.25, 3, "cpu", torch.float32)
    assert torch.equal(a, dropout_mask((37, 50), 0.25, 3, "cpu", torch.float32))
    b = dropout_mask((37, 50), 0.25, 4, "cpu", torch.float32)
    assert not torch.equal(a, b)
    # neighbouring elements come from different lanes of one word: they must not be correlated
    big = dropout_mask((400_000,), 0.5, 5, "cpu", torch.float32)
    corr = torch.corrcoef(torch.stack([big[0::2], big[1::2]]))[0, 1].item()
    assert abs(corr) < 0.01


def test_keep_scale_keeps_the_expectation():
    keep = dropout_keep_scale((500_000,), 0.2, 9, "cpu", torch.float64)
    assert abs(keep.mean().item() - 1.0) < 0.01
    assert effective_dropout_p(0.05) == pytest.approx(0.05, abs=2**-17)
