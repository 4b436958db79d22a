"""SoRA: the proximal gate step against a hand-written soft threshold, pruning, export, save."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora.methods.sora import SoRAConfig

CASE = MODEL_CASES["mlp"]


def _inject(**kw):
    """Gates spread around zero and B != 0, so gates get gradients and some cross zero."""
    model = CASE.make()
    defaults = dict(target_modules=CASE.targets, modules_to_save=CASE.modules_to_save, alpha=4)
    adapted = increlora.inject(model, SoRAConfig(**{**defaults, "max_rank": 6, **kw}))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapted.layers.values():
            layer.lora_gate.copy_(torch.linspace(-0.1, 0.1, 6))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
    return model, adapted


def soft_threshold(v: torch.Tensor, xi: float) -> torch.Tensor:
    """The reference: shrink toward zero by xi, exactly zero inside [-xi, xi]."""
    return torch.where(v.abs() > xi, v - xi * torch.sign(v), torch.zeros_like(v))


def _gates(adapted) -> list[torch.Tensor]:
    return [m.lora_gate.detach().clone() for m in adapted.layers.values()]


def _backward(model, adapted, controller, seed=0):
    loss = CASE.loss(model, CASE.inputs(seed=seed)) + controller.regularization_loss()
    loss.backward()


@pytest.mark.parametrize(("threshold", "xi"), [("lr", 0.1 * 0.3), ("fixed", 0.3)])
def test_sgd_step_then_soft_threshold(threshold, xi):
    model, adapted = _inject(sparsity=0.3, threshold=threshold, l1_weight=0.0)
    optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.1)
    controller = adapted.controller(optimizer, total_steps=10)
    _backward(model, adapted, controller)
    before = _gates(adapted)
    grads = [m.lora_gate.grad.clone() for m in adapted.layers.values()]
    optimizer.step()
    for g0, grad, layer in zip(before, grads, adapted.layers.values()):
        expected = soft_threshold(g0 - 0.1 * grad, xi)
        torch.testing.assert_close(layer.lora_gate.detach(), expected, rtol=0, atol=1e-7)
    assert any((m.lora_gate == 0).any() for m in adapted.layers.values())
    controller.step()


def test_adamw_weight_decay_is_undone_on_gates_only():
    model, adapted = _inject(sparsity=0.5, l1_weight=0.0)
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.05, weight_decay=0.3)
    controller = adapted.controller(optimizer, total_steps=10)
    fresh = [m.lora_gate.detach().clone().requires_grad_() for m in adapted.layers.values()]
    reference = torch.optim.AdamW(fresh, lr=0.05, weight_decay=0.0)
    for step in range(3):
        _backward(model, adapted, controller, seed=step)
        for f, layer in zip(fresh, adapted.layers.values()):
            f.grad = layer.lora_gate.grad.clone()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
        reference.step()
        with torch.no_grad():
            for f in fresh:
                f.copy_(soft_threshold(f, 0.05 * 0.5))
        for f, layer in zip(fresh, adapted.layers.values()):
            torch.testing.assert_close(layer.lora_gate.detach(), f.detach(), rtol=0, atol=1e-6)


def test_coupled_weight_decay_on_gates_warns():
    _, adapted = _inject()
    optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.1, weight_decay=0.01)
    with pytest.warns(UserWarning, match="weight_decay=0"):
        adapted.controller(optimizer, total_steps=10)


def test_l1_term_is_weight_times_mean_abs_gate():
    _, adapted = _inject(l1_weight=0.2)
    controller = adapted.controller(torch.optim.SGD(adapted.trainable_parameters(), lr=0.1), 5)
    gates = torch.cat(_gates(adapted))
    torch.testing.assert_close(controller.regularization_loss(), 0.2 * gates.abs().mean())


def test_zero_gates_are_pruned_at_the_end_exactly(tmp_path):
    model, adapted = _inject(sparsity=4.0, l1_weight=0.0)
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.05)
    controller = adapted.controller(optimizer, total_steps=4)
    inputs = CASE.inputs()
    for step in range(4):
        if step == 3:  # outputs and moments of the open ranks, just before the pruning step
            _backward(model, adapted, controller, seed=step)
            optimizer.step()
            with torch.no_grad():
                before = CASE.output(model, inputs)
            open_rows = {
                n: (m.open_ranks(), optimizer.state[m.lora_A]["exp_avg"].clone())
                for n, m in adapted.layers.items()
            }
            event = controller.step()
            optimizer.zero_grad()
            break
        _backward(model, adapted, controller, seed=step)
        optimizer.step()
        assert controller.step() is None
        optimizer.zero_grad()
    assert event is not None and event["step"] == 4
    with torch.no_grad():
        torch.testing.assert_close(CASE.output(model, inputs), before, rtol=1e-6, atol=1e-6)
    for name, layer in adapted.layers.items():
        idx, exp_avg = open_rows[name]
        assert layer.rank == idx.numel() < layer.r  # some ranks went away
        assert (layer.lora_gate[: layer.rank] != 0).all()
        assert (layer.lora_A[layer.rank :] == 0).all()
        torch.testing.assert_close(
            optimizer.state[layer.lora_A]["exp_avg"][: layer.rank], exp_avg[idx]
        )
    assert adapted.rank_pattern() == {n: m.rank for n, m in adapted.layers.items()}
    cost = sum(m.rank * (m.in_features + m.out_features + 1) for m in adapted.layers.values())
    assert adapted.num_adapter_parameters() == cost
    adapted.save(tmp_path / "sora")
    fresh = CASE.make()
    loaded = increlora.load_adapter(fresh, tmp_path / "sora")
    with torch.no_grad():
        torch.testing.assert_close(CASE.output(fresh, inputs), before, rtol=1e-6, atol=1e-6)
    assert loaded.rank_pattern() == adapted.rank_pattern()
