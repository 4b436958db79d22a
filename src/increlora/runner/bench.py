"""``increlora bench``: every combination of a spec's axes, one run directory each, resumable.

A spec is YAML::

    output_dir: runs/cpu_bench
    base:                      # a run config (model/data/method/train) every run starts from
      model: minilm
      train: {epochs: 3}
    matrix:                    # axes; the runs are their cartesian product
      task: [mr, vitaminc]
      method: [increlora, {name: lora, label: lora-lr3e-3, learning_rate: 3.0e-3}]
      target_rank: [2]
      train_size: [1000, 3000]
      seed: [0, 1, 2]

Axis names: ``task``, ``train_size``, ``seed``, ``target_rank``, ``model``, ``method``, or
any dotted field path (``train.learning_rate``). A method entry is a name or a method
section (``name`` + fields), plus optional ``label`` (its name in paths and reports) and
``learning_rate``. Runs live in ``<output_dir>/<axis>=<value>/...``; a run with metrics.json
is skipped, one with a checkpoint is resumed, so a long matrix runs across sittings.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..io import atomic_write_json, read_json
from . import outputs as O
from .config import RunConfig, apply_preset, merge, read_yaml
from .data import DataError
from .loop import TrainingDiverged, run
from .model import ModelLoadError

AXIS_PATHS = {
    "task": ("data", "task"),
    "train_size": ("data", "train_size"),
    "seed": ("train", "seed"),
    "target_rank": ("method", "target_rank"),
    "model": ("model",),
}
BENCH_STATUS = "bench_status.json"
DEFAULT_OUTPUT_DIR = "runs/bench"


def output_dir_of(spec: dict[str, Any], override: str | Path | None = None) -> Path:
    """Where a spec's runs go: ``override`` (the CLI's --output-dir), else the spec's
    ``output_dir``, else runs/bench."""
    return Path(override or spec.get("output_dir") or DEFAULT_OUTPUT_DIR)


@dataclass
class BenchRun:
    """One cell of the matrix: its directory name and its run configuration."""

    key: str
    config: RunConfig

    def state(self) -> str:
        out = self.config.resolved_output_dir()
        if (out / O.METRICS).is_file():
            return "finished"
        if (out / O.RUN_CONFIG).is_file():
            return "resumable"
        return "new"


def _label(value: Any) -> str:
    text = value.get("label", value.get("name")) if isinstance(value, dict) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(text))


def _apply(config: dict[str, Any], axis: str, value: Any) -> dict[str, Any]:
    if axis == "method":
        entry = {"name": value} if isinstance(value, str) else dict(value)
        entry.pop("label", None)
        learning_rate = entry.pop("learning_rate", None)
        preset = entry.pop("preset", None)
        method = {"target_rank": config.get("method", {}).get("target_rank"), **entry}
        explicit: dict[str, Any] = {"method": method}
        if learning_rate is not None:
            explicit["train"] = {"learning_rate": learning_rate}
        if preset is not None:  # the recipe goes over the spec's base, under the entry
            return apply_preset({**config, "method": {}}, {"preset": preset, **explicit})
        return merge(
            {**config, "method": method}, {k: v for k, v in explicit.items() if k != "method"}
        )
    path = AXIS_PATHS.get(axis) or tuple(axis.split("."))
    update: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        update = {part: update}
    return merge(config, update)


def expand(spec: dict[str, Any], output_dir: Path) -> list[BenchRun]:
    """The runs of a spec, in matrix order (the last axis varies fastest)."""
    unknown = sorted(set(spec) - {"output_dir", "base", "matrix", "description"})
    if unknown:
        raise ConfigError(f"bench spec: unknown keys {unknown}; use output_dir, base, matrix")
    matrix = spec.get("matrix") or {}
    if not isinstance(matrix, dict) or not matrix:
        raise ConfigError("bench spec: 'matrix' must map axis names to lists of values")
    for axis, values in matrix.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"bench spec: matrix.{axis} must be a non-empty list")
        if axis not in AXIS_PATHS and axis != "method" and "." not in axis:
            raise ConfigError(
                f"bench spec: unknown axis {axis!r}; use {sorted([*AXIS_PATHS, 'method'])} or a"
                " dotted field path such as train.learning_rate"
            )
    base = merge(RunConfig().to_dict(), spec.get("base") or {})
    runs = []
    for combo in itertools.product(*matrix.values()):
        config = base
        parts = []
        for axis, value in zip(matrix, combo):
            config = _apply(config, axis, value)
            parts.append(f"{axis}={_label(value)}")
        key = "/".join(parts)
        config = {**config, "output_dir": str(output_dir / key)}
        runs.append(BenchRun(key, RunConfig.from_dict(config)))
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        raise ConfigError("bench spec: two matrix entries share a label; give methods a 'label'")
    return runs


def run_bench(
    spec_path: str | Path, output_dir: str | Path | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Run (or continue) every run of the spec; failures are recorded and the rest go on.

    Ctrl-C stops the whole bench (the interrupted run keeps its checkpoint); running the
    same command again continues where it stopped.
    """
    spec = read_yaml(spec_path)
    out = output_dir_of(spec, output_dir)
    runs = expand(spec, out)
    if dry_run:
        for i, bench_run in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {bench_run.state():9s} {bench_run.key}")
        return {"runs": len(runs), "failed": []}
    out.mkdir(parents=True, exist_ok=True)
    status_path = out / BENCH_STATUS
    status = read_json(status_path) if status_path.is_file() else {}
    failed = []
    start = time.time()
    for i, bench_run in enumerate(runs, 1):
        state = bench_run.state()
        prefix = f"[{i}/{len(runs)}] {bench_run.key}"
        verb = {"finished": "finished earlier, skipped", "resumable": "resuming"}.get(
            state, "running"
        )
        O.say(f"bench {prefix}: {verb}")
        try:
            # A finished run still goes through run(): it checks the saved config matches.
            result = run(bench_run.config, resume=state != "new")
            status[bench_run.key] = result.status
        except (TrainingDiverged, ConfigError, DataError, ModelLoadError) as err:
            O.say(f"bench {prefix}: FAILED: {err}")
            status[bench_run.key] = f"failed: {err}"
            failed.append(bench_run.key)
        finally:
            atomic_write_json(status_path, status)
    O.say(
        f"bench: {len(runs) - len(failed)}/{len(runs)} runs done in"
        f" {time.time() - start:.0f}s; `increlora report {out}` makes the table"
    )
    return {"runs": len(runs), "failed": failed}
