"""Evaluation: predictions over eval splits, the task's official metrics, adapter reloading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..adapter import CONFIG_FILE, load_adapter
from ..tasks import TaskSpec, compute_metrics, is_causal
from .data import TokenizedDataset, eval_loader, load_checked
from .model import load_model, max_tokens

Metrics = dict[str, dict[str, float]]
"""Metrics per eval split: ``{"validation": {"accuracy": 0.81}}``."""


@torch.no_grad()
def evaluate(
    model: nn.Module, loaders: dict[str, DataLoader], task: TaskSpec, accelerator
) -> Metrics:
    """The task's metrics on every eval split (all processes' predictions gathered)."""
    was_training = model.training
    model.eval()
    results: Metrics = {}
    for split, loader in loaders.items():
        predictions, labels = [], []
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            logits, gold = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
            predictions.append(logits.cpu().numpy())
            labels.append(gold.cpu().numpy())
        results[split] = compute_metrics(task, np.concatenate(predictions), np.concatenate(labels))
    model.train(was_training)
    return results


def main_metric(task: TaskSpec, metrics: Metrics) -> float:
    """The number model selection compares: the task's main metric on its first eval split."""
    return metrics[task.eval_splits[0]][task.main_metric]


@dataclass
class EvalSettings:
    """How ``increlora evaluate`` rebuilds a run's eval data (defaults from run_config.json)."""

    model: str
    task: str
    data_dir: str | None = None
    max_length: int = 128
    eval_size: int | None = None
    split_seed: int = 0
    validation_size: int | None = None
    batch_size: int = 64
    max_new_tokens: int | None = None  # causal-LM tasks; None: the task's default


def evaluate_adapter(adapter_dir: str | Path, settings: EvalSettings) -> dict[str, Any]:
    """Load the base model with its head, put the saved adapter on it, and evaluate.

    ``adapter_dir`` is a PEFT adapter (``adapter_config.json``, loaded with
    ``PeftModel.from_pretrained``) or an increlora adapter (``increlora_config.json``).
    """
    from accelerate import Accelerator

    adapter_dir = Path(adapter_dir)
    data = load_checked(
        settings.task,
        settings.data_dir,
        eval_size=settings.eval_size,
        split_seed=settings.split_seed,
        validation_size=settings.validation_size,
    )
    loaded = load_model(settings.model, data.task)
    if (adapter_dir / CONFIG_FILE).is_file():
        load_adapter(loaded.model, adapter_dir)
        model, kind = loaded.model, "increlora"
    elif (adapter_dir / "adapter_config.json").is_file():
        from ..methods.peft_reference import load_peft_adapter

        model, kind = load_peft_adapter(loaded.model, adapter_dir), "peft"
    else:
        raise FileNotFoundError(
            f"{adapter_dir}: no adapter_config.json (PEFT) or {CONFIG_FILE} (increlora) here"
        )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    max_length = max_tokens(loaded, settings.max_length)
    if is_causal(data.task):  # loss / perplexity and greedy exact match / F1
        from .generation import GenerationEvaluator

        evaluator = GenerationEvaluator(
            data.task,
            data.evals,
            loaded.tokenizer,
            max_length,
            settings.max_new_tokens or data.task.max_new_tokens,
        )
        loaders = {
            split: accelerator.prepare(loader)
            for split, loader in evaluator.loaders(settings.batch_size).items()
        }
        metrics = evaluator.evaluate(accelerator.prepare(model), loaders, accelerator, step=0)
        return _result(adapter_dir, kind, settings, data, metrics)
    loaders = {}
    for split, examples in data.evals.items():
        dataset = TokenizedDataset(data.task, examples, loaded.tokenizer, max_length)
        loaders[split] = accelerator.prepare(
            eval_loader(dataset, loaded.tokenizer, settings.batch_size)
        )
    model = accelerator.prepare(model)
    metrics = evaluate(model, loaders, data.task, accelerator)
    return _result(adapter_dir, kind, settings, data, metrics)


def _result(
    adapter_dir: Path, kind: str, settings: EvalSettings, data: Any, metrics: Metrics
) -> dict[str, Any]:
    return {
        "adapter": str(adapter_dir),
        "adapter_format": kind,
        "model": settings.model,
        "task": data.task.name,
        "main_metric": data.task.main_metric,
        "metrics": metrics,
        "data": data.split_info,
    }
