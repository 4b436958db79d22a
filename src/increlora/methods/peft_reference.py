"""PEFT's own LoRA and AdaLoRA as reference methods, behind increlora's API (``peft-lora``,
``peft-adalora``).

They use PEFT's layers and math unchanged (``peft.get_peft_model``); only the surroundings
are increlora's: module selection (``target_modules`` presets, exact full names passed to
PEFT), a handle with :class:`~increlora.adapter.AdaptedModel`'s interface, and a controller.
For ``peft-adalora`` the controller calls PEFT's ``update_and_allocate(t)`` in ``step()``
with ``t`` the number of optimizer steps taken (1-based, so PEFT's final masking at
``t = total_step - tfinal`` happens even with ``tfinal = 0``), and raises when an optimizer
step is taken without it (forgetting the call is PEFT's most reported AdaLoRA problem).

Which object to call: PEFT injects its layers in place, so ``handle.model`` is the user's own
model object, now holding PEFT's layers; call it (``handle.model(**batch)``) like the model
of any other method, and add ``controller.regularization_loss()`` to the loss. That term is
PEFT's AdaLoRA orthogonal regularizer, which PEFT itself adds to ``outputs.loss`` only in
``AdaLoraModel.forward`` (``handle.peft_model.base_model``; the plain ``PeftModel`` built here,
``handle.peft_model``, skips it). Use ``handle.peft_model`` for PEFT's own API.
``disabled()`` is PEFT's ``disable_adapter()``, which also switches ``modules_to_save`` back
to the original modules. ``save`` / ``export_peft`` are PEFT's ``save_pretrained`` (reload
with ``peft.PeftModel.from_pretrained``; a ``peft-adalora`` save is PEFT's AdaLoRA format).
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn

from ..allocation.step_guard import StepGuard, check_optimizer_holds, unwrap_optimizer
from ..config import AdapterConfig, ConfigError, option, require
from ..injection import find_modules_to_save, find_targets
from ..io import AdapterFileError, load_tensors, read_json, verify_embedded_checksum
from ..layers.base import Conv1D
from .adalora import AdaLoRAConfig, final_budget_parameters
from .base import Controller, Method, ModelHandle, StaticController, register
from .lora import LoRAConfig


def import_peft() -> ModuleType:
    """PEFT, imported on first use (an optional dependency)."""
    try:
        return importlib.import_module("peft")
    except ImportError as err:
        raise ImportError(
            "the peft-lora / peft-adalora methods need PEFT: pip install increlora[peft]"
        ) from err


PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _stray_keys(model: nn.Module, keys: list[str]) -> list[str]:
    """Adapter tensor keys that land on no module of ``model``.

    A key lands when, after PEFT's ``base_model.model.`` prefix, its longest module-path
    prefix names a module of ``model`` and the rest is an adapter tensor (``lora_*``) or one
    of that module's own parameters / buffers (``modules_to_save``).
    """
    modules = dict(model.named_modules())
    stray = []
    for key in keys:
        parts = key.removeprefix(_PEFT_PREFIX).split(".")
        for cut in range(len(parts) - 1, -1, -1):
            owner = ".".join(parts[:cut])
            if owner in modules:
                break
        module, rest = modules[owner], parts[cut:]
        own = {n for n, _ in module.named_parameters(recurse=False)}
        own |= {n for n, _ in module.named_buffers(recurse=False)}
        if not (rest and (rest[0].startswith("lora_") or ".".join(rest) in own)):
            stray.append(key.removeprefix(_PEFT_PREFIX))
    return stray


def _uncovered_modules(model: nn.Module, keys: list[str], config: dict[str, Any]) -> list[str]:
    """Modules of ``model`` the adapter leaves out although it adapts their like in other
    layers: names equal up to the layer index (``layer.3.attention.self.query`` when the
    adapter holds ``layer.0`` and ``layer.1``'s). An adapter trained on a shallower model
    would otherwise run with the deeper layers silently unadapted."""
    adapted = {key.removeprefix(_PEFT_PREFIX).split(".lora_")[0] for key in keys if ".lora_" in key}
    excluded = config.get("exclude_modules") or []
    excluded = [excluded] if isinstance(excluded, str) else list(excluded)
    shapes = {re.sub(r"\.\d+\.", ".#.", name) for name in adapted}
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name not in adapted
        and re.sub(r"\.\d+\.", ".#.", name) in shapes
        and not any(name == e or name.endswith("." + e) for e in excluded)
    ]


def load_peft_adapter(model: nn.Module, path: str | Path) -> Any:
    """``peft.PeftModel.from_pretrained(model, path)`` with every failure a one-line error.

    Before the model is touched: ``adapter_config.json`` must be valid JSON that PEFT
    accepts, ``adapter_model.safetensors`` must be readable and match the data checksum an
    increlora export stores in its header (files written by PEFT itself carry none), and
    every tensor must land on a module of ``model`` (an adapter for a deeper model is
    refused, naming the modules this model lacks). Raises AdapterFileError naming the file.
    """
    peft = import_peft()
    path = Path(path)
    config_file, weights_file = path / PEFT_CONFIG_FILE, path / PEFT_WEIGHTS_FILE
    config = read_json(config_file)
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterFileError(f"{config_file}: not a PEFT adapter config (no 'peft_type')")
    try:
        peft.PeftConfig.from_pretrained(str(path))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise AdapterFileError(f"{config_file}: PEFT rejects this config ({err})") from err
    if weights_file.is_file():
        verify_embedded_checksum(weights_file)
        keys = list(load_tensors(weights_file))
        stray = _stray_keys(model, keys)
        if stray:
            shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
            raise AdapterFileError(
                f"{weights_file}: {len(stray)} adapter tensor(s) land on no module of this"
                f" model: {shown}. The adapter was trained on another (e.g. deeper) model;"
                " pass that base model"
            )
        uncovered = _uncovered_modules(model, keys, config)
        if uncovered:
            shown = ", ".join(uncovered[:5]) + (
                f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else ""
            )
            raise AdapterFileError(
                f"{weights_file}: the adapter leaves {len(uncovered)} module(s) of this model"
                f" unadapted that it adapts in other layers ({shown}): it was trained on"
                " another (e.g. shallower) model; pass that base model"
            )
    elif (path / "adapter_model.bin").is_file():
        raise AdapterFileError(
            f"{path / 'adapter_model.bin'}: a pickle file, which increlora never loads (it can"
            " run code); only safetensors are accepted. Convert it where you trust it:"
            ' python -c "import torch, safetensors.torch as s; s.save_file(torch.load('
            "'adapter_model.bin'), 'adapter_model.safetensors')\""
        )
    else:
        raise AdapterFileError(f"{weights_file}: file not found")
    try:
        return peft.PeftModel.from_pretrained(model, str(path))
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as err:
        message = " ".join(str(err).split())
        raise AdapterFileError(f"{path}: PEFT could not load this adapter ({message})") from err


@dataclass
class PeftLoRAConfig(LoRAConfig):
    """PEFT's LoRA (``peft.LoraConfig``) with the fields of increlora's ``lora``."""


@dataclass
class PeftAdaLoRAConfig(AdaLoRAConfig):
    """PEFT's AdaLoRA (``peft.AdaLoraConfig``) with the fields of increlora's ``adalora``.

    PEFT fixes what increlora's AdaLoRA makes configurable: masked lambdas train between
    masking steps (``hold_mask`` must be False), P and Q start N(0, 0.02^2) from torch's global
    RNG (``init_std`` must be 0.02; ``seed`` is unused), and ``target_rank`` must be a whole
    number (PEFT's ``target_r``).
    """

    hold_mask: bool = option(False, "Fixed by PEFT: False (masked lambdas train between maskings).")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(not self.hold_mask, "hold_mask", "PEFT's AdaLoRA cannot hold masks; use False")
        require(self.init_std == 0.02, "init_std", "PEFT's AdaLoRA init is fixed at 0.02")
        require(
            float(self.target_rank).is_integer(),
            "target_rank",
            f"PEFT's target_r is a whole number, got {self.target_rank}",
        )


class PeftAdapted(ModelHandle):
    """Handle to PEFT's adapter on a model, with :class:`AdaptedModel`'s interface."""

    def __init__(
        self,
        model: nn.Module,
        peft_model: Any,
        method: _PeftMethod,
        names: list[str],
        saved: list[str],
    ) -> None:
        self.model = model
        self.peft_model = peft_model
        self.method = method
        self.layers = {name: model.get_submodule(name) for name in names}
        self.saved_modules = saved
        self._controller: Controller | None = None

    def _make_controller(self, optimizer: Any, total_steps: int) -> Controller:
        return self.method.make_peft_controller(self, optimizer, total_steps)

    def rank_pattern(self) -> dict[str, int]:
        """Rank per module: PEFT's ``r``, or AdaLoRA's unmasked triplets (0 = all masked)."""
        pattern = {name: int(layer.r["default"]) for name, layer in self.layers.items()}
        masks = getattr(self.peft_model.peft_config["default"], "rank_pattern", None)
        for key, kept in (masks or {}).items():
            pattern[key.removesuffix(".lora_E.default").removesuffix(".lora_E")] = sum(kept)
        return pattern

    def num_adapter_parameters(self) -> int:
        """r x (d_in + d_out) per module; AdaLoRA adds 1 per triplet (lambda)."""
        extra = self.method.params_per_rank_extra
        return sum(
            r * (self.layers[n].in_features + self.layers[n].out_features + extra)
            for n, r in self.rank_pattern().items()
        )

    def num_trainable_parameters(self) -> int:
        saved = sum(
            p.numel()
            for n in self.saved_modules
            for p in self.model.get_submodule(n).parameters()
            if p.requires_grad
        )
        return self.num_adapter_parameters() + saved

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """PEFT's ``disable_adapter()``: the base model, original modules_to_save included."""
        with self.peft_model.disable_adapter():
            yield

    def merge(self) -> None:
        self.peft_model.base_model.merge_adapter()

    def unmerge(self) -> None:
        self.peft_model.base_model.unmerge_adapter()

    def merge_and_unload(self) -> nn.Module:
        model = self.peft_model.merge_and_unload()
        self.layers = {}
        return model

    def save(self, path: str | Path) -> None:
        """PEFT's ``save_pretrained`` (reload with ``peft.PeftModel.from_pretrained``)."""
        self.peft_model.save_pretrained(str(path))

    def export_peft(self, path: str | Path, **kwargs: Any) -> None:
        """The PEFT format is this adapter's own: same as :meth:`save`."""
        self.save(path)


class PeftAdaLoRAController:
    """Calls PEFT's ``update_and_allocate`` once per optimizer step (checked)."""

    def __init__(self, adapted: PeftAdapted, optimizer: Any, total_steps: int) -> None:
        config: PeftAdaLoRAConfig = adapted.config
        self.tuner = adapted.peft_model.base_model
        self.peft_config = adapted.peft_model.peft_config["default"]
        t_init, t_final = config.schedule(total_steps)
        self.peft_config.tinit, self.peft_config.tfinal = t_init, t_final
        self.peft_config.total_step = total_steps
        self.layers = adapted.layers
        self.orth_reg_weight = config.orth_reg_weight
        self.optimizer = unwrap_optimizer(optimizer)
        check_optimizer_holds(
            self.optimizer,
            {
                f"{n}.{k}": getattr(m, k)["default"]
                for n, m in self.layers.items()
                for k in ("lora_A", "lora_E", "lora_B")
            },
        )
        self.guard = StepGuard(self.optimizer, "peft-adalora")
        self.history: list[dict] = []

    def step(self) -> dict | None:
        t = self.guard.begin()
        if t is None:
            return None
        before = self.peft_config.rank_pattern
        self.tuner.update_and_allocate(t)
        if self.peft_config.rank_pattern is before:
            return None
        event = {"step": t, "kept": sum(sum(k) for k in self.peft_config.rank_pattern.values())}
        self.history.append(event)
        return event

    def regularization_loss(self) -> torch.Tensor:
        """PEFT's term: gamma * mean over all A, B of ||A A^T - I||_F, ||B^T B - I||_F."""
        norms = []
        for layer in self.layers.values():
            a, b = layer.lora_A["default"], layer.lora_B["default"]
            for cov in (a @ a.T, b.T @ b):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                norms.append(torch.linalg.matrix_norm(cov - eye))
        return self.orth_reg_weight * torch.stack(norms).mean()

    def state_dict(self) -> dict:
        allocator = self.tuner.rankallocator
        return {
            "guard": self.guard.state_dict(),
            "ipt": {k: dict(getattr(allocator, k)) for k in ("exp_avg_ipt", "exp_avg_unc")},
            "rank_pattern": self.peft_config.rank_pattern,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.guard.load_state_dict(state["guard"])
        allocator = self.tuner.rankallocator
        for key, values in state["ipt"].items():
            setattr(allocator, key, dict(values))
        self.peft_config.rank_pattern = state["rank_pattern"]
        self.history = list(state["history"])


class _PeftMethod(Method):
    """Injects through ``peft.get_peft_model`` instead of increlora's adapter layers."""

    peft_exportable = True
    params_per_rank_extra: ClassVar[int] = 0  # parameters per rank beyond d_in + d_out

    def peft_config(
        self, peft: ModuleType, model: nn.Module, names: list[str], saved: list[str]
    ) -> Any:
        raise NotImplementedError

    def inject_model(self, model: nn.Module) -> PeftAdapted:
        peft = import_peft()
        names = find_targets(model, self.config)
        saved = find_modules_to_save(model, self.config.modules_to_save)
        peft_model = peft.get_peft_model(model, self.peft_config(peft, model, names, saved))
        return PeftAdapted(model, peft_model, self, names, saved)

    def make_peft_controller(
        self, adapted: PeftAdapted, optimizer: Any, total_steps: int
    ) -> Controller:
        return StaticController(next(adapted.model.parameters()).device)


def _common(config: AdapterConfig, model: nn.Module, names: list[str], saved: list[str]) -> dict:
    conv1d = Conv1D is not None and any(isinstance(model.get_submodule(n), Conv1D) for n in names)
    return {
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": names,
        "modules_to_save": saved or None,
        "fan_in_fan_out": conv1d,
    }


@register
class PeftLoRA(_PeftMethod):
    name = "peft-lora"
    config_class = PeftLoRAConfig
    size_field = "r"

    def peft_config(
        self, peft: ModuleType, model: nn.Module, names: list[str], saved: list[str]
    ) -> Any:
        config: PeftLoRAConfig = self.config
        init = True if config.init == "kaiming" else "gaussian"
        return peft.LoraConfig(
            r=config.r, init_lora_weights=init, **_common(config, model, names, saved)
        )


@register
class PeftAdaLoRA(_PeftMethod):
    name = "peft-adalora"
    config_class = PeftAdaLoRAConfig
    size_field = "target_rank"
    params_per_rank_extra = 1  # lambda

    def peft_config(
        self, peft: ModuleType, model: nn.Module, names: list[str], saved: list[str]
    ) -> Any:
        config: PeftAdaLoRAConfig = self.config
        # The real tinit / tfinal / total_step are set by the controller, which knows the run
        # length; PEFT's config only needs values that pass its own validation until then.
        return peft.AdaLoraConfig(
            init_r=config.initial_rank,
            target_r=int(config.target_rank),
            deltaT=config.delta_t,
            beta1=config.beta1,
            beta2=config.beta2,
            orth_reg_weight=config.orth_reg_weight,
            total_step=1,
            **_common(config, model, names, saved),
        )

    def make_peft_controller(
        self, adapted: PeftAdapted, optimizer: Any, total_steps: int
    ) -> PeftAdaLoRAController:
        if total_steps < 1:
            raise ConfigError(f"total_steps: must be >= 1, got {total_steps}")
        return PeftAdaLoRAController(adapted, optimizer, total_steps)

    def budget_parameters(self, adapted: Any) -> int:
        return final_budget_parameters(self.config.target_rank, adapted.layers.values())
