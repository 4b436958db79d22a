"""Full training state for exact resume: trainable weights, optimizer, controller, scheduler.

Everything is stored as JSON + safetensors (no pickle). Adapter tensors are saved as stored
(the ranks in use under ``storage="dynamic"``, the capacity under ``"static"``); loading
re-allocates growing layers to the saved shapes before the weights and the optimizer state
are restored, so a checkpoint taken mid-growth restores bit-exactly. A checkpoint written
with static storage loads into dynamic storage too (the controller's ranks then trim it).

Several processes: only the main process writes. Under DDP, call saving on the main process
or on all; under FSDP2 (sharded parameters and optimizer states) call both functions on every
process: saving gathers the sharded tensors (collective), loading reads the whole tensors on
every process and keeps each process's part, sharded like the live ones.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .distributed import (
    copy_full_,
    full_tensor,
    gathered_parameters,
    is_main_process,
    is_sharded,
    shard_like,
)
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
    weights = dict(adapted.named_trainable_parameters())
    optimizer_state = optimizer.state_dict()
    if any(is_sharded(p) for p in weights.values()):  # FSDP2: gather (collective)
        with gathered_parameters(adapted.model):
            weights = {n: p.detach() for n, p in adapted.named_trainable_parameters()}
        optimizer_state = _gather(optimizer_state)
    if not is_main_process():  # one writer: processes calling together must not race
        return
    remove_stale_writes(path)
    try:
        with atomic_directory(path) as tmp:
            save_state(tmp, "trainable", weights)
            save_state(tmp, "optimizer", optimizer_state)
            save_state(tmp, "controller", controller.state_dict() if controller is not None else {})
            save_state(tmp, "scheduler", scheduler.state_dict() if scheduler is not None else {})
            rng = {"torch": torch.get_rng_state()}
            save_state(tmp, "extra", {"rng": rng, **(extra or {})})
    except (OSError, SafetensorError) as err:
        if not _disk_full(err):
            raise
        raise CheckpointWriteError(
            f"checkpoint {path}: the disk is full (no space left on device) while writing it;"
            " the previous checkpoint is intact. Free some space, then resume the run"
        ) from None


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written for lack of space (the previous one is kept)."""


def _disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)


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
    if is_main_process():
        remove_stale_writes(path)
    weights = load_state(path, "trainable")
    _restore_storage(adapted, weights)
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
        copy_full_(p, weights[name])
    optimizer.load_state_dict(load_state(path, "optimizer"))
    _shard_optimizer_state(optimizer)
    if controller is not None:
        controller.load_state_dict(load_state(path, "controller"))
    if scheduler is not None:
        scheduler.load_state_dict(load_state(path, "scheduler"))
    extra = load_state(path, "extra")
    if restore_rng:
        torch.set_rng_state(extra["rng"]["torch"])
    return extra


def _restore_storage(adapted: Any, weights: dict[str, torch.Tensor]) -> None:
    """Layers whose storage follows their rank take the saved number of rows (before the
    shape check, the weights and the optimizer state, which is saved in those shapes)."""
    names = {id(p): n for n, p in adapted.named_trainable_parameters()}
    for layer in getattr(adapted, "layers", {}).values():
        if hasattr(layer, "take_saved_rows"):
            layer.take_saved_rows(weights.get(names.get(id(layer.lora_E), "")))


def remove_stale_writes(path: str | Path) -> list[Path]:
    """Delete what killed writes of ``path`` left beside it; returns what was removed.

    An atomic save (:func:`increlora.io.atomic_directory`, ``atomic_write_*``) builds
    ``.<name>.tmp-XXXXXXXX`` (or ``.<name>.XXXXXXXX`` for a file) and swaps the previous
    version out through ``.<name>.old-XXXXXXXX``; a SIGKILL in between leaves them forever.
    If the kill fell between the two swaps (``path`` missing, the previous version in
    ``.old-*/content``), that previous, complete version is put back first. Call it from one
    process, when no save of ``path`` is running.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:tmp-|old-)?[a-z0-9_]{{8}}$")
    stale = sorted(p for p in path.parent.iterdir() if pattern.match(p.name))
    if not path.exists():
        olds = [p for p in stale if p.name.startswith(f".{path.name}.old-")]
        for old in sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True):
            if (old / "content").exists():
                os.replace(old / "content", path)
                break
    for entry in stale:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return stale


def keep_copy(source: str | Path, target: str | Path) -> None:
    """Make ``target`` a complete copy of the checkpoint directory ``source``, atomically.

    Built beside ``target`` and swapped in by :func:`increlora.io.atomic_directory`: a kill at
    any point leaves ``source`` untouched and ``target`` either as it was, complete, or absent,
    plus stale temporary folders that :func:`remove_stale_writes` deletes. Files are hard links
    where the file system allows them (a checkpoint's files are never changed in place: every
    save writes new files), so the copy costs no space until ``source`` is replaced.
    """
    source, target = Path(source), Path(target)
    remove_stale_writes(target)
    try:
        with atomic_directory(target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)
    except OSError as err:
        if not _disk_full(err):
            raise
        raise CheckpointWriteError(
            f"{target}: the disk is full (no space left on device) while keeping a copy of the"
            f" good checkpoint {source}, which is intact. Free some space, then resume the run"
        ) from None


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def discard(path: str | Path) -> None:
    """Delete the directory ``path`` so that a kill midway leaves it complete or absent: it is
    renamed to a stale name first (``.<name>.tmp-XXXXXXXX``, which :func:`remove_stale_writes`
    deletes and never puts back), then removed."""
    path = Path(path)
    if not path.exists():
        return
    stale = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.replace(path, stale / "content")
    shutil.rmtree(stale, ignore_errors=True)


def _gather(obj: Any) -> Any:
    """``obj`` with every DTensor replaced by its whole tensor (same traversal on each process)."""
    if torch.is_tensor(obj):
        return full_tensor(obj)
    if isinstance(obj, dict):
        return {k: _gather(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_gather(v) for v in obj)
    return obj


def _shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Loaded state of sharded parameters is whole: lay it out like the parameter again."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or not is_sharded(p):
                continue
            for key, value in state.items():
                if torch.is_tensor(value) and not is_sharded(value) and value.shape == p.shape:
                    state[key] = shard_like(value, p)
