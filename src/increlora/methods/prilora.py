"""PRILoRA (Benedek & Wolf 2024, EACL Findings, arXiv 2401.11316): rank rising with depth,
and ongoing pruning of A.

Ranks: the adapted modules are grouped by depth (the transformer block they sit in); with L
depths, the modules at depth ``l`` (0-based) get LoRA rank::

    r_l = round(r_start + (r_end - r_start) * l / (L - 1))      (half rounds up)

e.g. 4 -> 12 over DeBERTaV3-base's 12 layers, 8 on average. Every module is plain LoRA,
``y = W0 x + (alpha / r_l) B A x``. Pruning: during training each layer keeps an EMA ``xbar``
of the L2 norm of each input feature; at scheduled steps every row of A loses its
``prune_fraction`` entries of lowest ``|A_ij| * xbar_j`` (zeroed; A stays dense, so the
adapter exports to plain PEFT LoRA). Layers: :mod:`increlora.layers.prilora`; schedule:
:mod:`increlora.allocation.prilora`.

Choices where the paper leaves room (each a config field):

* The size is given either as ``target_rank`` (the average rank; ``r_start``/``r_end`` are
  then ``2 t / (1 + rank_ratio)`` and ``rank_ratio`` times that, the paper's 4 -> 12 for 8)
  or as explicit ``r_start`` and ``r_end``.
* Depth = index of the module's block, the dotted-name prefix up to its first numeric part
  (``...layer.3``), in module order; a module without one is its own block (``lin0``). A
  single depth gets the average ``(r_start + r_end) / 2``.
* ``prune_fraction`` 0.5 per row, ``prune_interval`` a tenth of training, plus a final
  pruning after the last step; ``input_beta`` 0.9; pruned entries may train back until the
  next pruning (the importance uses the weights' current magnitude).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..allocation.prilora import PRILoRAController
from ..config import AdapterConfig, ConfigError, option, require
from ..layers.base import base_shape
from ..layers.prilora import PRILoRALayer
from .base import Method, register

PRUNINGS_PER_RUN = 10  # derived prune_interval: a tenth of training
DEFAULT_AVERAGE_RANK = 8.0  # the paper's 4 -> 12


@dataclass
class PRILoRAConfig(AdapterConfig):
    """PRILoRA: LoRA ranks rising linearly with depth, A pruned by |A| x input norm."""

    target_rank: float | None = option(
        None,
        "Average rank; r_start / r_end follow from rank_ratio. None: r_start and r_end if"
        " given, else 8 (the paper's 4 -> 12).",
    )
    rank_ratio: float = option(3.0, "r_end / r_start when derived from target_rank (paper 12/4).")
    r_start: float | None = option(None, "Rank of the first block (with r_end, no target_rank).")
    r_end: float | None = option(None, "Rank of the last block (with r_start, no target_rank).")
    prune_fraction: float = option(0.5, "Fraction of each row of A zeroed at every pruning.")
    prune_interval: int | None = option(
        None, "Optimizer steps between prunings. None: a tenth of the run's total steps."
    )
    input_beta: float = option(0.9, "EMA coefficient of the per-feature input norms.")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            (self.r_start is None) == (self.r_end is None),
            "r_start/r_end",
            "give both (or neither, to use target_rank)",
        )
        require(
            self.target_rank is None or self.r_start is None,
            "target_rank/r_start/r_end",
            "give either target_rank (the average rank) or r_start and r_end, not both",
        )
        if self.r_start is not None:
            require(
                1 <= self.r_start <= self.r_end,
                "r_start/r_end",
                f"need 1 <= r_start <= r_end, got {self.r_start} and {self.r_end}",
            )
        if self.target_rank is not None:
            require(self.target_rank > 0, "target_rank", f"must be > 0, got {self.target_rank}")
        require(self.rank_ratio >= 1, "rank_ratio", f"must be >= 1, got {self.rank_ratio}")
        require(
            0.0 <= self.prune_fraction < 1.0,
            "prune_fraction",
            f"must be in [0, 1), got {self.prune_fraction}",
        )
        require(
            self.prune_interval is None or self.prune_interval >= 1,
            "prune_interval",
            f"must be >= 1, got {self.prune_interval}",
        )
        require(
            0.0 <= self.input_beta < 1.0, "input_beta", f"must be in [0, 1), got {self.input_beta}"
        )

    def rank_range(self) -> tuple[float, float]:
        """``(r_start, r_end)``, explicit or derived from ``target_rank``."""
        if self.r_start is not None:
            return float(self.r_start), float(self.r_end)
        average = DEFAULT_AVERAGE_RANK if self.target_rank is None else self.target_rank
        start = 2 * average / (1 + self.rank_ratio)
        return start, self.rank_ratio * start


def block_depths(names: list[str]) -> list[int]:
    """Depth of each module: the index of its block among the blocks, in module order."""

    def block(name: str) -> str:
        parts = name.split(".")
        digit = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        return name if digit is None else ".".join(parts[: digit + 1])

    order = {b: i for i, b in enumerate(dict.fromkeys(block(n) for n in names))}
    return [order[block(n)] for n in names]


def linear_ranks(depths: list[int], r_start: float, r_end: float) -> list[int]:
    """``round_half_up(r_start + (r_end - r_start) * l / (L - 1))`` per module, at least 1."""
    last = max(depths)
    ranks = []
    for depth in depths:
        position = depth / last if last > 0 else 0.5
        ranks.append(max(1, math.floor(r_start + (r_end - r_start) * position + 0.5)))
    return ranks


@register
class PRILoRA(Method):
    name = "prilora"
    config_class = PRILoRAConfig
    peft_exportable = True
    size_field = "target_rank"

    def build_layers(self, model: nn.Module, names: list[str]) -> dict[str, PRILoRALayer]:
        config: PRILoRAConfig = self.config
        ranks = linear_ranks(block_depths(names), *config.rank_range())
        layers = {}
        for name, rank in zip(names, ranks):
            base = model.get_submodule(name)
            if rank > min(base_shape(base)):
                raise ConfigError(
                    f"target_rank/r_end: rank {rank} of {name} exceeds its min(d_in, d_out) ="
                    f" {min(base_shape(base))}; lower the ranks"
                )
            layers[name] = PRILoRALayer(
                base,
                r=rank,
                alpha=config.alpha,
                dropout=config.dropout,
                input_beta=config.input_beta,
            )
        return layers

    def make_controller(
        self, layers: dict[str, Any], optimizer: Any, total_steps: int
    ) -> PRILoRAController:
        config: PRILoRAConfig = self.config
        if total_steps < 1:
            raise ConfigError(f"total_steps: must be >= 1, got {total_steps}")
        interval = config.prune_interval or max(1, total_steps // PRUNINGS_PER_RUN)
        return PRILoRAController(
            layers, optimizer, total_steps, fraction=config.prune_fraction, interval=interval
        )
