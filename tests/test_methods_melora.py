"""MELoRA against a dense block-diagonal update built independently."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora.config import ConfigError
from increlora.methods.melora import MELoRAConfig

BERT = MODEL_CASES["bert"]


def _block_diagonal_reference(layer, scaling: float) -> torch.Tensor:
    """``delta`` with block i = s * B_i @ A_i placed by index arithmetic."""
    n = layer.n
    rows, cols = layer.out_features // n, layer.in_features // n
    delta = torch.zeros(layer.out_features, layer.in_features)
    for i in range(n):
        delta[i * rows : (i + 1) * rows, i * cols : (i + 1) * cols] = scaling * (
            layer.lora_B[i] @ layer.lora_A[i]
        )
    return delta


@pytest.mark.parametrize(("scaling_rank", "divisor"), [("equivalent", 8), ("mini", 2)])
def test_update_is_the_dense_block_diagonal(scaling_rank, divisor):
    model = BERT.make()
    config = MELoRAConfig(target_modules=BERT.targets, r=8, n=4, alpha=4, scaling_rank=scaling_rank)
    adapted = increlora.inject(model, config)
    torch.manual_seed(0)
    for layer in adapted.layers.values():
        with torch.no_grad():
            layer.lora_B.normal_()
            expected = _block_diagonal_reference(layer, 4 / divisor)
            x = torch.randn(2, 3, layer.in_features)
            torch.testing.assert_close(layer.delta_weight(), expected)
            torch.testing.assert_close(layer.adapter_forward(x), x @ expected.T)
            assert torch.linalg.matrix_rank(expected) == 8  # the equivalent rank


def test_parameter_count_is_lora_count_over_n():
    model = BERT.make()
    adapted = increlora.inject(model, MELoRAConfig(target_modules=BERT.targets, r=8, n=4))
    lora = sum(8 * (m.in_features + m.out_features) for m in adapted.layers.values())
    assert adapted.num_trainable_parameters() == lora // 4


def test_widths_not_divisible_by_n_name_the_modules():
    model = BERT.make()
    with pytest.raises(ConfigError, match=r"n: 3 .*query"):
        increlora.inject(model, MELoRAConfig(target_modules=["query"], r=3, n=3))
    assert not any(isinstance(m, increlora.layers.AdapterLayer) for m in model.modules())


def test_rank_must_be_a_multiple_of_n():
    with pytest.raises(ConfigError, match="multiple of n"):
        MELoRAConfig(r=6, n=4)
