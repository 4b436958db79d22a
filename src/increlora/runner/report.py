"""``increlora report``: finished runs -> the benchmark report (markdown tables and plots).

It follows the protocol of docs/benchmark.md. Every run reports the main metric of its
exported adapter (the best evaluation on the *validation* split) on validation and, where
the run had one, on the *test* split. Runs are grouped into cells (bench, task, model, train
size, rank); within a cell, one row per method and learning rate, mean ± sample std over
seeds. Where a method ran at several learning rates, the one with the best mean validation
score is marked as chosen (test scores are never used to choose). Methods compared on the
same seeds get a paired table: the per-seed test differences of IncreLoRA variants against
LoRA and AdaLoRA, so a reader sees whether a gap exceeds seed noise.

A directory holding several benches (``results/<bench>/...``) gets one section per bench; a
``VERDICT.md`` in it is put at the top of the report. :func:`save_summaries` copies the small
per-run files (``metrics.json``, ``run_config.json``; no weights) from ``runs/`` into such a
directory, so the report regenerates from the repository alone.
"""

from __future__ import annotations

import shutil
import statistics
import zlib
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, read_json
from . import outputs as O
from .plots import plt
from .stats import MARGIN, MIN_SEEDS, paired_interval, t_interval

VERDICT = "VERDICT.md"
REFERENCES = ("lora", "adalora")  # what IncreLoRA variants are compared with, paired by seed


@dataclass(frozen=True)
class RunResult:
    """What the report needs of one finished run."""

    bench: str
    task: str
    model: str
    train_size: int | None
    target_rank: float | None
    method: str  # the bench label (e.g. inc-lora) or the method name
    learning_rate: float
    seed: int
    metric: str
    validation: float
    test: float | None
    trainable_params: int
    wall_time_s: float
    steps: int
    uniform_allocation: bool
    base_test: float | None = None  # causal LM: the base model (adapters off) on test
    constant: float | None = None  # validation score of always predicting the train majority
    init: str | None = None  # IncreLoRA's initialisation (paper / lora), where recorded
    adapter_params: int | None = None  # without the task head (recorded since the GLUE study)

    @property
    def cell(self) -> tuple:
        return (self.bench, self.task, self.model, self.train_size or 0, self.target_rank or 0)


def _label(config: dict[str, Any]) -> str:
    """The bench's method label (``.../method=<label>/...``) or the method name."""
    for part in Path(str(config.get("output_dir") or "")).parts:
        if part.startswith("method="):
            return part.removeprefix("method=")
    return str(config["method"]["name"])


def _bench_name(path: Path, root: Path) -> str:
    """The path below ``root`` up to the first ``axis=value`` folder ('' for a bench dir)."""
    parts = []
    for part in path.relative_to(root).parent.parts:
        if "=" in part:
            break
        parts.append(part)
    return "/".join(parts)


def _test_split(metrics: dict[str, Any], selection: str) -> str | None:
    splits = [s for s in metrics if s != selection and s.startswith("test")]
    return splits[0] if splits else None


def load_run(path: Path, root: Path) -> RunResult:
    m = read_json(path)
    config, name, selection = m["config"], m["main_metric"], m["eval_split"]
    chosen = m["best"] if m["adapter"]["selected"] == "best" else m["final"]
    metrics = chosen["metrics"]
    test_split = _test_split(metrics, selection)
    plan = (m.get("resolved") or {}).get("plan") or {}
    return RunResult(
        bench=_bench_name(path, root),
        task=m["task"],
        model=str(config["model"]),
        train_size=config["data"].get("train_size"),
        target_rank=config["method"].get("target_rank"),
        method=_label(config),
        learning_rate=float(m["resolved"]["learning_rate"]),
        seed=int(m["seed"]),
        metric=name,
        validation=float(metrics[selection][name]),
        test=None if test_split is None else float(metrics[test_split][name]),
        trainable_params=int(m["trainable_params"]),
        wall_time_s=float(m["wall_time_s"]),
        steps=int(m["total_steps"]),
        uniform_allocation=bool(plan.get("uniform", False)),
        base_test=_base_test(m, test_split),
        constant=((m.get("constant_baseline") or {}).get("scores") or {}).get(selection),
        init=((m.get("resolved") or {}).get("method_config") or {}).get("init"),
        adapter_params=m.get("adapter_params"),
    )


def display_name(run: RunResult) -> str:
    """The name a report shows: a bench label, except that a bare ``increlora`` label names
    its initialisation (``increlora-paperinit`` / ``increlora-lorainit``). Benches used the
    bare label for different inits (the LoRA init on mr, the paper init on QASC), which one
    figure or one reader cannot tell apart. Learning-rate choice (benchmarks/protocol.py)
    keeps the bench labels, which the specs refer to."""
    if run.method == "increlora" and run.init in ("paper", "lora"):
        return f"increlora-{run.init}init"
    return run.method


def _base_test(metrics: dict[str, Any], test_split: str | None) -> float | None:
    base = (metrics.get("base_model") or {}).get("metrics") or {}
    if test_split is None or test_split not in base:
        return None
    return float(base[test_split][metrics["main_metric"]])


def collect(directory: Path) -> list[RunResult]:
    """Every finished run below ``directory`` (a run is finished when metrics.json exists)."""
    return [load_run(p, directory) for p in sorted(directory.rglob(O.METRICS))]


def _copy_summaries(source: Path, destination: Path, only_missing: bool) -> int:
    """Copy run_config.json and metrics.json of every finished run below ``source`` to the
    same relative paths below ``destination`` (``only_missing``: runs not finished there)."""
    count = 0
    for metrics in sorted(source.rglob(O.METRICS)):
        target = destination / metrics.parent.relative_to(source)
        if only_missing and (
            (target / O.METRICS).is_file() or not (metrics.parent / O.RUN_CONFIG).is_file()
        ):
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in (O.RUN_CONFIG, O.METRICS):  # metrics.json last: it marks a finished run
            if (metrics.parent / name).is_file():
                shutil.copyfile(metrics.parent / name, target / name)
        count += 1
    return count


def save_summaries(runs_dir: str | Path, destination: str | Path) -> int:
    """Copy metrics.json and run_config.json of every finished run (same relative paths)."""
    return _copy_summaries(Path(runs_dir), Path(destination), only_missing=False)


def restore_summaries(summaries_dir: str | Path, runs_dir: str | Path) -> int:
    """The reverse of save_summaries: seed a runs directory from committed summaries.

    Only runs that ``runs_dir`` does not already hold as finished are copied, so a fresh clone
    resumes a benchmark from ``results/`` instead of re-running what already finished there.
    """
    if not Path(summaries_dir).is_dir():
        return 0
    return _copy_summaries(Path(summaries_dir), Path(runs_dir), only_missing=True)


# ------------------------------------------------------------------------ statistics
def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


@dataclass
class Row:
    """One method at one learning rate in one cell, over its seeds."""

    method: str
    learning_rate: float
    runs: list[RunResult]

    @property
    def validation(self) -> list[float]:
        return [r.validation for r in self.runs]

    @property
    def test(self) -> list[float]:
        return [r.test for r in self.runs if r.test is not None]

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    def by_seed(self) -> dict[int, RunResult]:
        return {r.seed: r for r in self.runs}

    @property
    def learned_nothing(self) -> bool:
        """Every run scored no better on validation than always predicting one class (known
        for runs that recorded their constant baseline)."""
        return self.seeds_at_majority == len(self.runs)

    @property
    def seeds_at_majority(self) -> int:
        """Runs that scored no better on validation than the constant baseline they recorded."""
        return sum(r.constant is not None and r.validation <= r.constant for r in self.runs)


def cell_rows(runs: list[RunResult]) -> list[Row]:
    groups: dict[tuple[str, float], list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[(run.method, run.learning_rate)].append(run)
    return [Row(m, lr, rs) for (m, lr), rs in sorted(groups.items())]


def chosen_rows(rows: list[Row]) -> dict[str, Row]:
    """Per method, the learning rate with the best mean validation score."""
    best: dict[str, Row] = {}
    for row in rows:
        current = best.get(row.method)
        if current is None or statistics.fmean(row.validation) > statistics.fmean(
            current.validation
        ):
            best[row.method] = row
    return best


def at_grid_edge(learning_rate: float, tried: list[float]) -> bool:
    """The chosen rate is the smallest or largest of a grid of three or more: the grid may
    understate the method (two rates have no inside to speak of)."""
    return len(set(tried)) > 2 and learning_rate in (min(tried), max(tried))


def _references(name: str) -> tuple[str, ...]:
    """What a method is paired with: IncreLoRA variants with LoRA and AdaLoRA; a PEFT
    reference with our implementation of the same method (an implementation check)."""
    if name.startswith("inc") or name == "increlora":
        return REFERENCES
    if name.startswith("peft-"):
        return (name.removeprefix("peft-"),)
    return ()


def paired(rows: dict[str, Row]) -> list[dict[str, Any]]:
    """IncreLoRA variants vs each reference (PEFT references vs ours), test differences on
    the seeds both ran."""
    out = []
    for name, row in sorted(rows.items()):
        for ref in _references(name):
            other = rows.get(ref)
            if other is None:
                continue
            mine, theirs = row.by_seed(), other.by_seed()
            seeds = sorted(s for s in set(mine) & set(theirs) if mine[s].test is not None)
            if not seeds:
                continue
            diffs = [mine[s].test - theirs[s].test for s in seeds]
            out.append({"method": name, "reference": ref, "seeds": seeds, "diffs": diffs})
    return out


# -------------------------------------------------------------------------- markdown
def _cell_title(cell: tuple) -> str:
    _, task, model, size, rank = cell
    return f"{task}, {size or 'all'} training examples, {model}, average rank {rank:g}"


def _adapter_params(row: Row, reference: Row | None) -> str:
    """Mean adapter parameters (no task head) and the gap to LoRA's in the same cell."""
    counts = [r.adapter_params for r in row.runs]
    if any(c is None for c in counts):
        return "not recorded"
    mean = statistics.fmean(counts)
    ref = [r.adapter_params for r in reference.runs] if reference is not None else []
    if reference is None or reference is row or any(c is None for c in ref):
        return f"{mean:,.0f}"
    return f"{mean:,.0f} ({mean / statistics.fmean(ref) - 1:+.1%})"


def cell_markdown(cell: tuple, runs: list[RunResult], sweep: bool = False) -> str:
    rows = cell_rows(runs)
    chosen = chosen_rows(rows)
    several = {m for m in chosen if sum(r.method == m for r in rows) > 1}
    metric, steps = runs[0].metric, runs[0].steps
    lora = chosen.get("lora")
    lines = [
        f"### {_cell_title(cell)}\n",
        f"{steps} optimizer steps; {metric} of the adapter picked on validation;"
        " ± is the sample std over seeds. Adapter params: trainable parameters without the"
        " task head, with the gap to LoRA's.\n",
        "| method | lr | seeds | validation | test | adapter params | trainable params |"
        " time / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    any_edge = False
    for row in rows:
        mark = ""
        if row.method in several and chosen[row.method] is row:
            tried = [r.learning_rate for r in rows if r.method == row.method]
            edge = at_grid_edge(row.learning_rate, tried)
            any_edge = any_edge or edge
            mark = " (best here; grid edge ⚠)" if edge else " (best here)"
        uniform = " ⚠ uniform" if any(r.uniform_allocation for r in row.runs) else ""
        if row.learned_nothing:
            uniform += " ⚠ majority class"
        elif row.seeds_at_majority:
            uniform += f" ⚠ majority class on {row.seeds_at_majority} of {len(row.runs)} seeds"
        params = statistics.fmean(r.trainable_params for r in row.runs)
        wall = statistics.fmean(r.wall_time_s for r in row.runs) / 60
        lines.append(
            f"| {row.method}{uniform} | {row.learning_rate:g}{mark} |"
            f" {','.join(map(str, row.seeds))} | {fmt(row.validation)} | {fmt(row.test)} |"
            f" {_adapter_params(row, lora)} | {params:,.0f} | {wall:.1f} min |"
        )
    if several:
        lines += [
            "",
            "(best here): the best mean validation score in this table. The rate a final bench"
            " used is chosen over every sweep of its cell (seeds 0 and, where run, a second"
            " sweep seed) and is the one its own table lists.",
        ]
    if any_edge:
        lines += [
            "",
            "grid edge ⚠: the best rate here is the smallest or largest tried; the grid may"
            " understate that method (extend it one step to check).",
        ]
    if any(row.seeds_at_majority for row in rows):
        lines += [
            "",
            "⚠ majority class: on validation, no better than always predicting the training"
            " set's most common class (the run's recorded constant baseline); \"on k of n"
            " seeds\": the row's mean and std include those collapsed runs.",
        ]
    base = [r.base_test for r in runs if r.base_test is not None]
    if base:
        lines += [
            "",
            f"The base model (adapters off) scores {fmt(sorted(set(base)))} test {metric} on"
            f" the same examples (measured by {len(base)} run{'s' if len(base) > 1 else ''}).",
        ]
    pairs = [] if sweep else paired(chosen)
    if pairs:
        lines += [
            "",
            "Paired by seed (test score difference, method minus reference), with the 95%"
            " t-interval and paired bootstrap interval of the mean and the decision rule's word"
            f" (docs/benchmark.md: their union against 0 and ±{MARGIN:g}; fewer than"
            f" {MIN_SEEDS} seeds: preliminary):\n",
            "| method | vs | seeds | per-seed differences | mean ± std | 95% t | 95% bootstrap"
            " | word |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in pairs:
            diffs = ", ".join(f"{d:+.3f}" for d in p["diffs"])
            result = paired_interval(p["diffs"])
            lines.append(
                f"| {p['method']} | {p['reference']} | {','.join(map(str, p['seeds']))} |"
                f" {diffs} | {fmt_signed(p['diffs'])} | {_interval(result.t_interval)} |"
                f" {_interval(result.bootstrap_interval)} | {result.label} |"
            )
    return "\n".join(lines) + "\n"


def fmt_signed(values: list[float], digits: int = 3) -> str:
    """``fmt`` with an explicit sign on the mean (a difference reads +0.004, not 0.004)."""
    mean, std = mean_std(values)
    text = f"{mean:+.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def _interval(interval: tuple[float, float] | None) -> str:
    return "-" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def cells(runs: list[RunResult]) -> dict[tuple, list[RunResult]]:
    grouped: dict[tuple, list[RunResult]] = defaultdict(list)
    for run in runs:
        grouped[run.cell].append(run)
    return dict(sorted(grouped.items(), key=lambda kv: tuple(str(x) for x in kv[0])))


# ----------------------------------------------------------------------------- plots
HEADLINE = ("increlora", "lora", "adalora", "full")
"""Methods drawn with solid lines; the rest of a wide matrix is drawn thin and dashed."""
_COLORS = [plt.get_cmap("tab20")(i) for i in (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5, 7, 9)]
_MARKERS = "osD^v<>pPX*hH8d"


KNOWN_METHODS = (
    "lora",
    "increlora-paper",
    "increlora-paperinit",
    "increlora-defaults",
    "increlora-lorainit",
    "adalora",
    "full",
    "sora",
    "prilora",
    "melora",
    "mora",
    "lorta",
    "lora-mini",
    "peft-lora",
    "peft-adalora",
)
"""Methods with a fixed colour and marker in every figure of every report."""


def style_of(method: str) -> dict[str, Any]:
    """The one colour and marker of a method, the same in every figure: a known method by
    its place in KNOWN_METHODS, any other label by a checksum of its name."""
    if method in KNOWN_METHODS:
        i = KNOWN_METHODS.index(method)
    else:
        i = len(KNOWN_METHODS) + zlib.crc32(method.encode()) % 97
    return {
        "color": _COLORS[i % len(_COLORS)],
        "marker": _MARKERS[i % len(_MARKERS)],
        "headline": method.startswith(HEADLINE),
    }


def _styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    return {method: style_of(method) for method in methods}


def half_width(values: list[float]) -> float:
    """Half the 95% t-interval of the mean (0 for one value): the plots' error bars."""
    interval = t_interval(values)
    return 0.0 if interval is None else (interval[1] - interval[0]) / 2


def _series_name(method: str, model: str, rank: float, variants: int) -> str:
    """A method's series; with several models or ranks in one task, each gets its own line
    (points of rank 2 and rank 8 at one train size are different systems)."""
    return method if variants == 1 else f"{method} ({model}, r{rank:g})"


def plot_bench(runs: list[RunResult], path: Path) -> bool:
    """Per task: test score vs train size (each method at its chosen lr), and test score vs
    trainable parameters (validation scores where runs had no test split)."""
    by_task: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_task[run.task].append(run)
    if not by_task:
        return False
    split = "test" if all(r.test is not None for r in runs) else "validation"
    styles = _styles(sorted({r.method for r in runs}))
    fig, axes = plt.subplots(len(by_task), 2, figsize=(12, 3.6 * len(by_task)), squeeze=False)
    for (task, task_runs), (ax_size, ax_params) in zip(sorted(by_task.items()), axes):
        variants = len({(r.model, r.target_rank) for r in task_runs})
        series: dict[tuple, list[tuple[int, float, float, float, float]]] = defaultdict(list)
        for cell, cell_runs in cells(task_runs).items():
            _, _, model, size, rank = cell
            for method, row in chosen_rows(cell_rows(cell_runs)).items():
                values = row.test if split == "test" else row.validation
                mean, std = statistics.fmean(values), half_width(values)
                params = statistics.fmean(r.trainable_params for r in row.runs)
                key = (method, _series_name(method, model, rank, variants), rank)
                validation = statistics.fmean(row.validation)
                series[key].append((size, mean, std or 0.0, params, validation))
        sizes = sorted({p[0] for points in series.values() for p in points})
        for (method, name, rank), points in sorted(series.items()):
            points.sort()
            style = styles[method]
            # Rank by fill: filled marks rank 2 (or the only rank), hollow marks rank 8.
            fill = style["color"] if rank in (0, 2) or variants == 1 else "none"
            ax_params.scatter(
                [p[3] for p in points], [p[1] for p in points], facecolors=fill,
                edgecolors=style["color"], marker=style["marker"], label=name,
            )  # fmt: skip
            if len(sizes) == 1:
                continue
            line = "-" if style["headline"] else "--"
            line = line if rank in (0, 2) or variants == 1 else ":"
            # Two benches of one method at one size (other rates): the line goes through the
            # one validation prefers, as the protocol would choose; the other is a hollow mark.
            best = {
                p[0]: max((q for q in points if q[0] == p[0]), key=lambda q: q[4]) for p in points
            }
            others = [p for p in points if p is not best[p[0]]]
            ax_size.scatter(
                [p[0] for p in others], [p[1] for p in others], marker=style["marker"],
                facecolors="none", edgecolors=style["color"], s=30,
            )  # fmt: skip
            points = sorted(best.values())
            ax_size.errorbar(
                [p[0] for p in points], [p[1] for p in points], [p[2] for p in points],
                color=style["color"], marker=style["marker"], linestyle=line, capsize=3,
                linewidth=1.8 if style["headline"] else 0.9, markersize=5, label=name,
                markerfacecolor=fill,
            )  # fmt: skip
        ylabel = f"{split} {task_runs[0].metric} (bars: 95% interval of the mean)"
        if len(sizes) == 1:  # one size: a ranked chart of the methods instead of a stack
            ranked = sorted(series.items(), key=lambda kv: kv[1][0][1])
            for y, ((method, _name, _), [(_, mean, std, _, _)]) in enumerate(ranked):
                style = styles[method]
                ax_size.errorbar(
                    mean, y, xerr=std, color=style["color"], marker=style["marker"],
                    capsize=3, markersize=6,
                )  # fmt: skip
            ax_size.set_yticks(range(len(ranked)), [kv[0][1] for kv in ranked], fontsize=8)
            ax_size.set_xlabel(ylabel)
            ax_size.grid(axis="x", alpha=0.3)
            ax_size.set_title(f"{task}: {split} score at {sizes[0]:,} examples", fontsize=10)
        else:
            ax_size.set_xscale("log")
            ax_size.set_xticks(sizes, [f"{s:,}" for s in sizes])
            ax_size.minorticks_off()
            ax_size.set_xlabel("training examples")
            ax_size.set_ylabel(ylabel)
            ax_size.set_title(f"{task}: {split} score vs train size", fontsize=10)
        params = [p[3] for points in series.values() for p in points]
        if max(params) >= 10 * min(params):
            ax_params.set_xscale("log")
        else:  # a log axis over less than a decade prints overlapping minor labels
            ax_params.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax_params.set_xlabel("trainable parameters")
        rank_key = " (filled: rank 2, hollow: rank 8)" if variants > 1 else ""
        ax_params.set_title(f"{task}: {split} score vs trainable parameters{rank_key}", fontsize=9)
        ax_params.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def is_sweep(runs: list[RunResult]) -> bool:
    """Some method ran at several learning rates in one cell: a learning-rate sweep."""
    return any(
        len({r.learning_rate for r in cell_runs if r.method == method}) > 1
        for cell_runs in cells(runs).values()
        for method in {r.method for r in cell_runs}
    )


def plot_sweep(runs: list[RunResult], path: Path) -> bool:
    """One panel per cell: mean validation score against learning rate per method (the curve
    the choice is made on), the best rate here ringed, the majority-class floor dashed where
    the runs recorded it."""
    grouped = cells(runs)
    if not grouped:
        return False
    styles = _styles(sorted({r.method for r in runs}))
    columns = min(2, len(grouped))
    rows = -(-len(grouped) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (cell, cell_runs) in zip(axes.flat, grouped.items()):
        table = cell_rows(cell_runs)
        chosen = chosen_rows(table)
        for method in sorted({row.method for row in table}):
            curve = sorted(
                (row.learning_rate, statistics.fmean(row.validation))
                for row in table
                if row.method == method
            )
            style = styles[method]
            ax.plot(
                [lr for lr, _ in curve], [v for _, v in curve], color=style["color"],
                marker=style["marker"], linestyle="-" if len(curve) > 1 else "none", label=method,
            )  # fmt: skip
            best = chosen[method]
            ax.scatter(
                [best.learning_rate], [statistics.fmean(best.validation)], s=140,
                facecolors="none", edgecolors=style["color"], linewidths=1.5,
            )  # fmt: skip
        floors = [r.constant for r in cell_runs if r.constant is not None]
        if floors:  # one validation set per cell: every run records the same floor
            ax.axhline(max(floors), color="grey", linestyle="--", linewidth=0.8)
        rates = sorted({row.learning_rate for row in table})
        ax.set_xscale("log")
        ax.set_xticks(rates, [f"{lr:g}" for lr in rates], fontsize=7, rotation=45)
        ax.minorticks_off()
        floor_key = "; dashed: majority class" if floors else ""
        ax.set_xlabel(f"learning rate (ringed: best here{floor_key})")
        ax.set_ylabel(f"validation {cell_runs[0].metric}")
        ax.set_title(_cell_title(cell), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    for ax in list(axes.flat)[len(grouped) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- write
def _cost(runs: list[RunResult]) -> str:
    """What a bench cost: its runs' summed wall time (the spec's duration, pauses included)."""
    total = sum(r.wall_time_s for r in runs) / 60
    hours = f" ({total / 60:.1f} h)" if total >= 90 else ""
    return (
        f"{len(runs)} runs, {total:.0f} minutes{hours} of run wall time in all (the sum of the"
        " runs' wall_time_s, on whatever machine ran them).\n"
    )


def _bench_order(name: str) -> tuple[int, str]:
    """The GLUE study first, then the short-training study's headline benches (core*), then
    ablations, then sweeps and the rest."""
    leaf = name.rsplit("/", 1)[-1]
    if name.startswith("glue/"):
        return (0 if not leaf.startswith("sweep") else 4), name
    rank = 1 if leaf.startswith("core") else 2 if leaf.startswith("ablation") else 3
    return rank, name


def decision_table(by_bench: dict[str, list[RunResult]]) -> str:
    """Every paired comparison of the final benches, worded by the decision rule."""
    lines = [
        "## Every comparison, by the decision rule\n",
        "Test score of each IncreLoRA variant minus LoRA's and AdaLoRA's, paired by seed, at"
        " each method's chosen rate; the 95% interval is the union of the t-interval and the"
        f" paired bootstrap (docs/benchmark.md); the margin is ±{MARGIN:g}. With fewer than"
        f" {MIN_SEEDS} seeds a word is preliminary.\n",
        "| bench | cell | method | vs | seeds | mean | 95% interval | word |",
        "|---|---|---|---|---|---|---|---|",
    ]
    found = False
    for bench, bench_runs in sorted(by_bench.items(), key=lambda kv: _bench_order(kv[0])):
        if is_sweep(bench_runs) or bench.rsplit("/", 1)[-1].startswith("sweep"):
            continue
        for cell, cell_runs in cells(bench_runs).items():
            _, task, model, size, rank = cell
            where = f"{task}, {size or 'all'} ex., {model}, r{rank:g}"
            for p in paired(chosen_rows(cell_rows(cell_runs))):
                if p["method"].startswith("peft-"):
                    continue
                result = paired_interval(p["diffs"])
                found = True
                lines.append(
                    f"| {bench} | {where} | {p['method']} | {p['reference']} | {result.n} |"
                    f" {result.mean:+.3f} | {_interval(result.union)} | {result.label} |"
                )
    return "\n".join(lines) + "\n" if found else ""


def write_report(directory: str | Path, output: str | Path | None = None) -> Path:
    """Write the markdown report (and one plot per bench next to it); returns its path."""
    directory = Path(directory)
    runs = [replace(run, method=display_name(run)) for run in collect(directory)]
    if not runs:
        raise FileNotFoundError(f"{directory}: no finished runs (no {O.METRICS} below it)")
    output = Path(output) if output is not None else directory / "report.md"
    figures = output.parent / f"{output.stem}_figures"  # every plot in one folder
    figures.mkdir(parents=True, exist_ok=True)
    parts = []
    verdict = directory / VERDICT
    if verdict.is_file():
        parts.append(verdict.read_text(encoding="utf-8").rstrip() + "\n")
    else:
        parts.append(f"# Results in {directory}\n")
    parts.append(
        f"Generated by `increlora report {directory}` from {len(runs)} finished runs"
        " (protocol: docs/benchmark.md).\n"
    )
    by_bench: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_bench[run.bench].append(run)
    parts.append(decision_table(by_bench))
    core = [r for r in runs if r.bench.startswith("core")]
    if core:  # the headline benches, all sizes in one figure
        plot = figures / f"{output.stem}_core.png"
        if plot_bench(core, plot):
            parts.append(f"![core benches: every size]({figures.name}/{plot.name})\n")
    appendix_path = output.parent / f"{output.stem}_sweeps{output.suffix or '.md'}"
    appendix = [
        f"# Learning-rate sweeps behind {output.name}\n",
        f"Generated by `increlora report {directory}` with {output.name}. Validation scores"
        " choose each method's rate (docs/benchmark.md); test scores of sweep runs are shown"
        " but never used to choose.\n",
    ]
    for bench, bench_runs in sorted(by_bench.items(), key=lambda kv: _bench_order(kv[0])):
        name = bench or directory.name
        # A bench named sweep* is one even before its second rate has finished.
        sweep = is_sweep(bench_runs) or name.rsplit("/", 1)[-1].startswith("sweep")
        target = appendix if sweep else parts
        target.append(f"## {name}\n")
        target.append(_cost(bench_runs))
        for cell, cell_runs in cells(bench_runs).items():
            target.append(cell_markdown(cell, cell_runs, sweep=sweep))
        plot = figures / f"{output.stem}_{name.replace('/', '_')}.png"
        if (plot_sweep if sweep else plot_bench)(bench_runs, plot):
            target.append(f"![{name}]({figures.name}/{plot.name})\n")
    if len(appendix) > 2:
        parts.append(
            f"The learning-rate sweeps behind these benches are in [{appendix_path.name}]"
            f"({appendix_path.name}).\n"
        )
        atomic_write_text(appendix_path, "\n".join(appendix))
    atomic_write_text(output, "\n".join(parts))
    return output
