"""Worker for tests/test_distributed.py, launched by ``torchrun --nproc_per_node 2``:

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT MODE[,MODE...]

Trains a LoRA delta on a tiny LLaMA under each MODE (``ddp``, ``fsdp2``; gloo on CPU), each
rank on its half of the same global batches, then writes per rank its gathered delta
(``OUT/<mode>_rank<r>.pt``) and a report (``OUT/<mode>_rank<r>.json``), and the checkpoint
(``OUT/<mode>_ckpt``) the way a user would: rank 0 only under DDP, the gathering helper under
FSDP2. ``train`` with ``world=1`` is the single-process reference the test compares against.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from helpers import randomize_
from tiny_models import VOCAB, tiny_model

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 8
OPTIMIZERS = {"ddp": "sgd", "fsdp2": "adamw", "fsdp2_triton": "adamw"}


def build(backend: str = "auto"):
    from odelta_fast import LoraModel

    model, _ = tiny_model("llama")
    delta = LoraModel(model, lora_r=4, lora_alpha=8, backend=backend)
    # Non-zero B from the start, so A gets gradients (and its all-reduce is checked) at step one.
    randomize_(delta.parameters(), std=0.1, seed=7)
    delta.freeze_module()
    model.train()
    return model, delta


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def make_optimizer(params, kind: str):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def train(model, kind: str, rank: int = 0, world: int = 1) -> list[float]:
    """Equal-length rows and no padding: the mean of the ranks' mean losses (what DDP's and
    FSDP2's gradient averaging optimise) is the single-process loss on the global batch."""
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], kind)
    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        ids = global_batch(step)[rank * per_rank:(rank + 1) * per_rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def reference(kind: str) -> dict[str, torch.Tensor]:
    model, delta = build()
    train(model, kind)
    return {name: p.detach().clone() for name, p in delta.named_parameters()}


def _count_checkpoint_writes() -> list:
    from odelta_fast import checkpoint

    calls = []
    real = checkpoint.save_checkpoint

    def counting(*args, **kwargs):
        calls.append(str(args[0]))
        return real(*args, **kwargs)

    checkpoint.save_checkpoint = counting
    return calls


def run_ddp(out: Path, rank: int, world: int, calls: list) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, delta = build()
    wrapped = DDP(model)
    losses = train(wrapped, OPTIMIZERS["ddp"], rank, world)
    # DDP keeps a full replica on every rank: the delta is saved like on one process, from rank 0.
    if rank == 0:
        delta.save_finetuned(str(out / "ddp_ckpt"))
    torch.save({n: p.detach().clone() for n, p in delta.named_parameters()}, out / f"ddp_rank{rank}.pt")
    return {"losses": losses, "sharded": False}


def run_fsdp2(out: Path, rank: int, world: int, calls: list, mode: str = "fsdp2") -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import fully_shard
    from odelta_fast.integrations import distributed as odist

    # fsdp2_triton forces the fused kernels (Triton's interpreter on CPU): they must take the
    # unsharded parameters FSDP2 puts in place for the forward and backward.
    model, delta = build("triton" if mode == "fsdp2_triton" else "auto")
    mesh = init_device_mesh("cpu", (world,))
    # One FSDP group per decoder layer, then the root for what is left (embeddings, norm, head);
    # frozen weights and trainable LoRA factors share each group.
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = all(hasattr(p, "full_tensor") for p in delta.parameters())
    # The optimizer is built after sharding: fully_shard replaces the parameter objects.
    losses = train(model, OPTIMIZERS[mode], rank, world)
    refused = ""
    if rank == 0:
        try:
            delta.save_finetuned(str(out / f"{mode}_refused"))
        except RuntimeError as err:
            refused = str(err)
    odist.save_finetuned(delta, out / f"{mode}_ckpt")
    torch.save(odist.full_delta_state_dict(delta), out / f"{mode}_rank{rank}.pt")
    return {"losses": losses, "sharded": sharded, "refused": refused, "merge": _merge_sharded(model, delta)}


def _merge_sharded(model, delta) -> dict:
    """merge()/unmerge() on every rank with the weights and factors sharded: the outputs must
    not change (beyond rounding) and unmerge must restore them exactly."""
    ids = global_batch(0)
    model.eval()
    try:
        with torch.no_grad():
            before = model(input_ids=ids).logits
            delta.merge()
            merged = model(input_ids=ids).logits
            delta.unmerge()
            after = model(input_ids=ids).logits
    except Exception as err:  # both ranks take the same path, so neither is left in a collective
        return {"error": f"{type(err).__name__}: {err}"[:2000]}
    return {"merged_diff": (merged - before).abs().max().item(), "unmerged_equal": torch.equal(after, before)}


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    out, modes = Path(argv[1]), argv[2].split(",")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    calls = _count_checkpoint_writes()
    try:
        for mode in modes:
            del calls[:]
            if mode == "ddp":
                report = run_ddp(out, rank, world, calls)
            else:
                report = run_fsdp2(out, rank, world, calls, mode)
            report.update(rank=rank, world=world, checkpoint_writes=list(calls))
            (out / f"{mode}_rank{rank}.json").write_text(json.dumps(report))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv)
