"""increlora: LoRA adapters whose rank grows during training (IncreLoRA), and its baselines."""

from .adapter import AdaptedModel, inject, load_adapter
from .allocation import IncreLoRAAllocator
from .config import AdapterConfig, ConfigError, IncreLoRAConfig
from .io import AdapterFileError
from .methods import METHODS, get_method

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdaptedModel",
    "AdapterConfig",
    "AdapterFileError",
    "ConfigError",
    "IncreLoRAAllocator",
    "IncreLoRAConfig",
    "get_method",
    "inject",
    "load_adapter",
]
