"""Parameter budgets: count what a method trains, and size a method to a budget.

    count_parameters("melora", MELoRAConfig(r=8, n=4), model)  # exact; model untouched
    config = match_budget("mora", model, average_rank=8)        # MoRA sized like LoRA r=8

Counts are taken by injecting the method into a copy of the model whose tensors live on the
meta device (no memory, no data copied); a method whose setup must read real weights falls
back to a deep copy. Counts exclude ``modules_to_save`` and count shared tensors once.
A LoRA-equivalent average rank ``r`` is the budget ``r * sum(d_in + d_out)`` over the
targeted modules (what LoRA at rank r trains).

Methods take part through three hooks of :class:`~increlora.methods.base.Method`:
``size_field`` (the config field to set), ``size_grid`` (its valid values, increasing) and
``budget_parameters`` (the count a configured method amounts to).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .adapter import inject
from .config import AdapterConfig, ConfigError
from .injection import find_targets
from .layers.base import base_shape
from .methods.base import get_method

TOLERANCE = 0.05  # a match lands within 5% of the target


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors (no data)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def count_parameters(method_name: str, config: AdapterConfig, model: nn.Module) -> int:
    """Exact trainable adapter parameters of ``method_name`` with ``config`` on ``model``."""
    method = get_method(method_name)
    config = dataclasses.replace(config, modules_to_save=[])
    try:
        adapted = inject(_meta_copy(model), config, method=method.name)
    except (RuntimeError, NotImplementedError):  # setup that reads weights cannot run on meta
        adapted = inject(copy.deepcopy(model), config, method=method.name)
    return adapted.method.budget_parameters(adapted)


def lora_equivalent_parameters(model: nn.Module, config: AdapterConfig, average_rank: float) -> int:
    """``average_rank * sum(d_in + d_out)`` over the modules ``config`` targets."""
    shapes = [base_shape(model.get_submodule(n)) for n in find_targets(model, config)]
    return round(average_rank * sum(d_out + d_in for d_out, d_in in shapes))


def _bracket(
    grid: Sequence[float], count: Callable[[float], int | None], target: int
) -> dict[int, int | None]:
    """Probe ``grid`` to bracket ``target``; returns {index: count or None if invalid}.

    Counts grow with the index. Invalid values (ConfigError) are assumed to sit at either end
    of the grid: below the first valid one (too small) or after the last (too large).
    Exponential probing finds a high-side index, bisection the boundary next to it.
    """
    probes: dict[int, int | None] = {}

    def high_side(i: int, low_valid: bool) -> bool:
        probes[i] = count(grid[i])
        c = probes[i]
        return c >= target if c is not None else low_valid

    low, high, i = -1, len(grid), 0
    while i < len(grid):
        if high_side(i, low >= 0 and probes[low] is not None):
            high = i
            break
        low, i = i, 2 * i + 1
    while high - low > 1:
        mid = (low + high) // 2
        if high_side(mid, low >= 0 and probes[low] is not None):
            high = mid
        else:
            low = mid
    return {i: probes[i] for i in (low, high) if i in probes}


def match_budget(
    method_name: str,
    model: nn.Module,
    target_params: int | None = None,
    average_rank: float | None = None,
    base_config: AdapterConfig | None = None,
) -> AdapterConfig:
    """``base_config`` with the method's size field set so its count is within 5% of a target.

    Give ``target_params`` (trainable adapter parameters) or ``average_rank`` (a LoRA rank:
    the target is what LoRA at that rank trains on the same modules). Raises ConfigError,
    naming the closest achievable count, when no size lands within 5%.
    """
    method = get_method(method_name)
    if method.size_field is None:
        raise ConfigError(
            f"method {method.name!r} cannot be budget-matched: it has no size hyper-parameter"
            " (its Method class sets no size_field)"
        )
    if (target_params is None) == (average_rank is None):
        raise ConfigError("target_params/average_rank: give exactly one budget")
    base = base_config if base_config is not None else method.config_class()
    if not isinstance(base, method.config_class):
        raise ConfigError(
            f"base_config: method {method.name!r} needs a {method.config_class.__name__}, got"
            f" {type(base).__name__}"
        )
    target = (
        target_params
        if target_params is not None
        else lora_equivalent_parameters(model, base, average_rank)
    )
    if target <= 0:
        raise ConfigError(f"target_params: must be positive, got {target}")
    field = method.size_field
    errors: list[str] = []

    def count(value: float) -> int | None:
        try:
            return count_parameters(method.name, dataclasses.replace(base, **{field: value}), model)
        except ConfigError as err:
            errors.append(str(err))
            return None

    grid = method.size_grid(base)
    probes = _bracket(grid, count, target)
    valid = {i: c for i, c in probes.items() if c is not None}
    if not valid:
        raise ConfigError(
            f"{method.name}: no valid {field} found for this model; first error: {errors[:1]}"
        )
    best = min(valid, key=lambda i: (abs(valid[i] - target), i))
    if abs(valid[best] - target) > TOLERANCE * target:
        closest = ", ".join(
            f"{field}={grid[i]} gives {c} ({c / target - 1:+.1%})"
            for i, c in itertools.islice(sorted(valid.items()), 2)
        )
        raise ConfigError(
            f"{method.name}: no {field} lands within {TOLERANCE:.0%} of {target} trainable"
            f" parameters; closest: {closest}. Change another size field of base_config"
            " (e.g. LoRA-Mini's outer_rank, MELoRA's n) or the target"
        )
    return dataclasses.replace(base, **{field: grid[best]})
