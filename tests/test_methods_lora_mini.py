"""LoRA-Mini: the update is the 4-matrix product and only the inner matrices train."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora.config import ConfigError
from increlora.methods.lora_mini import LoRAMiniConfig

BERT = MODEL_CASES["bert"]


def _adapted(**kwargs):
    model = BERT.make()
    config = LoRAMiniConfig(target_modules=BERT.targets, **{"r": 2, "outer_rank": 8, **kwargs})
    return model, increlora.inject(model, config)


def test_update_is_the_four_matrix_product():
    _, adapted = _adapted(alpha=6)
    torch.manual_seed(0)
    for layer in adapted.layers.values():
        with torch.no_grad():
            layer.lora_B_in.normal_()
        a_out, a_in = layer.lora_A_out, layer.lora_A_in
        b_in, b_out = layer.lora_B_in, layer.lora_B_out
        assert a_out.shape == (8, layer.in_features) and b_out.shape == (layer.out_features, 8)
        assert a_in.shape == (2, 8) and b_in.shape == (8, 2)
        expected = 3.0 * b_out @ b_in @ a_in @ a_out
        x = torch.randn(5, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer.delta_weight(), expected)
            torch.testing.assert_close(layer.adapter_forward(x), x @ expected.T)


def test_only_inner_matrices_train():
    model, adapted = _adapted()
    outer = {n: layer.lora_A_out.clone() for n, layer in adapted.layers.items()}
    trainable = dict(adapted.named_trainable_parameters())
    assert trainable and all("_in" in name for name in trainable)
    assert adapted.num_trainable_parameters() == len(adapted.layers) * 2 * 2 * 8
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.1, weight_decay=0.1)
    BERT.loss(model, BERT.inputs()).backward()
    optimizer.step()
    for name, layer in adapted.layers.items():
        assert torch.equal(layer.lora_A_out, outer[name])
        assert layer.lora_A_in.grad is not None


def test_outer_matrices_depend_only_on_the_seed():
    _, first = _adapted(seed=3)
    _, second = _adapted(seed=3)
    _, other = _adapted(seed=4)
    name = next(iter(first.layers))
    assert torch.equal(first.layers[name].lora_B_out, second.layers[name].lora_B_out)
    assert not torch.equal(first.layers[name].lora_B_out, other.layers[name].lora_B_out)


def test_orthogonal_outer_init_and_width_clamp():
    _, adapted = _adapted(outer_rank=64, r=4, outer_init="orthogonal")
    for layer in adapted.layers.values():
        width = min(layer.in_features, layer.out_features)
        assert layer.outer_rank == width  # 64 exceeds every width of the tiny BERT
        a_out = layer.lora_A_out
        torch.testing.assert_close(a_out @ a_out.T, torch.eye(width), atol=1e-5, rtol=0)


def test_outer_rank_below_inner_rank_is_an_error():
    with pytest.raises(ConfigError, match="outer_rank"):
        LoRAMiniConfig(r=8, outer_rank=4)
