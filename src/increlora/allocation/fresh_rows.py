"""Ranks that start training mid-run behave like freshly created parameters.

IncreLoRA's "restart warmup" gives parameters activated at a growth round their own learning
rate: a linear warm-up from 0 to the peak lr over ``warmup`` steps, then a linear decay to 0
at the end of training. The peak is the highest lr the user's schedule has reached so far
(whatever the scheduler: OneCycleLR, warm-up + cosine, constant, LambdaLR). The original code adds an optimizer param group per round,
which breaks DDP and torch LR schedulers. Here no param group is added: rows live inside the
pre-allocated tensors, and after each ``optimizer.step()`` their new values are corrected:

* Adam / AdamW (the common case): the row's update is recomputed exactly as a fresh Adam
  would apply it, from the row's moments (zeroed at activation) with the bias correction of
  the row's own age and the row's own learning rate. This removes the ~3x first-step jump a
  stale step count would cause.
* Any other optimizer whose update is linear in the learning rate (SGD, momentum, RMSprop,
  Adagrad...): the row's step is scaled by ``row_lr / group_lr``.

At activation every optimizer state tensor shaped like the parameter gets those rows zeroed.

Rows are global indices; with FSDP2-sharded parameters (and optimizer states, sharded the
same way) each process corrects the rows it holds (``increlora.distributed.local_shard``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import local_shard
from ..layers.triplet import TripletLayer


@dataclass
class _Rows:
    param: torch.nn.Parameter  # the key of the optimizer's state and param group
    local: torch.Tensor  # the part of param this process holds (the whole param if unsharded)
    dim: int
    index: torch.Tensor  # local indices along dim
    start: torch.Tensor  # step after which the row started training
    old: torch.Tensor


def _local(
    tensor: torch.Tensor, dim: int, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local part of tensor, local indices of the held global ``index`` along ``dim``)."""
    shard = local_shard(tensor)
    return shard.tensor, shard.local_indices(dim, index)[0].to(shard.tensor.device)


def _state_rows_zero(optimizer: torch.optim.Optimizer, p: torch.Tensor, dim: int, idx) -> None:
    for value in optimizer.state.get(p, {}).values():
        if torch.is_tensor(value) and value.shape == p.shape:
            local, local_idx = _local(value, dim, idx)
            local.index_fill_(dim, local_idx, 0)


def _is_adam(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return (
        isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
        and not group.get("amsgrad", False)
        and not group.get("maximize", False)
    )


class FreshRows:
    """Per-row start steps and the post-step correction that implements restart warmup."""

    def __init__(
        self,
        layers: list[TripletLayer],
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup: int,
    ) -> None:
        self.layers = layers
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup = warmup
        self.ab_start = [torch.zeros(layer.capacity, dtype=torch.long) for layer in layers]
        self.e_start = [torch.zeros(layer.capacity, dtype=torch.long) for layer in layers]
        self.group_index = {
            id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]
        }
        self.peak_lr: dict[int, float] = {}  # per param group, read at the first step
        self._pending: list[_Rows] = []

    def mark(self, layer_idx: int, ab_rows: range, e_rows: range, step: int) -> None:
        """Rows ``ab_rows`` (A and B) and ``e_rows`` (e) start training after ``step``."""
        layer = self.layers[layer_idx]
        for rows, targets in (
            (ab_rows, ((layer.lora_A, 0), (layer.lora_B, 1))),
            (e_rows, ((layer.lora_E, 0),)),
        ):
            if len(rows) == 0:
                continue
            start = self.ab_start if targets[0][0] is layer.lora_A else self.e_start
            start[layer_idx][rows.start : rows.stop] = step
            idx = torch.arange(rows.start, rows.stop)
            for p, dim in targets:
                _state_rows_zero(self.optimizer, p, dim, idx)

    def observe_lr(self) -> None:
        """Track the highest lr each group's schedule has reached (called every step).

        The restart schedule warms new ranks up to this peak. ``initial_lr`` is not it:
        OneCycleLR sets it to max_lr / 25, and a warm-up schedule starts below its peak.
        """
        for g, group in enumerate(self.optimizer.param_groups):
            self.peak_lr[g] = max(self.peak_lr.get(g, 0.0), float(group["lr"]))

    def _peak(self, group_idx: int) -> float:
        return self.peak_lr.get(group_idx, float(self.optimizer.param_groups[group_idx]["lr"]))

    def row_lr(self, peak: float, start: torch.Tensor, step: int) -> torch.Tensor:
        """The restart schedule: warm-up over ``warmup`` steps, then linear decay to 0 at T."""
        age = (step - start).double()
        if self.warmup == 0:
            return torch.full_like(age, float("nan"))  # NaN: keep the group's lr
        warm = peak * age / self.warmup
        decay_len = (self.total_steps - start - self.warmup).clamp(min=1).double()
        decay = peak * (self.total_steps - step) / decay_len
        return torch.where(age <= self.warmup, warm, decay.clamp(min=0.0))

    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot the rows that started mid-run (a few rows: cheap)."""
        self.observe_lr()
        self._pending = []
        for i, layer in enumerate(self.layers):
            for p, dim, start, limit in (
                (layer.lora_A, 0, self.ab_start[i], layer.used_rank),
                (layer.lora_B, 1, self.ab_start[i], layer.used_rank),
                (layer.lora_E, 0, self.e_start[i], layer.active_rank),
            ):
                idx = torch.nonzero(start[:limit] > 0).flatten()
                if not idx.numel():
                    continue
                shard = local_shard(p)
                local_idx, held = shard.local_indices(dim, idx)
                if local_idx.numel():
                    local_idx = local_idx.to(shard.tensor.device)
                    old = shard.tensor.index_select(dim, local_idx).clone()
                    self._pending.append(
                        _Rows(p, shard.tensor, dim, local_idx, start[idx[held]], old)
                    )

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Replace the optimizer's update of fresh rows by a fresh parameter's update."""
        for rows in self._pending:
            group_idx = self.group_index[id(rows.param)]
            group = self.optimizer.param_groups[group_idx]
            lr_now = float(group["lr"])
            lr_row = self.row_lr(self._peak(group_idx), rows.start, step)
            lr_row = torch.where(torch.isnan(lr_row), torch.full_like(lr_row, lr_now), lr_row)
            idx = rows.index
            shape = [1] * rows.local.dim()
            shape[rows.dim] = -1
            lr_row = lr_row.to(rows.local.device, rows.local.dtype).view(shape)
            state = self.optimizer.state.get(rows.param, {})
            if _is_adam(self.optimizer, group) and "exp_avg" in state:
                new = self._fresh_adam(rows, group, state, idx, lr_row, step)
            elif lr_now > 0:
                stepped = rows.local.index_select(rows.dim, idx)
                new = rows.old + (lr_row / lr_now) * (stepped - rows.old)
            else:
                continue
            rows.local.index_copy_(rows.dim, idx, new)
        self._pending = []

    def _fresh_adam(self, rows: _Rows, group: dict, state: dict, idx, lr_row, step: int):
        beta1, beta2 = group["betas"]
        shape = lr_row.shape
        age = (step - rows.start).to(lr_row.device, torch.float64).view(shape)
        bias1 = (1 - beta1**age).to(lr_row.dtype)
        bias2 = (1 - beta2**age).to(lr_row.dtype)
        # Optimizer states are laid out (and sharded) like the parameter: same local indices.
        m = local_shard(state["exp_avg"]).tensor.index_select(rows.dim, idx)
        v = local_shard(state["exp_avg_sq"]).tensor.index_select(rows.dim, idx)
        update = (m / bias1) / (v.sqrt() / bias2.sqrt() + group["eps"])
        decoupled = group.get(
            "decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW)
        )
        old = rows.old
        if decoupled and group["weight_decay"]:
            old = old * (1 - lr_row * group["weight_decay"])
        return old - lr_row * update

    def state_dict(self) -> dict:
        return {
            "ab_start": [t.clone() for t in self.ab_start],
            "e_start": [t.clone() for t in self.e_start],
            "peak_lr": {str(k): v for k, v in self.peak_lr.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.ab_start = [t.clone().long() for t in state["ab_start"]]
        self.e_start = [t.clone().long() for t in state["e_start"]]
        self.peak_lr = {int(k): float(v) for k, v in state["peak_lr"].items()}
