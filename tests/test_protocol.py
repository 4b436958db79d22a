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
