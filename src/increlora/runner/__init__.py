"""The runner: one command to fine-tune, evaluate and compare (used by ``increlora`` CLI).

Python use::

    from increlora.runner import RunConfig, run
    result = run(RunConfig.from_dict({"data": {"task": "mr", "train_size": 2000}}))
"""

from .config import DataConfig, MethodSpec, RunConfig, TrainConfig
from .loop import RunResult, TrainingDiverged, TrainingInterrupted, TrainingStopped, run

__all__ = [
    "DataConfig",
    "MethodSpec",
    "RunConfig",
    "RunResult",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "TrainingStopped",
    "run",
]
