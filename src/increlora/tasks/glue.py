"""GLUE loaders: the classic TSV folders of download_glue_data.py, or the datasets hub.

GLUE's test sets carry no labels, so evaluation uses the dev files ("validation" splits).
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from increlora.tasks.registry import Example, TaskSpec

HUB_DATASET = "nyu-mll/glue"
GLUE_DIR_ENV = "INCRELORA_GLUE_DIR"
"""A GLUE TSV root (download_glue_data.py layout) used when a GLUE run names no data_dir.

One setting for every run and benchmark spec: with it set, GLUE tasks read local TSV files;
unset, they come from the Hugging Face hub. Run configs stay the same either way, so a spec
runs unchanged for a user with the hub and for one with a local copy."""

Column = str | int
"""A column by header name, or by position (negative counts from the end)."""


@dataclass(frozen=True)
class TsvLayout:
    """Where text and label live in one GLUE task's train/dev TSV files."""

    dir_name: str
    text_columns: tuple[Column, ...]
    label_column: Column
    label_values: tuple[str, ...] | None  # file spelling of label ids 0..k-1; None = float
    has_header: bool = True
    num_fields: int | None = None  # header-less files only
    dev_files: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)


_BINARY = ("0", "1")

LAYOUTS: dict[str, TsvLayout] = {
    "sst2": TsvLayout("SST-2", ("sentence",), "label", _BINARY),
    # CoLA train/dev have no header: source, label, original label, sentence.
    "cola": TsvLayout("CoLA", (3,), 1, _BINARY, has_header=False, num_fields=4),
    "mrpc": TsvLayout("MRPC", ("#1 String", "#2 String"), "Quality", _BINARY),
    "rte": TsvLayout("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
    "qnli": TsvLayout("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment")),
    # STS-B and MNLI: the label is the last field (MNLI dev has label1..label5 before it).
    "stsb": TsvLayout("STS-B", ("sentence1", "sentence2"), -1, None),
    "qqp": TsvLayout("QQP", ("question1", "question2"), "is_duplicate", _BINARY),
    "mnli": TsvLayout(
        "MNLI",
        ("sentence1", "sentence2"),
        -1,
        ("entailment", "neutral", "contradiction"),
        dev_files=(
            ("validation_matched", "dev_matched.tsv"),
            ("validation_mismatched", "dev_mismatched.tsv"),
        ),
    ),
}


MAX_FIELD_CHARS = 1 << 24  # 16 M characters per field


class GlueFormatError(ValueError):
    """A GLUE TSV file does not have the expected layout."""


def find_task_dir(task: TaskSpec, data_dir: Path) -> Path:
    """The folder holding ``train.tsv``: ``data_dir`` itself or ``data_dir/<GLUE name>``."""
    layout = LAYOUTS[task.name]
    candidates = [data_dir, data_dir / layout.dir_name, data_dir / task.name]
    for candidate in candidates:
        if (candidate / "train.tsv").is_file():
            return candidate
    raise FileNotFoundError(
        f"{task.name}: no GLUE TSV file at {data_dir / 'train.tsv'} or "
        f"{data_dir / layout.dir_name / 'train.tsv'}; pass the folder written by "
        "download_glue_data.py (the GLUE root or its task folder)"
    )


def read_tsv(task: TaskSpec, path: Path) -> list[Example]:
    """Parse one GLUE train/dev TSV file into examples; errors name the file and line."""
    layout = LAYOUTS[task.name]
    if not path.is_file():
        raise FileNotFoundError(f"{task.name}: expected GLUE TSV file {path}")
    try:
        return _read_tsv(task, path, layout)
    except UnicodeDecodeError as err:
        raise GlueFormatError(
            f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start : err.start + 1]!r});"
            " GLUE TSV files are UTF-8: re-encode the file or point at the right folder"
        ) from None
    except csv.Error as err:
        raise GlueFormatError(f"{path}: not a readable TSV file ({err})") from None


def _read_tsv(task: TaskSpec, path: Path, layout: TsvLayout) -> list[Example]:
    examples: list[Example] = []
    # Long passages are text, not a malformed file: allow fields far beyond csv's 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    # utf-8-sig: MRPC's header starts with a byte-order mark. QUOTE_NONE: GLUE sentences
    # contain unbalanced quote characters that are text, not CSV quoting.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if layout.has_header:
            header = next(reader, None)
            if header is None:
                raise GlueFormatError(f"{path}: empty file, expected a header line")
            text_idx = [_column_index(c, header, path) for c in layout.text_columns]
            label_idx = _column_index(layout.label_column, header, path)
            num_fields = len(header)
        else:
            assert layout.num_fields is not None
            num_fields = layout.num_fields
            text_idx = [int(c) for c in layout.text_columns]
            label_idx = int(layout.label_column)
        # Only layouts that declare "the label is the last field" (-1) read it from the end.
        label_is_last = layout.label_column == -1
        for row in reader:
            if not row or row == [""]:
                continue
            where = f"{path} line {reader.line_num}"
            # A label read from the last field tolerates extra fields before it; any
            # other layout must match the header exactly or columns would shift silently.
            if len(row) != num_fields and not (label_is_last and len(row) > num_fields):
                raise GlueFormatError(
                    f"{where}: expected {num_fields} tab-separated fields, found {len(row)}"
                )
            texts = [row[i] for i in text_idx]
            label = _parse_label(row[-1 if label_is_last else label_idx], layout, where)
            examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
    if not examples:
        raise GlueFormatError(
            f"{path}: no examples (nothing but a header or blank lines); add one example per line"
        )
    return examples


def _column_index(column: Column, header: list[str], path: Path) -> int:
    if isinstance(column, int):
        return column if column >= 0 else len(header) + column
    try:
        return header.index(column)
    except ValueError:
        raise GlueFormatError(
            f"{path} line 1: header has no column {column!r}; found {header}"
        ) from None


def _parse_label(raw: str, layout: TsvLayout, where: str) -> int | float:
    value = raw.strip()
    if layout.label_values is None:
        try:
            return float(value)
        except ValueError:
            raise GlueFormatError(f"{where}: score {raw!r} is not a number") from None
    try:
        return layout.label_values.index(value)
    except ValueError:
        allowed = ", ".join(layout.label_values)
        raise GlueFormatError(f"{where}: label {raw!r} not in {{{allowed}}}") from None


def load_glue_tsv(
    task: TaskSpec, data_dir: Path
) -> tuple[list[Example], dict[str, list[Example]], dict[str, Any]]:
    """Train, dev splits and source record from a download_glue_data.py folder."""
    task_dir = find_task_dir(task, data_dir)
    layout = LAYOUTS[task.name]
    train = read_tsv(task, task_dir / "train.tsv")
    evals = {split: read_tsv(task, task_dir / name) for split, name in layout.dev_files}
    files = {"train": "train.tsv", **dict(layout.dev_files)}
    # The folder's own name, not its absolute path: run summaries are published, and the
    # checksums identify the data better than where it sat on one machine.
    sha256 = {split: _sha256(task_dir / name) for split, name in files.items()}
    source = {"kind": "glue_tsv", "dir": task_dir.name, "files": files, "sha256": sha256}
    return train, evals, source


def glue_dir_from_env() -> Path | None:
    """The folder named by ``INCRELORA_GLUE_DIR``, or None when it is unset or empty."""
    value = os.environ.get(GLUE_DIR_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{GLUE_DIR_ENV}={value}: no such folder; point it at the GLUE TSV root written by"
            " download_glue_data.py, or unset it to load GLUE from the Hugging Face hub"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_glue_hub(
    task: TaskSpec,
) -> tuple[list[Example], dict[str, list[Example]], dict[str, Any]]:
    """Train and dev splits from the Hugging Face hub (needs ``datasets`` and a network)."""
    hint = "or pass data_dir (--data-dir) with the GLUE TSV folder written by download_glue_data.py"
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"loading GLUE {task.name} from the hub needs `pip install 'increlora[datasets]'`, "
            + hint
        ) from exc
    try:
        dataset = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as exc:  # the hub raises many types (offline, auth, HTTP errors)
        raise RuntimeError(
            f"could not load {HUB_DATASET}/{task.name} from the Hugging Face hub ({exc}); " + hint
        ) from exc

    def convert(split: str) -> list[Example]:
        fields = task.text_fields
        return [
            Example(row[fields[0]], row[fields[1]] if len(fields) > 1 else None, row["label"])
            for row in dataset[split]
        ]

    train = convert("train")
    evals = {split: convert(split) for split in task.eval_splits}
    source = {"kind": "hub", "dataset": HUB_DATASET, "config": task.name}
    return train, evals, source
