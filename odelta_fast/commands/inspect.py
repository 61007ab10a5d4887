"""``odelta-fast inspect``: the module tree of a model directory and what a name spec selects.

The model is built from its config on the ``meta`` device: shapes and names without reading
or allocating the weights, so inspecting a 70B model is as quick as a tiny one.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..logging_utils import get_logger
from .common import CLIError, architecture_class, load_model_config, method_class, model_dir, offline, one_line

logger = get_logger("cli.inspect")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="print a model's module tree and which modules a name spec selects",
        description="Print the module tree of a local Hugging Face model directory (repeated blocks folded) and, "
                    "for each --spec, the modules it selects with their raw and common names, or the closest "
                    "candidates when it selects none. Exit status: 0 when every spec selects a module, 1 when "
                    "one selects none.",
        epilog="examples:\n"
               "  odelta-fast inspect ./llama\n"
               "  odelta-fast inspect ./llama --spec attn.q attn.v --no-tree\n"
               "  odelta-fast inspect ./bert --method lora            # what LoRA's default targets select\n"
               "  odelta-fast inspect ./olmo --structure --no-tree    # the common names in use, table or inferred",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_pos", nargs="?", metavar="MODEL_DIR", help="a local Hugging Face model directory")
    p.add_argument("--model", metavar="DIR", help="same as MODEL_DIR")
    p.add_argument("--spec", nargs="+", metavar="SPEC", default=[],
                   help="module specs as --targets takes them: common names (attn.q), raw names (query), "
                        "'[r]<regex>', all-linear")
    p.add_argument("--exclude", nargs="+", metavar="SPEC", default=[], help="specs excluded from the selection")
    p.add_argument("--method", metavar="NAME",
                   help="count only modules this method can modify (LoRA: Linear/Conv1D); without --spec, "
                        "show the method's default targets")
    p.add_argument("--model-class", metavar="NAME", help="transformers class to build (default: config.architectures)")
    p.add_argument("--structure", action="store_true",
                   help="print the common-structure map in use: every common name with its module, and whether "
                        "it comes from a table or was inferred from the model's modules")
    p.add_argument("--no-tree", action="store_true", help="skip the tree; print only the selection")
    p.set_defaults(func=run)


def build_meta_model(directory: Path, class_name: Optional[str] = None):
    import torch

    cls = architecture_class(directory, class_name)
    config = load_model_config(directory)

    def build():
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config)
        return cls(config)

    try:
        with torch.device("meta"):
            return build()
    except Exception as err:  # some model __init__s compute on tensors; meta cannot
        logger.info("building on the meta device failed (%s); building on the CPU", err)
        return build()


def _target_types(name: str):
    cls = method_class(name)
    if cls.delta_type == "lora":  # LoraModel sets its types per instance; the class attribute is None
        return cls.supported_types()
    return cls.target_types


def _default_selection(model, method: str) -> tuple[list[str], list[str]]:
    """The specs a method uses by default and the modules they select, by attaching it for real
    (on the meta model, which costs nothing) so fused-QKV and BitFit spreading are accounted for."""
    cls = method_class(method)
    try:
        delta = cls(model)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise CLIError(f"--method {method}: cannot attach it to {type(model).__name__} by default ({one_line(err)}); "
                       "pass --spec")
    paths = [slot.path for slot in delta.slots]
    specs = list(delta.modified_modules)
    delta.remove()
    return specs, paths


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..addressing import TargetNotFoundError, candidate_paths, closest_candidates, select_modules
    from ..structure import structure_map
    from ..visualize import build_tree, parameter_summary

    offline()
    if args.model_pos and args.model and args.model_pos != args.model:
        raise CLIError(f"MODEL_DIR {args.model_pos} and --model {args.model} disagree; give one")
    directory = model_dir(args.model or args.model_pos, flag="--model" if args.model else "MODEL_DIR")
    if args.method:
        method_class(args.method)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unmapped architecture is reported below, in words
        model = build_meta_model(directory, args.model_class)
        structure = structure_map(model)
    console = Console(soft_wrap=True)
    if not args.no_tree:
        console.print(build_tree(model, root_name=type(model).__name__, with_backend=False))
        console.print(parameter_summary(model))
    mapped = getattr(structure, "mapped", False)
    model_type = getattr(model.config, "model_type", "?")
    sources = ", ".join(f"{structure.roots[p]} ({structure.sources[p]})" for p in structure.roots)
    print(f"common-structure map: {sources if mapped else 'none'} (model_type {model_type!r})"
          + ("" if mapped else "; specs must use raw module names"))
    if args.structure:
        print(structure.describe())

    types = _target_types(args.method) if args.method else None
    kind = "/".join(t.__name__ for t in types) if types else "module"
    specs = list(args.spec)
    if not specs and args.method:
        specs, paths = _default_selection(model, args.method)
        print(f"\n{args.method} default targets {specs} select {len(paths)} modules:")
        _print_selection(paths, structure)
        return 0 if paths else 1
    if not specs:
        return 0

    missing = 0
    candidates = None
    for spec in specs:
        try:
            selected = select_modules(model, [spec], args.exclude, structure=structure, module_types=types)
        except TargetNotFoundError:
            selected = []  # reported below with the closest candidates
        except ValueError as err:
            raise CLIError(f"--spec {spec}: {one_line(err)}")
        if selected:
            print(f"\nspec {spec!r} selects {len(selected)} {kind}{'s' if len(selected) != 1 else ''}:")
            _print_selection([path for path, _ in selected], structure)
            continue
        missing += 1
        if candidates is None:
            candidates = candidate_paths(model, structure, types)
        print(f"\nspec {spec!r} selects no {kind} of {type(model).__name__}.")
        near = closest_candidates(spec, candidates)
        if near:
            print("  closest candidates:")
            for line in near:
                print(f"    {line}")
    if missing:
        print("\nPlain specs match whole trailing name segments (common or raw); '[r]<regex>' must match a whole "
              "trailing run of segments.")
    return 1 if missing else 0


def _print_selection(paths: list[str], structure) -> None:
    common_of = structure.common_name if getattr(structure, "mapped", False) else (lambda p: None)
    width = max((len(p) for p in paths), default=0)
    for path in paths:
        common = common_of(path)
        print(f"  {path:<{width}}  {'(common: ' + common + ')' if common else '(no common name)'}")
