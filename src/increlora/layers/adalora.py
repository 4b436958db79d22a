"""The AdaLoRA layer: SVD-like triplets of which the unimportant ones are masked, not deleted.

    y = W0 x + (alpha / r) * P diag(lambda * kept) Q dropout(x)

This is a :class:`~increlora.layers.TripletLayer` (``Q`` = ``lora_A``, ``lambda`` = ``lora_E``,
``P`` = ``lora_B``) whose rank ``r`` is fixed at the initial rank: every triplet stays in the
forward pass, and a triplet is masked by zeroing its ``lambda`` (``kept[i] = False``). Its
``P``/``Q`` rows keep their values, so the controller can bring it back when its importance
rises again, as in the paper. The scaling ``alpha / r`` uses the initial rank (PEFT's
``lora_alpha / ranknum``), so masking never rescales the other triplets.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer
from .triplet import TripletLayer


class AdaLoRALayer(TripletLayer):
    """Triplet adapter at a fixed rank with a per-triplet mask (see module docstring)."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            base_layer,
            capacity=rank,
            init_rank=rank,
            reserve_rank=0,
            alpha=alpha,
            scaling_mode="constant",
            dropout=dropout,
            init_std=init_std,
            new_rank_e=0.0,
            generator=generator,
            storage="static",  # a fixed rank: every triplet is stored and trains
        )
        # Not a persistent buffer: saves carry it in rank_state, checkpoints in the controller.
        self.register_buffer(
            "kept", torch.ones(rank, dtype=torch.bool, device=self.lora_E.device), persistent=False
        )

    def live(self) -> torch.Tensor:
        """Triplets that contribute: kept ones, and masked ones whose lambda trained back.

        The second set is empty unless the controller lets masked lambdas train between
        masking steps (``hold_mask=False``); counting it keeps exports exact at any time.
        """
        return self.kept | (self.lora_E.detach() != 0)

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the lambda of every masked triplet."""
        self.lora_E.masked_fill_(~self.kept, 0.0)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Live triplets as plain LoRA factors: A' = diag(lambda) Q, B' = s P (masked dropped)."""
        idx = torch.nonzero(self.live()).flatten()
        a = (self.lora_A * self.lora_E[:, None]).index_select(0, idx)
        b = self.lora_B.index_select(1, idx) * self.scaling
        return a, b

    def num_adapter_parameters(self) -> int:
        """Size of the adapter the mask defines: live triplets x (d_in + d_out + 1)."""
        return int(self.live().sum()) * (self.in_features + self.out_features + 1)

    def rank_state(self) -> dict:
        return {"kept": [bool(k) for k in self.kept.tolist()]}

    def check_adapter_state(self, tensors: dict[str, torch.Tensor], rank_state: dict) -> None:
        kept = rank_state.get("kept")
        if not isinstance(kept, list) or len(kept) != self.capacity:
            raise ValueError(
                f"rank_state 'kept' must list {self.capacity} booleans (one per triplet); inject"
                " with the init_rank the adapter was trained with"
            )
        AdapterLayer.check_adapter_state(self, tensors, rank_state)

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor], rank_state: dict) -> None:
        AdapterLayer.load_adapter_state(self, tensors, rank_state)
        self.kept.copy_(torch.tensor(rank_state["kept"], dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"{AdapterLayer.extra_repr(self)}, rank={self.capacity}, kept={int(self.kept.sum())}"
