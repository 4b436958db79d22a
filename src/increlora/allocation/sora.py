"""SoRA's controller: the proximal step on the gates after every optimizer step, pruning at the end.

The gates ``g`` train with the user's optimizer like every other adapter parameter; right
after each ``optimizer.step()`` (in the optimizer's post-step hook, so no forward pass ever sees
an un-thresholded gate) the controller applies the proximal operator of ``lambda * ||g||_1``::

    g <- sign(g) * max(|g| - xi, 0),   xi = eta_t * lambda   (threshold="lr", the paper)
                                       xi = lambda           (threshold="fixed", official code)

with ``eta_t`` the current learning rate of the gates' param group. The optimizer's decoupled
weight decay (AdamW) on the gates is undone in the same hook: the official code trains gates
with a separate, decay-free optimizer, and decay would add an L2 pull toward zero that the
sparsity weight does not account for. At the last step (``total_steps``) the layers are
pruned: ranks with ``g == 0`` are removed (optimizer moments follow their rows).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from ..distributed import is_main_process
from ..layers.sora import SoRALayer
from .step_guard import StepGuard, check_optimizer_holds, unwrap_optimizer

logger = logging.getLogger("increlora.allocation")


def _decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))


def _permute_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, dim: int, order) -> None:
    for value in optimizer.state.get(p, {}).values():
        if torch.is_tensor(value) and value.shape == p.shape:
            value.copy_(value.index_select(dim, order.to(value.device)))


class SoRAController:
    """Proximal gate updates and end-of-training pruning for the SoRALayers of one model."""

    def __init__(
        self,
        layers: dict[str, SoRALayer],
        optimizer: Any,
        total_steps: int,
        *,
        sparsity: float,
        threshold: str,
        l1_weight: float,
        prune_at_end: bool,
    ) -> None:
        self.names = list(layers)
        self.layers = list(layers.values())
        self.total_steps = total_steps
        self.sparsity = sparsity
        self.threshold_mode = threshold
        self.l1_weight = l1_weight
        self.prune_at_end = prune_at_end
        self.optimizer = unwrap_optimizer(optimizer)
        check_optimizer_holds(
            self.optimizer,
            {
                f"{n}.{k}": getattr(m, k)
                for n, m in layers.items()
                for k in ("lora_A", "lora_B", "lora_gate")
            },
        )
        self.group_of = {
            id(p): group for group in self.optimizer.param_groups for p in group["params"]
        }
        coupled = [
            n
            for n, m in layers.items()
            if self.group_of[id(m.lora_gate)]["weight_decay"]
            and not _decoupled(self.optimizer, self.group_of[id(m.lora_gate)])
        ]
        if coupled:
            warnings.warn(
                f"SoRA: the gates of {coupled[:2]}... get L2 weight decay through their gradient,"
                " which cannot be undone; put the lora_gate parameters in a param group with"
                " weight_decay=0",
                stacklevel=3,
            )
        self._old_gates: list[torch.Tensor | None] = [None] * len(self.layers)
        self.guard = StepGuard(
            self.optimizer, "SoRA", before_step=self._snapshot, after_step=self._proximal
        )
        self.pruned = False
        self.history: list[dict] = []

    def _decay(self, layer: SoRALayer) -> float:
        """``lr * weight_decay`` the optimizer applied to this gate (decoupled decay only)."""
        group = self.group_of[id(layer.lora_gate)]
        if not _decoupled(self.optimizer, group):
            return 0.0
        return float(group["lr"]) * float(group["weight_decay"])

    @torch.no_grad()
    def _snapshot(self) -> None:
        for i, layer in enumerate(self.layers):
            self._old_gates[i] = layer.lora_gate.detach().clone() if self._decay(layer) else None

    @torch.no_grad()
    def _proximal(self, step: int) -> None:
        for layer, old in zip(self.layers, self._old_gates):
            if old is not None:  # AdamW did g <- g (1 - lr wd) - update; add lr wd g back
                layer.lora_gate.add_(old, alpha=self._decay(layer))
            lr = float(self.group_of[id(layer.lora_gate)]["lr"])
            xi = self.sparsity * (lr if self.threshold_mode == "lr" else 1.0)
            layer.soft_threshold_(xi)
            layer.enforce_unused_zero()

    def step(self) -> dict | None:
        """Prunes at the last step (``total_steps``); returns the pruning event then."""
        t = self.guard.begin()
        if t is None or t < self.total_steps or not self.prune_at_end or self.pruned:
            return None
        return self.prune(t)

    @torch.no_grad()
    def prune(self, step: int | None = None) -> dict:
        """Remove every rank whose gate is zero (also callable by hand, e.g. after early stop)."""
        for layer in self.layers:
            order = layer.prune()
            _permute_state(self.optimizer, layer.lora_A, 0, order)
            _permute_state(self.optimizer, layer.lora_B, 1, order)
            _permute_state(self.optimizer, layer.lora_gate, 0, order)
        self.pruned = True
        event = {
            "step": step if step is not None else self.guard.optimizer_steps,
            "rank_pattern": self.rank_pattern(),
            "trainable_params": self.num_trainable_parameters(),
        }
        self.history.append(event)
        if is_main_process():
            logger.info(
                "SoRA: pruned zero gates, %d ranks left (%d adapter parameters)",
                sum(event["rank_pattern"].values()),
                event["trainable_params"],
            )
        return event

    def rank_pattern(self) -> dict[str, int]:
        return {n: int(m.open_ranks().numel()) for n, m in zip(self.names, self.layers)}

    def num_trainable_parameters(self) -> int:
        return sum(m.num_adapter_parameters() for m in self.layers)

    def remove_hooks(self) -> None:
        self.guard.remove()

    def regularization_loss(self) -> torch.Tensor:
        """``l1_weight * sum |g| / (number of gates)`` (the official code's L1 loss term)."""
        device = self.layers[0].lora_gate.device
        if self.l1_weight == 0:
            return torch.zeros((), device=device)
        total = torch.stack([m.lora_gate.abs().sum() for m in self.layers]).sum()
        return self.l1_weight * total / sum(m.lora_gate.numel() for m in self.layers)

    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "guard": self.guard.state_dict(),
            "ranks": [m.rank for m in self.layers],
            "pruned": self.pruned,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                "SoRA state was saved for different modules; was the model injected with the"
                " same target_modules?"
            )
        self.guard.load_state_dict(state["guard"])
        for layer, rank in zip(self.layers, state["ranks"]):
            layer.rank = int(rank)
        self.pruned = bool(state["pruned"])
        self.history = list(state["history"])
