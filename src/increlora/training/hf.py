"""Hugging Face Trainer integration: a Trainer that runs the method's controller for you.

One line replaces ``Trainer``::

    adapted = increlora.inject(model, IncreLoRAConfig(target_rank=2))
    trainer = IncreLoRATrainer(model=model, adapted=adapted, args=args, train_dataset=ds)
    trainer.train()                                 # or train(resume_from_checkpoint=True)

What it wires in, so none of it can be forgotten (PEFT's AdaLoRA needs a hand-written
``update_and_allocate`` call and silently does nothing without it):

* the controller (IncreLoRA's allocator) is built once the optimizer exists and is prepared
  (``on_train_begin``; under FSDP2 that is after the parameters were sharded);
* ``controller.step()`` runs in ``on_optimizer_step`` (after ``optimizer.step()``, before
  ``zero_grad()``, once per optimizer step whatever the gradient accumulation); an fp16 step
  the grad scaler skipped is a no-op, and the controller finds accelerate's scaler on the
  optimizer, so its scores use unscaled gradients;
* ``compute_loss`` adds ``controller.regularization_loss()`` (once per optimizer step in
  total, however the Trainer normalizes the loss for gradient accumulation);
* each growth event is logged through ``Trainer.log`` (``state.log_history`` and every
  ``report_to`` logger) as ``increlora/total_rank``, ``increlora/trainable_params``... and
  ``increlora/rank/<module>`` for the modules that grew;
* every Trainer checkpoint gets the controller state (``increlora_controller.json`` +
  ``.safetensors``, pickle-free) and ``resume_from_checkpoint`` restores it, so growth
  continues exactly as in an uninterrupted run;
* at the end the adapter is exported in the PEFT LoRA format to ``export_dir`` (default
  ``<output_dir>/peft_adapter``) for ``peft.PeftModel.from_pretrained``.

It works the same with any method's controller (static methods have a no-op one), under DDP
and FSDP2 as launched by ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..adapter import AdaptedModel
from ..allocation.step_guard import unwrap_optimizer
from ..distributed import gathered_parameters
from ..io import AdapterFileError, load_state, save_state

logger = logging.getLogger("increlora.training")

CONTROLLER_STATE = "increlora_controller"  # <checkpoint>/increlora_controller.{json,safetensors}
DEFAULT_EXPORT = "peft_adapter"


def event_logs(event: dict[str, Any]) -> dict[str, float]:
    """The scalars of a controller event, as Trainer log entries (``increlora/...``)."""
    logs = {
        f"increlora/{key}": float(value)
        for key, value in event.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    for grown in event.get("grown", []):
        logs[f"increlora/rank/{grown['module']}"] = float(grown["rank"])
    return logs


class _ControllerCallback(TrainerCallback):
    """The Trainer events IncreLoRATrainer hooks into (see the module docstring)."""

    def __init__(self, trainer: IncreLoRATrainer) -> None:
        self.trainer = trainer
        self.pending: dict[str, Any] | None = None  # event of this step, logged at step end

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.trainer._start_controller(state.max_steps)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.pending = self.trainer.controller.step()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Logged here, not in on_optimizer_step: global_step now counts the step just taken.
        if self.pending:
            event, self.pending = self.pending, None
            self.trainer.log(event_logs(event))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:  # the controller state is identical on every process
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_state(folder, CONTROLLER_STATE, self.trainer.controller.state_dict())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.trainer._export()


class IncreLoRATrainer(Trainer):
    """``transformers.Trainer`` that trains an adapted model with its controller wired in.

    Args:
        adapted: what :func:`increlora.inject` returned for ``model`` (keyword-only).
        export_dir: where the PEFT LoRA adapter is written when training ends; default
            ``<output_dir>/peft_adapter``; ``None`` skips the export (also skipped for methods
            without an exact LoRA form).
        *args, **kwargs: everything ``transformers.Trainer`` takes. The optimizer must update
            the adapter parameters (the default one does: it takes every trainable parameter).

    After ``train()``, ``trainer.controller`` is the controller (``.rank_pattern()``,
    ``.history`` for IncreLoRA).
    """

    def __init__(
        self,
        *args: Any,
        adapted: AdaptedModel,
        export_dir: str | os.PathLike | None = DEFAULT_EXPORT,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not any(module is adapted.model for module in self.model.modules()):
            raise ValueError(
                "adapted: was injected into another model than the Trainer's; pass"
                " model=<the model given to increlora.inject>"
            )
        self.adapted = adapted
        self.export_dir = export_dir
        self.controller: Any = None
        self._resume_dir: str | None = None
        self.add_callback(_ControllerCallback(self))

    # ---------------------------------------------------------------------- training
    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint`` also restores the controller state."""
        if resume_from_checkpoint is True:  # resolved here too: the controller needs the path
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in {self.args.output_dir}")
        self._resume_dir = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The Trainer's loss plus the controller's regularizer (while training)."""
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.controller is None or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        regularization = self.controller.regularization_loss()
        if self._loss_is_scaled_for_accumulation(num_items_in_batch):
            # training_step will not divide this loss by the accumulation steps: do it for
            # the regularizer, so it counts once per optimizer step like the task loss.
            regularization = regularization / self.current_gradient_accumulation_steps
        loss = loss + regularization.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        # Mirrors Trainer.training_step: it divides the loss by the accumulation steps unless
        # the model or compute_loss_func already normalized it by num_items_in_batch.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    # -------------------------------------------------------------------- controller
    def _start_controller(self, total_steps: int) -> None:
        """Build (or reuse) the controller on the prepared optimizer; restore it on resume."""
        optimizer = unwrap_optimizer(self.optimizer)
        controller = self.adapted.current
        if controller is None:
            # The accelerate wrapper, not the torch optimizer: it carries the fp16 GradScaler.
            controller = self.adapted.controller(self.optimizer, total_steps=total_steps)
        elif getattr(controller, "optimizer", optimizer) is not optimizer:
            raise RuntimeError(
                "this adapted model already has a controller bound to another optimizer; inject"
                " into a fresh model for a new training run"
            )
        if self._resume_dir is not None:
            folder = Path(self._resume_dir)
            if not (folder / f"{CONTROLLER_STATE}.json").is_file():
                raise AdapterFileError(
                    f"{folder}: no {CONTROLLER_STATE}.json; this checkpoint was not written by"
                    " IncreLoRATrainer, so the growth state cannot be restored"
                )
            controller.load_state_dict(load_state(folder, CONTROLLER_STATE))
        self.controller = controller

    def _export(self) -> None:
        if self.export_dir is None or not self.adapted.method.peft_exportable:
            return
        path = Path(self.args.output_dir) / self.export_dir
        # Collective under FSDP2 (every process gathers); the main process writes.
        with gathered_parameters(self.adapted.model):
            if self.is_world_process_zero():
                self.adapted.export_peft(path)
                logger.info("PEFT adapter exported to %s", path)
