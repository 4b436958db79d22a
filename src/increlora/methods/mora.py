"""MoRA (Jiang et al. 2024, arXiv 2405.12130): a square trainable matrix for a high-rank update.

    y = W0 x + f_decomp(M f_comp(x)),   M: r_hat x r_hat, initialised to zero

``f_comp`` / ``f_decomp`` are parameter-free (see :mod:`increlora.layers.mora` for the
``sharing`` and ``rotation`` variants). For the parameter count of LoRA at rank ``r`` the
paper sets ``r_hat = floor(sqrt((d_in + d_out) r))`` per module (the official code rounds to
nearest instead; we follow the paper); the rotation variant then takes the even number
below. ``r`` may be fractional, so budget matching can aim between two integer ranks.

Choices where the paper is silent: the update is not scaled (``alpha`` is unused, as in the
official code, whose MoRA scaling is 1); when r_hat exceeds d_in the wrap-around padding
repeats the input as often as needed (the official code assumes one wrap suffices).
The update has high rank, so it is not exportable to PEFT LoRA; merging works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..config import AdapterConfig, ConfigError, option, require
from ..layers.base import base_shape
from ..layers.mora import MoRALayer
from .base import Method, register


@dataclass
class MoRAConfig(AdapterConfig):
    """MoRA: one r_hat x r_hat matrix per module, sized like LoRA at rank ``r``."""

    r: float | None = option(
        8.0,
        "LoRA-equivalent rank: r_hat = floor(sqrt((d_in + d_out) * r)) per module (may be"
        " fractional). Give r or r_hat, not both.",
    )
    r_hat: int | None = option(None, "Fixed side of the square matrix M for every module.")
    variant: Literal["sharing", "rotation"] = option(
        "sharing",
        "'sharing': sum the input blocks, repeat the output (paper Eq. 6, official type 1);"
        " 'rotation': RoPE-rotate each input block, M per block (paper Eq. 9, official type 6).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            (self.r is None) != (self.r_hat is None),
            "r/r_hat",
            "give exactly one: r (LoRA-equivalent rank) or r_hat (side of M)",
        )
        require(self.r is None or self.r > 0, "r", f"must be positive, got {self.r}")
        require(self.r_hat is None or self.r_hat >= 1, "r_hat", f"must be >= 1, got {self.r_hat}")
        require(
            self.variant in ("sharing", "rotation"),
            "variant",
            f"must be 'sharing' or 'rotation', got {self.variant!r}",
        )
        require(
            self.variant != "rotation" or self.r_hat is None or self.r_hat % 2 == 0,
            "r_hat",
            f"the rotation variant rotates pairs of entries: r_hat must be even, got {self.r_hat}",
        )

    def square_side(self, d_out: int, d_in: int) -> int:
        """r_hat of a (d_out x d_in) module: fixed, or from the LoRA-equivalent rank."""
        if self.r_hat is not None:
            return self.r_hat
        side = math.isqrt(math.floor((d_in + d_out) * self.r))
        return side - side % 2 if self.variant == "rotation" else side


@register
class MoRA(Method):
    name = "mora"
    config_class = MoRAConfig
    size_field = "r"

    @classmethod
    def size_grid(cls, config: MoRAConfig) -> list[float]:
        # Eighths of a rank: fine enough to land near any budget, coarse enough to search.
        return [k / 8 for k in range(1, 8 << 12)]

    def build_layers(self, model: nn.Module, names: list[str]) -> dict[str, MoRALayer]:
        config: MoRAConfig = self.config
        layers = {}
        for name in names:
            base = model.get_submodule(name)
            r_hat = config.square_side(*base_shape(base))
            if r_hat < (2 if config.variant == "rotation" else 1):
                raise ConfigError(
                    f"r: {config.r} gives {name} an empty square matrix (r_hat = {r_hat}); raise r"
                )
            layers[name] = MoRALayer(
                base, r_hat=r_hat, variant=config.variant, dropout=config.dropout
            )
        return layers
