"""CIFAR-10 (exercise 8 of the chapter): its own pipeline (``cifar10/dvc.yaml``, ``cifar10/params.yaml``).

* **download**: the authors' ``cifar-10-python.tar.gz`` through the same mirror machinery as Fashion-MNIST
  (``download.fetch_file``: cached, atomic, SHA-256 *and* the authors' MD5 checked, next mirror on a bad file).
* **split**: the python pickle batches are read straight out of the tarball, never extracted; an archive
  with a member that could escape a directory (``../``, an absolute path, a link pointing outside) is
  refused. Pickles are loaded with an unpickler that only builds dicts, lists, bytes and numpy arrays.
  Every batch is checked (keys, uint8 (N, 3072), labels 0..9, counts). Images are stored as 32×32×3
  (channels last, as ``keras.datasets.cifar10`` gives them); valid = the first ``valid_size`` training
  images, train = the rest, test = ``test_batch``; same Parquet schema as Fashion-MNIST (``full_*``).
* **summary**: one table (Markdown + JSON) of the exercise's variants: validation and test accuracy,
  epochs run, epoch of the best validation loss, seconds per epoch, MC dropout.

Standardize, experiment and MC dropout are the chapter's own steps, reused unchanged.
"""
from __future__ import annotations

import io
import logging
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .config import CIFAR10_CLASSES, Cifar10Params
from .dataset import Split
from .download import fetch_file
from .io import read_json, write_json, write_text
from .split import train_valid_test, write_splits

log = logging.getLogger("components.cifar10")

BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
SIDE, CHANNELS = 32, 3
PIXELS = SIDE * SIDE * CHANNELS
# The largest batch the reader accepts (each real one is ~31 MB): a member past it (a gzip bomb: gigabytes of
# zeros compress to a few MB) is refused before it is read into memory.
MAX_MEMBER_BYTES = 64 * 2**20

NETWORK_HINT = (
    "CIFAR-10 needs a network: no offline package ships it. Connect to one of the mirrors above, or put a copy "
    "of cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) in a local directory listed under "
    "data.mirrors in cifar10/params.yaml (cifar10/downloads/ is the first one)."
)


class ArchiveError(ValueError):
    """The tarball is not the CIFAR-10 python archive we expect (unsafe member, missing batch, bad content)."""


# ------------------------------------------------------------------------------------------ download

def run_download(params: Cifar10Params, out_dir: Path) -> Path:
    from . import tracking

    d = params.data
    with tracking.step_run("download", params, [], spec={"data": {"dataset": d.dataset, "mirrors": d.mirrors}}) as tracker:
        path = fetch_file(d.archive, d.mirrors, Path(out_dir), d.download_timeout_s, hint=NETWORK_HINT)
        if tracker is not None:
            tracker.set_tags({f"sha256.{d.archive.name}": d.archive.sha256, f"md5.{d.archive.name}": d.archive.md5})
    return path


# ------------------------------------------------------------------------------------------ reading the archive

def unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why extracting ``member`` could write outside the target directory (None: it could not)."""
    path = PurePosixPath(member.name)
    if path.is_absolute():
        return "absolute path"
    if ".." in path.parts:
        return "path escapes the archive's directory"
    if member.issym() or member.islnk():
        # a symlink's target is relative to its own folder, a hard link's to the archive root
        target = PurePosixPath(member.linkname)
        resolved = (path.parent / target) if member.issym() else target
        if target.is_absolute() or _climbs_out(resolved):
            return f"link pointing outside the archive ({member.linkname!r})"
    elif not (member.isfile() or member.isdir()):
        return "device, FIFO or other special file"
    return None


def _climbs_out(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else (0 if part in (".", "") else 1)
        if depth < 0:
            return True
    return False


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR batch holds (dicts, lists, bytes, numpy arrays): no other code can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],  # Python 2 pickles (the archive)
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],  # NumPy 2 pickles
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise ArchiveError(f"refusing to unpickle {module}.{name}: not part of a CIFAR-10 batch") from None


def _unpickle(blob: bytes, member: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except ArchiveError:
        raise
    except Exception as err:  # noqa: BLE001 - any corruption becomes one clear error
        raise ArchiveError(f"{member}: not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise ArchiveError(f"{member}: expected a dict, found {type(obj).__name__}")
    return obj


def parse_batch(obj: dict, member: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch dict → images (n, 32, 32, 3) uint8 and labels (n,) uint8, every property checked."""
    for key in (b"data", b"labels"):
        if key not in obj:
            raise ArchiveError(f"{member}: no {key!r} entry (keys: {sorted(obj)})")
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ArchiveError(f"{member}: b'data' must be uint8 of shape (N, {PIXELS}); found {got}")
    labels = np.asarray(obj[b"labels"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ArchiveError(f"{member}: b'labels' must be a list of integers; found {labels.dtype} {labels.shape}")
    if len(labels) != len(data):
        raise ArchiveError(f"{member}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ArchiveError(f"{member}: labels outside 0..9: {sorted(set(labels[(labels < 0) | (labels > 9)].tolist()))}")
    # each row is 1024 red, 1024 green, then 1024 blue values, each plane row-major: to (n, 32, 32, 3)
    images = data.reshape(len(data), CHANNELS, SIDE, SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.uint8)


@dataclass
class Cifar10Arrays:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]


def read_archive(path: Path, max_member_bytes: int = MAX_MEMBER_BYTES) -> Cifar10Arrays:
    """Read the five training batches, the test batch and the class names straight out of the tarball
    (a member larger than ``max_member_bytes`` is refused)."""
    try:
        tar = tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError) as err:
        raise ArchiveError(f"{path}: not a gzip'd tar archive ({err})") from None
    with tar:
        members = tar.getmembers()
        unsafe = [f"{m.name!r}: {why}" for m in members if (why := unsafe_reason(m))]
        if unsafe:
            raise ArchiveError(f"{path}: refusing an archive whose members could escape a directory: " + "; ".join(unsafe))
        by_name = {m.name: m for m in members}

        def load(name: str) -> dict:
            member = by_name.get(f"{BATCH_DIR}/{name}")
            if member is None or not member.isfile():
                raise ArchiveError(f"{path}: no regular file {BATCH_DIR}/{name} (is this cifar-10-python.tar.gz?)")
            # tarfile yields exactly the size in the member's header: checked first, nothing past it is ever read
            if member.size > max_member_bytes:
                raise ArchiveError(
                    f"{path}: {member.name} is {member.size / 2**20:,.0f} MiB, over the {max_member_bytes / 2**20:g} MiB "
                    "a CIFAR-10 batch can be (each is ~31 MB): not the CIFAR-10 archive (a damaged file or a "
                    "decompression bomb); refused before reading it into memory")
            f = tar.extractfile(member)
            assert f is not None
            return _unpickle(f.read(), name)

        names = [n.decode() if isinstance(n, bytes) else n for n in load(META).get(b"label_names", [])]
        if names != CIFAR10_CLASSES:
            raise ArchiveError(f"{META}: label_names {names} are not CIFAR-10's {CIFAR10_CLASSES}")
        train = [parse_batch(load(b), b) for b in TRAIN_BATCHES]
        test_x, test_y = parse_batch(load(TEST_BATCH), TEST_BATCH)
    return Cifar10Arrays(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y, names)


# ------------------------------------------------------------------------------------------ split

def run_split(params: Cifar10Params, raw_dir: Path, out_dir: Path, card_json: Path, card_md: Path) -> dict:
    from . import tracking

    with tracking.step_run("split", params, ["data/raw"], spec={"data": params.data.model_dump(exclude={"mirrors"})}) as tracker:
        card = _split(params, Path(raw_dir), Path(out_dir), card_json, card_md)
        if tracker is not None:
            tracker.log_metrics({f"{split}_rows": v["rows"] for split, v in card.items()})
            tracker.log_artifact(Path(card_md))
    return card


def _split(params: Cifar10Params, raw_dir: Path, out_dir: Path, card_json: Path, card_md: Path) -> dict:
    d = params.data
    log.info("reading the pickle batches inside %s (not extracting it)", raw_dir / d.archive.name)
    a = read_archive(raw_dir / d.archive.name)
    for what, got, want in (("training images (5 batches)", len(a.train_y), d.train_rows), ("test images", len(a.test_y), d.test_rows)):
        if got != want:
            raise ArchiveError(f"{d.archive.name}: {got} {what}, expected {want} (data.train_rows / data.test_rows)")
    train_x, train_y = a.train_x[: d.max_train_rows], a.train_y[: d.max_train_rows]
    test_x, test_y = a.test_x[: d.max_test_rows], a.test_y[: d.max_test_rows]
    meta = {"dataset": d.dataset, "task": "full", "class_names": a.class_names,
            "source_sha256": {d.archive.name: d.archive.sha256}, "source_md5": {d.archive.name: d.archive.md5}}
    splits = {
        f"full_{name}": Split(s.x, s.y, s.source_label, s.source_index,
                              dict(meta, split=name, source_file=TEST_BATCH if name == "test" else "data_batch_1..5"))
        for name, s in train_valid_test(train_x, train_y, test_x, test_y, d.valid_size).items()
    }
    return write_splits(splits, out_dir, card_json, card_md, "CIFAR-10")


# ------------------------------------------------------------------------------------------ summary

COLUMNS = (("valid_accuracy", "valid acc", "{:.4f}"), ("test_accuracy", "test acc", "{:.4f}"),
           ("epochs", "epochs run", "{}"), ("best_epoch", "best epoch", "{}"),
           ("seconds_per_epoch", "s/epoch", "{:.1f}"), ("mc_accuracy", "MC dropout test acc", "{:.4f}"))


def summarize(params: Cifar10Params, experiments_dir: Path, mc_json: Path) -> list[dict[str, Any]]:
    """One row per variant of params.experiments, from the metrics files of the experiment and MC-dropout steps."""
    mc = read_json(mc_json) if params.mc_dropout else {}
    rows = []
    for name, exp in params.experiments.items():
        m = read_json(Path(experiments_dir) / f"{name}.json")
        row = {"variant": name, "description": exp.description, **{k: m.get(k) for k, _, _ in COLUMNS if k in m}}
        lr = m.get("one_cycle_max_lr", exp.optimizer.learning_rate)
        row.update(learning_rate=lr, batch_size=exp.train.batch_size)
        if name in mc:
            row.update(mc_accuracy=mc[name]["mc_accuracy"], mc_samples=mc[name]["samples"])
        rows.append(row)
    return rows


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    head = ["variant", "lr", "batch", *(title for _, title, _ in COLUMNS)]
    lines = ["# CIFAR-10 (exercise 8): 20 × Dense(100) variants", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["variant"], f"{r['learning_rate']:.3g}", str(r["batch_size"])]
        cells += [fmt.format(r[k]) if r.get(k) is not None else "–" for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Best epoch = the epoch of the lowest validation loss (early stopping restores its weights).", ""]
    lines += [f"- **{r['variant']}**: {r['description']}" for r in rows]
    return "\n".join(lines) + "\n"


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The scalars `dvc metrics show` lists (it shows no lists): the best variant on validation accuracy, its test
    accuracy, the best MC-dropout accuracy."""
    out: dict[str, Any] = {}
    scored = [r for r in rows if r.get("valid_accuracy") is not None]
    if scored:
        best = max(scored, key=lambda r: r["valid_accuracy"])
        out.update(best=best["variant"], best_test=best.get("test_accuracy"))
    mc = [r["mc_accuracy"] for r in rows if r.get("mc_accuracy") is not None]
    if mc:
        out["mc_dropout"] = max(mc)
    return out


def run_summary(params: Cifar10Params, experiments_dir: Path, mc_json: Path, summary_md: Path, summary_json: Path) -> list[dict]:
    rows = summarize(params, experiments_dir, mc_json)
    write_json(summary_json, {**headline(rows), "variants": rows})
    write_text(summary_md, summary_markdown(rows))
    for r in rows:
        log.info("%-14s valid %.4f  test %.4f  (%s epochs, best %s, %.1fs/epoch)", r["variant"], r["valid_accuracy"],
                 r["test_accuracy"], r.get("epochs"), r.get("best_epoch"), r.get("seconds_per_epoch") or 0.0)
    log.info("summary table: %s", summary_md)
    return rows
