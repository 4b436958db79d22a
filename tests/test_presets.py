"""``preset: paper``: the official recipe, and the allocator's decisions against the official rule.

The replay test feeds a recorded sequence of per-step module scores into a real allocator
(real layers, a real optimizer, real steps) and checks every growth decision against a
few-line re-derivation of the rule read from the official code (loralib/increlora.py):
EMA sensitivity and uncertainty with beta 0.85, score = I * U, rounds at steps
t > init_warmup with t % interval == 0, the top_h best modules gain add_r ranks, until
target_rank * modules ranks (the initial ranks included).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

import increlora
from increlora.config import ConfigError
from increlora.presets import OFFICIAL, official_add_r, paper_method_config, paper_preset
from increlora.runner.bench import expand
from increlora.runner.config import RunConfig, apply_preset

BETA = 0.85


class Stack(nn.Module):
    """Six 32x32 linear layers: every module can hold any rank the replay gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def official_decisions(
    recorded: torch.Tensor, target_rank: float, top_h: int, add_r: int, warmup: int, interval: int
) -> list[tuple[int, dict[int, int]]]:
    """The official rule, re-derived: (step, {module: ranks added}) per round.

    Two documented fixes of the official code are part of the rule here: at most top_h
    modules per round (theirs takes every module tied at the threshold), and the last round
    stops exactly at the budget (theirs overshoots when add_r > 1).
    """
    n = recorded.shape[1]
    sens, unc = [0.0] * n, [0.0] * n
    ranks, target = [1] * n, round(target_rank * n)
    rounds = []
    for t, raw in enumerate(recorded.tolist(), start=1):
        if sum(ranks) >= target:
            break
        for m in range(n):
            sens[m] = BETA * sens[m] + (1 - BETA) * raw[m]
            unc[m] = BETA * unc[m] + (1 - BETA) * abs(raw[m] - sens[m])
        if t > warmup and t % interval == 0:
            score = [sens[m] * unc[m] for m in range(n)]
            added, left = {}, target - sum(ranks)
            for m in sorted(range(n), key=lambda m: -score[m])[:top_h]:
                if left == 0:
                    break
                added[m] = min(add_r, left)
                ranks[m] += added[m]
                left -= added[m]
            rounds.append((t, added))
    return rounds


@pytest.mark.parametrize("target_rank", [2, 8])
def test_replayed_scores_grow_as_the_official_rule(target_rank: int) -> None:
    torch.manual_seed(0)
    model = Stack()
    config = paper_method_config(
        "mrpc",
        target_rank=target_rank,
        init_warmup=4,
        interval=3,
        top_h=2,
        dropout=0.0,
        target_modules=r"layers\.\d+",
    )
    adapted = increlora.inject(model, config)
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-3)
    steps = 60
    controller = adapted.controller(optimizer, total_steps=steps)
    recorded = torch.rand(steps, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    controller._raw_scores = lambda: recorded[controller.optimizer_steps - 1].clone()

    x = torch.randn(8, 32)
    for _ in range(steps):
        loss = model(x).pow(2).mean() + controller.regularization_loss()
        loss.backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()

    expected = official_decisions(recorded, target_rank, 2, official_add_r(target_rank), 4, 3)
    names = list(adapted.layers)
    got = [
        (e["step"], {names.index(g["module"]): g["added"] for g in e["grown"]})
        for e in controller.history
    ]
    assert len(expected) >= 3 and got == expected
    assert controller.total_rank == target_rank * 6
    assert not controller.growing


def test_official_rule_overshoots_where_the_package_lands_exactly() -> None:
    """At rank 8 (add_r 4) the official threshold rule grows k = min(top_h, ranks left)
    modules by 4 each; the re-derived rule stops on the budget (the official rank-8 MRPC
    script ended at 592 of 576 ranks)."""
    left, top_h, add_r = 3, 10, official_add_r(8)
    official = min(top_h, left) * add_r
    assert official == 12 > left
    recorded = torch.rand(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rounds = official_decisions(recorded, 8, 10, add_r, 2, 2)
    assert sum(sum(added.values()) for _, added in rounds) == 8 * 6 - 6


def test_paper_preset_matches_the_official_scripts() -> None:
    mrpc8 = paper_preset("mrpc", 8)
    assert mrpc8.method["add_r"] == 4 and official_add_r(2) == 1
    assert mrpc8.method["dropout"] == 0.3 and mrpc8.method["orth_reg_weight"] == 0.1
    assert mrpc8.method["alpha"] == 32.0 and mrpc8.method["budget"] == "rank"
    assert mrpc8.method["importance"] == "paper" and mrpc8.method["score_rows"] == 1.0
    assert mrpc8.method["init_warmup"] == mrpc8.method["interval"] == 100
    assert mrpc8.train == {
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "warmup_steps": 100,
        "batch_size": 32,
    }
    stsb = paper_preset("stsb", 2)
    assert stsb.method["orth_reg_weight"] == 0.3 and stsb.train["weight_decay"] == 0.1
    assert paper_preset("sst2", 2).method["interval"] == 1000
    # A task the scripts do not cover takes the small-task recipe, without MRPC's dropout.
    mr = paper_preset("mr", 2)
    assert mr.method["dropout"] == 0.0 and "not in the official scripts" in mr.source
    assert set(OFFICIAL) == {"cola", "mrpc", "rte", "stsb", "sst2", "qnli", "mnli", "qqp"}


def test_preset_fills_under_explicit_settings() -> None:
    base = RunConfig().to_dict()
    explicit = {
        "preset": "paper",
        "data": {"task": "rte"},
        "method": {"name": "increlora", "target_rank": 2, "top_h": 4},
        "train": {"weight_decay": 0.2},
    }
    config = RunConfig.from_dict(apply_preset(base, explicit))
    assert config.preset == "paper"
    assert config.method.args["top_h"] == 4  # explicit wins
    assert config.method.args["orth_reg_weight"] == 0.3  # RTE's, from the preset
    assert config.train.weight_decay == 0.2
    assert config.train.learning_rate == 1.2e-3 and config.train.warmup_steps == 100
    # A rate set anywhere wins over the preset's.
    explicit["train"]["learning_rate"] = 5e-3
    assert RunConfig.from_dict(apply_preset(base, explicit)).train.learning_rate == 5e-3


def test_preset_errors_are_one_line() -> None:
    base = RunConfig().to_dict()
    with pytest.raises(ConfigError, match="recipe for increlora.*'lora'"):
        apply_preset(base, {"preset": "paper", "method": {"name": "lora"}})
    with pytest.raises(ConfigError, match="unknown preset 'fast'.*paper"):
        apply_preset(base, {"preset": "fast"})
    with pytest.raises(ConfigError, match="unknown preset"):
        RunConfig.from_dict({"preset": "fast"})


def test_cli_preset_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    from increlora import cli

    parser = cli.build_parser()
    args = parser.parse_args(
        ["train", "--task", "cola", "--preset", "paper", "--method-arg", "top_h=6", "--lr", "2e-3"]
    )
    config = cli._build_run_config(args)
    assert config.preset == "paper" and config.data.task == "cola"
    assert config.method.args["top_h"] == 6 and config.method.args["importance"] == "paper"
    assert config.train.learning_rate == 2e-3 and config.train.weight_decay == 0.0
    assert isinstance(args, argparse.Namespace)


def test_bench_method_entry_takes_a_preset(tmp_path: Path) -> None:
    spec = {
        "base": {"data": {"task": "mrpc"}, "method": {"target_rank": 8}},
        "matrix": {
            "train.learning_rate": [2e-3],
            "method": [
                {"name": "lora"},
                {"name": "increlora", "label": "paper", "preset": "paper", "top_h": 11},
            ],
        },
    }
    lora, paper = (run.config for run in expand(spec, tmp_path))
    assert lora.preset is None and lora.train.weight_decay == 0.0
    assert paper.preset == "paper" and paper.method.target_rank == 8
    assert paper.method.args["add_r"] == 4 and paper.method.args["top_h"] == 11
    assert paper.train.learning_rate == 2e-3  # the swept rate, not the preset's 1e-3
    assert paper.train.weight_decay == 0.01
