"""AdaLoRA's controller: triplet importance, the cubic budget schedule, and masking.

Per optimizer step ``t`` (1-based, counted by :class:`StepGuard`), with ``T`` total steps,
``b0`` the initial number of triplets and ``b_T = round(target_rank * n_modules)``:

* importance, for ``t < T - t_final``: for every entry w of P, lambda, Q, from the gradient
  just used by the optimizer and the updated value (the order of the official code and PEFT)::

      I(w) = |w * dL/dw|
      Ibar_t = b1 Ibar_{t-1} + (1 - b1) I          (sensitivity)
      Ubar_t = b2 Ubar_{t-1} + (1 - b2) |I - Ibar_t| (uncertainty)
      s(w) = Ibar_t * Ubar_t
      S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)     (triplet i of a module)

* budget: ``b(t) = b0`` for ``t <= t_init``; ``b_T`` after ``T - t_final``; in between
  ``int((b0 - b_T) * (1 - (t - t_init) / (T - t_final - t_init))^3 + b_T)``;
* masking, at ``t_init < t < T - t_final`` with ``t % delta_t == 0``, and once more at
  ``t = T - t_final`` with the final budget: the ``b0 - b(t)`` lowest-scored triplets over all
  modules are masked (lambda := 0), ties at the threshold included (PEFT's ``<=`` rule).
  After ``T - t_final`` the final mask is frozen and importance is no longer updated.

Masked lambdas: with ``hold_mask`` (default) they are set back to zero after every optimizer
step until a masking step unmasks them. PEFT and the official code only zero them at masking
steps, so with ``delta_t > 1`` a masked triplet trains back between two masking steps;
``hold_mask=False`` reproduces that. With ``delta_t = 1`` both are the same.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..distributed import broadcast_from_main, is_main_process
from ..layers.adalora import AdaLoRALayer
from .step_guard import StepGuard, check_optimizer_holds, unwrap_optimizer

logger = logging.getLogger("increlora.allocation")

PARAMS = ("lora_A", "lora_E", "lora_B")


def budget_at(t: int, initial: int, target: int, t_init: int, t_final: int, total: int) -> int:
    """AdaLoRA's cubic schedule: total unmasked triplets allowed after optimizer step ``t``."""
    if t <= t_init:
        return initial
    if t > total - t_final:
        return target
    remaining = 1 - (t - t_init) / (total - t_final - t_init)
    return int((initial - target) * (remaining**3) + target)


class TripletImportance:
    """Sensitivity / uncertainty EMAs of every entry of P, lambda and Q (fp32, on device)."""

    def __init__(self, layers: list[AdaLoRALayer], beta1: float, beta2: float) -> None:
        self.layers = layers
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity = [
            {k: torch.zeros_like(getattr(m, k), dtype=torch.float32) for k in PARAMS}
            for m in layers
        ]
        self.uncertainty = [{k: t.clone() for k, t in d.items()} for d in self.sensitivity]

    @torch.no_grad()
    def update(self) -> None:
        for layer, sens, unc in zip(self.layers, self.sensitivity, self.uncertainty):
            for k in PARAMS:
                p = getattr(layer, k)
                if p.grad is None:
                    raise RuntimeError(
                        f"AdaLoRA: {k} has no gradient when scoring. Call controller.step()"
                        " after optimizer.step() and BEFORE optimizer.zero_grad()."
                    )
                ipt = (p * p.grad).abs().float()
                sens[k] = self.beta1 * sens[k] + (1 - self.beta1) * ipt
                unc[k] = self.beta2 * unc[k] + (1 - self.beta2) * (ipt - sens[k]).abs()

    @torch.no_grad()
    def triplet_scores(self) -> list[torch.Tensor]:
        """S_i per module (the sum order is PEFT's, so equal inputs give equal masks)."""
        scores = []
        for sens, unc in zip(self.sensitivity, self.uncertainty):
            s = {k: sens[k] * unc[k] for k in PARAMS}
            scores.append(s["lora_E"] + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)))
        return scores

    def state_dict(self) -> dict:
        return {"sensitivity": self.sensitivity, "uncertainty": self.uncertainty}

    def load_state_dict(self, state: dict) -> None:
        for key in ("sensitivity", "uncertainty"):
            mine = getattr(self, key)
            for i, saved in enumerate(state[key]):
                for k in PARAMS:
                    if saved[k].shape != mine[i][k].shape:
                        raise ValueError(f"importance state for {k} has another shape")
                    mine[i][k] = saved[k].to(mine[i][k].device, torch.float32).clone()


class AdaLoRAController:
    """Masks the AdaLoRALayers of one model down to the budget (see module docstring)."""

    def __init__(
        self,
        layers: dict[str, AdaLoRALayer],
        optimizer: Any,
        total_steps: int,
        *,
        target_total: int,
        t_init: int,
        t_final: int,
        delta_t: int,
        beta1: float,
        beta2: float,
        orth_reg_weight: float,
        hold_mask: bool,
    ) -> None:
        self.names = list(layers)
        self.layers = list(layers.values())
        self.initial_total = sum(m.capacity for m in self.layers)
        self.target_total = target_total
        self.total_steps = total_steps
        self.t_init, self.t_final, self.delta_t = t_init, t_final, delta_t
        self.orth_reg_weight = orth_reg_weight
        self.hold_mask = hold_mask
        self.optimizer = unwrap_optimizer(optimizer)
        check_optimizer_holds(
            self.optimizer, {f"{n}.{k}": getattr(m, k) for n, m in layers.items() for k in PARAMS}
        )
        self.importance = TripletImportance(self.layers, beta1, beta2)
        self.guard = StepGuard(self.optimizer, "AdaLoRA")
        self.history: list[dict] = []
        if is_main_process():
            logger.info(
                "AdaLoRA: %d modules, %d -> %d triplets; t_init=%d, masking every %d steps"
                " until step %d, then frozen",
                len(self.layers),
                self.initial_total,
                self.target_total,
                t_init,
                delta_t,
                total_steps - t_final,
            )

    @property
    def final_step(self) -> int:
        """The step of the last masking (with the target budget); the mask is frozen after."""
        return self.total_steps - self.t_final

    def budget(self, t: int) -> int:
        return budget_at(
            t, self.initial_total, self.target_total, self.t_init, self.t_final, self.total_steps
        )

    def rank_pattern(self) -> dict[str, int]:
        return {n: int(m.kept.sum()) for n, m in zip(self.names, self.layers)}

    def num_trainable_parameters(self) -> int:
        return sum(m.num_adapter_parameters() for m in self.layers)

    def remove_hooks(self) -> None:
        self.guard.remove()

    def step(self) -> dict | None:
        """Update importance, mask at scheduled steps; returns the masking event, if any."""
        t = self.guard.begin()
        if t is None:
            return None
        event = None
        if t < self.final_step:
            self.importance.update()
            if t > self.t_init and t % self.delta_t == 0:
                event = self._mask(t, self.budget(t))
        elif t == self.final_step:
            event = self._mask(t, self.target_total)
        if self.hold_mask or t >= self.final_step:
            for layer in self.layers:
                layer.apply_mask()
        return event

    @torch.no_grad()
    def _mask(self, t: int, budget: int) -> dict:
        scores = self.importance.triplet_scores()
        flat = broadcast_from_main(torch.cat(scores))
        n_masked = self.initial_total - budget
        # budget == initial: nothing to mask (PEFT's kthvalue(k=0) would raise here).
        threshold = torch.kthvalue(flat.cpu(), n_masked).values.item() if n_masked > 0 else None
        offset = 0
        for layer in self.layers:
            r = layer.capacity
            if threshold is None:
                layer.kept.fill_(True)
            else:
                layer.kept.copy_(flat[offset : offset + r] > threshold)
            layer.apply_mask()
            offset += r
        event = {
            "step": t,
            "budget": budget,
            "kept": sum(int(m.kept.sum()) for m in self.layers),
            "threshold": threshold,
            "rank_pattern": self.rank_pattern(),
        }
        self.history.append(event)
        if is_main_process():
            logger.debug("step %d: budget %d, %d triplets kept", t, budget, event["kept"])
        return event

    def regularization_loss(self) -> torch.Tensor:
        """gamma * mean over modules of ||Q Q^T - I||_F and ||P^T P - I||_F (all triplets)."""
        device = self.layers[0].lora_A.device
        if self.orth_reg_weight == 0:
            return torch.zeros((), device=device)
        total = torch.stack([layer.orthogonality() for layer in self.layers]).sum()
        return self.orth_reg_weight * total / (2 * len(self.layers))

    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "guard": self.guard.state_dict(),
            "kept": [m.kept.clone() for m in self.layers],
            "importance": self.importance.state_dict(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                "AdaLoRA state was saved for different modules; was the model injected with the"
                " same target_modules?"
            )
        self.guard.load_state_dict(state["guard"])
        for layer, kept in zip(self.layers, state["kept"]):
            layer.kept.copy_(kept.to(torch.bool))
        self.importance.load_state_dict(state["importance"])
        self.history = list(state["history"])
