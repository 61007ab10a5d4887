"""``DeltaBase``: the lifecycle every delta method shares, and ``DeltaModule``, the per-target
module a method attaches.

A delta method only says which modules it targets by default, which module types it accepts,
and how to build its ``DeltaModule`` for one target. Everything else lives here: addressing,
attaching all-or-nothing, freezing, naming several deltas on one backbone, saving and loading,
merging, detaching and re-attaching.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional, Sequence

import torch
from torch import nn

from . import checkpoint, merging, routing
from .configs import BaseDeltaConfig
from .visualize import log_tree
from .version import __version__
from .addressing import Spec, backbone_modules, is_delta_module, match_specs, select_modules
from .markers import DELTA_MARKER, DELTA_PARAM_ATTR, REGISTRY_ATTR
from .structure import structure_map

logger = logging.getLogger("odelta_fast")

DELTAS_TOKEN = "deltas"  # in unfrozen_modules / freeze_module(exclude=...): this delta's own parameters
STATE_DICT_HOOKS_ATTR = "_odelta_state_dict_hooks"
LOAD_PREFIX_ATTR = "_odelta_load_prefix"


class DeltaModule(routing.RouteHooks):
    """The delta attached to one target module. Subclasses set ``route_kind`` and implement the
    matching hooks of ``routing.RouteHooks`` (how the delta joins the forward), list the op
    backends they have (``implemented_backends``), and, where the delta can be folded into the
    target's parameter ``merge_parameter``, set ``mergeable`` and implement ``fold_``. See
    docs/adding_a_method.md."""

    mergeable: ClassVar[bool] = False
    merge_parameter: ClassVar[str] = "weight"
    # A delta on a quantized layer (bitsandbytes): folding it needs the weight dequantized, which
    # the user must ask for (merge(dequantize=True)); the delta then provides unloaded(target).
    dequantizes_on_merge: ClassVar[bool] = False

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.merged = False

    @property
    def route_active(self) -> bool:
        # A merged delta lives in the base weights; routing it too would count it twice.
        return not self.merged

    def refer(self, name: str, value) -> None:
        """Keep ``value`` (a backbone module, a shared object) as a plain attribute, never as a
        child: as a child, the backbone's own modules would look like parts of the delta in
        ``parameters()``, ``state_dict()`` and ``.to()``."""
        object.__setattr__(self, name, value)

    def fold_(self, target: nn.Module, param: torch.Tensor) -> None:
        """Add this delta's contribution to ``param`` (the target's ``merge_parameter``, or a
        snapshot of it) in place, with one rounding."""
        raise NotImplementedError

    def merge(self, target: nn.Module) -> None:
        merging.merge(target, self)

    def unmerge(self, target: nn.Module) -> None:
        merging.unmerge(target, self)

    def op_call(self, target: nn.Module) -> Optional[tuple[str, dict]]:
        """The op this delta's forward runs on ``target`` and the shape arguments its backend
        choice reads (LoRA: ``K``, ``N``, ``r``, ``dropout``); None where it runs plain torch."""
        return None

    def backend_for(self, target: nn.Module) -> str:
        """What runs this delta's op on ``target`` (``log()`` shows it): the op layer's own decision
        for the target's device and dtype, so a float64 module reads "eager" as it runs."""
        try:
            return self._decide_backend(target, self._probe_parameter(target))
        except ValueError:
            return f"{self.backend} unavailable"

    def check_backend(self, target: nn.Module) -> None:
        """Refuse, at attach time, an explicitly requested backend that cannot run this delta on
        the target's device and dtype (``backend="triton"`` on CPU tensors without Triton's
        interpreter, ``"cuda"`` on CPU), rather than fail at the first forward."""
        if self.backend in ("auto", "eager"):
            return
        param = self._probe_parameter(target)
        if param is not None:
            self._decide_backend(target, param)

    def _decide_backend(self, target: nn.Module, param: Optional[torch.Tensor]) -> str:
        """The op layer's decision for ``param``'s device and dtype; ``ValueError`` where the call
        would raise."""
        from .ops.backend import backend_for, op_backends, resolve_backend

        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else None
        call = self.op_call(target)
        if call is not None and call[0] in op_backends():
            return backend_for(call[0], device, self.backend, dtype=dtype, **call[1])
        return resolve_backend(type(self).__name__, self.backend, device,
                               implemented=self.implemented_backends(), dtype=dtype)

    def _probe_parameter(self, target: nn.Module) -> Optional[torch.Tensor]:
        """The tensor whose device and dtype the op will see: the target's first floating weight,
        else this delta's."""
        param = next((p for p in target.parameters(recurse=False) if p.is_floating_point()), None)
        return param if param is not None else next((p for p in self.parameters() if p.is_floating_point()), None)

    def implemented_backends(self) -> tuple[str, ...]:
        return ()


# Addressing never selects a delta module or what it contains.
setattr(DeltaModule, DELTA_MARKER, True)


@dataclass
class Slot:
    path: str
    target: nn.Module
    child_name: str
    delta: DeltaModule


class DeltaBase:
    """Base of every method (``LoraModel``, ``AdapterModel``, ...). Not an ``nn.Module``: the
    delta's parameters live inside the backbone as children of the modules they modify, so
    ``backbone.to()``, ``backbone.parameters()`` and optimizers see them with no extra step.

    A method lists its OpenDelta-compatible keyword arguments in its constructor, builds its
    typed config from them (``config_class``) and hands it to ``DeltaBase.__init__``, which
    resolves the targets and attaches everything. Hyper-parameters read as attributes
    (``delta.lora_r``) come from the config."""

    delta_type: ClassVar[str] = ""
    config_class: ClassVar[type[BaseDeltaConfig]] = BaseDeltaConfig
    default_modified_modules: ClassVar[list[str]] = []
    default_exclude_modules: ClassVar[list[str]] = ["lm_head"]
    default_unfrozen_modules: ClassVar[list[str]] = [DELTAS_TOKEN]
    target_types: ClassVar[Optional[tuple[type, ...]]] = None

    def __init__(self, backbone_model: nn.Module, config: BaseDeltaConfig):
        if not isinstance(backbone_model, nn.Module):
            raise TypeError(f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}")
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} is configured by a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.__dict__["backbone_model"] = backbone_model
        self._config = config
        self.backend = config.backend
        self.structure = structure_map(backbone_model)
        modified_modules, common_structure = config.modified_modules, config.common_structure
        self.uses_default_targets = modified_modules is None
        if modified_modules is None:
            if self.default_modified_modules and not self.structure.mapped:
                raise ValueError(
                    f"{type(self).__name__} has default targets only where the model's structure is known (a table, or "
                    f"transformer blocks found by inference), and {type(backbone_model).__name__} has neither; "
                    "pass modified_modules=[...] with raw module names"
                )
            modified_modules = self.default_targets()
            if common_structure is None and modified_modules:
                common_structure = True
        self.modified_modules = list(modified_modules)
        self.exclude_modules = list(self.default_exclude_modules if config.exclude_modules is None
                                    else config.exclude_modules)
        self.unfrozen_modules = list(self.default_unfrozen_modules if config.unfrozen_modules is None
                                     else config.unfrozen_modules)
        self.common_structure = common_structure
        self.name = self._unique_name(config.name)
        self.slots: list[Slot] = []
        self.attached = False
        self.add_all_delta_to_backbone()

    @property
    def config(self) -> BaseDeltaConfig:
        """This delta's configuration as it stands: the targets resolved, the name given."""
        return dataclasses.replace(
            self._config, modified_modules=self.modified_modules, exclude_modules=self.exclude_modules,
            unfrozen_modules=self.unfrozen_modules, common_structure=self.common_structure, name=self.name)

    def __getattr__(self, name: str):
        config = self.__dict__.get("_config")
        if config is not None and name in config.hyperparameter_names():
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ construction
    def default_targets(self) -> list[str]:
        return list(self.default_modified_modules)

    def present_common_names(self, candidates: Sequence[str]) -> list[str]:
        """The ``candidates`` (common names) that name at least one module of this backbone, or
        the parent of some (BERT's ``ff``, whose ``ff.w1`` / ``ff.w2`` exist but no module of its
        own), in order: architectures differ in which exist (GPT-2 has no separate ``attn.q``),
        and a wrapper may hold several architectures."""
        present = set()
        for _, common in self.structure.items():
            names = (common, common.rsplit(".", 1)[0]) if "." in common else (common,)
            for name in candidates:
                if any(n == name or n.endswith("." + name) for n in names):
                    present.add(name)
        return [name for name in candidates if name in present]

    def build_delta(self, path: str, target: nn.Module) -> DeltaModule:
        raise NotImplementedError

    def _unique_name(self, requested: Optional[str]) -> str:
        self.backbone_model.__dict__.setdefault(REGISTRY_ATTR, {})
        if requested is not None:
            if _name_taken(self.backbone_model, requested):
                raise ValueError(f"this backbone already carries a delta named {requested!r}; pass another name=")
            return requested
        base = self.delta_type
        candidate, i = base, 1
        while _name_taken(self.backbone_model, candidate):
            candidate, i = f"{base}_{i}", i + 1
        return candidate

    def add_all_delta_to_backbone(self) -> "DeltaBase":
        """Select targets, build every delta module, then attach them all; a failure while
        building leaves the backbone untouched."""
        targets = self.select_targets()
        built = [Slot(path, module, self.name, self.build_delta(path, module)) for path, module in targets]
        for slot in built:
            try:
                slot.delta.check_backend(slot.target)
            except ValueError as err:
                raise ValueError(f"{type(self).__name__} on {type(slot.target).__name__} at {slot.path!r}: {err}") from None
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
        self._swap_claimed_parameters()
        return self

    def detach(self) -> "DeltaBase":
        """Remove this delta from the backbone: its forward is then exactly the original, and
        backbone parameters it trained or loaded (``unfrozen_modules``, PEFT's
        ``modules_to_save``) hold their original values again (``attach()`` puts the trained
        ones back)."""
        if not self.attached:
            return self
        if self.is_merged:
            self.unmerge()
        for slot in reversed(self.slots):
            routing.detach(slot.target, slot.child_name)
        self.attached = False
        self._swap_claimed_parameters()
        return self

    # ------------------------------------------------------------------ claimed backbone parameters
    # Backbone parameters the delta trains in place (``unfrozen_modules``) or loads values into
    # keep their original values in ``_claimed_originals`` from the moment the delta claims them;
    # while the delta is detached, its own values wait in ``_claimed_values``.
    def _claim(self, params: dict[str, nn.Parameter]) -> None:
        originals = self.__dict__.setdefault("_claimed_originals", {})
        for name, param in params.items():
            if name not in originals:
                originals[name] = (param, param.detach().clone())

    def _swap_claimed_parameters(self) -> None:
        originals = self.__dict__.get("_claimed_originals", {})
        if not originals:
            return
        with torch.no_grad():
            if self.attached:  # attach: the delta's values go back in
                values = self.__dict__.pop("_claimed_values", {})
                for name, (param, _) in originals.items():
                    if name in values:
                        param.copy_(values[name])
            else:  # detach: keep the delta's values, restore the backbone's
                self.__dict__["_claimed_values"] = {name: param.detach().clone() for name, (param, _) in originals.items()}
                for param, original in originals.values():
                    param.copy_(original)

    def _claimed_parameter_values(self) -> dict[str, torch.Tensor]:
        """The delta's own values of the backbone parameters it trains (``unfrozen_modules``),
        attached or not."""
        found = {name: p.detach() for name, p in self._unfrozen_backbone_parameters(self.unfrozen_modules).items()}
        waiting = self.__dict__.get("_claimed_values", {})
        found.update({name: value for name, value in waiting.items() if name in found})
        return found

    def load_backbone_tensors(self, tensors: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy ``tensors`` into backbone parameters of the same names, which this delta then owns
        like the modules it trains (``detach()`` restores their original values). For checkpoints
        that carry base weights of their targets (PEFT's ``save_embedding_layers``)."""
        if not tensors:
            return
        params = dict(self.backbone_model.named_parameters())
        problems = [f"{name}: no such parameter" for name in tensors if name not in params]
        problems += [f"{name}: checkpoint shape {tuple(t.shape)} != parameter shape {tuple(params[name].shape)}"
                     for name, t in tensors.items() if name in params and t.shape != params[name].shape]
        if problems:
            raise checkpoint.CheckpointError(f"cannot load the base weights in {source}:\n  " + "\n  ".join(problems))
        self._claim({name: params[name] for name in tensors})
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))

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
        """Backbone parameters of the modules ``specs`` name (``"deltas"`` aside): raw names, as in
        OpenDelta, plus common names where the spelling asks for them (``addressing.match_specs``)."""
        parsed = [Spec.parse(s) for s in specs if s != DELTAS_TOKEN]
        if not parsed:
            return {}
        modules = [(path, module) for path, module in backbone_modules(self.backbone_model) if path]
        hits = match_specs(modules, parsed, structure=self.structure, common_structure=self.common_structure,
                           unfreezing=True)
        found: dict[str, nn.Parameter] = {}
        for i in sorted({i for found_ in hits for i in found_}):
            path, module = modules[i]
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
        unfrozen = self._unfrozen_backbone_parameters(exclude)
        self._claim(unfrozen)
        keep_trainable = {id(p) for p in unfrozen.values()}
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

    def merge(self, dequantize: bool = False) -> "DeltaBase":
        """Fold every mergeable delta into the base weights (fp32 accumulation). Deltas that
        cannot be folded (adapters) keep running as routed modules. Modules with quantized weights
        (bitsandbytes 4 / 8-bit) are refused unless ``dequantize=True``: they then compute with a
        dequantized float copy of their weight holding the delta (their packed weight untouched)."""
        if not self.attached:
            raise RuntimeError(f"delta {self.name!r} is detached; attach() it before merge()")
        _refuse_quantized(self, dequantize, "merge")
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
        """What a checkpoint's ``config.json`` holds: the config, plus bookkeeping."""
        return {
            **self.config.to_dict(),
            "backbone_class": type(self.backbone_model).__name__,
            "backbone_model_type": backbone_model_type(self.backbone_model),
            "targets": [slot.path for slot in self.slots],
            "odelta_fast_version": __version__,
        }

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """This delta's tensors plus the backbone parameters of modules the user unfroze,
        keyed by their names in the backbone."""
        tensors = {name: p.detach() for name, p in self.named_parameters()}
        tensors.update(self._claimed_parameter_values())
        _refuse_sharded(tensors)
        return tensors

    def save_finetuned(
        self, finetuned_delta_path: str = "./delta_checkpoints/", save_config: bool = True, state_dict=None,
        save_function=None, push_to_dc: bool = False, center_args=None, center_args_pool=None, list_tags=None,
        dict_tags=None, delay_push: bool = False, test_result=None, usage: str = "", *, format: str = "odelta",
    ) -> str:
        """Write the config and the delta's tensors (never the backbone) atomically.
        ``format="peft"`` writes PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA only).

        OpenDelta's other arguments are accepted so its code runs unchanged; those that mean
        nothing here (DeltaCenter pushes and their tags, ``save_function``: checkpoints are
        safetensors, ``save_config=False``: the config is part of the checkpoint) warn when set."""
        ignored = [f"{name}={value!r}" for name, value, default in (
            ("save_config", save_config, True), ("state_dict", state_dict, None), ("save_function", save_function, None),
            ("push_to_dc", push_to_dc, False), ("delay_push", delay_push, False)) if value != default]
        if ignored:
            warnings.warn(f"save_finetuned: ignoring OpenDelta option(s) {', '.join(ignored)}: the checkpoint is "
                          "config.json + safetensors of the delta's own tensors, written locally (DeltaCenter "
                          "no longer exists)", UserWarning, stacklevel=2)
        if self.is_merged:
            raise RuntimeError(f"delta {self.name!r} is merged into the base weights; unmerge() before saving it")
        if format == "odelta":
            checkpoint.save_checkpoint(finetuned_delta_path, self.config_dict(), self.delta_state_dict())
            return str(finetuned_delta_path)
        return self.save_in_format(format, str(finetuned_delta_path))

    def save_in_format(self, fmt: str, path: str) -> str:
        """Save in another library's format; methods that have one override this."""
        if fmt == "peft":
            raise ValueError(f"format='peft' supports LoRA deltas only; {type(self).__name__} has no PEFT equivalent here")
        raise ValueError(f"save_finetuned: format={fmt!r} is not supported; expected 'odelta' or 'peft'")

    @classmethod
    def from_config(cls, config, backbone_model: nn.Module, **overrides) -> "DeltaBase":
        """Build this method from its config (or a dict of one, e.g. a checkpoint's), with
        ``overrides`` replacing some of its values."""
        if not isinstance(config, BaseDeltaConfig):
            config = cls.config_class.from_dict(config)
        return cls(backbone_model, **{**config.to_kwargs(), **overrides})

    @classmethod
    def from_finetuned(cls, finetuned_delta_path: str, backbone_model: nn.Module, *model_args,
                       delta_config=None, state_dict=None, cache_dir=None, force_download: bool = False,
                       check_hash: bool = True, local_files_only: bool = False, **overrides) -> "DeltaBase":
        """Rebuild the delta on ``backbone_model`` and load its tensors. Any mismatch (other
        targets, shapes, names) raises and leaves the backbone exactly as it was.

        OpenDelta's arguments are accepted: ``delta_config`` / ``state_dict`` replace the
        checkpoint's own; the hub-related ones (``cache_dir``, ``force_download``,
        ``local_files_only``, ``check_hash``) have nothing to do here (checkpoints are local
        directories, and a backbone that does not fit is refused by name and shape)."""
        if model_args:
            raise TypeError(f"from_finetuned() takes no extra positional arguments, got {len(model_args)}")
        if cache_dir is not None or force_download:
            warnings.warn("from_finetuned: cache_dir / force_download are for OpenDelta's DeltaCenter downloads; "
                          "checkpoints load from local directories only", UserWarning, stacklevel=2)
        config, tensors = checkpoint.load_checkpoint(finetuned_delta_path)
        if delta_config is not None:
            config = {**config, **(delta_config.to_dict() if hasattr(delta_config, "to_dict") else dict(delta_config))}
        if state_dict is not None:
            tensors = dict(state_dict)
        if cls.delta_type and config.get("delta_type") != cls.delta_type:
            raise checkpoint.CheckpointError(
                f"{finetuned_delta_path!r} holds a {config.get('delta_type')!r} delta, not {cls.delta_type!r}; "
                "use AutoDeltaModel.from_finetuned to load any type"
            )
        if "name" not in overrides and _name_taken(backbone_model, config.get("name")):
            # The saved name is taken on this backbone (a second checkpoint of the same type, or the
            # same one loaded again through a new wrapper of the same modules): load under a fresh
            # name rather than refuse.
            overrides = dict(overrides, name=None)
        try:
            delta = cls.from_config(config, backbone_model, **overrides)
        except ValueError as err:
            raise _with_architecture_note(err, config, backbone_model) from None
        try:
            delta.load_delta_state_dict(tensors, expected_targets=config.get("targets"),
                                        source=str(finetuned_delta_path), saved_name=config.get("name"))
        except BaseException as err:
            delta.remove()
            if isinstance(err, ValueError):
                raise _with_architecture_note(err, config, backbone_model) from None
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
        self._claim(self._unfrozen_backbone_parameters(self.unfrozen_modules))
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
        """Detach and forget this delta: its name is free again; with the last delta gone, the
        backbone's ``state_dict()`` and load hooks are its own again."""
        self.detach()
        self.__dict__.pop("_claimed_originals", None)
        self.__dict__.pop("_claimed_values", None)
        self._forget()

    def _forget(self) -> None:
        registry = self.backbone_model.__dict__.get(REGISTRY_ATTR, {})
        registry.pop(self.name, None)
        if not registry:
            self.backbone_model.__dict__.pop(REGISTRY_ATTR, None)
            remove_state_dict_filter(self.backbone_model)

    def merge_and_unload(self, progress: Optional[bool] = None, dequantize: bool = False) -> nn.Module:
        """Fold this delta into the backbone's weights for good and remove every trace of it
        (its modules, the routing, its name, and with the last delta the ``state_dict`` filter);
        returns the backbone, a plain model ``save_pretrained`` writes whole. Module by module,
        keeping no copy of the original weights. A delta that cannot be folded (adapters,
        prefixes, BitFit on modules without a bias) is refused before anything changes. Backbone
        modules it trained (``unfrozen_modules``) keep their trained values. Quantized modules
        (bitsandbytes) need ``dequantize=True``: each is replaced by a plain ``nn.Linear`` holding its
        dequantized weight with the delta folded in."""
        from tqdm.auto import tqdm

        from .logging_utils import tqdm_disable

        if not self.attached:
            raise RuntimeError(f"delta {self.name!r} is detached; attach() it before merge_and_unload()")
        blocked = [slot.path or "<root>" for slot in self.slots if not slot.delta.mergeable]
        if blocked:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} cannot be folded into the weights of {len(blocked)} module(s) "
                f"({', '.join(blocked[:5])}{', ...' if len(blocked) > 5 else ''}): it adds computation there "
                "rather than changing an existing weight or bias; keep it attached, or save it with save_finetuned()")
        _refuse_quantized(self, dequantize, "merge_and_unload")
        shared = [slot.path for slot in self.slots if slot.delta.dequantizes_on_merge and len(routing.routes(slot.target)) > 1]
        if shared:
            raise ValueError(f"merge_and_unload(dequantize=True) replaces the quantized modules {shared[:5]}, which "
                             "carry other deltas too; remove or merge_and_unload those first")
        with torch.no_grad():
            for slot in tqdm(self.slots, desc=f"merging {self.name}", unit="module", disable=tqdm_disable(progress)):
                if slot.delta.dequantizes_on_merge:
                    replacement = slot.delta.unloaded(slot.target)
                    slot.delta.merged = False
                    routing.detach(slot.target, slot.child_name)
                    parent, _, child = slot.path.rpartition(".")
                    setattr(self.backbone_model.get_submodule(parent) if parent else self.backbone_model, child,
                            replacement)
                    continue
                merging.fold_permanently(slot.target, slot.delta)
                slot.delta.merged = False
                routing.detach(slot.target, slot.child_name)
        self.slots = []
        self.attached = False
        self.__dict__.pop("_claimed_originals", None)
        self._forget()
        return self.backbone_model

    # ------------------------------------------------------------------ inspection
    def log(self, module: Optional[nn.Module] = None, delta_ratio: bool = True, trainable_ratio: bool = True,
            visualization: bool = True, cuda_memory: bool = True, console=None) -> None:
        """Print the backbone as a rich tree (repeated blocks folded, parameter-less leaves hidden,
        identical siblings merged) and the trainable / delta parameter lines (OpenDelta's options)."""
        log_tree(self.backbone_model if module is None else module, console=console, visualization=visualization,
                 trainable_ratio=trainable_ratio, delta_ratio=delta_ratio, cuda_memory=cuda_memory)

    def __repr__(self) -> str:
        state = "merged" if self.is_merged else ("attached" if self.attached else "detached")
        return f"{type(self).__name__}(name={self.name!r}, targets={len(self.slots)}, {state})"


def _refuse_quantized(delta: DeltaBase, dequantize: bool, what: str) -> None:
    """Merging into quantized weights is the user's call: say why, and how to ask for it."""
    if dequantize:
        return
    paths = [slot.path or "<root>" for slot in delta.slots if slot.delta.dequantizes_on_merge and not slot.delta.merged]
    if paths:
        raise ValueError(
            f"{what}: {len(paths)} module(s) of {delta.name!r} have quantized weights (bitsandbytes 4/8-bit: "
            f"{', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}). Folding a delta into them would mean "
            "requantizing, whose rounding error (about one quantization step per weight) changes the outputs. "
            f"{what}(dequantize=True) instead computes each with a dequantized float copy of its weight holding the "
            "delta (memory: one float weight per module; " + ("the packed weight is kept, and unmerge() returns to "
                                                                "it exactly)" if what == "merge" else
                                                                "each module becomes a plain nn.Linear)"))


def _name_taken(backbone: nn.Module, name: Optional[str]) -> bool:
    """Whether a delta named ``name`` is on ``backbone``: in its registry, or as a child of one
    of its modules (deltas attached through another wrapper of the same modules)."""
    if name is None:
        return False
    if name in backbone.__dict__.get(REGISTRY_ATTR, {}):
        return True
    return any(is_delta_module(child) for module in backbone.modules()
               for child_name, child in module.named_children() if child_name == name)


def backbone_model_type(model: nn.Module) -> Optional[str]:
    """``config.model_type`` of the (outermost) transformers model in ``model``, if any."""
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return model_type
    return None


def _with_architecture_note(err: ValueError, config: dict, backbone: nn.Module) -> ValueError:
    """``err`` with the architecture the checkpoint was trained on, when it is not this one's:
    a shape mismatch is then explained, not just listed."""
    trained_on = config.get("backbone_model_type")
    here = backbone_model_type(backbone)
    saved_class = config.get("backbone_class")
    if trained_on and here and trained_on != here:
        note = f"the checkpoint was trained on a {trained_on} model ({saved_class}); this backbone is a {here} model " \
               f"({type(backbone).__name__})"
    elif not trained_on and saved_class and saved_class != type(backbone).__name__:
        note = f"the checkpoint was trained on {saved_class}; this backbone is {type(backbone).__name__}"
    else:
        return err
    return type(err)(f"{err}\n  ({note})")


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


def _merged_delta_keys(model: nn.Module) -> Optional[set[str]]:
    """Keys of the tensors of merged delta modules, or None when nothing is merged."""
    merged = [(path, m) for path, m in model.named_modules() if isinstance(m, DeltaModule) and m.merged]
    if not merged:
        return None
    return {f"{path}.{name}" if path else name for path, m in merged for name, _ in m.state_dict().items()}


def _filter_state_dict(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook of a backbone with deltas: drop the frozen backbone tensors."""
    merged = _merged_delta_keys(module)
    if merged is not None:
        # A merged model is a deployable model (save_pretrained must write every weight): all of
        # it, less the tensors of deltas that now live inside the weights.
        for key in [prefix + k for k in merged if prefix + k in state_dict]:
            del state_dict[key]
        return
    keep = {prefix + k for k in _trainable_or_delta_keys(module)}
    for key in list(state_dict):
        # Inside a wrapper (DDP's ``module.``, a user's container) ``state_dict`` is the caller's
        # destination: keys outside ``prefix`` are siblings' and not ours to drop.
        if key.startswith(prefix) and key not in keep:
            del state_dict[key]


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
    backbone tensors absent from a loaded dict are not reported missing. Torch's own state-dict
    and load hooks, so it also holds inside wrappers (DDP, a user's container). Idempotent."""
    if has_state_dict_filter(model):
        return
    register_post = getattr(model, "register_state_dict_post_hook", None)  # public since torch 2.5
    filter_hook = register_post(_filter_state_dict) if register_post else model._register_state_dict_hook(
        _filter_state_dict)
    register_pre = getattr(model, "register_load_state_dict_pre_hook", None)
    pre = register_pre(_remember_load_prefix) if register_pre else model._register_load_state_dict_pre_hook(
        _remember_load_prefix, with_module=True)
    model.__dict__[STATE_DICT_HOOKS_ATTR] = (
        filter_hook, pre, model.register_load_state_dict_post_hook(_forgive_filtered_keys))


def has_state_dict_filter(model: nn.Module) -> bool:
    return STATE_DICT_HOOKS_ATTR in model.__dict__


def remove_state_dict_filter(model: nn.Module) -> None:
    for handle in model.__dict__.pop(STATE_DICT_HOOKS_ATTR, ()):
        handle.remove()
