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


def save_tensors_with_checksum(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any] | None = None,
    config_file: str | None = None,
) -> str:
    """:func:`save_tensors` that stores the data's sha256 in the file's own header metadata.

    With ``config`` (what ``config_file``, a sibling JSON file, will hold), the header also
    carries the manifest of :func:`peft_manifest_fields`: one sha256 over the data, the
    tensor index and the fields of ``config`` that change what the weights mean, which
    :func:`verify_embedded_checksum` checks. The tensor data does not depend on the header, so
    it is hashed from an in-memory serialization first. Returns the data's hex digest.
    """
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    blob = safetensors_save(cpu)
    size = int.from_bytes(blob[:8], "little")
    digest = hashlib.sha256(memoryview(blob)[8 + size :]).hexdigest()
    metadata = {"format": "pt", DATA_SHA256_KEY: digest}
    if config is not None:
        if config_file is None or Path(config_file).name != config_file:
            raise ValueError("config_file: the name of a file beside the weights is needed")
        index = json.loads(blob[8 : 8 + size])
        index.pop("__metadata__", None)
        fields = peft_manifest_fields(json.loads(json.dumps(config)), index, digest)
        manifest = make_manifest(fields)
        metadata[MANIFEST_SHA256_KEY] = manifest["sha256"]
        metadata[MANIFEST_KEY] = _canonical_json({"covers": config_file, **manifest})
    atomic_write_bytes(path, canonical_safetensors(safetensors_save(cpu, metadata=metadata)))
    return digest


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
    """Check a PEFT weight file as increlora exported it, before anything loads it.

    In order: the data sha256 in its header (a mismatch: the bytes changed); the manifest in
    its header, which covers the data, the tensor index and the meaning-changing fields of the
    config file beside it (a mismatch names the field(s): ``lora_alpha`` edited in
    ``adapter_config.json``); every tensor finite (always, also for files PEFT wrote itself).
    Returns False, with a debug note, when the file carries no increlora checksum (written by
    PEFT itself); an export from before the manifest loads with a one-line warning. Raises
    AdapterFileError naming the file.
    """
    path = Path(path)
    metadata = safetensors_metadata(path)
    expected = metadata.get(DATA_SHA256_KEY)
    if expected is None:
        logger.debug("%s carries no data checksum: not verified", path)
        check_finite(load_tensors(path), path)
        return False
    if not isinstance(expected, str) or safetensors_data_sha256(path) != expected.lower():
        raise AdapterFileError(
            f"{path}: tensor data sha256 differs from its header: {_CORRUPT_HINT}"
        )
    if MANIFEST_SHA256_KEY not in metadata:
        logger.warning(
            "%s has no manifest (exported by an increlora from before manifests): its"
            " adapter_config.json is not verified; export the adapter again to add one",
            path,
        )
    else:
        _verify_peft_manifest(path, metadata, expected.lower())
    check_finite(load_tensors(path), path)
    return True


# ------------------------------------------------------------------------- manifests
# One sha256 over everything that gives an adapter's weights their meaning (the weights
# themselves through their sha256, and alpha, ranks, target modules, recorded shapes, ...),
# with a short fingerprint per field so that a mismatch can name the field that changed. Not
# a signature (anyone can recompute it): it catches edits and mix-ups, not forgery.
MANIFEST_KEY = "increlora.manifest"
MANIFEST_SHA256_KEY = "increlora.manifest_sha256"
_FINGERPRINT_HEX = 16

# adapter_config.json fields that do not change what the weights compute: where the base
# model is, PEFT bookkeeping, and training-only settings. Every other field is covered, also
# fields the export did not write (adding "use_dora": true changes the meaning).
PEFT_UNCOVERED_FIELDS = frozenset(
    {
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "peft_version",
        "auto_mapping",
        "init_lora_weights",
        "lora_dropout",
    }
)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _field_name(path: tuple[str, ...]) -> str:
    """``config.alpha``; keys holding dots in brackets: ``modules[bert.x.query].shape``."""
    name = ""
    for key in path:
        if "." in key or "[" in key or not key:
            name += f"[{key}]"
        else:
            name += f".{key}" if name else key
    return name


def _leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, (*path, str(key)))
    else:
        yield _field_name(path), value


def manifest_fingerprints(fields: dict[str, Any]) -> dict[str, str]:
    """A short sha256 of every leaf of ``fields`` (dicts are walked, lists are leaves)."""
    return {
        name: _sha256_text(_canonical_json(value))[:_FINGERPRINT_HEX]
        for name, value in _leaves(fields)
    }


def make_manifest(fields: dict[str, Any]) -> dict[str, Any]:
    """``{"sha256": sha256 of the canonical JSON of fields, "fields": fingerprints}``."""
    return {
        "sha256": _sha256_text(_canonical_json(fields)),
        "fields": manifest_fingerprints(fields),
    }


def manifest_mismatch(fields: dict[str, Any], recorded: Any) -> list[str] | None:
    """None when ``fields`` hash to the ``recorded`` manifest; otherwise the names of the
    fields whose fingerprint changed ([] when only the manifest itself was edited). Raises
    ValueError for a manifest that is not ``{"sha256": str, "fields": {str: str}}``."""
    if (
        not isinstance(recorded, dict)
        or not isinstance(recorded.get("sha256"), str)
        or not isinstance(recorded.get("fields"), dict)
    ):
        raise ValueError("malformed manifest (expected sha256 and fields)")
    if _sha256_text(_canonical_json(fields)) == recorded["sha256"].lower():
        return None
    now, then = manifest_fingerprints(fields), recorded["fields"]
    return sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))


def _shown(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def manifest_error(where: str | Path, changed: list[str], written: str, fix: str) -> str:
    """The one line for a manifest mismatch: the file, the changed fields, what to do."""
    what = f"field(s) {_shown(changed)} differ from" if changed else "its manifest differs from"
    return (
        f"{where}: {what} what was recorded when the adapter was {written} (its manifest"
        f" sha256): the file was edited or belongs to another adapter; {fix}"
    )


def add_manifest(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` (an adapter's JSON record, the weight file's sha256 in it) with a ``manifest``
    entry covering every other entry: method, config (alpha, ranks, target modules, scaling),
    each module's recorded shape and ranks, modules_to_save and the weights' sha256."""
    fields = json.loads(json.dumps({k: v for k, v in meta.items() if k != "manifest"}))
    return {**meta, "manifest": make_manifest(fields)}


def verify_adapter_manifest(meta: dict[str, Any], record_file: str | Path) -> None:
    """Check an adapter JSON record against its ``manifest`` (see :func:`add_manifest`).

    A record without one (saved before manifests existed) loads with a one-line warning; a
    changed field raises AdapterFileError naming the file and the field(s).
    """
    fix = (
        "restore the file or save the adapter again from its run (to load a deliberate edit"
        " anyway, delete the 'manifest' entry: the adapter then loads unverified, with a warning)"
    )
    recorded = meta.get("manifest")
    if recorded is None:
        logger.warning(
            "%s has no manifest (saved by an increlora from before manifests): its config is"
            " not verified; save the adapter again to add one",
            record_file,
        )
        return
    try:
        changed = manifest_mismatch({k: v for k, v in meta.items() if k != "manifest"}, recorded)
    except ValueError as err:
        raise AdapterFileError(f"{record_file}: {err}; {fix}") from err
    if changed is not None:
        raise AdapterFileError(manifest_error(record_file, changed, "saved", fix))


def peft_manifest_fields(
    config: dict[str, Any], index: dict[str, Any], data_sha256: str
) -> dict[str, Any]:
    """What a PEFT export's manifest covers: the config's meaning-changing fields (absent
    ones count as null), the tensor index (names, dtypes, shapes, offsets) and the data."""
    covered = {k: v for k, v in config.items() if k not in PEFT_UNCOVERED_FIELDS and v is not None}
    return {"adapter_config": covered, "tensors": index, "data_sha256": data_sha256}


def _verify_peft_manifest(path: Path, metadata: dict[str, str], data_sha256: str) -> None:
    fix = "restore the file or export the adapter again (increlora export --format peft)"
    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
        covers = manifest["covers"]
        manifest["sha256"] = metadata[MANIFEST_SHA256_KEY]
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise AdapterFileError(f"{path}: malformed {MANIFEST_KEY} header entry; {fix}") from err
    if not isinstance(covers, str) or Path(covers).name != covers:
        raise AdapterFileError(f"{path}: {MANIFEST_KEY} names a file outside {path.parent}")
    config_file = path.parent / covers
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_file}: not a JSON object; {fix}")
    with open(path, "rb") as handle:
        index = json.loads(handle.read(_safetensors_header_length(handle, path)))
    index.pop("__metadata__", None)
    try:
        changed = manifest_mismatch(peft_manifest_fields(config, index, data_sha256), manifest)
    except ValueError as err:
        raise AdapterFileError(f"{path}: {err}; {fix}") from err
    if changed is None:
        return
    in_config = [k.removeprefix("adapter_config.") for k in changed if k.startswith("adapter_")]
    if in_config:  # name the file the change is in
        raise AdapterFileError(manifest_error(config_file, in_config, "exported", fix))
    raise AdapterFileError(manifest_error(path, changed, "exported", fix))


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise AdapterFileError naming the first tensor (by name) holding a NaN or infinity."""
    for name in sorted(tensors):
        t = tensors[name]
        if not (t.is_floating_point() or t.is_complex()):
            continue
        bad = ~torch.isfinite(t)
        if bad.any():
            value = t[bad].flatten()[0].item()
            raise AdapterFileError(
                f"{path}: tensor {name} holds {int(bad.sum())} non-finite value(s) (first:"
                f" {value}); the adapter was saved from a run that diverged: use an earlier"
                " checkpoint or train again with a lower learning rate"
            )


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
