"""Download step against real HTTP mirrors served on 127.0.0.1 by the test."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from components.config import FileSpec
from components.download import DownloadError, fetch_all, fetch_file

from .conftest import http_server

GOOD = b"the real bytes of a dataset file\n" * 1000


@pytest.fixture()
def mirror_server(tmp_path):
    """Serves tmp_path/www over HTTP; records the paths requested."""
    root = tmp_path / "www"
    (root / "bad").mkdir(parents=True)
    (root / "good").mkdir(parents=True)
    (root / "good" / "f.gz").write_bytes(GOOD)
    (root / "bad" / "f.gz").write_bytes(GOOD[:-10] + b"corrupted!")  # same size, wrong bytes
    with http_server(root) as (base, requests):
        yield base, requests, root


SPEC = FileSpec(name="f.gz", sha256=hashlib.sha256(GOOD).hexdigest())


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_corrupt_mirror_is_skipped_for_a_good_one(mirror_server, tmp_path):
    base, requests, _ = mirror_server
    dest = tmp_path / "raw"
    path = fetch_file(SPEC, [f"{base}/bad", f"{base}/good"], dest, timeout=5)
    assert path.read_bytes() == GOOD
    assert requests == ["/bad/f.gz", "/good/f.gz"]
    assert leftovers(dest) == ["f.gz"]  # no temporary or corrupt file left behind


def test_second_run_uses_the_cache(mirror_server, tmp_path):
    base, requests, _ = mirror_server
    dest = tmp_path / "raw"
    fetch_file(SPEC, [f"{base}/good"], dest, timeout=5)
    fetch_file(SPEC, [f"{base}/good"], dest, timeout=5)
    assert requests == ["/good/f.gz"]


def test_corrupt_cached_file_is_replaced(mirror_server, tmp_path):
    base, requests, _ = mirror_server
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / "f.gz").write_bytes(b"half a fi")
    assert fetch_file(SPEC, [f"{base}/good"], dest, timeout=5).read_bytes() == GOOD
    assert requests == ["/good/f.gz"]


def test_no_good_mirror_names_every_mirror_and_leaves_nothing(mirror_server, tmp_path):
    base, _, root = mirror_server
    dest = tmp_path / "raw"
    local_bad = root / "bad"
    mirrors = [str(tmp_path / "no-such-dir"), str(local_bad), f"{base}/bad", "http://127.0.0.1:9/unreachable"]
    with pytest.raises(DownloadError) as info:
        fetch_file(SPEC, mirrors, dest, timeout=5)
    msg = str(info.value)
    for m in mirrors:
        assert m in msg
    assert "checksum mismatch" in msg.lower() or "sha256" in msg.lower()
    assert "apt-get install dataset-fashion-mnist" in msg
    assert leftovers(dest) == []


def test_local_directory_mirror(tmp_path):
    src = tmp_path / "debian"
    src.mkdir()
    (src / "f.gz").write_bytes(GOOD)
    out = fetch_all({"x": SPEC}, [f"file://{src}"], tmp_path / "raw")
    assert out["x"].read_bytes() == GOOD


def test_real_offline_mirror_matches_pinned_hashes(debian_dir, params, tmp_path):
    from components import download

    paths = download.run(params, out_dir=tmp_path / "raw")
    assert sorted(Path(p).name for p in paths.values()) == sorted(
        getattr(params.data.files, k).name for k in params.data.files.model_fields
    )
