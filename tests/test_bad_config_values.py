"""Bad values in a run config are one-line ConfigErrors naming the field (issue 23, items 2,
11, 17), never a traceback from deep inside torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from increlora.config import ConfigError
from increlora.runner.config import RunConfig
from increlora.runner.data import DataError, check_labels
from increlora.runner.outputs import format_summary
from increlora.tasks import Example, get_task


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"batch_size": 8.5}, "train.batch_size: expected an integer, got 8.5"),
        ("train", {"batch_size": True}, "train.batch_size: expected an integer, got True"),
        ("train", {"seed": float("nan")}, "train.seed: expected an integer"),
        ("train", {"seed": -1}, "seed: must be >= 0, got -1"),
        ("train", {"learning_rate": 1e39}, "learning_rate: must be in (0, 10]"),
        ("train", {"learning_rate": float("inf")}, "train.learning_rate: must be a finite"),
        ("train", {"learning_rate": [1e-3]}, "train.learning_rate: expected a number"),
        ("data", {"split_seed": -2}, "split_seed: must be >= 0"),
        ("data", {"max_length": "long"}, "data.max_length: expected an integer"),
        ("method", {"target_rank": [2]}, "method.target_rank: expected a number or none"),
        ("method", {"target_rank": float("inf")}, "method.target_rank: must be a finite"),
    ],
)
def test_bad_value_names_the_field(section, values, message) -> None:
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_dict({section: values})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_good_values_are_converted() -> None:
    config = RunConfig.from_dict(
        {"train": {"batch_size": "16", "learning_rate": "3e-3", "epochs": 2.0}}
    )
    assert config.train.batch_size == 16 and config.train.epochs == 2
    assert config.train.learning_rate == 3e-3


@pytest.mark.parametrize("label", [float("inf"), float("-inf"), float("1e400"), float("nan")])
def test_non_finite_regression_labels_are_refused(label) -> None:
    task = get_task("stsb")
    examples = [Example("a", "b", 1.0), Example("c", "d", label)]
    with pytest.raises(DataError, match="example 1 .* is not a finite number"):
        check_labels(task, "validation", examples)


def test_summary_labels_validation_and_test(tmp_path: Path) -> None:
    scores = {"validation": {"accuracy": 0.814}, "test": {"accuracy": 0.784}}
    metrics = {
        "model": "minilm",
        "task": "mr",
        "method": "increlora",
        "main_metric": "accuracy",
        "eval_split": "validation",
        "wall_time_s": 164,
        "steps": 189,
        "steps_per_second": 1.2,
        "best": {"step": 150, "metrics": scores},
        "final": {"step": 189, "metrics": scores},
        "trainable_params": 89546,
        "ranks": {},
        "adapter": {"selected": "best", "step": 150, "peft": "adapter", "increlora": "x"},
    }
    text = format_summary(metrics, tmp_path)
    assert "best  validation accuracy 0.8140 (step 150)" in text
    assert "exported adapter (step 150, picked on validation): test accuracy 0.7840" in text


def test_a_finite_loss_blow_up_is_flagged(tmp_path: Path) -> None:
    from increlora.runner.loop import _loss_summary

    assert _loss_summary(0.69, 0.5) == {"first": 0.69, "last": 0.5, "blew_up": False}
    blown = _loss_summary(0.69, 222.0)
    assert blown["blew_up"]
    metrics = {
        "model": "minilm",
        "task": "mr",
        "method": "lora",
        "main_metric": "accuracy",
        "eval_split": "validation",
        "wall_time_s": 10,
        "steps": 10,
        "steps_per_second": 1.0,
        "best": {"step": 10, "metrics": {"validation": {"accuracy": 0.5}}},
        "final": {"step": 10, "metrics": {"validation": {"accuracy": 0.5}}},
        "trainable_params": 1,
        "ranks": {},
        "adapter": {"selected": "best", "step": 10, "peft": "adapter", "increlora": "x"},
        "loss": blown,
    }
    assert "WARNING: the training loss rose from 0.69 to 222 (over 10x)" in format_summary(
        metrics, tmp_path
    )
