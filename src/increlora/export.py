"""Export to the PEFT LoRA format, loadable by plain ``peft.PeftModel.from_pretrained``.

Each module's update is written as LoRA factors ``lora_A`` (r_m x d_in) and ``lora_B``
(d_out x r_m) with ``delta = lora_B @ lora_A`` exactly; per-module ranks go to
``rank_pattern`` and ``alpha_pattern = rank`` (so PEFT's scaling alpha / r is 1), keyed by the
full dotted module name (PEFT matches keys as name suffixes: short keys would shadow others).
Rank-0 modules go to ``exclude_modules`` (plain LoRA rejects r = 0). Fully trained extra
modules (classification heads) go to ``modules_to_save``.

``adapter_model.safetensors`` carries in its own header metadata (``adapter_config.json`` is
PEFT's, and PEFT ignores the metadata) the sha256 of its tensor data and a manifest: one
sha256 over the data, the tensor index and every field of ``adapter_config.json`` that changes
what the weights mean (``lora_alpha``, ``r``, ``rank_pattern``, ``target_modules``, ...; not
``base_model_name_or_path``). :func:`increlora.methods.peft_reference.load_peft_adapter`
verifies both (``increlora evaluate`` / ``export`` load through it).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .io import atomic_directory, atomic_write_json, save_tensors_with_checksum

if TYPE_CHECKING:
    from .adapter import AdaptedModel

PEFT_PREFIX = "base_model.model."


class EmptyAdapterError(ValueError):
    """Every adapted module has rank 0 (e.g. AdaLoRA masked all triplets): no LoRA to write."""


def export_peft(
    adapted: AdaptedModel,
    path: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors``; returns the config."""
    if not adapted.method.peft_exportable:
        raise NotImplementedError(
            f"method {adapted.method.name!r} has no exact LoRA form; use"
            " adapted.merge_and_unload() and save the merged model instead"
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    excluded: list[str] = []
    fan_in_fan_out = False
    for name, layer in adapted.layers.items():
        a, b = layer.lora_factors()
        if a.shape[0] == 0:
            excluded.append(name)
            continue
        ranks[name] = int(a.shape[0])
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().float()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().float()
        fan_in_fan_out = fan_in_fan_out or layer.fan_in_fan_out
    for name in adapted.saved_modules:
        for key, t in adapted.model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = t
    if not ranks:
        raise EmptyAdapterError(
            "every adapted module has rank 0 (all ranks pruned or masked): nothing to export;"
            " train longer or raise the budget"
        )
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": default_rank,
        "lora_alpha": default_rank,
        "rank_pattern": {n: r for n, r in ranks.items() if r != default_rank},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != default_rank},
        "target_modules": sorted(ranks),
        "exclude_modules": excluded or None,
        "modules_to_save": list(adapted.saved_modules) or None,
        "lora_dropout": float(getattr(adapted.config, "dropout", 0.0)),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with atomic_directory(path) as tmp:
        save_tensors_with_checksum(
            tmp / "adapter_model.safetensors", tensors, config, "adapter_config.json"
        )
        atomic_write_json(tmp / "adapter_config.json", config)
    return config
