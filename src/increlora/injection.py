"""Choosing which modules to adapt and swapping them for adapter layers in place."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .config import AdapterConfig, ConfigError
from .layers.base import is_supported_base

# The paper's module set per architecture: every attention projection and both FFN matrices.
TARGET_PRESETS: dict[str, list[str]] = {
    "bert": [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ],
    "mpnet": ["attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"],
    "deberta-v2": [
        "attention.self.query_proj",
        "attention.self.key_proj",
        "attention.self.value_proj",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
TARGET_PRESETS["roberta"] = TARGET_PRESETS["bert"]
TARGET_PRESETS["mistral"] = TARGET_PRESETS["qwen2"] = TARGET_PRESETS["llama"]

# Output heads are never adapted by 'all-linear' (they are trained in full via modules_to_save).
HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs", "pooler.dense", "decoder")


def _matches(name: str, pattern: list[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _preset_for(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TARGET_PRESETS:
        raise ConfigError(
            f"target_modules: no preset for model type {model_type!r}; pass target_modules"
            f" explicitly (presets exist for {sorted(TARGET_PRESETS)})"
        )
    return TARGET_PRESETS[model_type]


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Full names of the modules ``config`` selects, in module order.

    A list entry that matches no supported module is an error (typos must not silently
    leave a module un-adapted); so is a selection that is empty.
    """
    linear = [n for n, m in model.named_modules() if is_supported_base(m)]
    targets = config.target_modules
    if targets is None:
        targets = _preset_for(model)
    if targets == "all-linear":
        chosen = [n for n in linear if not any(n == h or n.endswith("." + h) for h in HEAD_NAMES)]
    else:
        if isinstance(targets, list):
            for entry in targets:
                if not any(_matches(n, [entry]) for n in linear):
                    suffixes = sorted({n.split(".")[-1] for n in linear})
                    raise ConfigError(
                        f"target_modules: {entry!r} matches no nn.Linear/Conv1D module of this"
                        f" model; linear modules end in {suffixes}"
                    )
        chosen = [n for n in linear if _matches(n, targets)]
    if config.exclude_modules:
        chosen = [n for n in chosen if not _matches(n, config.exclude_modules)]
    if not chosen:
        raise ConfigError(
            f"target_modules: {targets!r} (minus exclude_modules) selects no module; linear"
            f" modules of this model include {linear[:8]}"
        )
    return chosen


def find_modules_to_save(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Full names of the extra fully-trained modules; every entry must match one."""
    all_names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for entry in names:
        hits = [n for n in all_names if n == entry or n.endswith("." + entry)]
        if not hits:
            raise ConfigError(
                f"modules_to_save: {entry!r} matches no module of this model"
                f" (top-level modules: {[n for n, _ in model.named_children()]})"
            )
        found += [h for h in hits if h not in found]
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
