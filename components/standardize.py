"""Standardize step: per-pixel mean and std fitted on the TRAINING split only.

The statistics are saved as an artifact (``scaler.npz``: ``mean``, ``std``, float32, one value per
pixel) that the training steps apply to train/valid/test and that saved models carry. A pixel whose
std is 0 on the training split (constant) gets std 1, so it maps to 0 instead of NaN/inf.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .dataset import read_split
from .io import atomic_path, write_json

log = logging.getLogger("components.standardize")

EPS_STD = 1e-7


def fit_scaler(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pure function: uint8/float images (n, ...) → (mean, std) per pixel, float32, std > 0."""
    flat = x_train.reshape(len(x_train), -1).astype(np.float64) / 255.0
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std = np.where(std < EPS_STD, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def apply_scaler(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float32) / 255.0
    return ((flat - mean) / std).reshape(x.shape).astype(np.float32)


def save_scaler(path: Path, mean: np.ndarray, std: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mean=mean, std=std)


def load_scaler(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z["mean"], z["std"]


def run(splits_dir: Path, scaler_path: Path, metrics_path: Path, params=None) -> dict:
    """Fit, save, report; with ``params`` the step is also an MLflow run (scaler and metrics as artifacts)."""
    if params is None:
        return _run(splits_dir, scaler_path, metrics_path)
    from . import tracking

    with tracking.step_run("standardize", params, ["data/splits"],
                           splits=tracking.split_files(splits_dir, "full", ("train",))) as tracker:
        metrics = _run(splits_dir, scaler_path, metrics_path)
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            tracker.log_artifact(Path(scaler_path))
    return metrics


def _run(splits_dir: Path, scaler_path: Path, metrics_path: Path) -> dict:
    train = read_split(Path(splits_dir) / "full_train.parquet")
    mean, std = fit_scaler(train.x)
    save_scaler(scaler_path, mean, std)
    metrics = {
        "fitted_on": "full_train",
        "rows": int(len(train)),
        "pixels": int(mean.size),
        "constant_pixels": int((train.x.reshape(len(train), -1).std(axis=0) == 0).sum()),
        "mean_of_means": float(mean.mean()),
        "mean_of_stds": float(std.mean()),
    }
    write_json(metrics_path, metrics)
    log.info("fitted per-pixel mean/std on %d training images → %s", len(train), scaler_path)
    return metrics
