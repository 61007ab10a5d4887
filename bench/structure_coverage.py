"""Coverage of default targets over every model type in transformers.

For each model type with a base-model class, a tiny random model is built from its config class
(``tiny_zoo.py``). Then LoRA, adapters and BitFit, each with its default targets, must:

1. attach (the structure is known: a table, or inferred);
2. on a type a table covers, attach to exactly the modules they attach to when the structure is
   inferred instead (the tables are the oracle of the inference);
3. train: after ``freeze_module()``, one backward pass gives finite gradients to delta parameters
   only (at least one non-zero) and an SGD step changes delta parameters only;
4. detach bit-exactly: the outputs equal those from before attaching, ``torch.equal``.

Types that cannot be built tiny here are counted apart, with the reason. The same checks with
the tables alone (no inference) give the "before" figures.

    python bench/structure_coverage.py                 # every type; writes results/structure-coverage.{md,json}
    python bench/structure_coverage.py llama whisper   # some types, printed only
    python bench/structure_coverage.py --update vits   # check some types again, into the committed results
    python bench/structure_coverage.py --report-only   # markdown and README again from the JSON
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
README_START, README_END = "<!-- structure-coverage:start -->", "<!-- structure-coverage:end -->"
RESULTS = HERE / "results"
MARKDOWN = RESULTS / "structure-coverage.md"
RECORDS = RESULTS / "structure-coverage.json"
METHODS = ("lora", "adapter", "bitfit")  # default targets
ALL_LINEAR = "lora all-linear"
TYPE_TIMEOUT_S = 300

sys.path.insert(0, str(HERE))


@dataclass
class MethodResult:
    ok: bool
    stage: str = ""  # where it failed: attach, oracle, train, detach
    reason: str = ""
    targets: int = 0


@dataclass
class TypeResult:
    model_type: str
    built: bool
    reason: str = ""  # why it could not be built
    model_class: str = ""
    has_attention: bool = False  # a module class named *Attention*: a transformer, whatever the inference says
    source: str = ""  # table / inferred / inferred+table / none
    diagnosis: str = ""  # where the structure is unknown: why
    seconds: float = 0.0
    methods: dict[str, MethodResult] = field(default_factory=dict)
    before: dict[str, MethodResult] = field(default_factory=dict)  # tables only; empty where no table applies

    def passed_before(self, method: str) -> bool:
        return method in self.before and self.before[method].ok


def _quiet():
    import logging

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def _factories():
    from odelta_fast import AdapterModel, BitFitModel, LoraModel

    return {
        "lora": lambda m: LoraModel(m, lora_r=4),
        "adapter": lambda m: AdapterModel(m, bottleneck_dim=8),
        "bitfit": lambda m: BitFitModel(m),
        ALL_LINEAR: lambda m: LoraModel(m, lora_r=4, modified_modules=["all-linear"]),
    }


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    text = re.sub(r"(?<![\w.])/(?:[\w.+-]+/)+", "", text)  # file paths of this machine: keep the file name
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _forward(model, inputs):
    import torch

    from tiny_zoo import main_tensor

    torch.manual_seed(0)  # models that draw random numbers in eval (masking) repeat themselves
    return main_tensor(model(**inputs))


@contextlib.contextmanager
def _structure(kind: str):
    """``kind``: "default" (tables, inference elsewhere), "inferred" (no tables), "tables" (no inference)."""
    from odelta_fast import delta as delta_module
    from odelta_fast.structure import mapping

    original_map, original_infer = delta_module.structure_map, mapping._infer
    if kind == "inferred":
        delta_module.structure_map = lambda model: original_map(model, use_tables=False)
    elif kind == "tables":
        mapping._infer = lambda *args, **kwargs: None
    try:
        yield
    finally:
        delta_module.structure_map, mapping._infer = original_map, original_infer


def check_method(model, inputs, baseline, factory, *, oracle: bool) -> MethodResult:
    """Attach with default targets, (compare with the inferred structure), train one step, detach.
    Whatever happens, the model leaves as it came: deltas removed, every parameter trainable."""
    created = []

    def attach():
        delta = factory(model)
        created.append(delta)
        return delta

    try:
        try:
            delta = attach()
        except Exception as err:
            return MethodResult(False, "attach", _one_line(err))
        targets = [slot.path for slot in delta.slots]
        if oracle:
            delta.remove()
            with _structure("inferred"):
                try:
                    inferred = attach()
                except Exception as err:
                    return MethodResult(False, "oracle", f"inferred structure: {_one_line(err)}", len(targets))
                inferred_targets = [slot.path for slot in inferred.slots]
                inferred.remove()
            if inferred_targets != targets:
                missing = sorted(set(targets) - set(inferred_targets))
                extra = sorted(set(inferred_targets) - set(targets))
                return MethodResult(False, "oracle", f"inferred targets differ from the table's: missing {missing[:3]}, "
                                                     f"extra {extra[:3]}", len(targets))
            delta = attach()
        return _train_and_detach(model, inputs, baseline, delta, len(targets))
    except Exception as err:
        return MethodResult(False, "train", _one_line(err))
    finally:
        for delta in created:
            with contextlib.suppress(Exception):
                delta.remove()
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None


def _train_and_detach(model, inputs, baseline, delta, n_targets: int) -> MethodResult:
    import torch

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    delta_names = {name for name, _ in delta.named_parameters()}
    delta.freeze_module(set_state_dict=False)
    called: set[str] = set()
    hooks = [slot.target.register_forward_hook(lambda *_, path=slot.path: called.add(path)) for slot in delta.slots]
    try:
        with torch.enable_grad():
            out = _forward(model, inputs)
            if not out.requires_grad:
                return MethodResult(False, "train", "the output does not depend on any delta parameter"
                                    + _not_called(called, delta), n_targets)
            out.float().pow(2).mean().backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    stray = sorted(set(grads) - delta_names)
    if stray:
        return MethodResult(False, "train", f"frozen parameters got gradients: {stray[:3]}", n_targets)
    if not grads or not any(g.abs().sum() > 0 for g in grads.values()):
        return MethodResult(False, "train", "no delta parameter got a non-zero gradient"
                            + _not_called(called, delta), n_targets)
    if not all(torch.isfinite(g).all() for g in grads.values()):
        return MethodResult(False, "train", "non-finite gradients", n_targets)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    after = dict(model.named_parameters())
    changed_backbone = [n for n, t in before.items() if n not in delta_names and not torch.equal(t, after[n])]
    if changed_backbone:
        return MethodResult(False, "train", f"backbone parameters changed: {changed_backbone[:3]}", n_targets)
    if not any(not torch.equal(before[n], after[n]) for n in delta_names if n in before):
        return MethodResult(False, "train", "the step changed no delta parameter", n_targets)
    delta.remove()
    for p in model.parameters():  # as for the baseline: some forwards take another path for frozen weights
        p.requires_grad_(True)
    with torch.no_grad():
        restored = _forward(model, inputs)
    if not torch.equal(restored, baseline):
        return MethodResult(False, "detach", "outputs after detach differ from the original", n_targets)
    return MethodResult(True, targets=n_targets)


def _not_called(called: set[str], delta) -> str:
    targets = [slot.path for slot in delta.slots]
    if not called:
        return f" (the forward of none of its {len(targets)} targets runs: the model reads their weights itself)"
    if len(called) == len(targets):
        return f" (all {len(targets)} targets run, yet no gradient reaches them)"
    return f" ({len(called)} of {len(targets)} targets run)"


def diagnose_unmapped(model) -> str:
    """Why no transformer blocks were found: what the attention modules are made of."""
    from torch import nn

    for name, module in model.named_modules():
        if "attention" not in type(module).__name__.lower():
            continue
        own = [n for n, _ in module.named_parameters(recurse=False)]
        kinds = sorted({type(m).__name__ for m in module.modules() if m is not module
                        and any(p.dim() >= 2 for p in m.parameters(recurse=False))})
        linear = any(isinstance(c, nn.Linear) for c in module.modules())
        if own and not linear:
            return f"{type(module).__name__} holds its projections as raw parameters ({', '.join(own[:4])})"
        if not linear:
            return f"{type(module).__name__} projects with {', '.join(kinds) or 'no module'}, not nn.Linear"
        experts = [type(m).__name__ for m in module.modules() if any(p.dim() >= 3 for p in m.parameters(recurse=False))]
        if experts:
            return f"{type(module).__name__}'s query and output projections are expert tensors ({experts[0]})"
        return f"no list of blocks around {type(module).__name__} ({name}) was recognised"
    return "no attention module found"


def check_type(model_type: str, methods=METHODS + (ALL_LINEAR,)) -> TypeResult:
    import torch

    from odelta_fast.structure import MODEL_TYPES, structure_map
    from tiny_zoo import NotBuildable, build

    start = time.perf_counter()
    try:
        built = build(model_type)
    except NotBuildable as err:
        return TypeResult(model_type, False, str(err), seconds=time.perf_counter() - start)
    except Exception as err:
        return TypeResult(model_type, False, f"build crashed: {_one_line(err)}", seconds=time.perf_counter() - start)
    model, inputs = built.model, built.inputs
    result = TypeResult(model_type, True, model_class=type(model).__name__)
    result.has_attention = any(isinstance(m, torch.nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
                               for m in model.modules())
    smap = structure_map(model)
    result.source = "+".join(sorted(set(smap.sources.values()))) or "none"
    if not smap.mapped:
        result.diagnosis = diagnose_unmapped(model)
    with torch.no_grad():
        baseline = _forward(model, inputs)
    factories = _factories()
    has_table = "table" in smap.sources.values() and model_type in MODEL_TYPES
    for name in methods:
        result.methods[name] = check_method(model, inputs, baseline, factories[name], oracle=has_table)
        if name != ALL_LINEAR and "table" in smap.sources.values():  # without any table: nothing before
            with _structure("tables"):
                result.before[name] = check_method(model, inputs, baseline, factories[name], oracle=False)
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------- the sweep


def _worker(types: list[str]) -> None:
    """Check ``types`` one by one, one JSON line each on stdout."""
    _quiet()

    def timeout(*_):
        raise TimeoutError(f"took more than {TYPE_TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, timeout)
    for model_type in types:
        signal.alarm(TYPE_TIMEOUT_S)
        try:
            result = check_type(model_type)
        except TimeoutError as err:
            result = TypeResult(model_type, False, f"timed out: {err}")
        finally:
            signal.alarm(0)
        print(json.dumps(asdict(result)), flush=True)


def sweep(types: list[str], progress=None) -> list[TypeResult]:
    """Run every type in worker processes; a worker that dies is restarted after its type."""
    results: list[TypeResult] = []
    pending = list(types)
    while pending:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", *pending],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            result = _from_dict(record)
            results.append(result)
            pending.remove(result.model_type)
            if progress:
                progress(result)
        proc.wait()
        if pending and proc.returncode != 0:
            dead = pending.pop(0)
            results.append(TypeResult(dead, False, f"the build or check crashed the interpreter (exit {proc.returncode})"))
    return results


def _from_dict(record: dict) -> TypeResult:
    result = TypeResult(**{k: v for k, v in record.items() if k not in ("methods", "before")})
    result.methods = {k: MethodResult(**v) for k, v in record["methods"].items()}
    result.before = {k: MethodResult(**v) for k, v in record.get("before", {}).items()}
    return result


def summarise(results: list[TypeResult]) -> dict:
    built = [r for r in results if r.built]
    transformers_ = [r for r in built if r.has_attention]
    summary = {"types": len(results), "buildable": len(built), "with_attention": len(transformers_), "methods": {}}
    for name in METHODS + (ALL_LINEAR,):
        summary["methods"][name] = {
            "after": sum(r.methods[name].ok for r in transformers_),
            "before": sum(r.passed_before(name) for r in transformers_) if name != ALL_LINEAR else None,
            "after_all_buildable": sum(r.methods[name].ok for r in built),
        }
    summary["all_defaults"] = sum(all(r.methods[m].ok for m in METHODS) for r in transformers_)
    return summary


def markdown(results: list[TypeResult], versions: dict) -> str:
    summary = summarise(results)
    n, n_built = summary["with_attention"], summary["buildable"]

    def pct(k, total=n) -> str:
        return "" if k is None else f"{k} ({100 * k / total:.0f}%)" if total else "0"

    lines = [
        "# Default targets over every transformers model type",
        "",
        f"Generated by `python bench/structure_coverage.py` with transformers {versions['transformers']}, "
        f"torch {versions['torch']}. Do not edit by hand.",
        "",
        f"Model types with a base-model class (`AutoModel`): {summary['types']}. Built tiny from their config class "
        f"(random weights) and run forward on synthesised inputs: {n_built}. Of those, **{n}** hold an attention "
        "(a module class named `*Attention*`): the transformers, which the figures below count. The other "
        f"{n_built - n} (convolutional, state-space, codec models) are listed at the end.",
        "",
        "A method passes on a type when, with its default targets, it attaches (where a table covers the type: "
        "to exactly the modules it attaches to when the structure is inferred instead), one training step gives "
        "finite gradients to its parameters only, and detaching restores the outputs bit-exactly. "
        "`lora all-linear` is LoRA with `modified_modules=[\"all-linear\"]`.",
        "",
        f"| method | tables only (before) | tables + inference | of all {n_built} built |",
        "|---|---|---|---|",
    ]
    for name in METHODS + (ALL_LINEAR,):
        m = summary["methods"][name]
        lines.append(f"| {name} | {pct(m['before'])} | {pct(m['after'])} | {pct(m['after_all_buildable'], n_built)} |")
    lines.append(f"| all three defaults | | {pct(summary['all_defaults'])} | |")
    lines += ["", "## Transformer types where a method fails", "",
              "| type | model class | structure | method | stage | reason |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r.model_type):
        if not (r.built and r.has_attention):
            continue
        for name in METHODS + (ALL_LINEAR,):
            m = r.methods[name]
            if not m.ok:
                lines.append(f"| {r.model_type} | {r.model_class} | {r.source} | {name} | {m.stage} | "
                             f"{_cell(_why(r, m))} |")
    lines += ["", "## Built, but no attention in the model", "",
              "| type | model class | structure | defaults pass | all-linear passes |", "|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r.model_type):
        if r.built and not r.has_attention:
            defaults = ", ".join(m for m in METHODS if r.methods[m].ok) or "none"
            lines.append(f"| {r.model_type} | {r.model_class} | {r.source} | {defaults} | "
                         f"{'yes' if r.methods[ALL_LINEAR].ok else 'no'} |")
    lines += ["", "## Types not built tiny", "", "| type | reason |", "|---|---|"]
    for r in sorted(results, key=lambda r: r.model_type):
        if not r.built:
            lines.append(f"| {r.model_type} | {_cell(r.reason)} |")
    lines += ["", "## Transformer types where every default passes", ""]
    passing = sorted(r.model_type for r in results if r.built and r.has_attention
                     and all(r.methods[m].ok for m in METHODS))
    lines.append(", ".join(passing))
    return "\n".join(lines) + "\n"


def readme_section(results: list[TypeResult], versions: dict) -> str:
    """The README's summary of the sweep (between its markers)."""
    summary = summarise(results)
    n = summary["with_attention"]
    m = summary["methods"]

    def pct(k: int) -> str:
        return f"{k} ({100 * k / n:.0f}%)"

    failing = []
    for r in sorted(results, key=lambda r: r.model_type):
        if r.built and r.has_attention and not all(r.methods[x].ok for x in METHODS):
            names = [x for x in METHODS if not r.methods[x].ok]
            first = r.methods[names[0]]
            failing.append(f"`{r.model_type}` ({', '.join(names)}: {_short(_why(r, first), 140)})")
    rel = MARKDOWN.relative_to(HERE.parent)
    return "\n".join([
        README_START,
        f"Generated by `python bench/structure_coverage.py` (transformers {versions['transformers']}; every type, "
        f"every check: [`{rel}`]({rel})). Of {summary['types']} model types with a base-model class, "
        f"{summary['buildable']} build tiny from their config class and run; **{n}** of them hold an attention. "
        "With default targets, a method passes when it attaches (on a type a table covers: to the same modules "
        "as with the inferred structure), trains one step and detaches bit-exactly:",
        "",
        "| method | tables only (before) | tables + inference |",
        "|---|---|---|",
        *(f"| {x} | {pct(m[x]['before'])} | {pct(m[x]['after'])} |" for x in METHODS),
        f"| all three | | {pct(summary['all_defaults'])} |",
        f"| LoRA `all-linear` | | {pct(m[ALL_LINEAR]['after'])} |",
        "",
        f"Counting all {summary['buildable']} built types, the {summary['buildable'] - n} without an attention "
        "(convolutional, state-space, codec models: no blocks to name, so no default targets) included: "
        + ", ".join(f"{x} {m[x]['after_all_buildable']} ({100 * m[x]['after_all_buildable'] / summary['buildable']:.0f}%)"
                    for x in METHODS + (ALL_LINEAR,)) + ".",
        "",
        "Transformer types where a default fails: " + ("; ".join(failing) if failing else "none") + ".",
        README_END,
    ])


def _why(result: TypeResult, method: MethodResult) -> str:
    """A failure's reason; for an unknown structure, what the model's attention is made of."""
    if result.diagnosis and method.stage == "attach" and "structure is known" in method.reason:
        return f"structure unknown: {result.diagnosis}"
    return method.reason


def _short(reason: str, limit: int = 90) -> str:
    reason = reason.split(". ")[0].replace("|", "/")
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def update_readme(results: list[TypeResult], versions: dict) -> None:
    text = README.read_text()
    section = readme_section(results, versions)
    if README_START not in text:
        raise SystemExit(f"{README} has no {README_START} ... {README_END} markers to fill")
    text = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END), lambda _: section, text, flags=re.S)
    README.write_text(text)


def write_records(results: list[TypeResult], info: dict, summary: dict) -> None:
    """The results as JSON, one type per line (diffs between sweeps stay readable)."""
    lines = [json.dumps(_compact(asdict(r))) for r in sorted(results, key=lambda r: r.model_type)]
    RECORDS.write_text(f'{{"versions": {json.dumps(info)},\n "summary": {json.dumps(summary)},\n "results": [\n'
                       + ",\n".join(lines) + "\n]}\n")


def _compact(record: dict) -> dict:
    """Drop what a passing method or an unbuilt type does not need."""
    for key in ("methods", "before"):
        record[key] = {m: ({"ok": True, "targets": r["targets"]} if r["ok"] else r) for m, r in record[key].items()}
    record["seconds"] = round(record["seconds"], 1)
    return {k: v for k, v in record.items() if v not in ("", {}, None) or k in ("built", "methods")}


def load_records() -> tuple[list[TypeResult], dict]:
    record = json.loads(RECORDS.read_text())
    return [_from_dict(r) for r in record["results"]], record["versions"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def versions() -> dict:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("types", nargs="*", help="model types to check (default: every type; then the results are written)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown and README from the JSON")
    parser.add_argument("--update", action="store_true",
                        help="check the given types again and replace their records in the committed results")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.types)
        return 0
    if args.report_only:
        results, info = load_records()
        MARKDOWN.write_text(markdown(results, info))
        update_readme(results, info)
        return 0
    _quiet()
    from tiny_zoo import model_types

    types = args.types or model_types()
    start = time.perf_counter()

    def progress(r: TypeResult) -> None:
        if not r.built:
            state = f"not built: {r.reason[:100]}"
        else:
            state = " ".join(f"{m.replace(' ', '_')}={'ok' if r.methods[m].ok else r.methods[m].stage}"
                             for m in r.methods)
            state += "" if r.has_attention else " (no attention)"
        print(f"{r.model_type:<32} {r.seconds:5.1f}s {r.source:<15} {state}", flush=True)
        for m in r.methods:
            if r.built and not r.methods[m].ok:
                print(f"    {m}: {_why(r, r.methods[m])[:160]}", flush=True)

    results = sweep(types, progress)
    if args.update:
        fresh = {r.model_type: r for r in results}
        earlier, info = load_records()
        if info != versions():
            raise SystemExit(f"the committed results are for {info}, this is {versions()}: run the whole sweep")
        results = [fresh.get(r.model_type, r) for r in earlier]
    summary = summarise(results)
    print(json.dumps(summary), f"({time.perf_counter() - start:.0f} s)")
    if not args.types or args.update:
        RESULTS.mkdir(exist_ok=True)
        info = versions()
        MARKDOWN.write_text(markdown(results, info))
        write_records(results, info, summary)
        update_readme(results, info)
        print(f"wrote {MARKDOWN.relative_to(HERE.parent)}, {RECORDS.relative_to(HERE.parent)} and the README section")
    return 0


if __name__ == "__main__":
    sys.exit(main())
