"""benchmarks/protocol.py: learning rates chosen across sweep directories (an extended grid
counts), and final runs at a superseded rate removed so that they run again."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from test_report import _write_run

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("protocol", REPO / "benchmarks" / "protocol.py")
protocol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protocol)


def test_choice_spans_every_sweep_directory(tmp_path):
    _write_run(tmp_path / "grid", "adalora", 5e-3, 0, val=0.596, test=0.57)
    _write_run(tmp_path / "grid", "adalora", 1e-2, 0, val=0.684, test=0.63)
    _write_run(tmp_path / "edge", "adalora", 2e-2, 0, val=0.714, test=0.67)
    chosen = protocol.choose_learning_rates([tmp_path / "grid"])
    assert chosen["adalora"][0] == 1e-2
    chosen = protocol.choose_learning_rates([tmp_path / "grid", tmp_path / "edge"])
    assert chosen["adalora"] == (2e-2, {5e-3: 0.596, 1e-2: 0.684, 2e-2: 0.714})


def _finished(root: Path, key: str, lr: float) -> None:
    (root / key).mkdir(parents=True)
    (root / key / "metrics.json").write_text(json.dumps({"resolved": {"learning_rate": lr}}))


def test_supersede_removes_only_runs_at_another_rate(tmp_path):
    out, results = tmp_path / "runs" / "core", tmp_path / "results"
    spec = {
        "output_dir": str(out),
        "base": {"model": "minilm", "data": {"task": "mr"}},
        "matrix": {
            "seed": [1, 2],
            "method": [
                {"name": "lora", "label": "lora", "learning_rate": 2e-3},
                {"name": "adalora", "label": "adalora", "learning_rate": 2e-2},
            ],
        },
    }
    _finished(out, "seed=1/method=lora", 2e-3)  # at the asked rate: kept
    _finished(out, "seed=1/method=adalora", 1e-2)  # superseded
    _finished(results / "core", "seed=1/method=adalora", 1e-2)
    _finished(results / "core", "seed=1/method=lora", 2e-3)
    (out / "seed=2/method=adalora").mkdir(parents=True)  # unfinished: left to resume

    assert protocol.supersede(spec, results) == ["seed=1/method=adalora"]
    assert (out / "seed=1/method=lora/metrics.json").is_file()
    assert not (out / "seed=1/method=adalora").exists()
    assert not (results / "core/seed=1/method=adalora").exists()
    assert (results / "core/seed=1/method=lora/metrics.json").is_file()
    assert (out / "seed=2/method=adalora").is_dir()
    assert protocol.supersede(spec, results) == []


def test_beyond_edge_follows_the_1_2_5_ladder():
    assert protocol.beyond_edge(5e-3, up=True) == 1e-2
    assert protocol.beyond_edge(2e-3, up=True) == 5e-3
    assert protocol.beyond_edge(1e-3, up=True) == 2e-3
    assert protocol.beyond_edge(5e-4, up=False) == 2e-4
    assert protocol.beyond_edge(1e-3, up=False) == 5e-4
    assert protocol.beyond_edge(3e-3, up=True) == 6e-3  # off the ladder: x2


def _grid(root: Path) -> None:
    """lora peaks inside the grid; adalora at its top edge."""
    for lr, val in ((5e-4, 0.20), (1e-3, 0.25), (2e-3, 0.24), (5e-3, 0.10)):
        _write_run(root, "lora", lr, 0, val=val, test=0.0)
    for lr, val in ((5e-4, 0.10), (1e-3, 0.15), (2e-3, 0.20), (5e-3, 0.26)):
        _write_run(root, "adalora", lr, 0, val=val, test=0.0)


def test_edge_and_confirm_needs_use_the_sweep_seed_only(tmp_path):
    _grid(tmp_path)
    assert protocol.edge_needs([tmp_path], 0, set()) == {1e-2: ["adalora"]}
    assert protocol.edge_needs([tmp_path], 0, {("adalora", 1e-2)}) == {}
    needs = protocol.confirm_needs([tmp_path], 0, 2)
    assert {lr: sorted(labels) for lr, labels in needs.items()} == {
        1e-3: ["lora"],
        2e-3: ["adalora", "lora"],
        5e-3: ["adalora"],
    }
    # A second seed that favours another rate changes neither stage's plan (idempotent).
    _write_run(tmp_path, "lora", 5e-3, 6, val=0.9, test=0.0)
    assert protocol.confirm_needs([tmp_path], 0, 2)[1e-3] == ["lora"]


def test_confirmed_rates_win_over_a_single_lucky_seed(tmp_path):
    _grid(tmp_path)
    _write_run(tmp_path, "lora", 1e-3, 6, val=0.21, test=0.0)  # mean 0.230
    _write_run(tmp_path, "lora", 2e-3, 6, val=0.25, test=0.0)  # mean 0.245
    lr, means = protocol.choose_learning_rates([tmp_path])["lora"]
    assert lr == 2e-3  # not 1e-3 (best on seed 0 alone), nor an unconfirmed rate
    assert means[2e-3] == (0.24 + 0.25) / 2


def test_extra_specs_keep_the_sweep_and_change_only_rate_and_seed(tmp_path):
    sweep = {
        "output_dir": str(tmp_path / "sweep_cola"),
        "base": {"model": "minilm", "data": {"task": "cola"}, "train": {"seed": 0}},
        "matrix": {
            "train.learning_rate": [1e-3, 2e-3],
            "method": [
                {"name": "lora", "label": "lora"},
                {"name": "adalora", "label": "adalora", "target_rank": 1.8},
            ],
        },
    }
    specs = protocol.extra_specs(sweep, {2e-3: ["adalora"], 1e-3: ["adalora", "lora"]}, 6)
    assert [e["label"] for e in specs[0]["matrix"]["method"]] == ["lora", "adalora"]  # spec order
    assert [s["matrix"]["train.learning_rate"] for s in specs] == [[1e-3], [2e-3]]
    assert specs[1]["matrix"]["method"] == [
        {"name": "adalora", "label": "adalora", "target_rank": 1.8}
    ]
    assert all(s["output_dir"] == str(tmp_path / "sweep_cola") + "/seed=6" for s in specs)
    assert specs[0]["base"]["train"]["seed"] == 6 and sweep["base"]["train"]["seed"] == 0
    edge = protocol.extra_specs(sweep, {1e-2: ["adalora"]}, None)
    assert edge[0]["output_dir"] == str(tmp_path / "sweep_cola")
    assert edge[0]["base"]["train"]["seed"] == 0
