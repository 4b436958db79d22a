"""A diverged run keeps only a checkpoint that is good, and says so truthfully (issue 23,
item 7: after ``--lr 1e30`` diverged, "the last good checkpoint (step 2)" held weights of
~1e30). Good: the weights finite and within WEIGHT_BLOWUP of their start, and the loss since
the previous checkpoint finite and within LOSS_BLOWUP of the first logged one. A checkpoint
that is not good does not replace the last good one: that is kept in ``checkpoint-good/``
until a checkpoint is good again. Faults are injected at the loop's seams (``compute_loss``,
``optimizer_update``, the checkpoint helpers), as in test_cli."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import log_records, tiny_model, train_args  # noqa: F401  (tiny_model: fixture)

from increlora import checkpoint as ckpt
from increlora import cli
from increlora.io import load_state
from increlora.runner import loop


class NanGradient(torch.autograd.Function):
    """The loss unchanged, its gradient NaN: the loss stays finite while the update poisons
    every weight (what an overflow in the backward pass does)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def _run(model: Path, out: Path, *extra: str) -> int:
    return cli.main(train_args(model, out, "--eval-every", "2", *extra))


def _checkpoint(out: Path, name: str = "checkpoint") -> tuple[int, dict[str, torch.Tensor]]:
    step = json.loads((out / name / "extra.json").read_text())["step"]
    return step, load_file(out / name / "trainable.safetensors")


def _leftovers(out: Path) -> list[str]:
    """The good copy and anything a write of it left behind."""
    return sorted(p.name for p in out.iterdir() if "checkpoint-good" in p.name)


def _largest(tensors: dict[str, torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in tensors.values() if t.numel())


def _only_message(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("increlora")]
    return lines[-1]


def test_nan_weights_are_never_checkpointed(tiny_model, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    real, calls = loop.compute_loss, {"n": 0}

    def nan_gradient_at_step_4(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return NanGradient.apply(loss) if calls["n"] == 4 else loss

    monkeypatch.setattr(loop, "compute_loss", nan_gradient_at_step_4)
    out = tmp_path / "nan-weights"
    assert _run(tiny_model, out) == 3
    message = _only_message(capsys)
    assert "weights became non-finite (nan in " in message and "at step 4" in message
    assert "the last good checkpoint (step 2) is kept" in message
    assert "Lower the learning rate" in message
    step, weights = _checkpoint(out)
    assert step == 2 and all(torch.isfinite(t).all() for t in weights.values())
    assert log_records(out)[-1] == {
        "event": "diverged",
        "step": 4,
        "weights": message.split("weights ")[1].split(" at step")[0],
    }
    own = load_file(out / "increlora_adapter" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in own.values()), "no NaN adapter exported"


def test_exploded_weights_are_never_checkpointed(tiny_model, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    """The issue's case: finite weights of ~1e30 (an update a far too high rate would make)."""
    real, steps = loop.optimizer_update, {"n": 0}

    def explode_at_step_4(optimizer, controller, scheduler):
        event = real(optimizer, controller, scheduler)
        steps["n"] += 1
        if steps["n"] == 4:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.add_(torch.sign(p) * 1e30)
        return event

    monkeypatch.setattr(loop, "optimizer_update", explode_at_step_4)
    out = tmp_path / "exploded"
    assert _run(tiny_model, out) == 3
    message = _only_message(capsys)
    assert "weights exploded (|w| up to 1e+30 in " in message and "at step 4" in message
    assert "the last good checkpoint (step 2) is kept" in message
    step, weights = _checkpoint(out)
    assert step == 2 and _largest(weights) < 100
    assert _largest(load_file(out / "increlora_adapter" / "adapter.safetensors")) < 100


def _spy_saves(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """The trainable weights at each step a checkpoint is written, as the loop holds them."""
    real, saved = loop.save_training_state, {}

    def spy(path, adapted, optimizer, controller, scheduler, extra):
        saved[extra["step"]] = {
            n: p.detach().clone() for n, p in adapted.named_trainable_parameters()
        }
        return real(path, adapted, optimizer, controller, scheduler, extra)

    monkeypatch.setattr(loop, "save_training_state", spy)
    return saved


def test_a_blow_up_keeps_the_last_good_checkpoint(
    tiny_model,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
) -> None:
    """Checkpoints at 2 (good) and 4 (after the loss rose 1000x at step 3), then NaN at 5:
    step 2 survives in checkpoint-good/, the message names it and how to resume from it, and
    resuming from it continues exactly where step 2 left off."""
    real, calls, faults = loop.compute_loss, {"n": 0}, {"on": True}

    def blow_up_at_3_nan_at_5(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        if faults["on"] and calls["n"] == 3:
            return loss * 1000  # finite, over 10x the first logged loss
        return loss * float("nan") if faults["on"] and calls["n"] == 5 else loss

    monkeypatch.setattr(loop, "compute_loss", blow_up_at_3_nan_at_5)
    saved = _spy_saves(monkeypatch)
    out = tmp_path / "blew-up"
    assert _run(tiny_model, out) == 3
    message = _only_message(capsys)
    records = log_records(out)
    first = next(r["loss"] for r in records if r["event"] == "train")
    peak = next(r["loss"] for r in records if r["event"] == "train" and r["step"] == 3)
    assert peak > 10 * first
    checkpoint, good = out / "checkpoint", out / "checkpoint-good"
    assert "the loss became nan at step 5" in message
    assert f"(step 4) is not a good one (the loss before it rose to {peak:.4g}" in message
    assert f"first logged {first:.4g}" in message
    assert f"the last good checkpoint (step 2) is kept in {good}:" in message
    assert f"`rm -r {checkpoint} && mv {good} {checkpoint}`" in message
    assert f"then run `increlora train --resume --output-dir {out}`" in message
    assert "no good checkpoint was kept" not in message and "Lower the learning rate" in message
    assert _checkpoint(out)[0] == 4
    extra, weights = load_state(good, "extra"), load_state(good, "trainable")
    assert extra["step"] == 2 and extra["checkpoint_flaw"] is None
    assert set(weights) == set(saved[2])
    for name, tensor in weights.items():
        assert torch.isfinite(tensor).all() and torch.equal(tensor, saved[2][name]), name
    assert _leftovers(out) == ["checkpoint-good"]

    # Resume from it, as the message says (the fault gone: a transient one).
    faults["on"] = False
    shutil.rmtree(checkpoint)
    good.rename(checkpoint)
    assert _run(tiny_model, out, "--resume") == 0
    records = log_records(out)
    assert {"event": "resume", "step": 2} in records
    again = next(r["loss"] for r in records if r["event"] == "train" and r["step"] == 3)
    assert again == pytest.approx(peak / 1000, rel=1e-5), "step 3 from step 2's state"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 10
    assert _leftovers(out) == []


def _spike_then_nan(monkeypatch, spike_at: int, nan_at: int) -> None:
    """The loss of optimizer step ``spike_at`` is 1000x, that of ``nan_at`` NaN."""
    real, calls = loop.compute_loss, {"n": 0}

    def faulty(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        if calls["n"] == spike_at:
            return loss * 1000
        return loss * float("nan") if calls["n"] == nan_at else loss

    monkeypatch.setattr(loop, "compute_loss", faulty)


def test_without_a_good_checkpoint_none_is_claimed(
    tiny_model,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
) -> None:
    """The first checkpoint (step 2) already follows the blow-up (step 2): none is good."""
    _spike_then_nan(monkeypatch, spike_at=2, nan_at=3)
    out = tmp_path / "never-good"
    assert _run(tiny_model, out) == 3
    message = _only_message(capsys)
    assert "(step 2) is not a good one" in message and "no good checkpoint was kept" in message
    assert "last good checkpoint" not in message
    assert _checkpoint(out)[0] == 2 and _leftovers(out) == []


def test_a_recovered_loss_makes_the_next_checkpoint_good_again(
    tiny_model,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
) -> None:
    _spike_then_nan(monkeypatch, spike_at=3, nan_at=7)
    out = tmp_path / "recovered"
    assert _run(tiny_model, out) == 3
    message = _only_message(capsys)
    assert "the last good checkpoint (step 6) is kept" in message
    assert _leftovers(out) == [], "checkpoint 6 is good: the copy of step 2 was dropped"


def test_a_transient_spike_leaves_no_extra_copy(
    tiny_model,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
) -> None:
    """Spike at step 3 only: checkpoint 4 is not good (step 2 is kept beside it), checkpoint
    6 is good again and the copy goes; the run finishes with one checkpoint and no leftovers."""
    real, calls = loop.compute_loss, {"n": 0}

    def spike_at_3(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * 1000 if calls["n"] == 3 else loss

    seen: dict[int, list[str]] = {}
    real_save = loop.save_training_state

    def watch(path, *args):
        seen[args[-1]["step"]] = _leftovers(path.parent)  # before this checkpoint is written
        return real_save(path, *args)

    monkeypatch.setattr(loop, "compute_loss", spike_at_3)
    monkeypatch.setattr(loop, "save_training_state", watch)
    out = tmp_path / "spike"
    assert _run(tiny_model, out) == 0
    assert seen[4] == ["checkpoint-good"] and seen[6] == ["checkpoint-good"], seen
    assert seen[8] == [] and _leftovers(out) == []
    assert _checkpoint(out)[0] == 10


class Killed(BaseException):
    """Stands for a SIGKILL: the run directory is copied as it is at that instant."""


def _complete_and_good(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    states = {name: load_state(directory, name) for name in ckpt.STATE_NAMES}
    finite = all(torch.isfinite(t).all() for t in states["trainable"].values())
    return finite and states["extra"]["checkpoint_flaw"] is None


@pytest.mark.parametrize("moment", ["copying", "before the write", "dropping"])
def test_a_kill_while_keeping_the_good_checkpoint_leaves_one(
    tiny_model,  # noqa: F811
    tmp_path,
    monkeypatch,
    moment,
) -> None:
    """A kill while checkpoint 2 is copied aside (after its first file), after the copy and
    before checkpoint 4 (not good) is written, or while the copy is dropped after checkpoint
    6 (good): a complete good checkpoint is on disk, and --resume finishes the run cleanly."""
    real, calls, faults = loop.compute_loss, {"n": 0}, {"on": True}

    def spike_at_3(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * 1000 if faults["on"] and calls["n"] == 3 else loss

    out, snapshot = tmp_path / "run", tmp_path / "killed"

    def kill() -> None:
        shutil.copytree(out, snapshot, symlinks=True)
        raise Killed

    if moment == "copying":
        real_link, links = ckpt._link_or_copy, {"n": 0}

        def link(source, target):
            real_link(source, target)
            links["n"] += 1
            if links["n"] == 2:
                kill()

        monkeypatch.setattr(ckpt, "_link_or_copy", link)
    elif moment == "before the write":
        real_save = loop.save_training_state

        def save(path, *args):
            if args[-1]["step"] == 4:
                kill()
            return real_save(path, *args)

        monkeypatch.setattr(loop, "save_training_state", save)
    else:
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name.startswith(".checkpoint-good.tmp-") and out.exists():
                kill()
            return real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    monkeypatch.setattr(loop, "compute_loss", spike_at_3)
    with pytest.raises(Killed):
        _run(tiny_model, out)
    monkeypatch.undo()
    good = [
        name for name in ("checkpoint", "checkpoint-good") if _complete_and_good(snapshot / name)
    ]
    assert good, sorted(p.name for p in snapshot.iterdir())
    if moment != "dropping":
        assert (snapshot / "checkpoint" / "extra.json").is_file()
        assert _checkpoint(snapshot)[0] == 2, "checkpoint/ (good) untouched"
    if moment == "before the write":
        assert good == ["checkpoint", "checkpoint-good"]
    faults["on"] = False
    assert _run(tiny_model, snapshot, "--resume") == 0
    assert _leftovers(snapshot) == [] and _checkpoint(snapshot)[0] == 10
    assert not [p.name for p in snapshot.iterdir() if p.name.startswith(".checkpoint")]


def test_keeping_a_copy_on_a_full_disk_leaves_the_good_checkpoint(tmp_path, monkeypatch) -> None:
    import errno

    source, target = tmp_path / "checkpoint", tmp_path / "checkpoint-good"
    source.mkdir()
    for name in ("trainable.json", "trainable.safetensors"):
        (source / name).write_text(name)

    def full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_link_or_copy", full)
    with pytest.raises(ckpt.CheckpointWriteError, match="disk is full .* which is intact"):
        ckpt.keep_copy(source, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert (source / "trainable.json").read_text() == "trainable.json"
    monkeypatch.undo()
    ckpt.keep_copy(source, target)
    assert sorted(p.name for p in target.iterdir()) == ["trainable.json", "trainable.safetensors"]
    ckpt.discard(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
