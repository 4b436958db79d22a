"""The runner's parts without training: configs, shipped YAML, data order, labels, logs,
run-directory checks, plots, bench expansion and report aggregation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from increlora.config import ConfigError
from increlora.runner import outputs as O
from increlora.runner import report
from increlora.runner.bench import expand
from increlora.runner.config import (
    BUILTIN_CONFIGS,
    FALLBACK_LEARNING_RATE,
    METHOD_DEFAULTS,
    RunConfig,
    TrainConfig,
    builtin_config_path,
    default_learning_rate,
    default_run_dict,
    method_defaults,
    read_yaml,
)
from increlora.runner.data import DataError, EpochSampler, check_labels
from increlora.runner.plots import rank_history, short_labels, split_module_name
from increlora.tasks import Example, get_task

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", BUILTIN_CONFIGS)
def test_repository_configs_are_the_shipped_ones(name: str) -> None:
    assert (REPO / "configs" / f"{name}.yaml").read_text() == builtin_config_path(name).read_text()


def test_default_job_is_minilm_mr_increlora_rank_2() -> None:
    config = RunConfig.from_dict(default_run_dict())
    assert (config.model, config.data.task) == ("minilm", "mr")
    assert (config.method.name, config.method.target_rank) == ("increlora", 2.0)
    assert config.data.train_size and config.data.max_length == 64
    assert config.resolved_output_dir() == Path("runs/minilm-mr-increlora-r2-seed0")


def test_cpu_bench_spec_expands_to_valid_distinct_runs() -> None:
    runs = expand(read_yaml("cpu_bench"), Path("bench"))
    assert len({r.key for r in runs}) == len(runs) == 36
    assert {r.config.data.task for r in runs} == {"mr", "sarcasm"}
    assert {r.config.method.name for r in runs} <= set(METHOD_DEFAULTS)
    assert all(r.config.model == "minilm" for r in runs)


def test_run_config_round_trip_and_yaml_coercion() -> None:
    data = {
        "model": "m",
        "data": {"task": "rte"},
        "method": {"name": "increlora", "target_rank": "4", "top_h": 3},
        "train": {"learning_rate": "1e-3", "max_steps": "7"},
    }
    config = RunConfig.from_dict(data)
    assert config.train.learning_rate == 1e-3 and config.train.max_steps == 7
    assert config.method.target_rank == 4.0 and config.method.args == {"top_h": 3}
    assert RunConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["method"] == {"name": "increlora", "target_rank": 4.0, "top_h": 3}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trian": {}}, "unknown field(s) ['trian']"),
        ({"train": {"epoch": 1}}, "unknown field(s) ['epoch']"),
        ({"train": {"epochs": 0}}, "epochs: must be >= 1"),
        ({"train": {"warmup_ratio": 1.5}}, "warmup_ratio"),
        ({"train": {"mixed_precision": "fp8"}}, "mixed_precision"),
        ({"train": {"learning_rate": "fast"}}, "expected a number"),
        ({"data": {"train_size": 0}}, "train_size: must be >= 1"),
        ({"data": "mr"}, "data: expected a mapping"),
        ({"method": {"target_rank": -1}}, "method.target_rank"),
        ({"train": {"report_to": ["tensorbord"]}}, "report_to: unknown tracker(s) ['tensorbord']"),
        ({"train": {"report_to": 5}}, "report_to: expected tracker names"),
    ],
)
def test_run_config_errors_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_dict(data)


def test_report_to_takes_a_list_or_comma_separated_names_and_may_change_on_resume() -> None:
    config = RunConfig.from_dict({"train": {"report_to": "tensorboard, wandb,tensorboard"}})
    assert config.train.report_to == ["tensorboard", "wandb"]
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig().train.report_to == []
    tracked = RunConfig.from_dict({"train": {"report_to": ["mlflow"]}}).to_dict()
    assert O.config_differences(RunConfig().to_dict(), tracked) == []


def test_every_default_learning_rate_names_its_source() -> None:
    entries = [entry for cells in METHOD_DEFAULTS.values() for entry in cells]
    assert all(entry.source and entry.learning_rate > 0 for entry in entries)
    # The primary cell (rank 2, 48 steps) comes first and answers when nothing is known.
    assert all(cells[0].rank == 2 and cells[0].steps == 48 for cells in METHOD_DEFAULTS.values())
    assert default_learning_rate("increlora") == METHOD_DEFAULTS["increlora"][0].learning_rate
    assert default_learning_rate("some-new-method") == FALLBACK_LEARNING_RATE
    # IncreLoRA's LoRA-style init has its own rate (it collapses at the paper init's 1e-2).
    assert default_learning_rate("increlora", {"init": "lora"}) == 2e-3
    assert default_learning_rate("increlora", {"init": "paper"}) == 1e-2
    assert default_learning_rate("lora", {"init": "lora"}) == default_learning_rate("lora")


@pytest.mark.parametrize(
    ("method", "rank", "steps", "expected"),
    [
        # 96 steps (1,000 examples) is nearer 48 than 282 on a log scale; 189 nearer 282.
        ("lora", 2, 48, 2e-3),
        ("lora", 2, 96, 2e-3),
        ("lora", 2, 189, 1e-3),
        ("lora", 2, 5000, 1e-3),
        ("lora", 8, 48, 5e-3),
        ("increlora", 2, 282, 5e-3),
        ("increlora", 8, None, 2e-2),
        ("increlora", None, 282, 5e-3),
        ("adalora", 8, 48, 5e-2),
        ("adalora", 8, 282, 5e-3),
        ("lora", 8, 282, 5e-4),
        ("lora", 16, 1000, 5e-4),
        ("full", 2, 96, 2e-4),
        ("full", 8, 5000, 5e-5),
        # A method swept in one cell only keeps that rate at any size.
        ("increlora/init=lora", 2, 282, 2e-3),
        ("mora", 8, 282, 1e-3),
        # Equally far from rank 2 and rank 8: the primary cell wins the tie.
        ("lora", 4, 48, 2e-3),
    ],
)
def test_default_rate_comes_from_the_nearest_swept_cell(method, rank, steps, expected) -> None:
    name, _, init = method.partition("/init=")
    args = {"init": init} if init else None
    assert default_learning_rate(name, args, rank=rank, steps=steps) == expected
    entry = method_defaults(name, args, rank=rank, steps=steps)
    assert entry is not None and entry.learning_rate == expected


def test_planned_steps_counts_optimizer_steps_before_anything_loads() -> None:
    train = TrainConfig(epochs=3, batch_size=32)
    assert train.planned_steps(3000) == 282 and train.planned_steps(500) == 48
    assert train.planned_steps(None) is None
    assert (
        TrainConfig(epochs=3, batch_size=32, gradient_accumulation_steps=2).planned_steps(3000)
        == 3 * 47
    )
    assert train.planned_steps(3000, processes=2) == 3 * 47
    assert TrainConfig(max_steps=7).planned_steps(None) == 7


# ---------------------------------------------------------------------------- data
def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochSampler(50, seed=1), EpochSampler(50, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(EpochSampler(50, seed=2)) != list(EpochSampler(50, seed=1))


def test_labels_outside_the_label_set_are_rejected() -> None:
    sst2, stsb = get_task("sst2"), get_task("stsb")
    check_labels(sst2, "train", [Example("ok", None, 1)])
    with pytest.raises(DataError, match=r"example 1 .*label 2 is not an id in 0..1"):
        check_labels(sst2, "train", [Example("ok", None, 0), Example("bad", None, 2)])
    with pytest.raises(DataError, match="label -1"):
        check_labels(sst2, "validation", [Example("test split", None, -1)])
    with pytest.raises(DataError, match="not a finite number"):
        check_labels(stsb, "train", [Example("a", "b", float("nan"))])
    with pytest.raises(DataError, match="no examples"):
        check_labels(sst2, "train", [])


# ------------------------------------------------------------------ run directories
def test_run_log_survives_a_line_cut_short(tmp_path: Path) -> None:
    log = O.RunLog(tmp_path / "train_log.jsonl")
    for step in range(1, 5):
        log.write({"event": "train", "step": step})
    with open(log.path, "a") as handle:
        handle.write('{"event": "tra')  # a crash in the middle of a write
    assert [r["step"] for r in O.read_log(log.path)] == [1, 2, 3, 4]
    log.truncate_after(2)
    assert [r["step"] for r in O.read_log(log.path)] == [1, 2]


def test_run_dir_checks(tmp_path: Path) -> None:
    config = RunConfig(output_dir=str(tmp_path / "run")).to_dict()
    out = tmp_path / "run"
    O.check_run_dir(out, config, resume=False)  # missing: fine
    with pytest.raises(O.RunDirError, match="nothing to resume"):
        O.check_run_dir(out, config, resume=True)
    O.write_run_config(out, config)
    with pytest.raises(O.RunDirError, match="already holds this run"):
        O.check_run_dir(out, config, resume=False)
    O.check_run_dir(out, config, resume=True)
    stop_later = json.loads(json.dumps(config))
    stop_later["train"]["stop_at_step"] = 9
    O.check_run_dir(out, stop_later, resume=True)  # stopping elsewhere changes no result
    other = json.loads(json.dumps(config))
    other["method"]["top_h"] = 2
    with pytest.raises(O.RunDirError, match=r"method.top_h: None -> 2"):
        O.check_run_dir(out, other, resume=True)


# --------------------------------------------------------------------------- plots
def test_module_names_split_into_layer_and_type() -> None:
    assert split_module_name("bert.encoder.layer.3.attention.self.query") == (
        3,
        "attention.self.query",
    )
    assert split_module_name("lin0") == (0, "lin0")
    types = ["attention.self.query", "attention.output.dense", "output.dense", "mlp.c_fc"]
    assert short_labels(types) == {
        "attention.self.query": "query",
        "attention.output.dense": "attention.output.dense",
        "output.dense": "output.dense",
        "mlp.c_fc": "c_fc",
    }


def test_rank_history_replays_growth_events() -> None:
    steps, history = rank_history(
        {"a": 1, "b": 1},
        [
            {"step": 20, "grown": [{"module": "a", "rank": 3}]},
            {"step": 10, "grown": [{"module": "a", "rank": 2}, {"module": "b", "rank": 2}]},
        ],
    )
    assert steps == [0, 10, 20]
    assert history == {"a": [1, 2, 3], "b": [1, 2, 2]}


# ------------------------------------------------------------------- bench / report
def test_bench_spec_errors() -> None:
    with pytest.raises(ConfigError, match="unknown axis 'sed'"):
        expand({"matrix": {"sed": [0]}}, Path("b"))
    with pytest.raises(ConfigError, match="share a label"):
        expand({"matrix": {"method": ["lora", {"name": "lora", "r": 4}]}}, Path("b"))
    with pytest.raises(ConfigError, match="non-empty list"):
        expand({"matrix": {"seed": []}}, Path("b"))
    runs = expand(
        {"matrix": {"method": [{"name": "lora", "label": "fast", "learning_rate": 0.01}]}},
        Path("b"),
    )
    assert runs[0].key == "method=fast" and runs[0].config.train.learning_rate == 0.01


def _write_metrics(root: Path, seed: int, value: float, method: str = "lora") -> None:
    out = root / f"method={method}" / f"seed={seed}"
    config = RunConfig.from_dict(
        {"method": {"name": method}, "train": {"seed": seed}, "output_dir": str(out)}
    )
    split = {"validation": {"accuracy": value}}
    out.mkdir(parents=True)
    metrics = {
        "task": "mr",
        "seed": seed,
        "main_metric": "accuracy",
        "eval_split": "validation",
        "config": config.to_dict(),
        "best": {"step": 5, "value": value, "metrics": split},
        "final": {"step": 9, "metrics": split},
        "adapter": {"selected": "best", "step": 5},
        "trainable_params": 100,
        "total_steps": 9,
        "wall_time_s": 60.0,
        "resolved": {"learning_rate": 1e-3},
    }
    (out / "metrics.json").write_text(json.dumps(metrics))


def test_report_aggregates_seeds_into_mean_and_std(tmp_path) -> None:
    _write_metrics(tmp_path, 0, 0.80)
    _write_metrics(tmp_path, 1, 0.82)
    _write_metrics(tmp_path, 0, 0.7, "increlora")
    rows = report.cell_rows(report.collect(tmp_path))
    assert [(r.method, len(r.seeds)) for r in rows] == [("increlora", 1), ("lora", 2)]
    table = report.write_report(tmp_path).read_text()
    assert "| lora | 0.001 | 0,1 | 0.810 ± 0.014 | - |" in table  # sample std of 0.80, 0.82
    assert "| increlora | 0.001 | 0 | 0.700 | - | not recorded | 100 | 1.0 min |" in table
