"""This package's AdaLoRA as a PEFT method: ``get_peft_model(model, IncreloraAdaLoraConfig())``.

The same route as IncreLoRA (:mod:`increlora.integrations.peft_method`, whose config
factory, tuner-layer mixin, tuner and state codec this module reuses): after
``import increlora`` PEFT knows the method as ``INCRELORA_ADALORA``::

    import increlora
    from increlora.integrations import IncreLoRACallback, IncreloraAdaLoraConfig
    from peft import get_peft_model

    model = get_peft_model(base, IncreloraAdaLoraConfig(target_rank=2, task_type="SEQ_CLS"))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[IncreLoRACallback()])

The layers are :class:`~increlora.layers.adalora.AdaLoRALayer` (P, lambda, Q at
``init_rank`` triplets; masking zeroes lambda), and the callback drives the
:class:`~increlora.allocation.adalora.AdaLoRAController` (importance, cubic budget schedule,
masking, orthogonal regularizer): no hand-called ``update_and_allocate``.

Named ``IncreloraAdaLoraConfig`` / ``"INCRELORA_ADALORA"``, not ``AdaLoraConfig`` /
``"ADALORA"``: those are PEFT's own AdaLoRA, which has other defaults (``lora_alpha`` 8,
``orth_reg_weight`` 0.5, ``tinit = tfinal = 0``), field names (``init_r``, ``target_r``,
``tinit``...) and a state-dict layout; both can be used in one process, and an
``adapter_config.json`` says which one wrote it.

``save_pretrained`` writes ``lora_A`` (Q), ``lora_E`` (lambda), ``lora_B`` (P) per module,
``lora_kept`` (the triplet mask) and the controller's state (importance EMAs, schedule
position, masking history) under ``increlora_allocator_state``;
``PeftModel.from_pretrained`` restores all of it. :func:`~increlora.integrations.export_lora`
writes the unmasked triplets as plain LoRA with ``rank_pattern`` (PEFT itself cannot convert
AdaLoRA to LoRA).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..layers.adalora import AdaLoRALayer
from ..methods.adalora import AdaLoRA, AdaLoRAConfig
from .peft_method import (
    PackageTuner,
    PeftConfigMethods,
    PeftTripletLayer,
    make_config_class,
    register_method,
)

PEFT_TYPE_NAME = "INCRELORA_ADALORA"
LABEL = "AdaLoRA (increlora)"

# PEFT's AdaLoraConfig spells these fields otherwise; named in the unknown-field error.
PEFT_ADALORA_NAMES = {
    "init_r": "'init_rank'",
    "target_r": "'target_rank'",
    "tinit": "'t_init'",
    "tfinal": "'t_final'",
    "deltaT": "'delta_t'",
    "total_step": "nothing: IncreLoRACallback takes the Trainer's max_steps",
}


class _AdaLoraConfigMethods(PeftConfigMethods):
    """Methods of :class:`IncreloraAdaLoraConfig` (its fields are generated)."""

    package_config = AdaLoRAConfig
    peft_type_name = PEFT_TYPE_NAME

    @staticmethod
    def _register() -> None:
        register()


IncreloraAdaLoraConfig = make_config_class(
    "IncreloraAdaLoraConfig",
    _AdaLoraConfigMethods,
    "PEFT config of this package's AdaLoRA: ``init_rank`` SVD triplets per module, masked"
    " down to ``target_rank`` on average by importance.\n\n"
    "Fields and defaults are :class:`increlora.methods.adalora.AdaLoRAConfig`'s"
    " (``lora_alpha`` and ``lora_dropout`` are its ``alpha`` and ``dropout``), plus PEFT's"
    " ``task_type``, ``modules_to_save``, ``base_model_name_or_path``, ``inference_mode``."
    " ``t_init`` / ``t_final`` left as None are 10% / 50% of the Trainer's total steps."
    " Not PEFT's ``AdaLoraConfig`` (see docs/peft.md).",
    hints=PEFT_ADALORA_NAMES,
)


class IncreloraAdaLoraLayer(PeftTripletLayer, AdaLoRALayer, BaseTunerLayer):
    """The package's AdaLoRA layer as a PEFT tuner layer; ``lora_kept`` holds the mask."""

    label = LABEL
    rank_buffer = "lora_kept"

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        AdaLoRALayer.__init__(self, base_layer, **kwargs)
        self._register_rank_buffer()

    def rank_tensor(self) -> torch.Tensor:
        return self.kept.detach().clone()

    def restore_ranks(self, saved: torch.Tensor) -> None:
        if saved.shape != self.kept.shape:
            raise ValueError(
                f"{LABEL}: the saved mask has {saved.numel()} triplets, this layer"
                f" {self.kept.numel()}; load with the init_rank the adapter was trained with"
            )
        with torch.no_grad():
            self.kept.copy_(saved.to(torch.bool))


class _PeftAdaLoRA(AdaLoRA):
    """AdaLoRA building :class:`IncreloraAdaLoraLayer` (not registered: same name and format)."""

    layer_class = IncreloraAdaLoraLayer


class IncreloraAdaLoraModel(PackageTuner):
    """PEFT tuner of the package's AdaLoRA (:class:`PackageTuner` with its layers)."""

    tuner_layer_cls = IncreloraAdaLoraLayer
    method_class = _PeftAdaLoRA
    label = LABEL


def register() -> None:
    """Make the package's AdaLoRA a PEFT method (idempotent; ``import increlora`` calls it)."""
    register_method(PEFT_TYPE_NAME, IncreloraAdaLoraConfig, IncreloraAdaLoraModel)
