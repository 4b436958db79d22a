"""SoRA (Ding et al. 2023, EMNLP, arXiv 2311.11696): sparse low-rank adaptation with a gate.

Each adapted weight gets LoRA factors at a maximum rank ``r_max`` and a gate ``g`` in between::

    y = W0 x + (alpha / r_max) * B diag(g) A dropout(x)

The objective is ``L + lambda ||g||_1``, optimized by proximal gradient: after each optimizer
step ``g <- sign(g) max(|g| - eta_t lambda, 0)`` (soft thresholding), so gates reach exactly
zero; at the end, ranks with ``g == 0`` are pruned and the module's rank is its number of
nonzero gates. The layer is in :mod:`increlora.layers.sora`, the proximal step and the
pruning in :mod:`increlora.allocation.sora`.

Choices (the paper and the official code, TsinghuaC3I/SoRA, differ; each is a config field):

* Gate optimizer: the paper writes a plain proximal-gradient (SGD) step; the official code
  trains the gates with a separate AdamW (same lr schedule, no weight decay) followed by the
  threshold. Here the gates train in the user's optimizer (one optimizer, DDP/FSDP and LR
  schedulers untouched) and the threshold follows in its post-step hook; AdamW's decoupled
  weight decay on the gates is undone (coupled L2 decay, e.g. SGD's, cannot be and warns).
* ``threshold``: ``"lr"`` uses ``eta_t * sparsity`` (the paper); ``"fixed"`` uses ``sparsity``
  per step regardless of the lr (the official SparseAdamW, its ``sparse_lambda_2``).
* ``l1_weight``: the official code also adds ``sparse_lambda * mean |g|`` to the loss
  (default 1e-3), returned here by ``controller.regularization_loss()``.
* ``gate_init``: the official code draws ``g ~ N(0, 1)``; ``"ones"`` starts every gate open.
* Scaling ``alpha / r_max`` and LoRA's init (Kaiming-uniform A, B = 0), as the official code.
* The official code's lambda schedule (raising ``sparse_lambda_2`` in stages to trace a
  sparsity/accuracy curve) is not implemented: it is an analysis tool, not the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..allocation.sora import SoRAController
from ..config import AdapterConfig, ConfigError, option, require
from ..layers.base import base_shape
from ..layers.sora import SoRALayer
from .base import Method, register


@dataclass
class SoRAConfig(AdapterConfig):
    """SoRA: gated LoRA at ``max_rank``, gates sparsified by a proximal L1 step."""

    max_rank: int = option(8, "Maximum rank r_max of every module (the gate's length).")
    sparsity: float = option(
        1.0,
        "Sparsity weight lambda of the proximal step. threshold='lr': gates shrink by"
        " lr * sparsity per step; 'fixed': by sparsity per step (official sparse_lambda_2).",
    )
    threshold: Literal["lr", "fixed"] = option(
        "lr", "'lr': threshold = current lr x sparsity (the paper); 'fixed': = sparsity."
    )
    l1_weight: float = option(
        1e-3, "Weight of the L1 term mean|g| added to the loss (official sparse_lambda)."
    )
    gate_init: Literal["normal", "ones"] = option(
        "normal", "Gate init: 'normal' = N(0, 1) (official code); 'ones' = all open."
    )
    prune_at_end: bool = option(
        True, "Remove the ranks whose gate is zero after the last optimizer step."
    )
    seed: int = option(0, "Seed of the gate init (identical on every process).")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_rank >= 1, "max_rank", f"must be >= 1, got {self.max_rank}")
        require(self.sparsity >= 0, "sparsity", f"must be >= 0, got {self.sparsity}")
        require(self.l1_weight >= 0, "l1_weight", f"must be >= 0, got {self.l1_weight}")
        require(
            self.threshold in ("lr", "fixed"),
            "threshold",
            f"must be 'lr' or 'fixed', got {self.threshold!r}",
        )
        require(
            self.gate_init in ("normal", "ones"),
            "gate_init",
            f"must be 'normal' or 'ones', got {self.gate_init!r}",
        )


@register
class SoRA(Method):
    name = "sora"
    config_class = SoRAConfig
    peft_exportable = True
    size_field = "max_rank"

    def build_layers(self, model: nn.Module, names: list[str]) -> dict[str, SoRALayer]:
        config: SoRAConfig = self.config
        generator = torch.Generator().manual_seed(config.seed)
        layers = {}
        for name in names:
            base = model.get_submodule(name)
            if config.max_rank > min(base_shape(base)):
                raise ConfigError(
                    f"max_rank: {config.max_rank} exceeds min(d_in, d_out) ="
                    f" {min(base_shape(base))} of {name}"
                )
            layers[name] = SoRALayer(
                base,
                max_rank=config.max_rank,
                alpha=config.alpha,
                dropout=config.dropout,
                gate_init=config.gate_init,
                generator=generator,
            )
        return layers

    def make_controller(
        self, layers: dict[str, Any], optimizer: Any, total_steps: int
    ) -> SoRAController:
        config: SoRAConfig = self.config
        return SoRAController(
            layers,
            optimizer,
            total_steps,
            sparsity=config.sparsity,
            threshold=config.threshold,
            l1_weight=config.l1_weight,
            prune_at_end=config.prune_at_end,
        )

    def budget_parameters(self, adapted: Any) -> int:
        """The count the run starts from: r_max x (d_in + d_out + 1) per module (all open)."""
        config: SoRAConfig = self.config
        return sum(
            config.max_rank * (m.in_features + m.out_features + 1) for m in adapted.layers.values()
        )
