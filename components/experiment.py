"""Experiment step: train one entry of ``experiments`` in params.yaml (one DVC stage / one Kubeflow task each).

Writes the model (``.keras``, self-contained: it takes raw pixels), the per-epoch history (CSV, for
``dvc plots``), and the final train/valid/test metrics with seconds per epoch (JSON, for ``dvc metrics``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import train
from .config import Experiment, OneCycleSchedule, Params, family_of
from .io import write_json
from .plots import confusion_png, history_png

log = logging.getLogger("components.experiment")


def load_scaler_if(exp: Experiment, scaler_path: Path | None):
    if exp.train.inputs != "standardized":
        return None
    from .standardize import load_scaler

    if scaler_path is None:
        raise ValueError("standardized inputs need the scaler of the standardize step")
    return load_scaler(scaler_path)


def checkpoint_for(name: str, exp: Experiment, params: Params, data_id: str, seed: int) -> train.Checkpoint:
    """Where a training's resume state lives, keyed by spec, seed, data (``data_id``) and runtime; the step's
    MLflow run id is kept there too (tracking.step_run's ``resume``). A one-cycle ``max_lr`` left to the LR-range
    test is not in the key: the test runs on the same data, seed and runtime, so it is a function of the key."""
    key = train.state_key(name, exp.model_dump(), seed, data_id, params.runtime.model_dump())
    return train.Checkpoint(Path(params.runtime.checkpoint_dir) / f"{name}-{key}")


def split_digests(splits_dir: Path, task: str) -> str:
    """The task's splits' content hashes, from the files' metadata (no page read): the data part of a checkpoint
    key known before the data are loaded (every read checks the hash: components/dataset.py)."""
    from .dataset import DIGEST_KEY, read_meta

    return ",".join(read_meta(Path(splits_dir) / f"{task}_{s}.parquet").get(DIGEST_KEY, "") for s in ("train", "valid", "test"))


def train_experiment(
    name: str,
    exp: Experiment,
    params: Params,
    data: train.TaskData,
    scaler=None,
    seed: int | None = None,
    callbacks: list | None = None,
    checkpoint: train.Checkpoint | None = None,
) -> tuple[Any, dict[str, Any], list[dict], dict[str, Any]]:
    """Pure-ish core: spec + data in → (model, metrics, history, extras). No files except the resume state."""
    from .models import build_model, build_optimizer, learning_rate, output_for

    seed = params.seed if seed is None else seed
    train.configure(params.runtime)
    _, _, loss = output_for(exp.task)

    def build():
        train.seed_everything(seed)
        return build_model(exp.model, exp.task, scaler=scaler, n_inputs=data.x["train"].shape[1], seed=seed, name=name)

    extras: dict[str, Any] = {}
    max_lr = None
    if isinstance(exp.schedule, OneCycleSchedule) and exp.schedule.max_lr is None:
        extras["lr_range_test"] = train.lr_range_test(build, exp, data, params.runtime, seed, loss)
        max_lr = extras["lr_range_test"]["max_lr"]
    model = build()
    steps = -(-len(data.x["train"]) // exp.train.batch_size)
    lr = learning_rate(exp.optimizer, exp.schedule, steps, exp.train.epochs, max_lr)
    model.compile(loss=loss, optimizer=build_optimizer(exp.optimizer, lr), metrics=["accuracy"],
                  **train.compile_options(params.runtime, steps))
    ckpt = checkpoint or checkpoint_for(name, exp, params, data.fingerprint, seed)
    callbacks = list(callbacks or [])
    health = None
    if exp.train.diagnostics.enabled:
        from .diagnostics import GradientHealth

        health = GradientHealth(data.x["train"], data.y["train"], exp.train.diagnostics, label=name,
                                state_path=ckpt.dir / "diagnostics.json")
        callbacks.append(health)
    result = train.fit(model, exp, data, params.runtime, seed, exp.train.epochs, ckpt, callbacks, label=name)
    metrics = train.evaluate(model, data, params.runtime.eval_batch_size)
    metrics.update(train.timing(result.history))
    metrics.update(best_epoch(result.history, exp))
    metrics.update(epochs=len(result.history), batch_size=exp.train.batch_size, seed=seed, params_count=int(model.count_params()))
    if max_lr is not None:
        metrics["one_cycle_max_lr"] = max_lr
    if result.resumed_from:
        metrics["resumed_from_epoch"] = result.resumed_from
    if health is not None:
        from .diagnostics import verdict

        metrics["diagnostics"] = {**verdict(health.records, exp.train.diagnostics), "probe_rows": len(health.x),
                                  "probe_seconds": health.seconds}
        extras["diagnostics"] = health.records
    extras["checkpoint"] = ckpt
    return model, metrics, result.history, extras


def best_epoch(history: list[dict], exp: Experiment) -> dict[str, int]:
    """The epoch whose weights early stopping keeps: the first best of its monitored metric (val_loss by default)."""
    monitor = exp.train.early_stopping.monitor if exp.train.early_stopping else "val_loss"
    seen = [h for h in history if monitor in h]
    if not seen:
        return {}
    sign = -1.0 if "acc" in monitor else 1.0  # Keras' mode "auto": accuracies are maximised, losses minimised
    return {"best_epoch": int(min(seen, key=lambda h: sign * h[monitor])["epoch"])}


def test_predictions(model, data: train.TaskData, rows: int = 10_000):
    """Predicted classes of the test split, for the confusion matrix.

    Eager forward passes of up to ``rows`` rows: ``model.predict`` would trace (for an XLA model, also
    compile) a predict function for this single call (0.39 s -> 0.04 s for the small MLPs), and eager calls
    cost per layer, so few large ones (the 100-layer net: 1.5 s in passes of 1,000 rows, 0.45 s in one)."""
    import numpy as np

    x = data.x["test"]
    p = np.concatenate([np.asarray(model(x[i : i + rows].astype("float32"), training=False))
                        for i in range(0, len(x), rows)])
    return (p[:, 0] > 0.5).astype(int) if p.shape[-1] == 1 else np.argmax(p, axis=1)


SPEC_ONLY = {"description", "family"}  # on the run as its description and tag, not as params


def log_training(tracker, name: str, model, metrics: dict, history: list[dict], data: train.TaskData,
                 class_names: list[str], files: dict[str, Path] | None = None):
    """A training run's metrics, model and artifacts under the names every training run shares
    (``learning_curves.png``, ``confusion_matrix.png``, ``history.csv``; made here when ``files`` lacks them),
    so that MLflow's compare page shows them side by side. Returns the logged model's info."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ch11-plots-") as tmp:
        named = dict(files or {})
        if "learning_curves.png" not in named:
            named["learning_curves.png"] = Path(tmp) / "learning_curves.png"
            history_png(named["learning_curves.png"], history, name)
        if "confusion_matrix.png" not in named:
            named["confusion_matrix.png"] = Path(tmp) / "confusion_matrix.png"
            confusion_png(named["confusion_matrix.png"], data.y["test"], test_predictions(model, data), class_names, name)
        if "history.csv" not in named:
            named["history.csv"] = Path(tmp) / "history.csv"
            train.write_history_csv(named["history.csv"], history)
        return tracker.log_run(model, metrics, history, named, example=data.x["test"][:5])


def run(
    params: Params,
    name: str,
    splits_dir: Path,
    scaler_path: Path,
    model_path: Path,
    metrics_path: Path,
    history_path: Path,
    artifacts_dir: Path,
    diagnostics_path: Path,
) -> dict[str, Any]:
    from . import diagnostics, tracking
    from .dataset import read_meta

    if name not in params.experiments:
        raise KeyError(f"no experiment {name!r} in params.yaml; experiments: {', '.join(params.experiments)}")
    exp = params.experiments[name]
    log.info("%s: %s", name, exp.description or "")
    inputs = ["data/splits"] + (["data/scaler.npz"] if exp.train.inputs == "standardized" else [])
    ckpt = checkpoint_for(name, exp, params, split_digests(splits_dir, exp.task), params.seed)
    with tracking.step_run("experiment", params, inputs, run_name=name,
                           spec={"experiment": name, **exp.model_dump(exclude_none=True, exclude=SPEC_ONLY)},
                           tags={**tracking.run_tags(family_of(name, exp), name, exp.description), "seed": str(params.seed)},
                           splits=tracking.split_files(splits_dir, exp.task), resume=ckpt.dir) as tracker:
        data = train.load_task(splits_dir, exp.task)
        live = [tracker.epoch_callback()] if tracker is not None else []
        model, metrics, history, extras = train_experiment(name, exp, params, data, load_scaler_if(exp, scaler_path),
                                                           callbacks=live, checkpoint=ckpt)
        artifacts_dir = Path(artifacts_dir)
        artifacts_dir.mkdir(parents=True, exist_ok=True)
        history_png(artifacts_dir / "learning_curves.png", history, name)
        classes = read_meta(Path(splits_dir) / f"{exp.task}_test.parquet")["class_names"]
        confusion_png(artifacts_dir / "confusion_matrix.png", data.y["test"], test_predictions(model, data), classes, name)
        if "lr_range_test" in extras:
            rt = extras["lr_range_test"]
            write_json(artifacts_dir / "lr_range_test.json", rt)
            metrics["lr_at_min_loss"] = rt["lr_at_min_loss"]
        records = extras.get("diagnostics", [])
        if records:
            diagnostics.heatmap_png(artifacts_dir / "diagnostics.png", records, name)
            d = metrics["diagnostics"]
            log.info("%s: gradient health %s (%s)", name, d["verdict"].upper(), d["reason"])
        diagnostics.write_csv(diagnostics_path, records)  # header only when diagnostics are off (DVC needs the file)
        train.save_model(model, model_path)
        train.write_history_csv(history_path, history)
        metrics = {"experiment": name, "task": exp.task, **metrics}
        if tracker is not None:
            metrics["mlflow_run_id"] = tracker.run_id
            files = {"learning_curves.png": artifacts_dir / "learning_curves.png", "history.csv": Path(history_path),
                     "confusion_matrix.png": artifacts_dir / "confusion_matrix.png"}
            files.update({p.name: p for p in sorted(artifacts_dir.iterdir()) if p.is_file() and p.name not in files})
            info = log_training(tracker, name, model, metrics, history, data, classes, files)
            if records:
                tracker.log_history(diagnostics.per_epoch_metrics(records))  # grad_norm/dense_001 ... step = epoch
                tracker.log_named({"diagnostics.csv": Path(diagnostics_path)})
                tracker.set_tags({"diagnostics.verdict": metrics["diagnostics"]["verdict"]})
            if info is not None:
                metrics["mlflow_model_uri"] = info.model_uri
        write_json(metrics_path, metrics)
    extras["checkpoint"].clear()  # outputs are safely written: the resume state is no longer needed
    log.info("%s: test_accuracy=%.4f valid_accuracy=%.4f (%.2fs/epoch) -> %s",
             name, metrics["test_accuracy"], metrics["valid_accuracy"], metrics.get("seconds_per_epoch", 0), model_path)
    return metrics
