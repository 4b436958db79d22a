"""The growth schedule: the budget, when rounds happen, and how each round is filled.

Rounds happen at optimizer steps ``t > init_warmup`` with ``t % interval == 0`` while the
budget is not reached. Each round gives ``add_r`` ranks to the ``top_h`` best-scored modules
(ties broken by module order), and the last round is partial so the total lands exactly on
a rank budget (or as close below a parameter budget as whole ranks allow).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import ConfigError, IncreLoRAConfig

MIN_DERIVED_INTERVAL = 10  # about the EMA window at beta = 0.85, so scores settle between rounds
SHORT_RUN_MIN_INTERVAL = 3  # short runs: more, smaller rounds (the EMA carries across rounds)
SHORT_RUN_ROUNDS = 8  # the rounds a short run aims for before the interval shrinks below 10
MAX_DERIVED_ADD_R = 8  # the most ranks a derived add_r gives one module in one round


def min_derived_interval(horizon: int) -> int:
    """The smallest gap between derived rounds for a growth horizon of ``horizon`` steps.

    Long runs keep 10 steps (the EMA's window, so scores settle between rounds). A short run
    (a 500-example run has ~24 steps of growth) would then get one round that gives every
    module +1 rank, i.e. uniform LoRA; instead it aims for ``SHORT_RUN_ROUNDS`` rounds,
    spaced at least 3 steps apart, so that modules compete for rank each round.
    """
    return max(SHORT_RUN_MIN_INTERVAL, min(MIN_DERIVED_INTERVAL, horizon // SHORT_RUN_ROUNDS))


@dataclass(frozen=True)
class ModuleSlot:
    """What the schedule needs to know of one adapted module."""

    name: str
    cost: int  # trainable parameters one active rank costs: d_in + d_out + 1
    capacity: int
    init_rank: int


@dataclass(frozen=True)
class GrowthPlan:
    init_warmup: int
    interval: int
    top_h: int
    add_r: int
    total_steps: int
    budget: int  # in ranks (unit == "rank") or parameters (unit == "param")
    unit: str
    planned_rounds: int  # rounds needed in the worst case
    n_modules: int = 0

    @property
    def uniform(self) -> bool:
        """True when every round grows every module: no module competes for rank, so the
        run is uniform LoRA in triplet form, whatever the scores say."""
        return self.planned_rounds > 0 and self.top_h >= self.n_modules

    def is_round(self, step: int) -> bool:
        return step > self.init_warmup and step % self.interval == 0

    def round_steps(self) -> list[int]:
        """Steps of the planned rounds (worst case), for logging and validation."""
        first = (self.init_warmup // self.interval + 1) * self.interval
        return [first + i * self.interval for i in range(self.planned_rounds)]

    def next_round_after(self, step: int) -> int:
        first = (self.init_warmup // self.interval + 1) * self.interval
        if step < first:
            return first
        return (step // self.interval + 1) * self.interval

    def to_dict(self) -> dict:
        return {**asdict(self), "uniform": self.uniform}


def _budget(config: IncreLoRAConfig, slots: list[ModuleSlot]) -> tuple[int, str]:
    if config.target_rank is not None:
        return int(round(config.target_rank * len(slots))), "rank"
    return int(config.target_params), "param"


def _usage(slots: list[ModuleSlot], ranks: list[int], unit: str) -> int:
    if unit == "rank":
        return sum(ranks)
    return sum(r * s.cost for r, s in zip(ranks, slots))


def _rounds_needed(missing: int, unit: str, slots: list[ModuleSlot], top_h: int, add_r: int) -> int:
    """Worst-case rounds: for a parameter budget assume growth goes to the cheapest module."""
    per_round = top_h * add_r * (1 if unit == "rank" else min(s.cost for s in slots))
    return max(0, math.ceil(missing / per_round))


def _last_round(init_warmup: int, interval: int, rounds: int) -> int:
    first = (init_warmup // interval + 1) * interval
    return first + (rounds - 1) * interval


def make_plan(config: IncreLoRAConfig, slots: list[ModuleSlot], total_steps: int) -> GrowthPlan:
    """Validate the budget and schedule against the model and run length, deriving gaps.

    Raises ConfigError naming the field and a value that would work when the budget cannot
    be held by the modules or reached before training ends.
    """
    if total_steps < 1:
        raise ConfigError(f"total_steps: must be >= 1, got {total_steps}")
    budget, unit = _budget(config, slots)
    initial = _usage(slots, [s.init_rank for s in slots], unit)
    full = _usage(slots, [s.capacity for s in slots], unit)
    field = "target_rank" if unit == "rank" else "target_params"
    if budget < initial:
        raise ConfigError(
            f"{field}: budget {budget} {unit}s is below the {initial} the rank-{config.init_rank}"
            f" start already uses; raise {field} or lower init_rank"
        )
    if budget > full:
        largest = min(max(s.capacity for s in slots), 10**9)
        raise ConfigError(
            f"{field}: budget {budget} {unit}s exceeds what the {len(slots)} modules can hold"
            f" ({full} at their capacities, max_rank up to {largest}); raise max_rank (at most"
            f" min(d_in, d_out) of each module) or lower {field}"
        )
    missing = budget - initial
    if config.top_h is not None and config.top_h > len(slots):
        raise ConfigError(f"top_h: {config.top_h} exceeds the {len(slots)} adapted modules")
    if config.interval is None or config.top_h is None or config.init_warmup is None:
        init_warmup, interval, top_h, add_r = _derive(config, slots, missing, unit, total_steps)
    else:
        init_warmup, interval, top_h = config.init_warmup, config.interval, config.top_h
        add_r = config.build_add_r
    rounds = _rounds_needed(missing, unit, slots, top_h, add_r)
    if rounds:
        last = _last_round(init_warmup, interval, rounds)
        if last >= total_steps:
            fit_top_h = next(
                (
                    h
                    for h in range(top_h, len(slots) + 1)
                    if _last_round(
                        init_warmup, interval, _rounds_needed(missing, unit, slots, h, add_r)
                    )
                    < total_steps
                ),
                None,
            )
            given = [
                f for f in ("init_warmup", "interval", "top_h") if getattr(config, f) is not None
            ]
            if given:
                hint = f"raise top_h to {fit_top_h}" if fit_top_h else "lower interval/init_warmup"
                fix = (
                    f"{hint}, lower interval or init_warmup, or train longer (or leave"
                    f" {'/'.join(given)} unset to derive {'it' if len(given) == 1 else 'them'})"
                )
            else:
                fix = f"train for at least {last + 1} steps, or lower {field}"
            raise ConfigError(
                f"schedule: reaching the budget ({missing} more {unit}s) needs {rounds} growth"
                f" rounds of top_h={top_h} x add_r={add_r}; with init_warmup={init_warmup} and"
                f" interval={interval} the last lands at step {last}, but training has only"
                f" {total_steps} steps. Fix: {fix}"
            )
    return GrowthPlan(
        init_warmup, interval, top_h, add_r, total_steps, budget, unit, rounds, len(slots)
    )


def _derive(
    config: IncreLoRAConfig, slots: list[ModuleSlot], missing: int, unit: str, total_steps: int
) -> tuple[int, int, int, int]:
    """Fill the schedule fields left unset from the ones the user set, so that growth ends by
    ``growth_end_fraction`` of training: the smallest top_h whose rounds fit, spaced at least
    ``min_derived_interval`` steps apart (unless interval is given); init_warmup = interval
    (the paper's setting) unless given, and a given init_warmup shortens the span left.

    ``add_r`` left unset is 1 unless rounds of one rank per module would have to grow more
    than half the modules each round to reach the budget in time (a rank-8 budget in a
    48-step run needs every module every round: uniform LoRA). Then each chosen module gains
    the smallest add_r that lets at most half the modules win a round, so that they still
    compete for rank. Returns (init_warmup, interval, top_h, add_r)."""
    if config.add_r is not None:
        return _derive_for(config, slots, missing, unit, total_steps, config.add_r, None)
    half = max(1, len(slots) // 2)
    if config.top_h is None:
        for add_r in range(1, MAX_DERIVED_ADD_R + 1):
            found = _derive_for(config, slots, missing, unit, total_steps, add_r, half)
            if found is not None:
                return found
    return _derive_for(config, slots, missing, unit, total_steps, 1, None)


def _derive_for(
    config: IncreLoRAConfig,
    slots: list[ModuleSlot],
    missing: int,
    unit: str,
    total_steps: int,
    add_r: int,
    max_top_h: int | None,
) -> tuple[int, int, int, int] | None:
    """``_derive`` at a fixed add_r. With ``max_top_h``, only top_h up to it are tried and
    None is returned when none fits; without, the last candidate is returned regardless."""
    horizon = max(2, int(config.growth_end_fraction * total_steps))
    min_interval = min_derived_interval(horizon)
    if config.top_h is not None:
        candidates = [config.top_h]
    else:
        candidates = range(1, min(len(slots), max_top_h or len(slots)) + 1)
    best = None
    for top_h in candidates:
        rounds = _rounds_needed(missing, unit, slots, top_h, add_r)
        if config.interval is not None:
            interval = config.interval
        elif config.init_warmup is not None:
            interval = max(1, (horizon - config.init_warmup) // max(rounds, 1))
        else:
            interval = max(1, horizon // (rounds + 1))
        init_warmup = config.init_warmup if config.init_warmup is not None else interval
        best = (init_warmup, interval, top_h, add_r)
        fits = rounds == 0 or _last_round(init_warmup, interval, rounds) <= horizon
        if fits and (interval >= min_interval or config.interval is not None):
            return best
    if max_top_h is not None:
        return None
    assert best is not None
    return best


def select_growth(
    scores: list[float],
    slots: list[ModuleSlot],
    ranks: list[int],
    plan: GrowthPlan,
) -> list[tuple[int, int]]:
    """One round: ``(module index, ranks to add)`` for the chosen modules.

    Modules are taken in order of decreasing score, ties by module index (deterministic on
    every process); full modules are skipped; the round never crosses the budget.
    """
    remaining = plan.budget - _usage(slots, ranks, plan.unit)
    order = sorted(range(len(slots)), key=lambda i: (-scores[i], i))
    chosen: list[tuple[int, int]] = []
    for i in order:
        if len(chosen) == plan.top_h or remaining <= 0:
            break
        unit_cost = 1 if plan.unit == "rank" else slots[i].cost
        add = min(plan.add_r, slots[i].capacity - ranks[i], remaining // unit_cost)
        if add > 0:
            chosen.append((i, add))
            remaining -= add * unit_cost
    return chosen


def budget_reached(slots: list[ModuleSlot], ranks: list[int], plan: GrowthPlan) -> bool:
    """True when no module can take one more rank within the budget."""
    remaining = plan.budget - _usage(slots, ranks, plan.unit)
    return not any(
        r < s.capacity and (1 if plan.unit == "rank" else s.cost) <= remaining
        for s, r in zip(slots, ranks)
    )
