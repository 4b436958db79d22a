"""AdaLoRA (Zhang et al. 2023, ICLR, arXiv 2303.10512): prune SVD triplets to a budget.

Each adapted weight gets ``r0 = init_rank`` triplets (P: d_out x r0, lambda: r0, Q: r0 x d_in)::

    y = W0 x + (alpha / r0) * P diag(lambda) Q dropout(x)

trained with the orthogonal regularizer ``gamma * mean_m (||Q Q^T - I||_F + ||P^T P - I||_F) / 2``.
Every triplet gets an importance ``S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)``,
``s`` the product of the sensitivity and uncertainty EMAs of ``|w * dL/dw|`` (beta1 = beta2 =
0.85), and a cubic schedule lowers the number of unmasked triplets from ``sum r0`` to
``round(target_rank * n_modules)``; the lowest-scored triplets are masked by zeroing lambda
(kept in memory, so they can come back). The math of the schedule and the mask is in
:mod:`increlora.allocation.adalora`, the layer in :mod:`increlora.layers.adalora`.

Choices where the paper or the reference code leave room (each a config field):

* ``init_rank`` None: ``ceil(1.5 * target_rank)`` (the paper's "initial budget 1.5x the
  final"; PEFT's defaults 12 -> 8).
* ``t_init`` / ``t_final`` None: 10% / 50% of the run's total steps (the paper's GLUE settings
  put t_i at ~10% and t_f at 44-58% of training).
* ``hold_mask``: masked lambdas stay zero between masking steps (PEFT: only at them).
* Scaling ``alpha / r0`` without PEFT's ``+ 1e-5`` in the denominator.

Defaults that deviate from PEFT's ``AdaLoraConfig`` (kept for comparability with IncreLoRA,
whose config has the same defaults, so the two methods compare at equal scaling and
regularization; set the PEFT value to reproduce PEFT):

* ``alpha`` 16 (kept for comparability with IncreLoRA; PEFT uses ``lora_alpha=8``).
* ``orth_reg_weight`` 0.1 (kept for comparability with IncreLoRA; PEFT uses 0.5).
* ``t_init`` / ``t_final`` None = 10% / 50% of training (PEFT uses ``tinit=0``,
  ``tfinal=0``, which leave no warm-up before masking and no final phase).

Compared with PEFT (checked in tests/test_methods_adalora.py): given the same weights and
gradients, the same triplets are masked at the same steps. Differences: ``total_steps`` comes
from ``adapted.controller(optimizer, total_steps)`` instead of the config; an optimizer step
taken without ``controller.step()`` raises (PEFT silently skips the allocation); ``t`` is the
1-based optimizer step count; masked triplets are dropped when exporting to the plain PEFT
LoRA format (PEFT cannot convert AdaLoRA to LoRA); with ``hold_mask`` (default) masked
lambdas stay zero between masking steps; a budget equal to the initial one masks nothing
(PEFT raises there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..allocation.adalora import AdaLoRAController
from ..config import AdapterConfig, ConfigError, option, require
from ..layers.adalora import AdaLoRALayer
from ..layers.base import base_shape
from .base import Method, register

INIT_FRACTION = 0.1
FINAL_FRACTION = 0.5


@dataclass
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA: ``init_rank`` triplets per module, masked down to ``target_rank`` on average.

    Defaults that differ from PEFT's ``AdaLoraConfig``: ``alpha`` 16 (PEFT: 8) and
    ``orth_reg_weight`` 0.1 (PEFT: 0.5), kept for comparability with IncreLoRA (same
    defaults); ``t_init`` / ``t_final`` 10% / 50% of training (PEFT: 0 / 0).
    """

    alpha: float = option(
        16.0,
        "Scaling numerator (LoRA's alpha). 16: kept for comparability with IncreLoRA; PEFT uses"
        " lora_alpha=8.",
    )
    target_rank: float = option(
        8.0, "Final budget: average number of unmasked triplets per module (PEFT's target_r)."
    )
    init_rank: int | None = option(
        None, "Triplets per module at the start (PEFT's init_r). None: ceil(1.5 x target_rank)."
    )
    t_init: int | None = option(
        None, "Optimizer steps before the first masking (tinit). None: 10% of total steps."
    )
    t_final: int | None = option(
        None,
        "Final optimizer steps with the mask frozen at the target budget (tfinal)."
        " None: 50% of total steps.",
    )
    delta_t: int = option(1, "Optimizer steps between two maskings (deltaT).")
    beta1: float = option(0.85, "EMA coefficient of the sensitivity.")
    beta2: float = option(0.85, "EMA coefficient of the uncertainty.")
    orth_reg_weight: float = option(
        0.1,
        "Weight gamma of the orthogonal regularizer. 0.1: kept for comparability with"
        " IncreLoRA; PEFT uses 0.5.",
    )
    hold_mask: bool = option(
        True,
        "Keep masked lambdas at zero between masking steps. False: PEFT / official code, where"
        " masked lambdas train again until the next masking step (same when delta_t = 1).",
    )
    init_std: float = option(0.02, "Std of the normal init of P and Q (lambda starts at 0).")
    seed: int = option(0, "Seed of the init of P and Q (identical on every process).")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.target_rank > 0, "target_rank", f"must be positive, got {self.target_rank}")
        if self.init_rank is not None:
            require(
                self.init_rank >= self.target_rank,
                "init_rank",
                f"must be >= target_rank ({self.target_rank}), got {self.init_rank}",
            )
        for name in ("t_init", "t_final"):
            value = getattr(self, name)
            require(value is None or value >= 0, name, f"must be >= 0, got {value}")
        require(self.delta_t >= 1, "delta_t", f"must be >= 1, got {self.delta_t}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(0.0 < value < 1.0, name, f"must be in (0, 1), got {value}")
        require(self.orth_reg_weight >= 0, "orth_reg_weight", "must be >= 0")

    @property
    def initial_rank(self) -> int:
        return self.init_rank or math.ceil(1.5 * self.target_rank)

    def schedule(self, total_steps: int) -> tuple[int, int]:
        """``(t_init, t_final)`` for a run of ``total_steps``; raises if no masking phase fits."""
        if total_steps < 1:
            raise ConfigError(f"total_steps: must be >= 1, got {total_steps}")
        t_init = self.t_init if self.t_init is not None else round(INIT_FRACTION * total_steps)
        t_final = self.t_final if self.t_final is not None else round(FINAL_FRACTION * total_steps)
        if t_init >= total_steps - t_final:
            raise ConfigError(
                f"schedule: t_init={t_init} must be < total_steps - t_final ="
                f" {total_steps} - {t_final}, or no step is left to mask in. Lower t_init or"
                " t_final, train longer, or leave them None (10% / 50% of training)."
            )
        return t_init, t_final


@register
class AdaLoRA(Method):
    name = "adalora"
    config_class = AdaLoRAConfig
    peft_exportable = True
    size_field = "target_rank"
    # The layer built per module (the PEFT integration builds an AdaLoRALayer subclass).
    layer_class: ClassVar[type[AdaLoRALayer]] = AdaLoRALayer

    def build_layers(self, model: nn.Module, names: list[str]) -> dict[str, AdaLoRALayer]:
        config: AdaLoRAConfig = self.config
        generator = torch.Generator().manual_seed(config.seed)
        layers = {}
        for name in names:
            base = model.get_submodule(name)
            limit = min(base_shape(base))
            if config.initial_rank > limit:
                raise ConfigError(
                    f"init_rank: {config.initial_rank} triplets exceed min(d_in, d_out) = {limit}"
                    f" of {name}; lower init_rank (or target_rank)"
                )
            layers[name] = self.layer_class(
                base,
                rank=config.initial_rank,
                alpha=config.alpha,
                dropout=config.dropout,
                init_std=config.init_std,
                generator=generator,
            )
        return layers

    def make_controller(
        self, layers: dict[str, Any], optimizer: Any, total_steps: int
    ) -> AdaLoRAController:
        config: AdaLoRAConfig = self.config
        t_init, t_final = config.schedule(total_steps)
        return AdaLoRAController(
            layers,
            optimizer,
            total_steps,
            target_total=round(config.target_rank * len(layers)),
            t_init=t_init,
            t_final=t_final,
            delta_t=config.delta_t,
            beta1=config.beta1,
            beta2=config.beta2,
            orth_reg_weight=config.orth_reg_weight,
            hold_mask=config.hold_mask,
        )

    def budget_parameters(self, adapted: Any) -> int:
        return final_budget_parameters(self.config.target_rank, adapted.layers.values())


def final_budget_parameters(target_rank: float, layers: Iterable[nn.Module]) -> int:
    """AdaLoRA's final size if the budget spread evenly: target_rank x sum(d_in + d_out + 1).

    (The real final count depends on which modules keep their triplets; training starts
    from init_rank triplets per module.)
    """
    return round(target_rank * sum(m.in_features + m.out_features + 1 for m in layers))
