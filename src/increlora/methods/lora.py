"""LoRA (Hu et al. 2021, arXiv 2106.09685): the same fixed rank ``r`` in every module.

    y = W0 x + (alpha / r) * B A dropout(x),   A: r x d_in,  B: d_out x r

Trainable parameters per module: ``r * (d_in + d_out)``. Layers are
:class:`~increlora.layers.lora.LoRALayer`; the update is exactly ``B @ A`` (PEFT-exportable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..config import AdapterConfig, option, require
from ..layers.lora import LoRALayer
from .base import Method, register


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: one rank ``r`` for every adapted module."""

    r: int = option(8, "Rank of every adapted module.")
    init: Literal["kaiming", "gaussian"] = option(
        "kaiming",
        "Init of A: 'kaiming' = Kaiming-uniform (a = sqrt(5), loralib/PEFT default);"
        " 'gaussian' = N(0, 1/r^2) (PEFT's init_lora_weights='gaussian'). B starts at 0.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.r >= 1, "r", f"must be a positive integer, got {self.r}")
        require(
            self.init in ("kaiming", "gaussian"),
            "init",
            f"must be 'kaiming' or 'gaussian', got {self.init!r}",
        )


@register
class LoRA(Method):
    name = "lora"
    config_class = LoRAConfig
    peft_exportable = True
    size_field = "r"

    def make_layer(self, name: str, base: nn.Module) -> LoRALayer:
        config: LoRAConfig = self.config
        return LoRALayer(
            base, r=config.r, alpha=config.alpha, dropout=config.dropout, init=config.init
        )
