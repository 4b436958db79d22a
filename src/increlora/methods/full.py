"""Full fine-tuning: every parameter of the model trains (the ceiling the adapters aim at).

There are no adapter layers: :meth:`Full.inject_model` marks every parameter trainable and
returns a :class:`FullModel` handle with the interface of
:class:`~increlora.adapter.AdaptedModel`. What an adapter handle does to its layers is a
no-op here (merge, unmerge), what needs a separate adapter is an error (``disabled()``,
PEFT export), and ``save`` writes every weight (tied weights once) next to the usual
``increlora_config.json``, so :func:`increlora.load_adapter` restores it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_format import ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, CONFIG_FILE, WEIGHTS_FILE
from ..config import AdapterConfig, require
from ..io import (
    AdapterFileError,
    add_manifest,
    atomic_directory,
    atomic_write_json,
    file_sha256,
    save_tensors,
)
from .base import Controller, Method, ModelHandle, StaticController, register


@dataclass
class FullConfig(AdapterConfig):
    """Full fine-tuning. Module selection does not apply: every parameter trains."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            require(
                not getattr(self, name),
                name,
                "full fine-tuning trains every parameter; leave it unset",
            )


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once (under its first name)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            state[key] = tensor
    return state


class FullModel(ModelHandle):
    """Handle to a fully fine-tuned model, interchangeable with ``AdaptedModel``."""

    def __init__(self, model: nn.Module, method: Full) -> None:
        self.model = model
        self.method = method
        self.layers: dict[str, nn.Module] = {}
        self.saved_modules: list[str] = []
        self._controller: Controller | None = None

    def _make_controller(self, optimizer: Any, total_steps: int) -> Controller:
        return StaticController(next(self.model.parameters()).device)

    def rank_pattern(self) -> dict[str, int]:
        return {}

    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for _, p in self.named_trainable_parameters())

    def num_trainable_parameters(self) -> int:
        return self.num_adapter_parameters()

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        raise RuntimeError(
            "full fine-tuning has no separate adapter to disable: the model's own weights were"
            " trained; keep a copy of the base model to compare against"
        )

    def merge(self) -> None:
        """Nothing to merge: the trained weights are the model's."""

    def unmerge(self) -> None:
        """Nothing to unmerge."""

    def merge_and_unload(self) -> nn.Module:
        return self.model

    def save(self, path: str | Path) -> None:
        """Every weight (``adapter.safetensors``) + ``increlora_config.json``, atomically."""

        meta = {
            "format": ADAPTER_FORMAT,
            "format_version": ADAPTER_FORMAT_VERSION,
            "method": self.method.name,
            "config": self.config.to_dict(),
            "modules": {},
            "modules_to_save": [],
        }
        with atomic_directory(path) as tmp:
            save_tensors(tmp / WEIGHTS_FILE, _unique_state(self.model))
            meta["sha256"] = {WEIGHTS_FILE: file_sha256(tmp / WEIGHTS_FILE)}
            atomic_write_json(tmp / CONFIG_FILE, add_manifest(meta))

    def export_peft(self, path: str | Path, **kwargs: Any) -> None:
        raise NotImplementedError(
            "full fine-tuning has no LoRA form; save the model itself (model.save_pretrained)"
        )


@register
class Full(Method):
    name = "full"
    config_class = FullConfig

    def inject_model(self, model: nn.Module) -> FullModel:
        for p in model.parameters():
            p.requires_grad_(True)
        return FullModel(model, self)

    def load_model(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], path: Path
    ) -> FullModel:
        """Restore what :meth:`FullModel.save` wrote; every key and shape is checked first."""
        state = _unique_state(model)
        if set(state) != set(tensors):
            missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
            raise AdapterFileError(
                f"{path}: the saved weights do not fit this model (missing: {missing[:3]},"
                f" unexpected: {extra[:3]})"
            )
        for key, t in tensors.items():
            if t.shape != state[key].shape:
                raise AdapterFileError(
                    f"{path}: {key} has shape {tuple(t.shape)}, this model needs"
                    f" {tuple(state[key].shape)}"
                )
        with torch.no_grad():
            for key, t in tensors.items():
                state[key].copy_(t)
        return self.inject_model(model)
