"""The protocol every fine-tuning method implements, and the registry of methods.

A method is one small module: a config dataclass, an :class:`~increlora.layers.AdapterLayer`
subclass (the math), and optionally a controller that changes the adapter during training
(IncreLoRA's growth, AdaLoRA's pruning...). Adding a method = one module + one
``register`` line + its row in the shared test matrix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError
from ..layers.base import AdapterLayer


class Controller(Protocol):
    """What a training loop calls; every method has one (static methods a no-op one)."""

    def step(self) -> dict | None:
        """Once per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``."""

    def regularization_loss(self) -> torch.Tensor:
        """Added to the task loss before ``backward()``."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class StaticController:
    """Controller of methods whose adapter does not change during training."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device

    def step(self) -> dict | None:
        return None

    def regularization_loss(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class ModelHandle:
    """The handle every method's injection returns; subclasses define ``_make_controller``.

    Shared by :class:`~increlora.adapter.AdaptedModel` (adapter layers), full fine-tuning and
    the PEFT references, so the runner and users see one interface.
    """

    model: nn.Module
    method: Method
    _controller: Controller | None = None

    @property
    def config(self) -> AdapterConfig:
        return self.method.config

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield name, p

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer must be built from (adapters + modules_to_save)."""
        return [p for _, p in self.named_trainable_parameters()]

    def controller(self, optimizer: Any, total_steps: int) -> Controller:
        """The method's per-step controller (IncreLoRA: the allocator); created once."""
        if self._controller is not None:
            raise RuntimeError("this model already has a controller; reuse adapted.current")
        self._controller = self._make_controller(optimizer, total_steps)
        return self._controller

    def _make_controller(self, optimizer: Any, total_steps: int) -> Controller:
        raise NotImplementedError

    @property
    def current(self) -> Controller | None:
        return self._controller


class Method:
    """Base class of a method: builds its layers and its controller from its config."""

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    # True when every layer's update is exactly B @ A (exportable to the PEFT LoRA format).
    peft_exportable: ClassVar[bool] = False
    # Budget matching (increlora.budget): the config field that sets how many parameters the
    # method trains (LoRA's r, LoRTA's CP rank...); the count must not shrink as it grows.
    # None: the method cannot be budget-matched. Valid values are listed by ``size_grid``.
    size_field: ClassVar[str | None] = None

    def __init__(self, config: AdapterConfig) -> None:
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"method {self.name!r} needs a {self.config_class.__name__}, got"
                f" {type(config).__name__}"
            )
        self.config = config

    # A method that does not wrap layers (full fine-tuning, PEFT's own tuners) defines
    # ``inject_model(self, model) -> AdaptedModel-like handle`` instead of make_layer, and
    # ``load_model(self, model, tensors, path) -> handle`` if load_adapter should restore it.

    def build_layers(self, model: nn.Module, names: list[str]) -> dict[str, AdapterLayer]:
        """Wrap each selected module; override to see all modules at once (budgets)."""
        return {name: self.make_layer(name, model.get_submodule(name)) for name in names}

    def make_layer(self, name: str, base: nn.Module) -> AdapterLayer:
        raise NotImplementedError

    def make_controller(
        self, layers: dict[str, AdapterLayer], optimizer: Any, total_steps: int
    ) -> Controller:
        device = next(iter(layers.values())).base_layer.weight.device
        return StaticController(device)

    @classmethod
    def size_grid(cls, config: AdapterConfig) -> Sequence[float]:
        """Increasing values ``size_field`` may take (override: MELoRA's r steps by n)."""
        return range(1, 1 << 20)

    def budget_parameters(self, adapted: Any) -> int:
        """Trainable adapter parameters the method amounts to, modules_to_save excluded.

        Default: the count right after injection. Methods whose count changes in training
        (growth, pruning) return the count their budget reaches instead.
        """
        return adapted.num_adapter_parameters()


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method: unknown method {name!r}; known methods are {sorted(METHODS)}")
    return METHODS[name]


def method_for_config(config: AdapterConfig) -> type[Method]:
    for cls in METHODS.values():
        if type(config) is cls.config_class:
            return cls
    raise ConfigError(f"no registered method uses {type(config).__name__}")
