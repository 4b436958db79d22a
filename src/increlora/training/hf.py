"""Hugging Face Trainer integration: the method's controller run for you.

:class:`IncreLoRACallback` does it inside any ``transformers.Trainer`` subclass (plain,
TRL's ``SFTTrainer``...), for a PEFT model (``get_peft_model(model, IncreLoraConfig(...))``)
or an ``increlora.inject``-ed one. :class:`IncreLoRATrainer` is the convenience over it for
``increlora.inject``: one line replaces ``Trainer``::

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
* ``compute_loss`` adds ``controller.regularization_loss()`` with the weight it has against
  the task loss without accumulation, however the Trainer and the model normalize the task
  loss for gradient accumulation (see :meth:`IncreLoRATrainer.regularizer_scale`);
* each growth event is logged through ``Trainer.log`` (``state.log_history`` and every
  ``report_to`` logger) as ``increlora/total_rank``, ``increlora/trainable_params`` (after
  the step: without the reserve ranks dropped when the budget is reached)... and
  ``increlora/rank/<module>`` for the modules that grew; the step the budget is reached logs
  ``increlora/budget_reached``. The Trainer's own loss log of that step is kept;
* every Trainer checkpoint gets the controller state (``increlora_controller.json`` +
  ``.safetensors``, pickle-free) and ``resume_from_checkpoint`` restores it, so growth
  continues exactly as in an uninterrupted run; ``load_best_model_at_end`` restores the best
  checkpoint's controller state (its ranks) together with its weights;
* ``trainer.save_model(d)`` writes what loads without increlora: the merged model
  (``AutoModel...from_pretrained(d)``, with the processing class) and the PEFT LoRA adapter
  in ``d/peft_adapter`` (``PeftModel.from_pretrained``); the Trainer's checkpoints keep the
  full training state;
* at the end the adapter is exported in the PEFT LoRA format to ``export_dir`` (default
  ``<output_dir>/peft_adapter``) for ``peft.PeftModel.from_pretrained``.

It works the same with any method's controller (static methods have a no-op one), under DDP
and FSDP2 as launched by ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import inspect
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
from ..export import EmptyAdapterError
from ..io import AdapterFileError, load_state, save_state
from ..layers.base import AdapterLayer

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


def merged_state_dict(model: torch.nn.Module, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
    """``model``'s state dict as the plain model's: every update folded into its base weight.

    Out of place (the training model is not touched): ``<layer>.base_layer.<key>`` becomes
    ``<layer>.<key>``, the weight gains the layer's dense update, and the adapter's own
    tensors are left out. ``adapted.model`` may sit inside ``model`` (its keys get the prefix).
    """
    prefix = next(
        (f"{name}." if name else "" for name, m in model.named_modules() if m is adapted.model),
        None,
    )
    if prefix is None:
        raise ValueError("adapted: was injected into another model than this one")
    if any(not isinstance(layer, AdapterLayer) for layer in adapted.layers.values()):
        raise NotImplementedError(
            f"method {adapted.method.name!r}: its layers are not increlora adapter layers; save"
            " with the library that made them"
        )
    state = model.state_dict()
    for name, layer in adapted.layers.items():
        base = f"{prefix}{name}.base_layer."
        for key in [k for k in state if k.startswith(f"{prefix}{name}.")]:
            tensor = state.pop(key)
            if not key.startswith(base):
                continue  # the adapter's own parameters and buffers
            plain = f"{prefix}{name}.{key[len(base) :]}"
            if key == f"{base}weight" and not (layer.merged or layer.disabled):
                with torch.no_grad():
                    tensor = tensor + layer._oriented(layer.delta_weight())
            state[plain] = tensor
    return state


def _calling_trainer(max_depth: int = 12) -> tuple[Trainer | None, str | None]:
    """The Trainer whose loop called this callback, and the checkpoint it resumes from.

    A callback is not given the Trainer; it is the ``self`` of a frame up the stack
    (``Trainer._inner_training_loop``, whose ``resume_from_checkpoint`` is the resolved
    path). Found by walking at most ``max_depth`` frames; (None, None) when not found.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                resume = frame.f_locals.get("resume_from_checkpoint")
                return owner, resume if isinstance(resume, str | os.PathLike) else None
        return None, None
    finally:
        del frame


def _find_adapted(model: torch.nn.Module | None) -> Any:
    """The AdaptedModel of the increlora PEFT adapter (IncreLoRA, AdaLoRA) in ``model``, or None."""
    tuner = _peft_tuner(model)
    return None if tuner is None else tuner.adapted


class IncreLoRACallback(TrainerCallback):
    """Growth for any ``transformers.Trainer`` (plain, TRL's ``SFTTrainer``, subclasses).

    ``callbacks=[IncreLoRACallback()]`` on a Trainer whose model holds an IncreLoRA adapter
    made by ``peft.get_peft_model(model, IncreLoraConfig(...))``; pass ``adapted=`` for a
    model made with :func:`increlora.inject`. It wires in what IncreLoRA needs (and drives
    any other method's controller the same way: the package's AdaLoRA, made with
    ``IncreloraAdaLoraConfig``, gets its importance scoring, masking and regularizer):

    * the controller (allocator) is built on the Trainer's optimizer when training begins,
      for the run's ``max_steps`` (schedule fields left unset are derived from them). The
      optimizer is never rebuilt when ranks grow (a module keeps its Parameter objects; the
      allocator fits their optimizer state); new ranks start with fresh optimizer moments
      and their own warm-up;
    * ``controller.step()`` once per optimizer step (``on_optimizer_step``), whatever the
      gradient accumulation; an fp16 step the grad scaler skipped is a no-op;
    * the orthogonal regularizer (``regularize=True``): its gradient is added to the
      adapters' gradients once per optimizer step, before ``optimizer.step()``, so it weighs
      ``orth_reg_weight`` against a mean task loss however the Trainer, the model or a
      custom ``compute_loss`` normalize and accumulate the task loss. It is added after the
      Trainer's gradient clipping (not clipped) and is not part of the logged loss;
    * each growth event is logged with ``Trainer.log`` (``state.log_history`` and every
      ``report_to`` logger) as ``increlora/total_rank``, ``increlora/trainable_params``,
      ``increlora/rank/<module>``..., and ``increlora/budget_reached`` at the step growth ends;
    * every checkpoint gets the controller state (``increlora_controller.json`` +
      ``.safetensors``), and ``resume_from_checkpoint`` restores it: growth continues exactly
      as in an uninterrupted run; ``load_best_model_at_end`` restores the best checkpoint's
      ranks with its weights.

    After training, ``callback.controller`` is the allocator (``rank_pattern()``,
    ``history``).
    """

    def __init__(self, adapted: Any = None, *, regularize: bool = True) -> None:
        self.adapted = adapted
        self.regularize = regularize
        self.controller: Any = None
        # Set by IncreLoRATrainer; otherwise found on the stack when training begins.
        self.trainer: Trainer | None = None
        self.resume_dir: str | None = None
        self._resume_given = False
        self.pending: dict[str, Any] | None = None  # event of this step, logged at step end

    # ------------------------------------------------------------------------- begin
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        trainer, resume = _calling_trainer()
        if self.trainer is None:
            self.trainer = trainer
        if not self._resume_given:
            self.resume_dir = str(resume) if resume else None
        adapted = self.adapted if self.adapted is not None else _find_adapted(model)
        if adapted is None:
            raise ValueError(
                "IncreLoRACallback: the Trainer's model holds no IncreLoRA adapter; wrap it with"
                " peft.get_peft_model(model, IncreLoraConfig(...)) (or IncreloraAdaLoraConfig)"
                " after `import increlora`, or pass"
                " IncreLoRACallback(adapted=increlora.inject(model, config))"
            )
        self.adapted = adapted
        if optimizer is None and trainer is not None:
            optimizer = trainer.optimizer
        controller = adapted.current
        if controller is None:
            # The accelerate wrapper, not the torch optimizer: it carries the fp16 GradScaler.
            controller = adapted.controller(optimizer, total_steps=state.max_steps)
        elif getattr(controller, "optimizer", None) is not unwrap_optimizer(optimizer):
            raise RuntimeError(
                "this adapted model already has a controller bound to another optimizer; inject"
                " into a fresh model for a new training run"
            )
        self._restore(controller, args, state, model)
        self.controller = controller

    def _restore(self, controller: Any, args: Any, state: TrainerState, model: Any) -> None:
        """On resume: the controller state of the checkpoint the Trainer resumes from."""
        folder = Path(self.resume_dir) if self.resume_dir else None
        if folder is None and state.global_step > 0:  # resuming, but the path is unknown
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder is None:
            return
        if (folder / f"{CONTROLLER_STATE}.json").is_file():
            controller.load_state_dict(load_state(folder, CONTROLLER_STATE))
            return
        # A PEFT adapter carries the state in its weights file (loaded with the adapter).
        tuner = _peft_tuner(model)
        loaded = getattr(tuner, "pending_controller_state", None)
        if loaded is not None and _optimizer_steps(loaded) == state.global_step:
            controller.load_state_dict(loaded)
            return
        raise AdapterFileError(
            f"{folder}: no {CONTROLLER_STATE}.json; this checkpoint was not written by"
            " IncreLoRATrainer or IncreLoRACallback, so the growth state cannot be restored"
        )

    # ---------------------------------------------------------------------- each step
    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.regularize or self.controller is None:
            return
        with torch.enable_grad():
            regularization = self.controller.regularization_loss()
            if regularization.requires_grad:
                _unscale_gradients(kwargs.get("optimizer"))
                regularization.backward()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        controller = self.controller
        was_growing = bool(getattr(controller, "growing", False))
        event = controller.step()
        logs = event_logs(event) if event else {}
        if was_growing and not getattr(controller, "growing", False):
            logs["increlora/budget_reached"] = 1.0
        if logs:
            # Counted now: the event counted the reserve ranks dropped when the budget was
            # reached in this same step.
            count = getattr(controller, "num_trainable_parameters", None)
            if count is not None:
                logs["increlora/trainable_params"] = float(count())
            if hasattr(controller, "total_rank"):
                logs["increlora/total_rank"] = float(controller.total_rank)
        self.pending = logs or None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        # Logged here, not in on_optimizer_step: global_step now counts the step just taken.
        if self.pending:
            logs, self.pending = self.pending, None
            if self.trainer is None:  # no Trainer found: the history still records it
                state.log_history.append({**logs, "step": state.global_step})
                return control
            # Trainer.log resets control.should_log, which the default flow callback has just
            # set for a logging step: keep it, or the Trainer's loss log of this step is lost.
            should_log = control.should_log
            self.trainer.log(logs)
            control.should_log = should_log
        return control

    # ------------------------------------------------------------ checkpoints and end
    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:  # the controller state is identical on every process
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_state(folder, CONTROLLER_STATE, self.controller.state_dict())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """``load_best_model_at_end``: the best checkpoint's controller state (its ranks) too."""
        best = state.best_model_checkpoint
        if not (args.load_best_model_at_end and best) or self.controller is None:
            return
        folder = Path(best)
        if not (folder / f"{CONTROLLER_STATE}.json").is_file():
            logger.warning(
                "%s has no %s.json: the best weights were loaded, the ranks were not",
                folder,
                CONTROLLER_STATE,
            )
            return
        self.controller.load_state_dict(load_state(folder, CONTROLLER_STATE))
        logger.info("controller state (ranks) of %s restored with its weights", folder)


def _optimizer_steps(controller_state: dict) -> int | None:
    """The optimizer steps a controller state was saved at (IncreLoRA's or AdaLoRA's layout)."""
    steps = controller_state.get("optimizer_steps")
    if steps is None:
        steps = controller_state.get("guard", {}).get("optimizer_steps")
    return steps


def _peft_tuner(model: Any) -> Any:
    if model is None:
        return None
    try:
        from ..integrations.peft_method import find_tuner
    except ImportError:  # peft not installed: no PEFT model can be here
        return None
    return find_tuner(model)


def _unscale_gradients(optimizer: Any) -> None:
    """fp16: unscale the gradients now (as gradient clipping does) when not yet done, so a
    gradient added before ``optimizer.step()`` is not divided by the loss scale."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    inner = unwrap_optimizer(optimizer)
    if scaler._per_optimizer_states[id(inner)]["stage"] is not OptState.UNSCALED:
        scaler.unscale_(inner)


class _ExportCallback(TrainerCallback):
    """IncreLoRATrainer's PEFT export when training ends (after the best ranks are back)."""

    def __init__(self, trainer: IncreLoRATrainer) -> None:
        self.trainer = trainer

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
        self._loss_uses_num_items: bool | None = None  # measured once, see regularizer_scale
        # The regularizer is added in compute_loss here (weighted like the task loss under
        # accumulation, and clipped with it), so the callback does not add its gradient.
        self.increlora_callback = IncreLoRACallback(adapted, regularize=False)
        self.increlora_callback.trainer = self
        self.add_callback(self.increlora_callback)
        self.add_callback(_ExportCallback(self))

    @property
    def controller(self) -> Any:
        """The method's controller (IncreLoRA's allocator) once training has begun."""
        return self.increlora_callback.controller

    # ---------------------------------------------------------------------- training
    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint`` also restores the controller state."""
        if resume_from_checkpoint is True:  # resolved here too: the controller needs the path
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in {self.args.output_dir}")
        self.increlora_callback.resume_dir = resume_from_checkpoint or None
        self.increlora_callback._resume_given = True
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The Trainer's loss plus the controller's regularizer (while training)."""
        if self.controller is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Before the loss: the probe it may run needs the inputs as given (labels included).
        scale = self.regularizer_scale(model, inputs, num_items_in_batch)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        regularization = self.controller.regularization_loss() * scale
        loss = loss + regularization.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def regularizer_scale(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> float:
        """What multiplies the regularizer of one micro-batch in ``compute_loss``.

        Chosen so that the regularizer weighs against the task loss as it does with one
        micro-batch per optimizer step on one process (loss = task mean + regularizer). The
        Trainer back-propagates, per micro-batch, ``c x`` the micro-batch's mean task loss,
        and ``training_step`` divides the loss by the accumulation steps only when it takes it
        as not yet normalized. When the task loss was normalized by ``num_items_in_batch``
        (the items of the whole optimizer step), ``c`` is ``1 / micro-batches`` whatever
        ``training_step`` does, and so is this scale. Many models accept
        ``num_items_in_batch`` but ignore it (sequence-classification heads compute a plain
        mean): then ``training_step`` does not divide either, each micro-batch counts fully
        (times the processes when the Trainer averages items across devices), and the
        regularizer must too. Whether the model's loss uses ``num_items_in_batch`` is measured
        once, on the first micro-batch that needs it (two no-grad forward passes in eval mode:
        no dropout, no random state used).
        """
        steps = getattr(self, "current_gradient_accumulation_steps", 1) or 1
        processes = self._process_factor(num_items_in_batch)
        if steps == 1 and processes == 1:
            return 1.0
        if self._task_loss_is_normalized(model, inputs, num_items_in_batch):
            return 1.0 / steps
        return processes

    def _process_factor(self, num_items_in_batch: Any) -> float:
        # Trainer.compute_loss multiplies the loss by the data-parallel processes when it
        # averages num_items_in_batch across them (the normalized loss is then a mean again).
        args = self.args
        if not (
            getattr(args, "average_tokens_across_devices", False)
            and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
            and num_items_in_batch is not None
        ):
            return 1.0
        if args.n_gpu > 1:
            return float(args.n_gpu)
        tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return float(max(1, self.accelerator.num_processes // tp))

    def _task_loss_is_normalized(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> bool:
        """Whether the task loss is normalized by the items of the whole optimizer step."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:  # the user's own statement about their compute_loss
            return bool(scaled)
        if num_items_in_batch is None:
            return False
        if self.compute_loss_func is not None:  # it receives num_items_in_batch
            return True
        if not self.model_accepts_loss_kwargs:
            return False
        if self._loss_uses_num_items is None:
            training = model.training
            model.eval()
            losses = []
            try:
                with torch.no_grad():
                    for items in (num_items_in_batch, num_items_in_batch * 2):
                        loss = super().compute_loss(model, dict(inputs), False, items)
                        losses.append(loss.detach().float())
            finally:
                model.train(training)
            self._loss_uses_num_items = not torch.allclose(*losses)
            logger.info(
                "the model's loss %s num_items_in_batch: the regularizer is weighted accordingly",
                "uses" if self._loss_uses_num_items else "ignores",
            )
        return self._loss_uses_num_items

    # ------------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the merged model and the PEFT adapter (``<output_dir>/peft_adapter``).

        ``AutoModel...from_pretrained(output_dir)`` loads the merged model (base weights plus
        every update, trained ``modules_to_save``; no increlora or peft needed), with the
        processing class and training arguments as ``Trainer.save_model`` writes them.
        The Trainer's own checkpoints (``_internal_call``) keep the full training state, which
        resume and ``load_best_model_at_end`` need.
        """
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            return
        output_dir = str(output_dir if output_dir is not None else self.args.output_dir)
        peft_model = getattr(self.adapted, "peft_model", None)
        if peft_model is not None:  # PEFT's own layers (the peft-* references): PEFT's format
            if self.args.should_save:
                peft_model.save_pretrained(output_dir)
            return
        # Collective under FSDP2 (every process gathers); the main process writes.
        with gathered_parameters(self.adapted.model, trainable_only=False):
            state = merged_state_dict(self.model, self.adapted) if self.args.should_save else {}
            self._save(output_dir, state_dict=state)
            if self.args.should_save and self.adapted.method.peft_exportable:
                try:
                    self.adapted.export_peft(
                        Path(output_dir) / DEFAULT_EXPORT, **self._peft_export_kwargs()
                    )
                except EmptyAdapterError as err:
                    logger.warning("no PEFT adapter written: %s", err)
        if self.args.should_save:
            logger.info("merged model and PEFT adapter saved to %s", output_dir)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _peft_export_kwargs(self) -> dict[str, Any]:
        name = getattr(getattr(self.adapted.model, "config", None), "_name_or_path", None)
        return {"base_model_name_or_path": name} if name else {}

    def _export(self) -> None:
        if self.export_dir is None or not self.adapted.method.peft_exportable:
            return
        path = Path(self.args.output_dir) / self.export_dir
        # Collective under FSDP2 (every process gathers); the main process writes.
        with gathered_parameters(self.adapted.model):
            if self.is_world_process_zero():
                self.adapted.export_peft(path)
                logger.info("PEFT adapter exported to %s", path)
