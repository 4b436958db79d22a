"""``import increlora`` registers IncreLoRA with PEFT whenever peft is imported, even after
something only asked whether peft is installed (``importlib.util.find_spec``), which used up
the import hook and left PEFT without the method for the rest of the process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

CHECK = """
import importlib.util
import increlora
assert importlib.util.find_spec("peft") is not None
import peft
from peft.utils.peft_types import PeftType
print(PeftType["INCRELORA"].value)
"""


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the peft extra")
def test_find_spec_before_import_keeps_the_registration() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "INCRELORA"
