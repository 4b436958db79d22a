"""IncreLoRA's scores, fast-start init and short-run schedule (issue 9), each against an
independent reference: autograd of the task loss alone, a plain-PyTorch LoRA, exact scores."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import MODEL_CASES
from scipy.stats import spearmanr

import increlora
from increlora import IncreLoRAConfig
from increlora.allocation.importance import paper_score, sample_rows
from increlora.allocation.schedule import ModuleSlot, make_plan
from increlora.layers import TripletLayer

CASE = MODEL_CASES["bert"]


def _config(**kw) -> IncreLoRAConfig:
    defaults = dict(target_modules=CASE.targets, modules_to_save=["classifier"], alpha=4)
    return IncreLoRAConfig(**{**defaults, **kw})


def _train(model, optimizer, controller, steps: int) -> None:
    """Plain loop: task loss + the controller's regularizer, one input batch per step."""
    for step in range(steps):
        (CASE.loss(model, CASE.inputs(seed=step)) + controller.regularization_loss()).backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()


def _one_scored_step(reg_weight: float, importance: str, **kw):
    """Raw scores of one step at fixed weights (lr 0), with the regularizer at reg_weight."""
    torch.manual_seed(0)
    model = CASE.make()
    adapted = increlora.inject(
        model,
        _config(
            target_rank=2, init_warmup=5, interval=5, top_h=12, importance=importance,
            orth_reg_weight=reg_weight, beta1=0.0, beta2=0.0, init="paper", **kw,
        ),
    )  # fmt: skip
    with torch.no_grad():  # e away from 0 so the task gradients of A and B are not all zero
        for layer in adapted.layers.values():
            layer.lora_E[: layer.active_rank].normal_(0, 0.5)
    optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.0)
    controller = adapted.controller(optimizer, total_steps=20)
    task_loss = CASE.loss(model, CASE.inputs(seed=3))
    (task_loss + controller.regularization_loss()).backward()
    optimizer.step()
    controller.step()
    return model, adapted, controller


def _reference_proxy(model, adapted) -> list[float]:
    """sum |e g_e| + mean_j |A g_A| + mean_j |B g_B| with g from the task loss alone."""
    layers = list(adapted.layers.values())
    params = [getattr(m, k) for m in layers for k in ("lora_E", "lora_A", "lora_B")]
    grads = torch.autograd.grad(CASE.loss(model, CASE.inputs(seed=3)), params)
    out = []
    for i, m in enumerate(layers):
        g_e, g_a, g_b = grads[3 * i : 3 * i + 3]
        r = m.active_rank
        out.append(
            float(
                (m.lora_E[:r].detach() * g_e[:r]).abs().sum()
                + (m.lora_A[:r].detach() * g_a[:r]).abs().sum() / m.in_features
                + (m.lora_B[:, :r].detach() * g_b[:, :r]).abs().sum() / m.out_features
            )
        )
    return out


@pytest.mark.parametrize("importance", ["proxy", "paper"])
def test_scores_come_from_the_task_loss_whatever_the_regularizer_weight(importance):
    rows = {"score_rows": 1.0} if importance == "paper" else {}
    scores = {}
    for weight in (0.0, 0.1, 10.0):
        model, adapted, controller = _one_scored_step(weight, importance, **rows)
        scores[weight] = controller.ema.sensitivity.clone()
        if importance == "proxy":
            expected = torch.tensor(_reference_proxy(model, adapted), dtype=torch.float64)
            torch.testing.assert_close(scores[weight], expected, rtol=1e-4, atol=1e-12)
    # The same numbers, hence the same ranking, at every regularizer weight.
    torch.testing.assert_close(scores[0.1], scores[0.0], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(scores[10.0], scores[0.0], rtol=1e-5, atol=1e-12)
    assert scores[0.0].max() > 0


def test_proxy_ignores_gradient_clipping_and_accumulation_scaling():
    # Clipping scales p.grad after backward; the captured task gradient is taken before it.
    _, _, plain = _one_scored_step(0.1, "proxy")
    torch.manual_seed(0)
    model = CASE.make()
    adapted = increlora.inject(
        model,
        _config(
            target_rank=2, init_warmup=5, interval=5, top_h=12, beta1=0.0, beta2=0.0, init="paper"
        ),
    )
    with torch.no_grad():
        for layer in adapted.layers.values():
            layer.lora_E[: layer.active_rank].normal_(0, 0.5)
    optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.0)
    controller = adapted.controller(optimizer, total_steps=20)
    (CASE.loss(model, CASE.inputs(seed=3)) + controller.regularization_loss()).backward()
    torch.nn.utils.clip_grad_norm_(adapted.trainable_parameters(), 1e-6)
    optimizer.step()
    controller.step()
    torch.testing.assert_close(controller.ema.sensitivity, plain.ema.sensitivity)


def test_sampled_rows_capture_exactly_those_rows_of_the_dense_gradient():
    torch.manual_seed(0)
    base = torch.nn.Linear(7, 16)
    layer = TripletLayer(base, capacity=4, init_rank=2, reserve_rank=1, alpha=3.0)
    with torch.no_grad():
        layer.lora_E[:2] = torch.tensor([0.3, -0.2])
    rows = sample_rows(16, 0.25, torch.Generator().manual_seed(1))
    assert rows is not None and rows.numel() == 4 and len(set(rows.tolist())) == 4
    layer.grad_rows, layer.grad_product = rows, torch.zeros(4, 7)
    x, target = torch.randn(2, 3, 7), torch.randn(2, 3, 16)
    ((layer(x) - target) ** 2).sum().backward()
    # Independent reference: autograd w.r.t. a dense dW in y = x (W0 + dW)^T + b.
    delta = layer.delta_weight().detach().requires_grad_()
    ((x @ (base.weight + delta).T + base.bias - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.grad_product, delta.grad[rows], rtol=1e-5, atol=1e-6)
    expected = (delta[rows] * delta.grad[rows]).abs().sum() * (16 / 4) / math.sqrt(16 * 7)
    torch.testing.assert_close(paper_score(layer), expected.detach())


def test_sampled_paper_score_ranks_modules_like_the_exact_score():
    """The row-sampled estimate (1/8 of the rows) against the exact score, both smoothed by
    the allocator's EMA over the same 40 steps: the rank correlation is reported and high."""
    torch.manual_seed(0)
    model = CASE.make()
    adapted = increlora.inject(
        model, _config(target_rank=2, importance="paper", score_rows=1.0, init_warmup=200)
    )
    layers = list(adapted.layers.values())
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.01)
    controller = adapted.controller(optimizer, total_steps=400)
    sampled = torch.zeros(len(layers), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        (CASE.loss(model, CASE.inputs(seed=step)) + controller.regularization_loss()).backward()
        optimizer.step()
        estimate = []
        for layer in layers:  # the estimator on the same captured gradient, before scoring
            rows = sample_rows(layer.out_features, 0.125, gen)
            delta = layer.delta_weight().detach()[rows]
            part = (delta * layer.grad_product[rows]).abs().sum() * layer.out_features / len(rows)
            estimate.append(float(part) / math.sqrt(layer.out_features * layer.in_features))
        sampled = 0.85 * sampled + 0.15 * torch.tensor(estimate, dtype=torch.float64)
        controller.step()
        optimizer.zero_grad()
    exact = controller.ema.sensitivity
    rho = spearmanr(exact.numpy(), sampled.numpy()).statistic
    print(f"Spearman rank correlation, sampled (1/8 rows) vs exact paper score: {rho:.3f}")
    assert rho > 0.8


def test_lora_init_starts_like_lora_and_its_first_step_is_lora_s():
    """init='lora': A ~ U(+-1/sqrt(d_in)), B = 0, e = init_e, and one AdamW step moves the
    update exactly as it moves a plain-PyTorch LoRA (x A^T B^T * s) with the same A."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    layer = TripletLayer(
        base, capacity=3, init_rank=2, reserve_rank=0, alpha=4.0, init="lora",
        scaling_mode="constant", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.all(layer.lora_B == 0) and torch.all(layer.lora_E[:2] == 1.0)
    assert layer.lora_A[:2].abs().max() <= 12**-0.5
    assert torch.all(layer.delta_weight() == 0)
    lora_a = layer.lora_A[:2].detach().clone().requires_grad_()
    lora_b = torch.zeros(10, 2, requires_grad=True)
    x, target = torch.randn(5, 12), torch.randn(5, 10)
    ours = torch.optim.AdamW([layer.lora_A, layer.lora_E, layer.lora_B], lr=0.01)
    ref = torch.optim.AdamW([lora_a, lora_b], lr=0.01)
    ((layer(x) - target) ** 2).mean().backward()
    ((base(x) + x @ lora_a.T @ lora_b.T * 2.0 - target) ** 2).mean().backward()
    ours.step()
    ref.step()
    torch.testing.assert_close(layer.delta_weight(), (lora_b @ lora_a * 2.0).detach())
    assert layer.delta_weight().abs().max() > 0


@pytest.mark.parametrize("scaling", ["rescale", "constant"])
def test_lora_init_activation_keeps_the_function_and_resets_e(scaling):
    torch.manual_seed(0)
    layer = TripletLayer(
        torch.nn.Linear(8, 8), capacity=4, init_rank=1, reserve_rank=1, alpha=2.0,
        init="lora", scaling_mode=scaling, init_e=1.0,
    )  # fmt: skip
    with torch.no_grad():  # as after training: active and reserve B nonzero
        layer.lora_B[:, :2].normal_(0, 0.1)
    before = layer.delta_weight().detach().clone()
    reserve_b = layer.lora_B[:, 1].detach().clone()
    layer.grow(1, 1, torch.Generator().manual_seed(1))
    after = layer.delta_weight().detach()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-7)
    expected_e = 2.0 if scaling == "rescale" else 1.0  # rescale: init_e * active / init_rank
    assert layer.lora_E[1].item() == pytest.approx(expected_e)
    ratio = 2.0 if scaling == "rescale" else 1.0  # s_old / s_new (alpha / rank: 2 -> 1)
    torch.testing.assert_close(
        layer.lora_B[:, 1], reserve_b * ratio * layer.new_rank_e / expected_e
    )
    assert torch.all(layer.lora_B[:, 2] == 0) and layer.lora_E[2] == layer.new_rank_e


def test_lora_init_grows_to_the_budget_and_resumes_through_the_allocator():
    torch.manual_seed(0)
    model = CASE.make()
    adapted = increlora.inject(
        model, _config(target_rank=2, init="lora", init_warmup=2, interval=2, top_h=4)
    )
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.01)
    controller = adapted.controller(optimizer, total_steps=12)
    losses = []
    for step in range(12):
        loss = CASE.loss(model, CASE.inputs(seed=step % 2))
        losses.append(float(loss))
        (loss + controller.regularization_loss()).backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    assert controller.total_rank == 24 and not controller.growing
    assert losses[-1] < losses[0]


def _minilm_like_slots() -> list[ModuleSlot]:
    # MiniLM-L6: per layer q, k, v, attention output (384x384), intermediate and output.
    costs = [769, 769, 769, 769, 1921, 1921] * 6
    return [ModuleSlot(f"m{i}", c, 17, 1) for i, c in enumerate(costs)]


@pytest.mark.parametrize("steps", [48, 96, 189])
def test_short_runs_get_several_competitive_rounds(steps):
    plan = make_plan(IncreLoRAConfig(target_rank=2), _minilm_like_slots(), steps)
    assert not plan.uniform and plan.top_h < 36
    assert plan.planned_rounds >= 5
    assert plan.round_steps()[-1] <= steps // 2


@pytest.mark.parametrize("steps", [48, 96, 282])
def test_a_rank_8_budget_in_a_short_run_still_competes_by_giving_winners_more_rank(steps):
    """Rank 8 in 48 steps needs 252 ranks in ~7 rounds: with one rank per winner every module
    wins every round (uniform LoRA). With add_r=None it rises so at most half the modules win."""
    slots = [ModuleSlot(s.name, s.cost, 65, 1) for s in _minilm_like_slots()]
    plan = make_plan(IncreLoRAConfig(target_rank=8, add_r=None), slots, steps)
    assert not plan.uniform and plan.top_h <= 18 and plan.add_r >= 2
    assert plan.top_h * plan.add_r * plan.planned_rounds >= 7 * 36
    assert plan.round_steps()[-1] <= steps // 2
    fixed = make_plan(IncreLoRAConfig(target_rank=8, add_r=1), slots, 48)
    assert fixed.add_r == 1 and fixed.uniform  # an explicit add_r is kept
    assert make_plan(IncreLoRAConfig(target_rank=8), slots, 48).uniform  # the default: add_r=1
    rank2 = make_plan(IncreLoRAConfig(target_rank=2, add_r=None), _minilm_like_slots(), 48)
    assert rank2.add_r == 1


def test_a_rank_8_short_run_ends_with_uneven_ranks_on_the_budget():
    torch.manual_seed(0)
    model = CASE.make()
    adapted = increlora.inject(model, _config(target_rank=8, init="lora", add_r=None))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.005)
    controller = adapted.controller(optimizer, total_steps=48)
    assert controller.plan.add_r >= 2 and not controller.plan.uniform
    _train(model, optimizer, controller, 48)
    ranks = list(adapted.rank_pattern().values())
    assert len(set(ranks)) > 1
    assert controller.num_trainable_parameters() == sum(
        m.active_rank * (m.in_features + m.out_features + 1) for m in adapted.layers.values()
    )
    assert sum(ranks) <= 8 * len(ranks)


def test_a_run_too_short_for_allocation_warns_and_says_so_in_the_plan(caplog):
    slots = _minilm_like_slots()
    plan = make_plan(IncreLoRAConfig(target_rank=2), slots, 6)
    assert plan.uniform and plan.to_dict()["uniform"] is True
    model = CASE.make()
    adapted = increlora.inject(model, _config(target_rank=2))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    # The CLI may have stopped the package logger propagating to pytest's root handler.
    package_logger = logging.getLogger("increlora")
    package_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="increlora.allocation"):
            controller = adapted.controller(optimizer, total_steps=4)
    finally:
        package_logger.removeHandler(caplog.handler)
    assert controller.plan.uniform
    assert "too short for allocation" in caplog.text


def test_a_short_run_allocates_unevenly_by_score():
    """48 steps (a 500-example run): final ranks differ from uniform, and every round's
    chosen modules scored at least as high as the best module left out."""
    torch.manual_seed(0)
    model = CASE.make()
    adapted = increlora.inject(model, _config(target_rank=2, init="lora"))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.005)
    controller = adapted.controller(optimizer, total_steps=48)
    _train(model, optimizer, controller, 48)
    ranks = list(adapted.rank_pattern().values())
    assert sum(ranks) == 2 * len(ranks) and len(set(ranks)) > 1
    assert len(controller.history) >= 3
    for event in controller.history:
        chosen = min(g["score"] for g in event["grown"])
        assert event["threshold"] is None or chosen >= event["threshold"]


def test_the_last_rounds_event_counts_what_trains_after_the_reserve_drop():
    torch.manual_seed(0)
    model = CASE.make()
    adapted = increlora.inject(model, _config(target_rank=2, init_warmup=2, interval=2, top_h=6))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.01)
    controller = adapted.controller(optimizer, total_steps=10)
    _train(model, optimizer, controller, 10)
    last = controller.history[-1]
    assert last["budget_reached"] and not controller.history[0]["budget_reached"]
    expected = sum(
        m.active_rank * (m.in_features + m.out_features + 1) for m in adapted.layers.values()
    )
    assert last["trainable_params"] == expected == controller.num_trainable_parameters()


def _schedulers(optimizer, total):
    return {
        "onecycle": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=total),
        "cosine_warmup": torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, total_iters=4),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total - 4),
            ],
            milestones=[4],
        ),
        "constant": torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, total_iters=0),
        "lambda": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 + 0.5 * s),
    }


@pytest.mark.parametrize("name", ["onecycle", "cosine_warmup", "constant", "lambda"])
def test_restart_warmup_peaks_at_the_lr_the_users_schedule_reached(name):
    torch.manual_seed(0)
    model = CASE.make()
    adapted = increlora.inject(
        model, _config(target_rank=2, init_warmup=5, interval=5, top_h=12, restart_warmup_steps=2)
    )
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.01)
    total = 20
    scheduler = _schedulers(optimizer, total)[name]
    controller = adapted.controller(optimizer, total_steps=total)
    used = []
    for step in range(8):
        used.append(optimizer.param_groups[0]["lr"])
        (CASE.loss(model, CASE.inputs(seed=step)) + controller.regularization_loss()).backward()
        optimizer.step()
        controller.step()
        scheduler.step()
        optimizer.zero_grad()
    peak = controller.fresh._peak(0)
    assert peak == pytest.approx(max(used))  # independent: the lrs the schedule really used
    # A rank activated at step 5 reaches that peak once warmed up (age == warmup).
    row_lr = controller.fresh.row_lr(peak, torch.tensor([5]), 7)
    assert float(row_lr) == pytest.approx(max(used))


def test_an_interval_alone_derives_top_h_so_growth_still_fits():
    slots = _minilm_like_slots() * 2  # 72 modules
    plan = make_plan(IncreLoRAConfig(target_rank=2, interval=2), slots, 200)
    assert plan.interval == 2 and plan.round_steps()[-1] <= 100
    plan = make_plan(IncreLoRAConfig(target_rank=2, init_warmup=100), slots, 1000)
    assert plan.init_warmup == 100 and plan.round_steps()[-1] <= 500  # growth_end_fraction


def test_a_run_too_short_for_the_budget_says_how_long_it_must_be():
    with pytest.raises(increlora.ConfigError, match="train for at least 3 steps") as err:
        make_plan(IncreLoRAConfig(target_rank=2), _minilm_like_slots(), 2)
    assert "unset" not in str(err.value)
    with pytest.raises(increlora.ConfigError, match="leave interval/top_h unset"):
        make_plan(IncreLoRAConfig(target_rank=2, interval=50, top_h=1), _minilm_like_slots(), 60)
