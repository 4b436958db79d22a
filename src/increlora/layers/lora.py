"""The LoRA layer (Hu et al. 2021, arXiv 2106.09685): a fixed-rank update.

    y = W0 x + (alpha / r) * B A dropout(x)

``A`` (r x d_in) starts like loralib / PEFT (Kaiming-uniform with a = sqrt(5), or Gaussian
with std 1/r) and ``B`` (d_out x r) starts at zero, so the update is zero at step 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterLayer


class LoRALayer(AdapterLayer):
    """Plain LoRA: ``delta = s * B @ A`` with ``s = alpha / r``."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
    ) -> None:
        super().__init__(base_layer)
        self.r = r
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        # The adapter lives in fp32 whatever the base dtype (the usual mixed-precision setup).
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T
        return (h @ self.lora_B.T) * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B * self.scaling

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_factors()
        return b @ a

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"
