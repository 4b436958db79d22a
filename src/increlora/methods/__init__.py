"""Fine-tuning methods, one module each, behind the protocol in ``base``."""

from . import (  # noqa: F401  (register the methods)
    adalora,
    full,
    increlora,
    lora,
    lora_mini,
    lorta,
    melora,
    mora,
    peft_reference,
    prilora,
    sora,
)
from .base import (
    METHODS,
    Controller,
    Method,
    StaticController,
    get_method,
    method_for_config,
    register,
)

__all__ = [
    "METHODS",
    "Controller",
    "Method",
    "StaticController",
    "get_method",
    "method_for_config",
    "register",
]
