"""Typed configuration shared by the Python API, YAML files and the CLI.

Every field carries ``help`` metadata so a command-line parser can be generated from the
dataclass, and ``__post_init__`` validates with errors that name the field and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and how to fix it."""


def option(default: Any = None, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with ``help`` metadata (read by the CLI and by documentation)."""
    if isinstance(default, list | dict):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def require(condition: bool, name: str, message: str) -> None:
    """Raise a ConfigError for field ``name`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{name}: {message}")


@dataclass
class AdapterConfig:
    """Fields every adapter method shares: which modules to adapt and what else trains."""

    target_modules: list[str] | str | None = option(
        None,
        "Modules to adapt: a list of exact names or name suffixes ('query', 'attention.self.value'),"
        " a regular expression matched against full names, 'all-linear', or None for the preset"
        " of the model's architecture (BERT, MPNet, DeBERTa-v2, Llama, GPT-2).",
    )
    exclude_modules: list[str] | str | None = option(
        None, "Modules never adapted (same matching rules as target_modules)."
    )
    modules_to_save: list[str] = option(
        [], "Extra modules trained in full and saved with the adapter, e.g. ['classifier']."
    )
    dropout: float = option(0.0, "Dropout on the adapter branch's input.")
    alpha: float = option(16.0, "Scaling numerator (LoRA's alpha).")

    def __post_init__(self) -> None:
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a plain dict, rejecting unknown keys with the list of valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(names)}"
            )
        return cls(**data)


Scaling = Literal["per_rank", "constant", "rescale"]
Importance = Literal["paper", "proxy"]
Init = Literal["paper", "lora"]
Storage = Literal["auto", "dynamic", "static"]


@dataclass
class IncreLoRAConfig(AdapterConfig):
    """IncreLoRA: triplet adapters that start at ``init_rank`` and grow to a budget.

    The budget is ``target_rank`` (average rank over adapted modules, the paper's setting) or
    ``target_params`` (trainable adapter parameters). Schedule fields left as None are derived
    from the run's total steps so that growth ends at ``growth_end_fraction`` of training.
    """

    target_rank: float | None = option(2.0, "Budget as the average rank per adapted module.")
    target_params: int | None = option(
        None, "Budget as a number of trainable adapter parameters (instead of target_rank)."
    )
    init_rank: int = option(1, "Active rank of every module at step 0 (r0).")
    max_rank: int | None = option(
        None,
        "Capacity per module: the most ranks it may reach. None: min(d_in, d_out, 8 x"
        " ceil(average target rank) + add_r (1 if unset)). Growth never exceeds it; memory"
        " scales with it only under storage='static'.",
    )
    init_warmup: int | None = option(None, "Optimizer steps before the first growth round.")
    interval: int | None = option(None, "Optimizer steps between growth rounds.")
    top_h: int | None = option(None, "Modules that gain rank in each round.")
    add_r: int | None = option(
        1,
        "Ranks each chosen module gains per round. None: derived with the schedule: 1, or more"
        " when the run is too short for rounds of one rank to reach the budget with at most half"
        " the modules winning each round (then the smallest add_r that keeps them competing; it"
        " tied add_r=1 at rank 8 in 48 steps, docs/results.md).",
    )
    growth_end_fraction: float = option(
        0.5, "When the schedule is derived: growth ends by this fraction of training."
    )
    advance_learning: bool = option(
        True, "Keep add_r (1 if unset) reserve ranks per module whose A/B train before activation."
    )
    restart_warmup_steps: int | None = option(
        None,
        "Newly activated parameters warm up from 0 to the peak lr the schedule has reached over"
        " this many steps,"
        " then decay linearly to 0 at the end of training. None: use interval. 0: disable.",
    )
    importance: Importance = option(
        "proxy",
        "Module score, from the task loss's gradient only (never the regularizer's): 'paper' ="
        " sum|dW * dL/d(dW)| / sqrt(d_out d_in), estimated from score_rows of the output rows;"
        " 'proxy' = sum of |p * grad p| over the module's active A, e, B.",
    )
    score_rows: float = option(
        0.125,
        "importance='paper': fraction of each module's output rows whose dL/d(dW) is computed"
        " per scored step (fresh random rows each step; the sum is scaled up, an unbiased"
        " estimate). The extra matmul costs this fraction of a dense one; 1.0 = exact.",
    )
    score_window: int | None = option(
        None, "Score only this many steps before each round (None: every step while growing)."
    )
    beta1: float = option(0.85, "EMA coefficient of the sensitivity.")
    beta2: float = option(0.85, "EMA coefficient of the uncertainty.")
    scaling: Scaling = option(
        "per_rank",
        "'per_rank': s = alpha / active_rank (original code; growth rescales every rank);"
        " 'constant': s = alpha / init_rank; 'rescale': per_rank, but e is rescaled at growth"
        " so the module's function does not jump.",
    )
    orth_reg_weight: float = option(0.1, "Weight gamma of the orthogonal regularizer.")
    init: Init = option(
        "paper",
        "'paper': A, B ~ N(0, init_std^2), e = 0 (the update grows like t^3 under Adam, so it"
        " needs a larger lr: 1e-2 in the benchmark); 'lora': A ~ LoRA's Kaiming-uniform, B = 0,"
        " e = init_e (its first step is LoRA's and it learns at LoRA's lr; a reserve rank's e"
        " and B are rebalanced at activation). Default 'paper' per the benchmark's validation"
        " scores (docs/results.md): tied at 500 mr examples (0.731 vs 0.731, 4 seeds), ahead at"
        " 1,000 (0.783 vs 0.740, 2 seeds).",
    )
    init_e: float = option(1.0, "init='lora': e of active ranks at the start and at activation.")
    init_std: float = option(0.02, "init='paper': std of the normal init of A and B.")
    new_rank_e: float = option(1e-5, "Initial (and reserve) value of e for new ranks.")
    seed: int = option(0, "Seed of the random init of new ranks (identical on every process).")
    storage: Storage = option(
        "auto",
        "'dynamic': each module's tensors hold the ranks in use and are re-allocated when it"
        " grows (memory follows the rank; DDP supported); 'static': every module holds"
        " max_rank rows from the start (needed by FSDP2, which shards parameters once);"
        " 'auto': static under FSDP (ACCELERATE_USE_FSDP set by accelerate / the HF Trainer),"
        " dynamic otherwise. Same math either way (docs/memory.md).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.storage in ("auto", "dynamic", "static"),
            "storage",
            f"must be 'auto', 'dynamic' or 'static', got {self.storage!r}",
        )
        require(
            (self.target_rank is None) != (self.target_params is None),
            "target_rank/target_params",
            "give exactly one budget: target_rank (average rank) or target_params",
        )
        if self.target_rank is not None:
            require(
                self.target_rank >= self.init_rank,
                "target_rank",
                f"must be >= init_rank ({self.init_rank}), got {self.target_rank}",
            )
        if self.target_params is not None:
            require(self.target_params > 0, "target_params", "must be positive")
        require(self.init_rank >= 1, "init_rank", f"must be >= 1, got {self.init_rank}")
        require(self.add_r is None or self.add_r >= 1, "add_r", f"must be >= 1, got {self.add_r}")
        for name in ("interval", "top_h"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be a positive integer, got {value}")
        require(
            self.init_warmup is None or self.init_warmup >= 0,
            "init_warmup",
            f"must be >= 0, got {self.init_warmup}",
        )
        require(
            self.max_rank is None or self.max_rank >= self.init_rank,
            "max_rank",
            f"must be >= init_rank ({self.init_rank}), got {self.max_rank}",
        )
        require(
            0.0 < self.growth_end_fraction <= 1.0,
            "growth_end_fraction",
            f"must be in (0, 1], got {self.growth_end_fraction}",
        )
        require(
            self.importance in ("paper", "proxy"),
            "importance",
            f"must be 'paper' or 'proxy', got {self.importance!r}",
        )
        require(
            self.scaling in ("per_rank", "constant", "rescale"),
            "scaling",
            f"must be 'per_rank', 'constant' or 'rescale', got {self.scaling!r}",
        )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")
        require(self.orth_reg_weight >= 0, "orth_reg_weight", "must be >= 0")
        require(
            self.restart_warmup_steps is None or self.restart_warmup_steps >= 0,
            "restart_warmup_steps",
            "must be >= 0",
        )
        require(self.score_window is None or self.score_window >= 1, "score_window", "must be >= 1")
        require(
            0.0 < self.score_rows <= 1.0,
            "score_rows",
            f"must be in (0, 1], got {self.score_rows}",
        )
        require(
            self.init in ("paper", "lora"), "init", f"must be 'paper' or 'lora', got {self.init!r}"
        )
        require(self.init_e != 0, "init_e", "must be nonzero (e = 0 is init='paper')")

    @property
    def build_add_r(self) -> int:
        """add_r where it must be known before the schedule is derived (capacity, reserve
        rows, a fully given schedule): the given value, or 1 when add_r=None."""
        return self.add_r or 1

    @property
    def resolved_storage(self) -> str:
        """'dynamic' or 'static' ('auto': static when accelerate / the HF Trainer set up FSDP)."""
        if self.storage != "auto":
            return self.storage
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower()
        return "static" if fsdp in ("1", "true", "yes") else "dynamic"

    @property
    def reserve_rank(self) -> int:
        """Reserve ranks kept per module while growing (advance learning)."""
        return self.build_add_r if self.advance_learning else 0
