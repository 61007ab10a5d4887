"""A LoRA delta trained by 2 processes (torchrun, gloo, CPU) under DDP and under FSDP2 ends
where single-process training on the same global batches ends; only rank 0 writes the
checkpoint, and under FSDP2 the sharded delta is gathered before it is written."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker as worker
from odelta_fast import AutoDeltaModel
from odelta_fast.ops.backend import triton_available
from tiny_models import tiny_model

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 120
# fsdp2_triton: the fused LoRA kernels (Triton's interpreter, the workers are CPU-only) fed the
# unsharded parameters FSDP2 puts in place at compute time.
MODES = ["ddp", "fsdp2"] + (["fsdp2_triton"] if triton_available() else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, modes: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(WORKER.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(out), modes]
    # Own session, so a hung run is ended with its workers, not just the launcher.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S}s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    _torchrun(out, ",".join(MODES))
    return out


def _report(out, mode, rank):
    return json.loads((out / f"{mode}_rank{rank}.json").read_text())


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_match_one(runs, mode):
    expected = worker.reference(worker.OPTIMIZERS[mode])
    start = {n: p.detach() for n, p in worker.build()[1].named_parameters()}
    assert any(not torch.allclose(expected[n], start[n]) for n in expected), "the reference did not train"
    for rank in (0, 1):
        got = torch.load(runs / f"{mode}_rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=f"rank {rank}: {name}")
    if mode.startswith("fsdp2"):
        assert _report(runs, mode, 0)["sharded"], "fully_shard did not shard the LoRA factors"


@pytest.mark.parametrize("mode", MODES)
def test_only_rank_zero_writes_the_checkpoint(runs, mode):
    writes = {rank: _report(runs, mode, rank)["checkpoint_writes"] for rank in (0, 1)}
    assert writes == {0: [str(runs / f"{mode}_ckpt")], 1: []}
    # The checkpoint holds the full (gathered) delta: it loads into a plain backbone and gives
    # the rank's parameters.
    trained = torch.load(runs / f"{mode}_rank0.pt")
    fresh, _ = tiny_model("llama")
    loaded = AutoDeltaModel.from_finetuned(str(runs / f"{mode}_ckpt"), fresh)
    for name, param in loaded.named_parameters():
        assert torch.equal(param, trained[name]), name


def test_saving_sharded_parameters_directly_is_refused(runs):
    refused = _report(runs, "fsdp2", 0)["refused"]
    assert "odelta_fast.integrations.distributed.save_finetuned" in refused
    assert not (runs / "fsdp2_refused").exists() or not any((runs / "fsdp2_refused").glob("*.safetensors"))


@pytest.mark.parametrize("mode", [m for m in MODES if m.startswith("fsdp2")])
def test_merge_with_sharded_parameters(runs, mode):
    """merge() called on every rank while FSDP2 holds the weights and factors as DTensors; the
    fused merge kernel cannot take a DTensor, so that path must fall back to DTensor ops."""
    for rank in (0, 1):
        result = _report(runs, mode, rank)["merge"]
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        assert result["merged_diff"] < 1e-5 and result["unmerged_equal"], result
