"""Per-module importance: a raw score per optimizer step, smoothed by AdaLoRA's two EMAs.

I_t = b1 I_{t-1} + (1 - b1) s_t              sensitivity
U_t = b2 U_{t-1} + (1 - b2) |s_t - I_t|      uncertainty (uses the new I_t)
score = I_t * U_t
"""

from __future__ import annotations

import math

import torch

from ..distributed import gathered_parameters, local_range
from ..layers.triplet import TripletLayer


@torch.no_grad()
def proxy_score(layer: TripletLayer) -> torch.Tensor:
    """Sum over active ranks i of |e_i g(e_i)| + mean_j |A_ij g(A_ij)| + mean_j |B_ji g(B_ji)|.

    AdaLoRA's triplet sensitivity, summed per module, with ``g`` the task loss's gradient:
    the layer accumulates it from its forward pass (``layer.task_grads``), so a regularizer
    added to the loss (whose gradient ``p.grad`` also holds, and which dominates it while
    e ~ 0) never changes the ranking, nor does gradient clipping.

    With FSDP2-sharded parameters this is the partial sum over the entries this process
    holds (every term is a plain sum over entries once the means are written as sums / n);
    the allocator all-reduces the partial sums.
    """
    if layer.task_grads is None:
        raise RuntimeError("proxy importance needs task-gradient capture; it was not enabled")
    r = layer.active_rank
    total = torch.zeros((), dtype=torch.float32, device=layer.lora_E.device)
    for name, dim, norm in (
        ("lora_E", 0, 1),
        ("lora_A", 0, layer.in_features),  # mean over d_in per rank
        ("lora_B", 1, layer.out_features),  # mean over d_out per rank
    ):
        value, where = local_range(getattr(layer, name), dim, 0, r)
        grad = layer.task_grads[name].narrow(dim, 0, r)[where]
        total += (value.float() * grad).abs().sum() / norm
    return total


@torch.no_grad()
def paper_score(layer: TripletLayer) -> torch.Tensor:
    """sum_ij |dW_ij G_ij| / sqrt(d_out d_in) with G = dL/d(dW) captured in the backward pass.

    When the layer captured only the output rows ``layer.grad_rows`` (k of d_out), the sum
    over those rows is scaled by d_out / k: rows are drawn uniformly without replacement,
    so this is an unbiased estimate of the full sum at k / d_out of the cost.

    With FSDP2-sharded parameters the small factors are gathered (collective: every process
    scores every layer in the same order), so the result is whole on every process.
    """
    if layer.grad_product is None:
        raise RuntimeError("paper importance needs grad capture; it was not enabled")
    with gathered_parameters(layer):
        u = layer.used_rank
        b = layer.lora_B[:, :u]
        rows = layer.grad_rows
        if rows is not None:
            b = b.index_select(0, rows.to(b.device))
        delta = ((b * (layer.lora_E[:u] * layer.scaling)) @ layer.lora_A[:u]).float()
    score = (delta * layer.grad_product).abs().sum()
    if rows is not None:
        score = score * (layer.out_features / rows.numel())
    return score / math.sqrt(layer.out_features * layer.in_features)


def sample_rows(n_rows: int, fraction: float, generator: torch.Generator) -> torch.Tensor | None:
    """``ceil(fraction * n_rows)`` distinct rows drawn uniformly (None: all rows, exact)."""
    k = max(1, math.ceil(fraction * n_rows))
    if k >= n_rows:
        return None
    return torch.randperm(n_rows, generator=generator)[:k].sort().values


class ImportanceEMA:
    """The sensitivity / uncertainty EMAs of a fixed set of modules (float64 on CPU)."""

    def __init__(self, n_modules: int, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity = torch.zeros(n_modules, dtype=torch.float64)
        self.uncertainty = torch.zeros(n_modules, dtype=torch.float64)
        self.updates = 0

    def update(self, raw: torch.Tensor) -> None:
        raw = raw.detach().to("cpu", torch.float64)
        self.sensitivity = self.beta1 * self.sensitivity + (1 - self.beta1) * raw
        delta = (raw - self.sensitivity).abs()
        self.uncertainty = self.beta2 * self.uncertainty + (1 - self.beta2) * delta
        self.updates += 1

    def scores(self) -> torch.Tensor:
        return self.sensitivity * self.uncertainty

    def state_dict(self) -> dict:
        return {
            "sensitivity": self.sensitivity.clone(),
            "uncertainty": self.uncertainty.clone(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["sensitivity"].shape != self.sensitivity.shape:
            raise ValueError(
                f"importance state has {state['sensitivity'].numel()} modules, expected"
                f" {self.sensitivity.numel()}"
            )
        self.sensitivity = state["sensitivity"].to(torch.float64).clone()
        self.uncertainty = state["uncertainty"].to(torch.float64).clone()
        self.updates = int(state["updates"])
