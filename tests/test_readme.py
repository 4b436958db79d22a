"""The README's plain-PyTorch loop runs as written (on a tiny model instead of a download)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import tiny_bert

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_loop() -> str:
    text = README.read_text()
    section = text.split("## Use it in your own loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_loop_runs_grows_and_exports(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setattr(
        AutoModelForSequenceClassification, "from_pretrained", lambda *a, **k: tiny_bert()
    )
    monkeypatch.chdir(tmp_path)
    code = readme_loop()
    assert len(code.strip().splitlines()) < 20
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, 64, (4, 8), generator=g),
            "labels": torch.randint(0, 2, (4,), generator=g),
        }
        for _ in range(60)
    ]
    scope = {"loader": batches}
    exec(compile(code.replace("total_steps = 1000", "total_steps = 60"), "README", "exec"), scope)
    allocator = scope["allocator"]
    assert not allocator.growing and allocator.total_rank == 2 * len(scope["adapted"].layers)
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
