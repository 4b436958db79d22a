"""IncreLoRA as a PEFT method: ``peft.get_peft_model(model, IncreLoraConfig(...))``.

After ``import increlora`` (which calls :func:`register`), PEFT knows the method::

    import increlora
    from increlora.integrations import IncreLoraConfig, IncreLoRACallback
    from peft import get_peft_model

    model = get_peft_model(base, IncreLoraConfig(target_rank=2, task_type="SEQ_CLS"))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[IncreLoRACallback()])

The PEFT config is a thin front: its fields are generated from the package's
:class:`~increlora.config.IncreLoRAConfig` (same names and defaults; ``lora_alpha`` and
``lora_dropout`` are PEFT's spellings of ``alpha`` and ``dropout``), and every check and
derived value (capacity, schedule, budget) is that class's and :class:`IncreLoRA`'s. The
layers are this package's :class:`~increlora.layers.TripletLayer`, made PEFT tuner layers
(:class:`IncreLoraLayer`); ``modules_to_save`` (the classifier of ``task_type="SEQ_CLS"``)
is PEFT's own ``ModulesToSaveWrapper``.

What ``save_pretrained`` writes (``adapter_model.safetensors``, safetensors only):

* per module ``lora_A`` / ``lora_E`` / ``lora_B`` at the rows the module holds (with
  ``storage="static"`` its capacity, rows past the used rank zero) and ``lora_ranks`` =
  [active rank, used rank], which ``PeftModel.from_pretrained`` restores
  (:meth:`PeftTripletLayer._load_from_state_dict`);
* ``increlora_allocator_state``: the allocator's state (scores, growth history, fresh-row
  bookkeeping) as UTF-8 JSON bytes, when a controller ran or was loaded. A Trainer resuming
  from a PEFT checkpoint gets it back through ``load_adapter``.

One IncreLoRA adapter per model: PEFT's multi-adapter features (``add_adapter`` of a second
IncreLoRA adapter, ``add_weighted_adapter``, mixed adapters) are refused, see docs/peft.md.

The pieces are shared with the package's other PEFT methods (the AdaLoRA of
:mod:`increlora.integrations.peft_adalora`): :func:`make_config_class` with
:class:`PeftConfigMethods` (the config), :class:`PeftTripletLayer` (the tuner-layer mixin),
:class:`PackageTuner` (the tuner) and :func:`register_method`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import warnings
from dataclasses import field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from peft.utils.other import set_additional_trainable_modules
from torch import nn

from ..adapter import AdaptedModel, _attach
from ..config import ConfigError, IncreLoRAConfig
from ..export import export_peft
from ..injection import TARGET_PRESETS
from ..layers.triplet import TripletLayer
from ..methods.increlora import IncreLoRA

PEFT_TYPE_NAME = "INCRELORA"
STATE_KEY = "increlora_allocator_state"  # no dot: PEFT's adapter-name handling leaves it alone

# PEFT spells these two fields its own way; every other field keeps IncreLoRAConfig's name.
_PEFT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
# Fields PEFT's own machinery handles (target matching is ours, modules_to_save is PEFT's).
_PEFT_OWNED = ("target_modules", "exclude_modules", "modules_to_save")


# ------------------------------------------------------------------------------- config
def _method_fields(package_config: type) -> list[tuple[str, Any, dataclasses.Field]]:
    """A package config's method fields (not the module selection) as PEFT config fields."""
    result = []
    for f in dataclasses.fields(package_config):
        if f.name in _PEFT_OWNED:
            continue
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            new = field(default_factory=f.default_factory, metadata=dict(f.metadata))
        else:
            new = field(default=f.default, metadata=dict(f.metadata))
        result.append((_PEFT_NAMES.get(f.name, f.name), Any, new))
    return result


class PeftConfigMethods:
    """Methods of a generated PEFT config (:func:`make_config_class`) of a package method.

    A subclass sets ``package_config`` (the package's config class), ``peft_type_name``
    and ``_register`` (registers the method with PEFT; idempotent).
    """

    package_config: type
    peft_type_name: str

    @staticmethod
    def _register() -> None:
        raise NotImplementedError

    def __post_init__(self) -> None:
        super().__post_init__()  # PEFT's checks (task_type)
        self._register()  # idempotent; normally done when peft was imported
        self.peft_type = PeftType[self.peft_type_name]
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, set):
            self.exclude_modules = sorted(self.exclude_modules)
        self.to_package_config()  # every check of the package's config, now, in one line

    def to_package_config(self) -> Any:
        """The package's config with these values (modules_to_save stays PEFT's)."""
        values = {
            name: getattr(self, _PEFT_NAMES.get(name, name))
            for name in (f.name for f in dataclasses.fields(self.package_config))
            if name != "modules_to_save"
        }
        try:
            return self.package_config(**values)
        except ConfigError as err:
            message = str(err)
            for ours, peft_name in _PEFT_NAMES.items():
                if message.startswith(f"{ours}:"):
                    message = peft_name + message[len(ours) :]
            raise ConfigError(f"{type(self).__name__}: {message}") from None


class _IncreLoraConfigMethods(PeftConfigMethods):
    """Methods of :class:`IncreLoraConfig` (its fields are generated, see below)."""

    package_config = IncreLoRAConfig
    peft_type_name = PEFT_TYPE_NAME

    @staticmethod
    def _register() -> None:
        register()

    def to_increlora_config(self) -> IncreLoRAConfig:
        """The package's IncreLoRAConfig with these values (modules_to_save stays PEFT's)."""
        return self.to_package_config()


def make_config_class(
    name: str,
    methods: type,
    doc: str,
    hints: dict[str, str] | None = None,
) -> type:
    """A PEFT config dataclass whose fields are those of ``methods.package_config``.

    ``hints`` maps field names of another spelling (PEFT's own config of the method) to what
    to say when one is passed; an unknown field is a one-line ConfigError either way.
    """
    package_config = methods.package_config

    def _help(field_name: str) -> str:
        return next(
            f.metadata.get("help", "")
            for f in dataclasses.fields(package_config)
            if f.name == field_name
        )

    fields = [
        ("target_modules", Any, field(default=None, metadata={"help": _help("target_modules")})),
        ("exclude_modules", Any, field(default=None, metadata={"help": _help("exclude_modules")})),
        (
            "modules_to_save",
            Any,
            field(
                default=None,
                metadata={
                    "help": "Modules trained in full and saved with the adapter (PEFT's"
                    " ModulesToSaveWrapper); task_type='SEQ_CLS' adds the classifier."
                },
            ),
        ),
        *_method_fields(package_config),
    ]
    cls = dataclasses.make_dataclass(
        name, fields, bases=(methods, PeftConfig), namespace={"__module__": methods.__module__}
    )
    cls.__doc__ = doc
    generated_init = cls.__init__
    valid = sorted(f.name for f in dataclasses.fields(cls))
    hints = hints or {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            close = []
            for u in unknown:
                match = difflib.get_close_matches(u, valid, n=1)
                if u in hints or match:
                    close.append(f"{u!r} -> {hints.get(u) or repr(match[0])}")
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{name}: unknown field(s) {unknown}{hint}; valid fields are {valid}")
        generated_init(self, *args, **kwargs)

    __init__.__signature__ = __import__("inspect").signature(generated_init)  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return cls


IncreLoraConfig = make_config_class(
    "IncreLoraConfig",
    _IncreLoraConfigMethods,
    "PEFT config of IncreLoRA: LoRA whose rank grows from ``init_rank`` to a budget"
    " (``target_rank``, the average rank per adapted module, or ``target_params``).\n\n"
    "Fields and defaults are :class:`increlora.IncreLoRAConfig`'s (``lora_alpha`` and"
    " ``lora_dropout`` are its ``alpha`` and ``dropout``), plus PEFT's ``task_type``,"
    " ``modules_to_save``, ``base_model_name_or_path``, ``inference_mode``. Schedule fields"
    " left as None are derived from the Trainer's total steps by IncreLoRACallback.",
)


# ------------------------------------------------------------------------------- layer
class PeftTripletLayer:
    """What makes a package layer a PEFT tuner layer (one adapter per layer).

    A mixin, first in the bases: ``class L(PeftTripletLayer, PackageLayer, BaseTunerLayer)``.
    The parameters keep their names (``lora_A``, ``lora_E``, ``lora_B``: no per-adapter
    dicts, there is one adapter). The layer's rank state (what changes during training) is
    the persistent buffer named ``rank_buffer``, written from :meth:`rank_tensor` into every
    state dict and restored by :meth:`restore_ranks` when a state dict is loaded.
    """

    adapter_layer_names = ()
    other_param_names = ()
    label = "increlora"  # the method, in error messages
    rank_buffer = "lora_ranks"

    def rank_tensor(self) -> torch.Tensor:
        raise NotImplementedError

    def restore_ranks(self, saved: torch.Tensor) -> None:
        raise NotImplementedError

    def _register_rank_buffer(self) -> None:
        self.register_buffer(self.rank_buffer, self.rank_tensor().to(self.lora_A.device))

    # PEFT reads these as properties; AdapterLayer keeps plain flags.
    @property
    def merged(self) -> bool:
        return self.__dict__.get("_increlora_merged", False)

    @merged.setter
    def merged(self, value: bool) -> None:
        self.__dict__["_increlora_merged"] = bool(value)

    @property
    def merged_adapters(self) -> list[str]:
        return list(self.active_adapters) if self.merged else []

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled

    def _check_adapter_names(self, names: Any) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        if names and names != list(self.active_adapters):
            raise ValueError(
                f"{self.label} layers hold one adapter ({self.active_adapters}), not {names}:"
                " PEFT multi-adapter features are not supported (docs/peft.md)"
            )
        return names

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = self._check_adapter_names(adapter_names)
        for p in self.adapter_parameters():
            p.requires_grad_(bool(names) and not inference_mode)

    def set_requires_grad(self, adapter_names: Any, requires_grad: bool = True) -> None:
        if self._check_adapter_names(adapter_names):
            for p in self.adapter_parameters():
                p.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError(
            f"{self.label}: the adapter cannot be deleted layer by layer; use model.unload() or"
            " merge_and_unload() to get the base model back"
        )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if adapter_names is not None:
            self._check_adapter_names(adapter_names)
        if safe_merge and not torch.isfinite(self.delta_weight()).all():
            raise ValueError(f"{self.label}: the adapter holds NaN/inf values; merge refused")
        super().merge()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    # ------------------------------------------------------------- ranks in state dicts
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        getattr(self, self.rank_buffer).copy_(self.rank_tensor())
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any):
        saved = state_dict.get(prefix + self.rank_buffer)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if saved is not None:
            self.restore_ranks(saved)


class IncreLoraLayer(PeftTripletLayer, TripletLayer, BaseTunerLayer):
    """This package's triplet layer as a PEFT tuner layer (one adapter per layer).

    The persistent buffer ``lora_ranks`` holds ``[active_rank, used_rank]`` in every state
    dict, and loading a state dict restores them.
    """

    label = "IncreLoRA"

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        TripletLayer.__init__(self, base_layer, **kwargs)
        self._register_rank_buffer()

    def rank_tensor(self) -> torch.Tensor:
        return torch.tensor([self.active_rank, self.used_rank])

    def restore_ranks(self, saved: torch.Tensor) -> None:
        active, used = (int(v) for v in saved.tolist())
        self.set_ranks(active, used)


class _PeftIncreLoRA(IncreLoRA):
    """IncreLoRA building :class:`IncreLoraLayer` (not registered: same name and format)."""

    layer_class = IncreLoraLayer


# ------------------------------------------------------------------ allocator state codec
def _to_jsonable(obj: Any) -> Any:
    if torch.is_tensor(obj):
        t = obj.detach().cpu()
        return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "data": t.reshape(-1).tolist()}  # fmt: skip
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_jsonable(v) for k, v in obj.items()}
        return {"__items__": [[k, _to_jsonable(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_jsonable(v) for v in obj]}
    if isinstance(obj, list):
        return [_to_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in the allocator state")


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            dtype = getattr(torch, obj["__tensor__"])
            return torch.tensor(obj["data"], dtype=dtype).reshape(obj["shape"])
        if set(obj) == {"__items__"}:
            return {k: _from_jsonable(v) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_from_jsonable(v) for v in obj["__tuple__"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


def encode_state(state: dict) -> torch.Tensor:
    """A controller state as a uint8 tensor of UTF-8 JSON (lossless; float64 round-trips)."""
    raw = json.dumps(_to_jsonable(state)).encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def decode_state(tensor: torch.Tensor) -> dict:
    return _from_jsonable(json.loads(bytes(tensor.cpu().to(torch.uint8).tolist()).decode("utf-8")))


# ------------------------------------------------------------------------------- tuner
def find_tuner(model: nn.Module) -> PackageTuner | None:
    """The package's PEFT tuner (IncreLoRA, AdaLoRA) inside ``model`` (a PeftModel, or what
    wraps one), or None."""
    for module in model.modules():
        if isinstance(module, PackageTuner):
            return module
    return None


class PackageTuner(BaseTuner):
    """PEFT tuner of one of this package's methods: injects with the package's code, keeps
    its handle.

    ``self.adapted`` is the :class:`~increlora.AdaptedModel` of the injected layers
    (``rank_pattern()``, ``controller(...)``); IncreLoRACallback drives its controller.
    A subclass names ``method_class`` (a package :class:`~increlora.methods.base.Method`
    whose layers are PEFT tuner layers, see :class:`PeftTripletLayer`), ``tuner_layer_cls``
    and ``label``.
    """

    prefix = "lora_"
    target_module_mapping = TARGET_PRESETS
    method_class: type
    label = "increlora"

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        self.adapted: AdaptedModel | None = None
        # Controller state loaded with the adapter (from_pretrained / a Trainer resuming),
        # for the next controller to restore.
        self.pending_controller_state: dict | None = None
        super().__init__(model, config, adapter_name, **kwargs)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} injects all modules at once")

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
    ) -> None:
        """Put the method on ``model`` with the package's injection (one budget for all)."""
        if self.adapted is not None or len(self.peft_config) > 1:
            raise ValueError(
                f"{self._one_adapter}; PEFT multi-adapter features (a second adapter,"
                " add_weighted_adapter, mixed models) are not supported (docs/peft.md)"
            )
        peft_config = self.peft_config[adapter_name]
        method = self.method_class(peft_config.to_package_config())
        layers, _ = _attach(model, method)
        for layer in layers.values():
            layer._active_adapter = adapter_name
            if peft_config.inference_mode:
                layer.set_adapter(adapter_name, inference_mode=True)
        self.adapted = AdaptedModel(model, method, layers, [])
        self.targeted_module_names = list(layers)
        set_additional_trainable_modules(
            model=model,
            peft_config=peft_config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
            activate_adapter=True,
        )

    @property
    def _one_adapter(self) -> str:
        config = type(next(iter(self.peft_config.values()))).__name__
        return f"{config}: a model holds one {self.label} adapter"

    def _check_new_adapter_config(self, config: Any) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(f"{self._one_adapter} (docs/peft.md)")

    # -------------------------------------------------------------------- controller
    def controller_state(self) -> dict | None:
        """The running controller's state, else the one loaded with the adapter."""
        controller = self.adapted.current if self.adapted is not None else None
        return controller.state_dict() if controller is not None else self.pending_controller_state

    def rank_pattern(self) -> dict[str, int]:
        """Rank in use per adapted module (names relative to the base model): the rank of
        its plain LoRA export."""
        return self.adapted.rank_pattern()

    def num_active_parameters(self) -> int:
        """Adapter parameters in use (``print_trainable_parameters`` counts the rows held)."""
        return self.adapted.num_adapter_parameters()

    # ------------------------------------------------------------------ state dicts
    @classmethod
    def _get_adapter_state_dict(
        cls, model, config, adapter_name, state_dict, unwanted_adapter_names
    ):
        result = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        tuner = find_tuner(model)
        state = tuner.controller_state() if tuner is not None else None
        if state is not None:
            result[STATE_KEY] = encode_state(state)
        return result

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        encoded = None
        for key in [k for k in state_dict if k == STATE_KEY or k.endswith("." + STATE_KEY)]:
            encoded = state_dict.pop(key)
        tuner = find_tuner(model)
        if encoded is not None and tuner is not None:
            tuner.pending_controller_state = decode_state(encoded)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    # ------------------------------------------------------------------------ export
    def export_lora(self, path: str | Path, adapter_name: str = "default") -> dict[str, Any]:
        """Write the adapter as plain PEFT LoRA (``rank_pattern``), loadable without increlora.

        Exact: ``lora_A = diag(e) A``, ``lora_B = s B`` over the active ranks (reserve ranks,
        which hold e = new_rank_e until activated, are left out), trained modules_to_save
        included. Returns the written adapter_config.
        """
        peft_config = self.peft_config[adapter_name]
        saved: dict[str, nn.Module] = {}
        for name, module in self.model.named_modules():
            inner = getattr(module, "modules_to_save", None)
            if isinstance(inner, nn.ModuleDict) and adapter_name in inner:
                saved[name] = inner[adapter_name]
        view = _ExportView(self.adapted, saved)
        task_type = peft_config.task_type
        return export_peft(
            view,
            path,
            base_model_name_or_path=peft_config.base_model_name_or_path,
            task_type=getattr(task_type, "value", task_type),
        )


class IncreLoraModel(PackageTuner):
    """PEFT tuner of IncreLoRA (:class:`PackageTuner` with :class:`IncreLoraLayer`)."""

    tuner_layer_cls = IncreLoraLayer
    method_class = _PeftIncreLoRA
    label = "IncreLoRA"

    def rank_pattern(self) -> dict[str, int]:
        """Active rank per adapted module (names relative to the base model)."""
        return {name: layer.active_rank for name, layer in self.adapted.layers.items()}


class _ExportView:
    """What :func:`increlora.export.export_peft` reads, with PEFT's modules_to_save copies."""

    def __init__(self, adapted: AdaptedModel, saved: dict[str, nn.Module]) -> None:
        self.method = adapted.method
        self.layers = adapted.layers
        self.config = adapted.config
        self.saved_modules = list(saved)
        self.model = _Submodules(saved)


class _Submodules:
    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules

    def get_submodule(self, name: str) -> nn.Module:
        return self.modules[name]


# ------------------------------------------------------------------------- registration
def _add_peft_type(name: str) -> PeftType:
    """Add ``name`` to PEFT's PeftType enum (register_peft_method requires a member)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_method(peft_type_name: str, config_cls: type, model_cls: type) -> None:
    """Make a package method a PEFT method under ``peft_type_name`` (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import register_peft_method

    peft_type = _add_peft_type(peft_type_name)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        register_peft_method(
            name=peft_type_name.lower(),
            config_cls=config_cls,
            model_cls=model_cls,
            prefix=model_cls.prefix,
        )


def register() -> None:
    """Make IncreLoRA a PEFT method (idempotent; ``import increlora`` calls it)."""
    register_method(PEFT_TYPE_NAME, IncreLoraConfig, IncreLoraModel)
