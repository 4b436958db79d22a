"""Published run summaries carry no private absolute paths (issue 23, item 8)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from increlora.runner.outputs import public_path

REPO = Path(__file__).resolve().parents[1]
ABSOLUTE = re.compile(r'"(/(?:root|home|Users|tmp|work|mnt|var)/[^"]*|[A-Za-z]:\\\\[^"]*)"')


def test_public_path_hides_private_folders(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("INCRELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert public_path(tmp_path / "cache" / "models" / "m") == "$INCRELORA_CACHE/models/m"
    assert public_path(tmp_path / "home" / "ckpt" / "m") == "~/ckpt/m"
    assert public_path("/opt/models/bert") == "<local>/bert"
    assert public_path("microsoft/deberta-v3-base") == "microsoft/deberta-v3-base"


@pytest.mark.skipif(not (REPO / "results").is_dir(), reason="no committed results/")
def test_committed_summaries_hold_no_absolute_paths() -> None:
    offenders = [
        f"{path.relative_to(REPO)}: {match.group(1)}"
        for path in sorted((REPO / "results").rglob("*.json"))
        for match in ABSOLUTE.finditer(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, offenders[:5]
