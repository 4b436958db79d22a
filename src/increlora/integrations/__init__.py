"""Where LoRA users already are: IncreLoRA as a PEFT method and growth in any Trainer.

* :class:`IncreLoraConfig` — ``peft.get_peft_model(model, IncreLoraConfig(target_rank=2,
  task_type="SEQ_CLS"))`` (registered with PEFT by ``import increlora`` when peft is
  installed); the model's layers are this package's triplet layers.
* :class:`IncreloraAdaLoraConfig` — the package's AdaLoRA the same way (PEFT type
  ``INCRELORA_ADALORA``; not PEFT's own ``AdaLoraConfig``).
* :class:`IncreLoRACallback` — drives the growth (or AdaLoRA's masking) inside any
  ``transformers.Trainer`` (plain, TRL's ``SFTTrainer``...): ``callbacks=[IncreLoRACallback()]``.
* :func:`export_lora` — the trained adapter as plain PEFT LoRA with ``rank_pattern``.

Names are imported on first use (peft and the Trainer are heavy imports). See docs/peft.md.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "IncreLoRACallback",
    "IncreLoraConfig",
    "IncreLoraModel",
    "IncreloraAdaLoraConfig",
    "IncreloraAdaLoraModel",
    "export_lora",
    "register",
]

# Lazily imported names and the module holding each.
_LAZY = {
    "IncreLoraConfig": "peft_method",
    "IncreLoraModel": "peft_method",
    "IncreLoraLayer": "peft_method",
    "IncreloraAdaLoraConfig": "peft_adalora",
    "IncreloraAdaLoraModel": "peft_adalora",
    "IncreloraAdaLoraLayer": "peft_adalora",
}


def register() -> bool:
    """Register the package's PEFT methods (IncreLoRA, AdaLoRA); False when peft is missing."""
    try:
        from .peft_adalora import register as _register_adalora
        from .peft_method import register as _register
    except ImportError:
        return False
    _register()
    _register_adalora()
    return True


class _RegisterWhenPeftLoads(importlib.abc.MetaPathFinder):
    """Registers IncreLoRA with PEFT right after ``peft`` is first imported.

    ``import increlora`` does not import peft (it doubles the import time); a PEFT config
    file naming INCRELORA still loads, because importing peft registers the method. Every
    spec found for ``peft`` gets the hook (availability checks such as transformers'
    ``find_spec("peft")`` make specs that are never executed); it leaves ``sys.meta_path``
    once peft has been imported.
    """

    def __init__(self) -> None:
        self._finding = False

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "peft" or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register()

        loader.exec_module = exec_then_register
        return spec


def register_when_peft_loads() -> None:
    """Register now if peft is imported, else as soon as it is (``import increlora``)."""
    if sys.modules.get("peft") is not None:
        register()
    elif not any(isinstance(f, _RegisterWhenPeftLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenPeftLoads())


def export_lora(model: Any, path: str | Path, adapter_name: str = "default") -> dict[str, Any]:
    """Write the increlora adapter of a PeftModel (IncreLoRA, the package's AdaLoRA) as plain
    PEFT LoRA (``rank_pattern``).

    The result loads with ``peft.PeftModel.from_pretrained`` alone (no increlora) and serves
    where PEFT LoRA adapters do (vLLM, TGI). Returns the written adapter_config.
    """
    from .peft_method import find_tuner

    tuner = find_tuner(model)
    if tuner is None:
        raise ValueError(
            "export_lora: the model holds no increlora PEFT adapter; pass the PeftModel that"
            " peft.get_peft_model(model, IncreLoraConfig(...)) (or IncreloraAdaLoraConfig)"
            " returned"
        )
    return tuner.export_lora(path, adapter_name)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "IncreLoRACallback":
        from ..training.hf import IncreLoRACallback

        return IncreLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
