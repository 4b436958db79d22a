"""Tokenized task data and DataLoaders whose order depends only on (seed, epoch).

The training order of epoch ``e`` is a permutation drawn from a generator seeded with
``seed`` and ``e``: a resumed run rebuilds exactly the order of the interrupted epoch and skips
the batches it already consumed, and every process draws the same permutation (accelerate
then gives each process its share of every batch list).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import ConfigError
from ..tasks import Example, TaskData, TaskSpec, is_causal, load_task


class DataError(ValueError):
    """Loaded examples do not fit the task (e.g. a label outside its label set)."""


def check_labels(task: TaskSpec, split: str, examples: Sequence[Example]) -> None:
    """Classification labels must be integer ids of the task's labels; regression, numbers."""
    for i, ex in enumerate(examples):
        label = ex.label
        if task.is_regression:
            # inf and 1e400 (read as inf) are refused like NaN: Pearson would be NaN.
            ok = isinstance(label, int | float) and math.isfinite(label)
        else:
            ok = isinstance(label, int) and 0 <= label < task.num_labels
        if not ok:
            expected = (
                "a finite number"
                if task.is_regression
                else f"an id in 0..{task.num_labels - 1} ({', '.join(task.label_names)})"
            )
            raise DataError(
                f"{task.name} {split} example {i} ({ex.text_a[:40]!r}): label {label!r} is not"
                f" {expected}"
            )
    if not examples:
        raise DataError(f"{task.name} {split}: no examples")


def load_checked(task: str, data_dir: str | None, **kwargs: Any) -> TaskData:
    """``tasks.load_task`` with an unknown task as a ConfigError and every label checked."""
    try:
        data = load_task(task, data_dir, **kwargs)
    except KeyError as err:
        raise ConfigError(f"data.task: {err.args[0]}") from None
    except ValueError as err:
        if type(err) is not ValueError:  # format errors already name the file and line
            raise
        raise ConfigError(
            f"data: {err} (set data.train_size / --train-size lower, or to none for all)"
        ) from None
    if is_causal(data.task):  # prompt -> response: checked when read (tasks/causal_lm.py)
        return data
    check_labels(data.task, "train", data.train)
    for split, examples in data.evals.items():
        check_labels(data.task, split, examples)
    return data


class TokenizedDataset(Dataset):
    """Examples tokenized once up front (tokenization is cheap next to training)."""

    def __init__(
        self, task: TaskSpec, examples: Sequence[Example], tokenizer: Any, max_length: int
    ):
        texts_a = [ex.text_a for ex in examples]
        texts_b = [ex.text_b or "" for ex in examples] if task.is_pair else None
        encoded = tokenizer(texts_a, texts_b, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
        self.features = [{k: encoded[k][i] for k in keys} for i in range(len(examples))]
        dtype = torch.float32 if task.is_regression else torch.long
        self.labels = torch.tensor([ex.label for ex in examples], dtype=dtype)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.features[index], "labels": self.labels[index]}


class EpochSampler(Sampler[int]):
    """A fresh seeded permutation per epoch: ``set_epoch(e)`` then iterate."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class PadCollator:
    """Pads a list of tokenized examples to the longest one in the batch."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = torch.stack([item["labels"] for item in items])
        features = [{k: v for k, v in item.items() if k != "labels"} for item in items]
        batch = self.tokenizer.pad(features, return_tensors="pt")
        return {**batch, "labels": labels}


def seeded_loader(
    dataset: Any, batch_size: int, collate_fn: Any, sampler: Any = None, seed: int = 0
) -> DataLoader:
    """Every DataLoader of a run: in order (or the sampler's order), with its own generator.

    Its own generator: creating an iterator must not draw from the global RNG, or a resumed
    run's dropout masks would differ from the uninterrupted run's.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )


def train_loader(
    dataset: TokenizedDataset, tokenizer: Any, batch_size: int, seed: int
) -> tuple[DataLoader, EpochSampler]:
    """The training DataLoader and its sampler (call ``sampler.set_epoch`` each epoch)."""
    sampler = EpochSampler(len(dataset), seed)
    return seeded_loader(dataset, batch_size, PadCollator(tokenizer), sampler, seed), sampler


def eval_loader(dataset: TokenizedDataset, tokenizer: Any, batch_size: int) -> DataLoader:
    return seeded_loader(dataset, batch_size, PadCollator(tokenizer))
