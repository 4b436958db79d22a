"""Atomic file output and pickle-free state files (JSON structure + safetensors tensors).

Nothing here ever leaves a half-written file at its final path: files are written to a
temporary sibling and ``os.replace``d; directories are built beside the target and swapped in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

# mkstemp/mkdtemp create owner-only entries; outputs are ordinary shareable files and folders.
_FILE_MODE = 0o644
_DIR_MODE = 0o755

logger = logging.getLogger(__name__)


class AdapterFileError(ValueError):
    """A saved file is missing, corrupt, or was not written by this library."""


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file, written atomically (tensors made contiguous, on CPU), with its
    header in a fixed order: identical tensors give identical bytes in every process."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, canonical_safetensors(safetensors_save(cpu)))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err})") from err


# ---------------------------------------------------------------- checksums of weight files
# safetensors header metadata key holding the sha256 of the file's tensor data (everything
# after the header): lets a file carry its own checksum (used for PEFT exports, whose
# adapter_config.json belongs to PEFT).
DATA_SHA256_KEY = "increlora.data_sha256"
_HASH_CHUNK = 1 << 20


def _sha256_rest(handle: Any, on_chunk: Callable[[int], Any] | None = None) -> str:
    """Hex sha256 of what is left to read in ``handle``, in chunks (``on_chunk(bytes)``)."""
    digest = hashlib.sha256()
    while chunk := handle.read(_HASH_CHUNK):
        digest.update(chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return digest.hexdigest()


def file_sha256(path: str | Path, on_chunk: Callable[[int], Any] | None = None) -> str:
    """Hex sha256 of a whole file; ``on_chunk(bytes)`` after each chunk (a progress bar)."""
    with open(path, "rb") as handle:
        return _sha256_rest(handle, on_chunk)


def _safetensors_header_length(handle: Any, path: Path) -> int:
    raw = handle.read(8)
    size = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if size < 0 or size > path.stat().st_size - 8:
        raise AdapterFileError(f"{path}: not a readable safetensors file (bad header length)")
    return size


def safetensors_data_sha256(path: str | Path) -> str:
    """Hex sha256 of a safetensors file's tensor data (the bytes after its header)."""
    path = Path(path)
    with open(path, "rb") as handle:
        handle.seek(8 + _safetensors_header_length(handle, path))
        return _sha256_rest(handle)


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors header ({} when there is none)."""
    path = Path(path)
    with open(path, "rb") as handle:
        header = handle.read(_safetensors_header_length(handle, path))
    try:
        metadata = json.loads(header).get("__metadata__") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err})") from err
    return metadata if isinstance(metadata, dict) else {}


def save_tensors_with_checksum(path: str | Path, tensors: dict[str, torch.Tensor]) -> str:
    """:func:`save_tensors` that stores the data's sha256 in the file's own header metadata.

    The tensor data does not depend on the header, so it is hashed from an in-memory
    serialization first. Returns the hex digest.
    """
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    blob = safetensors_save(cpu)
    digest = hashlib.sha256(memoryview(blob)[8 + int.from_bytes(blob[:8], "little") :])
    metadata = {"format": "pt", DATA_SHA256_KEY: digest.hexdigest()}
    atomic_write_bytes(path, canonical_safetensors(safetensors_save(cpu, metadata=metadata)))
    return digest.hexdigest()


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its header in one fixed order (metadata keys sorted,
    tensors by offset), so identical tensors give identical bytes. The library writes the
    header from a hash map, whose order changes from one process to the next."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    ordered: dict[str, Any] = {}
    metadata = header.pop("__metadata__", None)
    if metadata:
        ordered["__metadata__"] = dict(sorted(metadata.items()))
    for name in sorted(header, key=lambda k: (header[k]["data_offsets"][0], k)):
        ordered[name] = header[name]
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data on 8 bytes
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_CORRUPT_HINT = (
    "the file is corrupted or was modified after it was saved; save or export the adapter"
    " again from its run (or restore an intact copy)"
)


def verify_file_checksums(directory: str | Path, recorded: Any, record_file: str | Path) -> None:
    """Check the weight files of ``directory`` against ``{file name: sha256}`` from a JSON file.

    ``recorded`` is None for files saved before checksums were recorded (accepted, with a
    debug note). A mismatch raises AdapterFileError naming the file.
    """
    directory, record_file = Path(directory), Path(record_file)
    if recorded is None:
        logger.debug(
            "%s records no checksums (saved by an older increlora): not verified", record_file
        )
        return
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        raise AdapterFileError(f"{record_file}: malformed 'sha256' entry (expected file -> hex)")
    for name, expected in recorded.items():
        path = directory / name
        if Path(name).name != name:
            raise AdapterFileError(f"{record_file}: 'sha256' names a file outside {directory}")
        if not path.is_file():
            raise AdapterFileError(f"{path}: file not found (listed in {record_file})")
        if file_sha256(path) != expected.lower():
            raise AdapterFileError(
                f"{path}: sha256 differs from the one recorded in {record_file.name}: {_CORRUPT_HINT}"
                f" (to load a deliberately edited file anyway, delete the 'sha256' entry of"
                f" {record_file.name})"
            )


def verify_embedded_checksum(path: str | Path) -> bool:
    """Check a safetensors file against the data sha256 in its header (see above).

    Returns False, with a debug note, when the file carries none (written by PEFT itself or
    an older increlora); raises AdapterFileError naming the file on a mismatch.
    """
    path = Path(path)
    expected = safetensors_metadata(path).get(DATA_SHA256_KEY)
    if expected is None:
        logger.debug("%s carries no data checksum: not verified", path)
        return False
    if safetensors_data_sha256(path) != expected.lower():
        raise AdapterFileError(
            f"{path}: tensor data sha256 differs from its header: {_CORRUPT_HINT}"
        )
    return True


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path}: not valid JSON ({err})") from err


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, _DIR_MODE)
    try:
        yield tmp
        # Libraries (transformers' save_pretrained) write weights owner-only: open them up.
        for entry in tmp.rglob("*"):
            os.chmod(entry, _DIR_MODE if entry.is_dir() else _FILE_MODE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "content")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- nested state files
def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if torch.is_tensor(obj):
        key = prefix or "value"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} without pickle")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(directory: str | Path, name: str, state: Any) -> None:
    """Write ``state`` (nested dicts/lists of tensors and scalars) as name.json + .safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, tensors, "")
    save_tensors(Path(directory) / f"{name}.safetensors", tensors)
    atomic_write_json(Path(directory) / f"{name}.json", structure)


def load_state(directory: str | Path, name: str) -> Any:
    directory = Path(directory)
    structure = read_json(directory / f"{name}.json")
    tensors = load_tensors(directory / f"{name}.safetensors")
    try:
        return _unflatten(structure, tensors)
    except KeyError as err:
        raise AdapterFileError(f"{directory / name}.json refers to missing tensor {err}") from err
