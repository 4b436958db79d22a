"""Exactly one controller step per optimizer step, enforced through optimizer hooks.

A controller (IncreLoRA's allocator, AdaLoRA's masker, SoRA's gate pruner...) must run once
after every ``optimizer.step()`` and before ``zero_grad()``; forgetting it silently disables
the method (PEFT's most reported AdaLoRA problem), and calling it per micro-batch silently
changes it. :class:`StepGuard` counts optimizer steps with ``register_step_post_hook`` and:

* raises from the pre-step hook when an optimizer step starts while the controller has not
  seen the previous one (the forgotten call);
* turns a controller call without a new optimizer step into a no-op, with a warning the first
  time (an fp16 step skipped by the grad scaler), and raises when that happens at two
  consecutive optimizer steps (the controller is being called per micro-batch).

Controllers may pass ``before_step`` / ``after_step`` callbacks that run inside the hooks
(snapshots and corrections that must bracket the optimizer's own update).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..config import ConfigError


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's AcceleratedOptimizer."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class StepGuard:
    """Optimizer-step counter that checks a controller's ``step()`` discipline."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        method: str,
        call: str = "controller.step()",
        before_step: Callable[[], None] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.method = method
        self.call = call
        self._before = before_step
        self._after = after_step
        self.optimizer_steps = 0
        self.controller_steps = 0
        self._noop_at = -2  # optimizer step at which the last no-op controller call happened
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_optimizer_step),
            optimizer.register_step_post_hook(self._after_optimizer_step),
        ]

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.optimizer_steps > self.controller_steps:
            raise RuntimeError(
                f"{self.method}: optimizer.step() was called again without {self.call} after"
                f" optimizer step {self.optimizer_steps}. Call {self.call} once after every"
                " optimizer.step() (before zero_grad); the increlora Trainer callback and"
                " runner do this for you."
            )
        if self._before is not None:
            self._before()

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.optimizer_steps += 1
        if self._after is not None:
            self._after(self.optimizer_steps)

    def begin(self, skips_expected: bool = False) -> int | None:
        """Call first in ``controller.step()``: the optimizer step to act on, or None (no-op).

        ``skips_expected``: an fp16 grad scaler is in use, so a no-op is a skipped step; skips
        one good step apart would otherwise look like per-micro-batch calls.
        """
        if self.controller_steps == self.optimizer_steps:
            if (
                not skips_expected
                and self._noop_at == self.optimizer_steps - 1
                and self.optimizer_steps > 0
            ):
                raise RuntimeError(
                    f"{self.method}: {self.call} is being called more often than"
                    " optimizer.step() (per micro-batch?). With gradient accumulation call it"
                    " only when the optimizer really steps (accelerate: `if"
                    " accelerator.sync_gradients`)."
                )
            if self._noop_at < 0:
                warnings.warn(
                    f"{self.method}: {self.call} without a new optimizer step (skipped fp16"
                    " step?); ignored.",
                    stacklevel=3,
                )
            self._noop_at = self.optimizer_steps
            return None
        self.controller_steps = self.optimizer_steps
        return self.optimizer_steps

    def remove(self) -> None:
        """Detach the hooks (the optimizer then runs unchecked)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        return {"optimizer_steps": self.optimizer_steps, "controller_steps": self.controller_steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer_steps = int(state["optimizer_steps"])
        self.controller_steps = int(state["controller_steps"])


def check_optimizer_holds(optimizer: torch.optim.Optimizer, params: dict[str, Any]) -> None:
    """Raise a ConfigError naming the adapter parameters the optimizer does not update."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in held]
    if missing:
        raise ConfigError(
            f"optimizer: does not hold the adapter parameters {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}; build it from"
            " adapted.trainable_parameters()"
        )
