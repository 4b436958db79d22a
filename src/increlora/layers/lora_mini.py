"""The LoRA-Mini layer (Singh et al. 2024, arXiv 2411.15804): LoRA's factors split in four.

    y = W0 x + (alpha / r) * B_out B_in A_in A_out dropout(x)

    A_out: r_o x d_in   (frozen, random)      A_in: r x r_o   (trained, Kaiming-uniform)
    B_out: d_out x r_o  (frozen, random)      B_in: r_o x r   (trained, zero)

Only the inner matrices train: ``2 * r * r_o`` parameters per module, independent of the
module's width. The frozen outer matrices are buffers (saved with the adapter so a reload
is exact) drawn from a seeded generator, so every process of a distributed run holds the
same ones. The update is the rank-``r`` product ``(s B_out B_in) @ (A_in A_out)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterLayer


def _frozen_projection(
    rows: int, cols: int, init: str, generator: torch.Generator | None
) -> torch.Tensor:
    """A random ``rows x cols`` matrix: Kaiming-uniform (fan_in = cols) or orthogonal."""
    weight = torch.empty(rows, cols)
    if init == "orthogonal":
        nn.init.orthogonal_(weight, generator=generator)
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight


class LoRAMiniLayer(AdapterLayer):
    """LoRA-Mini: ``delta = s * B_out @ B_in @ A_in @ A_out`` with ``s = alpha / r``."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        outer_rank: int,
        alpha: float,
        dropout: float = 0.0,
        outer_init: str = "kaiming",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base_layer)
        # Outer ranks beyond min(d_in, d_out) add no expressiveness, only parameters.
        self.outer_rank = min(outer_rank, self.in_features, self.out_features)
        self.r = r
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        r_o = self.outer_rank
        a_out = _frozen_projection(r_o, self.in_features, outer_init, generator)
        b_out = _frozen_projection(self.out_features, r_o, outer_init, generator)
        self.register_buffer("lora_A_out", a_out.to(device))
        self.register_buffer("lora_B_out", b_out.to(device))
        self.lora_A_in = nn.Parameter(torch.empty(r, r_o, device=device))
        self.lora_B_in = nn.Parameter(torch.zeros(r_o, r, device=device))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A_in, a=math.sqrt(5))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_A_in.dtype
        h = self.dropout(x.to(dtype)) @ self.lora_A_out.to(dtype).T
        h = (h @ self.lora_A_in.T) @ self.lora_B_in.T
        return (h @ self.lora_B_out.to(dtype).T) * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.lora_A_in.dtype
        a = self.lora_A_in @ self.lora_A_out.to(dtype)
        b = (self.lora_B_out.to(dtype) @ self.lora_B_in) * self.scaling
        return a, b

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_factors()
        return b @ a

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained inner matrices and the frozen outer ones (a reload must be exact)."""
        return {
            **super().adapter_state(),
            "lora_A_out": self.lora_A_out,
            "lora_B_out": self.lora_B_out,
        }

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor], rank_state: dict) -> None:
        self.lora_A_out.copy_(tensors["lora_A_out"])
        self.lora_B_out.copy_(tensors["lora_B_out"])
        self.lora_A_in.copy_(tensors["lora_A_in"])
        self.lora_B_in.copy_(tensors["lora_B_in"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, outer_rank={self.outer_rank}"
