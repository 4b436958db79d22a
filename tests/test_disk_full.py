"""A full disk during a checkpoint write is one line that says what happened and that the
previous checkpoint is intact (issue 23, item 10), not a SafetensorError traceback."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from conftest import MODEL_CASES
from safetensors import SafetensorError

import increlora
from increlora import checkpoint
from increlora.checkpoint import CheckpointWriteError, save_training_state
from increlora.config import IncreLoRAConfig


def _setup():
    model = MODEL_CASES["mlp"].make()
    adapted = increlora.inject(
        model, IncreLoRAConfig(target_rank=2, target_modules=["lin0", "lin1"], interval=1)
    )
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-3)
    return adapted, optimizer


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError(
            "Error while serializing: IoError(Os { code: 28, No space left on device })"
        ),
    ],
)
def test_disk_full_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch, failure) -> None:
    adapted, optimizer = _setup()
    path = tmp_path / "checkpoint"
    save_training_state(path, adapted, optimizer)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real = checkpoint.save_state
    calls = {"n": 0}

    def full_disk(directory, name, state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise failure
        return real(directory, name, state)

    monkeypatch.setattr(checkpoint, "save_state", full_disk)
    with pytest.raises(CheckpointWriteError) as err:
        save_training_state(path, adapted, optimizer)
    message = str(err.value)
    assert "disk is full" in message and "previous checkpoint is intact" in message
    assert "\n" not in message
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"], "no temporary folder left"


def test_other_write_errors_are_not_disguised(tmp_path: Path, monkeypatch) -> None:
    adapted, optimizer = _setup()

    def denied(directory, name, state):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint, "save_state", denied)
    with pytest.raises(PermissionError):
        save_training_state(tmp_path / "checkpoint", adapted, optimizer)
