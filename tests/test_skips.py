"""CI's skip allowance (tests/conftest.py): more skips than recorded fail the run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def _pytest(*args: str) -> subprocess.CompletedProcess:
    # Two matrix checks that do not apply to full fine-tuning: two skips, nothing else run.
    selection = ["-k", "mlp-full and (only_adapter_parameters or disabled_gives)"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *selection, *args],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_more_skips_than_the_allowance_fail_the_run(tmp_path) -> None:
    allowance = tmp_path / "allowance.txt"
    allowance.write_text("# a comment\n1\n")
    over = _pytest("tests/test_matrix.py", "--max-skips", str(allowance))
    assert over.returncode == 1, over.stdout + over.stderr
    assert "2 tests skipped, more than the allowance of 1" in over.stdout
    assert "SKIPPED" in over.stdout  # -rs: every reason is printed
    within = _pytest("tests/test_matrix.py", "--max-skips", "2")
    assert within.returncode == 0, within.stdout + within.stderr


def test_the_recorded_allowance_is_a_number() -> None:
    lines = (TESTS / "skip_allowance.txt").read_text().splitlines()
    numbers = [line for line in lines if line.strip() and not line.startswith("#")]
    assert len(numbers) == 1 and numbers[0].strip().isdigit()
