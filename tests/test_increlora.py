"""IncreLoRA-specific behaviour: schedule, budget, fresh ranks, invariants, resume, misuse."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MODEL_CASES, TinyMLP

import increlora
from increlora import ConfigError, IncreLoRAConfig
from increlora.allocation.schedule import ModuleSlot, make_plan, select_growth
from increlora.checkpoint import load_training_state, save_training_state
from increlora.layers import TripletLayer


def bert_config(**kw) -> IncreLoRAConfig:
    defaults = dict(
        target_modules=MODEL_CASES["bert"].targets, modules_to_save=["classifier"], alpha=4
    )
    return IncreLoRAConfig(**{**defaults, **kw})


def run(model, adapted, steps, total_steps=None, lr=0.01, optimizer_cls=torch.optim.AdamW, **kw):
    case = MODEL_CASES["bert"] if not isinstance(model, TinyMLP) else MODEL_CASES["mlp"]
    optimizer = optimizer_cls(adapted.trainable_parameters(), lr=lr, **kw)
    controller = adapted.controller(optimizer, total_steps=total_steps or steps)
    events = []
    for step in range(steps):
        loss = case.loss(model, case.inputs(seed=step)) + controller.regularization_loss()
        loss.backward()
        optimizer.step()
        event = controller.step()
        optimizer.zero_grad()
        if event:
            events.append(event)
    return optimizer, controller, events


def test_growth_lands_exactly_on_rank_budget_at_scheduled_steps():
    model = MODEL_CASES["bert"].make()
    # 12 modules, average 2.5 -> 30 ranks; start 12; 18 more = rounds of 5, 5, 5 and a partial 3.
    adapted = increlora.inject(
        model, bert_config(target_rank=2.5, init_warmup=3, interval=2, top_h=5)
    )
    _, controller, events = run(model, adapted, steps=14)
    assert [e["step"] for e in events] == [4, 6, 8, 10]
    assert [len(e["grown"]) for e in events] == [5, 5, 5, 3]
    assert controller.total_rank == 30 == sum(adapted.rank_pattern().values())
    assert not controller.growing
    assert all(layer.reserve_rank == 0 for layer in adapted.layers.values())
    # Count real parameters: sum over modules of r * (d_in + d_out + 1).
    expected = sum(
        m.active_rank * (m.in_features + m.out_features + 1) for m in adapted.layers.values()
    )
    assert controller.num_trainable_parameters() == expected


def test_parameter_budget_is_never_exceeded_and_filled():
    model = MODEL_CASES["bert"].make()
    budget = 2600
    adapted = increlora.inject(
        model,
        bert_config(target_rank=None, target_params=budget, init_warmup=1, interval=1, top_h=4),
    )
    _, controller, _ = run(model, adapted, steps=30)
    used = controller.num_trainable_parameters()
    cheapest = min(m.in_features + m.out_features + 1 for m in adapted.layers.values())
    assert budget - cheapest < used <= budget
    assert not controller.growing


def test_selection_ties_are_deterministic_and_capacity_is_respected():
    slots = [ModuleSlot(f"m{i}", cost=10, capacity=3, init_rank=1) for i in range(5)]
    plan = make_plan(
        IncreLoRAConfig(target_rank=2, init_warmup=0, interval=1, top_h=2, add_r=1), slots, 100
    )
    assert select_growth([1.0] * 5, slots, [1] * 5, plan) == [(0, 1), (1, 1)]
    # A full module (rank == capacity) is skipped in favour of the next best.
    assert select_growth([5, 4, 3, 2, 1], slots, [3, 1, 1, 1, 1], plan) == [(1, 1), (2, 1)]
    # The last round is partial: only the ranks left in the budget are given.
    assert select_growth([5, 4, 3, 2, 1], slots, [2, 2, 2, 2, 1], plan) == [(0, 1)]


def test_schedule_that_cannot_fit_is_a_clear_error():
    model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(
        model, bert_config(target_rank=4, init_warmup=10, interval=10, top_h=1)
    )
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    with pytest.raises(ConfigError, match=r"schedule: .*36 growth rounds.*raise top_h to"):
        adapted.controller(optimizer, total_steps=100)


def test_derived_schedule_ends_by_the_growth_fraction():
    model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(model, bert_config(target_rank=3, growth_end_fraction=0.5))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    controller = adapted.controller(optimizer, total_steps=400)
    rounds = controller.plan.round_steps()
    assert rounds and rounds[-1] <= 200
    assert controller.plan.interval >= 10


def test_unused_capacity_stays_zero_and_reserve_e_frozen():
    model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(
        model, bert_config(target_rank=3, init_warmup=2, interval=2, top_h=3, max_rank=6)
    )
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.05, weight_decay=0.5)
    controller = adapted.controller(optimizer, total_steps=40)
    case = MODEL_CASES["bert"]
    for step in range(12):
        case.loss(model, case.inputs(seed=step)).backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
        for layer in adapted.layers.values():
            u, r = layer.used_rank, layer.active_rank
            assert torch.count_nonzero(layer.lora_A[u:]) == 0
            assert torch.count_nonzero(layer.lora_B[:, u:]) == 0
            assert torch.count_nonzero(layer.lora_E[u:]) == 0
            assert torch.all(layer.lora_E[r:u] == layer.new_rank_e)
            assert torch.count_nonzero(layer.lora_A[:u].abs().sum(1)) == u  # used rows are live


def _fresh_reference(init, grads, optimizer_cls, lrs, **kw):
    """A freshly created parameter, stepped by a fresh optimizer with the given lr per step."""
    p = torch.nn.Parameter(init.clone())
    optimizer = optimizer_cls([p], lr=lrs[0], **kw)
    out = []
    for g, lr in zip(grads, lrs):
        optimizer.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        optimizer.step()
        out.append(p.detach().clone())
    return out


@pytest.mark.parametrize(
    "optimizer_cls,kw",
    [
        (torch.optim.AdamW, {"weight_decay": 0.1}),
        (torch.optim.Adam, {}),
        (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}),
    ],
)
def test_new_rank_steps_like_a_fresh_parameter(optimizer_cls, kw):
    """Rows born at a growth round follow a fresh parameter's trajectory with restart warmup."""
    torch.manual_seed(0)
    model = TinyMLP()
    config = IncreLoRAConfig(
        target_modules=["lin0", "lin1"], target_rank=3, init_warmup=2, interval=2, top_h=2,
        restart_warmup_steps=3, alpha=4,
    )  # fmt: skip
    adapted = increlora.inject(model, config)
    layer: TripletLayer = adapted.layers["lin0"]
    total, peak = 12, 0.05
    optimizer = optimizer_cls(adapted.trainable_parameters(), lr=peak, **kw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / total)
    controller = adapted.controller(optimizer, total_steps=total)
    case = MODEL_CASES["mlp"]
    trace = {"a": [], "e": [], "ga": [], "ge": []}
    grown_at, born, activated = None, 0, 0
    for step in range(1, total + 1):
        case.loss(model, case.inputs(seed=step)).backward()
        if grown_at is not None:
            trace["ga"].append(layer.lora_A.grad[born].clone())
            trace["ge"].append(layer.lora_E.grad[activated].clone())
        optimizer.step()
        event = controller.step()
        scheduler.step()
        optimizer.zero_grad()
        if grown_at is not None:
            trace["a"].append(layer.lora_A[born].detach().clone())
            trace["e"].append(layer.lora_E[activated].detach().clone())
        if event and grown_at is None and any(g["module"] == "lin0" for g in event["grown"]):
            grown_at = step
            activated = layer.active_rank - 1  # the former reserve rank, e now trainable
            born = layer.used_rank - 1  # a new reserve rank: its A row starts training now
            init_a = layer.lora_A[born].detach().clone()
            init_e = layer.lora_E[activated].detach().clone()
    assert grown_at is not None and len(trace["a"]) >= 4
    warm = 3

    def row_lr(t):  # the restart schedule of the spec, for a row that started after grown_at
        age = t - grown_at
        if age <= warm:
            return peak * age / warm
        return peak * (total - t) / (total - grown_at - warm)

    lrs = [row_lr(t) for t in range(grown_at + 1, total + 1)]
    ref_a = _fresh_reference(init_a, trace["ga"], optimizer_cls, lrs, **kw)
    ref_e = _fresh_reference(init_e, trace["ge"], optimizer_cls, lrs, **kw)
    torch.testing.assert_close(torch.stack(trace["a"]), torch.stack(ref_a), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack(trace["e"]), torch.stack(ref_e), rtol=1e-5, atol=1e-7)


def _train_with_checkpoint(tmp_path, total, stop_at=None):
    case = MODEL_CASES["bert"]
    model = case.make()
    config = bert_config(target_rank=3, init_warmup=2, interval=2, top_h=4, dropout=0.1)
    adapted = increlora.inject(model, config)

    def build(adapted):
        optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.02, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=total)
        return optimizer, scheduler, adapted.controller(optimizer, total_steps=total)

    optimizer, scheduler, controller = build(adapted)
    torch.manual_seed(123)
    start = 0
    if stop_at is not None:
        ckpt = tmp_path / "ckpt"
        model.train()
        for step in range(stop_at):
            _step(case, model, optimizer, scheduler, controller, step)
        save_training_state(ckpt, adapted, optimizer, controller, scheduler, {"step": stop_at})
        # A brand-new process: fresh model, optimizer, controller, all restored from disk.
        model = case.make()
        adapted = increlora.inject(model, config)
        optimizer, scheduler, controller = build(adapted)
        start = load_training_state(ckpt, adapted, optimizer, controller, scheduler)["step"]
    model.train()
    for step in range(start, total):
        _step(case, model, optimizer, scheduler, controller, step)
    return adapted, controller


def _step(case, model, optimizer, scheduler, controller, step):
    loss = case.loss(model, case.inputs(seed=step)) + controller.regularization_loss()
    loss.backward()
    optimizer.step()
    controller.step()
    scheduler.step()
    optimizer.zero_grad()


def test_resume_mid_growth_equals_uninterrupted(tmp_path):
    straight, c1 = _train_with_checkpoint(tmp_path, total=16)
    resumed, c2 = _train_with_checkpoint(tmp_path, total=16, stop_at=7)
    assert c2.history and c2.history[-1]["step"] > 7  # growth continued after the resume
    assert resumed.rank_pattern() == straight.rank_pattern()
    assert [e["step"] for e in c1.history] == [e["step"] for e in c2.history]
    a = dict(straight.named_trainable_parameters())
    for name, p in resumed.named_trainable_parameters():
        torch.testing.assert_close(p, a[name], rtol=0, atol=0, msg=name)


def test_forgotten_allocator_step_raises():
    model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(model, bert_config(target_rank=2))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    adapted.controller(optimizer, total_steps=100)
    case = MODEL_CASES["bert"]
    case.loss(model, case.inputs()).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="without allocator.step"):
        optimizer.step()


def test_allocator_step_per_micro_batch_raises():
    model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(model, bert_config(target_rank=2))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    controller = adapted.controller(optimizer, total_steps=100)
    case = MODEL_CASES["bert"]
    with pytest.raises(RuntimeError, match="per micro-batch"), pytest.warns(UserWarning):
        for _ in range(3):
            for _ in range(2):  # two micro-batches, the allocator called after each
                case.loss(model, case.inputs()).backward()
                controller.step()
            optimizer.step()
            controller.step()
            optimizer.zero_grad()


def test_scoring_after_zero_grad_raises():
    model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(model, bert_config(target_rank=2))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    controller = adapted.controller(optimizer, total_steps=100)
    case = MODEL_CASES["bert"]
    case.loss(model, case.inputs()).backward()
    optimizer.step()
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="BEFORE optimizer.zero_grad"):
        controller.step()


def test_paper_score_uses_the_gradient_of_the_dense_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(7, 5)
    layer = TripletLayer(base, capacity=4, init_rank=2, reserve_rank=1, alpha=3.0)
    with torch.no_grad():
        layer.lora_E[:2] = torch.tensor([0.3, -0.2])
    layer.grad_product = torch.zeros(5, 7)
    x = torch.randn(2, 3, 7)
    target = torch.randn(2, 3, 5)
    ((layer(x) - target) ** 2).sum().backward()
    # Independent reference: autograd through y = x (W0 + dW)^T + b w.r.t. a dense dW.
    delta = layer.delta_weight().detach().requires_grad_()
    y = x @ (base.weight + delta).T + base.bias
    ((y - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.grad_product, delta.grad, rtol=1e-5, atol=1e-6)
    from increlora.allocation.importance import paper_score

    expected = (delta.detach() * delta.grad).abs().sum() / math.sqrt(35)
    torch.testing.assert_close(paper_score(layer), expected)


@pytest.mark.parametrize("importance", ["paper", "proxy"])
def test_both_importance_scores_drive_growth(importance):
    model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(
        model, bert_config(target_rank=2, init_warmup=2, interval=2, top_h=4, importance=importance)
    )
    _, controller, events = run(model, adapted, steps=10)
    assert controller.total_rank == 24
    assert all(e["scores"] and max(e["scores"].values()) > 0 for e in events)


@pytest.mark.parametrize("mode,continuous", [("rescale", True), ("per_rank", False)])
def test_scaling_modes_at_growth(mode, continuous):
    torch.manual_seed(0)
    layer = TripletLayer(
        torch.nn.Linear(8, 8), capacity=4, init_rank=1, reserve_rank=0, alpha=2.0,
        scaling_mode=mode,
    )  # fmt: skip
    with torch.no_grad():
        layer.lora_E[0] = 0.7
    before = layer.delta_weight().detach().clone()
    layer.grow(1, 0, torch.Generator().manual_seed(1))
    after = layer.delta_weight().detach()
    change = (after - before).abs().max() / before.abs().max()
    assert (change < 1e-3) == continuous


def test_orthogonal_regularizer_matches_formula():
    model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(model, bert_config(target_rank=2, orth_reg_weight=0.3))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    controller = adapted.controller(optimizer, total_steps=100)
    terms = []
    for layer in adapted.layers.values():
        a = layer.lora_A[: layer.used_rank].detach()
        b = layer.lora_B[:, : layer.used_rank].detach()
        eye = torch.eye(layer.used_rank)
        terms += [((a @ a.T - eye) ** 2).sum().sqrt(), ((b.T @ b - eye) ** 2).sum().sqrt()]
    expected = 0.3 * torch.stack(terms).mean()
    torch.testing.assert_close(controller.regularization_loss().detach(), expected)


# ------------------------------------------------------------------------ bad input
def _untouched(model, before):
    assert not any(isinstance(m, increlora.layers.AdapterLayer) for m in model.modules())
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert not any(p.requires_grad is False for p in model.parameters())


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"target_modules": ["query", "nonexistent"]}, r"target_modules: 'nonexistent'"),
        ({"target_modules": r"nothing\..*"}, r"selects no module"),
        ({"max_rank": 100}, r"max_rank: 100 exceeds min\(d_in, d_out\)"),
        ({"target_rank": 12, "max_rank": 10}, r"target_rank: average 12"),
        ({"modules_to_save": ["head_that_is_not_there"]}, r"modules_to_save"),
    ],
)
def test_bad_injection_leaves_model_unchanged(kw, match):
    model = MODEL_CASES["bert"].make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        increlora.inject(model, bert_config(**kw))
    _untouched(model, before)


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"top_h": 0}, "top_h"),
        ({"interval": -1}, "interval"),
        ({"target_rank": 2, "target_params": 100}, "target_rank/target_params"),
        ({"scaling": "weird"}, "scaling"),
        ({"init_rank": 0}, "init_rank"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        IncreLoRAConfig(**kw)


def test_optimizer_without_adapter_parameters_is_rejected():
    model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(model, bert_config(target_rank=2))
    optimizer = torch.optim.AdamW(model.classifier.parameters())
    with pytest.raises(ConfigError, match="optimizer: does not hold"):
        adapted.controller(optimizer, total_steps=10)


def _saved_adapter(tmp_path):
    model = MODEL_CASES["bert"].make()
    adapted = increlora.inject(
        model, bert_config(target_rank=2, init_warmup=1, interval=1, top_h=4)
    )
    run(model, adapted, steps=5)
    adapted.save(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_loading_onto_a_model_with_other_shapes_fails_cleanly(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    path = _saved_adapter(tmp_path)
    other = BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32,
        )
    )  # fmt: skip
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(increlora.AdapterFileError, match="adapter.safetensors: module .*shape"):
        increlora.load_adapter(other, path)
    _untouched(other, before)


def test_corrupt_and_foreign_adapter_files_fail_cleanly(tmp_path):
    path = _saved_adapter(tmp_path)
    model = MODEL_CASES["bert"].make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (path / "adapter.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(increlora.AdapterFileError, match="not a readable safetensors"):
        increlora.load_adapter(model, path)
    (path / "increlora_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(increlora.AdapterFileError, match="not an increlora adapter"):
        increlora.load_adapter(model, path)
    (path / "increlora_config.json").write_text("{not json")
    with pytest.raises(increlora.AdapterFileError, match="not valid JSON"):
        increlora.load_adapter(model, path)
    with pytest.raises(increlora.AdapterFileError, match="file not found"):
        increlora.load_adapter(model, tmp_path / "missing")
    _untouched(model, before)


def _tiny(kind: str):
    import transformers as tf

    small = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    if kind == "mpnet":
        return tf.MPNetForSequenceClassification(tf.MPNetConfig(num_hidden_layers=2, **small))
    if kind == "deberta-v2":
        return tf.DebertaV2ForSequenceClassification(
            tf.DebertaV2Config(num_hidden_layers=2, max_position_embeddings=32, **small)
        )
    return MODEL_CASES[kind].make()


@pytest.mark.parametrize(
    "kind,per_layer", [("bert", 6), ("mpnet", 6), ("deberta-v2", 6), ("llama", 7), ("gpt2", 4)]
)
def test_architecture_presets_adapt_the_papers_modules(kind, per_layer):
    """target_modules=None picks every attention projection and both FFN matrices."""
    torch.manual_seed(0)
    model = _tiny(kind)
    adapted = increlora.inject(model, IncreLoRAConfig(target_rank=2))
    assert len(adapted.layers) == 2 * per_layer
    assert not any(h in n for n in adapted.layers for h in ("classifier", "lm_head", "score"))
    ids = torch.randint(0, 64, (2, 7))
    out = model(input_ids=ids).logits
    out.float().pow(2).mean().backward()
    assert all(layer.lora_B.grad is not None for layer in adapted.layers.values())
