"""Storage that follows the rank in use: what must follow a re-allocated adapter tensor.

Under ``storage="dynamic"`` a :class:`~increlora.layers.TripletLayer` holds exactly the ranks
it uses; when the allocator grows a module (or drops its reserve at the end of growth) the
layer swaps its tensors' ``.data`` for re-allocated ones
(:meth:`~increlora.layers.TripletLayer.resize_storage`): the Parameter objects stay, so the
optimizer's param groups, hooks and ``check_optimizer_holds`` are untouched. Two things that
follow a parameter's shape are fitted here:

* **Optimizer state**: every state tensor shaped like the parameter (Adam's ``exp_avg`` and
  ``exp_avg_sq``, SGD's ``momentum_buffer``, RMSprop's ``square_avg``...) keeps its leading
  rows and gets zero rows for new ranks. The allocator then zeroes the moments of every
  newly activated row anyway (``fresh_rows``), so new rows start exactly like a fresh
  parameter, whatever the storage. A state tensor of another shape (factored states such as
  Adafactor's) cannot be fitted row by row and is refused with a one-line error that names
  ``storage='static'``.
* **DDP**: a DistributedDataParallel reducer sizes its buckets at construction. The layers
  remember the DDP module whose forward ran them (``layers.triplet.note_ddp``:
  ``DistributedDataParallel`` marks itself active during forward), and after a round that re-allocated anything the reducer is
  rebuilt with the same steps DDP itself uses when it is unpickled
  (``_build_params_for_reducer`` + ``_ddp_init_helper``). Every process grows the same
  modules at the same step, so all rebuild together.

FSDP2 shards each parameter once: it runs with ``storage="static"`` (``"auto"`` picks it when
accelerate or the HF Trainer set up FSDP).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError
from ..layers.triplet import RANK_DIMS, TripletLayer, fit_rows


def fit_optimizer_state(optimizer: torch.optim.Optimizer, layer: TripletLayer) -> None:
    """Give every optimizer state tensor of ``layer``'s A, e, B the parameter's new shape."""
    for name, dim in RANK_DIMS:
        param = getattr(layer, name)
        state = optimizer.state.get(param)
        if not state:
            continue
        for key, value in list(state.items()):
            if not torch.is_tensor(value) or value.dim() == 0 or value.shape == param.shape:
                continue
            same_elsewhere = value.dim() == param.dim() and all(
                value.shape[d] == param.shape[d] for d in range(param.dim()) if d != dim
            )
            if not same_elsewhere:
                raise ConfigError(
                    f"{type(optimizer).__name__} keeps state {key!r} of shape"
                    f" {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}: it"
                    " cannot follow a growing adapter row by row; set storage='static' in the"
                    " IncreLoRA config (docs/memory.md)"
                )
            state[key] = fit_rows(value, dim, param.shape[dim])


def ddp_modules(layers: list[TripletLayer]) -> list[Any]:
    """The live DDP modules that ran any of ``layers`` (each once)."""
    found: dict[int, Any] = {}
    for layer in layers:
        ref = layer.__dict__.get("_increlora_ddp")
        ddp = ref() if ref is not None else None
        if ddp is not None:
            found[id(ddp)] = ddp
    return list(found.values())


def rebuild_ddp_reducer(ddp: Any) -> None:
    """Re-bucket a DDP module's reducer after its parameters changed shape.

    The same steps as ``DistributedDataParallel.__setstate__`` (private, checked by the
    2-process gloo test in tests/test_distributed.py): drop the old reducer's autograd hooks,
    collect the parameters again, build a new reducer. Call it on every process, between
    optimizer steps.
    """
    ddp._remove_autograd_hooks()
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, mapping, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()


def storage_elements(layers: list[TripletLayer], optimizer: Any = None) -> dict[str, int]:
    """Elements the adapters hold: parameters, gradients, optimizer state, score buffers."""
    params = [getattr(layer, name) for layer in layers for name, _ in RANK_DIMS]
    counts = {
        "parameters": sum(p.numel() for p in params),
        "gradients": sum(p.grad.numel() for p in params if p.grad is not None),
        "optimizer_state": 0,
        "score_buffers": 0,
    }
    if optimizer is not None:
        for p in params:
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.dim() > 0:
                    counts["optimizer_state"] += value.numel()
    for layer in layers:
        if layer.task_grads is not None:
            counts["score_buffers"] += sum(t.numel() for t in layer.task_grads.values())
        if layer.grad_product is not None:
            counts["score_buffers"] += layer.grad_product.numel()
    return counts
