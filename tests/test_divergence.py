"""A diverged run keeps only a checkpoint that is good, and says so truthfully (issue 23,
item 7: after ``--lr 1e30`` diverged, "the last good checkpoint (step 2)" held weights of
~1e30). Good: the weights finite and within WEIGHT_BLOWUP of their start, and the loss since
the previous checkpoint finite and within LOSS_BLOWUP of the first logged one. Faults are
injected at the loop's seams (``compute_loss``, ``optimizer_update``), as in test_cli."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_cli import log_records, tiny_model, train_args  # noqa: F401  (tiny_model: fixture)

from increlora import cli
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


def _run(model: Path, out: Path) -> int:
    return cli.main(train_args(model, out, "--eval-every", "2"))


def _checkpoint(out: Path) -> tuple[int, dict[str, torch.Tensor]]:
    step = json.loads((out / "checkpoint" / "extra.json").read_text())["step"]
    return step, load_file(out / "checkpoint" / "trainable.safetensors")


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


def test_a_checkpoint_after_the_loss_blew_up_is_not_called_good(
    tiny_model,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
) -> None:
    real, calls = loop.compute_loss, {"n": 0}

    def blow_up_at_3_nan_at_5(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        if calls["n"] == 3:
            return loss * 1000  # finite, over 10x the first logged loss
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(loop, "compute_loss", blow_up_at_3_nan_at_5)
    out = tmp_path / "blew-up"
    assert _run(tiny_model, out) == 3
    message = _only_message(capsys)
    records = log_records(out)
    first = next(r["loss"] for r in records if r["event"] == "train")
    peak = next(r["loss"] for r in records if r["event"] == "train" and r["step"] == 3)
    assert peak > 10 * first
    assert "the loss became nan at step 5" in message
    assert f"(step 4) is not a good one (the loss before it rose to {peak:.4g}" in message
    assert f"first logged {first:.4g}" in message and "no good checkpoint was kept" in message
    assert "last good checkpoint" not in message and "Lower the learning rate" in message
    assert _checkpoint(out)[0] == 4


def test_a_recovered_loss_makes_the_next_checkpoint_good_again(
    tiny_model,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
) -> None:
    real, calls = loop.compute_loss, {"n": 0}

    def blow_up_at_3_nan_at_7(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        if calls["n"] == 3:
            return loss * 1000
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(loop, "compute_loss", blow_up_at_3_nan_at_7)
    out = tmp_path / "recovered"
    assert _run(tiny_model, out) == 3
    message = _only_message(capsys)
    assert "the last good checkpoint (step 6) is kept" in message
