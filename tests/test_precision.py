"""Mixed precision: bf16 autocast, fp16 grad scaling, and steps the grad scaler skips.

Scores must come from unscaled fp32 gradients: a run with a GradScaler (fp32 forward, so
scaling by a power of two is exact) grows and trains exactly like one without, and a step the
scaler skips leaves no trace (same as never having seen that batch).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import MODEL_CASES, TinyMLP

import increlora
from increlora import IncreLoRAConfig

STEPS = 12


def _setup(importance: str):
    torch.manual_seed(0)
    model = TinyMLP()
    config = IncreLoRAConfig(
        target_modules=["lin0", "lin1"], modules_to_save=["head"], target_rank=3, max_rank=5,
        init_warmup=2, interval=2, top_h=1, alpha=4, importance=importance,
        score_rows=1.0,  # exact paper score: these tests isolate precision, not sampling
    )  # fmt: skip
    adapted = increlora.inject(model, config)
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.02, weight_decay=0.1)
    controller = adapted.controller(optimizer, total_steps=STEPS)
    return model, adapted, optimizer, controller


def _batch(i: int) -> torch.Tensor:
    return torch.randn(8, 12, generator=torch.Generator().manual_seed(i))


def _train(
    importance: str,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    batches: list[int] | None = None,
    poisoned: frozenset[int] = frozenset(),
):
    """Train on ``batches``; iterations in ``poisoned`` get an inf gradient (scaler skips)."""
    model, adapted, optimizer, controller = _setup(importance)
    controller.grad_scaler = scaler
    lin0 = adapted.layers["lin0"]
    for i in batches if batches is not None else range(STEPS):
        context = torch.autocast("cpu", dtype=autocast) if autocast else nullcontext()
        with context:
            loss = model(_batch(i)).float().pow(2).mean() + controller.regularization_loss()
        (scaler.scale(loss) if scaler else loss).backward()
        if i in poisoned:
            lin0.lora_E.grad[0] = math.inf
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        controller.step()
        optimizer.zero_grad()
        if importance == "paper" and controller.growing:
            assert lin0.grad_product.dtype == torch.float32
    for p in adapted.trainable_parameters():
        assert p.dtype == torch.float32  # adapters stay fp32 under autocast
    return adapted, controller


def _decisions(controller) -> list:
    return [(e["step"], [(g["module"], g["rank"]) for g in e["grown"]]) for e in controller.history]


@pytest.mark.parametrize("importance", ["proxy", "paper"])
def test_bf16_autocast_scores_in_fp32_and_grows_to_the_budget(importance):
    adapted, controller = _train(importance, autocast=torch.bfloat16)
    _, reference = _train(importance)
    assert controller.total_rank == reference.total_rank == 6 and not controller.growing
    assert all(math.isfinite(s) for e in controller.history for s in e["scores"].values())
    # bf16 keeps ~3 significant digits in the forward pass: the smoothed sensitivities agree
    # with the fp32 run to a few percent.
    torch.testing.assert_close(
        controller.ema.sensitivity, reference.ema.sensitivity, rtol=0.05, atol=1e-9
    )


@pytest.mark.parametrize("importance", ["proxy", "paper"])
def test_grad_scaler_scores_from_unscaled_gradients(importance):
    # growth_interval=2 makes the scale change during the run (it doubles every 2 steps).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    adapted, controller = _train(importance, scaler=scaler)
    plain, reference = _train(importance)
    assert scaler.get_scale() > 2.0**10
    assert _decisions(controller) == _decisions(reference)
    torch.testing.assert_close(
        controller.ema.sensitivity, reference.ema.sensitivity, rtol=1e-5, atol=0
    )
    expected = dict(plain.named_trainable_parameters())
    for name, p in adapted.named_trainable_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("importance", ["proxy", "paper"])
def test_skipped_fp16_steps_leave_no_trace(importance):
    """Skips at iterations 3 and 5 (one good step between) equal never seeing those batches."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    with pytest.warns(UserWarning, match="skipped fp16 step"):
        adapted, controller = _train(
            importance, scaler=scaler, batches=list(range(STEPS + 2)), poisoned=frozenset({3, 5})
        )
    plain, reference = _train(importance, batches=[i for i in range(STEPS + 2) if i not in (3, 5)])
    assert controller.optimizer_steps == reference.optimizer_steps == STEPS
    assert _decisions(controller) == _decisions(reference)
    torch.testing.assert_close(
        controller.ema.sensitivity, reference.ema.sensitivity, rtol=1e-5, atol=0
    )
    expected = dict(plain.named_trainable_parameters())
    for name, p in adapted.named_trainable_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fp16_autocast_with_grad_scaler_grows_to_the_budget():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)  # the first fp16 steps overflow
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, controller = _train(
            "paper", autocast=torch.float16, scaler=scaler, batches=list(range(40))
        )
    assert controller.optimizer_steps < 40  # some steps were skipped
    assert controller.total_rank == 6 and not controller.growing
    assert all(math.isfinite(s) for e in controller.history for s in e["scores"].values())


def test_the_grad_scaler_is_found_on_an_accelerate_style_optimizer_wrapper():
    torch.manual_seed(0)
    adapted = increlora.inject(TinyMLP(), IncreLoRAConfig(target_modules=["lin0"], target_rank=2))
    scaler = torch.amp.GradScaler("cpu")
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    # accelerate's AcceleratedOptimizer holds the torch optimizer and the fp16 scaler.
    wrapper = SimpleNamespace(optimizer=optimizer, scaler=scaler)
    controller = adapted.controller(wrapper, total_steps=STEPS)
    assert controller.grad_scaler is scaler and controller.optimizer is optimizer


class _OverflowingGradient(torch.autograd.Function):
    """Identity forward, inf backward: an fp16 overflow in every gradient (captures too)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def _runner_updates(batches: list[int], overflow: frozenset[int] = frozenset()):
    """The runner's optimizer update (loop.optimizer_update) on accelerate's fp16 wrapper."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from increlora.runner import loop

    accelerator = Accelerator(cpu=True)  # the state AcceleratedOptimizer reads
    try:
        model, adapted, torch_optimizer, controller = _setup("paper")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
        optimizer = AcceleratedOptimizer(torch_optimizer, device_placement=False, scaler=scaler)
        controller.grad_scaler = scaler  # what the runner's controller takes from the wrapper
        scheduler = torch.optim.lr_scheduler.LambdaLR(torch_optimizer, lambda step: 1.0)
        for i in batches:
            loss = model(_batch(i)).float().pow(2).mean()
            if i in overflow:
                loss = _OverflowingGradient.apply(loss)
            scaler.scale(loss + controller.regularization_loss()).backward()
            loop.optimizer_update(optimizer, controller, scheduler)
            assert optimizer.step_was_skipped == (i in overflow)
            optimizer.zero_grad()
        return adapted, controller, scheduler
    finally:
        loop._release(accelerator)


def test_runner_update_after_an_overflow_leaves_no_trace():
    """fp16 + paper importance in the runner: a skipped step must not poison the scores."""
    batches = list(range(STEPS + 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the allocator's "skipped fp16 step"
        adapted, controller, scheduler = _runner_updates(batches, overflow=frozenset({3, 5}))
    plain, reference = _train("paper", batches=[i for i in batches if i not in (3, 5)])
    assert scheduler.last_epoch == controller.optimizer_steps == STEPS  # skips: no LR step
    assert torch.isfinite(controller.ema.sensitivity).all()
    assert _decisions(controller) == _decisions(reference)
    torch.testing.assert_close(
        controller.ema.sensitivity, reference.ema.sensitivity, rtol=1e-5, atol=0
    )
    expected = dict(plain.named_trainable_parameters())
    for name, p in adapted.named_trainable_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def _gpu_check():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_gpu_check_fails_fast_without_cuda(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _gpu_check().main(["--steps", "2"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_check_logic_on_cpu(tmp_path):
    torch.manual_seed(0)
    MODEL_CASES["bert"].build().save_pretrained(tmp_path / "model")
    report = tmp_path / "report.json"
    args = ["--model", str(tmp_path / "model"), "--device", "cpu", "--steps", "2"]
    args += ["--warmup", "1", "--batch-size", "4", "--seq-len", "16", "--json", str(report)]
    assert _gpu_check().main(args) == 0
    result = json.loads(report.read_text())
    assert result["agreement"]["passed"] and result["agreement"]["growth_same"]
    assert [run["precision"] for run in result["runs"]] == ["fp32", "bf16"]
    assert all(run["steps_per_s"] > 0 for run in result["runs"])
