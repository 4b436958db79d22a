"""LoRTA against the CP reconstruction of the whole update tensor with einsum."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora.config import ConfigError
from increlora.io import load_tensors
from increlora.methods.lorta import LoRTAConfig

BERT = MODEL_CASES["bert"]
RANK = 3
KINDS = [  # matrix types in module order: the matrix mode of the tensor
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]


def _adapted(model=None, **kwargs):
    model = model if model is not None else BERT.make()
    config = LoRTAConfig(target_modules=BERT.targets, r=RANK, alpha=6, **kwargs)
    adapted = increlora.inject(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.normal_()
    return model, adapted


def test_every_update_is_its_slice_of_the_cp_tensor():
    _, adapted = _adapted()
    f = next(iter(adapted.layers.values())).factors
    # The whole tensor, (layer, matrix, block, d_h, d) = s * sum_k C_l C_m C_b b_k a_k.
    tensor = (6 / RANK) * torch.einsum(
        "lk,mk,hk,kj,ki->lmhji",
        f.lora_C_layer,
        f.lora_C_matrix,
        f.lora_C_block,
        f.lora_B,
        f.lora_A,
    )
    for name, layer in adapted.layers.items():
        _, _, _, index, kind = name.split(".", 4)  # bert.encoder.layer.<i>.<kind>
        blocks = tensor[int(index), KINDS.index(kind), : layer.n_blocks]  # (h, d_h, d)
        if kind.endswith("output.dense"):  # output projections: heads on the input side
            expected = blocks.permute(2, 0, 1).reshape(layer.out_features, -1)
        else:
            expected = blocks.reshape(-1, layer.in_features)
        x = torch.randn(4, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                layer.adapter_forward(x), x @ expected.T, rtol=1e-5, atol=1e-5
            )


def test_factors_are_shared_counted_and_saved_once(tmp_path):
    model, adapted = _adapted()
    # d = 16, d_h = 8, 32 / 8 = 4 blocks (FFN), 2 layers, 6 matrix types.
    expected = RANK * (16 + 8 + 4 + 2 + 6)
    assert adapted.num_trainable_parameters() == expected
    assert sum(p.numel() for p in adapted.trainable_parameters()) == expected
    adapted.save(tmp_path / "lorta")
    saved = load_tensors(tmp_path / "lorta" / "adapter.safetensors")
    assert sum(t.numel() for t in saved.values()) == expected
    twin = copy.deepcopy(model)  # deep copies keep one set of factors for all layers
    layers = [m for m in twin.modules() if isinstance(m, increlora.layers.AdapterLayer)]
    assert all(m.shared is layers[0].factors for m in layers)
    assert layers[0].factors is not next(iter(adapted.layers.values())).factors


def test_modules_without_a_layer_index_are_named():
    model = MODEL_CASES["mlp"].make()
    with pytest.raises(ConfigError, match=r"layer_pattern.*'lin0', 'lin1'"):
        increlora.inject(
            model, LoRTAConfig(target_modules=["lin0", "lin1"], hidden_size=16, block_size=4)
        )


def test_matrices_off_the_head_width_are_named():
    model = BERT.make()
    with pytest.raises(ConfigError, match=r"head width 5.*query"):
        increlora.inject(model, LoRTAConfig(target_modules=["query"], block_size=5))
