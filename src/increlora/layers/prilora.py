"""The PRILoRA layer: LoRA whose A matrix is pruned by weight magnitude times input activity.

    y = W0 x + (alpha / r) * B A dropout(x)

While training, the layer keeps ``xbar``, an exponential moving average (coefficient
``input_beta``) of the L2 norm of each input feature over the tokens of a batch::

    xbar_j <- beta xbar_j + (1 - beta) ||X[:, j]||_2

and the importance of an entry of A is ``S_ij = |A_ij| * xbar_j`` (the product of the weight
and the input statistic, as in Wanda). Pruning zeroes, in every row of A, the ``fraction``
entries with the lowest importance; A stays a dense matrix, so the update is still ``B @ A``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lora import LoRALayer


class PRILoRALayer(LoRALayer):
    """LoRA at a per-layer rank with row-wise pruning of A (see module docstring)."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        input_beta: float = 0.9,
    ) -> None:
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout)
        self.input_beta = input_beta
        # Training statistic, not part of the adapter: checkpoints keep it via the controller.
        self.register_buffer(
            "input_norm",
            torch.zeros(self.in_features, device=self.lora_A.device),
            persistent=False,
        )

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self._track_input(x)
        return super().adapter_forward(x)

    @torch.no_grad()
    def _track_input(self, x: torch.Tensor) -> None:
        norms = x.detach().reshape(-1, self.in_features).float().norm(dim=0)
        self.input_norm.mul_(self.input_beta).add_(norms, alpha=1 - self.input_beta)

    def importance(self) -> torch.Tensor:
        """``S_ij = |A_ij| * xbar_j``, shaped like A."""
        return self.lora_A.detach().abs().float() * self.input_norm[None, :]

    @torch.no_grad()
    def prune_(self, fraction: float) -> int:
        """Zero the ``floor(fraction * d_in)`` least important entries of every row of A.

        Ties (e.g. features never seen, or entries already zero) go to the lower column index,
        so every process takes the same decision. Returns the entries zeroed per row.
        """
        n = math.floor(fraction * self.in_features)
        if n > 0:
            order = torch.argsort(self.importance(), dim=1, stable=True)
            self.lora_A.scatter_(1, order[:, :n], 0.0)
        return n
