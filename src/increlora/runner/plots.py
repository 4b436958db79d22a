"""Rank plots: the final rank per layer x module type (the paper's heatmap) and its history."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

_LAYER = re.compile(r"^(?:(.*)\.)?(\d+)\.(.+)$")


def split_module_name(name: str) -> tuple[int, str]:
    """``'bert.encoder.layer.3.attention.self.query'`` -> ``(3, 'attention.self.query')``."""
    match = _LAYER.match(name)
    if match is None:
        return 0, name
    return int(match.group(2)), match.group(3)


def short_labels(types: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each module type that no other type ends with."""
    labels = {}
    for t in types:
        parts = t.split(".")
        label = t
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o != t and (o == suffix or o.endswith("." + suffix)) for o in types):
                label = suffix
                break
        labels[t] = label
    return labels


def _grid(ranks: dict[str, int]) -> tuple[list[int], list[str], np.ndarray]:
    cells = {split_module_name(n): r for n, r in ranks.items()}
    layers = sorted({layer for layer, _ in cells})
    types = list(dict.fromkeys(t for _, t in cells))
    grid = np.full((len(types), len(layers)), np.nan)
    for (layer, kind), rank in cells.items():
        grid[types.index(kind), layers.index(layer)] = rank
    return layers, types, grid


def plot_ranks(ranks: dict[str, int], path: Path, title: str) -> None:
    """Heatmap of the final rank: layers on x, module types on y, the rank in every cell."""
    layers, types, grid = _grid(ranks)
    labels = short_labels(types)
    fig, ax = plt.subplots(
        figsize=(max(5.0, 0.45 * len(layers) + 3.0), max(3.0, 0.45 * len(types) + 1.6))
    )
    image = ax.imshow(grid, cmap="YlGnBu", aspect="auto", vmin=0)
    high = np.nanmax(grid) if np.isfinite(grid).any() else 0
    for y in range(grid.shape[0]):
        for x in range(grid.shape[1]):
            if np.isfinite(grid[y, x]):
                value = int(grid[y, x])
                color = "white" if value > 0.6 * high else "black"
                ax.text(x, y, str(value), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_yticks(range(len(types)), [labels[t] for t in types])
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(image, ax=ax, label="rank", fraction=0.04, pad=0.02)
    bar.locator = MaxNLocator(integer=True)  # ranks are whole numbers
    bar.update_ticks()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rank_history(
    initial: dict[str, int], events: list[dict[str, Any]]
) -> tuple[list[int], dict[str, list[int]]]:
    """Steps and each module's rank after every event (events carry ``grown`` entries)."""
    current = dict(initial)
    steps = [0]
    history = {n: [r] for n, r in current.items()}
    for event in sorted(events, key=lambda e: e["step"]):
        for change in event.get("grown", []):
            current[change["module"]] = int(change["rank"])
        steps.append(int(event["step"]))
        for n in history:
            history[n].append(current[n])
    return steps, history


def plot_allocation(
    initial: dict[str, int],
    events: list[dict[str, Any]],
    total_steps: int,
    path: Path,
    title: str,
    budget: int | None = None,
) -> None:
    """Stacked total rank per module type over training (each growth round is a step up)."""
    steps, history = rank_history(initial, events)
    types = list(dict.fromkeys(split_module_name(n)[1] for n in history))
    labels = short_labels(types)
    per_type = [
        np.sum([history[n] for n in history if split_module_name(n)[1] == t], axis=0) for t in types
    ]
    x = np.array([*steps, total_steps])
    ys = [np.append(series, series[-1]) for series in per_type]
    fig, ax = plt.subplots(figsize=(8.0, 3.6))
    ax.stackplot(x, *ys, labels=[labels[t] for t in types], step="post", alpha=0.85)
    if budget is not None:
        ax.axhline(budget, color="black", linestyle="--", linewidth=1, label="budget")
    ax.set_xlim(0, max(total_steps, 1))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("total active rank")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
