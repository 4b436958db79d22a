"""The run directory: its file names, the JSONL training log, and the run's environment.

The layout is a contract (scripts and ``increlora report`` read it)::

    run_config.json      the run's configuration (a different run refuses this directory)
    train_log.jsonl      one JSON object per line, key "event": start, train, growth, eval, ...
    metrics.json         written last, only when the run finished
    adapter/             PEFT LoRA adapter (PeftModel.from_pretrained)
    increlora_adapter/   increlora's own adapter format (exact ranks, any method)
    ranks.png            final rank per layer x module type
    rank_allocation.png  rank per module type over training
    checkpoint/          what --resume needs
    checkpoint-good/     the last good checkpoint, kept only while checkpoint/ is not good
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import ConfigError
from ..io import atomic_write_json, atomic_write_text, read_json

RUN_CONFIG = "run_config.json"
TRAIN_LOG = "train_log.jsonl"
METRICS = "metrics.json"
PEFT_ADAPTER = "adapter"
OWN_ADAPTER = "increlora_adapter"
RANKS_PLOT = "ranks.png"
ALLOCATION_PLOT = "rank_allocation.png"
CHECKPOINT = "checkpoint"
GOOD_CHECKPOINT = "checkpoint-good"


def say(message: str) -> None:
    """A status line on stderr that does not break a progress bar (stdout is for results)."""
    tqdm.write(f"increlora: {message}", file=sys.stderr)


class RunLog:
    """Append-only JSONL log; each record is flushed and fsynced as it is written.

    A crash can only cut the last line short; :func:`read_log` skips such a line, and a
    resumed run rewrites the log (atomically) up to its checkpoint's step before appending.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (they happened after the resumed checkpoint)."""
        if not self.enabled:
            return
        kept = [r for r in read_log(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def strict_json(value: Any) -> Any:
    """``value`` with every NaN / infinite float made JSON-valid (strict parsers refuse NaN).

    In a mapping, ``{"loss": nan}`` becomes ``{"loss": None, "loss_nonfinite": "nan"}``
    (``"inf"`` / ``"-inf"``); elsewhere (in a list) the float becomes its string.
    """
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                out[key] = None
                out[f"{key}_nonfinite"] = str(item)
            else:
                out[key] = strict_json(item)
        return out
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_log(path: Path) -> list[dict[str, Any]]:
    """Records of a train_log.jsonl; a truncated last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path} line {i + 1}: not valid JSON") from None
    return records


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that decide a run's numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("increlora", "torch", "transformers", "accelerate", "peft", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process and, on CUDA, peak allocated GPU memory."""
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 / (1024 * 1024) if sys.platform == "darwin" else 1 / 1024
    peak = {"cpu_rss": round(rss * scale, 1)}
    if torch.cuda.is_available():
        peak["cuda_allocated"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


RESUMABLE_CHANGES = ("output_dir", "train.stop_at_step", "train.report_to")
"""Fields a resumed run may change: everything else would change the run's result."""


class RunDirError(ConfigError):
    """The output directory holds something this run must not overwrite or continue."""


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``'train.seed: 0 -> 1'`` for every field that differs, except RESUMABLE_CHANGES.

    A field the saved config does not have (it was added to the package after the run was
    saved) is no difference when the current value is that field's default: the run was
    made under the behaviour the default keeps.
    """
    from .config import RunConfig

    a, b = _flat(saved), _flat(current)
    defaults = _flat(RunConfig().to_dict())
    return [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if key not in RESUMABLE_CHANGES
        and a.get(key) != b.get(key)
        and not (key not in a and key in defaults and b.get(key) == defaults[key])
    ]


def public_path(path: str | Path) -> str:
    """A path as published in run summaries: inside the package cache as
    ``$INCRELORA_CACHE/<relative>``, inside the home folder as ``~/<relative>``; a hub id or a
    relative path as given. Summaries are committed and shared: no private absolute paths."""
    from ..assets import CACHE_ENV, cache_root

    text = str(path)
    candidate = Path(text)
    if not candidate.is_absolute():
        return text
    for root, name in ((cache_root(), f"${CACHE_ENV}"), (Path.home(), "~")):
        try:
            return f"{name}/{candidate.relative_to(root).as_posix()}"
        except ValueError:
            continue
    return f"<local>/{candidate.name}"


def check_run_dir(out: Path, config: dict[str, Any], resume: bool) -> None:
    """Refuse a directory holding another run, or this run without ``resume``.

    A fresh run needs a missing or empty directory. ``resume`` needs this run's
    run_config.json there (fields may differ only in RESUMABLE_CHANGES).
    """
    saved_path = out / RUN_CONFIG
    command = f"increlora train --resume --output-dir {out}"
    if saved_path.is_file():
        differences = config_differences(read_json(saved_path), config)
        if differences:
            shown = "; ".join(differences[:6]) + (" ..." if len(differences) > 6 else "")
            raise RunDirError(
                f"{out} holds a different run ({shown}). Use a new --output-dir, or continue"
                f" the saved run as it was configured with `{command}`."
            )
        if not resume:
            state = "finished" if (out / METRICS).is_file() else "not finished"
            raise RunDirError(
                f"{out} already holds this run ({state}); continue it with `{command}`, or"
                " choose a new --output-dir (nothing is overwritten)."
            )
    elif resume:
        raise RunDirError(f"nothing to resume: {saved_path} does not exist")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(
            f"{out} exists, is not empty and is not an increlora run directory; choose a new"
            " --output-dir"
        )


def write_run_config(out: Path, config: dict[str, Any]) -> None:
    """Claim the directory for this run (checked by the next run that points at it)."""
    atomic_write_json(out / RUN_CONFIG, config)


def format_summary(metrics: dict[str, Any], out: Path) -> str:
    """The few lines printed when a run finishes."""
    name = metrics["main_metric"]
    best, final = metrics["best"], metrics["final"]
    split = metrics["eval_split"]
    minutes, seconds = divmod(int(metrics["wall_time_s"]), 60)
    ranks = metrics["ranks"]
    lines = [
        f"increlora: finished {metrics['model']} / {metrics['task']} / {metrics['method']}"
        f" in {minutes}m{seconds:02d}s ({metrics['steps']} steps,"
        f" {metrics['steps_per_second'] or 0:.2f} steps/s)",
        f"  best  {split} {name} {best['metrics'][split][name]:.4f} (step {best['step']})"
        f"    final {split} {name} {final['metrics'][split][name]:.4f} (step {final['step']})",
    ]
    exported = best if metrics["adapter"]["selected"] == "best" else final
    # The held-out test split(s) of the exported adapter: the number a benchmark reports.
    tests = [s for s in exported["metrics"] if s != split and s.startswith("test")]
    if tests:
        scores = ", ".join(f"{s} {name} {exported['metrics'][s][name]:.4f}" for s in tests)
        lines.append(f"  exported adapter (step {exported['step']}, picked on {split}): {scores}")
    lines.append(f"  trainable parameters {metrics['trainable_params']:,}")
    loss = metrics.get("loss") or {}
    if loss.get("blew_up"):
        lines.append(
            f"  WARNING: the training loss rose from {loss['first']:.4g} to {loss['last']:.4g}"
            " (over 10x) while staying finite: the learning rate is likely far too high"
        )
    run = metrics.get("execution")
    if run:
        lines.append(
            f"  ran on {run['processes']} process{'es' if run['processes'] > 1 else ''}"
            f" ({run['distributed']}, {run['device']}, precision {run['mixed_precision']}),"
            f" global batch {run['global_batch']}"
        )
    base = metrics.get("base_model")
    if base is not None:
        gains = ", ".join(
            f"{s} {base['metrics'][s][name]:.4f} -> {exported['metrics'][s][name]:.4f}"
            for s in base["metrics"]
            if s in exported["metrics"]
        )
        lines.append(f"  {name} of the base model (adapters off) -> the adapter: {gains}")
    if ranks:
        values = list(ranks.values())
        lines.append(
            f"  ranks: total {sum(values)} over {len(values)} modules (min {min(values)},"
            f" max {max(values)}); see {out / RANKS_PLOT}"
        )
    adapter = metrics["adapter"]
    where = out / (adapter["peft"] or adapter["increlora"])
    lines.append(f"  adapter ({adapter['selected']}, step {adapter['step']}): {where}")
    lines.append(f"  metrics: {out / METRICS}")
    return "\n".join(lines)
