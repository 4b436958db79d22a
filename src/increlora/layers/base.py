"""The shared protocol of adapter layers: a frozen base linear map plus a trainable update.

Every method implements one :class:`AdapterLayer` subclass that defines the update branch
(``adapter_forward``) and its dense equivalent (``delta_weight``); merging, disabling and
base-layer bookkeeping (``nn.Linear`` and GPT-2's transposed ``Conv1D``) live here once.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # GPT-2 style layers store the weight as (d_in, d_out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None


def is_supported_base(module: nn.Module) -> bool:
    """Whether ``module`` is a linear map an adapter can wrap."""
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a supported base layer."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    d_in, d_out = module.weight.shape  # Conv1D
    return d_out, d_in


def check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming the tensor unless ``tensors`` has exactly ``expected``'s shapes."""
    if set(tensors) != set(expected):
        raise ValueError(f"expected tensors {sorted(expected)}, found {sorted(tensors)}")
    for n, t in tensors.items():
        if tuple(t.shape) != expected[n]:
            raise ValueError(f"{n} has shape {tuple(t.shape)}, this model needs {expected[n]}")


class AdapterLayer(nn.Module):
    """A frozen base layer ``y = W0 x + b`` plus an adapter update ``delta(x)``.

    Subclasses implement :meth:`adapter_forward` (the factored update, never a dense matrix
    in the forward pass) and :meth:`delta_weight` (the same update as a dense ``d_out x d_in``
    matrix, for merging and for tests). Subclasses whose update is exactly ``B @ A`` also
    implement :meth:`lora_factors`, which makes them exportable to the PEFT LoRA format.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not is_supported_base(base_layer):
            raise TypeError(
                f"cannot adapt {type(base_layer).__name__}: only nn.Linear and transformers'"
                " Conv1D are supported"
            )
        self.base_layer = base_layer
        self.out_features, self.in_features = base_shape(base_layer)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        self.merged = False
        self.disabled = False
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads ``layer.weight`` keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update branch's output for input ``x`` (same leading shape, last dim d_out)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense ``(d_out, d_in)`` matrix, in the adapter's dtype."""
        raise NotImplementedError

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A, B)`` with ``delta_weight() == B @ A`` exactly, or None if not low-rank."""
        return None

    def num_adapter_parameters(self) -> int:
        """Adapter parameters that are really in use (not pre-allocated capacity)."""
        return sum(p.numel() for p in self.adapter_parameters())

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Tensors an adapter-only save stores (methods may trim unused capacity)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    def rank_state(self) -> dict:
        """JSON-able shape bookkeeping needed to rebuild this layer (e.g. its active rank)."""
        return {}

    def check_adapter_state(self, tensors: dict[str, torch.Tensor], rank_state: dict) -> None:
        """Raise ValueError (naming the tensor) unless ``tensors`` fit this layer exactly."""
        check_shapes(tensors, {n: tuple(p.shape) for n, p in self.adapter_state().items()})

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor], rank_state: dict) -> None:
        """Load what :meth:`adapter_state` saved (call :meth:`check_adapter_state` first)."""
        params = dict(self.named_parameters())
        for n, t in tensors.items():
            params[n].copy_(t)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return out
        return out + self.adapter_forward(x).to(out.dtype)

    def _oriented(self, delta: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight
        return (delta.T if self.fan_in_fan_out else delta).to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight (forward then skips the adapter branch)."""
        if not self.merged:
            self.base_layer.weight.add_(self._oriented(self.delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again."""
        if self.merged:
            self.base_layer.weight.sub_(self._oriented(self.delta_weight()))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
