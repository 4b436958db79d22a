"""Budget matching on a tiny BERT: exact counts, 5% landings, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora import IncreLoRAConfig
from increlora.budget import count_parameters, lora_equivalent_parameters, match_budget
from increlora.config import ConfigError
from increlora.methods.full import FullConfig
from increlora.methods.lora import LoRAConfig
from increlora.methods.lora_mini import LoRAMiniConfig
from increlora.methods.lorta import LoRTAConfig
from increlora.methods.melora import MELoRAConfig
from increlora.methods.mora import MoRAConfig

BERT = MODEL_CASES["bert"]
TARGETS = BERT.targets
# LoRA at average rank 4 on the 12 modules (16x16 attention, 16<->32 FFN): 4 * 448.
AVERAGE_RANK, TARGET = 4, 1792

BASES = {
    "lora": LoRAConfig(target_modules=TARGETS),
    "lora-mini": LoRAMiniConfig(target_modules=TARGETS, outer_rank=12),
    "melora": MELoRAConfig(target_modules=TARGETS, n=2),
    "mora": MoRAConfig(target_modules=TARGETS),
    "lorta": LoRTAConfig(target_modules=TARGETS),
    "increlora": IncreLoRAConfig(target_modules=TARGETS),
}


@pytest.fixture(scope="module")
def bert():
    return BERT.make()


def test_lora_equivalent_target(bert):
    assert lora_equivalent_parameters(bert, LoRAConfig(target_modules=TARGETS), 4) == TARGET


@pytest.mark.parametrize("method", sorted(BASES))
def test_match_lands_within_five_percent_and_counts_exactly(bert, method):
    state = {k: v.clone() for k, v in bert.state_dict().items()}
    config = match_budget(method, bert, average_rank=AVERAGE_RANK, base_config=BASES[method])
    count = count_parameters(method, config, bert)
    assert abs(count - TARGET) <= 0.05 * TARGET
    # The user's model is untouched: no adapter layers, same tensors, same flags.
    assert not any(isinstance(m, increlora.layers.AdapterLayer) for m in bert.modules())
    assert all(torch.equal(v, state[k]) for k, v in bert.state_dict().items())
    if method != "increlora":  # IncreLoRA's count is the budget it grows to, not its start
        adapted = increlora.inject(copy.deepcopy(bert), config)
        assert adapted.num_trainable_parameters() == count


def test_modules_to_save_are_not_counted(bert):
    config = LoRAConfig(target_modules=TARGETS, r=2, modules_to_save=["classifier"])
    assert count_parameters("lora", config, bert) == TARGET // 2


def test_shared_lorta_factors_count_once(bert):
    # R (d + d_h + blocks + layers + matrix types) = 5 * (16 + 8 + 4 + 2 + 6).
    assert count_parameters("lorta", LoRTAConfig(target_modules=TARGETS, r=5), bert) == 180


def test_full_counts_everything_but_has_no_size(bert):
    assert count_parameters("full", FullConfig(), bert) == sum(p.numel() for p in bert.parameters())
    with pytest.raises(ConfigError, match="'full' cannot be budget-matched"):
        match_budget("full", bert, target_params=1000)


def test_unreachable_budget_names_the_closest_count(bert):
    # Outer width 2 caps LoRA-Mini at r = 2: 12 modules * 2 * 2 * 2 = 96 parameters.
    base = LoRAMiniConfig(target_modules=TARGETS, r=1, outer_rank=2)
    with pytest.raises(ConfigError, match=r"within 5% of 1792.*closest: r=2 gives 96"):
        match_budget("lora-mini", bert, average_rank=AVERAGE_RANK, base_config=base)


def test_exactly_one_budget_is_required(bert):
    with pytest.raises(ConfigError, match="exactly one"):
        match_budget("lora", bert, target_params=100, average_rank=2)
