"""GLUE metrics with numpy/scipy: accuracy, F1, Matthews correlation, Pearson, Spearman.

Degenerate inputs (a constant prediction vector, no positive example) score 0.0 rather
than NaN, as scikit-learn does for F1 and MCC, so model selection never compares NaNs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from increlora.tasks.registry import TaskSpec

ArrayLike = Sequence[float] | np.ndarray


def _pair(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    preds, golds = np.asarray(predictions), np.asarray(labels)
    if preds.shape != golds.shape or preds.ndim != 1:
        raise ValueError(
            f"predictions {preds.shape} and labels {golds.shape} must be 1-D of equal length"
        )
    if preds.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return preds, golds


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the label."""
    preds, golds = _pair(predictions, labels)
    return float(np.mean(preds == golds))


def f1_binary(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """F1 of the ``positive`` class: 2TP / (2TP + FP + FN)."""
    preds, golds = _pair(predictions, labels)
    tp = np.sum((preds == positive) & (golds == positive))
    fp = np.sum((preds == positive) & (golds != positive))
    fn = np.sum((preds != positive) & (golds == positive))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation, multiclass form (Gorodkin 2004); binary MCC as a special case.

    MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)), with
    c correct predictions, s examples, p_k / t_k times class k was predicted / true.
    """
    preds, golds = _pair(predictions, labels)
    classes, encoded = np.unique(np.concatenate([preds, golds]), return_inverse=True)
    pred_ids, gold_ids = encoded[: preds.size], encoded[preds.size :]
    pred_counts = np.bincount(pred_ids, minlength=classes.size).astype(np.float64)
    gold_counts = np.bincount(gold_ids, minlength=classes.size).astype(np.float64)
    correct = float(np.sum(pred_ids == gold_ids))
    total = float(preds.size)
    numerator = correct * total - float(pred_counts @ gold_counts)
    denominator = np.sqrt(
        (total**2 - float(pred_counts @ pred_counts))
        * (total**2 - float(gold_counts @ gold_counts))
    )
    return float(numerator / denominator) if denominator else 0.0


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation coefficient."""
    preds, golds = _pair(predictions, labels)
    x = preds.astype(np.float64) - preds.mean()
    y = golds.astype(np.float64) - golds.mean()
    denominator = np.sqrt(float(x @ x) * float(y @ y))
    return float(np.clip(float(x @ y) / denominator, -1.0, 1.0)) if denominator else 0.0


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation: Pearson on ranks, ties given their average rank."""
    preds, golds = _pair(predictions, labels)
    from scipy.stats import rankdata  # lazily: scipy.stats takes a second to import

    return pearson(rankdata(preds), rankdata(golds))


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
}


def compute_metrics(task: TaskSpec, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """All of ``task.metrics`` for one eval split.

    ``predictions`` are class ids (or logits of shape (n, num_labels), reduced by argmax)
    for classification, and floats (or shape (n, 1)) for regression.
    """
    preds = np.asarray(predictions)
    if preds.ndim == 2:
        if task.is_regression and preds.shape[1] != 1:
            raise ValueError(f"{task.name} is regression: expected (n, 1) predictions")
        preds = preds[:, 0] if task.is_regression else preds.argmax(-1)
    golds = np.asarray(labels)
    if task.is_regression:
        preds, golds = preds.astype(np.float64), golds.astype(np.float64)
    return {name: METRICS[name](preds, golds) for name in task.metrics}


def constant_baseline(
    task: TaskSpec, train_labels: ArrayLike, eval_labels: dict[str, ArrayLike]
) -> dict[str, object]:
    """What a model that has learned nothing scores: always predicting the training set's most
    common class (ties: the lower class id; regression: the mean label), on each eval split, in
    the task's main metric.

    A run whose score equals it has not left the majority class (a learning rate too small or
    too large, too few steps); the runner says so and the benchmark report flags such rows.
    Returns ``{"prediction": label name or mean, "scores": {split: value}}``.
    """
    train = np.asarray(train_labels)
    if task.is_regression:
        constant: float | int = float(train.astype(np.float64).mean())
        shown: object = round(constant, 4)
    else:
        constant = int(np.bincount(train.astype(np.int64), minlength=task.num_labels).argmax())
        shown = task.label_names[constant]
    scores = {
        split: compute_metrics(task, np.full(len(labels), constant), labels)[task.main_metric]
        for split, labels in eval_labels.items()
    }
    return {"prediction": shown, "scores": scores}
