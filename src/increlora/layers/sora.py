"""The SoRA layer: LoRA with a gate vector over its ranks, pruned where the gate is zero.

    y = W0 x + (alpha / r_max) * B[:, :k] diag(g[:k]) A[:k] dropout(x)

``A`` (r_max x d_in), ``B`` (d_out x r_max) and the gate ``g`` (r_max) are allocated once at
``r_max``; ``k`` (``rank``) is the prefix in use. It is ``r_max`` during training; pruning
(:meth:`SoRALayer.prune`, at the end of training) moves the ranks whose gate is nonzero to the
front and sets ``k`` to their count, so a ``g_i == 0`` rank (which contributes nothing) leaves
the forward pass, the saved adapter and the parameter count.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import check_shapes
from .lora import LoRALayer


class SoRALayer(LoRALayer):
    """Gated LoRA (see module docstring); A, B start like LoRA's (B = 0)."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        max_rank: int,
        alpha: float,
        dropout: float = 0.0,
        gate_init: str = "normal",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base_layer, r=max_rank, alpha=alpha, dropout=dropout)
        self.rank = max_rank
        if gate_init == "normal":  # the official code's torch.randn gate
            gate = torch.randn(max_rank, generator=generator)
        else:
            gate = torch.ones(max_rank)
        self.lora_gate = nn.Parameter(gate.to(self.lora_A.device))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.rank
        h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A[:k].T
        return ((h * self.lora_gate[:k]) @ self.lora_B[:, :k].T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        k = self.rank
        return (self.lora_B[:, :k] * (self.lora_gate[:k] * self.scaling)) @ self.lora_A[:k]

    def open_ranks(self) -> torch.Tensor:
        """Indices of the ranks in use whose gate is nonzero (the others contribute nothing)."""
        return torch.nonzero(self.lora_gate.detach()[: self.rank]).flatten()

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Open ranks as plain LoRA factors: A' = diag(g) A, B' = s B (zero gates dropped)."""
        idx = self.open_ranks()
        a = (self.lora_A * self.lora_gate[:, None]).index_select(0, idx)
        return a, self.lora_B.index_select(1, idx) * self.scaling

    def num_adapter_parameters(self) -> int:
        """Open ranks x (d_in + d_out + 1): a zero gate's rank is pruned away at the end."""
        return int(self.open_ranks().numel()) * (self.in_features + self.out_features + 1)

    @torch.no_grad()
    def soft_threshold_(self, threshold: float) -> None:
        """The proximal step of ``threshold * ||g||_1``: g <- sign(g) max(|g| - threshold, 0)."""
        g = self.lora_gate
        g.copy_(g.sign() * (g.abs() - threshold).clamp(min=0.0))

    @torch.no_grad()
    def prune(self) -> torch.Tensor:
        """Move open ranks to the front and drop the rest; returns the row permutation used."""
        open_idx = self.open_ranks()
        is_open = torch.zeros(self.r, dtype=torch.bool, device=open_idx.device)
        is_open[open_idx] = True
        order = torch.cat([open_idx, torch.nonzero(~is_open).flatten()])
        self.lora_A.copy_(self.lora_A.index_select(0, order))
        self.lora_B.copy_(self.lora_B.index_select(1, order))
        self.lora_gate.copy_(self.lora_gate.index_select(0, order))
        self.rank = int(open_idx.numel())
        self.enforce_unused_zero()
        return order

    @torch.no_grad()
    def enforce_unused_zero(self) -> None:
        """Ranks outside the prefix stay exactly zero whatever the optimizer does to them."""
        k = self.rank
        self.lora_A[k:] = 0.0
        self.lora_B[:, k:] = 0.0
        self.lora_gate[k:] = 0.0

    def adapter_state(self) -> dict[str, torch.Tensor]:
        k = self.rank
        return {
            "lora_A": self.lora_A[:k],
            "lora_B": self.lora_B[:, :k],
            "lora_gate": self.lora_gate[:k],
        }

    def rank_state(self) -> dict:
        return {"rank": self.rank}

    def check_adapter_state(self, tensors: dict[str, torch.Tensor], rank_state: dict) -> None:
        k = rank_state.get("rank")
        if not isinstance(k, int) or not 0 <= k <= self.r:
            raise ValueError(f"rank {k!r} does not fit this layer's max_rank {self.r}")
        expected = {
            "lora_A": (k, self.in_features),
            "lora_B": (self.out_features, k),
            "lora_gate": (k,),
        }
        check_shapes(tensors, expected)

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor], rank_state: dict) -> None:
        self.rank = int(rank_state["rank"])
        k = self.rank
        self.lora_A[:k] = tensors["lora_A"]
        self.lora_B[:, :k] = tensors["lora_B"]
        self.lora_gate[:k] = tensors["lora_gate"]
        self.enforce_unused_zero()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
