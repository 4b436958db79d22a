"""MoRA against its compression / decompression written out entry by entry."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import increlora
from increlora.config import ConfigError
from increlora.methods.mora import MoRAConfig

# (d_in, d_out, LoRA-equivalent r): even blocks; padding + repeated output; r_hat > d_in.
SHAPES = [(16, 16, 2), (12, 20, 2), (5, 12, 4)]


def _rotation(block: int, r_hat: int) -> torch.Tensor:
    """RoPE at position ``block`` as a matrix: entry u pairs with u +- r_hat / 2."""
    half = r_hat // 2
    rot = torch.zeros(r_hat, r_hat, dtype=torch.float64)
    for u in range(r_hat):
        angle = block * 10000 ** (-2 * (u % half) / r_hat)
        rot[u, u] = math.cos(angle)
        if u < half:
            rot[u, u + half] = -math.sin(angle)
        else:
            rot[u, u - half] = math.sin(angle)
    return rot


def _reference(m: torch.Tensor, d_in: int, d_out: int, variant: str) -> torch.Tensor:
    """Dense update from the definitions: wrap-around padding, blocks, output by index."""
    r_hat = m.shape[0]
    n_in = math.ceil(d_in / r_hat)
    m = m.double()
    delta = torch.zeros(d_out, d_in, dtype=torch.float64)
    for o in range(d_out):
        if variant == "sharing":  # every padded input position feeds row o mod r_hat of M
            for p in range(n_in * r_hat):
                delta[o, p % d_in] += m[o % r_hat, p % r_hat]
        else:  # output o reads row j of block b, which sees only padded block b, rotated
            block, row = divmod(o % (n_in * r_hat), r_hat)
            mixed = m @ _rotation(block, r_hat)
            for t in range(r_hat):
                delta[o, (block * r_hat + t) % d_in] += mixed[row, t]
    return delta.float()


def _layer(d_in: int, d_out: int, **config):
    model = nn.Sequential(nn.Linear(d_in, d_out))
    adapted = increlora.inject(model, MoRAConfig(target_modules=["0"], **config))
    layer = adapted.layers["0"]
    with torch.no_grad():
        layer.lora_M.normal_()
    return adapted, layer


@pytest.mark.parametrize("variant", ["sharing", "rotation"])
@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_update_matches_the_definition(variant, d_in, d_out, r):
    _, layer = _layer(d_in, d_out, r=r, variant=variant)
    expected = _reference(layer.lora_M.detach(), d_in, d_out, variant)
    x = torch.randn(2, 3, d_in)
    with torch.no_grad():
        torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.adapter_forward(x), x @ expected.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["sharing", "rotation"])
def test_merged_weight_is_the_operator_on_identity_columns(variant):
    adapted, layer = _layer(12, 20, r=2, variant=variant)
    eye = torch.eye(12)
    with torch.no_grad():
        columns = (layer(eye) - layer.base_layer(eye)).T  # column i = update of e_i
        base = layer.base_layer.weight.clone()
        adapted.merge()
        torch.testing.assert_close(layer.base_layer.weight - base, columns, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("r", "variant", "expected"),
    [(2, "sharing", 9), (2.5, "sharing", 10), (2, "rotation", 8), (8, "rotation", 18)],
)
def test_square_side_follows_the_parameter_budget(r, variant, expected):
    # d_in + d_out = 16 + 32: floor(sqrt(48 r)), even for rotation.
    _, layer = _layer(16, 32, r=r, variant=variant)
    assert layer.r_hat == expected
    assert layer.num_adapter_parameters() == expected**2


def test_update_rank_exceeds_lora_rank_at_equal_parameters():
    _, sharing = _layer(16, 16, r=2)  # r_hat = 8: same 64 parameters as LoRA at rank 2
    _, rotation = _layer(16, 16, r=2, variant="rotation")
    with torch.no_grad():
        assert torch.linalg.matrix_rank(sharing.delta_weight()) == 8
        assert torch.linalg.matrix_rank(rotation.delta_weight()) == 16


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"r": 2, "r_hat": 4}, "exactly one"),
        ({"r": None, "r_hat": 5, "variant": "rotation"}, "even"),
    ],
)
def test_config_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        MoRAConfig(**fields)


def test_rotation_tables_survive_save_load_and_bf16(tmp_path):
    model = nn.Sequential(nn.Linear(12, 20))
    fresh = copy.deepcopy(model)
    adapted = increlora.inject(model, MoRAConfig(target_modules=["0"], r=2, variant="rotation"))
    with torch.no_grad():
        adapted.layers["0"].lora_M.normal_()
    adapted.save(tmp_path / "mora")
    increlora.load_adapter(fresh, tmp_path / "mora")
    x = torch.randn(3, 12)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
        half = copy.deepcopy(model).to(torch.bfloat16)(x.bfloat16()).float()
    assert (half - expected).abs().max() <= 0.05 * expected.abs().max()
