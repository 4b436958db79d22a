"""increlora: LoRA adapters whose rank grows during training (IncreLoRA), and its baselines."""

from .adapter import AdaptedModel, inject, load_adapter
from .allocation import IncreLoRAAllocator
from .config import AdapterConfig, ConfigError, IncreLoRAConfig
from .integrations import register_when_peft_loads as _register_peft
from .io import AdapterFileError
from .methods import METHODS, get_method

__version__ = "0.1.0"

_register_peft()  # IncreLoRA becomes a PEFT method as soon as peft is imported

__all__ = [
    "METHODS",
    "AdaptedModel",
    "AdapterConfig",
    "AdapterFileError",
    "ConfigError",
    "IncreLoRAAllocator",
    "IncreLoRACallback",
    "IncreLoRAConfig",
    "IncreLoraConfig",
    "IncreloraAdaLoraConfig",
    "get_method",
    "inject",
    "load_adapter",
]


def __getattr__(name: str):
    # Heavy imports (peft, transformers' Trainer) on first use only.
    if name in ("IncreLoraConfig", "IncreloraAdaLoraConfig", "IncreLoRACallback"):
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
