"""Fine-tuning methods, one module each, behind the protocol in ``base``."""

from . import increlora  # noqa: F401  (registers the method)
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
