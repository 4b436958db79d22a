"""PRILoRA: per-layer ranks against the linear formula, pruning against a manual computation."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch
from conftest import MODEL_CASES

import increlora
from increlora.checkpoint import load_training_state, save_training_state
from increlora.methods.prilora import PRILoRAConfig

BERT_MODULES = [
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]


def six_layer_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=6,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return BertModel(config)


def expected_rank(r_start: float, r_end: float, layer: int, layers: int) -> int:
    value = r_start + (r_end - r_start) * layer / (layers - 1)
    return int(Decimal(repr(value)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@pytest.mark.parametrize(
    ("fields", "r_start", "r_end", "average"),
    [
        ({"target_rank": 8}, 4, 12, 8),
        ({"target_rank": 2}, 1, 3, 2),
        ({"r_start": 2, "r_end": 7}, 2, 7, None),
    ],
)
def test_rank_rises_linearly_with_depth(fields, r_start, r_end, average):
    model = six_layer_bert()
    adapted = increlora.inject(model, PRILoRAConfig(target_modules=BERT_MODULES, **fields))
    pattern = adapted.rank_pattern()
    assert len(pattern) == 36
    for name, rank in pattern.items():
        layer = int(name.split("layer.")[1].split(".")[0])
        assert rank == expected_rank(r_start, r_end, layer, 6), name
    if average is not None:
        assert sum(pattern.values()) / len(pattern) == average
    expected = sum(m.r * (m.in_features + m.out_features) for m in adapted.layers.values())
    assert adapted.num_adapter_parameters() == expected


def test_modules_without_a_layer_index_rise_in_module_order():
    case = MODEL_CASES["mlp"]
    config = PRILoRAConfig(target_modules=case.targets, r_start=2, r_end=5)
    assert increlora.inject(case.make(), config).rank_pattern() == {"lin0": 2, "lin1": 5}


def test_pruning_matches_a_manual_computation():
    case = MODEL_CASES["mlp"]
    model = case.make()
    config = PRILoRAConfig(
        target_modules=["lin0"], r_start=3, r_end=3, prune_fraction=0.25, prune_interval=2
    )
    adapted = increlora.inject(model, config)
    layer = adapted.layers["lin0"]
    optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.0)  # A stays put
    controller = adapted.controller(optimizer, total_steps=10)
    inputs = [case.inputs(seed=s)["x"] for s in range(2)]
    beta = config.input_beta
    norm = torch.zeros(12)
    model.train()
    for x in inputs:
        norm = beta * norm + (1 - beta) * torch.sqrt((x**2).sum(dim=0))
        case.loss(model, {"x": x}).backward()
        optimizer.step()
        a_before = layer.lora_A.detach().clone()
        event = controller.step()
        optimizer.zero_grad()
    assert event == {"step": 2, "pruned_per_row": {"lin0": 3}}
    torch.testing.assert_close(layer.input_norm, norm)
    expected = a_before.clone()
    for i in range(3):  # per row: zero the 3 entries (25% of 12) of lowest |A_ij| * norm_j
        scores = [(abs(a_before[i, j].item()) * norm[j].item(), j) for j in range(12)]
        for _, j in sorted(scores)[:3]:
            expected[i, j] = 0.0
    torch.testing.assert_close(layer.lora_A.detach(), expected, rtol=0, atol=0)


def test_prunes_at_interval_and_after_the_last_step():
    case = MODEL_CASES["mlp"]
    model = case.make()
    adapted = increlora.inject(
        model, PRILoRAConfig(target_modules=case.targets, target_rank=2, prune_interval=3)
    )
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.01)
    controller = adapted.controller(optimizer, total_steps=7)
    model.train()
    for step in range(7):
        case.loss(model, case.inputs(seed=step)).backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    assert controller.history == [3, 6, 7]
    for layer in adapted.layers.values():
        assert ((layer.lora_A == 0).sum(dim=1) >= layer.in_features // 2).all()


def test_checkpoint_restores_input_statistics(tmp_path):
    case = MODEL_CASES["mlp"]
    config = PRILoRAConfig(target_modules=case.targets, target_rank=2, prune_interval=4)

    def build():
        model = case.make()
        adapted = increlora.inject(model, config)
        optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=0.01)
        return model, adapted, optimizer, adapted.controller(optimizer, total_steps=8)

    model, adapted, optimizer, controller = build()
    model.train()
    for step in range(3):
        case.loss(model, case.inputs(seed=step)).backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    save_training_state(tmp_path / "ckpt", adapted, optimizer, controller)
    _, restored, optimizer2, controller2 = build()
    load_training_state(tmp_path / "ckpt", restored, optimizer2, controller2)
    assert controller2.guard.optimizer_steps == 3
    for name, layer in restored.layers.items():
        torch.testing.assert_close(layer.input_norm, adapted.layers[name].input_norm)
