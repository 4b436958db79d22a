"""MELoRA (Ren et al. 2024, arXiv 2402.17263): a mini-ensemble of n LoRAs on a block diagonal.

    delta = s * diag(B_1 A_1, ..., B_n A_n),  mini-LoRA i: input slice i -> output slice i

Each mini-LoRA has rank ``r / n``; the equivalent rank is ``r`` and a module trains
``r (d_in + d_out) / n`` parameters (n times fewer than LoRA at the same rank). ``r`` must be
a multiple of ``n`` and every adapted module's d_in and d_out divisible by ``n``.

Detail the paper leaves open, exposed as a field: the scaling ``s``, ``alpha / r`` with the
equivalent rank (``scaling_rank='equivalent'``, comparable to LoRA at the same r) or
``alpha / (r / n)`` with the mini rank (``'mini'``, each block scaled like a LoRA of its own
rank). Layers are :class:`~increlora.layers.melora.MELoRALayer`; the update is exactly
``blockdiag(s B_i) @ blockdiag(A_i)``, a rank-r product (PEFT-exportable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..config import AdapterConfig, ConfigError, option, require
from ..layers.base import base_shape
from ..layers.melora import MELoRALayer
from .base import Method, register


@dataclass
class MELoRAConfig(AdapterConfig):
    """MELoRA: ``n`` mini-LoRAs of rank ``r / n`` per module (equivalent rank ``r``)."""

    r: int = option(8, "Equivalent rank: the sum of the n mini-LoRAs' ranks (multiple of n).")
    n: int = option(2, "Number of mini-LoRAs; d_in and d_out of every module must divide by n.")
    scaling_rank: Literal["equivalent", "mini"] = option(
        "equivalent", "Scaling alpha / r ('equivalent') or alpha / (r / n) ('mini')."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.n >= 1, "n", f"must be a positive integer, got {self.n}")
        require(
            self.r >= self.n and self.r % self.n == 0,
            "r",
            f"must be a positive multiple of n = {self.n} (each mini-LoRA has rank r / n),"
            f" got {self.r}",
        )
        require(
            self.scaling_rank in ("equivalent", "mini"),
            "scaling_rank",
            f"must be 'equivalent' or 'mini', got {self.scaling_rank!r}",
        )


@register
class MELoRA(Method):
    name = "melora"
    config_class = MELoRAConfig
    peft_exportable = True
    size_field = "r"

    @classmethod
    def size_grid(cls, config: MELoRAConfig) -> range:
        return range(config.n, config.n << 20, config.n)

    def build_layers(self, model: nn.Module, names: list[str]) -> dict[str, MELoRALayer]:
        config: MELoRAConfig = self.config
        bases = {name: model.get_submodule(name) for name in names}
        uneven = [
            f"{name} {base_shape(b)[1]}->{base_shape(b)[0]}"
            for name, b in bases.items()
            if any(d % config.n for d in base_shape(b))
        ]
        if uneven:
            raise ConfigError(
                f"n: {config.n} mini-LoRAs need d_in and d_out divisible by {config.n}, but"
                f" {len(uneven)} module(s) are not: {uneven[:4]}; pick n dividing every width"
                " or exclude those modules"
            )
        mini_rank = config.r // config.n
        scale_rank = config.r if config.scaling_rank == "equivalent" else mini_rank
        return {
            name: MELoRALayer(
                base,
                n=config.n,
                mini_rank=mini_rank,
                scaling=config.alpha / scale_rank,
                dropout=config.dropout,
            )
            for name, base in bases.items()
        }
