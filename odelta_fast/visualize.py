"""The backbone as a rich tree: module names and types, parameter shapes, and which parameters
are trainable, frozen or delta, with repeated blocks folded into ranges such as ``0-11``."""
from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.text import Text
from rich.tree import Tree
from torch import nn

from . import routing
from .markers import DELTA_PARAM_ATTR

STYLE_NAME = "white"
STYLE_TYPE = "green"
STYLE_TRAINABLE = "cyan"
STYLE_FROZEN = "rgb(100,100,100)"
STYLE_DELTA = "bold rgb(175,0,255)"
STYLE_FOLD = "red"


def _is_delta(param: nn.Parameter) -> bool:
    return hasattr(param, DELTA_PARAM_ATTR)


def _param_style(param: nn.Parameter) -> str:
    if _is_delta(param):
        return STYLE_DELTA
    return STYLE_TRAINABLE if param.requires_grad else STYLE_FROZEN


def _signature(module: nn.Module) -> tuple:
    """What must agree for two sibling subtrees to fold into one range."""
    return (
        type(module).__name__,
        tuple((n, tuple(p.shape), p.requires_grad, _is_delta(p)) for n, p in module.named_parameters()),
        tuple((n, type(m).__name__) for n, m in module.named_modules()),
    )


def _tag(text: str) -> str:
    # No whitespace inside a tag: at the terminal's edge the whole tag moves to the next line
    # instead of being cut between its words (rich wraps at any whitespace, non-breaking too).
    return " " + "".join(text.split())


def _label(name: str, module: nn.Module, with_backend: bool) -> Text:
    text = Text()
    text.append(name, style=STYLE_FOLD if "-" in name and name.replace("-", "").isdigit() else STYLE_NAME)
    text.append(f" ({type(module).__name__})", style=STYLE_TYPE)
    for pname, param in module.named_parameters(recurse=False):
        text.append(_tag(f"{pname}:[{','.join(map(str, param.shape))}]"), style=_param_style(param))
    if with_backend and routing.is_routed(module):
        routed = {id(d) for d in routing.routes(module)}
        for child_name, delta in module.named_children():
            if id(delta) in routed:
                state = "merged" if getattr(delta, "merged", False) else delta.backend_for(module)
                text.append(_tag(f"[{child_name}: {state}]"), style=STYLE_DELTA)
    return text


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _fold_children(module: nn.Module, keep_non_params: bool = True) -> list[tuple[str, nn.Module]]:
    """Children as they are drawn: parameter-less ones left out unless ``keep_non_params``
    (Dropout, activations: OpenDelta's Visualization hides them too), runs of identical numbered
    siblings folded into ``first-last``, identical named siblings merged into ``a,b``."""
    children = [(n, c) for n, c in module.named_children() if keep_non_params or _has_parameters(c)]
    out: list[tuple[str, nn.Module]] = []
    run: list[tuple[str, nn.Module]] = []

    def flush():
        if not run:
            return
        label = run[0][0] if len(run) == 1 else f"{run[0][0]}-{run[-1][0]}"
        out.append((label, run[0][1]))
        run.clear()

    for name, child in children:
        if name.isdigit() and run and _signature(child) == _signature(run[-1][1]) and int(name) == int(run[-1][0]) + 1:
            run.append((name, child))
            continue
        flush()
        if name.isdigit():
            run.append((name, child))
        else:
            out.append((name, child))
    flush()
    merged: list[tuple[list[str], nn.Module]] = []
    for name, child in out:
        same = next((entry for entry in merged if not name[0].isdigit() and not entry[0][0][0].isdigit()
                     and _signature(entry[1]) == _signature(child)), None)
        if same is not None:
            same[0].append(name)
        else:
            merged.append(([name], child))
    return [(",".join(names), child) for names, child in merged]


def build_tree(module: nn.Module, root_name: str = "root", with_backend: bool = True,
               keep_non_params: bool = False) -> Tree:
    tree = Tree(_label(root_name, module, with_backend))

    def grow(node: Tree, mod: nn.Module):
        for name, child in _fold_children(mod, keep_non_params):
            grow(node.add(_label(name, child, with_backend)), child)

    grow(tree, module)
    return tree


def parameter_summary(module: nn.Module) -> str:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def delta_summary(module: nn.Module) -> str:
    delta = sum(p.numel() for p in module.parameters() if _is_delta(p))
    total = sum(p.numel() for p in module.parameters())
    pct = 100.0 * delta / total if total else 0.0
    return f"delta params: {delta:,d} || all params: {total:,d} || delta%: {pct:.4f}"


def cuda_memory_summary() -> Optional[str]:
    import torch

    if not torch.cuda.is_available():
        return None
    devices = range(torch.cuda.device_count())
    static = sum(torch.cuda.memory_allocated(d) for d in devices) / 1024**3
    peak = sum(torch.cuda.max_memory_allocated(d) for d in devices) / 1024**3
    return f"CUDA memory: {static:.2f} GB allocated, {peak:.2f} GB peak"


def log_tree(module: nn.Module, console: Optional[Console] = None, *, visualization: bool = True,
             trainable_ratio: bool = True, delta_ratio: bool = True, cuda_memory: bool = True) -> str:
    """Print the tree (with a legend) and the parameter lines; returns the trainable line."""
    console = console or Console()
    if visualization:
        console.print(build_tree(module))
        console.print(
            Text("legend: ", style="bold")
            + Text("trainable ", style=STYLE_TRAINABLE) + Text("frozen ", style=STYLE_FROZEN)
            + Text("delta ", style=STYLE_DELTA) + Text("folded-range", style=STYLE_FOLD)
        )
    summary = parameter_summary(module)
    if trainable_ratio:
        console.print(summary)
    if delta_ratio:
        console.print(delta_summary(module))
    memory = cuda_memory_summary() if cuda_memory else None
    if memory:
        console.print(memory)
    return summary


class Visualization:
    """OpenDelta's (bigmodelvis') ``Visualization(model).structure_graph()``: the folded module tree."""

    def __init__(self, plm: nn.Module):
        self.plm = plm

    def structure_graph(self, rootname: str = "root", expand_params: bool = False, keep_non_params: bool = False,
                        common_structure: bool = False, mapping=None, only_common: bool = False,
                        printTree: bool = True, console: Optional[Console] = None) -> Tree:  # noqa: N803 - OpenDelta's name
        tree = build_tree(self.plm, root_name=rootname, keep_non_params=keep_non_params)
        if printTree:
            (console or Console()).print(tree)
        return tree
