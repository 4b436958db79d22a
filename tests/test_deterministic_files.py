"""Identical tensors give byte-identical safetensors files in every process (issue 23, item 5):
the library orders the header from a hash map, which differed between processes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from increlora.io import safetensors_metadata

WRITE = """
import sys, torch
from increlora.io import save_tensors, save_tensors_with_checksum
g = torch.Generator().manual_seed(0)
tensors = {f"layer.{i}.lora_{k}": torch.randn(3, 5, generator=g) for i in range(4) for k in "AB"}
tensors["head.bias"] = torch.arange(3, dtype=torch.float16)
save_tensors_with_checksum(sys.argv[1] + "/peft.safetensors", tensors)
save_tensors(sys.argv[1] + "/own.safetensors", tensors)
"""


def _write(directory: Path, hash_seed: str) -> dict[str, str]:
    directory.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, "-c", WRITE, str(directory)], check=True, env=env, timeout=300)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_processes_write_identical_bytes(tmp_path: Path) -> None:
    # Four processes: with the old writer two metadata keys came out in either order, so four
    # files agreed by chance once in eight.
    hashes = [_write(tmp_path / name, str(i)) for i, name in enumerate("abcd")]
    assert all(h == hashes[0] for h in hashes) and len(hashes[0]) == 2
    loaded = load_file(tmp_path / "a" / "peft.safetensors")
    assert set(loaded) == {f"layer.{i}.lora_{k}" for i in range(4) for k in "AB"} | {"head.bias"}
    assert loaded["head.bias"].dtype == torch.float16
    metadata = safetensors_metadata(tmp_path / "a" / "peft.safetensors")
    assert list(metadata) == sorted(metadata) and metadata["format"] == "pt"
