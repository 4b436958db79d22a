"""``increlora report``: finished runs under a directory -> a markdown table and plots.

Runs that differ only in their seed form one row: the main metric of the exported adapter
(the best evaluation unless the run set select_best: false) and of the final step, as mean
+- sample standard deviation over seeds.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, read_json
from . import outputs as O
from .plots import plt


def collect(directory: Path) -> list[dict[str, Any]]:
    """metrics.json of every finished run below ``directory`` (sorted by path)."""
    return [read_json(p) for p in sorted(directory.rglob(O.METRICS))]


def _group_key(metrics: dict[str, Any]) -> str:
    config = json.loads(json.dumps(metrics["config"]))
    config["output_dir"] = None
    config["train"]["seed"] = None
    return json.dumps(config, sort_keys=True)


def _method_label(config: dict[str, Any]) -> str:
    method = config["method"]
    extra = [f"{k}={v}" for k, v in method.items() if k not in ("name", "target_rank")]
    if config["train"].get("learning_rate") is not None:
        extra.append(f"lr={config['train']['learning_rate']:g}")
    return method["name"] + (f" ({', '.join(extra)})" if extra else "")


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (runs that differ only in the seed)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for metrics in runs:
        groups[_group_key(metrics)].append(metrics)
    rows = []
    for members in groups.values():
        first = members[0]
        config, split, name = first["config"], first["eval_split"], first["main_metric"]
        adapter_steps = [m["adapter"]["step"] for m in members]
        selected = [
            m["best"]["value"]
            if m["adapter"]["selected"] == "best"
            else m["final"]["metrics"][split][name]
            for m in members
        ]
        rows.append(
            {
                "task": first["task"],
                "model": config["model"],
                "method": _method_label(config),
                "target_rank": config["method"].get("target_rank"),
                "train_size": config["data"].get("train_size"),
                "metric": name,
                "selected": selected,
                "final": [m["final"]["metrics"][split][name] for m in members],
                "seeds": sorted(m["seed"] for m in members),
                "trainable_params": statistics.fmean(m["trainable_params"] for m in members),
                "steps": first["total_steps"],
                "adapter_steps": adapter_steps,
                "wall_time_s": statistics.fmean(m["wall_time_s"] for m in members),
            }
        )
    rows.sort(key=lambda r: (r["task"], r["train_size"] or 0, r["target_rank"] or 0, r["method"]))
    return rows


def _rank(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| task | model | method | avg rank | train size | steps | metric | adapter (mean ± std)"
        " | final step | seeds | trainable params | time / run |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['task']} | {r['model']} | {r['method']} | {_rank(r['target_rank'])} |"
        f" {r['train_size'] or 'all'} | {r['steps']} | {r['metric']} | {_fmt(r['selected'])} |"
        f" {_fmt(r['final'])} | {len(r['seeds'])} | {r['trainable_params']:,.0f} |"
        f" {r['wall_time_s'] / 60:.1f} min |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def plot_task(rows: list[dict[str, Any]], task: str, path: Path) -> None:
    """Grouped bars: the adapter's metric per train size, one bar per method and rank."""
    rows = [r for r in rows if r["task"] == task]
    sizes = sorted({r["train_size"] or 0 for r in rows})
    series = sorted({(r["method"], r["target_rank"]) for r in rows}, key=str)
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(sizes) + 3), 3.6))
    for i, (method, rank) in enumerate(series):
        xs, means, stds = [], [], []
        for j, size in enumerate(sizes):
            hit = [
                r
                for r in rows
                if (r["method"], r["target_rank"], r["train_size"] or 0) == (method, rank, size)
            ]
            if hit:
                mean, std = _mean_std(hit[0]["selected"])
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                means.append(mean)
                stds.append(std or 0.0)
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=f"{method}, r={_rank(rank)}")
    ax.set_xticks(range(len(sizes)), [str(s or "all") for s in sizes])
    ax.set_xlabel("training examples")
    ax.set_ylabel(rows[0]["metric"])
    lows = [min(r["selected"]) for r in rows]
    ax.set_ylim(max(0.0, min(lows) - 0.1), None)
    ax.set_title(f"{task}: mean ± std over seeds", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(directory: str | Path, output: str | Path | None = None) -> Path:
    """Write the markdown report (and one plot per task next to it); returns its path."""
    directory = Path(directory)
    runs = collect(directory)
    if not runs:
        raise FileNotFoundError(f"{directory}: no finished runs (no {O.METRICS} below it)")
    rows = summarize(runs)
    output = Path(output) if output is not None else directory / "report.md"
    parts = [
        f"# Results in {directory}\n",
        f"{len(runs)} finished runs. 'adapter' is the main metric of the exported adapter"
        " (best evaluation unless select_best was off), 'final step' the metric at the end"
        " of training; ± is the sample standard deviation over seeds.\n",
        markdown(rows),
    ]
    for task in sorted({r["task"] for r in rows}):
        plot = output.parent / f"report_{task}.png"
        plot_task(rows, task, plot)
        parts.append(f"![{task}]({plot.name})\n")
    atomic_write_text(output, "\n".join(parts))
    return output
