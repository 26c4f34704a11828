"""Download step: fetch the dataset files from an ordered list of mirrors, each verified by SHA-256.

* A mirror is a local directory (the Debian package ``dataset-fashion-mnist`` installs one at
  ``/usr/share/datasets/fashion-mnist``) or an http(s) base URL; they are tried in order.
* A file already in the destination with the pinned hash is kept (cache): nothing is fetched.
* A file that fails its checksum is discarded and the next mirror is tried. Writes are atomic
  (temporary file + rename; pooch does the same for HTTP), so no half-written file is ever left.
* With no mirror able to serve a file, the error lists every mirror tried and why it failed.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

from .config import FileSpec, Params
from .io import atomic_path

log = logging.getLogger("components.download")

OFFLINE_HINT = (
    "To use the offline mirror, install the Debian package as root: "
    "`apt-get install dataset-fashion-mnist` (it puts the files in /usr/share/datasets/fashion-mnist); "
    "or copy the four .gz files into a directory and list it first under data.mirrors in params.yaml."
)


class DownloadError(RuntimeError):
    """No mirror could deliver a file with the pinned checksum."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _local_dir(mirror: str) -> Path | None:
    if mirror.startswith("file://"):
        return Path(urlparse(mirror).path)
    if "://" not in mirror:
        return Path(mirror)
    return None


def _from_local(src_dir: Path, spec: FileSpec, target: Path) -> None:
    src = src_dir / spec.name
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    with atomic_path(target) as tmp:
        shutil.copyfile(src, tmp)
        got = sha256_of(tmp)
        if got != spec.sha256:
            raise ValueError(f"checksum mismatch for {src}: expected sha256 {spec.sha256}, got {got}")


def _from_http(base: str, spec: FileSpec, target: Path, timeout: float) -> None:
    import pooch  # only needed when a remote mirror is actually used

    url = base.rstrip("/") + "/" + spec.name
    downloader = pooch.HTTPDownloader(progressbar=True, timeout=timeout)
    # pooch downloads to a temporary file in the same folder, checks the hash, then renames it;
    # on a mismatch it deletes the temporary file and raises ValueError.
    pooch.retrieve(
        url,
        known_hash=f"sha256:{spec.sha256}",
        fname=target.name,
        path=target.parent,
        downloader=downloader,
        progressbar=True,
    )


def fetch_file(spec: FileSpec, mirrors: list[str], dest: Path, timeout: float = 60.0) -> Path:
    """Return ``dest/spec.name`` holding the file with the pinned hash, fetching it if needed."""
    target = dest / spec.name
    if target.is_file():
        if sha256_of(target) == spec.sha256:
            log.info("%s: cached, checksum verified", spec.name)
            return target
        log.warning("%s: cached copy fails its checksum; discarding it", spec.name)
        target.unlink()
    failures: list[str] = []
    for mirror in mirrors:
        local = _local_dir(mirror)
        try:
            if local is not None:
                _from_local(local, spec, target)
            else:
                _from_http(mirror, spec, target, timeout)
        except Exception as err:  # noqa: BLE001 - every failure moves on to the next mirror
            reason = f"{type(err).__name__}: {err}"
            failures.append(f"{mirror}: {reason}")
            log.warning("%s: mirror %s failed (%s); trying the next one", spec.name, mirror, reason)
            if target.exists() and sha256_of(target) != spec.sha256:
                target.unlink()
            continue
        log.info("%s: fetched from %s, checksum verified", spec.name, mirror)
        return target
    tried = "\n  - ".join(failures)
    raise DownloadError(
        f"could not get {spec.name} (sha256 {spec.sha256}) from any mirror. Tried, in order:\n  - {tried}\n"
        + OFFLINE_HINT
    )


def fetch_all(files: Mapping[str, FileSpec], mirrors: list[str], dest: Path, timeout: float = 60.0) -> dict[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return {key: fetch_file(spec, mirrors, dest, timeout) for key, spec in files.items()}


def run(params: Params, out_dir: Path, track: bool = True) -> dict[str, str]:
    files = {k: getattr(params.data.files, k) for k in params.data.files.model_fields}
    if not track:
        return {k: str(p) for k, p in fetch_all(files, params.data.mirrors, out_dir, params.data.download_timeout_s).items()}
    from . import tracking

    with tracking.step_run("download", params, [], spec={"data": {"dataset": params.data.dataset, "mirrors": params.data.mirrors}}) as tracker:
        paths = fetch_all(files, params.data.mirrors, out_dir, params.data.download_timeout_s)
        if tracker is not None:
            tracker.set_tags({f"sha256.{s.name}": s.sha256 for s in files.values()})
    return {k: str(p) for k, p in paths.items()}
