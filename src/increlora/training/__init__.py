"""Training integrations: the Hugging Face Trainer (``IncreLoRATrainer``).

``import increlora.training`` is cheap; transformers' Trainer is imported on first use of
``increlora.training.IncreLoRATrainer``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncreLoRATrainer"]


def __getattr__(name: str) -> Any:
    if name == "IncreLoRATrainer":
        from .hf import IncreLoRATrainer

        return IncreLoRATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
