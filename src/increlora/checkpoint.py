"""Full training state for exact resume: trainable weights, optimizer, controller, scheduler.

Everything is stored as JSON + safetensors (no pickle). Adapter tensors are saved at full
capacity, so a checkpoint taken mid-growth restores bit-exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .io import AdapterFileError, atomic_directory, load_state, save_state

STATE_NAMES = ("trainable", "optimizer", "controller", "scheduler", "extra")


def save_training_state(
    path: str | Path,
    adapted: Any,
    optimizer: torch.optim.Optimizer,
    controller: Any = None,
    scheduler: Any = None,
    extra: dict | None = None,
) -> None:
    """Write a resumable checkpoint directory atomically (the old one stays until done)."""
    with atomic_directory(path) as tmp:
        save_state(tmp, "trainable", dict(adapted.named_trainable_parameters()))
        save_state(tmp, "optimizer", optimizer.state_dict())
        save_state(tmp, "controller", controller.state_dict() if controller is not None else {})
        save_state(tmp, "scheduler", scheduler.state_dict() if scheduler is not None else {})
        rng = {"torch": torch.get_rng_state()}
        save_state(tmp, "extra", {"rng": rng, **(extra or {})})


@torch.no_grad()
def load_training_state(
    path: str | Path,
    adapted: Any,
    optimizer: torch.optim.Optimizer,
    controller: Any = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict:
    """Restore what :func:`save_training_state` wrote; returns the ``extra`` dict."""
    path = Path(path)
    weights = load_state(path, "trainable")
    params = dict(adapted.named_trainable_parameters())
    if set(weights) != set(params):
        raise AdapterFileError(
            f"{path}: checkpoint holds other trainable parameters than this model (e.g."
            f" {sorted(set(weights) ^ set(params))[:3]}); same method and config needed"
        )
    for name, p in params.items():
        if weights[name].shape != p.shape:
            raise AdapterFileError(
                f"{path}: {name} has shape {tuple(weights[name].shape)}, model needs"
                f" {tuple(p.shape)}"
            )
    for name, p in params.items():
        p.copy_(weights[name])
    optimizer.load_state_dict(load_state(path, "optimizer"))
    if controller is not None:
        controller.load_state_dict(load_state(path, "controller"))
    if scheduler is not None:
        scheduler.load_state_dict(load_state(path, "scheduler"))
    extra = load_state(path, "extra")
    if restore_rng:
        torch.set_rng_state(extra["rng"]["torch"])
    return extra
