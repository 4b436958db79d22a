"""PEFT's LoRA / AdaLoRA behind increlora's API: same math as ours, the controller does the rest."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora.methods.lora import LoRAConfig
from increlora.methods.peft_reference import PeftAdaLoRAConfig, PeftLoRAConfig

peft = pytest.importorskip("peft")

CASE = MODEL_CASES["bert"]
FIELDS = dict(target_modules=CASE.targets, modules_to_save=CASE.modules_to_save, alpha=4)


def _train(model, adapted, steps: int, total_steps: int | None = None):
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.05, weight_decay=0.1)
    controller = adapted.controller(optimizer, total_steps=total_steps or steps)
    torch.manual_seed(0)  # the same dropout masks for every model trained here
    model.train()
    for step in range(steps):
        loss = CASE.loss(model, CASE.inputs(seed=step)) + controller.regularization_loss()
        loss.backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    model.eval()
    return controller


def test_peft_lora_trains_like_our_lora():
    base = CASE.make()
    ours_model, theirs_model = copy.deepcopy(base), copy.deepcopy(base)
    ours = increlora.inject(ours_model, LoRAConfig(r=2, **FIELDS))
    theirs = increlora.inject(theirs_model, PeftLoRAConfig(r=2, **FIELDS))
    assert theirs.model is theirs_model  # PEFT injected in place: this is what to call
    with torch.no_grad():  # the same start (B random too, so the update is not zero)
        for name, layer in ours.layers.items():
            peft_layer = theirs.layers[name]
            torch.nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.1)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
    assert ours.num_trainable_parameters() == theirs.num_trainable_parameters()
    assert ours.rank_pattern() == theirs.rank_pattern()
    _train(ours_model, ours, steps=3)
    _train(theirs_model, theirs, steps=3)
    inputs = CASE.inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            CASE.output(ours_model, inputs), CASE.output(theirs_model, inputs), rtol=0, atol=2e-5
        )


def test_peft_adalora_controller_allocates_without_being_asked():
    model = CASE.make()
    adapted = increlora.inject(
        model, PeftAdaLoRAConfig(target_rank=2, init_rank=4, t_init=1, t_final=2, **FIELDS)
    )
    controller = _train(model, adapted, steps=8)
    events = [e["step"] for e in controller.history]
    assert events == [2, 3, 4, 5, 6]  # masks from t_init + 1 to the final step T - t_final
    assert sum(adapted.rank_pattern().values()) == 2 * len(adapted.layers)
    for name, layer in adapted.layers.items():
        zero = int((layer.lora_E["default"] == 0).sum())
        assert zero == 4 - adapted.rank_pattern()[name]


def test_peft_adalora_forgotten_step_raises():
    model = CASE.make()
    adapted = increlora.inject(model, PeftAdaLoRAConfig(target_rank=2, init_rank=4, **FIELDS))
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    adapted.controller(optimizer, total_steps=20)
    CASE.loss(model, CASE.inputs()).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="peft-adalora: .*without controller.step"):
        optimizer.step()


def test_regularizer_equals_what_peft_adds_in_its_forward():
    model = CASE.make()
    config = PeftAdaLoRAConfig(target_rank=2, init_rank=4, orth_reg_weight=0.3, **FIELDS)
    adapted = increlora.inject(model, config)
    optimizer = torch.optim.AdamW(adapted.trainable_parameters())
    controller = adapted.controller(optimizer, total_steps=20)
    batch = {**CASE.inputs(), "labels": torch.tensor([0, 1, 1, 0])}
    with torch.no_grad():
        plain = model(**batch).loss
        with_reg = adapted.peft_model.base_model(**batch).loss  # AdaLoraModel.forward
    torch.testing.assert_close(plain + controller.regularization_loss().detach(), with_reg)


def test_bf16_model_gets_fp32_peft_adapters():
    model = CASE.make().to(torch.bfloat16)
    adapted = increlora.inject(model, PeftLoRAConfig(r=2, **FIELDS))
    params = [p for n, p in adapted.named_trainable_parameters() if "lora_" in n]
    assert params and all(p.dtype == torch.float32 for p in params)


def test_missing_peft_names_the_extra(monkeypatch):
    real = importlib.import_module

    def no_peft(name, *args):
        if name == "peft":
            raise ImportError("No module named 'peft'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_peft)
    with pytest.raises(ImportError, match=r"pip install increlora\[peft\]"):
        increlora.inject(CASE.make(), PeftLoRAConfig(r=2, **FIELDS))
