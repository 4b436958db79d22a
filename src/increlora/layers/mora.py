"""The MoRA layer (Jiang et al. 2024, arXiv 2405.12130): one square matrix, high-rank update.

    y = W0 x + f_decomp(M f_comp(dropout(x))),   M: r_hat x r_hat (trained, starts at 0)

The compression and decompression have no parameters. The input is padded to
``n_in * r_hat`` entries by wrapping around (``x_pad[p] = x[p mod d_in]``, as the official
code pads with the first entries) and cut into ``n_in = ceil(d_in / r_hat)`` blocks:

* ``sharing`` (the paper's Eq. 6, official ``mora_type=1``): the blocks are summed,
  ``M`` maps the r_hat-vector, and output entry ``o`` reads entry ``o mod r_hat``;
* ``rotation`` (the paper's Eq. 9, official ``mora_type=6``): block ``b`` is rotated like
  RoPE at position ``b`` (frequencies ``10000^(-2j / r_hat)``), ``M`` maps every block
  separately, the blocks are concatenated and output entry ``o`` reads entry
  ``o mod (n_in * r_hat)``. The update is block-diagonal in ``M R_b``, so its rank can reach
  ``min(d_in, d_out)``; r_hat must be even.

Both are fixed linear maps, so the dense update (merge) is the operator applied to the
identity. The update is not a low-rank product: not exportable to PEFT LoRA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterLayer


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MoRALayer(AdapterLayer):
    """MoRA with the ``sharing`` or ``rotation`` compression around a square ``lora_M``."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r_hat: int,
        variant: str = "sharing",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base_layer)
        if variant == "rotation" and r_hat % 2:
            raise ValueError(f"the rotation variant needs an even r_hat, got {r_hat}")
        self.r_hat = r_hat
        self.variant = variant
        self.n_in = math.ceil(self.in_features / r_hat)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_M = nn.Parameter(torch.zeros(r_hat, r_hat, device=device))
        # Index maps and rotation tables are derived from the shape: never saved.
        padded = torch.arange(self.n_in * r_hat) % self.in_features
        width = r_hat if variant == "sharing" else self.n_in * r_hat
        self.register_buffer("in_index", padded.to(device), persistent=False)
        self.register_buffer(
            "out_index", (torch.arange(self.out_features) % width).to(device), persistent=False
        )
        if variant == "rotation":
            inv_freq = 1.0 / (10000 ** (torch.arange(0, r_hat, 2).float() / r_hat))
            angles = torch.outer(torch.arange(self.n_in).float(), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)  # (n_in, r_hat)
            self.register_buffer("cos", angles.cos().to(device), persistent=False)
            self.register_buffer("sin", angles.sin().to(device), persistent=False)

    def _operator(self, x: torch.Tensor) -> torch.Tensor:
        """``f_decomp(M f_comp(x))`` for ``x`` in the adapter's dtype."""
        blocks = x.index_select(-1, self.in_index).unflatten(-1, (self.n_in, self.r_hat))
        if self.variant == "sharing":
            h = blocks.sum(dim=-2) @ self.lora_M.T
        else:
            cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
            rotated = blocks * cos + _rotate_half(blocks) * sin
            h = (rotated @ self.lora_M.T).flatten(-2)
        return h.index_select(-1, self.out_index)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._operator(self.dropout(x.to(self.lora_M.dtype)))

    def delta_weight(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self.lora_M.dtype, device=self.lora_M.device)
        return self._operator(eye).T  # row i of operator(I) is column i of delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_hat={self.r_hat}, variant={self.variant}"
