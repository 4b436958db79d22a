"""PRILoRA's controller: prune every layer's A at scheduled optimizer steps.

Pruning happens after optimizer step ``t`` when ``t % interval == 0``, and once more after
the last step (``t == total_steps``) so the trained adapter ends with the pruned pattern.
Pruned entries are zeroed, not frozen: they train again until the next pruning, which scores
them afresh (the paper's "ongoing" pruning by the current, "temporary" weight magnitude). The
input statistics are averaged over processes before pruning, so every replica of a
data-parallel run prunes the same entries.
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import all_reduce_mean_
from ..layers.prilora import PRILoRALayer
from .step_guard import StepGuard, check_optimizer_holds, unwrap_optimizer


class PRILoRAController:
    """Scheduled row-wise pruning of A for the PRILoRALayers of one model."""

    def __init__(
        self,
        layers: dict[str, PRILoRALayer],
        optimizer: Any,
        total_steps: int,
        *,
        fraction: float,
        interval: int,
    ) -> None:
        self.names = list(layers)
        self.layers = list(layers.values())
        self.total_steps = total_steps
        self.fraction = fraction
        self.interval = interval
        self.optimizer = unwrap_optimizer(optimizer)
        check_optimizer_holds(
            self.optimizer,
            {f"{n}.{k}": getattr(m, k) for n, m in layers.items() for k in ("lora_A", "lora_B")},
        )
        self.guard = StepGuard(self.optimizer, "PRILoRA")
        self.history: list[int] = []

    def is_pruning_step(self, t: int) -> bool:
        return t % self.interval == 0 or t == self.total_steps

    def step(self) -> dict | None:
        """Prune at scheduled steps; returns ``{"step", "pruned_per_row"}`` then."""
        t = self.guard.begin()
        if t is None or not self.is_pruning_step(t):
            return None
        pruned = {}
        for name, layer in zip(self.names, self.layers):
            all_reduce_mean_(layer.input_norm)
            pruned[name] = layer.prune_(self.fraction)
        self.history.append(t)
        return {"step": t, "pruned_per_row": pruned}

    def remove_hooks(self) -> None:
        self.guard.remove()

    def regularization_loss(self) -> torch.Tensor:
        return torch.zeros((), device=self.layers[0].lora_A.device)

    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "guard": self.guard.state_dict(),
            "input_norm": [m.input_norm.clone() for m in self.layers],
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                "PRILoRA state was saved for different modules; was the model injected with the"
                " same target_modules?"
            )
        self.guard.load_state_dict(state["guard"])
        for layer, norm in zip(self.layers, state["input_norm"]):
            layer.input_norm.copy_(norm)
        self.history = list(state["history"])
