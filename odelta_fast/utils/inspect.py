"""Parameter statistics, as OpenDelta's ``opendelta.utils.inspect`` returns them."""
from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn

from ..markers import DELTA_PARAM_ATTR

logger = logging.getLogger("odelta_fast")


def num_trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def num_total_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def num_delta_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if hasattr(p, DELTA_PARAM_ATTR))


def inspect_module_statistics(module: Optional[nn.Module] = None, verbose: bool = True) -> dict[str, Any]:
    """Total, trainable and delta parameter counts and ratios, and CUDA memory in GB."""
    import torch

    total = num_total_parameters(module)
    stat: dict[str, Any] = {"total_parameters": total, "trainable_parameters": num_trainable_parameters(module),
                            "delta_parameters": num_delta_parameters(module)}
    stat["trainable_ratio"] = stat["trainable_parameters"] / total if total else 0.0
    stat["delta_ratio"] = stat["delta_parameters"] / total if total else 0.0
    devices = range(torch.cuda.device_count()) if torch.cuda.is_available() else range(0)
    stat["cudamem"] = sum(torch.cuda.memory_allocated(d) for d in devices) / 1024**3
    stat["maxcudamem"] = sum(torch.cuda.max_memory_allocated(d) for d in devices) / 1024**3
    if verbose:
        logger.info("%s", stat)
    return stat


def inspect_optimizer_statistics(optimizer, verbose: bool = True) -> dict[str, dict[str, Any]]:
    """Per parameter group: total and trainable parameter counts, the trainable ratio, and the
    group's hyper-parameters (``lr``, ``weight_decay``, ...). (OpenDelta returned only the last
    group's entry by mistake; every group is returned here, keyed ``param_group_<i>``.)"""
    stats: dict[str, dict[str, Any]] = {}
    for index, group in enumerate(optimizer.param_groups):
        sizes = [(p.numel(), p.requires_grad) for p in group["params"]]
        total = sum(n for n, _ in sizes)
        trainable = sum(n for n, needs in sizes if needs)
        stat: dict[str, Any] = {"total_parameters": total, "trainable_parameters": trainable,
                                "trainable_ratio": "{:.6f}%".format(100 * trainable / total if total else 0.0)}
        stat.update({k: v for k, v in group.items() if k != "params"})
        stats[f"param_group_{index}"] = stat
    if verbose:
        logger.info("optimizer info: %s", stats)
    return stats
