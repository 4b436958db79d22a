"""``increlora`` end to end on a tiny BERT saved to disk and the GLUE TSV fixtures.

Every run goes through ``cli.main`` in-process. Interruptions are simulated at the loop's
``compute_loss`` seam: a real SIGTERM sent to this process, a KeyboardInterrupt raised in the
middle of a step, a NaN loss. Resumed runs must reproduce the uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from increlora import cli
from increlora.runner import loop

GLUE = Path(__file__).parent / "fixtures" / "glue"
WORDS = (
    "the a is of and to it film movie good bad great not very story fun boring plot man woman"
    " dog horse playing guitar chess riding hard hat dancing child plane cheese pizza"
).split()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, hidden-16 BERT and a WordPiece tokenizer, saved like a hub model."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    vocab += [*letters, *".,'-", *(f"##{c}" for c in letters)]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_args(model: Path, out: Path, *extra: str, task: str = "sst2") -> list[str]:
    """A 10-step run whose growth (rounds at steps 2, 4, 6, 8) spans every interruption."""
    return [
        "train",
        "--model",
        str(model),
        "--task",
        task,
        "--data-dir",
        str(GLUE),
        "--train-size",
        "none",
        "--max-length",
        "64",  # what the tiny model takes
        "--batch-size",
        "2",
        "--max-steps",
        "10",
        "--eval-every",
        "3",
        "--log-every",
        "1",
        "--output-dir",
        str(out),
        "--method-arg",
        "init_warmup=1",
        "--method-arg",
        "interval=2",
        "--method-arg",
        "top_h=3",
        *extra,
    ]


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert cli.main(train_args(tiny_model, out)) == 0
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics, adapter tensors and log (apart from resume events and timings)."""
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("final", "best", "ranks", "trainable_params", "steps", "adapter"):
        assert ma[key] == mb[key], key
    ta, tb = (load_file(d / "increlora_adapter" / "adapter.safetensors") for d in (a, b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key

    def replay(out: Path) -> list[dict]:
        records = [r for r in log_records(out) if r["event"] not in ("resume", "interrupt")]
        return [{k: v for k, v in r.items() if k != "train_time_s"} for r in records]

    assert replay(a) == replay(b)


# ------------------------------------------------------------------ outputs contract
def test_train_writes_the_output_contract(reference: Path) -> None:
    files = {p.name for p in reference.iterdir()}
    assert {
        "run_config.json",
        "metrics.json",
        "train_log.jsonl",
        "adapter",
        "increlora_adapter",
        "ranks.png",
        "rank_allocation.png",
        "checkpoint",
    } <= files
    assert not [f for f in files if f.startswith(".")], "temporary files left behind"
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["steps"] == 10
    execution = metrics["execution"]  # how it ran, so runs of different setups compare
    assert execution["processes"] == 1 and execution["distributed"] == "NO"
    assert execution["mixed_precision"] == "no" and execution["global_batch"] > 0
    assert set(metrics["final"]["metrics"]["validation"]) == {"accuracy"}
    assert metrics["best"]["value"] == max(
        r["main"] for r in log_records(reference) if r["event"] == "eval"
    )
    assert metrics["total_rank"] == sum(metrics["ranks"].values()) == 24  # 12 modules x 2
    assert len(metrics["ranks"]) == 12
    assert metrics["trainable_params"] > 0 and metrics["steps_per_second"] > 0
    assert metrics["wall_time_s"] > 0 and metrics["peak_memory_mb"]["cpu_rss"] > 0
    assert {"torch", "transformers", "accelerate", "increlora"} <= set(metrics["versions"])
    assert metrics["config"]["method"]["name"] == "increlora"
    assert metrics["resolved"]["plan"]["interval"] == 2
    # No rate given: the benchmark's rate for the nearest swept cell (10 steps, rank 2: the
    # 48-step one), and the run says where it came from.
    assert metrics["resolved"]["learning_rate"] == 1e-2
    assert metrics["resolved"]["learning_rate_source"].startswith(
        "default for increlora: sweep_mr500"
    )
    assert metrics["adapter"]["peft"] == "adapter"
    assert (reference / "adapter" / "adapter_config.json").is_file()
    # The learned-nothing floor, from a plain count of the fixture's labels (column 1).
    rows = [
        line.split("\t") for line in (GLUE / "SST-2").joinpath("train.tsv").read_text().splitlines()
    ]
    dev = [
        line.split("\t") for line in (GLUE / "SST-2").joinpath("dev.tsv").read_text().splitlines()
    ]
    train_labels = [int(r[1]) for r in rows[1:]]
    majority = max(sorted(set(train_labels)), key=train_labels.count)  # ties: lower id
    dev_labels = [int(r[1]) for r in dev[1:]]
    assert metrics["constant_baseline"]["scores"] == {
        "validation": pytest.approx(dev_labels.count(majority) / len(dev_labels))
    }

    records = log_records(reference)
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert {"loss", "lr", "total_rank", "epoch"} <= set(train[0])
    assert train[0]["total_rank"] == 12 and train[-1]["total_rank"] == 24
    growth = [r for r in records if r["event"] == "growth"]
    assert [g["step"] for g in growth] == [2, 4, 6, 8]
    assert all(len(g["grown"]) == 3 and len(g["scores"]) == 12 for g in growth)
    evals = [r["step"] for r in records if r["event"] == "eval"]
    assert evals == [3, 6, 9, 10]


def test_evaluate_reproduces_the_run_metric_from_both_adapter_formats(
    reference: Path, tmp_path: Path, capsys
) -> None:
    metrics = json.loads((reference / "metrics.json").read_text())
    for adapter in ("adapter", "increlora_adapter"):
        output = tmp_path / f"{adapter}.json"
        code = cli.main(
            ["evaluate", "--adapter", str(reference / adapter), "--output", str(output)]
        )
        assert code == 0
        assert json.loads(output.read_text())["metrics"] == metrics["best"]["metrics"]
    assert '"accuracy"' in capsys.readouterr().out
    # `export --format peft` converts the increlora adapter into an equivalent PEFT one; outside
    # a run directory, evaluate needs the model, task and data spelled out.
    converted = tmp_path / "converted"
    own = str(reference / "increlora_adapter")
    export = ["export", "--adapter", own, "--format", "peft", "--output", str(converted)]
    assert cli.main(export) == 0
    output = tmp_path / "converted.json"
    evaluate = ["evaluate", "--adapter", str(converted), "--model", metrics["model"]]
    evaluate += ["--task", "sst2", "--data-dir", str(GLUE), "--max-length", "64"]
    assert cli.main([*evaluate, "--output", str(output)]) == 0
    assert json.loads(output.read_text())["metrics"] == metrics["best"]["metrics"]


def _validation_predictions(model: torch.nn.Module, tokenizer_dir: Path) -> torch.Tensor:
    """The model's STS-B scores on the validation fixture (one batch)."""
    from increlora.runner.data import TokenizedDataset, eval_loader, load_checked
    from increlora.runner.model import load_model

    data = load_checked("stsb", str(GLUE))
    tokenizer = load_model(str(tokenizer_dir), data.task).tokenizer
    examples = TokenizedDataset(data.task, data.evals["validation"], tokenizer, 64)
    (batch,) = eval_loader(examples, tokenizer, 64)
    with torch.no_grad():
        return model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_regression_task_and_peft_reload_match_exactly(tiny_model, tmp_path) -> None:
    """STS-B (a regression head): the PEFT reload predicts what the run's own adapter does,
    to float precision. (Predictions, not Pearson: on the 4-example fixture the tiny model's
    scores spread by ~4e-6, so float rounding of 1e-8 already moves Pearson by ~1e-4.)"""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from increlora.adapter import load_adapter
    from increlora.methods.peft_reference import load_peft_adapter
    from increlora.runner.model import load_model
    from increlora.tasks import get_task

    out = tmp_path / "stsb"
    assert cli.main(train_args(tiny_model, out, "--no-select-best", task="stsb")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapter"] == {
        "step": 10,
        "selected": "final",
        "peft": "adapter",
        "peft_unavailable": None,
        "increlora": "increlora_adapter",
    }
    result = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--adapter", str(out / "adapter"), "--output", str(result)]) == 0
    evaluated = json.loads(result.read_text())
    assert evaluated["adapter_format"] == "peft"
    assert set(evaluated["metrics"]["validation"]) == {"pearson", "spearmanr"}
    task = get_task("stsb")
    own = load_model(str(tiny_model), task).model
    load_adapter(own, out / "increlora_adapter")
    peft = load_peft_adapter(load_model(str(tiny_model), task).model, out / "adapter")
    torch.testing.assert_close(  # ~1 float32 ulp apart; 1e-7 is ~15 ulps at these values
        _validation_predictions(peft, tiny_model),
        _validation_predictions(own, tiny_model),
        rtol=0,
        atol=1e-7,
    )

    merged = tmp_path / "merged"
    assert (
        cli.main(["export", "--adapter", str(out / "increlora_adapter"), "--output", str(merged)])
        == 0
    )
    # Ordinary shareable files (transformers writes its weights owner-only), no temp left.
    assert {oct(p.stat().st_mode & 0o777) for p in merged.iterdir()} == {"0o644"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    inputs = {"input_ids": torch.tensor([[2, 10, 20, 30, 3]])}
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, peft_model(**inputs).logits)


# ----------------------------------------------------------------- resume is exact
def test_stop_at_step_then_resume_equals_the_uninterrupted_run(
    tiny_model, reference, tmp_path
) -> None:
    out = tmp_path / "parts"
    assert cli.main(train_args(tiny_model, out, "--stop-at-step", "5")) == 0
    assert not (out / "metrics.json").exists()
    assert (out / "checkpoint").is_dir()
    assert cli.main(["train", "--resume", "--output-dir", str(out)]) == 0
    assert_same_run(reference, out)


def test_sigterm_checkpoints_and_resume_equals_the_uninterrupted_run(
    tiny_model, reference, tmp_path, monkeypatch, capsys
) -> None:
    calls = {"n": 0}
    real = loop.compute_loss

    def send_sigterm_at_step_5(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill` or a scheduler sends
        return real(model, batch)

    out = tmp_path / "killed"
    monkeypatch.setattr(loop, "compute_loss", send_sigterm_at_step_5)
    assert cli.main(train_args(tiny_model, out)) == 143  # 128 + SIGTERM
    message = capsys.readouterr().err
    assert "SIGTERM" in message and f"increlora train --resume --output-dir {out}" in message
    assert json.loads((out / "checkpoint" / "extra.json").read_text())["step"] == 5
    monkeypatch.setattr(loop, "compute_loss", real)
    assert cli.main(["train", "--resume", "--output-dir", str(out)]) == 0
    assert_same_run(reference, out)


def test_keyboard_interrupt_mid_step_resumes_from_the_last_boundary(
    tiny_model, reference, tmp_path, monkeypatch
) -> None:
    calls = {"n": 0}
    real = loop.compute_loss

    def ctrl_c_in_step_8(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(model, batch)

    out = tmp_path / "ctrl-c"
    monkeypatch.setattr(loop, "compute_loss", ctrl_c_in_step_8)
    assert cli.main(train_args(tiny_model, out)) == 130
    assert json.loads((out / "checkpoint" / "extra.json").read_text())["step"] == 7
    monkeypatch.setattr(loop, "compute_loss", real)
    assert cli.main(["train", "--resume", "--output-dir", str(out)]) == 0
    assert_same_run(reference, out)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_model, tmp_path, monkeypatch, capsys
) -> None:
    calls = {"n": 0}
    real = loop.compute_loss

    def nan_at_step_5(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    out = tmp_path / "nan"
    monkeypatch.setattr(loop, "compute_loss", nan_at_step_5)
    assert cli.main(train_args(tiny_model, out)) == 3
    message = capsys.readouterr().err
    assert "nan at step 5" in message and "step 3" in message
    assert json.loads((out / "checkpoint" / "extra.json").read_text())["step"] == 3
    assert not (out / "metrics.json").exists()
    assert log_records(out)[-1]["event"] == "diverged"


# ----------------------------------------------------------------- run directories
def test_run_directory_is_never_silently_reused(tiny_model, reference, tmp_path, capsys) -> None:
    # The same run again: refused, pointing at --resume.
    assert cli.main(train_args(tiny_model, reference)) == 2
    assert "already holds this run" in capsys.readouterr().err
    # A different run in the same directory: refused, naming the difference.
    assert cli.main(train_args(tiny_model, reference, "--seed", "1")) == 2
    assert "train.seed: 0 -> 1" in capsys.readouterr().err
    # Resuming a finished run is a no-op; changing it on resume is refused.
    assert cli.main(["train", "--resume", "--output-dir", str(reference)]) == 0
    assert cli.main(["train", "--resume", "--output-dir", str(reference), "--lr", "0.1"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert cli.main(train_args(tiny_model, tmp_path / "other")) == 2
    assert "not an increlora run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------ bad input
def _bad_tsv(tmp_path: Path, rows: list[str]) -> Path:
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\n")
    return tmp_path / "glue"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--task", "nosuchtask"], "unknown task 'nosuchtask'"),
        (["--model", "./no/such/model"], "not a known alias"),
        (["--method", "nosuchmethod"], "unknown method 'nosuchmethod'"),
        (["--method-arg", "bogus_field=1"], "unknown field(s) ['bogus_field']"),
        (["--method-arg", "interval=50"], "schedule"),
        (["--train-size", "100"], "only 6 exist"),
        (["--data-dir", "/no/such/dir"], "no GLUE TSV file"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_model, tmp_path, capsys, override, expected) -> None:
    out = tmp_path / "run"
    assert cli.main(train_args(tiny_model, out) + override) == 2
    err = capsys.readouterr().err
    assert err.startswith("increlora: error:") and expected in err
    assert not (out / "run_config.json").exists(), "a failed setup must not claim the directory"


def test_malformed_data_names_file_and_line(tiny_model, tmp_path, capsys) -> None:
    data = _bad_tsv(tmp_path, ["good film\t1", "bad film\t7"])
    assert cli.main(train_args(tiny_model, tmp_path / "r") + ["--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "train.tsv line 3" in err and "'7'" in err
    data = _bad_tsv(tmp_path / "b", ["good film\t1\textra"])
    assert cli.main(train_args(tiny_model, tmp_path / "r") + ["--data-dir", str(data)]) == 2
    assert "train.tsv line 2: expected 2 tab-separated fields" in capsys.readouterr().err


def test_bad_config_files(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("train: {epoch: 3}\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "unknown field(s) ['epoch']" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "three"])


def test_print_config_merges_file_and_options(tmp_path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data: {task: rte}\nmethod: {name: increlora, top_h: 4}\n")
    args = ["train", "--config", str(config), "--seed", "3", "--method-arg", "add_r=2"]
    assert cli.main([*args, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["task"] == "rte"
    # Not the default job (task mr): its train_size / max_length / eval_every do not apply.
    assert printed["data"]["train_size"] is None and printed["data"]["max_length"] == 128
    assert printed["train"]["eval_every"] is None
    assert printed["train"]["seed"] == 3
    assert printed["method"] == {"name": "increlora", "target_rank": 2, "top_h": 4, "add_r": 2}
    # Another method drops the previous method's own fields, keeps the budget.
    assert cli.main([*args[:-2], "--method", "lora", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["method"] == {"name": "lora", "target_rank": 2}


def test_print_config_names_the_learning_rate_the_run_will_use(capsys) -> None:
    """The rate is left open in the config and filled in from the method as configured and
    the swept cell nearest the run: the default job's 189 steps are nearer the 282-step cell
    (3,000 examples) than the 48-step one; 500 examples are the 48-step cell itself; IncreLoRA's
    LoRA-style init has its own default, not the paper init's."""
    cases = (
        ([], "0.005 (sweep_mr3000"),
        (["--train-size", "500"], "0.01 (sweep_mr500"),
        (["--train-size", "500", "--target-rank", "8"], "0.02 (sweep_r8_mr500"),
        (["--method-arg", "init=lora"], "0.002 (sweep_mr500"),
    )
    for extra, expected in cases:
        assert cli.main(["train", *extra, "--print-config"]) == 0
        comments = [
            line for line in capsys.readouterr().out.splitlines() if "learning_rate" in line
        ]
        assert any(line.startswith(f"#   train.learning_rate: {expected}") for line in comments), (
            extra,
            comments,
        )


# ---------------------------------------------------------------------- bench/report
def test_bench_is_resumable_and_report_aggregates_seeds(
    tiny_model, tmp_path, capsys, monkeypatch
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "bench"),
                "base": {
                    "model": str(tiny_model),
                    "data": {"task": "sst2", "data_dir": str(GLUE), "train_size": None},
                    "train": {"max_steps": 3, "batch_size": 2},
                },
                "matrix": {
                    "method": [
                        "increlora",
                        {"name": "increlora", "label": "fast", "learning_rate": 0.01, "top_h": 12},
                    ],
                    "target_rank": [2],
                    "seed": [0, 1],
                },
            }
        )
    )
    calls = {"n": 0}
    real = loop.compute_loss

    def ctrl_c_in_the_third_run(model, batch):
        calls["n"] += 1  # 3 steps of one micro-batch per run
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(loop, "compute_loss", ctrl_c_in_the_third_run)
    assert cli.main(["bench", str(spec)]) == 130
    assert f"run `increlora bench {spec}` again to continue the bench" in capsys.readouterr().err
    monkeypatch.setattr(loop, "compute_loss", real)
    assert cli.main(["bench", str(spec)]) == 0
    err = capsys.readouterr().err
    assert (err.count("skipped"), err.count("resuming"), err.count(": running")) == (2, 1, 1)
    assert "resumed" in err and "at step 1/3" in err
    runs = sorted((tmp_path / "bench").rglob("metrics.json"))
    assert len(runs) == 4
    stamps = [p.stat().st_mtime_ns for p in runs]
    assert cli.main(["bench", str(spec)]) == 0
    assert capsys.readouterr().err.count("finished earlier, skipped") == 4
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    status = json.loads((tmp_path / "bench" / "bench_status.json").read_text())
    assert sorted(status.values()) == ["finished"] * 4

    assert cli.main(["report", str(tmp_path / "bench")]) == 0
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "### sst2" in report
    rows = [ln for ln in report.splitlines() if ln.startswith(("| increlora", "| fast"))]
    assert len(rows) == 2 and all("±" in row and "| 0,1 |" in row for row in rows)
    # 3 steps: too short to allocate (and too short for some seeds to beat the majority class)
    fast = [row for row in rows if row.startswith("| fast")]
    assert fast[0].startswith("| fast ⚠ uniform") and "| 0.01 |" in fast[0]
    assert (tmp_path / "bench" / "report_figures" / "report_bench.png").stat().st_size > 0


def test_accumulation_and_bf16_count_optimizer_steps(tiny_model, tmp_path) -> None:
    out = tmp_path / "accumulate"
    args = ["train", "--model", str(tiny_model), "--task", "rte", "--data-dir", str(GLUE)]
    args += ["--train-size", "none", "--epochs", "2", "--batch-size", "1"]
    args += [
        "--gradient-accumulation-steps",
        "2",
        "--mixed-precision",
        "bf16",
        "--eval-every",
        "none",
    ]
    assert cli.main([*args, "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_per_epoch"] == 2 and metrics["steps"] == 4  # 4 examples / (1 x 2)
    assert metrics["total_rank"] == 24
    assert [r["step"] for r in log_records(out) if r["event"] == "eval"] == [2, 4]


def test_help_lists_every_documented_option(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--config",
        "--model",
        "--task",
        "--data-dir",
        "--method",
        "--target-rank",
        "--method-arg",
        "--epochs",
        "--max-steps",
        "--train-size",
        "--seed",
        "--output-dir",
        "--resume",
        "--mixed-precision",
        "--gradient-checkpointing",
        "--eval-base",
    ):
        assert flag in text
    for command in ("evaluate", "export", "bench", "report"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "usage: increlora " + command in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "full", "peft-lora"])
def test_other_methods_train_and_reload_to_the_same_metric(
    tiny_model, tmp_path, method: str
) -> None:
    """Budget-matched (lora), layer-free (full) and PEFT-backed methods go through the runner."""
    out = tmp_path / method
    args = ["train", "--model", str(tiny_model), "--task", "stsb", "--data-dir", str(GLUE)]
    args += ["--train-size", "none", "--batch-size", "2", "--max-steps", "2", "--method", method]
    assert cli.main([*args, "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    adapter = metrics["adapter"]["peft"] or metrics["adapter"]["increlora"]
    assert (adapter == "adapter") == (method != "full")  # full fine-tuning has no LoRA form
    result = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--adapter", str(out / adapter), "--output", str(result)]) == 0
    pearson = json.loads(result.read_text())["metrics"]["validation"]["pearson"]
    assert pearson == pytest.approx(metrics["best"]["value"], abs=1e-6)


def test_report_to_tensorboard_logs_the_run_live(tiny_model, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked"
    assert cli.main(train_args(tiny_model, out, "--report-to", "tensorboard")) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    records = log_records(out)
    train = [r for r in records if r["event"] == "train"]
    for tag, key in [
        ("train/loss", "loss"),
        ("train/lr", "lr"),
        ("train/total_rank", "total_rank"),
        ("train/trainable_params", "trainable_params"),
    ]:
        assert tag in tags["scalars"], tag
        logged = {e.step: e.value for e in events.Scalars(tag)}
        for record in train:  # every train record of train_log.jsonl, at its step
            assert logged[record["step"]] == pytest.approx(record[key], rel=1e-6), (tag, record)
    metrics = json.loads((out / "metrics.json").read_text())
    assert events.Scalars("train/total_rank")[-1].value == metrics["total_rank"]
    evals = [r for r in records if r["event"] == "eval"]
    main = {e.step: e.value for e in events.Scalars("eval/main")}
    assert main == pytest.approx({r["step"]: r["main"] for r in evals})
    accuracy = events.Scalars("eval/validation/accuracy")
    assert [e.step for e in accuracy] == [r["step"] for r in evals] == [3, 6, 9, 10]
    images = events.Images("ranks")  # the rank heatmap at every evaluation
    assert [i.step for i in images] == [3, 6, 9, 10]
    assert all(i.width > 100 and i.height > 100 for i in images)


def test_report_to_names_unknown_and_missing_trackers(tiny_model, tmp_path, monkeypatch, capsys):
    assert cli.main(train_args(tiny_model, tmp_path / "a", "--report-to", "tensorbord")) == 2
    assert "report_to: unknown tracker(s) ['tensorbord']" in capsys.readouterr().err
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    assert cli.main(train_args(tiny_model, tmp_path / "b", "--report-to", "wandb")) == 2
    assert "wandb not installed; `pip install wandb`" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before anything was written


# ------------------------------------------------------- issue 11: early, typed, strict
def _rte_folder(root: Path, train_rows: int, header_only: bool = False) -> Path:
    """A GLUE-layout RTE folder: ``train_rows`` examples in train.tsv, 4 in dev.tsv."""
    folder = root / "RTE"
    folder.mkdir(parents=True)
    header = "index\tsentence1\tsentence2\tlabel\n"
    labels = ("entailment", "not_entailment")
    rows = [
        f"{i}\tthe dog is playing\tthe {WORDS[i % 20]} is fun\t{labels[i % 2]}\n"
        for i in range(train_rows)
    ]
    (folder / "train.tsv").write_text(header + ("" if header_only else "".join(rows)))
    (folder / "dev.tsv").write_text(header + "".join(rows[:4] or [f"0\ta\tb\t{labels[0]}\n"]))
    return root


def test_own_dataset_uses_all_its_data_not_the_default_job_size(tiny_model, tmp_path, capsys):
    data = _rte_folder(tmp_path / "glue", 1500)  # fewer than the default job's 2,000
    out = tmp_path / "rte"
    args = ["train", "--model", str(tiny_model), "--task", "rte", "--data-dir", str(data)]
    assert (
        cli.main([*args, "--max-steps", "10", "--batch-size", "4", "--output-dir", str(out)]) == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["sizes"]["train"] == 1500
    config = metrics["config"]
    assert config["data"]["train_size"] is None and config["data"]["max_length"] == 128
    assert config["train"]["eval_every"] is None
    # --train-size still picks a subset; the default job (task mr, built-in data) keeps its own.
    capsys.readouterr()
    assert cli.main([*args, "--train-size", "300", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["train_size"] == 300
    for default_job in ([], ["--task", "mr"], ["--method", "lora"]):
        assert cli.main(["train", *default_job, "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["data"]["train_size"] == 2000 and printed["data"]["max_length"] == 64
    assert cli.main(["train", "--task", "mr", "--data-dir", str(tmp_path), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["train_size"] is None


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a run starts (the model, data or accelerator would load)."""

    def trainer(*args, **kwargs):
        raise AssertionError("the run started: the error should have come first")

    monkeypatch.setattr(loop, "Trainer", trainer)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "top_h=four",
            "method.top_h (IncreLoRAConfig.top_h): expected an integer or none, got 'four'",
        ),
        ("top_h=1.5", "method.top_h (IncreLoRAConfig.top_h): expected an integer or none, got 1.5"),
        ("alpha=abc", "method.alpha (IncreLoRAConfig.alpha): expected a number, got 'abc'"),
        ("importance=exact", "method.importance (IncreLoRAConfig.importance): expected one of"),
        ("top_h=0", "top_h: must be a positive integer"),
    ],
)
def test_method_args_are_checked_before_anything_loads(
    nothing_loads, tmp_path, capsys, value, expected
) -> None:
    import time

    start = time.perf_counter()
    code = cli.main(["train", "--method-arg", value, "--output-dir", str(tmp_path / "run")])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and expected in err
    assert err.startswith("increlora: error:") and err.count("\n") == 1, err
    assert elapsed < 5
    assert not (tmp_path / "run").exists()


def test_method_fields_are_coerced_to_their_types(nothing_loads, tmp_path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("method: {name: increlora, top_h: 4.0, alpha: '32', init_warmup: '5'}\n")
    assert cli.main(["train", "--config", str(config), "--print-config"]) == 0
    printed = capsys.readouterr().out
    method = yaml.safe_load(printed)["method"]
    assert method == {
        "name": "increlora",
        "target_rank": 2.0,
        "top_h": 4,
        "alpha": 32.0,
        "init_warmup": 5,
    }
    assert type(method["top_h"]) is int and type(method["alpha"]) is float
    # What the run fills in is shown as comments (the output stays a loadable config).
    assert "# Filled in when the run starts" in printed and "train.learning_rate: 0.005" in printed
    config.write_text("method: {name: lora, r: two}\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "method.r (LoRAConfig.r): expected an integer, got 'two'" in capsys.readouterr().err


def test_unwritable_output_dir_fails_before_loading(
    tiny_model, nothing_loads, tmp_path, capsys, monkeypatch
) -> None:
    args = ["train", "--model", str(tiny_model), "--task", "sst2", "--data-dir", str(GLUE)]
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    assert cli.main([*args, "--output-dir", str(afile / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("increlora: error: --output-dir") and "is a file" in err
    assert err.count("\n") == 1
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root ignores permission bits: refuse as the OS would
        import tempfile

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
        monkeypatch.setattr(Path, "mkdir", lambda *a, **k: refuse())
    try:
        assert cli.main([*args, "--output-dir", str(locked / "runs" / "run")]) == 2
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert "cannot write there (Permission denied)" in err and err.count("\n") == 1
    assert not (locked / "runs").exists()


def test_header_only_train_tsv_names_the_file(tiny_model, tmp_path, capsys) -> None:
    data = _rte_folder(tmp_path / "glue", 0, header_only=True)
    args = ["train", "--model", str(tiny_model), "--task", "rte", "--data-dir", str(data)]
    assert cli.main([*args, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'RTE' / 'train.tsv'}: no examples" in err and err.count("\n") == 1


def _strict_records(out: Path) -> list[dict]:
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def test_train_log_is_strict_json_when_the_loss_is_nan(tiny_model, tmp_path, monkeypatch):
    real = loop.compute_loss
    calls = {"n": 0}

    def nan_at_step_2(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(loop, "compute_loss", nan_at_step_2)
    out = tmp_path / "nan"
    assert cli.main(train_args(tiny_model, out)) == 3
    diverged = _strict_records(out)[-1]
    assert diverged["event"] == "diverged"
    assert diverged["loss"] is None and diverged["loss_nonfinite"] == "nan"


def test_stale_checkpoint_writes_are_cleaned_and_a_swapped_out_one_restored(
    tiny_model, reference, tmp_path
) -> None:
    out = tmp_path / "killed"
    assert cli.main(train_args(tiny_model, out, "--stop-at-step", "5")) == 0
    # What SIGKILLs mid-save leave: a half-built checkpoint, and one killed between the two
    # swaps (the complete checkpoint of step 5 parked in .old-*/content, none in place).
    (out / ".checkpoint.tmp-abcd1234").mkdir()
    (out / ".checkpoint.tmp-abcd1234" / "trainable.safetensors").write_bytes(b"half")
    (out / ".increlora_adapter.tmp-zz99yy88").mkdir()
    (out / ".train_log.jsonl.k3j4h5g6").write_text("partial")
    parked = out / ".checkpoint.old-qwer1234"
    parked.mkdir()
    (out / "checkpoint").rename(parked / "content")
    assert cli.main(["train", "--resume", "--output-dir", str(out)]) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert [r["step"] for r in log_records(out) if r["event"] == "resume"] == [5]
    assert_same_run(reference, out)


def test_a_second_sigterm_still_ends_with_the_resume_line(
    tiny_model, tmp_path, monkeypatch, capsys
) -> None:
    class Killed(Exception):
        pass

    def default_kill(signum, frame):  # what SIG_DFL would do, without ending pytest
        raise Killed

    previous = signal.signal(signal.SIGTERM, default_kill)
    try:
        calls = {"loss": 0, "save": 0}
        real_loss, real_save = loop.compute_loss, loop.save_training_state

        def first_sigterm_at_step_5(model, batch):
            calls["loss"] += 1
            if calls["loss"] == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_loss(model, batch)

        def second_sigterm_while_saving(*args, **kwargs):
            calls["save"] += 1
            if calls["loss"] >= 5 and calls["save"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_save(*args, **kwargs)

        monkeypatch.setattr(loop, "compute_loss", first_sigterm_at_step_5)
        monkeypatch.setattr(loop, "save_training_state", second_sigterm_while_saving)
        out = tmp_path / "twice"
        assert cli.main(train_args(tiny_model, out)) == 143
        err = capsys.readouterr().err
        assert f"continue with `increlora train --resume --output-dir {out}`" in err
        assert "SIGTERM: stopped at step 5/10" in err

        # A SIGTERM while the run is loading (outside the loop's own handlers).
        real_load = loop.load_model

        def sigterm_while_loading(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_load(*args, **kwargs)

        monkeypatch.setattr(loop, "load_model", sigterm_while_loading)
        assert cli.main(["train", "--resume", "--output-dir", str(out)]) == 143
        err = capsys.readouterr().err
        assert f"continue with `increlora train --resume --output-dir {out}`" in err
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_download_messages_print_once(capsys) -> None:
    from increlora import assets

    assets._announce("fetching x (1 MB)")  # logging not configured: printed directly
    assert capsys.readouterr().err.count("fetching x") == 1
    cli._setup_logging()  # the CLI's handler prints increlora's INFO lines
    assets._announce("extracting y")
    assert capsys.readouterr().err.count("extracting y") == 1


def test_evaluate_says_what_is_wrong_with_the_adapter_path(tmp_path, capsys):
    assert cli.main(["evaluate", "--adapter", str(tmp_path / "missing")]) != 0
    assert "adapter not found" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text("{}")
    assert cli.main(["evaluate", "--adapter", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert "is a run directory; pass its adapter folder" in err
    assert str(tmp_path / "run" / "adapter") in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_without_a_gpu_is_refused_not_recorded(tiny_model, tmp_path, capsys) -> None:
    args = train_args(tiny_model, tmp_path / "fp16") + ["--mixed-precision", "fp16"]
    assert cli.main(args) != 0
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "fp16" / "metrics.json").exists()


def test_identical_runs_in_two_processes_write_byte_identical_adapters(
    tiny_model, reference, tmp_path
) -> None:
    """Issue 23: the same run, again in a fresh process with another hash seed, writes the
    same bytes in both adapter formats (file hashes, not tensors: headers and JSON included)."""
    import hashlib
    import os
    import subprocess
    import sys

    out = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "increlora.cli", *train_args(tiny_model, out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    def digests(run: Path) -> dict[str, str]:
        return {
            str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("adapter", "increlora_adapter")
            for p in sorted((run / folder).rglob("*"))
            if p.is_file()
        }

    first, second = digests(reference), digests(out)
    assert len(first) >= 4 and first == second
