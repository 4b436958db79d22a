"""Every committed benchmark spec expands into valid run configs (a typo fails here, not hours
into a benchmark)."""

from __future__ import annotations

from pathlib import Path

import pytest

from increlora.runner.bench import expand
from increlora.runner.config import read_yaml

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "configs" / "bench").rglob("*.yaml"))


@pytest.mark.skipif(not SPECS, reason="no configs/bench in this checkout")
@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_spec_expands(path: Path, tmp_path: Path) -> None:
    spec = read_yaml(path)
    for entry in spec["matrix"].get("method", []):
        if isinstance(entry, dict) and entry.get("learning_rate") == "sweep":
            entry["learning_rate"] = 1e-3  # what benchmarks/protocol.py fills in
    runs = expand(spec, tmp_path)
    assert runs and len({run.key for run in runs}) == len(runs)
