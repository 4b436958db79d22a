"""The few collective operations the allocators need (no-ops in a single process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


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
