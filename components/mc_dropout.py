"""MC dropout (Gal & Ghahramani 2016, as in the book): sample a trained dropout model with dropout ON
and everything else (BatchNormalization) in inference mode, ``samples`` times, in batched passes.

Reports deterministic vs MC accuracy, per-class mean/std of the true class's probability, expected
calibration error (ECE) and a reliability diagram for both, per-example predictive mean and std
(Parquet), and the accuracy when the most uncertain x % of the test set are set aside.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from . import tracking, train
from .config import Params
from .dataset import read_split
from .io import atomic_path, write_json
from .plots import pyplot, save_png

log = logging.getLogger("components.mc_dropout")


def mc_predict(mc_model, x: np.ndarray, samples: int, batch_rows: int) -> np.ndarray:
    """(samples, n, classes) probabilities. Each pass feeds ``batch_rows`` rows repeated ``samples`` times,
    so one forward call draws every sample of those rows (independent dropout masks per copy)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def passes(xb):
        tiled = tf.tile(xb, [samples, 1])
        out = mc_model(tiled, training=False)
        return tf.reshape(out, [samples, tf.shape(xb)[0], -1])

    chunks = [passes(tf.constant(x[i : i + batch_rows], tf.float32)).numpy() for i in range(0, len(x), batch_rows)]
    return np.concatenate(chunks, axis=1)


def to_multiclass(p: np.ndarray) -> np.ndarray:
    """A sigmoid output (…, 1) as two-class probabilities (…, 2); softmax outputs unchanged."""
    return np.concatenate([1 - p, p], axis=-1) if p.shape[-1] == 1 else p


def calibration(probs: np.ndarray, y: np.ndarray, bins: int) -> dict[str, Any]:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece, rows = 0.0, []
    for b in range(bins):
        m = idx == b
        if m.any():
            acc, c = float(correct[m].mean()), float(conf[m].mean())
            ece += m.mean() * abs(acc - c)
            rows.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]), "count": int(m.sum()), "accuracy": acc, "confidence": c})
    return {"ece": float(ece), "bins": rows}


def rejection_curve(mean_probs: np.ndarray, y: np.ndarray, fractions: list[float]) -> dict[str, float]:
    """Accuracy on what remains after setting aside the most uncertain fraction (predictive entropy)."""
    entropy = -(mean_probs * np.log(np.clip(mean_probs, 1e-12, 1))).sum(axis=1)
    order = np.argsort(entropy, kind="stable")  # most certain first
    correct = mean_probs.argmax(axis=1) == y
    out = {"0.0": float(correct.mean())}
    for f in fractions:
        keep = order[: int(round(len(y) * (1 - f)))]
        out[str(f)] = float(correct[keep].mean())
    return out


def analyse(det_probs: np.ndarray, mc_probs: np.ndarray, y: np.ndarray, class_names: list[str], bins: int, fractions: list[float]) -> dict[str, Any]:
    """Pure function: deterministic (n, c) and MC (s, n, c) probabilities + labels → the report's numbers."""
    det_probs, mc_probs = to_multiclass(det_probs), to_multiclass(mc_probs)
    mean = mc_probs.mean(axis=0)
    std = mc_probs.std(axis=0)
    det_pred, mc_pred = det_probs.argmax(1), mean.argmax(1)
    per_class = {}
    for k, name in enumerate(class_names):
        m = y == k
        if m.any():
            per_class[name] = {
                "deterministic_accuracy": float((det_pred[m] == k).mean()),
                "mc_accuracy": float((mc_pred[m] == k).mean()),
                "mean_prob_true_class": float(mean[m, k].mean()),
                "std_prob_true_class": float(std[m, k].mean()),
            }
    return {
        "deterministic_accuracy": float((det_pred == y).mean()),
        "mc_accuracy": float((mc_pred == y).mean()),
        "deterministic_calibration": calibration(det_probs, y, bins),
        "mc_calibration": calibration(mean, y, bins),
        "accuracy_after_rejecting": rejection_curve(mean, y, fractions),
        "per_class": per_class,
        "mean_predictive_std": float(std[np.arange(len(y)), mc_pred].mean()),
    }


def reliability_png(path: Path, result: dict[str, Any], title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    ax.plot([0, 1], [0, 1], "k:", label="perfect calibration")
    for key, label in (("deterministic_calibration", "deterministic"), ("mc_calibration", "MC dropout")):
        bins = result[key]["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
                label=f"{label} (ECE {result[key]['ece']:.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"{title}: reliability")
    ax.legend()
    ax = axes[1]
    rej = result["accuracy_after_rejecting"]
    xs = [float(k) * 100 for k in rej]
    ax.plot(xs, list(rej.values()), "o-")
    ax.set(xlabel="% most uncertain set aside", ylabel="accuracy on the rest", title="uncertainty-based rejection")
    fig.tight_layout()
    save_png(fig, path, dpi=100)


def run(params: Params, splits_dir: Path, models_dir: Path, metrics_path: Path, artifacts_dir: Path) -> dict:
    """MC dropout on every model of ``mc_dropout.sources``: one MLflow child run each, one metrics file for all."""
    cfg = params.mc_dropout
    if cfg is None:
        raise ValueError("params.yaml has no 'mc_dropout' section")
    results = {}
    for name in cfg.sources:
        results[name] = run_one(params, name, splits_dir, Path(models_dir) / f"{name}.keras", Path(artifacts_dir) / name)
    write_json(metrics_path, results)
    return results


def run_one(params: Params, name: str, splits_dir: Path, model_path: Path, artifacts_dir: Path) -> dict:
    cfg = params.mc_dropout
    exp = params.experiments[name]
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"no trained model for {name!r} at {model_path}: run its experiment stage first")
    note = (f"MC dropout on the trained {name} model: {cfg.samples} stochastic passes over the test split (dropout on, "
            "batch norm in inference mode); test_accuracy is the MC-averaged prediction's")
    with tracking.step_run("mc_dropout", params, ["data/splits", f"models/experiments/{name}.keras"],
                           run_name=f"mc_dropout {name}", spec={"source": name, **cfg.model_dump()},
                           splits=tracking.split_files(splits_dir, exp.task),
                           tags=tracking.run_tags("mc_dropout", f"mc_dropout@{name}", note)) as tracker:
        metrics = _run(params, name, exp, cfg, splits_dir, model_path, artifacts_dir)
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
            tracker.log_metrics({"test_accuracy": metrics["mc_accuracy"]})  # the key every run with a test accuracy shares
            tracker.log_metrics({f"accuracy_after_rejecting_{k}": v for k, v in metrics["accuracy_after_rejecting"].items()})
            tracker.log_artifact(Path(artifacts_dir))
    return metrics


def _run(params: Params, name: str, exp, cfg, splits_dir: Path, model_path: Path, artifacts_dir: Path) -> dict:
    import keras
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .dataset import read_meta
    from .models import to_mc

    train.configure(params.runtime)
    train.seed_everything(params.seed)
    data = train.load_task(splits_dir, exp.task)
    class_names = read_meta(Path(splits_dir) / f"{exp.task}_test.parquet")["class_names"]
    model = keras.models.load_model(model_path)
    mc_model = to_mc(model)
    x, y = data.x["test"], data.y["test"].astype(np.int64)
    det = model.predict(x.astype(np.float32), batch_size=params.runtime.eval_batch_size, verbose=0)
    mc = mc_predict(mc_model, x, cfg.samples, cfg.batch_rows)
    result = analyse(det, mc, y, class_names, cfg.ece_bins, cfg.reject_fractions)
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    reliability_png(artifacts_dir / "reliability.png", result, name)
    mean, std = to_multiclass(mc).mean(0), to_multiclass(mc).std(0)
    pred = mean.argmax(1)
    table = pa.table({
        "source_index": pa.array(read_split(Path(splits_dir) / f"{exp.task}_test.parquet").source_index),
        "label": pa.array(y.astype(np.int16)),
        "deterministic_pred": pa.array(to_multiclass(det).argmax(1).astype(np.int16)),
        "mc_pred": pa.array(pred.astype(np.int16)),
        "mc_mean_prob": pa.array(mean[np.arange(len(y)), pred].astype(np.float32)),
        "mc_std_prob": pa.array(std[np.arange(len(y)), pred].astype(np.float32)),
    })
    with atomic_path(artifacts_dir / "predictions.parquet") as tmp:
        pq.write_table(table, tmp)
    metrics = {
        "experiment": name, "samples": cfg.samples,
        "deterministic_accuracy": result["deterministic_accuracy"], "mc_accuracy": result["mc_accuracy"],
        "deterministic_ece": result["deterministic_calibration"]["ece"], "mc_ece": result["mc_calibration"]["ece"],
        "mean_predictive_std": result["mean_predictive_std"],
        "accuracy_after_rejecting": result["accuracy_after_rejecting"],
        "per_class": result["per_class"],
    }
    write_json(artifacts_dir / "metrics.json", metrics)
    write_json(artifacts_dir / "calibration.json", {k: result[k] for k in ("deterministic_calibration", "mc_calibration")})
    log.info("%s: deterministic %.4f, MC dropout (%d samples) %.4f; ECE %.4f -> %.4f", name,
             metrics["deterministic_accuracy"], cfg.samples, metrics["mc_accuracy"], metrics["deterministic_ece"], metrics["mc_ece"])
    return metrics
