"""The training loop, on Hugging Face accelerate (mixed precision, accumulation, processes).

Per optimizer step: forward, ``loss + controller.regularization_loss()``, backward, clip,
``optimizer.step()``, then ``controller.step()`` (IncreLoRA's growth) and the LR scheduler,
then ``zero_grad()``. Evaluation, best-adapter export and a checkpoint happen every
``eval_every`` steps (or epoch). SIGINT/SIGTERM stop at the next step boundary with a
checkpoint that ``--resume`` continues bit-exactly (same data order, RNG and growth state).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint import (
    discard,
    keep_copy,
    load_training_state,
    remove_stale_writes,
    save_training_state,
)
from ..config import ConfigError
from ..export import EmptyAdapterError
from ..io import atomic_write_json, read_json
from ..methods import get_method
from ..tasks import constant_baseline, is_causal
from . import outputs as O
from .config import FALLBACK_LEARNING_RATE, RunConfig, method_defaults
from .data import TokenizedDataset, eval_loader, load_checked, train_loader
from .evaluate import evaluate, main_metric
from .model import adapt, load_model, max_tokens
from .tracking import Tracking, accelerator_kwargs

logger = logging.getLogger("increlora.runner")


class TrainingStopped(RuntimeError):
    """The run ended early; ``exit_code`` is what the command-line tool returns."""

    exit_code = 1


class TrainingInterrupted(TrainingStopped):
    """Ctrl-C / SIGTERM: a checkpoint was written (when possible) for ``--resume``."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class TrainingDiverged(TrainingStopped):
    """The loss became NaN or infinite; the last good checkpoint was kept."""

    exit_code = 3


@dataclass
class RunResult:
    """Where a run's files are, whether it finished, and its metrics.json content."""

    output_dir: Path
    status: str  # "finished" or "stopped" (stop_at_step reached; continue with --resume)
    metrics: dict[str, Any] | None = None


LOSS_BLOWUP = 10.0
"""A final logged loss this many times the first one means training went wrong while the
loss stayed finite (a learning rate far too high): the run finishes, but says so."""


WEIGHT_BLOWUP = 1e4
"""Trainable weights whose largest magnitude exceeds this many times the largest at the start
(at least 1) have exploded: no trained adapter or head is that far from its start, so such a
state is not checkpointed or exported, and the run stops (a NaN loss would follow)."""


def _loss_summary(first: float | None, last: float | None) -> dict[str, Any]:
    blew_up = first is not None and last is not None and last > LOSS_BLOWUP * max(first, 1e-8)
    return {"first": first, "last": last, "blew_up": blew_up}


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task loss of one micro-batch (a seam: tests inject faults here)."""
    return model(**batch).loss


def optimizer_update(optimizer: Any, controller: Any, scheduler: Any) -> dict | None:
    """``optimizer.step()``, the controller, the LR scheduler; returns the controller's event.

    ``optimizer`` is accelerate's wrapper: under fp16 its GradScaler skips a step whose
    gradients overflowed (``step_was_skipped``). The scheduler then does not step. A controller
    that takes the grad scaler (IncreLoRA's allocator) is called on that step too: the call is
    a no-op that drops what the overflowed backward captured (the paper score's gradient,
    inf/NaN then), which would otherwise poison the importance EMA for good. Controllers
    without one capture nothing between steps, and their step guard would take a skip one
    good step after another for a per-micro-batch call: they see only real steps.
    """
    optimizer.step()
    skipped = bool(getattr(optimizer, "step_was_skipped", False))
    event = None
    if not skipped or getattr(controller, "grad_scaler", None) is not None:
        event = controller.step()
    if not skipped:
        scheduler.step()
    return event


class _Signals:
    """SIGINT/SIGTERM set ``received``; the loop stops at the next step boundary.

    A second signal raises KeyboardInterrupt at once (the loop still saves the last
    boundary's state when the interruption did not land inside an optimizer update); it is
    kept in ``again`` so the run reports it (SIGTERM: exit code 143). Signals that arrive
    while that interruption is being saved (``stopping``) are reported and otherwise ignored,
    so the run always ends with its "continue with --resume" line.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.again: int | None = None
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stopping:
            O.say(f"{signal.Signals(signum).name} received: already stopping, saving first")
            return
        if self.received is not None:
            self.again = signum
            raise KeyboardInterrupt
        self.received = signum
        O.say(
            f"{signal.Signals(signum).name} received: stopping after this step with a"
            " checkpoint (send it again to stop at once)"
        )

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                # An ignored signal stays ignored (nohup, `cmd &` in scripts ignore SIGINT).
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class RunState:
    """Everything a resumed run must get back besides weights, optimizer and schedules: the
    progress counters and what has been measured so far. Saved whole in every checkpoint
    (its field names are the checkpoint's keys) and restored whole on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: dict[str, Any] | None = None
    last_eval: dict[str, Any] | None = None
    base_eval: dict[str, Any] | None = None  # causal LM: the base model's metrics
    exported_step: int | None = None
    peft_error: str | None = None
    elapsed_s: float = 0.0  # wall time of the earlier sittings (this one is added on save)
    train_time_s: float = 0.0
    loss_window: list[float] = field(default_factory=list)  # task losses since the last log
    first_loss: float | None = None  # the first logged mean task loss
    last_loss: float | None = None  # the latest one
    # What makes a checkpoint good: the largest micro-batch loss since the last checkpoint,
    # the largest |trainable weight| at the start, and why the checkpoint on disk is not a
    # good one (None: it is; see Trainer._checkpoint). While it is not, the last good one is
    # kept in checkpoint-good/: its step.
    peak_loss: float | None = None
    weight_scale: float | None = None
    checkpoint_flaw: str | None = None
    good_checkpoint_step: int | None = None

    def elapsed(self, sitting_s: float) -> float:
        """Wall time of the whole run: the earlier sittings plus this one's ``sitting_s``."""
        return self.elapsed_s + sitting_s

    def saved(self, sitting_s: float) -> dict[str, Any]:
        """The checkpoint's copy, with this sitting's ``sitting_s`` seconds counted."""
        return {**asdict(self), "elapsed_s": self.elapsed(sitting_s)}

    @classmethod
    def restored(cls, saved: dict[str, Any]) -> RunState:
        """From a checkpoint's copy; a field an older checkpoint lacks keeps its default."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


class Trainer:
    """One run: setup from a RunConfig, the loop, evaluation, checkpoints and outputs."""

    def __init__(self, config: RunConfig, resume: bool = False) -> None:
        from accelerate import Accelerator

        self.config = config
        self.resume = resume
        self.out = config.resolved_output_dir()
        self.sitting_start = time.time()
        train = config.train
        if train.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError(
                "train.mixed_precision: fp16 needs a CUDA GPU (on the CPU it would run in float32"
                " with no loss scaling while the run recorded fp16); use bf16 or no"
            )
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            # Without a GPU, several processes (torchrun) must be told to use gloo on CPU.
            cpu=not torch.cuda.is_available(),
            **accelerator_kwargs(train.report_to, self.out),  # live trackers (report_to)
        )
        self.main = self.accelerator.is_main_process
        self.tracking = Tracking(self.accelerator, train.report_to)
        self.log = O.RunLog(self.out / O.TRAIN_LOG, enabled=self.main)
        self.state = RunState()  # restored whole from a checkpoint on resume
        self.last_checkpoint_step: int | None = None
        self.busy: str | None = None  # what is running while the state is between boundaries

    # ------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Data, model, method, optimizer, schedules and controller (then the checkpoint)."""
        from accelerate.utils import set_seed
        from transformers import get_linear_schedule_with_warmup

        cfg, acc = self.config, self.accelerator
        get_method(cfg.method.name)  # an unknown method fails before minutes of loading
        set_seed(cfg.train.seed)
        data_cfg = cfg.data
        self.data = load_checked(
            data_cfg.task,
            data_cfg.data_dir,
            seed=cfg.train.seed,
            train_size=data_cfg.train_size,
            eval_size=data_cfg.eval_size,
            split_seed=data_cfg.split_seed,
            validation_size=data_cfg.validation_size,
        )
        task = self.data.task
        self.constant = None  # classification / regression: the learned-nothing score
        if not is_causal(task):
            self.constant = constant_baseline(
                task,
                [example.label for example in self.data.train],
                {split: [e.label for e in examples] for split, examples in self.data.evals.items()},
            )
        self.loaded = load_model(cfg.model, task)
        self.adapted = adapt(cfg.method, self.loaded, cfg.train.seed)
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(self.loaded.model)
        tokenizer = self.loaded.tokenizer
        max_length = max_tokens(self.loaded, data_cfg.max_length)
        self.generation = None
        if is_causal(task):  # prompt -> response: response-only loss, generation eval
            from .generation import CausalLMDataset, GenerationEvaluator, causal_train_loader

            train_set = CausalLMDataset(self.data.train, tokenizer, max_length)
            loader, self.sampler = causal_train_loader(
                train_set, tokenizer.pad_token_id, cfg.train.batch_size, cfg.train.seed
            )
            self.generation = GenerationEvaluator(
                task,
                self.data.evals,
                tokenizer,
                max_length,
                data_cfg.max_new_tokens or task.max_new_tokens,
            )
            evals = self.generation.loaders(cfg.train.eval_batch_size)
        else:
            train_set = TokenizedDataset(task, self.data.train, tokenizer, max_length)
            loader, self.sampler = train_loader(
                train_set, tokenizer, cfg.train.batch_size, cfg.train.seed
            )
            evals = {
                split: eval_loader(
                    TokenizedDataset(task, examples, tokenizer, max_length),
                    tokenizer,
                    cfg.train.eval_batch_size,
                )
                for split, examples in self.data.evals.items()
            }
        torch_optimizer = torch.optim.AdamW(
            self.adapted.trainable_parameters(),
            lr=cfg.train.learning_rate or FALLBACK_LEARNING_RATE,  # set below, once steps are known
            weight_decay=cfg.train.weight_decay,
        )
        prepared = acc.prepare(self.loaded.model, torch_optimizer, loader, *evals.values())
        self.model, self.optimizer, self.train_loader = prepared[:3]
        self.eval_loaders = dict(zip(evals, prepared[3:]))
        accumulation = cfg.train.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(len(self.train_loader) / accumulation)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        # Unset: the rate the benchmark chose in the swept cell nearest this run's rank and
        # length (a 48-step rate can diverge in 282 steps; runner.config.METHOD_DEFAULTS).
        entry = method_defaults(
            cfg.method.name, cfg.method.args, rank=cfg.method.target_rank, steps=self.total_steps
        )
        if cfg.train.learning_rate:
            self.learning_rate, self.learning_rate_source = cfg.train.learning_rate, "set"
        elif entry is not None:
            self.learning_rate = entry.learning_rate
            self.learning_rate_source = f"default for {cfg.method.name}: {entry.source}"
        else:
            self.learning_rate = FALLBACK_LEARNING_RATE
            self.learning_rate_source = "default for methods the benchmark has not swept (LoRA's)"
        for group in torch_optimizer.param_groups:
            group["lr"] = self.learning_rate
        self.warmup_steps = (
            round(cfg.train.warmup_ratio * self.total_steps)
            if cfg.train.warmup_steps is None
            else min(cfg.train.warmup_steps, self.total_steps)
        )
        # Not passed to accelerator.prepare: its wrapper steps a scheduler once per process
        # per optimizer step; stepping it ourselves keeps the schedule in optimizer steps.
        self.scheduler = get_linear_schedule_with_warmup(
            torch_optimizer, self.warmup_steps, self.total_steps
        )
        # After prepare: the controller hooks the torch optimizer inside accelerate's wrapper.
        self.controller = self.adapted.controller(self.optimizer, total_steps=self.total_steps)

    def restore(self) -> None:
        """Continue from ``checkpoint/`` (resume), or start the log of a fresh run."""
        checkpoint, good = self.out / O.CHECKPOINT, self.out / O.GOOD_CHECKPOINT
        if self.main:  # what saves killed mid-write (SIGKILL) left; puts a swapped-out one back
            written = (O.CHECKPOINT, O.OWN_ADAPTER, O.PEFT_ADAPTER, O.TRAIN_LOG, O.RUN_CONFIG)
            for name in (*written, O.METRICS, O.GOOD_CHECKPOINT):
                remove_stale_writes(self.out / name)
        self.accelerator.wait_for_everyone()
        if self.resume and not checkpoint.is_dir() and good.is_dir():
            raise O.RunDirError(
                f"{checkpoint} is missing but {good} holds the last good checkpoint: to resume"
                f" from it, `mv {shlex.quote(str(good))} {shlex.quote(str(checkpoint))}` and"
                " run the same command again"
            )
        if self.resume and checkpoint.is_dir():
            extra = load_training_state(
                checkpoint, self.adapted, self.optimizer, self.controller, self.scheduler
            )
            fingerprint = self.data.split_info["sha256"]
            if extra["data_sha256"] != fingerprint:
                raise O.RunDirError(
                    f"{checkpoint}: the task data differ from the data this run was trained on"
                    f" (sha256 {extra['data_sha256']} vs {fingerprint}); was a data file"
                    " edited? Start a new run with a new --output-dir."
                )
            if torch.cuda.is_available() and extra.get("cuda_rng"):
                torch.cuda.set_rng_state_all(extra["cuda_rng"])
            if self.accelerator.scaler is not None and extra.get("scaler"):
                self.accelerator.scaler.load_state_dict(extra["scaler"])
            self.state = RunState.restored(extra)
            self.last_checkpoint_step = self.state.step
            if self.state.checkpoint_flaw is None or not good.is_dir():
                # checkpoint/ is good (a copy beside it is older or the same): one is enough.
                self.state.good_checkpoint_step = None
                if self.main:
                    discard(good)
            self.log.truncate_after(self.state.step)
            self.log.write({"event": "resume", "step": self.state.step})
            self._say(f"resumed {self.out} at step {self.state.step}/{self.total_steps}")
            if self.state.checkpoint_flaw is not None:
                self._say(f"{self._kept(then='again')}.")
            return
        if self.main and self.log.path.exists():
            self.log.path.unlink()  # --resume before the first checkpoint: start over
        if self.learning_rate_source != "set":
            self._say(f"learning rate {self.learning_rate:g} ({self.learning_rate_source})")
        self.log.write(
            {
                "event": "start",
                "step": 0,
                "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "learning_rate": self.learning_rate,
                "learning_rate_source": self.learning_rate_source,
                "ranks": self.adapted.rank_pattern(),
                "plan": _plan(self.controller),
                "trainable_params": self.adapted.num_trainable_parameters(),
            }
        )

    # -------------------------------------------------------------------------- loop
    def train(self) -> RunResult:
        with _Signals() as signals:
            try:
                if self.generation is not None and self.config.train.eval_base:
                    self._evaluate_base()
                stopped = self._loop(signals)
            except KeyboardInterrupt:
                signals.stopping = True
                self._interrupted(signals.again)
        if stopped:
            return RunResult(self.out, "stopped")
        return self.finish()

    def _loop(self, signals: _Signals) -> bool:
        """Train to ``total_steps``; True when stopped early at ``stop_at_step``."""
        cfg, acc = self.config.train, self.accelerator
        self.boundary_rng = torch.get_rng_state()
        if self.state.weight_scale is None:  # a fresh run (or a checkpoint from before it)
            self.state.weight_scale = self._largest_weight()[0]
        self.model.train()
        progress = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=None if self.main else True,
            dynamic_ncols=True,
        )
        with progress:
            while self.state.step < self.total_steps:
                self.sampler.set_epoch(self.state.epoch)
                self.train_loader.set_epoch(self.state.epoch)
                batches = self.train_loader
                if self.state.batch_in_epoch:
                    from accelerate import skip_first_batches

                    batches = skip_first_batches(self.train_loader, self.state.batch_in_epoch)
                consumed = self.state.batch_in_epoch
                tick = time.time()
                for batch in batches:
                    consumed += 1
                    with acc.accumulate(self.model):
                        loss = compute_loss(self.model, batch)
                        self._check_finite(loss)
                        value = float(loss.detach())
                        self.state.loss_window.append(value)
                        self.state.peak_loss = max(value, self.state.peak_loss or value)
                        acc.backward(loss + self.controller.regularization_loss())
                        if not acc.sync_gradients:
                            continue
                        self.busy = "an optimizer update"
                        if cfg.max_grad_norm is not None:
                            acc.clip_grad_norm_(
                                self.adapted.trainable_parameters(), cfg.max_grad_norm
                            )
                        event = optimizer_update(self.optimizer, self.controller, self.scheduler)
                        self.optimizer.zero_grad()
                    end_of_epoch = consumed == len(self.train_loader)
                    self.state.epoch, self.state.batch_in_epoch = (
                        (self.state.epoch + 1, 0) if end_of_epoch else (self.state.epoch, consumed)
                    )
                    self.state.step += 1
                    self.state.train_time_s += time.time() - tick
                    progress.update(1)
                    self._log_step(event, progress)
                    self.boundary_rng = torch.get_rng_state()
                    self.busy = None
                    due = (
                        self.state.step % cfg.eval_every == 0
                        if cfg.eval_every is not None
                        else end_of_epoch
                    )
                    if due or self.state.step == self.total_steps:
                        self._evaluate()
                    tick = time.time()
                    if self.state.step == cfg.stop_at_step and self.state.step < self.total_steps:
                        self._checkpoint()
                        self._say(
                            f"stopped at step {self.state.step} (stop_at_step); continue with"
                            f" `increlora train --resume --output-dir {self.out}`"
                        )
                        return True
                    if signals.received is not None:
                        self._interrupted(signals.received)
                    if self.state.step >= self.total_steps:
                        break
        return False

    def _log_step(self, event: dict | None, progress: tqdm) -> None:
        """The growth event of this step, and every ``log_every`` steps a train record."""
        if event is not None:
            self.log.write({"event": "growth", **event})
            self.tracking.growth(
                self.state.step,
                sum(self.adapted.rank_pattern().values()),
                self.adapted.num_trainable_parameters(),
            )
        if self.state.step % self.config.train.log_every and self.state.step != self.total_steps:
            return
        window = self.state.loss_window
        total_rank = sum(self.adapted.rank_pattern().values())
        record = {
            "event": "train",
            "step": self.state.step,
            "epoch": round(self.state.step / self.steps_per_epoch, 3),
            "loss": sum(window) / max(1, len(window)),
            "reg_loss": float(self.controller.regularization_loss().detach()),
            "lr": self.scheduler.get_last_lr()[0],
            "total_rank": total_rank,
            "trainable_params": self.adapted.num_trainable_parameters(),
            "train_time_s": round(self.state.train_time_s, 3),
        }
        window.clear()
        if self.state.first_loss is None:
            self.state.first_loss = record["loss"]
        self.state.last_loss = record["loss"]
        self.log.write(record)
        self.tracking.train(record)
        progress.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", rank=total_rank
        )

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
        if float(self.accelerator.reduce(bad, reduction="sum")) == 0:
            return
        self.log.write(
            {"event": "diverged", "step": self.state.step + 1, "loss": float(loss.detach())}
        )
        raise TrainingDiverged(
            f"the loss became {float(loss.detach())} at step {self.state.step + 1} (epoch"
            f" {self.state.epoch}); training stopped and {self._kept()}. {self._advice()}"
        )

    def _kept(self, then: str | None = "resume") -> str:
        """What the checkpoints on disk are worth, for a divergence (or resume) message;
        ``then``: how to go on from the good copy ("resume": the resume command, "again":
        the same command again, None: no advice)."""
        where, good = self.out / O.CHECKPOINT, self.out / O.GOOD_CHECKPOINT
        if self.last_checkpoint_step is None:
            return "no checkpoint had been written yet, so there is no good one"
        if self.state.checkpoint_flaw is None:
            return f"the last good checkpoint (step {self.last_checkpoint_step}) is kept in {where}"
        flawed = (
            f"the checkpoint in {where} (step {self.last_checkpoint_step}) is not a good one"
            f" ({self.state.checkpoint_flaw})"
        )
        if self.state.good_checkpoint_step is None:
            return f"{flawed}; no good checkpoint was kept"
        step = self.state.good_checkpoint_step
        kept = f"{flawed}; the last good checkpoint (step {step}) is kept in {good}"
        if then is None:
            return kept
        command = "the same command again" if then == "again" else f"`{self._resume_command()}`"
        return (
            f"{kept}: to resume from it instead, `rm -r {shlex.quote(str(where))} &&"
            f" mv {shlex.quote(str(good))} {shlex.quote(str(where))}`, then run {command}"
        )

    def _resume_command(self) -> str:
        return f"increlora train --resume --output-dir {shlex.quote(str(self.out))}"

    def _advice(self) -> str:
        return (
            f"Lower the learning rate (now {self.learning_rate:g}), keep max_grad_norm set, or"
            " use fp32, and start a new run with a new --output-dir."
        )

    def _largest_weight(self) -> tuple[float, str | None]:
        """The largest |value| over this process's part of the trainable weights and where it
        is (inf / nan when one is non-finite: the first such tensor is named)."""
        largest, where = 0.0, None
        with torch.no_grad():
            for name, p in self.adapted.named_trainable_parameters():
                local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
                if local.numel() == 0:
                    continue
                if not torch.isfinite(local).all():
                    return float(local[~torch.isfinite(local)].flatten()[0]), name
                value = float(local.abs().max())
                if value > largest:
                    largest, where = value, name
        return largest, where

    def _check_weights(self) -> None:
        """Stop before a checkpoint or export holds non-finite or exploded weights (the one
        on disk stays): a checkpoint is good only when its weights are finite and within
        WEIGHT_BLOWUP of their start and its loss stayed finite and below LOSS_BLOWUP."""
        largest, name = self._largest_weight()
        limit = WEIGHT_BLOWUP * max(self.state.weight_scale or 0.0, 1.0)
        bad = not math.isfinite(largest) or largest > limit
        flag = torch.tensor(1.0 if bad else 0.0, device=self.accelerator.device)
        if float(self.accelerator.reduce(flag, reduction="sum")) == 0:
            return
        if not bad:
            what = "became non-finite or exploded on another process"
        elif not math.isfinite(largest):
            what = f"became non-finite ({largest} in {name})"
        else:
            what = (
                f"exploded (|w| up to {largest:.3g} in {name}, over {WEIGHT_BLOWUP:g}x the"
                f" largest at the start, {self.state.weight_scale or 0.0:.3g})"
            )
        self.log.write({"event": "diverged", "step": self.state.step, "weights": what})
        raise TrainingDiverged(
            f"the trainable weights {what} at step {self.state.step} (epoch {self.state.epoch});"
            f" training stopped before saving them and {self._kept()}. {self._advice()}"
        )

    def _checkpoint_flaw(self) -> str | None:
        """Why a checkpoint of the current state would not be a good one (the weights are
        checked already): the loss since the last checkpoint rose over LOSS_BLOWUP x the
        first logged one (or the first micro-batch's, before anything was logged)."""
        first = self.state.first_loss
        if first is None and self.state.loss_window:
            first = self.state.loss_window[0]
        peak = self.state.peak_loss
        if first is None or peak is None or peak <= LOSS_BLOWUP * max(first, 1e-8):
            return None
        return (
            f"the loss before it rose to {peak:.4g}, over {LOSS_BLOWUP:g}x the first logged"
            f" {first:.4g}"
        )

    def _interrupted(self, signum: int | None) -> None:
        """Save the last step boundary's state (when consistent) and stop."""
        name = signal.Signals(signum).name if signum is not None else "KeyboardInterrupt"
        command = f"increlora train --resume --output-dir {self.out}"
        if self.busy is not None:
            kept = (
                f"the checkpoint of step {self.last_checkpoint_step} is kept"
                if self.last_checkpoint_step is not None
                else "no checkpoint exists yet"
            )
            raise TrainingInterrupted(
                f"{name} during {self.busy}: that state is incomplete and was not saved; {kept}."
                f" Continue with `{command}`.",
                signum or signal.SIGINT,
            )
        if self.state.step != self.last_checkpoint_step and self.state.step > 0:
            torch.set_rng_state(self.boundary_rng)  # the RNG as the next step would find it
            self._checkpoint()
        self.log.write({"event": "interrupt", "step": self.state.step, "signal": name})
        raise TrainingInterrupted(
            f"{name}: stopped at step {self.state.step}/{self.total_steps} with a checkpoint in"
            f" {self.out / O.CHECKPOINT}; continue with `{command}`",
            signum or signal.SIGINT,
        )

    # -------------------------------------------------------------- eval and saving
    def _evaluate_base(self) -> None:
        """The base model's generation metrics, once, before the first step (never on resume).

        Adapters are switched off; full fine-tuning has none, but at step 0 its weights are
        still the base model's. Greedy decoding draws no random numbers, so the run's random
        stream is the same with and without this evaluation.
        """
        if self.state.base_eval is not None or self.state.step != 0:
            return
        self.busy = "evaluation of the base model"
        full = self.config.method.name == "full"
        with contextlib.nullcontext() if full else self.adapted.disabled():
            metrics = self.generation.evaluate(self.model, self.eval_loaders, self.accelerator, 0)
        task = self.data.task
        self.state.base_eval = {"metrics": metrics, "main": main_metric(task, metrics)}
        self.log.write({"event": "eval_base", "step": 0, "metrics": metrics})
        self._say(
            f"base model (adapters off): {task.main_metric} {self.state.base_eval['main']:.4f}"
        )
        self.busy = None

    def _evaluate(self) -> None:
        """Evaluate, export the adapter if it is the best so far, checkpoint."""
        self.busy = "evaluation and saving"
        task = self.data.task
        if self.generation is not None:
            metrics = self.generation.evaluate(
                self.model, self.eval_loaders, self.accelerator, self.state.step
            )
        else:
            metrics = evaluate(self.model, self.eval_loaders, task, self.accelerator)
        value = main_metric(task, metrics)
        improved = self.state.best is None or value > self.state.best["value"]
        if improved:
            self.state.best = {"step": self.state.step, "value": value, "metrics": metrics}
        self.state.last_eval = {"step": self.state.step, "metrics": metrics}
        self.log.write(
            {
                "event": "eval",
                "step": self.state.step,
                "metrics": metrics,
                "main": value,
                "best": improved,
            }
        )
        self.tracking.evaluation(self.state.step, metrics, value)
        self.tracking.ranks(
            self.adapted.rank_pattern(),
            self.state.step,
            f"Rank per module at step {self.state.step}/{self.total_steps} ({self.config.method.name})",
        )
        stuck = ""
        if self.constant is not None and value <= self.constant["scores"][task.eval_splits[0]]:
            stuck = f"; no better than always predicting {self.constant['prediction']!r}"
        self._say(
            f"step {self.state.step}/{self.total_steps}: {task.main_metric} {value:.4f}"
            f" (best {self.state.best['value']:.4f} at step {self.state.best['step']}){stuck}"
        )
        select_best = self.config.train.select_best
        self._check_weights()  # exploded or NaN weights are neither exported nor checkpointed
        if (improved and select_best) or (not select_best and self.state.step == self.total_steps):
            self._export()
        self._checkpoint()
        self.busy = None

    def _export(self) -> None:
        """Write ``increlora_adapter/`` and the PEFT ``adapter/`` of the current model."""
        if self.main:
            self.adapted.save(self.out / O.OWN_ADAPTER)
            if self.generation is not None:  # the generations of the exported adapter
                from .generation import SAMPLES, write_samples

                write_samples(self.out / SAMPLES, self.generation.samples)
            try:
                self.adapted.export_peft(
                    self.out / O.PEFT_ADAPTER,
                    base_model_name_or_path=self.loaded.resolved.path,
                    task_type="CAUSAL_LM" if self.generation is not None else "SEQ_CLS",
                )
            except (NotImplementedError, EmptyAdapterError) as err:
                self.state.peft_error = str(err)
        self.state.exported_step = self.state.step

    def _checkpoint(self) -> None:
        """Every process calls it (sharded states are gathered); the main one writes."""
        if self.last_checkpoint_step == self.state.step:
            return
        self._check_weights()
        flaw = self._checkpoint_flaw()
        checkpoint, good = self.out / O.CHECKPOINT, self.out / O.GOOD_CHECKPOINT
        before = (self.state.checkpoint_flaw, self.state.good_checkpoint_step, self.state.peak_loss)
        if flaw is not None and self.last_checkpoint_step is not None:
            if self.state.checkpoint_flaw is None:
                # checkpoint/ is good and is about to be replaced by one that is not: keep it
                # first (a complete copy swapped in atomically; a kill before the swap leaves
                # checkpoint/ itself untouched and good).
                if self.main:
                    keep_copy(checkpoint, good)
                self.state.good_checkpoint_step = self.last_checkpoint_step
        elif flaw is None:
            self.state.good_checkpoint_step = None
        self.state.checkpoint_flaw = flaw
        self.state.peak_loss = None  # the next checkpoint judges the losses after this one
        scaler = self.accelerator.scaler
        extra = {
            **self.state.saved(time.time() - self.sitting_start),
            "data_sha256": self.data.split_info["sha256"],
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        try:
            save_training_state(
                checkpoint, self.adapted, self.optimizer, self.controller, self.scheduler, extra
            )
        except BaseException:  # not written (disk full): the state describes the old one again
            self.state.checkpoint_flaw, self.state.good_checkpoint_step = before[:2]
            self.state.peak_loss = before[2]
            raise
        self.last_checkpoint_step = self.state.step
        if flaw is None and self.main:
            discard(good)  # checkpoint/ is good again: the older good copy is not needed

    # ------------------------------------------------------------------------ finish
    def finish(self) -> RunResult:
        """Plots and metrics.json (the last file written: it marks a finished run)."""
        self.accelerator.wait_for_everyone()
        if not self.main:
            return RunResult(self.out, "finished")
        if self.state.checkpoint_flaw is not None:  # a finished run is not resumed
            self._say(f"{self._kept(then=None)}.")
        metrics = self._metrics()
        self._plots(metrics)
        self.log.write({"event": "end", "step": self.state.step})
        atomic_write_json(self.out / O.METRICS, metrics)
        return RunResult(self.out, "finished", metrics)

    def _metrics(self) -> dict[str, Any]:
        assert self.state.best is not None and self.state.last_eval is not None
        task = self.data.task
        ranks = self.adapted.rank_pattern()
        elapsed = self.state.elapsed(time.time() - self.sitting_start)
        peft_ok = self.state.peft_error is None
        return {
            "status": "finished",
            "model": self.config.model,
            "model_path": O.public_path(self.loaded.resolved.path),
            "task": task.name,
            "method": self.config.method.name,
            "target_rank": self.config.method.target_rank,
            "seed": self.config.train.seed,
            "main_metric": task.main_metric,
            "eval_split": task.eval_splits[0],
            "final": self.state.last_eval,
            "best": self.state.best,
            **({"base_model": self.state.base_eval} if self.state.base_eval is not None else {}),
            **({"constant_baseline": self.constant} if self.constant is not None else {}),
            "adapter": {
                "step": self.state.exported_step,
                "selected": "best" if self.config.train.select_best else "final",
                "peft": O.PEFT_ADAPTER if peft_ok else None,
                "peft_unavailable": self.state.peft_error,
                "increlora": O.OWN_ADAPTER,
            },
            "trainable_params": self.adapted.num_trainable_parameters(),
            # Without the task head and other modules_to_save: what budgets are matched on.
            "adapter_params": self.adapted.num_adapter_parameters(),
            "ranks": ranks,
            "total_rank": sum(ranks.values()),
            "steps": self.state.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "wall_time_s": round(elapsed, 2),
            "train_time_s": round(self.state.train_time_s, 2),
            "steps_per_second": round(self.state.step / self.state.train_time_s, 4)
            if self.state.train_time_s
            else None,
            "peak_memory_mb": O.peak_memory_mb(),
            "execution": self._execution(),
            "loss": _loss_summary(self.state.first_loss, self.state.last_loss),
            "versions": O.package_versions(),
            "data": self.data.split_info,
            "config": self.config.to_dict(),
            "resolved": {
                "learning_rate": self.learning_rate,
                "learning_rate_source": self.learning_rate_source,
                "warmup_steps": self.warmup_steps,
                "trained_modules": self.loaded.trained_modules,
                "method_config": self.adapted.config.to_dict(),
                "plan": _plan(self.controller),
            },
        }

    def _execution(self) -> dict[str, Any]:
        """How the run ran: processes, the distributed mode, precision and the global batch
        (a 2-process FSDP2 run must not read like a single-process one)."""
        accelerator, train = self.accelerator, self.config.train
        mode = str(accelerator.distributed_type).rsplit(".", 1)[-1]
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        if mode == "FSDP" and plugin is not None:
            mode = f"FSDP{getattr(plugin, 'fsdp_version', 1)}"
        processes = accelerator.num_processes
        return {
            "processes": processes,
            "distributed": mode,
            "mixed_precision": str(accelerator.mixed_precision),
            "device": str(accelerator.device),
            "global_batch": train.batch_size * processes * train.gradient_accumulation_steps,
        }

    def _plots(self, metrics: dict[str, Any]) -> None:
        ranks = metrics["ranks"]
        if not ranks:
            return
        from .plots import plot_allocation, plot_ranks  # matplotlib: only when plotting

        what = f"{self.config.method.name}, {Path(self.config.model).name}, {self.data.task.name}"
        plot_ranks(
            ranks,
            self.out / O.RANKS_PLOT,
            f"Final rank per module\n{what}, total rank {sum(ranks.values())}",
        )
        records = O.read_log(self.out / O.TRAIN_LOG)
        start = next(r for r in records if r["event"] == "start")
        plan = start.get("plan") or {}
        plot_allocation(
            start["ranks"],
            [r for r in records if r["event"] == "growth"],
            self.total_steps,
            self.out / O.ALLOCATION_PLOT,
            f"Active rank per module type during training ({what})",
            budget=plan.get("budget") if plan.get("unit") == "rank" else None,
        )

    def _say(self, message: str) -> None:
        if self.main:
            O.say(message)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """transformers' gradient checkpointing, non-reentrant: it needs no input that requires
    grad (the embeddings are frozen under an adapter) and keeps the forward hooks that
    collect IncreLoRA's task gradients exact (tested: same scores, same ranks)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support gradient"
            " checkpointing; set it to false"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _plan(controller: Any) -> dict[str, Any] | None:
    plan = getattr(controller, "plan", None)
    return plan.to_dict() if plan is not None else None


def _check_run_dir(config: RunConfig, resume: bool, accelerator: Any) -> None:
    """Check the run directory on every process before any of them writes to it."""
    error = None
    try:
        O.check_run_dir(config.resolved_output_dir(), config.to_dict(), resume)
    except O.RunDirError as err:
        error = err
    accelerator.wait_for_everyone()
    if error is not None:
        raise error


def run(config: RunConfig, resume: bool = False) -> RunResult:
    """Train (or continue) one run; returns when it finished or stopped at stop_at_step.

    Raises TrainingInterrupted / TrainingDiverged (with a message for the user), RunDirError
    for a directory holding another run, and ConfigError / DataError / ModelLoadError for bad
    input.
    """
    out = config.resolved_output_dir()
    if resume and (out / O.METRICS).is_file() and (out / O.RUN_CONFIG).is_file():
        O.check_run_dir(out, config.to_dict(), resume=True)
        O.say(f"{out} already finished; nothing to resume")
        return RunResult(out, "finished", read_json(out / O.METRICS))
    trainer = Trainer(config, resume)
    try:
        _check_run_dir(config, resume, trainer.accelerator)
        trainer.setup()
        if trainer.main:  # claimed only once the run set up: a typo must not lock the directory
            O.write_run_config(out, config.to_dict())
        trainer.restore()
        trainer.tracking.start(config.to_dict(), trainer.state.step)
        return trainer.train()
    finally:
        trainer.tracking.end()
        _release(trainer.accelerator)


def _release(accelerator: Any) -> None:
    """Let the next run in this process pick its own accelerate settings.

    accelerate keeps one process-wide state and refuses a second Accelerator with other
    settings (a bench whose runs differ in mixed precision); the process group stays.
    """
    from accelerate.state import AcceleratorState, GradientState

    accelerator.free_memory()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
