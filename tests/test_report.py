"""The benchmark protocol: the three splits, learning-rate choice on validation only, paired
differences by seed, and the committed report regenerating from the committed summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from increlora.runner import report
from increlora.tasks import carve_validation, get_task
from increlora.tasks.registry import Example

REPO = Path(__file__).resolve().parents[1]


def _write_run(
    root: Path, method: str, lr: float, seed: int, val: float, test: float, **extra
) -> None:
    out = root / "bench" / f"method={method}-lr{lr:g}" / f"seed={seed}"
    out.mkdir(parents=True)
    config = {
        "model": "minilm",
        "output_dir": str(out).replace(f"method={method}-lr{lr:g}", f"method={method}"),
        "data": {"task": "mr", "train_size": 500},
        "method": {"name": method, "target_rank": 2.0},
        "train": {"seed": seed, "learning_rate": lr},
    }
    scores = {"validation": {"accuracy": val}, "test": {"accuracy": test}}
    metrics = {
        "task": "mr",
        "seed": seed,
        "main_metric": "accuracy",
        "eval_split": "validation",
        "best": {"step": 48, "value": val, "metrics": scores},
        "final": {"step": 48, "metrics": scores},
        "adapter": {"selected": "best"},
        "trainable_params": 83000,
        "wall_time_s": 120.0,
        "total_steps": 48,
        "config": config,
        "resolved": {"learning_rate": lr, "plan": None},
        **extra,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "run_config.json").write_text(json.dumps(config))


def _report_text(directory, output):
    """The report and, where it has one, its sweep appendix (``<stem>_sweeps.md``)."""
    path = report.write_report(directory, output)
    appendix = path.with_name(f"{path.stem}_sweeps.md")
    return path.read_text() + (appendix.read_text() if appendix.is_file() else "")


def test_learning_rate_is_chosen_on_validation_never_on_test(tmp_path):
    # lr 1e-3 wins on validation but loses on test: it must still be the chosen one.
    for seed in (0, 1):
        _write_run(tmp_path, "lora", 1e-3, seed, val=0.80, test=0.70)
        _write_run(tmp_path, "lora", 3e-3, seed, val=0.75, test=0.90)
    runs = report.collect(tmp_path)
    chosen = report.chosen_rows(report.cell_rows(runs))
    assert chosen["lora"].learning_rate == 1e-3
    text = _report_text(tmp_path, tmp_path / "r.md")
    assert "| lora | 0.001 (best here) | 0,1 | 0.800 ± 0.000 | 0.700 ± 0.000 |" in text
    assert "grid edge" not in text  # two rates tried: no edge to speak of
    assert "4 runs, 8 minutes of run wall time in all" in text  # 4 x 120 s
    _write_run(tmp_path, "lora", 3e-4, 0, val=0.60, test=0.60)
    text = _report_text(tmp_path, tmp_path / "r.md")
    assert "| lora | 0.001 (best here) |" in text  # the middle of three rates
    _write_run(tmp_path, "lora", 1e-4, 0, val=0.90, test=0.60)
    text = _report_text(tmp_path, tmp_path / "r.md")
    assert "| lora | 0.0001 (best here; grid edge ⚠) |" in text
    assert "grid edge ⚠: the best rate here is the smallest or largest tried" in text


def test_paired_differences_use_the_shared_seeds(tmp_path):
    for seed, (a, b) in enumerate([(0.80, 0.78), (0.82, 0.83), (0.79, 0.75)]):
        _write_run(tmp_path, "increlora", 1e-3, seed, val=0.8, test=a)
        _write_run(tmp_path, "lora", 1e-3, seed, val=0.8, test=b)
    _write_run(tmp_path, "adalora", 5e-3, 7, val=0.8, test=0.5)  # no shared seed: no pair
    _write_run(tmp_path, "peft-lora", 1e-3, 1, val=0.8, test=0.80)  # PEFT vs our LoRA
    _write_run(tmp_path, "sora", 1e-3, 1, val=0.8, test=0.70)  # other methods: not paired
    pairs = report.paired(report.chosen_rows(report.cell_rows(report.collect(tmp_path))))
    assert [(p["method"], p["reference"]) for p in pairs] == [
        ("increlora", "lora"),
        ("peft-lora", "lora"),
    ]
    assert pairs[0]["seeds"] == [0, 1, 2]
    assert pairs[0]["diffs"] == pytest.approx([0.02, -0.01, 0.04])
    assert pairs[1]["seeds"] == [1] and pairs[1]["diffs"] == pytest.approx([-0.03])


def test_summaries_copy_only_the_small_files(tmp_path):
    _write_run(tmp_path, "lora", 1e-3, 0, val=0.8, test=0.7)
    weights = next((tmp_path / "bench").rglob("metrics.json")).parent / "adapter.safetensors"
    weights.write_bytes(b"x" * 100)
    assert report.save_summaries(tmp_path / "bench", tmp_path / "results" / "bench") == 1
    copied = sorted(p.name for p in (tmp_path / "results").rglob("*") if p.is_file())
    assert copied == ["metrics.json", "run_config.json"]
    assert [r.bench for r in report.collect(tmp_path / "results")] == ["bench"]


def test_restore_summaries_seeds_only_the_runs_a_runs_dir_lacks(tmp_path):
    for seed in (0, 1):
        _write_run(tmp_path, "lora", 1e-3, seed, val=0.8, test=0.7)
    assert report.save_summaries(tmp_path / "bench", tmp_path / "results" / "bench") == 2
    runs = tmp_path / "runs" / "bench"
    finished = runs / "method=lora-lr0.001" / "seed=0"
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text('{"mine": 1}')
    assert report.restore_summaries(tmp_path / "results" / "bench", runs) == 1
    assert (finished / "metrics.json").read_text() == '{"mine": 1}'  # never overwritten
    restored = runs / "method=lora-lr0.001" / "seed=1"
    assert sorted(p.name for p in restored.iterdir()) == ["metrics.json", "run_config.json"]
    assert report.restore_summaries(tmp_path / "nowhere", runs) == 0


def test_base_model_score_of_causal_runs_is_reported(tmp_path):
    for seed in (1, 2):
        _write_run(tmp_path, "lora", 1e-3, seed, val=0.6, test=0.55)
        path = next((tmp_path / "bench").glob(f"*/seed={seed}/metrics.json"))
        metrics = json.loads(path.read_text())
        metrics["base_model"] = {
            "metrics": {"validation": {"accuracy": 0.1}, "test": {"accuracy": 0.05}}
        }
        path.write_text(json.dumps(metrics))
    runs = report.collect(tmp_path)
    assert [r.base_test for r in runs] == [0.05, 0.05]
    text = _report_text(tmp_path, tmp_path / "r.md")
    assert "The base model (adapters off) scores 0.050 test accuracy" in text


def test_validation_is_carved_from_train_and_the_eval_split_becomes_test():
    task = get_task("mr")
    train = [Example(f"t{i}", None, i % 2) for i in range(100)]
    evals = {"validation": [Example(f"e{i}", None, i % 2) for i in range(10)]}
    rest, splits, task2 = carve_validation(task, train, evals, 20, split_seed=0)
    assert task2.eval_splits == ("validation", "test")
    assert len(rest) == 80 and len(splits["validation"]) == 20
    assert splits["test"] == evals["validation"]
    assert not {e.text_a for e in rest} & {e.text_a for e in splits["validation"]}
    again, splits2, _ = carve_validation(task, train, evals, 20, split_seed=0)
    assert splits2["validation"] == splits["validation"]  # fixed by split_seed alone
    glue = get_task("mnli")
    _, named, task3 = carve_validation(
        glue, train, {"validation_matched": [], "validation_mismatched": []}, 5, 0
    )
    assert task3.eval_splits == ("validation", "test_matched", "test_mismatched")
    assert set(named) == {"validation", "test_matched", "test_mismatched"}


@pytest.mark.skipif(
    not (REPO / "results").is_dir(), reason="no committed results/ in this checkout"
)
def test_committed_report_regenerates_from_committed_summaries(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = report.write_report("results", tmp_path / "results.md")
    for name in ("results.md", "results_sweeps.md"):
        committed = (REPO / "docs" / name).read_text(encoding="utf-8")
        assert (out.parent / name).read_text(encoding="utf-8") == committed


def test_rows_stuck_at_the_majority_class_are_flagged(tmp_path):
    floor = {"constant_baseline": {"prediction": "neg", "scores": {"validation": 0.596}}}
    for seed in (0, 1):
        _write_run(tmp_path, "lora", 1e-4, seed, val=0.596, test=0.572, **floor)
        _write_run(tmp_path, "lora", 2e-3, seed, val=0.70 + seed / 100, test=0.68, **floor)
    _write_run(tmp_path, "sora", 1e-4, 0, val=0.596, test=0.572)  # no floor recorded
    # One seed of three collapsed: the row learned, but its mean and std carry that seed.
    for seed, val in ((0, 0.80), (1, 0.596), (2, 0.81)):
        _write_run(tmp_path, "mora", 2e-2, seed, val=val, test=val - 0.02, **floor)
    text = _report_text(tmp_path, tmp_path / "r.md")
    assert "| lora ⚠ majority class | 0.0001 |" in text
    assert "| mora ⚠ majority class on 1 of 3 seeds | 0.02 |" in text
    assert "| lora | 0.002 (best here) |" in text
    assert "| sora | 0.0001 |" in text  # old runs without a recorded floor are not guessed
    assert "⚠ majority class: on validation, no better than always predicting" in text


def test_a_bare_increlora_label_is_shown_with_its_init(tmp_path):
    """Benches used the label ``increlora`` for the LoRA init (mr) and the paper init (QASC);
    the report names the init so one figure cannot mix them, while learning-rate choice keeps
    the bench label the specs refer to."""
    for init in ("lora", "paper"):
        resolved = {"learning_rate": 1e-2, "plan": None, "method_config": {"init": init}}
        _write_run(tmp_path / init, "increlora", 1e-2, 0, val=0.7, test=0.7, resolved=resolved)
        text = _report_text(tmp_path / init, tmp_path / f"{init}.md")
        assert f"| increlora-{init}init | 0.01 |" in text
        assert [run.method for run in report.collect(tmp_path / init)] == ["increlora"]
    _write_run(tmp_path / "old", "increlora", 1e-2, 0, val=0.7, test=0.7)  # init not recorded
    text = _report_text(tmp_path / "old", tmp_path / "old.md")
    assert "| increlora | 0.01 |" in text


def test_a_sweep_bench_gets_validation_curves_and_a_final_bench_gets_scores(tmp_path):
    for lr, val in ((1e-3, 0.60), (2e-3, 0.74), (5e-3, 0.72)):
        _write_run(tmp_path / "sweep", "lora", lr, 0, val=val, test=0.7)
    for seed in (1, 2):
        _write_run(tmp_path / "final", "lora", 2e-3, seed, val=0.74, test=0.70)
        _write_run(tmp_path / "final", "adalora", 2e-2, seed, val=0.75, test=0.72)
    assert report.is_sweep(report.collect(tmp_path / "sweep"))
    assert not report.is_sweep(report.collect(tmp_path / "final"))
    for bench in ("sweep", "final"):
        text = _report_text(tmp_path / bench, tmp_path / f"{bench}.md")
        assert f"![bench]({bench}_figures/{bench}_bench.png)" in text
        assert (tmp_path / f"{bench}_figures" / f"{bench}_bench.png").stat().st_size > 1000


def test_report_to_a_file_prints_where_not_the_whole_report(tmp_path, capsys):
    from increlora import cli

    _write_run(tmp_path / "runs", "lora", 1e-3, 0, val=0.7, test=0.7)
    assert cli.main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "r.md")]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"increlora: wrote {tmp_path / 'r.md'} (figures in r_figures/)"
