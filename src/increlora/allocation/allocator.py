"""The IncreLoRA allocator: scores modules, and every few steps gives rank to the best ones.

Usage, once per optimizer step (the one line)::

    loss = model(**batch).loss + allocator.regularization_loss()
    loss.backward()
    optimizer.step()
    allocator.step()          # after optimizer.step(), before optimizer.zero_grad()
    optimizer.zero_grad()

The allocator hooks into the optimizer (``register_step_pre_hook`` / ``post_hook``) to keep
new ranks behaving like fresh parameters (see ``fresh_rows``), to keep unused capacity at
zero, and to detect misuse: an optimizer step taken without ``allocator.step()`` after the
previous one raises, and ``allocator.step()`` called per micro-batch raises too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import ConfigError, IncreLoRAConfig
from ..distributed import (
    all_reduce_mean_,
    broadcast_from_main,
    is_main_process,
    is_sharded,
    local_shard,
)
from ..layers.triplet import TripletLayer
from .fresh_rows import FreshRows
from .importance import ImportanceEMA, paper_score, proxy_score, sample_rows
from .schedule import GrowthPlan, ModuleSlot, budget_reached, make_plan, select_growth
from .step_guard import StepGuard, check_optimizer_holds, unwrap_optimizer
from .storage import ddp_modules, fit_optimizer_state, rebuild_ddp_reducer

logger = logging.getLogger("increlora.allocation")


def _check_whole_shapes(layers: dict[str, TripletLayer]) -> None:
    """Refuse wrappers that flatten or partition parameters (rows would be misaddressed).

    FSDP2's DTensors report their global shape and pass; FSDP1 (FullyShardedDataParallel)
    and DeepSpeed ZeRO-3 leave flattened views or empty placeholders in the modules.
    """
    for name, layer in layers.items():
        expected = (layer.rows, layer.in_features)
        if tuple(layer.lora_A.shape) != expected:
            raise ConfigError(
                f"{name}.lora_A has shape {tuple(layer.lora_A.shape)}, expected {expected}: its"
                " parameters were flattened or partitioned by a wrapper (FSDP1"
                " FullyShardedDataParallel, DeepSpeed ZeRO-3?). Use FSDP2"
                " (torch.distributed.fsdp.fully_shard; accelerate: fsdp_version: 2) or DDP"
            )


class IncreLoRAAllocator:
    """Growth controller for the TripletLayers of one model (see module docstring)."""

    def __init__(
        self,
        layers: dict[str, TripletLayer],
        config: IncreLoRAConfig,
        optimizer: Any,
        total_steps: int,
    ) -> None:
        self.names = list(layers)
        self.layers = list(layers.values())
        self.config = config
        _check_whole_shapes(layers)
        for name, layer in layers.items():
            if layer.storage == "dynamic" and is_sharded(layer.lora_A):
                raise ConfigError(
                    f"{name}: its parameters were sharded (FSDP2) but the adapters were injected"
                    " with storage='dynamic', which re-allocates them when they grow; inject"
                    " with storage='static' (storage='auto' picks it when ACCELERATE_USE_FSDP"
                    " is set, as accelerate launch and the HF Trainer do; docs/memory.md)"
                )
        self.slots = [
            ModuleSlot(n, m.in_features + m.out_features + 1, m.capacity, m.init_rank)
            for n, m in layers.items()
        ]
        self.plan: GrowthPlan = make_plan(config, self.slots, total_steps)
        self.optimizer = unwrap_optimizer(optimizer)
        check_optimizer_holds(
            self.optimizer,
            {
                f"{n}.{k}": getattr(m, k)
                for n, m in layers.items()
                for k in ("lora_A", "lora_E", "lora_B")
            },
        )
        warmup = config.restart_warmup_steps
        self.fresh = FreshRows(
            self.layers,
            self.optimizer,
            total_steps,
            self.plan.interval if warmup is None else warmup,
        )
        self.ema = ImportanceEMA(len(self.layers), config.beta1, config.beta2)
        self.guard = StepGuard(
            self.optimizer,
            "IncreLoRA",
            call="allocator.step()",
            before_step=self._before_optimizer_step,
            after_step=self._after_optimizer_step,
        )
        # fp16 training: the GradScaler whose scale multiplies the captured dense gradient of
        # the paper score and that skips steps. Taken from accelerate's optimizer wrapper (HF
        # Trainer, the runner); a plain loop with torch.amp.GradScaler sets it by hand.
        self.grad_scaler: torch.amp.GradScaler | None = getattr(optimizer, "scaler", None)
        self._grad_scale = 1.0
        self.growing = True
        self.history: list[dict] = []
        self.rank_trace: list[tuple[int, int]] = [(0, self.total_rank)]
        if is_main_process():
            logger.info(
                "IncreLoRA: %d modules, budget %d %ss, schedule init_warmup=%d interval=%d"
                " top_h=%d add_r=%d (rounds from step %s)",
                len(self.layers),
                self.plan.budget,
                self.plan.unit,
                self.plan.init_warmup,
                self.plan.interval,
                self.plan.top_h,
                self.plan.add_r,
                (self.plan.round_steps() or ["-"])[0],
            )
        if self.plan.uniform and is_main_process():
            logger.warning(
                "IncreLoRA: this run is too short for allocation: each of the %d growth"
                " round(s) gives all %d modules +%d rank (top_h=%d), so every module ends at"
                " the same rank (uniform LoRA in triplet form). Train longer, lower top_h, set"
                " add_r=None or raise growth_end_fraction for modules to compete for rank.",
                self.plan.planned_rounds,
                len(self.layers),
                self.plan.add_r,
                self.plan.top_h,
            )
        self._check_done()
        self._set_capture(1)

    # ----------------------------------------------------------------- bookkeeping
    @property
    def total_rank(self) -> int:
        return sum(m.active_rank for m in self.layers)

    def rank_pattern(self) -> dict[str, int]:
        return {n: m.active_rank for n, m in zip(self.names, self.layers)}

    def _ranks(self) -> list[int]:
        return [m.active_rank for m in self.layers]

    def remove_hooks(self) -> None:
        self.guard.remove()

    @property
    def optimizer_steps(self) -> int:
        return self.guard.optimizer_steps

    # ----------------------------------------------------------- optimizer hooks
    def _before_optimizer_step(self) -> None:
        self.fresh.before_step()
        # GradScaler unscales parameter grads before this hook, but not the gradients the
        # scores captured in backward: keep this backward's scale (update() may change it
        # before allocator.step()). A skipped fp16 step never gets here; its capture is dropped.
        scaler = self.grad_scaler
        if self._capturing() and scaler is not None and scaler.is_enabled():
            self._grad_scale = float(scaler.get_scale())
        else:
            self._grad_scale = 1.0

    def _capturing(self) -> bool:
        return any(
            layer.grad_product is not None or layer.task_grads is not None for layer in self.layers
        )

    def _after_optimizer_step(self, step: int) -> None:
        self.fresh.after_step(step)
        for layer in self.layers:
            layer.enforce_unused_zero()

    # ------------------------------------------------------------------ the step
    def step(self) -> dict | None:
        """Score, and grow at scheduled steps. Returns the growth event of this step, if any."""
        scaler = self.grad_scaler
        t = self.guard.begin(skips_expected=scaler is not None and scaler.is_enabled())
        if t is None:  # no new optimizer step: drop what this micro-batch captured
            self._clear_capture()
            return None
        event = None
        if self.growing:
            if self._scores_at(t):
                self.ema.update(self._raw_scores())
            if self.plan.is_round(t):
                event = self._grow(t)
            self._check_done(t)
            if event is not None:  # after the last round's reserve drop: what really trains
                event["trainable_params"] = self.num_trainable_parameters()
                event["budget_reached"] = not self.growing
        self._set_capture(t + 1)
        return event

    def _clear_capture(self) -> None:
        for layer in self.layers:
            if layer.grad_product is not None:
                layer.grad_product.zero_()
            if layer.task_grads is not None:
                layer.enable_task_grads(True)  # zeroes

    def _scores_at(self, t: int) -> bool:
        if self.config.score_window is None:
            return True
        return self.plan.next_round_after(t - 1) - t < self.config.score_window

    def _set_capture(self, t: int) -> None:
        """Enable, for the scored steps only, what the score needs captured in backward:
        the task gradients of A, e, B (proxy) or dL/d(dW) on sampled rows (paper)."""
        scored = self.growing and self._scores_at(t)
        paper = scored and self.config.importance == "paper"
        for i, layer in enumerate(self.layers):
            layer.enable_task_grads(scored and self.config.importance == "proxy")
            if not paper:
                layer.grad_product, layer.grad_rows = None, None
                continue
            # The same rows on every process (the generator depends on the step only).
            generator = self._generator(t, i, salt=1)
            rows = sample_rows(layer.out_features, self.config.score_rows, generator)
            n_rows = layer.out_features if rows is None else rows.numel()
            layer.grad_rows = None if rows is None else rows.to(layer.lora_A.device)
            if layer.grad_product is None or layer.grad_product.shape[0] != n_rows:
                layer.grad_product = torch.zeros(
                    n_rows, layer.in_features, device=layer.lora_A.device
                )
            else:
                layer.grad_product.zero_()

    def _raw_scores(self) -> torch.Tensor:
        if any(layer.lora_E.grad is None for layer in self.layers):
            raise RuntimeError(
                "IncreLoRA: the adapters have no gradient when scoring. Call allocator.step()"
                " after optimizer.step() and BEFORE optimizer.zero_grad()."
            )
        if self.config.importance == "paper":
            raw = []
            for layer in self.layers:
                all_reduce_mean_(layer.grad_product)
                if self._grad_scale != 1.0:
                    layer.grad_product.div_(self._grad_scale)
                raw.append(paper_score(layer))
                layer.grad_product.zero_()
            return torch.stack([r.to("cpu", torch.float64) for r in raw])
        for layer in self.layers:  # DDP: the mean gradient, as p.grad holds it
            for buffer in layer.task_grads.values():
                all_reduce_mean_(buffer)
                if self._grad_scale != 1.0:
                    buffer.div_(self._grad_scale)
        raw = torch.stack([proxy_score(layer).to("cpu", torch.float64) for layer in self.layers])
        # FSDP: each process scored the entries it holds. Every piece is held by
        # world_size / num_shards processes, so the mean of raw * num_shards is the whole sum.
        shards = torch.tensor(
            [local_shard(layer.lora_A).num_shards for layer in self.layers], dtype=torch.float64
        )
        if shards.max() > 1:
            all_reduce_mean_(raw.mul_(shards))
        return raw

    def _generator(self, t: int, i: int, salt: int = 0) -> torch.Generator:
        # The same seed on every process: new ranks (salt 0) and sampled score rows (salt 1)
        # are identical everywhere without communication.
        seed = self.config.seed * 1_000_003 + t * 10_007 + i + salt * 7_919
        return torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def _grow(self, t: int) -> dict | None:
        scores = broadcast_from_main(self.ema.scores())
        chosen = select_growth(scores.tolist(), self.slots, self._ranks(), self.plan)
        if not chosen:
            return None
        grown = []
        resized = []
        for i, add in chosen:
            layer = self.layers[i]
            old_active, old_used, old_rows = layer.active_rank, layer.used_rank, layer.rows
            layer.grow(add, self.config.reserve_rank, self._generator(t, i))
            if layer.rows != old_rows:  # dynamic storage: optimizer state follows the rows
                resized.append(layer)
                fit_optimizer_state(self.optimizer, layer)
            self.fresh.mark(
                i, range(old_used, layer.used_rank), range(old_active, layer.active_rank), t
            )
            grown.append(
                {
                    "module": self.names[i],
                    "added": add,
                    "rank": layer.active_rank,
                    "score": float(scores[i]),
                }
            )
        self._rebuild_ddp(resized)
        picked = {i for i, _ in chosen}
        rest = [float(scores[i]) for i in range(len(scores)) if i not in picked]
        event = {
            "step": t,
            "grown": grown,
            "threshold": max(rest) if rest else None,
            "total_rank": self.total_rank,
            "trainable_params": self.num_trainable_parameters(),
            "budget": self.plan.budget,
            "unit": self.plan.unit,
            "scores": {n: float(s) for n, s in zip(self.names, scores.tolist())},
        }
        self.history.append(event)
        self.rank_trace.append((t, self.total_rank))
        if is_main_process():
            logger.info(
                "step %d: +rank to %s (best unchosen score %.3g); total rank %d",
                t,
                ", ".join(f"{g['module']} -> {g['rank']} (score {g['score']:.3g})" for g in grown),
                event["threshold"] if event["threshold"] is not None else float("nan"),
                self.total_rank,
            )
        return event

    def _check_done(self, t: int = 0) -> None:
        if self.growing and budget_reached(self.slots, self._ranks(), self.plan):
            self.growing = False
            rows = [layer.rows for layer in self.layers]
            for layer in self.layers:
                layer.drop_reserve()
                layer.grad_product, layer.grad_rows = None, None
                layer.enable_task_grads(False)
            self._follow_storage(rows)
            if is_main_process():
                logger.info(
                    "step %d: budget reached (total rank %d, %d trainable adapter params);"
                    " growth and scoring stop, reserve ranks dropped",
                    t,
                    self.total_rank,
                    self.num_trainable_parameters(),
                )

    def num_trainable_parameters(self) -> int:
        return sum(m.num_adapter_parameters() for m in self.layers)

    # ------------------------------------------------------------------ storage
    def _follow_storage(self, rows_before: list[int]) -> None:
        """Layers re-allocated since ``rows_before`` (dynamic storage): their optimizer state
        takes the new shape and the DDP reducers holding them are rebuilt."""
        resized = [m for m, r in zip(self.layers, rows_before) if m.rows != r]
        for layer in resized:
            fit_optimizer_state(self.optimizer, layer)
        self._rebuild_ddp(resized)

    def _rebuild_ddp(self, layers: list[TripletLayer]) -> None:
        """DDP reducers size their buckets at construction: rebuild those that hold a
        re-allocated parameter (every process resizes the same layers at the same step)."""
        for ddp in ddp_modules(layers):
            rebuild_ddp_reducer(ddp)

    # --------------------------------------------------------------- regularizer
    def regularization_loss(self) -> torch.Tensor:
        """gamma * mean over modules of ||A A^T - I||_F and ||B^T B - I||_F (used ranks)."""
        gamma = self.config.orth_reg_weight
        device = self.layers[0].lora_A.device
        if gamma == 0:
            return torch.zeros((), device=device)
        total = torch.stack([layer.orthogonality() for layer in self.layers]).sum()
        return gamma * total / (2 * len(self.layers))

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "ranks": [[m.active_rank, m.used_rank] for m in self.layers],
            "optimizer_steps": self.guard.optimizer_steps,
            "allocator_steps": self.guard.controller_steps,
            "growing": self.growing,
            "ema": self.ema.state_dict(),
            "fresh": self.fresh.state_dict(),
            "history": self.history,
            "rank_trace": [list(x) for x in self.rank_trace],
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                "allocator state was saved for different modules; was the model injected with"
                " the same target_modules?"
            )
        rows = [layer.rows for layer in self.layers]
        for layer, (active, used) in zip(self.layers, state["ranks"]):
            layer.set_ranks(int(active), int(used))  # dynamic storage: re-allocated to fit
        self._follow_storage(rows)
        self.guard.load_state_dict(
            {
                "optimizer_steps": state["optimizer_steps"],
                "controller_steps": state["allocator_steps"],
            }
        )
        self.growing = bool(state["growing"])
        self.ema.load_state_dict(state["ema"])
        self.fresh.load_state_dict(state["fresh"])
        self.history = list(state["history"])
        self.rank_trace = [tuple(x) for x in state["rank_trace"]]
        if not self.growing:
            for layer in self.layers:
                layer.grad_product, layer.grad_rows = None, None
                layer.enable_task_grads(False)
        self._set_capture(self.optimizer_steps + 1)
