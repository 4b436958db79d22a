"""LoRA-Mini (Singh et al. 2024, arXiv 2411.15804): train only the inner half of LoRA.

LoRA's ``B A`` is split into four matrices, of which only the two inner ones train:

    y = W0 x + (alpha / r) * B_out B_in A_in A_out x
    A_out: r_o x d_in, B_out: d_out x r_o  frozen, random;  A_in: r x r_o, B_in: r_o x r  trained

so a module trains ``2 r r_o`` parameters whatever its width. Details the paper leaves open,
chosen here and exposed as config fields: the outer width ``r_o`` (``outer_rank``, one value
for both sides, clamped to ``min(d_in, d_out)`` of each module), the random law of the frozen
outer matrices (``outer_init``: Kaiming-uniform like LoRA's A, or orthogonal), the scaling
``alpha / r`` (LoRA's, with the inner rank) and the inner init (A_in Kaiming-uniform, B_in
zero, so the update starts at zero as in LoRA). The update is a rank-``r`` product, exported
to PEFT as ``lora_A = A_in A_out`` and ``lora_B = s B_out B_in``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import AdapterConfig, option, require
from ..layers.lora_mini import LoRAMiniLayer
from .base import Method, register


@dataclass
class LoRAMiniConfig(AdapterConfig):
    """LoRA-Mini: trained inner rank ``r`` between frozen outer projections of width r_o."""

    r: int = option(8, "Inner rank: A_in is r x r_o and B_in is r_o x r (both trained).")
    outer_rank: int = option(
        128,
        "Width r_o of the frozen outer projections A_out (r_o x d_in) and B_out (d_out x r_o);"
        " clamped to min(d_in, d_out) per module. Must be >= r.",
    )
    outer_init: Literal["kaiming", "orthogonal"] = option(
        "kaiming", "Law of the frozen outer matrices: Kaiming-uniform (a = sqrt(5)) or orthogonal."
    )
    seed: int = option(0, "Seed of the frozen outer matrices (identical on every process).")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.r >= 1, "r", f"must be a positive integer, got {self.r}")
        require(
            self.outer_rank >= self.r,
            "outer_rank",
            f"must be >= r ({self.r}): the update's rank is at most outer_rank, got"
            f" {self.outer_rank}",
        )
        require(
            self.outer_init in ("kaiming", "orthogonal"),
            "outer_init",
            f"must be 'kaiming' or 'orthogonal', got {self.outer_init!r}",
        )


@register
class LoRAMini(Method):
    name = "lora-mini"
    config_class = LoRAMiniConfig
    peft_exportable = True
    size_field = "r"

    def build_layers(self, model: nn.Module, names: list[str]) -> dict[str, LoRAMiniLayer]:
        config: LoRAMiniConfig = self.config
        # One generator walked in module order: the frozen matrices depend only on the seed.
        generator = torch.Generator().manual_seed(config.seed)
        return {
            name: LoRAMiniLayer(
                model.get_submodule(name),
                r=config.r,
                outer_rank=config.outer_rank,
                alpha=config.alpha,
                dropout=config.dropout,
                outer_init=config.outer_init,
                generator=generator,
            )
            for name in names
        }
