"""IncreLoRA (Zhang et al. 2023, arXiv 2308.12043): triplet adapters that grow from rank 1.

Layers are :class:`~increlora.layers.TripletLayer`; the controller is the
:class:`~increlora.allocation.IncreLoRAAllocator`. Capacity (the most ranks a module may
reach) is ``max_rank`` or ``min(d_in, d_out, 8 * ceil(average target rank) + add_r)``; the
rows really allocated follow ``storage`` (docs/memory.md).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..allocation.allocator import IncreLoRAAllocator
from ..config import ConfigError, IncreLoRAConfig
from ..layers.base import base_shape
from ..layers.triplet import TripletLayer
from .base import Method, register


def average_target_rank(config: IncreLoRAConfig, shapes: list[tuple[int, int]]) -> float:
    """The budget as an average rank (a parameter budget divided by the mean rank cost)."""
    if config.target_rank is not None:
        return config.target_rank
    mean_cost = sum(o + i + 1 for o, i in shapes) / len(shapes)
    return config.target_params / mean_cost / len(shapes)


@register
class IncreLoRA(Method):
    name = "increlora"
    config_class = IncreLoRAConfig
    peft_exportable = True
    size_field = "target_rank"
    # The layer built per module (the PEFT integration builds a TripletLayer subclass).
    layer_class: ClassVar[type[TripletLayer]] = TripletLayer

    @classmethod
    def size_grid(cls, config: IncreLoRAConfig) -> list[float]:
        return [k / 100 for k in range(100, 100 << 10)]  # average ranks 1.00, 1.01, ...

    def budget_parameters(self, adapted: Any) -> int:
        """What the budget amounts to: every module at the average target rank."""
        shapes = [(m.out_features, m.in_features) for m in adapted.layers.values()]
        return round(average_target_rank(self.config, shapes) * sum(o + i + 1 for o, i in shapes))

    def build_layers(self, model: nn.Module, names: list[str]) -> dict[str, TripletLayer]:
        config: IncreLoRAConfig = self.config
        bases = {n: model.get_submodule(n) for n in names}
        shapes = [base_shape(b) for b in bases.values()]
        avg = average_target_rank(config, shapes)
        generator = torch.Generator().manual_seed(config.seed)
        layers = {}
        for name, base in bases.items():
            limit = min(base_shape(base))
            if config.max_rank is not None and config.max_rank > limit:
                raise ConfigError(
                    f"max_rank: {config.max_rank} exceeds min(d_in, d_out) = {limit} of {name};"
                    f" lower max_rank to <= {limit}"
                )
            capacity = config.max_rank or min(limit, 8 * math.ceil(avg) + config.build_add_r)
            if capacity < config.init_rank:
                raise ConfigError(
                    f"init_rank: {config.init_rank} exceeds what {name} can hold ({limit})"
                )
            layers[name] = self.layer_class(
                base,
                capacity=capacity,
                init_rank=config.init_rank,
                reserve_rank=config.reserve_rank,
                alpha=config.alpha,
                scaling_mode=config.scaling,
                dropout=config.dropout,
                init_std=config.init_std,
                new_rank_e=config.new_rank_e,
                init=config.init,
                init_e=config.init_e,
                generator=generator,
                storage=config.resolved_storage,
            )
        total_capacity = sum(m.capacity for m in layers.values())
        if (
            config.target_rank is not None
            and round(config.target_rank * len(layers)) > total_capacity
        ):
            raise ConfigError(
                f"target_rank: average {config.target_rank} over {len(layers)} modules needs"
                f" {round(config.target_rank * len(layers))} ranks but the modules hold at most"
                f" {total_capacity}; raise max_rank or lower target_rank"
            )
        return layers

    def make_controller(
        self, layers: dict[str, Any], optimizer: Any, total_steps: int
    ) -> IncreLoRAAllocator:
        return IncreLoRAAllocator(layers, self.config, optimizer, total_steps)
