"""Serve many LoRA deltas on one backbone at once: every sequence of a batch picks its own delta.

    multi = MultiDelta(backbone, {"task_a": "ckpt/a", "task_b": "ckpt/b"})
    logits = backbone(**inputs, delta_ids=["task_a", "base", "task_b"]).logits
    with multi.use(["task_a", None, 1]):
        backbone.generate(**inputs, max_new_tokens=20)

Checkpoints are the ones ``LoraModel.save_finetuned`` writes; ranks, alphas and target modules
may differ between deltas. An id is a delta name, its slot index (``multi.index(name)``), or
``None`` / ``"base"`` / ``-1`` for "backbone only". ``add`` and ``remove`` never touch the
backbone's weights.

How it runs: every module that at least one delta targets carries one ``MultiLoraDelta``
(route kind ``"parallel"``, attached with the ordinary routing mechanism). Its bank stacks the
factors of every delta that targets it, zero-padded to the largest rank there, and keeps them on
the CPU until a forward needs them on a device (moved then in the activations' dtype, cached until
``add``/``remove``/``offload``). A forward reads the ids of the current batch from the context
that ``use`` (or the ``delta_ids=`` keyword) sets, maps them to the bank's slots, and runs the
``ops.multi_lora`` shrink/expand pair: one gather-matmul per module, whatever the number of deltas.

Rows: a module input ``(B, ...)`` with ``B`` the number of ids gives each id all rows of its
sequence; a leading size that is a multiple ``k * B`` (``generate`` with ``num_beams`` or
``num_return_sequences`` expands every sequence into ``k`` adjacent copies) repeats each id ``k``
times.

Inference only: the multi-delta path carries no autograd; train each delta with ``LoraModel``.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from . import checkpoint, routing
from .addressing import pattern_value
from .delta import DeltaBase, DeltaModule
from .methods.kv_cache import cache_in
from .projections import linear_features
from .ops import multi_lora
from .ops.backend import check_backend_name

CHILD_NAME = "odelta_multi"
BASE_ID = -1
BASE_NAMES = ("base", "none")

IdLike = Union[str, int, None]


def _lora_alpha_for(config: Mapping[str, Any], path: str) -> float:
    """The alpha LoraModel used for ``path``: its ``alpha_pattern`` entry if one matches."""
    return float(pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"]))


@dataclass
class _Entry:
    lora_a: Tensor  # (r, K), CPU
    lora_b: Tensor  # (N, r), CPU
    scaling: float


@dataclass
class _Bank:
    """The deltas of one target module, by slot index (the MultiDelta-wide id)."""

    path: str
    in_features: int
    out_features: int
    entries: dict[int, _Entry] = field(default_factory=dict)
    version: int = 0
    device_cache: dict = field(default_factory=dict)

    def invalidate(self) -> None:
        self.version += 1
        self.device_cache.clear()

    def on(self, device: torch.device, dtype: torch.dtype, num_slots: int):
        """``(stacked_a, stacked_b, scalings, lut)`` on ``device``: ``lut[slot]`` is the bank row of
        that slot's delta or -1. Built once per (device, dtype) and bank version."""
        key = (device, dtype, num_slots)
        cached = self.device_cache.get(key)
        if cached is not None:
            return cached
        slots = sorted(self.entries)
        r_max = max(self.entries[s].lora_a.shape[0] for s in slots)
        K, N = self.in_features, self.out_features
        a = torch.zeros(len(slots), r_max, K, dtype=dtype)
        b = torch.zeros(len(slots), N, r_max, dtype=dtype)
        scal = torch.empty(len(slots), dtype=torch.float32)
        lut = torch.full((num_slots,), -1, dtype=torch.int64)
        for row, slot in enumerate(slots):
            e = self.entries[slot]
            r = e.lora_a.shape[0]
            a[row, :r] = e.lora_a.to(dtype)
            b[row, :, :r] = e.lora_b.to(dtype)
            scal[row] = e.scaling
            lut[slot] = row
        non_blocking = device.type == "cuda"
        built = tuple(t.to(device, non_blocking=non_blocking) for t in (a, b, scal, lut))
        # A copy built for fewer slots (before an add elsewhere grew the slot list) is stale.
        for old in [k for k in self.device_cache if k[:2] == (device, dtype)]:
            del self.device_cache[old]
        self.device_cache[key] = built
        return built


class _Batch:
    """The ids of the batch being run, plus per-forward caches shared by every layer."""

    def __init__(self, ids: Tensor, expandable: bool = False):
        self.ids = ids  # (B,) int64 slot ids, CPU
        # generate() may run the backbone on k copies of each sequence (num_beams,
        # num_return_sequences); anything else must see exactly one id per sequence.
        self.expandable = expandable
        self._on: dict = {}
        self.rows: dict = {}

    def ids_on(self, device: torch.device) -> Tensor:
        found = self._on.get(device)
        if found is None:
            found = self._on[device] = self.ids.to(device, non_blocking=device.type == "cuda")
        return found


class MultiLoraDelta(DeltaModule):
    """Per-target module: adds the update of each row's own delta (``parallel`` route)."""

    route_kind = "parallel"
    mergeable = False

    def __init__(self, owner: "MultiDelta", bank: _Bank, backend: str):
        super().__init__(backend)
        # The banks must not show up in the backbone's state_dict, parameters() or .to().
        self.refer("_owner", owner)
        self.refer("bank", bank)

    def implemented_backends(self):
        return multi_lora.multi_lora_backends()

    def op_call(self, target: nn.Module):
        return multi_lora.SHRINK_OP, {"op_name": multi_lora.SHRINK_OP}

    def parallel(self, target: nn.Module, args, kwargs) -> Tensor:
        x = args[0] if args else (kwargs["input"] if "input" in kwargs else next(iter(kwargs.values())))
        return self._owner._update(self.bank, x, self.backend)

    def extra_repr(self) -> str:
        ranks = {s: e.lora_a.shape[0] for s, e in self.bank.entries.items()}
        return f"deltas={len(ranks)}, ranks={sorted(set(ranks.values()))}"


class MultiDelta:
    """Several LoRA checkpoints on one backbone, chosen per sequence (see the module docstring).

    ``deltas`` maps names to checkpoint directories (or to in-memory ``LoraModel`` objects, whose
    tensors are copied). ``backend`` is the op layer's (``"auto"``, ``"eager"``, ``"triton"``,
    ``"cuda"``).
    """

    def __init__(
        self, backbone_model: nn.Module, deltas: Optional[Mapping[str, Any]] = None, *, backend: str = "auto",
    ):
        if not isinstance(backbone_model, nn.Module):
            raise TypeError(f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}")
        self.backbone_model = backbone_model
        self.backend = check_backend_name(backend)
        self._slots: list[Optional[str]] = []
        self._banks: dict[str, _Bank] = {}
        self._modules: dict[str, MultiLoraDelta] = {}
        self._local = threading.local()
        self._hooks = [
            backbone_model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            backbone_model.register_forward_hook(self._post_hook, always_call=True),
        ]
        try:
            for name, source in (deltas or {}).items():
                self.add(name, source)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ names and ids
    @property
    def names(self) -> list[str]:
        return [n for n in self._slots if n is not None]

    def index(self, name: str) -> int:
        """The slot id of ``name`` (stable while it is loaded; usable in ``delta_ids``)."""
        try:
            return self._slots.index(name)
        except ValueError:
            raise KeyError(f"no delta named {name!r}; loaded: {self.names}") from None

    def _slot_of(self, item: IdLike) -> int:
        if item is None:
            return BASE_ID
        if isinstance(item, str):
            if item.lower() in BASE_NAMES:
                return BASE_ID
            return self.index(item)
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"a delta id is a name, a slot index or None; got {item!r}")
        if item == BASE_ID:
            return BASE_ID
        if not 0 <= item < len(self._slots) or self._slots[item] is None:
            raise KeyError(f"no delta in slot {item}; slots: {dict(enumerate(self._slots))}")
        return item

    def ids_tensor(self, delta_ids) -> Tensor:
        """``delta_ids`` (a sequence of names / slots / None, or an integer tensor of slots with -1
        for base) as a CPU int64 tensor of slot ids, validated."""
        if isinstance(delta_ids, Tensor):
            ids = delta_ids.detach().to("cpu", torch.int64).reshape(-1)
            for v in ids.unique().tolist():
                self._slot_of(int(v))
            return ids
        if isinstance(delta_ids, (str, int)) or delta_ids is None:
            raise TypeError("delta_ids must hold one id per sequence (a list or a tensor), "
                            f"got the single value {delta_ids!r}")
        return torch.tensor([self._slot_of(i) for i in delta_ids], dtype=torch.int64)

    # ------------------------------------------------------------------ add / remove
    def add(self, name: str, source: Any) -> "MultiDelta":
        """Load one LoRA delta (a checkpoint directory or a ``LoraModel``) under ``name``.
        Validates everything first: a bad checkpoint leaves this object unchanged."""
        if not isinstance(name, str) or not name or name.lower() in BASE_NAMES:
            raise ValueError(f"delta name {name!r} must be a non-empty string other than {BASE_NAMES}")
        if name in self._slots:
            raise ValueError(f"a delta named {name!r} is already loaded; remove() it first")
        config, tensors, where = self._read(source)
        parsed = self._parse(config, tensors, where)
        slot = self._slots.index(None) if None in self._slots else len(self._slots)
        if slot == len(self._slots):
            self._slots.append(name)
        else:
            self._slots[slot] = name
        attached: list[str] = []
        try:
            for path, (target, entry) in parsed.items():
                bank = self._banks.get(path)
                if bank is None:
                    in_f, out_f = linear_features(target)
                    bank = _Bank(path, in_f, out_f)
                    module = MultiLoraDelta(self, bank, self.backend)
                    module.train(False)
                    routing.attach(target, CHILD_NAME, module)
                    self._banks[path], self._modules[path] = bank, module
                    attached.append(path)
                bank.entries[slot] = entry
                bank.invalidate()
        except BaseException:
            self._drop_slot(slot)
            raise
        return self

    def remove(self, name: str) -> "MultiDelta":
        """Forget ``name``; modules no other delta targets get their original forward back."""
        self._drop_slot(self.index(name))
        return self

    def _drop_slot(self, slot: int) -> None:
        for path in list(self._banks):
            bank = self._banks[path]
            if bank.entries.pop(slot, None) is None:
                continue
            bank.invalidate()
            if not bank.entries:
                module = self._modules.pop(path)
                del self._banks[path]
                routing.detach(self.backbone_model.get_submodule(path), CHILD_NAME)
                del module
        self._slots[slot] = None
        while self._slots and self._slots[-1] is None:
            self._slots.pop()

    @staticmethod
    def _read(source):
        if isinstance(source, DeltaBase):
            return source.config_dict(), source.delta_state_dict(), f"delta {source.name!r}"
        if isinstance(source, (str, os.PathLike)):
            config, tensors = checkpoint.load_checkpoint(source)
            return config, tensors, repr(str(source))
        raise TypeError(f"a delta source is a checkpoint directory or a LoraModel, got {type(source).__name__}")

    def _parse(self, config, tensors, where) -> dict[str, tuple[nn.Module, _Entry]]:
        if config.get("delta_type") != "lora":
            raise checkpoint.CheckpointError(
                f"{where} holds a {config.get('delta_type')!r} delta; MultiDelta serves LoRA deltas only")
        prefix_name = config.get("name", "lora")
        targets = list(config.get("targets") or [])
        if not targets:
            raise checkpoint.CheckpointError(f"{where}: config.json lists no targets")
        use_rslora = bool(config.get("use_rslora", False))
        expected: set[str] = set()
        parsed: dict[str, tuple[nn.Module, _Entry]] = {}
        problems: list[str] = []
        for path in targets:
            key_a, key_b = f"{path}.{prefix_name}.lora_A", f"{path}.{prefix_name}.lora_B"
            expected.update((key_a, key_b))
            try:
                target = self.backbone_model.get_submodule(path)
                in_f, out_f = linear_features(target)
            except (AttributeError, TypeError) as err:
                problems.append(f"{path}: not a Linear/Conv1D module of this backbone ({err})")
                continue
            if key_a not in tensors or key_b not in tensors:
                problems.append(f"{path}: tensors {key_a!r} / {key_b!r} missing")
                continue
            a, b = tensors[key_a], tensors[key_b]
            r = a.shape[0]
            if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
                problems.append(f"{path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                                f"({in_f} -> {out_f}); expected (r, {in_f}) / ({out_f}, r)")
                continue
            alpha = _lora_alpha_for(config, path)
            scaling = alpha / (math.sqrt(r) if use_rslora else r)
            parsed[path] = (target, _Entry(a.detach().to("cpu").clone(), b.detach().to("cpu").clone(), scaling))
        extra = sorted(set(tensors) - expected)
        if extra:
            # Unfrozen backbone tensors (a trained head, say) cannot differ per row of a batch.
            problems.append(f"tensors other than LoRA factors (unfrozen backbone modules?) cannot be "
                            f"served per sequence: {extra[:10]}")
        if problems:
            raise checkpoint.CheckpointError(f"cannot serve {where} on {type(self.backbone_model).__name__}:\n  "
                                             + "\n  ".join(problems))
        return parsed

    # ------------------------------------------------------------------ running
    @contextlib.contextmanager
    def use(self, delta_ids, *, _expandable: bool = False) -> Iterator[Tensor]:
        """Run the enclosed forwards (and ``generate``) with one delta id per sequence."""
        batch = _Batch(self.ids_tensor(delta_ids), expandable=_expandable)
        stack = self._stack()
        stack.append(batch)
        try:
            yield batch.ids
        finally:
            stack.remove(batch)

    def __call__(self, *args, delta_ids=None, **kwargs):
        with self.use(delta_ids):
            return self.backbone_model(*args, **kwargs)

    def generate(self, *args, delta_ids=None, **kwargs):
        with self.use(delta_ids, _expandable=True):
            return self.backbone_model.generate(*args, **kwargs)

    def _stack(self) -> list:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _pre_hook(self, module, args, kwargs):
        # The delta_ids keyword is consumed here, before the backbone's forward sees it.
        pushed = getattr(self._local, "pushed", None)
        if pushed is None:
            pushed = self._local.pushed = []
        if "delta_ids" not in kwargs:
            pushed.append(None)
            stack = self._stack()
            if stack:
                self._check_batch(stack[-1], args, kwargs)
            return None
        kwargs = dict(kwargs)
        batch = _Batch(self.ids_tensor(kwargs.pop("delta_ids")))
        self._check_batch(batch, args, kwargs)
        self._stack().append(batch)
        pushed.append(batch)
        return args, kwargs

    @staticmethod
    def _check_batch(batch: _Batch, args, kwargs) -> None:
        """One id per sequence of the forward: a list that merely divides the batch would be
        repeated silently and give some sequences another sequence's delta."""
        inputs = next((kwargs[k] for k in ("input_ids", "inputs_embeds", "pixel_values")
                       if isinstance(kwargs.get(k), Tensor)), None)
        if inputs is None:
            inputs = next((a for a in args if isinstance(a, Tensor)), None)
        if inputs is None or inputs.dim() == 0:
            return
        sequences, ids = inputs.shape[0], batch.ids.shape[0]
        if sequences == ids:
            return
        # Inside generate() (ours, or the backbone's with a KV cache) beams / returned sequences
        # are k adjacent copies of each input sequence.
        generating = batch.expandable or cache_in(kwargs) is not None
        if generating and ids and sequences % ids == 0:
            return
        raise ValueError(
            f"MultiDelta: got {ids} delta ids for a batch of {sequences} sequences; pass exactly one id per "
            "sequence (None / 'base' / -1 for the backbone alone)"
            + ("; for num_beams / num_return_sequences call multi.generate(..., delta_ids=...)" if not generating
               and ids and sequences % ids == 0 else ""))

    def _post_hook(self, module, args, output):
        pushed = getattr(self._local, "pushed", None)
        if pushed:
            batch = pushed.pop()
            if batch is not None:
                self._stack().remove(batch)
        return None

    def _current(self) -> _Batch:
        stack = self._stack()
        if not stack:
            raise RuntimeError(
                "MultiDelta: no delta ids for this forward; pass delta_ids=[...] (one per sequence) to the model "
                "or run it inside `with multi.use(ids):` (None / 'base' / -1 selects the backbone alone)")
        return stack[-1]

    def _row_ids(self, batch: _Batch, bank: _Bank, x: Tensor, lut: Tensor):
        """Bank row of every row of ``x`` (-1: none) and, for long batches, the sorted segments;
        cached per forward for every module whose bank holds the same deltas."""
        B = batch.ids.shape[0]
        lead = x.shape[0] if x.dim() > 1 else 1
        rows = x.numel() // max(x.shape[-1], 1)
        key = (tuple(sorted(bank.entries)), x.device, lead, rows)
        found = batch.rows.get(key)
        if found is not None:
            return found
        if B == 0 or lead % B != 0:
            raise ValueError(f"MultiDelta: got {B} delta ids but a module input of shape {tuple(x.shape)}; "
                             "its leading dimension must be the number of sequences (or a multiple of it)")
        ids = batch.ids_on(x.device)
        local = torch.where(ids >= 0, lut[ids.clamp(min=0)], ids)
        row_ids = local.repeat_interleave(rows // B)
        segments = None
        if rows > multi_lora.ROWS_LAYOUT_MAX_M:
            segments = multi_lora.sort_segments(row_ids, len(bank.entries))
        batch.rows[key] = found = (row_ids, segments)
        return found

    def _update(self, bank: _Bank, x: Tensor, backend: str) -> Tensor:
        batch = self._current()
        with torch.no_grad():
            a, b, scal, lut = bank.on(x.device, x.dtype, len(self._slots))
            row_ids, segments = self._row_ids(batch, bank, x, lut)
            return multi_lora.multi_lora_update(x, a, b, row_ids, scal, segments=segments, backend=backend)

    # ------------------------------------------------------------------ housekeeping
    def offload(self) -> None:
        """Drop every device copy of the banks (they are rebuilt from CPU on the next forward)."""
        for bank in self._banks.values():
            bank.device_cache.clear()

    def close(self) -> None:
        """Detach every delta and the ``delta_ids`` hooks: the backbone is exactly as before."""
        for name in self.names:
            self.remove(name)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def targets(self, name: Optional[str] = None) -> list[str]:
        """Module paths carrying a multi-delta module (those ``name`` targets, if given)."""
        if name is None:
            return sorted(self._banks)
        slot = self.index(name)
        return sorted(p for p, bank in self._banks.items() if slot in bank.entries)

    def __repr__(self) -> str:
        return f"MultiDelta(deltas={self.names}, modules={len(self._banks)}, backend={self.backend!r})"


__all__ = ["BASE_ID", "MultiDelta", "MultiLoraDelta"]
