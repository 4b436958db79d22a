"""Named recipes: ``preset: paper`` runs IncreLoRA as the authors' GLUE scripts ran it.

The values come from the official NLU scripts (``NLU/scripts/rank={2,8}/run_<task>.sh`` in
FeiyuZhang98/IncreLoRA, DeBERTaV3-base, 72 adapted modules) and from their code
(``loralib/increlora.py``, their Trainer and LR scheduler), read for this package:

- score: the dense ``sum |dW * dL/d(dW)| / sqrt(d_out * d_in)`` every optimizer step while
  growing, smoothed by two EMAs (beta 0.85); here ``importance: paper`` with
  ``score_rows: 1.0`` (every output row, no sampling);
- budget: ``target_rank x modules`` ranks, the initial rank 1 of every module included
  (``method.budget: rank``);
- ``add_r`` = target_rank / 2 (their table ``{2: 1, 4: 2, 6: 3, 8: 4}``), with add_r reserve
  ranks per module whose A and B train before activation (``advance_learn``);
- rounds at steps ``> init_warmup`` with ``step % incre_interval == 0``, ``init_warmup =
  incre_interval = warmup_steps`` (100 on the small GLUE tasks);
- ``multi_lr``: no per-parameter learning rate: every optimizer group activated at a round
  gets its own linear warm-up over ``warmup_steps`` and decays to 0 at the end of training
  (the package's ``restart_warmup_steps``);
- scaling ``alpha / active rank``, alpha 32 (16 on SST-2, MNLI, QQP); the orthogonal
  regularizer's weight, LoRA dropout and weight decay per task (decay on every adapter
  parameter, e included).

What is scaled rather than copied: ``top_h``. The scripts' top_h (2 to 22) was set for 72
modules and runs of 2,000-50,000 steps; here it is left to the schedule, which picks the
smallest top_h whose rounds, at the official cadence, end by ``growth_end_fraction`` (0.6,
where the official rounds end at 30-60% of training). What is not applied: the classifier
dropout (``cls_dropout``, a property of the model's head) and the official epochs and
sequence lengths (the run's own ``train`` and ``data`` settings). Two bugs of the official
code are not reproduced (docs/increlora.md): ties at the threshold growing more than top_h
modules, and a last round that overshoots the budget and then never drops the reserve ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import ConfigError

PRESETS = ("paper",)


@dataclass(frozen=True)
class OfficialScript:
    """One task's settings in the official NLU scripts (rank-2 script unless noted)."""

    interval: int  # init_warmup = incre_interval = warmup_steps
    learning_rate: float
    alpha: float
    lora_dropout: float
    orth_reg_weight: float
    weight_decay: float
    top_h: dict[int, int]  # target rank -> the scripts' top_h (72 modules)


OFFICIAL: dict[str, OfficialScript] = {
    "cola": OfficialScript(100, 8e-4, 32, 0.0, 0.1, 0.0, {2: 3, 8: 3}),
    "mrpc": OfficialScript(100, 1e-3, 32, 0.3, 0.1, 0.01, {2: 6, 8: 10}),
    "rte": OfficialScript(100, 1.2e-3, 32, 0.0, 0.3, 0.01, {2: 5, 8: 9}),
    # Only rank=8/run_stsb.sh exists, and it sets target_rank 2.
    "stsb": OfficialScript(100, 2.2e-3, 32, 0.0, 0.3, 0.1, {2: 4}),
    "sst2": OfficialScript(1000, 8e-4, 16, 0.1, 0.1, 0.01, {2: 5, 8: 6}),
    "qnli": OfficialScript(500, 7e-4, 32, 0.0, 0.1, 0.01, {2: 12, 8: 22}),
    "mnli": OfficialScript(1000, 3.5e-4, 16, 0.2, 0.1, 0.0, {2: 2, 8: 18}),
    "qqp": OfficialScript(1000, 4e-4, 16, 0.0, 0.1, 0.01, {2: 3, 8: 3}),
}
SMALL_TASK = "mrpc"
"""Tasks the scripts do not cover take the small-GLUE-task recipe (cadence 100) of MRPC,
without its task-specific dropout."""

GROWTH_END_FRACTION = 0.6


@dataclass(frozen=True)
class Preset:
    """A recipe resolved for one task and budget: method fields and train fields."""

    name: str
    task: str
    source: str  # which official script the values come from
    method: dict[str, Any]  # fields of IncreLoRAConfig plus the run's method.budget
    train: dict[str, Any]  # fields of the run's TrainConfig

    def run_dict(self) -> dict[str, Any]:
        """The nested run-config form, to merge under the user's own settings."""
        return {"preset": self.name, "method": dict(self.method), "train": dict(self.train)}


def official_add_r(target_rank: float) -> int:
    """The scripts' ranks per chosen module per round: target_rank / 2 (1 for rank 2, 4 for
    rank 8); their table stops at 8 and has no entry for odd ranks, which here round up."""
    return max(1, round(target_rank / 2 + 1e-9))


def paper_preset(task: str, target_rank: float | None = 2.0) -> Preset:
    """The official IncreLoRA recipe for ``task`` at average rank ``target_rank``."""
    if target_rank is None or target_rank < 1:
        raise ConfigError(
            f"preset paper: needs method.target_rank >= 1 (the paper's average rank budget),"
            f" got {target_rank}"
        )
    script = OFFICIAL.get(task)
    source = f"NLU/scripts/rank=*/run_{task}.sh"
    dropout = None
    if script is None:
        script = OFFICIAL[SMALL_TASK]
        source = f"not in the official scripts: the small-task recipe of run_{SMALL_TASK}.sh"
        dropout = 0.0
    method = {
        "name": "increlora",
        "target_rank": float(target_rank),
        "budget": "rank",
        "importance": "paper",
        "score_rows": 1.0,
        "score_window": None,
        "init": "paper",
        "scaling": "per_rank",
        "init_rank": 1,
        "add_r": official_add_r(target_rank),
        "advance_learning": True,
        "new_rank_e": 1e-5,
        "init_std": 0.02,
        "beta1": 0.85,
        "beta2": 0.85,
        "init_warmup": script.interval,
        "interval": script.interval,
        "top_h": None,
        "growth_end_fraction": GROWTH_END_FRACTION,
        "restart_warmup_steps": script.interval,
        "alpha": float(script.alpha),
        "dropout": script.lora_dropout if dropout is None else dropout,
        "orth_reg_weight": script.orth_reg_weight,
    }
    train = {
        "learning_rate": script.learning_rate,
        "weight_decay": script.weight_decay,
        "warmup_steps": script.interval,
        "batch_size": 32,
    }
    return Preset("paper", task, source, method, train)


def resolve_preset(name: str, task: str, target_rank: float | None) -> Preset:
    """A preset by name; an unknown name is a one-line error listing the known ones."""
    if name != "paper":
        raise ConfigError(f"preset: unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return paper_preset(task, target_rank)


def paper_method_config(task: str = "mrpc", target_rank: float = 2.0, **overrides: Any) -> Any:
    """``IncreLoRAConfig`` of the paper recipe for the Python API (``increlora.inject``).

    The train-side settings (learning rate, weight decay, warm-up steps) are in
    ``paper_preset(task, target_rank).train``; ``overrides`` replace method fields.
    """
    from .config import IncreLoRAConfig

    fields = {k: v for k, v in paper_preset(task, target_rank).method.items()}
    fields.pop("name")
    fields.pop("budget")
    fields.update(overrides)
    return IncreLoRAConfig(**fields)
