"""The IncreLoRA layer: an SVD-like triplet update whose rank grows inside a fixed capacity.

    y = W0 x + s * B[:, :u] diag(e[:u]) A[:u] dropout(x)

``capacity`` is the most ranks the module may reach (the allocator's limit). How many rows
``A`` (rows x d_in), ``e`` (rows) and ``B`` (d_out x rows) really hold is the *storage*:

* ``storage="dynamic"`` (the default): exactly the ranks in use, ``rows = used_rank``. A
  growth round re-allocates the grown modules' tensors in place (``param.data`` is swapped,
  so the Parameter objects, the optimizer's references and hooks stay), and the allocator
  resizes their gradients and optimizer state to match and rebuilds a DDP reducer
  (docs/memory.md). Memory follows the rank in use.
* ``storage="static"``: ``rows = capacity`` from the start, never reshaped (FSDP2 shards the
  parameters once, so it needs this; ``"auto"`` in the config picks it under FSDP).

Only the prefix ``u = active_rank + reserve_rank`` takes part in the forward pass:

* ranks ``[0, active_rank)`` are active: A, e and B train;
* ranks ``[active_rank, u)`` are the reserve ("advance learning"): A and B train, e is held
  at ``new_rank_e`` (the gradient to it is cut);
* rows ``>= u`` (static storage only) are unused capacity and are kept exactly zero.

Two initialisations (``init``):

* ``"paper"``: A, B ~ N(0, init_std^2) and e = 0, so the update starts at 0. It grows
  like t^3 under Adam (e, A and B each move ~lr per step), so short runs learn slowly.
* ``"lora"``: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (LoRA's Kaiming init), B = 0 and
  e = ``init_e``: the update starts at 0 and grows linearly, like LoRA's. Reserve rows get
  the same A, B = 0 and e held at ``new_rank_e``; when a reserve rank is activated its e is
  set to ``init_e`` and its B scaled by ``e_old / init_e`` (the module's function does not
  change), so it trains like a fresh LoRA rank whose A advance learning has already shaped.

Every in-place change outside forward (new rows, zeroing, loading) goes through
:func:`~increlora.distributed.local_range`, so it also works on FSDP2-sharded parameters:
each process writes only the rows it holds, addressed by their global index.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..distributed import full_tensor, is_sharded, local_range, local_shard
from .base import AdapterLayer, check_shapes

STORAGES = ("dynamic", "static")


def note_ddp(layer: nn.Module) -> None:
    """Remember the DistributedDataParallel module whose forward is running this layer (DDP
    marks itself active during forward): its reducer is rebuilt after the layer is resized."""
    ddp = nn.parallel.DistributedDataParallel._active_ddp_module
    if ddp is not None:
        known = layer.__dict__.get("_increlora_ddp")
        if known is None or known() is not ddp:
            layer.__dict__["_increlora_ddp"] = weakref.ref(ddp)


# (parameter name, the dim that holds the ranks)
RANK_DIMS = (("lora_A", 0), ("lora_E", 0), ("lora_B", 1))


def fit_rows(tensor: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    """``tensor`` with ``rows`` entries along ``dim``: the leading ones kept, new ones zero."""
    if tensor.shape[dim] == rows:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = rows
    out = tensor.new_zeros(shape)
    keep = min(rows, tensor.shape[dim])
    out.narrow(dim, 0, keep).copy_(tensor.narrow(dim, 0, keep))
    return out


class TripletLayer(AdapterLayer):
    """Triplet adapter with a growable active rank (IncreLoRA; AdaLoRA's parameterization)."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        capacity: int,
        init_rank: int,
        reserve_rank: int,
        alpha: float,
        scaling_mode: str = "per_rank",
        dropout: float = 0.0,
        init_std: float = 0.02,
        new_rank_e: float = 1e-5,
        init: str = "paper",
        init_e: float = 1.0,
        generator: torch.Generator | None = None,
        storage: str = "dynamic",
    ) -> None:
        super().__init__(base_layer)
        if capacity > min(self.in_features, self.out_features):
            raise ValueError(
                f"capacity {capacity} exceeds min(d_in, d_out) = "
                f"{min(self.in_features, self.out_features)} of this layer"
            )
        if init_rank > capacity:
            raise ValueError(f"init_rank {init_rank} exceeds capacity {capacity}")
        self.capacity = capacity
        self.alpha = alpha
        self.scaling_mode = scaling_mode
        self.init_rank = init_rank
        self.init_std = init_std
        self.new_rank_e = new_rank_e
        if init not in ("paper", "lora"):
            raise ValueError(f"init must be 'paper' or 'lora', got {init!r}")
        self.init = init
        self.init_e = init_e
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.storage = storage
        self.active_rank = init_rank
        self.used_rank = min(capacity, init_rank + reserve_rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The adapter lives in fp32 whatever the base dtype (the usual mixed-precision setup).
        device = base_layer.weight.device
        rows = capacity if storage == "static" else self.used_rank
        self.rows = rows  # rows the tensors hold (global, also when FSDP2 shards them)
        self.lora_A = nn.Parameter(torch.zeros(rows, self.in_features, device=device))
        self.lora_E = nn.Parameter(torch.zeros(rows, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rows, device=device))
        self._init_rows(0, self.used_rank, generator)
        with torch.no_grad():
            # paper: e = 0, so the update starts at 0; lora: B = 0 does that, e trains at once
            self.lora_E[: self.active_rank] = 0.0 if init == "paper" else init_e
        # Accumulates G = dL/d(dW) over micro-batches when the paper's importance is scored;
        # with ``grad_rows`` set, only those output rows of G (a sampled estimate).
        self.grad_product: torch.Tensor | None = None
        self.grad_rows: torch.Tensor | None = None
        # Accumulate the task loss's gradients of the used A, e, B (the forward path only, so
        # a regularizer added to the loss never reaches them) when the proxy is scored.
        self.task_grads: dict[str, torch.Tensor] | None = None

    @property
    def reserve_rank(self) -> int:
        return self.used_rank - self.active_rank

    @property
    def scaling(self) -> float:
        if self.scaling_mode == "constant":
            return self.alpha / self.init_rank
        return self.alpha / self.active_rank

    @torch.no_grad()
    def _init_rows(self, start: int, stop: int, generator: torch.Generator | None) -> None:
        """Fresh ranks: A and B ~ N(0, init_std^2) (paper) or A ~ U(+-1/sqrt(d_in)) and
        B = 0 (lora); e = new_rank_e.

        Every process draws the whole rows from the same generator and keeps the part it
        holds, so sharded and whole copies get identical values.
        """
        if stop <= start:
            return
        n = stop - start
        if self.init == "lora":
            bound = self.in_features**-0.5
            a = (torch.rand(n, self.in_features, generator=generator) * 2 - 1) * bound
            b = torch.zeros(self.out_features, n)
        else:
            a = torch.randn(n, self.in_features, generator=generator) * self.init_std
            b = torch.randn(self.out_features, n, generator=generator) * self.init_std
        view, where = local_range(self.lora_A, 0, start, stop)
        view.copy_(a[where])
        view, where = local_range(self.lora_B, 1, start, stop)
        view.copy_(b[where])
        local_range(self.lora_E, 0, start, stop)[0].fill_(self.new_rank_e)

    def _used_e(self) -> torch.Tensor:
        e = self.lora_E[: self.used_rank]
        if self.used_rank > self.active_rank:  # reserve e is frozen: cut its gradient
            e = torch.cat([e[: self.active_rank], e[self.active_rank :].detach()])
        return e

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.used_rank
        if self.storage == "dynamic" and torch.is_grad_enabled():
            note_ddp(self)  # the reducer to rebuild when a round re-allocates this layer
        x_d = self.dropout(x.to(self.lora_A.dtype))
        a, e, b = self.lora_A[:u], self._used_e(), self.lora_B[:, :u]
        if self.task_grads is not None and torch.is_grad_enabled():
            for name, tensor in (("lora_A", a), ("lora_E", e), ("lora_B", b)):
                if tensor.requires_grad:
                    tensor.register_hook(self._accumulate_into(self.task_grads[name]))
        h = x_d @ a.T
        out = (h * (e * self.scaling)) @ b.T
        if self.grad_product is not None and out.requires_grad:
            self._capture_grad_product(x_d, out)
        return out

    @staticmethod
    def _accumulate_into(buffer: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            index = tuple(slice(0, n) for n in grad.shape)
            buffer[index].add_(grad.detach().float())

        return hook

    def _capture_grad_product(self, x_d: torch.Tensor, out: torch.Tensor) -> None:
        """Accumulate G += g^T x over tokens, the gradient w.r.t. the dense update dW
        (only the rows in ``grad_rows`` when set: the cost falls by the same factor)."""
        x_flat = x_d.detach().reshape(-1, self.in_features)
        product, rows = self.grad_product, self.grad_rows

        def hook(grad: torch.Tensor) -> None:
            g = grad.reshape(-1, self.out_features)
            if rows is not None:
                g = g.index_select(1, rows)
            product.add_(g.T.float() @ x_flat.float())

        out.register_hook(hook)

    def enable_task_grads(self, enable: bool) -> None:
        """Start (zeroed) or stop accumulating the task gradients of A, e and B."""
        if not enable:
            self.task_grads = None
        elif self.task_grads is None or self.task_grads["lora_E"].shape[0] != self.rows:
            # One buffer shaped like each (unsharded) parameter: the size of its gradient.
            device = self.lora_A.device
            self.task_grads = {
                "lora_A": torch.zeros(self.rows, self.in_features, device=device),
                "lora_E": torch.zeros(self.rows, device=device),
                "lora_B": torch.zeros(self.out_features, self.rows, device=device),
            }
        else:
            for buffer in self.task_grads.values():
                buffer.zero_()

    def delta_weight(self) -> torch.Tensor:
        u = self.used_rank
        return (self.lora_B[:, :u] * (self.lora_E[:u] * self.scaling)) @ self.lora_A[:u]

    def orthogonality(self) -> torch.Tensor:
        """``||A A^T - I||_F + ||B^T B - I||_F`` over the used ranks (orthogonal regularizer).

        Outside forward, FSDP2 parameters are sharded: they are gathered (a differentiable,
        collective all-gather of the small factors; each process's backward keeps its shard).
        """
        u = self.used_rank
        a, b = full_tensor(self.lora_A)[:u], full_tensor(self.lora_B)[:, :u]
        eye = torch.eye(u, device=a.device, dtype=a.dtype)
        return torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Active ranks as plain LoRA factors: A' = diag(e) A, B' = s B (reserve excluded)."""
        r = self.active_rank
        a = self.lora_A[:r] * self.lora_E[:r, None]
        b = self.lora_B[:, :r] * self.scaling
        return a, b

    def num_adapter_parameters(self) -> int:
        ab = self.in_features + self.out_features
        return self.active_rank * (ab + 1) + self.reserve_rank * ab

    @torch.no_grad()
    def grow(self, n_new: int, reserve_rank: int, generator: torch.Generator | None) -> None:
        """Activate ``n_new`` ranks (reserve first, then fresh rows) and refill the reserve."""
        old_active, old_used = self.active_rank, self.used_rank
        new_active = old_active + n_new
        if new_active > self.capacity:
            raise ValueError(f"cannot grow to rank {new_active}: capacity is {self.capacity}")
        new_used = min(self.capacity, new_active + reserve_rank)
        old_scaling = self.scaling
        if self.scaling_mode == "rescale":  # keep s * e constant for the existing ranks
            local_range(self.lora_E, 0, 0, old_active)[0].mul_(new_active / old_active)
        self.active_rank = new_active
        self.used_rank = max(new_used, new_active)
        if self.storage == "dynamic":
            self.resize_storage(self.used_rank)
        self._init_rows(old_used, self.used_rank, generator)
        if self.init == "lora":
            self._activate_lora_style(old_active, new_active, old_scaling / self.scaling)

    @torch.no_grad()
    def _activate_lora_style(self, start: int, stop: int, scaling_ratio: float) -> None:
        """Reserve ranks [start, stop) become active: e -> init_e, B -> B * (s_old e_old) /
        (s_new e_new), so their contribution does not change. In 'rescale' mode e_new is
        init_e * active_rank / init_rank, the value the first ranks' e was rescaled to."""
        if stop <= start:
            return
        e_view, where = local_range(self.lora_E, 0, start, stop)
        e_old = full_tensor(self.lora_E.detach())[start:stop].clone()
        e_new = torch.full_like(e_old, self.init_e)
        if self.scaling_mode == "rescale":
            e_new *= self.active_rank / self.init_rank
        e_view.copy_(e_new[where])
        b_view, where = local_range(self.lora_B, 1, start, stop)
        b_view.mul_((scaling_ratio * e_old / e_new)[where[1]])

    @torch.no_grad()
    def drop_reserve(self) -> None:
        """End of growth: reserve ranks are removed (zeroed, excluded from everything)."""
        self.used_rank = self.active_rank
        if self.storage == "dynamic":
            self.resize_storage(self.used_rank)
        self.enforce_unused_zero()

    @torch.no_grad()
    def enforce_unused_zero(self) -> None:
        """Rows outside the used prefix stay exactly zero and reserve e stays frozen.

        Called after every optimizer step: optimizers may touch rows that had zero gradient
        (AdamW's weight decay, stale moments), and this keeps the invariant for any optimizer.
        """
        u, rows = self.used_rank, self.rows
        if u < rows:  # static storage: unused capacity
            local_range(self.lora_A, 0, u, rows)[0].zero_()
            local_range(self.lora_B, 1, u, rows)[0].zero_()
            local_range(self.lora_E, 0, u, rows)[0].zero_()
        local_range(self.lora_E, 0, self.active_rank, u)[0].fill_(self.new_rank_e)

    @torch.no_grad()
    def resize_storage(self, rows: int) -> bool:
        """Hold ``rows`` ranks: each tensor (and its gradient) is re-allocated with the leading
        rows kept and new rows zero. The Parameter objects stay (``.data`` is swapped), so an
        optimizer and hooks keep them; what else follows a parameter's shape (optimizer
        state, a DDP reducer) is the caller's to fit: see
        :func:`increlora.allocation.storage.fit_optimizer_state`. Returns whether anything
        changed. Refused on sharded (FSDP2) parameters: those need ``storage="static"``.
        """
        if rows == self.rows:
            return False
        if not (1 <= rows <= self.capacity):
            raise ValueError(f"cannot hold {rows} ranks: capacity is {self.capacity}")
        if any(is_sharded(getattr(self, name)) for name, _ in RANK_DIMS):
            raise RuntimeError(
                "IncreLoRA: these parameters are sharded (FSDP2) and cannot be re-allocated;"
                " inject with storage='static' (docs/memory.md)"
            )
        for name, dim in RANK_DIMS:
            param = getattr(self, name)
            new = fit_rows(param.data, dim, rows)
            # A graph of an earlier step that is still referenced (a loss kept in a variable)
            # keeps the parameter's gradient accumulator alive, and autograd would reuse it
            # with the old shape. Torch drops the cached accumulator when the data changes
            # dtype, so pass through an empty tensor of another dtype first.
            other = torch.float64 if new.dtype != torch.float64 else torch.float32
            param.data = new.new_empty(0, dtype=other)
            param.data = new
            if param.grad is not None:
                param.grad = fit_rows(param.grad, dim, rows)
        self.rows = rows
        if self.task_grads is not None:
            self.task_grads = {
                name: fit_rows(self.task_grads[name], dim, rows) for name, dim in RANK_DIMS
            }
        return True

    def take_saved_rows(self, saved_e: object) -> bool:
        """Dynamic storage: hold as many rows as a saved ``lora_E`` has (before its weights
        and optimizer state are loaded). Returns whether the storage is dynamic and ``saved_e``
        a plausible e vector, i.e. whether the shape was taken."""
        if not (
            self.storage == "dynamic"
            and torch.is_tensor(saved_e)
            and saved_e.dim() == 1
            and 1 <= saved_e.shape[0] <= self.capacity
        ):
            return False
        self.resize_storage(int(saved_e.shape[0]))
        return True

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # A state dict of dynamic storage holds the ranks in use: take its shape first.
        # Static storage takes a shorter (dynamic) state padded with zero rows.
        stored = state_dict.get(prefix + "lora_E")
        if self.take_saved_rows(stored):
            self.used_rank = min(self.used_rank, self.rows)
            self.active_rank = min(self.active_rank, self.used_rank)
        elif (
            self.storage == "static"
            and torch.is_tensor(stored)
            and stored.dim() == 1
            and 1 <= stored.shape[0] < self.rows
        ):
            for name, dim in RANK_DIMS:
                key = prefix + name
                if torch.is_tensor(state_dict.get(key)):
                    state_dict[key] = fit_rows(state_dict[key], dim, self.rows)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        u = self.used_rank
        return {"lora_A": self.lora_A[:u], "lora_E": self.lora_E[:u], "lora_B": self.lora_B[:, :u]}

    def rank_state(self) -> dict:
        return {"active_rank": self.active_rank, "used_rank": self.used_rank}

    def check_adapter_state(self, tensors: dict[str, torch.Tensor], rank_state: dict) -> None:
        active, used = int(rank_state["active_rank"]), int(rank_state["used_rank"])
        if not (1 <= active <= used <= self.capacity):
            raise ValueError(
                f"ranks (active={active}, used={used}) do not fit this layer's capacity"
                f" {self.capacity}; inject with a larger max_rank"
            )
        expected = {
            "lora_A": (used, self.in_features),
            "lora_E": (used,),
            "lora_B": (self.out_features, used),
        }
        check_shapes(tensors, expected)

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor], rank_state: dict) -> None:
        self.set_ranks(int(rank_state["active_rank"]), int(rank_state["used_rank"]))
        u = self.used_rank
        for key, dim in RANK_DIMS:
            param = getattr(self, key)
            local_shard(param).tensor.zero_()
            view, where = local_range(param, dim, 0, u)
            view.copy_(tensors[key][where])

    def set_ranks(self, active_rank: int, used_rank: int) -> None:
        """Restore rank bookkeeping (loading a saved adapter or a checkpoint)."""
        if not (1 <= active_rank <= used_rank <= self.capacity):
            raise ValueError(
                f"ranks (active={active_rank}, used={used_rank}) do not fit capacity "
                f"{self.capacity}"
            )
        self.active_rank, self.used_rank = active_rank, used_rank
        if self.storage == "dynamic":
            self.resize_storage(used_rank)  # no-op when the shapes were restored already

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, active_rank={self.active_rank}, "
            f"reserve_rank={self.reserve_rank}, capacity={self.capacity}, storage={self.storage}"
        )
