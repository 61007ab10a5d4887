"""``DeltaBase``: the lifecycle every delta method shares, and ``DeltaModule``, the per-target
module a method attaches.

A delta method only says which modules it targets by default, which module types it accepts,
and how to build its ``DeltaModule`` for one target. Everything else lives here: addressing,
attaching all-or-nothing, freezing, naming several deltas on one backbone, saving and loading,
merging, detaching and re-attaching.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional, Sequence

import torch
from torch import nn

from . import checkpoint, routing
from .addressing import NameMatcher, select_modules
from .structure import structure_map

logger = logging.getLogger("odelta_fast")

DELTAS_TOKEN = "deltas"  # in unfrozen_modules / freeze_module(exclude=...): this delta's own parameters
REGISTRY_ATTR = "_odelta_deltas"
DELTA_PARAM_ATTR = "_odelta_delta_name"
ORIGINAL_STATE_DICT_ATTR = "_odelta_state_dict_filter"
LOAD_HOOKS_ATTR = "_odelta_load_hooks"
LOAD_PREFIX_ATTR = "_odelta_load_prefix"


class DeltaModule(nn.Module):
    """The delta attached to one target module; subclasses set ``route_kind`` (see ``routing``)
    and implement the matching hook, plus ``merge``/``unmerge`` where the delta can be folded."""

    route_kind: ClassVar[str] = "sequential"
    mergeable: ClassVar[bool] = False

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.merged = False

    @property
    def route_active(self) -> bool:
        # A merged delta lives in the base weights; routing it too would count it twice.
        return not self.merged

    def merge(self, target: nn.Module) -> None:
        raise NotImplementedError

    def unmerge(self, target: nn.Module) -> None:
        raise NotImplementedError

    def backend_for(self, target: nn.Module) -> str:
        """The concrete backend this delta's op runs on, for ``log()``."""
        from .ops.backend import resolve_backend

        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        try:
            return resolve_backend(type(self).__name__, self.backend, device, implemented=self.implemented_backends())
        except ValueError:
            return f"{self.backend} unavailable"

    def implemented_backends(self) -> tuple[str, ...]:
        return ()


@dataclass
class Slot:
    path: str
    target: nn.Module
    child_name: str
    delta: DeltaModule


def _init_kwargs(cls) -> dict[str, inspect.Parameter]:
    """The keyword arguments a method's constructor takes (besides the backbone)."""
    return {
        name: p for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "backbone_model") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


class DeltaBase:
    """Base of every method (``LoraModel``, ``AdapterModel``, ...). Not an ``nn.Module``: the
    delta's parameters live inside the backbone as children of the modules they modify, so
    ``backbone.to()``, ``backbone.parameters()`` and optimizers see them with no extra step."""

    delta_type: ClassVar[str] = ""
    default_modified_modules: ClassVar[list[str]] = []
    default_exclude_modules: ClassVar[list[str]] = ["lm_head"]
    default_unfrozen_modules: ClassVar[list[str]] = [DELTAS_TOKEN]
    target_types: ClassVar[Optional[tuple[type, ...]]] = None
    # Keys of the config that are not hyper-parameters of the method itself.
    _addressing_keys: ClassVar[tuple[str, ...]] = (
        "modified_modules", "exclude_modules", "unfrozen_modules", "common_structure", "backend", "name",
    )

    def __init__(
        self,
        backbone_model: nn.Module,
        modified_modules: Optional[Sequence[str]] = None,
        exclude_modules: Optional[Sequence[str]] = None,
        unfrozen_modules: Optional[Sequence[str]] = None,
        common_structure: Optional[bool] = None,
        backend: str = "auto",
        name: Optional[str] = None,
    ):
        from .ops.backend import check_backend_name

        if not isinstance(backbone_model, nn.Module):
            raise TypeError(f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}")
        self.__dict__["backbone_model"] = backbone_model
        self.backend = check_backend_name(backend)
        self.structure = structure_map(backbone_model)
        self.uses_default_targets = modified_modules is None
        if modified_modules is None:
            if not self.structure.mapped:
                raise ValueError(
                    f"{type(self).__name__} has default targets only where the model's structure is known (a table, or "
                    f"transformer blocks found by inference), and {type(backbone_model).__name__} has neither; "
                    "pass modified_modules=[...] with raw module names"
                )
            modified_modules = self.default_targets()
            if common_structure is None:
                common_structure = True
        if isinstance(modified_modules, str):
            modified_modules = [modified_modules]
        self.modified_modules = list(modified_modules)
        self.exclude_modules = list(self.default_exclude_modules if exclude_modules is None else exclude_modules)
        self.unfrozen_modules = list(self.default_unfrozen_modules if unfrozen_modules is None else unfrozen_modules)
        self.common_structure = common_structure
        self.name = self._unique_name(name)
        self.slots: list[Slot] = []
        self.attached = False

    # ------------------------------------------------------------------ construction
    def default_targets(self) -> list[str]:
        return list(self.default_modified_modules)

    def present_common_names(self, candidates: Sequence[str]) -> list[str]:
        """The ``candidates`` (common names) that name at least one module of this backbone, in
        order: architectures differ in which exist (BERT has no single ``ff`` module, GPT-2 no
        separate ``attn.q``), and a wrapper may hold several architectures."""
        present = set()
        for _, common in self.structure.items():
            for name in candidates:
                if common == name or common.endswith("." + name):
                    present.add(name)
        return [name for name in candidates if name in present]

    def build_delta(self, path: str, target: nn.Module) -> DeltaModule:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """The method's own constructor arguments, as saved in the checkpoint config."""
        return {k: getattr(self, k) for k in _init_kwargs(type(self)) if k not in self._addressing_keys}

    def _unique_name(self, requested: Optional[str]) -> str:
        registry = self.backbone_model.__dict__.setdefault(REGISTRY_ATTR, {})
        if requested is not None:
            if not requested.isidentifier():
                raise ValueError(f"delta name {requested!r} must be a Python identifier (it becomes a module attribute)")
            if requested in registry:
                raise ValueError(f"this backbone already carries a delta named {requested!r}; pass another name=")
            return requested
        base = self.delta_type
        candidate, i = base, 1
        while candidate in registry:
            candidate, i = f"{base}_{i}", i + 1
        return candidate

    def add_all_delta_to_backbone(self) -> "DeltaBase":
        """Select targets, build every delta module, then attach them all; a failure while
        building leaves the backbone untouched."""
        targets = self.select_targets()
        built = [Slot(path, module, self.name, self.build_delta(path, module)) for path, module in targets]
        for slot in built:
            # A new module starts in training mode; follow the target, or a delta attached to an
            # eval-mode backbone would run dropout at inference.
            slot.delta.train(slot.target.training)
            for param in slot.delta.parameters():
                setattr(param, DELTA_PARAM_ATTR, self.name)
        self.slots = built
        self.attach()
        self.backbone_model.__dict__[REGISTRY_ATTR][self.name] = self
        logger.info("%s %r attached to %d modules", type(self).__name__, self.name, len(self.slots))
        return self

    def select_targets(self) -> list[tuple[str, nn.Module]]:
        return select_modules(
            self.backbone_model, self.modified_modules, self.exclude_modules,
            structure=self.structure, common_structure=self.common_structure, module_types=self.target_types,
        )

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> "DeltaBase":
        if self.attached:
            return self
        done: list[Slot] = []
        try:
            for slot in self.slots:
                routing.attach(slot.target, slot.child_name, slot.delta)
                done.append(slot)
        except BaseException:
            for slot in reversed(done):
                routing.detach(slot.target, slot.child_name)
            raise
        self.attached = True
        return self

    def detach(self) -> "DeltaBase":
        """Remove this delta from the backbone; its forward is then exactly the original."""
        if not self.attached:
            return self
        if self.is_merged:
            self.unmerge()
        for slot in reversed(self.slots):
            routing.detach(slot.target, slot.child_name)
        self.attached = False
        return self

    # ------------------------------------------------------------------ parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for slot in self.slots:
            for name, param in slot.delta.named_parameters():
                yield ".".join(part for part in (slot.path, slot.child_name, name) if part), param

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def num_trainable_parameters(self, module: Optional[nn.Module] = None) -> int:
        module = self.backbone_model if module is None else module
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def num_total_parameters(self, module: Optional[nn.Module] = None) -> int:
        module = self.backbone_model if module is None else module
        return sum(p.numel() for p in module.parameters())

    def _unfrozen_backbone_parameters(self, specs: Sequence[str]) -> dict[str, nn.Parameter]:
        matcher = NameMatcher([s for s in specs if s != DELTAS_TOKEN])
        if not matcher:
            return {}
        common_of = self.structure.common_name if self.structure.mapped else (lambda p: None)
        found: dict[str, nn.Parameter] = {}
        for path, module in self.backbone_model.named_modules():
            if path and matcher.match(path, common_of(path)):
                for name, param in module.named_parameters(prefix=path):
                    if not hasattr(param, DELTA_PARAM_ATTR):
                        found[name] = param
        return found

    def freeze_module(
        self, module: Optional[nn.Module] = None, exclude: Optional[Sequence[str]] = None, set_state_dict: bool = True,
    ) -> None:
        """Freeze the backbone except this delta (``"deltas"``) and the modules named in
        ``exclude`` (default: ``unfrozen_modules``). Deltas of other names keep their flags.
        With ``set_state_dict``, the backbone's ``state_dict()`` returns only trainable and delta
        tensors, so trainers that save ``state_dict()`` save the delta, not the model."""
        module = self.backbone_model if module is None else module
        exclude = list(self.unfrozen_modules if exclude is None else exclude)
        keep_trainable = {id(p) for p in self._unfrozen_backbone_parameters(exclude).values()}
        for param in module.parameters():
            owner = getattr(param, DELTA_PARAM_ATTR, None)
            if owner == self.name:
                param.requires_grad_(DELTAS_TOKEN in exclude)
            elif owner is None:
                param.requires_grad_(id(param) in keep_trainable)
        self.unfrozen_modules = exclude
        if set_state_dict:
            install_state_dict_filter(module)

    # ------------------------------------------------------------------ merge
    @property
    def is_merged(self) -> bool:
        return any(slot.delta.merged for slot in self.slots)

    def merge(self) -> "DeltaBase":
        """Fold every mergeable delta into the base weights (fp32 accumulation). Deltas that
        cannot be folded (adapters) keep running as routed modules."""
        if not self.attached:
            raise RuntimeError(f"delta {self.name!r} is detached; attach() it before merge()")
        with torch.no_grad():
            for slot in self.slots:
                if slot.delta.mergeable and not slot.delta.merged:
                    slot.delta.merge(slot.target)
                    slot.delta.merged = True
        return self

    def unmerge(self) -> "DeltaBase":
        """Return merged base weights to their exact original bits."""
        with torch.no_grad():
            for slot in self.slots:
                if slot.delta.merged:
                    slot.delta.unmerge(slot.target)
                    slot.delta.merged = False
        return self

    # ------------------------------------------------------------------ save / load
    def config_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "delta_type": self.delta_type,
            "name": self.name,
            "modified_modules": self.modified_modules,
            "exclude_modules": self.exclude_modules,
            "unfrozen_modules": self.unfrozen_modules,
            "common_structure": self.common_structure,
            "backbone_class": type(self.backbone_model).__name__,
            "targets": [slot.path for slot in self.slots],
            "odelta_fast_version": __version__,
            **self.hyperparameters(),
        }

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """This delta's tensors plus the backbone parameters of modules the user unfroze,
        keyed by their names in the backbone."""
        tensors = {name: p.detach() for name, p in self.named_parameters()}
        tensors.update({name: p.detach() for name, p in self._unfrozen_backbone_parameters(self.unfrozen_modules).items()})
        _refuse_sharded(tensors)
        return tensors

    def save_finetuned(self, finetuned_delta_path: str = "./delta_checkpoints/", **kwargs) -> str:
        """Write the config and the delta's tensors (never the backbone) atomically.
        ``format="peft"`` writes PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA only)."""
        fmt = kwargs.pop("format", "odelta")
        if kwargs:
            raise TypeError(f"save_finetuned() got unexpected arguments {sorted(kwargs)}")
        if fmt not in ("odelta", "peft"):
            raise ValueError(f"save_finetuned: format={fmt!r} is not supported; expected 'odelta' or 'peft'")
        if self.is_merged:
            raise RuntimeError(f"delta {self.name!r} is merged into the base weights; unmerge() before saving it")
        if fmt == "peft":
            from .peft_format import save_peft

            return save_peft(self, finetuned_delta_path)
        checkpoint.save_checkpoint(finetuned_delta_path, self.config_dict(), self.delta_state_dict())
        return str(finetuned_delta_path)

    @classmethod
    def from_config(cls, config, backbone_model: nn.Module, **overrides) -> "DeltaBase":
        from .auto import BaseDeltaConfig

        values = config.to_dict() if isinstance(config, BaseDeltaConfig) else dict(config)
        values.update(overrides)
        accepted = _init_kwargs(cls)
        kwargs = {k: v for k, v in values.items() if k in accepted}
        return cls(backbone_model, **kwargs)

    @classmethod
    def from_finetuned(cls, finetuned_delta_path: str, backbone_model: nn.Module, **overrides) -> "DeltaBase":
        """Rebuild the delta on ``backbone_model`` and load its tensors. Any mismatch (other
        targets, shapes, names) raises and leaves the backbone exactly as it was."""
        config, tensors = checkpoint.load_checkpoint(finetuned_delta_path)
        if cls.delta_type and config.get("delta_type") != cls.delta_type:
            raise checkpoint.CheckpointError(
                f"{finetuned_delta_path!r} holds a {config.get('delta_type')!r} delta, not {cls.delta_type!r}; "
                "use AutoDeltaModel.from_finetuned to load any type"
            )
        registry = backbone_model.__dict__.get(REGISTRY_ATTR, {})
        if "name" not in overrides and config.get("name") in registry:
            # The saved name is taken on this backbone (a second checkpoint of the same type):
            # load under a fresh name rather than refuse.
            overrides = dict(overrides, name=None)
        delta = cls.from_config(config, backbone_model, **overrides)
        try:
            delta.load_delta_state_dict(tensors, expected_targets=config.get("targets"),
                                        source=str(finetuned_delta_path), saved_name=config.get("name"))
        except BaseException:
            delta.remove()
            raise
        return delta

    def load_delta_state_dict(self, tensors: dict[str, torch.Tensor], expected_targets=None, source="state dict",
                              saved_name: Optional[str] = None) -> None:
        """Copy ``tensors`` into this delta (and the modules it unfroze) after checking that every
        name and shape fits; nothing is copied if anything does not. ``saved_name`` is the name the
        delta had when saved, so a checkpoint loads under another name."""
        if saved_name is not None and saved_name != self.name:
            tensors = self._renamed(tensors, saved_name)
        problems: list[str] = []
        if expected_targets is not None:
            have = [slot.path for slot in self.slots]
            missing_targets = sorted(set(expected_targets) - set(have))
            extra_targets = sorted(set(have) - set(expected_targets))
            if missing_targets:
                problems.append(f"modules in the checkpoint but not in this backbone: {missing_targets[:10]}")
            if extra_targets:
                problems.append(f"modules selected in this backbone but absent from the checkpoint: {extra_targets[:10]}")
        own = dict(self.named_parameters())
        own.update(self._unfrozen_backbone_parameters(self.unfrozen_modules))
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing:
            problems.append(f"tensors this delta needs but {source} lacks: {missing[:10]}")
        if unexpected:
            problems.append(f"tensors in {source} that fit no module here: {unexpected[:10]}")
        for name in sorted(set(own) & set(tensors)):
            if tuple(own[name].shape) != tuple(tensors[name].shape):
                problems.append(f"{name}: checkpoint shape {tuple(tensors[name].shape)} != module shape {tuple(own[name].shape)}")
        if problems:
            raise checkpoint.CheckpointError(
                f"cannot load {source} into {type(self.backbone_model).__name__}:\n  " + "\n  ".join(problems)
            )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))

    def _renamed(self, tensors: dict[str, torch.Tensor], saved_name: str) -> dict[str, torch.Tensor]:
        """Keys of a checkpoint saved under ``saved_name``, rewritten to this delta's child name:
        segment by segment at each slot's path, never by string replacement inside names."""
        def prefix(path: str, child: str) -> str:
            return ".".join(part for part in (path, child) if part) + "."

        moves = {prefix(slot.path, saved_name): prefix(slot.path, slot.child_name) for slot in self.slots}
        renamed = {}
        for key, tensor in tensors.items():
            old = next((p for p in moves if key.startswith(p)), None)
            renamed[moves[old] + key[len(old):] if old else key] = tensor
        return renamed

    def remove(self) -> None:
        """Detach and forget this delta: its name is free again."""
        self.detach()
        self.backbone_model.__dict__.get(REGISTRY_ATTR, {}).pop(self.name, None)

    # ------------------------------------------------------------------ inspection
    def log(self, module: Optional[nn.Module] = None, console=None, **kwargs) -> None:
        """Print the backbone as a rich tree and the trainable-parameters line."""
        from .visualize import log_tree

        log_tree(self.backbone_model if module is None else module, console=console, **kwargs)

    def __repr__(self) -> str:
        state = "merged" if self.is_merged else ("attached" if self.attached else "detached")
        return f"{type(self).__name__}(name={self.name!r}, targets={len(self.slots)}, {state})"


def _refuse_sharded(tensors: dict[str, torch.Tensor]) -> None:
    # A DTensor's local shard is not the parameter, and gathering it is a collective that every
    # rank must join; a rank-0-only save would write garbage or hang, so say what to call instead.
    for name, tensor in tensors.items():
        if hasattr(tensor, "full_tensor") and hasattr(tensor, "placements"):
            raise RuntimeError(
                f"{name} is sharded (a DTensor, e.g. under FSDP2's fully_shard); call "
                "odelta_fast.integrations.distributed.save_finetuned(delta, path) or "
                "full_delta_state_dict(delta) on every rank instead"
            )


# ---------------------------------------------------------------------- state_dict filter
def _trainable_or_delta_keys(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad or hasattr(p, DELTA_PARAM_ATTR)}


def _filtered_state_dict(self, *args, **kwargs):
    full = type(self).state_dict(self, *args, **kwargs)
    prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
    keep = {prefix + k for k in _trainable_or_delta_keys(self)}
    for key in list(full):
        # Inside a wrapper (DDP's ``module.``, a user's container) ``full`` is the caller's
        # destination: keys outside ``prefix`` are siblings' and not ours to drop.
        if key.startswith(prefix) and key not in keep:
            del full[key]
    return full


def _remember_load_prefix(module, state_dict, prefix, *args):
    module.__dict__[LOAD_PREFIX_ATTR] = prefix


def _forgive_filtered_keys(module, incompatible_keys):
    # What the filtered state_dict() leaves out must not count as missing when it is loaded back:
    # the Trainer's resume would warn about every backbone weight, and strict loads (accelerate's
    # load_state, load_state_dict(state_dict())) would fail.
    prefix = module.__dict__.pop(LOAD_PREFIX_ATTR, "")
    saved = _trainable_or_delta_keys(module)
    incompatible_keys.missing_keys[:] = [
        k for k in incompatible_keys.missing_keys if not k.startswith(prefix) or k[len(prefix):] in saved
    ]


def install_state_dict_filter(model: nn.Module) -> None:
    """Make ``model.state_dict()`` return only trainable and delta tensors (computed at call
    time, so it follows later freezing), and ``load_state_dict`` accept what it returns: frozen
    backbone tensors absent from a loaded dict are not reported missing. Idempotent."""
    import types

    if model.__dict__.get(ORIGINAL_STATE_DICT_ATTR):
        return
    model.__dict__[ORIGINAL_STATE_DICT_ATTR] = True
    model.state_dict = types.MethodType(_filtered_state_dict, model)
    register_pre = getattr(model, "register_load_state_dict_pre_hook", None)
    pre = register_pre(_remember_load_prefix) if register_pre else model._register_load_state_dict_pre_hook(
        _remember_load_prefix, with_module=True)
    model.__dict__[LOAD_HOOKS_ATTR] = (pre, model.register_load_state_dict_post_hook(_forgive_filtered_keys))


def remove_state_dict_filter(model: nn.Module) -> None:
    if model.__dict__.pop(ORIGINAL_STATE_DICT_ATTR, False):
        del model.__dict__["state_dict"]
        for handle in model.__dict__.pop(LOAD_HOOKS_ATTR, ()):
            handle.remove()
