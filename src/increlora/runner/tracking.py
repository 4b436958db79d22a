"""Live tracking (``train.report_to``) through accelerate's trackers: TensorBoard, W&B, MLflow.

The run's own record stays ``train_log.jsonl``; the trackers get, at the step they happen:
``train/loss``, ``train/reg_loss``, ``train/lr``, ``train/total_rank``,
``train/trainable_params`` (every ``log_every`` steps and at each growth round),
``eval/<split>/<metric>`` and ``eval/main`` (every evaluation), and the rank heatmap
(``ranks``, the image of ``ranks.png``) at every evaluation. TensorBoard writes to
``<output_dir>/tensorboard``; a resumed run drops the events logged after its checkpoint.
Only the main process logs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..config import ConfigError

TENSORBOARD_DIR = "tensorboard"  # <output_dir>/tensorboard: the TensorBoard run's events

_INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(names: list[str]) -> None:
    """A one-line ConfigError for a tracker whose package is missing (accelerate skips it)."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
    }
    missing = [name for name in names if not available[name]()]
    if missing:
        packages = " ".join(_INSTALL[name] for name in missing)
        raise ConfigError(
            f"report_to: {', '.join(missing)} not installed; `pip install {packages}` or drop"
            " it from --report-to"
        )


def accelerator_kwargs(names: list[str], out: Path) -> dict[str, Any]:
    """What ``Accelerator(...)`` needs for the trackers (nothing when there are none)."""
    if not names:
        return {}
    check_installed(names)
    return {"log_with": list(names), "project_dir": str(out)}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Hyperparameters as trackers take them: flat keys, scalar values (others as text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, bool | int | float | str):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class Tracking:
    """The run's trackers; every method is a no-op without ``report_to``."""

    def __init__(self, accelerator: Any, names: list[str]) -> None:
        self.accelerator = accelerator
        self.enabled = bool(names) and accelerator.is_main_process
        self.started = False

    def start(self, config: dict[str, Any], step: int) -> None:
        """Open the trackers (after the run directory is claimed); ``step``: resumed at."""
        if not self.enabled:
            return
        init_kwargs = {"tensorboard": {"purge_step": step + 1}} if step else {}
        self.accelerator.init_trackers(TENSORBOARD_DIR, _flat(config), init_kwargs=init_kwargs)
        self.started = True

    def end(self) -> None:
        """Close the trackers (not ``end_training()``: it would end the process group)."""
        if self.started:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
            self.started = False

    def log(self, values: dict[str, float], step: int) -> None:
        if self.started:
            self.accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)

    def train(self, record: dict[str, Any]) -> None:
        """A train record of ``train_log.jsonl`` (loss, lr, total rank, trainable parameters)."""
        keys = ("loss", "reg_loss", "lr", "total_rank", "trainable_params")
        self.log({f"train/{k}": record[k] for k in keys if k in record}, record["step"])

    def growth(self, step: int, total_rank: int, trainable_params: int) -> None:
        self.log({"train/total_rank": total_rank, "train/trainable_params": trainable_params}, step)

    def evaluation(self, step: int, metrics: dict[str, dict[str, float]], main: float) -> None:
        values = {
            f"eval/{split}/{name}": value
            for split, split_metrics in metrics.items()
            for name, value in split_metrics.items()
            if isinstance(value, int | float)
        }
        self.log({**values, "eval/main": main}, step)

    def ranks(self, ranks: dict[str, int], step: int, title: str) -> None:
        """The rank heatmap of ``ranks.png`` as an image (TensorBoard, W&B; an MLflow artifact)."""
        if not self.started or not ranks:
            return
        import matplotlib.image
        import numpy as np

        from .plots import plot_ranks

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"ranks_step{step}.png"
            plot_ranks(ranks, path, title)
            pixels = matplotlib.image.imread(path)[..., :3]
            image = (np.clip(pixels, 0, 1) * 255).astype(np.uint8)[None]  # N, H, W, C
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images({"ranks": image}, step=step, dataformats="NHWC")
                elif tracker.name == "wandb":
                    tracker.log_images({"ranks": image}, step=step)
                elif tracker.name == "mlflow":
                    tracker.log_artifact(str(path), artifact_path="ranks")
