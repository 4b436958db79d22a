"""The MELoRA layer (Ren et al. 2024, arXiv 2402.17263): n mini-LoRAs on a block diagonal.

The input is cut into n equal slices and the output into n equal slices; mini-LoRA i maps
input slice i to output slice i:

    delta = s * diag(B_1 A_1, ..., B_n A_n),   A_i: k x (d_in / n),  B_i: (d_out / n) x k

with mini rank ``k = r / n``. The rank of ``delta`` reaches ``r`` (the equivalent rank) while
training only ``r (d_in + d_out) / n`` parameters. The forward pass is one batched einsum
over the blocks; the dense update is exactly ``blockdiag(B_i) @ blockdiag(A_i)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterLayer


class MELoRALayer(AdapterLayer):
    """``n`` mini-LoRAs of rank ``k``: ``lora_A`` is (n, k, d_in/n), ``lora_B`` (n, d_out/n, k)."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        n: int,
        mini_rank: int,
        scaling: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base_layer)
        if self.in_features % n or self.out_features % n:
            raise ValueError(
                f"d_in = {self.in_features} and d_out = {self.out_features} must both be"
                f" divisible by n = {n}"
            )
        self.n = n
        self.mini_rank = mini_rank
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        in_block, out_block = self.in_features // n, self.out_features // n
        self.lora_A = nn.Parameter(torch.empty(n, mini_rank, in_block, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n, out_block, mini_rank, device=device))
        with torch.no_grad():
            for a in self.lora_A:  # each mini-LoRA starts like a LoRA of its own size
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        blocks = x.reshape(*x.shape[:-1], self.n, self.in_features // self.n)
        h = torch.einsum("...ni,nki->...nk", blocks, self.lora_A)
        out = torch.einsum("...nk,nok->...no", h, self.lora_B)
        return out.reshape(*x.shape[:-1], self.out_features) * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.block_diag(*self.lora_A)
        b = torch.block_diag(*self.lora_B) * self.scaling
        return a, b

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_factors()
        return b @ a

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}, mini_rank={self.mini_rank}"
