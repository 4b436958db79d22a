"""GLUE data from one setting: INCRELORA_GLUE_DIR, recorded by checksum, not by private path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from increlora.tasks import load_task
from increlora.tasks.glue import GLUE_DIR_ENV

GLUE = Path(__file__).parent / "fixtures" / "glue"


def test_env_folder_is_read_when_no_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GLUE_DIR_ENV, str(GLUE))
    from_env = load_task("rte", validation_size=2)
    given = load_task("rte", str(GLUE), validation_size=2)
    assert [ex.text_a for ex in from_env.train] == [ex.text_a for ex in given.train]
    source = from_env.split_info["source"]
    assert source["kind"] == "glue_tsv" and source["via"] == GLUE_DIR_ENV
    assert source["dir"] == "RTE"  # the folder's name: no absolute path is published
    expected = hashlib.sha256((GLUE / "RTE" / "dev.tsv").read_bytes()).hexdigest()
    assert source["sha256"]["validation"] == expected
    assert str(GLUE) not in repr(from_env.split_info)


def test_missing_env_folder_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(GLUE_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"{GLUE_DIR_ENV}=.*unset it to load GLUE"):
        load_task("cola")


def test_data_dir_wins_over_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(GLUE_DIR_ENV, str(tmp_path / "nowhere"))
    data = load_task("mrpc", str(GLUE))
    assert "via" not in data.split_info["source"]


def test_binary_and_huge_tsv_files(tmp_path) -> None:
    from increlora.tasks import get_task
    from increlora.tasks.glue import GlueFormatError, read_tsv

    task = get_task("rte")
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\t\xff\xfe\x00\tb\tentailment\n")
    with pytest.raises(GlueFormatError, match="binary.tsv: not UTF-8 text"):
        read_tsv(task, binary)
    long_text = "word " * 40_000  # 200,000 characters: over csv's default field limit
    huge = tmp_path / "huge.tsv"
    huge.write_text(f"index\tsentence1\tsentence2\tlabel\n0\t{long_text}\tb\tentailment\n")
    (example,) = read_tsv(task, huge)
    assert example.text_a == long_text and example.label == 0
