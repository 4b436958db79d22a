"""The LoRTA layer (Hounie et al. 2024, arXiv 2410.04060): one CP tensor for every update.

All adapted matrices read one set of CP factors of CP rank ``R`` (held by
:class:`LoRTAFactors`):

    A: R x d (model side)      B: R x d_h (inside a head block)
    C_block: n_blocks x R      C_layer: L x R      C_matrix: M x R

Each matrix has a model side of width ``d`` (the hidden size) and a head side cut into blocks
of ``d_h`` (attention heads). Matrix ``m`` of layer ``l`` gets, in head block ``h``,

    delta[h] = s * sum_k C_block[h, k] C_layer[l, k] C_matrix[m, k] * b_k a_k^T

(``b_k a_k^T`` oriented head side x model side), with ``s = alpha / R``. The update of one
matrix is a product of rank <= R, computed factored: ``(x A^T) * c_h`` then ``B`` per block.

The factors are parameters of one :class:`LoRTAFactors` module, registered as a child of
the first ("owner") layer only; the other layers keep a plain reference to it, so the
factors are counted, optimized and saved exactly once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterLayer


class LoRTAFactors(nn.Module):
    """The shared CP factors: A (R x d), B (R x d_h) and the three mode factors."""

    def __init__(
        self,
        *,
        rank: int,
        hidden_size: int,
        block_size: int,
        n_blocks: int,
        n_layers: int,
        n_matrices: int,
        factor_init: str = "kaiming",
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, hidden_size, device=device))
        self.lora_B = nn.Parameter(torch.zeros(rank, block_size, device=device))
        self.lora_C_block = nn.Parameter(torch.empty(n_blocks, rank, device=device))
        self.lora_C_layer = nn.Parameter(torch.empty(n_layers, rank, device=device))
        self.lora_C_matrix = nn.Parameter(torch.empty(n_matrices, rank, device=device))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            for c in (self.lora_C_block, self.lora_C_layer, self.lora_C_matrix):
                if factor_init == "ones":
                    nn.init.ones_(c)
                else:
                    nn.init.kaiming_uniform_(c, a=math.sqrt(5))

    def coefficients(self, layer: int, matrix: int, n_blocks: int) -> torch.Tensor:
        """``C_block[h, k] C_layer[layer, k] C_matrix[matrix, k]`` for the first n_blocks."""
        return self.lora_C_block[:n_blocks] * (
            self.lora_C_layer[layer] * self.lora_C_matrix[matrix]
        )


class LoRTALayer(AdapterLayer):
    """One matrix's slice of the shared CP tensor (layer ``layer``, matrix type ``matrix``)."""

    shared: LoRTAFactors

    def __init__(
        self,
        base_layer: nn.Module,
        factors: LoRTAFactors,
        *,
        owner: bool,
        layer: int,
        matrix: int,
        heads_on_input: bool,
        block_size: int,
        scaling: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base_layer)
        # Every layer reads the factors through a plain attribute (not a child module); only
        # the owner also registers them, so they are counted, optimized and saved once.
        object.__setattr__(self, "shared", factors)
        if owner:
            self.factors = factors
        self.layer = layer
        self.matrix = matrix
        self.heads_on_input = heads_on_input
        self.block_size = block_size
        head_width = self.in_features if heads_on_input else self.out_features
        self.n_blocks = head_width // block_size
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.shared
        coef = f.coefficients(self.layer, self.matrix, self.n_blocks)  # (n_blocks, R)
        x = self.dropout(x.to(f.lora_A.dtype))
        if self.heads_on_input:
            blocks = x.unflatten(-1, (self.n_blocks, self.block_size))
            h = ((blocks @ f.lora_B.T) * coef).sum(dim=-2)  # (..., R)
            out = h @ f.lora_A
        else:
            h = (x @ f.lora_A.T).unsqueeze(-2) * coef  # (..., n_blocks, R)
            out = (h @ f.lora_B).flatten(-2)
        return out * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.shared
        coef = f.coefficients(self.layer, self.matrix, self.n_blocks)
        # per_block[h, k, j] = c[h, k] B[k, j]: the head-side factor, block by block.
        per_block = coef[:, :, None] * f.lora_B[None]
        if self.heads_on_input:
            a = per_block.permute(1, 0, 2).reshape(coef.shape[1], -1)  # (R, d_in)
            return a, f.lora_A.T * self.scaling
        b = per_block.permute(0, 2, 1).reshape(-1, coef.shape[1])  # (d_out, R)
        # A copy: exported files hold each module's factors apart (no shared storage).
        return f.lora_A.clone(), b * self.scaling

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_factors()
        return b @ a

    def extra_repr(self) -> str:
        side = "input" if self.heads_on_input else "output"
        return (
            f"{super().extra_repr()}, layer={self.layer}, matrix={self.matrix},"
            f" heads_on={side}, n_blocks={self.n_blocks}"
        )
