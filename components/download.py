"""Download step: fetch the dataset files from an ordered list of mirrors, each verified by its pinned
checksums (SHA-256, and the MD5 too where the dataset's authors publish one, as for CIFAR-10).

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


def checksums(spec: FileSpec) -> dict[str, str]:
    """The pinned hashes of a file: ``sha256``, plus ``md5`` when the spec has one."""
    return {alg: h for alg in ("sha256", "md5") if (h := getattr(spec, alg, None))}


def hashes_of(path: Path, algorithms: tuple[str, ...] = ("sha256",), chunk: int = 1 << 20) -> dict[str, str]:
    """Hex digests of a file, every algorithm in one read."""
    hs = {alg: hashlib.new(alg) for alg in algorithms}
    with open(path, "rb") as f:
        while block := f.read(chunk):
            for h in hs.values():
                h.update(block)
    return {alg: h.hexdigest() for alg, h in hs.items()}


def sha256_of(path: Path) -> str:
    return hashes_of(path)["sha256"]


def mismatch(path: Path, spec: FileSpec) -> str | None:
    """None if ``path`` has every pinned hash of ``spec``, else what differs."""
    want = checksums(spec)
    got = hashes_of(path, tuple(want))
    bad = [f"expected {alg} {h}, got {got[alg]}" for alg, h in want.items() if got[alg] != h]
    return "; ".join(bad) or None


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
        if bad := mismatch(tmp, spec):
            raise ValueError(f"checksum mismatch for {src}: {bad}")


def _from_http(base: str, spec: FileSpec, target: Path, timeout: float) -> None:
    import pooch  # only needed when a remote mirror is actually used

    url = base.rstrip("/") + "/" + spec.name
    downloader = pooch.HTTPDownloader(progressbar=True, timeout=timeout)
    # pooch downloads to a temporary file in the same folder, checks the hash, then renames it;
    # on a mismatch it deletes the temporary file and raises ValueError. Other pinned hashes (MD5) are
    # checked by fetch_file afterwards.
    pooch.retrieve(
        url,
        known_hash=f"sha256:{spec.sha256}",
        fname=target.name,
        path=target.parent,
        downloader=downloader,
        progressbar=True,
    )


def fetch_file(spec: FileSpec, mirrors: list[str], dest: Path, timeout: float = 60.0, hint: str = OFFLINE_HINT) -> Path:
    """Return ``dest/spec.name`` holding the file with the pinned hashes, fetching it if needed.

    ``hint`` ends the error raised when no mirror delivers: how to get the file some other way."""
    target = dest / spec.name
    if target.is_file():
        if mismatch(target, spec) is None:
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
                if bad := mismatch(target, spec):
                    raise ValueError(f"checksum mismatch: {bad}")
        except Exception as err:  # noqa: BLE001 - every failure moves on to the next mirror
            reason = f"{type(err).__name__}: {err}"
            failures.append(f"{mirror}: {reason}")
            log.warning("%s: mirror %s failed (%s); trying the next one", spec.name, mirror, reason)
            if target.exists():  # whatever is there failed its checksum
                target.unlink()
            continue
        log.info("%s: fetched from %s, checksum verified", spec.name, mirror)
        return target
    tried = "\n  - ".join(failures)
    pinned = ", ".join(f"{alg} {h}" for alg, h in checksums(spec).items())
    raise DownloadError(f"could not get {spec.name} ({pinned}) from any mirror. Tried, in order:\n  - {tried}\n" + hint)


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
