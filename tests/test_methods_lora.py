"""LoRA against PEFT's own LoRA: the same weights must give the same outputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora.config import ConfigError
from increlora.methods.lora import LoRAConfig

BERT = MODEL_CASES["bert"]


def test_outputs_match_peft_lora_with_identical_weights():
    peft = pytest.importorskip("peft")
    model = BERT.make()
    reference = copy.deepcopy(model)
    adapted = increlora.inject(model, LoRAConfig(target_modules=BERT.targets, r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in adapted.layers.values():
            layer.lora_B.normal_()  # B starts at zero: make the update visible
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=BERT.targets, lora_dropout=0.0)
    reference = peft.get_peft_model(reference, config)
    with torch.no_grad():
        for name, layer in adapted.layers.items():
            theirs = reference.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    reference.eval()
    inputs = BERT.inputs()
    with torch.no_grad():
        ours, expected = BERT.output(model, inputs), BERT.output(reference, inputs)
    assert not torch.allclose(ours, BERT.output(BERT.make(), inputs))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_init_matches_loralib():
    model = BERT.make()
    adapted = increlora.inject(model, LoRAConfig(target_modules=["query"], r=4))
    for layer in adapted.layers.values():
        assert torch.count_nonzero(layer.lora_B) == 0
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) on fan_in
        assert layer.lora_A.abs().max() <= bound
        assert layer.num_adapter_parameters() == 4 * (layer.in_features + layer.out_features)


def test_factors_carry_the_scaling():
    model = BERT.make()
    adapted = increlora.inject(model, LoRAConfig(target_modules=["value"], r=2, alpha=6))
    layer = next(iter(adapted.layers.values()))
    with torch.no_grad():
        layer.lora_B.normal_()
    a, b = layer.lora_factors()
    torch.testing.assert_close(b @ a, 3.0 * layer.lora_B @ layer.lora_A)


@pytest.mark.parametrize("bad", [{"r": 0}, {"init": "uniform"}])
def test_config_errors_name_the_field(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        LoRAConfig(**bad)
