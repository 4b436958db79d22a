"""AdaLoRA against PEFT's AdaLoRA: same schedule, same masks given the same weights and grads."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora import ConfigError
from increlora.allocation.adalora import budget_at
from increlora.checkpoint import load_training_state, save_training_state
from increlora.methods.adalora import AdaLoRAConfig

try:
    import peft
except ImportError:  # the comparisons with PEFT skip; the checks of our AdaLoRA alone run
    peft = None

requires_peft = pytest.mark.skipif(
    peft is None, reason="compares with PEFT's AdaLoRA: pip install increlora[peft]"
)

CASE = MODEL_CASES["bert"]


def _ours(model, **kw):
    defaults = dict(
        target_modules=CASE.targets,
        modules_to_save=CASE.modules_to_save,
        target_rank=2,
        init_rank=4,
        alpha=4,
        t_init=2,
        t_final=3,
    )
    return increlora.inject(model, AdaLoRAConfig(**{**defaults, **kw}))


def _peft(model, adapted, total_steps: int, config: AdaLoRAConfig):
    peft_config = peft.AdaLoraConfig(
        init_r=config.init_rank,
        target_r=int(config.target_rank),
        tinit=config.t_init,
        tfinal=config.t_final,
        deltaT=config.delta_t,
        total_step=total_steps,
        beta1=config.beta1,
        beta2=config.beta2,
        lora_alpha=config.alpha,
        target_modules=list(adapted.layers),
    )
    return peft.get_peft_model(model, peft_config)


@torch.no_grad()
def _copy_into_peft(adapted, peft_model) -> None:
    """PEFT's allocator sees exactly our weights and gradients (E is (r, 1) in PEFT)."""
    for name, layer in adapted.layers.items():
        target = peft_model.base_model.model.get_submodule(name)
        for key in ("lora_A", "lora_E", "lora_B"):
            ours = getattr(layer, key)
            theirs = getattr(target, key)["default"]
            theirs.copy_(ours.view_as(theirs))
            theirs.grad = ours.grad.view_as(theirs).clone()


@requires_peft
@pytest.mark.parametrize(("delta_t", "hold_mask"), [(1, True), (2, False)])
def test_same_triplets_masked_at_same_steps_as_peft(delta_t, hold_mask):
    total = 12
    model = CASE.make()
    peft_model = _peft(
        copy.deepcopy(model),
        _ours(copy.deepcopy(model)),
        total,
        AdaLoRAConfig(target_rank=2, init_rank=4, alpha=4, t_init=2, t_final=3, delta_t=delta_t),
    )
    adapted = _ours(model, delta_t=delta_t, hold_mask=hold_mask)
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.05)
    controller = adapted.controller(optimizer, total_steps=total)
    peft_config = peft_model.peft_config["default"]
    masked_steps = []
    for t in range(1, total + 1):
        loss = CASE.loss(model, CASE.inputs(seed=t)) + controller.regularization_loss()
        loss.backward()
        optimizer.step()
        _copy_into_peft(adapted, peft_model)
        previous = peft_config.rank_pattern
        peft_model.base_model.update_and_allocate(t)
        event = controller.step()
        if event is not None:
            masked_steps.append(t)
            assert peft_config.rank_pattern is not previous, f"PEFT did not mask at step {t}"
            for name, layer in adapted.layers.items():
                peft_kept = peft_config.rank_pattern[f"{name}.lora_E.default"]
                assert layer.kept.tolist() == peft_kept, f"step {t}: {name}"
        for name, layer in adapted.layers.items():
            theirs = peft_model.base_model.model.get_submodule(name).lora_E["default"]
            assert torch.equal(layer.lora_E == 0, theirs.view(-1) == 0), f"step {t}: {name}"
        optimizer.zero_grad()
    final = total - 3
    expected = [t for t in range(3, final) if t % delta_t == 0] + [final]
    assert masked_steps == expected
    assert sum(adapted.rank_pattern().values()) == 2 * len(adapted.layers)


@requires_peft
def test_budget_schedule_equals_peft():
    layer_count, init_r, target_r = 12, 6, 2
    model = CASE.make()
    config = peft.AdaLoraConfig(
        init_r=init_r, target_r=target_r, tinit=7, tfinal=11, deltaT=3, total_step=50
    )
    config.target_modules = list(_ours(copy.deepcopy(model)).layers)
    allocator = peft.get_peft_model(model, config).base_model.rankallocator
    for t in range(0, 52):
        budget, _ = allocator.budget_schedule(t)
        assert budget == budget_at(t, init_r * layer_count, target_r * layer_count, 7, 11, 50)


def _train(model, adapted, steps, total_steps):
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.05)
    controller = adapted.controller(optimizer, total_steps=total_steps)
    lambdas = []
    for t in range(1, steps + 1):
        CASE.loss(model, CASE.inputs(seed=t)).backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
        lambdas.append(
            {n: (m.kept.clone(), m.lora_E.detach().clone()) for n, m in adapted.layers.items()}
        )
    return controller, lambdas


@pytest.mark.parametrize("hold_mask", [True, False])
def test_masked_lambdas_stay_zero_only_when_held(hold_mask):
    model = CASE.make()
    adapted = _ours(model, delta_t=3, hold_mask=hold_mask, t_init=1, t_final=2)
    _, trace = _train(model, adapted, steps=8, total_steps=20)
    masked_nonzero = [
        (kept, e)
        for step in trace
        for kept, e in step.values()
        if (~kept).any() and (e[~kept] != 0).any()
    ]
    assert bool(masked_nonzero) != hold_mask


@requires_peft
def test_export_drops_masked_triplets_and_excludes_empty_modules(tmp_path):
    model = CASE.make()
    adapted = _ours(model, t_init=1, t_final=1)
    _train(model, adapted, steps=4, total_steps=4)
    first, second = list(adapted.layers)[:2]
    adapted.layers[first].kept.fill_(False)
    adapted.layers[first].apply_mask()
    adapted.export_peft(tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(CASE.make(), tmp_path / "peft").eval()
    model.eval()
    inputs = CASE.inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            CASE.output(reloaded, inputs), CASE.output(model, inputs), rtol=1e-5, atol=1e-5
        )
    assert first in reloaded.peft_config["default"].exclude_modules
    layer = adapted.layers[second]
    assert adapted.rank_pattern()[second] == int(layer.kept.sum())


def test_forgetting_controller_step_raises():
    model = CASE.make()
    adapted = _ours(model)
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    adapted.controller(optimizer, total_steps=20)
    CASE.loss(model, CASE.inputs()).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="AdaLoRA: .*without controller.step"):
        optimizer.step()


def test_schedule_without_a_masking_phase_is_rejected():
    model = CASE.make()
    adapted = _ours(model, t_init=5, t_final=5)
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    with pytest.raises(ConfigError, match="schedule: t_init=5 must be < total_steps - t_final"):
        adapted.controller(optimizer, total_steps=10)
    with pytest.raises(ConfigError, match="init_rank"):
        AdaLoRAConfig(target_rank=4, init_rank=2)


def _run(tmp_path, total: int, stop_at: int | None = None):
    """Train MLP AdaLoRA ``total`` steps, optionally through a checkpoint at ``stop_at``."""
    case = MODEL_CASES["mlp"]
    config = AdaLoRAConfig(
        target_modules=case.targets, target_rank=2, init_rank=4, t_init=1, t_final=2, delta_t=2
    )

    def build():
        model = case.make()
        adapted = increlora.inject(model, config)
        optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.05)
        return model, adapted, optimizer, adapted.controller(optimizer, total_steps=total)

    model, adapted, optimizer, controller = build()
    start = 0
    if stop_at is not None:
        for t in range(stop_at):
            _step(case, model, optimizer, controller, t)
        save_training_state(tmp_path / "ckpt", adapted, optimizer, controller)
        model, adapted, optimizer, controller = build()
        load_training_state(tmp_path / "ckpt", adapted, optimizer, controller)
        start = stop_at
    for t in range(start, total):
        _step(case, model, optimizer, controller, t)
    return adapted, controller


def _step(case, model, optimizer, controller, t):
    (case.loss(model, case.inputs(seed=t)) + controller.regularization_loss()).backward()
    optimizer.step()
    controller.step()
    optimizer.zero_grad()


def test_resume_mid_masking_equals_uninterrupted(tmp_path):
    straight, c1 = _run(tmp_path, total=10)
    resumed, c2 = _run(tmp_path, total=10, stop_at=5)
    assert [e["step"] for e in c1.history] == [e["step"] for e in c2.history] == [2, 4, 6, 8]
    assert resumed.rank_pattern() == straight.rank_pattern()
    reference = dict(straight.named_trainable_parameters())
    for name, p in resumed.named_trainable_parameters():
        torch.testing.assert_close(p, reference[name], rtol=0, atol=0, msg=name)


# The defaults PEFT sets differently, each documented where the field is (AdaLoRAConfig).
PEFT_DEFAULTS = {"alpha": (16.0, 8), "orth_reg_weight": (0.1, 0.5)}  # field: (ours, PEFT's)


def test_defaults_that_differ_from_peft_are_documented():
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(AdaLoRAConfig)}
    for name, (ours, theirs) in PEFT_DEFAULTS.items():
        assert fields[name].default == ours, name  # a running benchmark uses these values
        help_text = fields[name].metadata["help"]
        assert (
            "comparability with IncreLoRA" in help_text
            and f"uses {theirs}" in help_text.replace("lora_alpha=", "")
        ), name
        assert f"PEFT: {theirs}" in AdaLoRAConfig.__doc__, name


@requires_peft
def test_documented_peft_defaults_are_peft_s():
    config = peft.AdaLoraConfig(total_step=100)
    assert (config.lora_alpha, config.orth_reg_weight) == tuple(
        theirs for _, theirs in PEFT_DEFAULTS.values()
    )
