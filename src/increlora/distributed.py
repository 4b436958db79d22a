"""Collectives and sharded-parameter access for the allocators (no-ops in a single process).

In a single process and under DDP every parameter is a plain tensor held whole by each
process, and everything here returns its input unchanged. Under FSDP2
(``torch.distributed.fsdp.fully_shard``) a parameter outside forward/backward is a DTensor
sharded along one dimension (dim 0 by default). The allocators never re-shape or re-create
such a parameter; they address rows by their *global* index and touch only the part this
process holds:

* :func:`local_range` gives the local view of a global range along any dim, plus where that
  view sits inside a value computed for the whole range (every process draws the same
  random rows and keeps its own slice);
* :meth:`LocalShard.local_indices` maps global row indices to local ones;
* :func:`full_tensor` and :func:`gathered_parameters` gather (collectively) what must be
  seen whole, e.g. to export the adapter.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def _collective_device(tensor: torch.Tensor) -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU ones.
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Every process gets rank 0's value, so all take the identical decision."""
    if not is_distributed():
        return tensor
    buf = tensor.to(_collective_device(tensor)).contiguous()
    dist.broadcast(buf, src=0)
    return buf.to(tensor.device)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over processes (matches DDP's averaged gradients)."""
    if not is_distributed():
        return tensor
    buf = tensor.to(_collective_device(tensor))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= dist.get_world_size()
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


# ------------------------------------------------------------------ sharded parameters
def _dtensor_module() -> types.ModuleType | None:
    # A DTensor can only exist once its module is imported; looking it up (instead of
    # importing it, ~1 s) keeps `import increlora` fast and the unsharded path a dict lookup.
    return sys.modules.get("torch.distributed.tensor")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 parameter, gradient or optimizer state)."""
    module = _dtensor_module()
    return module is not None and isinstance(tensor, module.DTensor)


@dataclass(frozen=True)
class LocalShard:
    """The part of a tensor this process holds.

    ``tensor`` aliases the parameter's storage, so in-place writes change the parameter.
    ``dim`` is the sharded dimension (None: the whole tensor is here), and this process holds
    global indices ``[start, stop)`` along it. ``num_shards`` is how many distinct pieces the
    tensor is cut into (1 when whole): summing partial results over all processes counts each
    piece ``world_size / num_shards`` times.
    """

    tensor: torch.Tensor
    dim: int | None
    start: int
    stop: int
    num_shards: int

    def local_indices(self, dim: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local indices, mask of held entries of index)`` for global ``index`` along ``dim``."""
        if dim != self.dim:
            return index, torch.ones_like(index, dtype=torch.bool)
        held = (index >= self.start) & (index < self.stop)
        return index[held] - self.start, held


def local_shard(tensor: torch.Tensor) -> LocalShard:
    """This process's part of ``tensor`` (the tensor itself unless it is a sharded DTensor).

    Supports DTensors with one ``Shard(d)`` placement (FSDP2's ``fully_shard``, also on a 2-D
    HSDP mesh where the other mesh dim is ``Replicate``); the local piece follows
    ``torch.chunk``'s split, which FSDP2 and DTensor use.
    """
    if not is_sharded(tensor):
        return LocalShard(tensor, None, 0, 0, 1)
    api = _dtensor_module()
    local = tensor.to_local()
    sharded = [(i, p) for i, p in enumerate(tensor.placements) if not isinstance(p, api.Replicate)]
    if not sharded:
        return LocalShard(local, None, 0, 0, 1)
    if len(sharded) > 1 or type(sharded[0][1]) is not api.Shard:
        raise NotImplementedError(
            f"increlora supports parameters sharded along one dim (FSDP2 fully_shard, HSDP);"
            f" got placements {tensor.placements}"
        )
    mesh_dim, placement = sharded[0]
    dim, n = placement.dim, tensor.shape[placement.dim]
    num_shards = tensor.device_mesh.size(mesh_dim)
    chunk = math.ceil(n / num_shards)
    start = min(tensor.device_mesh.get_local_rank(mesh_dim) * chunk, n)
    stop = min(start + chunk, n)
    if local.shape[dim] != stop - start:  # another split than torch.chunk's: refuse, never guess
        raise NotImplementedError(
            f"unexpected local shard of {stop - start} rows along dim {dim}, found"
            f" {local.shape[dim]} (placements {tensor.placements})"
        )
    return LocalShard(local, dim, start, stop, num_shards)


def local_range(
    tensor: torch.Tensor, dim: int, start: int, stop: int
) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """The held part of ``tensor``'s global range ``[start, stop)`` along ``dim``.

    Returns ``(view, where)``: ``view`` aliases the tensor (write into it in place), and
    ``value[where]`` cuts the matching part out of a ``value`` shaped like the whole range.
    """
    shard = local_shard(tensor)
    where = [slice(None)] * tensor.dim()
    if shard.dim is None:
        return shard.tensor.narrow(dim, start, stop - start), tuple(where)
    if shard.dim == dim:
        lo = min(max(start, shard.start), shard.stop)
        hi = max(min(stop, shard.stop), lo)
        where[dim] = slice(max(lo - start, 0), max(hi - start, 0))  # empty when disjoint
        return shard.tensor.narrow(dim, lo - shard.start, hi - lo), tuple(where)
    where[shard.dim] = slice(shard.start, shard.stop)
    return shard.tensor.narrow(dim, start, stop - start), tuple(where)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor; for a DTensor an all-gather (collective, differentiable)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def copy_full_(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """``tensor.copy_(full)`` where ``tensor`` may be sharded: each process copies its part."""
    if not is_sharded(tensor):
        tensor.copy_(full)
        return
    view, where = local_range(tensor, 0, 0, tensor.shape[0])
    view.copy_(full[where])


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: a DTensor holding this process's part, or ``full``."""
    if not is_sharded(like):
        return full
    _, where = local_range(like, 0, 0, like.shape[0])
    local = full[where].to(like.device).contiguous()
    return _dtensor_module().DTensor.from_local(
        local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is FSDP-wrapped
    if fsdp is None:
        return []
    return [m for m in module.modules() if isinstance(m, fsdp.FSDPModule)]


@contextlib.contextmanager
def gathered_parameters(module: nn.Module, trainable_only: bool = True) -> Iterator[None]:
    """Within the block, ``module``'s sharded (trainable) parameters are whole, read-only copies.

    Use it to save or export an FSDP2 model's adapter with the ordinary code
    (``adapted.export_peft``, ``adapted.save``): every process must enter it (the gather is
    collective); let only the main process write. Frozen base weights stay sharded unless
    ``trainable_only=False``. A no-op when nothing is sharded (single process, DDP).
    """
    for fsdp_module in _fsdp_modules(module):
        # Registered parameters must be the sharded ones (a root FSDP module keeps its
        # parameters unsharded after forward); state_dict() inside would reshard anyway.
        fsdp_module.reshard()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for owner in module.modules():
            for name, p in list(owner.named_parameters(recurse=False)):
                if is_sharded(p) and (p.requires_grad or not trainable_only):
                    full = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
                    swapped.append((owner, name, p))
                    setattr(owner, name, full)
        yield
    finally:
        for owner, name, p in swapped:
            setattr(owner, name, p)
