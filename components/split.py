"""Split step: IDX files → train/valid/test Parquet for the full task and the transfer tasks A and B.

Data rules (../shared/EXPERIMENTS.md): valid = the FIRST ``valid_size`` images of the training file,
train = the rest, test = the test file. Task A = the 8 classes other than task B's two, labels
renumbered in order (7, 8, 9 → 5, 6, 7 by default); task B = positive (Shirt) → 1 vs negative
(Sandal) → 0, B train = the first ``task_b.train_size`` B images of the train split, B valid/test =
every B image of valid/test.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .config import FASHION_MNIST_CLASSES, Params, TaskB
from .dataset import Split, write_split
from .idx import read_images_labels
from .io import write_json, write_text

log = logging.getLogger("components.split")

SPLITS = ("train", "valid", "test")
TASKS = ("full", "a", "b")
SPLIT_FILES = tuple(f"{t}_{s}.parquet" for t in TASKS for s in SPLITS)


def task_a_classes(task_b: TaskB) -> list[int]:
    return [c for c in range(10) if c not in (task_b.positive_class, task_b.negative_class)]


def _subset(split: Split, mask: np.ndarray, labels: np.ndarray, meta: dict) -> Split:
    return Split(split.x[mask], labels, split.source_label[mask], split.source_index[mask], meta)


def train_valid_test(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, valid_size: int
) -> dict[str, Split]:
    """valid = the FIRST ``valid_size`` training images, train = the rest, test = the test file (no metadata yet)."""
    if valid_size >= len(train_y):
        raise ValueError(f"valid_size={valid_size} leaves no training images (the training file has {len(train_y)})")
    idx_train = np.arange(len(train_y), dtype=np.int32)
    return {
        "train": Split(train_x[valid_size:], train_y[valid_size:], train_y[valid_size:], idx_train[valid_size:]),
        "valid": Split(train_x[:valid_size], train_y[:valid_size], train_y[:valid_size], idx_train[:valid_size]),
        "test": Split(test_x, test_y, test_y, np.arange(len(test_y), dtype=np.int32)),
    }


def split_fashion_mnist(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    valid_size: int,
    task_b: TaskB,
    base_meta: dict | None = None,
) -> dict[str, Split]:
    """Pure function: source arrays in, the nine splits out (keys ``{task}_{split}``)."""
    bad = np.setdiff1d(np.union1d(np.unique(train_y), np.unique(test_y)), np.arange(10))
    if bad.size:
        raise ValueError(f"labels outside 0..9 in the source files: {bad.tolist()}")
    base_meta = dict(base_meta or {})
    full = train_valid_test(train_x, train_y, test_x, test_y, valid_size)
    a_classes = task_a_classes(task_b)
    remap = np.full(10, 255, dtype=np.uint8)
    remap[a_classes] = np.arange(len(a_classes), dtype=np.uint8)
    out: dict[str, Split] = {}
    for name, s in full.items():
        source_file = "test" if name == "test" else "train"
        meta = dict(base_meta, split=name, source_file=source_file)
        out[f"full_{name}"] = Split(s.x, s.y.astype(np.uint8), s.source_label, s.source_index,
                                    dict(meta, task="full", class_names=FASHION_MNIST_CLASSES))
        is_b = (s.source_label == task_b.positive_class) | (s.source_label == task_b.negative_class)
        a_names = [FASHION_MNIST_CLASSES[c] for c in a_classes]
        out[f"a_{name}"] = _subset(s, ~is_b, remap[s.source_label[~is_b]],
                                   dict(meta, task="a", class_names=a_names, source_classes=a_classes))
        b_labels = (s.source_label[is_b] == task_b.positive_class).astype(np.uint8)
        b_meta = dict(meta, task="b",
                      class_names=[FASHION_MNIST_CLASSES[task_b.negative_class], FASHION_MNIST_CLASSES[task_b.positive_class]],
                      source_classes=[task_b.negative_class, task_b.positive_class])
        b = _subset(s, is_b, b_labels, b_meta)
        if name == "train":
            if len(b) < task_b.train_size:
                raise ValueError(f"task_b.train_size={task_b.train_size} but the train split has only {len(b)} task-B images")
            b = Split(b.x[: task_b.train_size], b.y[: task_b.train_size], b.source_label[: task_b.train_size],
                      b.source_index[: task_b.train_size], b.meta)
        out[f"b_{name}"] = b
    return out


def dataset_card(splits: dict[str, Split]) -> dict:
    card = {}
    for name, s in splits.items():
        counts = np.bincount(s.y, minlength=len(s.meta.get("class_names", [])) or None)
        card[name] = {"rows": int(len(s)), **{f"class_{i}": int(c) for i, c in enumerate(counts)}}
    return card


def card_markdown(splits: dict[str, Split], dataset: str = "Fashion-MNIST") -> str:
    lines = [f"# Dataset card: {dataset} splits", "",
             "| split | rows | classes (label: name = count) |", "|---|---:|---|"]
    for name, s in splits.items():
        counts = np.bincount(s.y, minlength=len(s.meta["class_names"]))
        cls = ", ".join(f"{i}: {n} = {c}" for i, (n, c) in enumerate(zip(s.meta["class_names"], counts)))
        lines.append(f"| {name} | {len(s)} | {cls} |")
    first = next(iter(splits.values())).meta
    lines += ["", "Source files (SHA-256):", ""]
    lines += [f"- `{k}`: `{v}`" for k, v in first.get("source_sha256", {}).items()]
    return "\n".join(lines) + "\n"


def run(params: Params, raw_dir: Path, out_dir: Path, card_json: Path, card_md: Path, track: bool = True) -> dict:
    if not track:
        return _run(params, raw_dir, out_dir, card_json, card_md)
    from . import tracking

    with tracking.step_run("split", params, ["data/raw"], spec={"data": params.data.model_dump(exclude={"mirrors"})}) as tracker:
        card = _run(params, raw_dir, out_dir, card_json, card_md)
        if tracker is not None:
            tracker.log_metrics({f"{split}_rows": v["rows"] for split, v in card.items()})
            tracker.log_artifact(Path(card_md))
            tracker.log_artifact(Path(card_json))
    return card


def _run(params: Params, raw_dir: Path, out_dir: Path, card_json: Path, card_md: Path) -> dict:
    files = params.data.files
    log.info("parsing IDX files in %s", raw_dir)
    train_x, train_y = read_images_labels(raw_dir / files.train_images.name, raw_dir / files.train_labels.name)
    test_x, test_y = read_images_labels(raw_dir / files.test_images.name, raw_dir / files.test_labels.name)
    if params.data.max_train_rows:
        train_x, train_y = train_x[: params.data.max_train_rows], train_y[: params.data.max_train_rows]
    if params.data.max_test_rows:
        test_x, test_y = test_x[: params.data.max_test_rows], test_y[: params.data.max_test_rows]
    base_meta = {
        "dataset": params.data.dataset,
        "source_sha256": {getattr(files, k).name: getattr(files, k).sha256 for k in files.model_fields},
    }
    splits = split_fashion_mnist(train_x, train_y, test_x, test_y, params.data.valid_size, params.data.task_b, base_meta)
    return write_splits(splits, out_dir, card_json, card_md)


def write_splits(splits: dict[str, Split], out_dir: Path, card_json: Path, card_md: Path, dataset: str = "Fashion-MNIST") -> dict:
    """Each split as ``out_dir/<name>.parquet``, and the dataset card (JSON + Markdown); returns the card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, s in splits.items():
        write_split(out_dir / f"{name}.parquet", s)
        log.info("wrote %s: %d rows", out_dir / f"{name}.parquet", len(s))
    card = dataset_card(splits)
    write_json(card_json, card)
    write_text(card_md, card_markdown(splits, dataset))
    return card
