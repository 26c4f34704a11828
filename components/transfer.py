"""Transfer learning (the book's model A / model B / B-on-A), as three steps.

* ``model_a``: pretrain on task A (8 classes), once, with the global seed.
* ``model_b``: the baseline, task B from scratch on 200 images, once per seed in ``transfer.seeds``.
* ``b_on_a``: a **clone** of A with A's weights (A itself is never touched), its output layer replaced
  by a new sigmoid unit; reused layers frozen → compile → ``frozen_epochs`` → unfrozen → **re-compile**
  with the lower learning rate → ``unfrozen_epochs``. Once per seed, reported with the error-rate
  reduction factor (100 − acc_B) / (100 − acc_BonA) per seed and its mean ± std.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from . import tracking, train
from .config import Experiment, Params, family_of
from .dataset import read_meta
from .experiment import SPEC_ONLY, checkpoint_for, log_training, split_digests, train_experiment
from .io import read_json, write_json

log = logging.getLogger("components.transfer")


def _stack_histories(per_seed: dict[int, list[dict]]) -> list[dict]:
    return [{"seed": seed, **h} for seed, hist in per_seed.items() for h in hist]


def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def run_model_a(params: Params, splits_dir: Path, model_path: Path, metrics_path: Path, history_path: Path) -> dict:
    t = _transfer(params)
    ckpt = checkpoint_for("model_a", t.model_a, params, split_digests(splits_dir, "a"), params.seed)
    with tracking.step_run("model_a", params, ["data/splits"], run_name="model_a",
                           spec={"experiment": "model_a", **t.model_a.model_dump(exclude_none=True, exclude=SPEC_ONLY)},
                           tags=tracking.run_tags(family_of("model_a", t.model_a), "model_a", t.model_a.description),
                           splits=tracking.split_files(splits_dir, "a"), resume=ckpt.dir) as tracker:
        data = train.load_task(splits_dir, "a")
        live = [tracker.epoch_callback()] if tracker is not None else []
        model, metrics, history, extras = train_experiment("model_a", t.model_a, params, data, callbacks=live, checkpoint=ckpt)
        train.save_model(model, model_path)
        train.write_history_csv(history_path, history)
        metrics = {"experiment": "model_a", "task": "a", **metrics}
        if tracker is not None:
            metrics["mlflow_run_id"] = tracker.run_id
            info = log_training(tracker, "model_a", model, metrics, history, data, _classes(splits_dir, "a"),
                                {"history.csv": Path(history_path)})
            if info is not None:
                tracking.register(tracker, info.model_uri, "model_a", metrics[params.mlflow.registry.metric], params)
        write_json(metrics_path, metrics)
    extras["checkpoint"].clear()
    log.info("model_a: test_accuracy=%.4f", metrics["test_accuracy"])
    return metrics


def run_model_b(params: Params, splits_dir: Path, models_dir: Path, metrics_path: Path, history_path: Path) -> dict:
    t = _transfer(params)
    data = train.load_task(splits_dir, "b")
    per_seed, histories = {}, {}
    for seed in t.seeds:
        ckpt = checkpoint_for(f"model_b_seed{seed}", t.model_b, params, data.fingerprint, seed)
        with tracking.step_run("model_b", params, ["data/splits"], run_name=f"model_b seed {seed}",
                               spec={"experiment": "model_b", **t.model_b.model_dump(exclude_none=True, exclude=SPEC_ONLY)},
                               tags=tracking.run_tags(family_of("model_b", t.model_b), "model_b",
                                                      f"{t.model_b.description} (seed {seed})"),
                               splits=tracking.split_files(splits_dir, "b"), resume=ckpt.dir) as tracker:
            live = [tracker.epoch_callback()] if tracker is not None else []
            model, metrics, history, extras = train_experiment(f"model_b_seed{seed}", t.model_b, params, data, seed=seed,
                                                               callbacks=live, checkpoint=ckpt)
            train.save_model(model, Path(models_dir) / f"seed_{seed}.keras")
            if tracker is not None:
                tracker.log_params({"transfer_seed": seed})
                log_training(tracker, f"model_b seed {seed}", model, metrics, history, data, _classes(splits_dir, "b"))
                metrics["mlflow_run_id"] = tracker.run_id
        per_seed[seed], histories[seed] = metrics, history
        extras["checkpoint"].clear()
        log.info("model_b seed %d: test_accuracy=%.4f", seed, metrics["test_accuracy"])
    summary = _summary("model_b", per_seed)
    train.write_history_csv(history_path, _stack_histories(histories))
    write_json(metrics_path, summary)
    return summary


def _summary(name: str, per_seed: dict[int, dict]) -> dict[str, Any]:
    keys = [k for k in next(iter(per_seed.values())) if k.endswith(("accuracy", "loss"))]
    out: dict[str, Any] = {"experiment": name, "task": "b", "seeds": list(per_seed)}
    for k in keys:
        ms = _mean_std([m[k] for m in per_seed.values()])
        out[f"{k}_mean"], out[f"{k}_std"] = ms["mean"], ms["std"]
    out["seconds_per_epoch"] = float(np.median([m.get("seconds_per_epoch", 0.0) for m in per_seed.values()]))
    out["per_seed"] = {str(s): {k: m[k] for k in keys if k in m} | ({"mlflow_run_id": m["mlflow_run_id"]} if "mlflow_run_id" in m else {})
                       for s, m in per_seed.items()}
    return out


def b_on_a_model(model_a, seed: int):
    """Clone A (new layers, A's weights: training the clone cannot change A) and give it a new head."""
    import keras

    clone = keras.models.clone_model(model_a)
    clone.set_weights(model_a.get_weights())
    head = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=keras.initializers.GlorotUniform(seed=seed), name="output_b")
    model = keras.Sequential([keras.Input(model_a.input_shape[1:]), *clone.layers[:-1], head], name="b_on_a")
    return model


def set_reused_trainable(model, trainable: bool) -> None:
    for layer in model.layers[:-1]:
        layer.trainable = trainable


def weights_digest(model) -> str:
    import hashlib

    return hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())).hexdigest()


def b_on_a_checkpoints(params: Params, model_a, data: train.TaskData, seed: int) -> tuple[train.Checkpoint, train.Checkpoint]:
    """The resume states of B-on-A's two phases for one seed (frozen, unfrozen)."""
    t = _transfer(params)
    key = train.state_key("b_on_a", t.b_on_a.model_dump(), t.model_b.model_dump(), seed, data.fingerprint, weights_digest(model_a))
    base = Path(params.runtime.checkpoint_dir)
    return tuple(train.Checkpoint(base / f"b_on_a-{seed}-{key}-{suffix}") for suffix in ("frozen", "unfrozen"))


def train_b_on_a(params: Params, model_a, data: train.TaskData, seed: int, on_phase_end=None,
                 live=None) -> tuple[Any, dict, list[dict]]:
    """B-on-A for one seed. ``on_phase_end(phase, model)`` is called after "clone", "frozen" and "unfrozen";
    ``live(offset)``, when given, makes a Keras callback for the epochs after ``offset`` (the tracker's live log)."""
    import keras

    from .models import build_optimizer

    t = _transfer(params)
    cfg = t.b_on_a
    exp: Experiment = t.model_b
    rt = params.runtime
    train.configure(rt)
    train.seed_everything(seed)
    model = b_on_a_model(model_a, seed)
    if on_phase_end:
        on_phase_end("clone", model)
    steps = -(-len(data.x["train"]) // exp.train.batch_size)

    def compile_(lr: float) -> None:
        opt = exp.optimizer.model_copy(update={"learning_rate": lr})
        model.compile(loss="binary_crossentropy", optimizer=build_optimizer(opt, lr), metrics=["accuracy"],
                      **train.compile_options(rt, steps))

    frozen_ckpt, unfrozen_ckpt = b_on_a_checkpoints(params, model_a, data, seed)
    set_reused_trainable(model, False)
    compile_(cfg.frozen_learning_rate)
    frozen = train.fit(model, exp, data, rt, seed, cfg.frozen_epochs, frozen_ckpt, [live(0)] if live else None,
                       label=f"b_on_a seed {seed} (frozen)")
    if on_phase_end:
        on_phase_end("frozen", model)
    set_reused_trainable(model, True)
    compile_(cfg.unfrozen_learning_rate)  # re-compile: trainable changes take effect only on compile
    # the unfrozen phase continues the epoch count (the book's 4 + 16 = 20 epochs)
    unfrozen = train.fit(model, exp, data, rt, seed + 1, cfg.unfrozen_epochs, unfrozen_ckpt,
                         [live(cfg.frozen_epochs)] if live else None, label=f"b_on_a seed {seed} (unfrozen)")
    history = [{**h, "phase": "frozen"} for h in frozen.history] + [
        {**h, "epoch": h["epoch"] + cfg.frozen_epochs, "phase": "unfrozen"} for h in unfrozen.history
    ]
    if on_phase_end:
        on_phase_end("unfrozen", model)
    metrics = train.evaluate(model, data, rt.eval_batch_size)
    metrics.update(train.timing(history), epochs=len(history), seed=seed)
    for ckpt in (frozen_ckpt, unfrozen_ckpt):
        ckpt.clear()
    return model, metrics, history


def error_rate_reduction(acc_b: float, acc_b_on_a: float) -> float:
    """(100 − acc_B) / (100 − acc_BonA), accuracies in %; > 1 means transfer helped."""
    err_b, err_ba = 100 * (1 - acc_b), 100 * (1 - acc_b_on_a)
    return float("inf") if err_ba == 0 else err_b / err_ba


def run_b_on_a(
    params: Params, splits_dir: Path, model_a_path: Path, model_b_metrics: Path,
    models_dir: Path, metrics_path: Path, history_path: Path,
) -> dict:
    import keras

    t = _transfer(params)
    # before anything runs a TensorFlow op (loading A does): TensorFlow fixes its thread pools at the first op,
    # and B-on-A would train with the default threads, not params' runtime (other numbers, no determinism)
    train.configure(params.runtime)
    data = train.load_task(splits_dir, "b")
    model_a = keras.models.load_model(model_a_path)
    a_before = [w.copy() for w in model_a.get_weights()]
    b = read_json(model_b_metrics)
    per_seed, histories, factors, models_info = {}, {}, {}, {}
    for seed in t.seeds:
        spec = {"experiment": "b_on_a", "transfer_seed": seed, **t.b_on_a.model_dump(),
                "model_b": t.model_b.model_dump(exclude_none=True, exclude=SPEC_ONLY)}
        resume = b_on_a_checkpoints(params, model_a, data, seed)[0].dir  # kept until both phases are done
        with tracking.step_run("b_on_a", params, ["data/splits", "models/transfer/model_a.keras"],
                               run_name=f"b_on_a seed {seed}", spec=spec,
                               tags=tracking.run_tags(family_of("b_on_a", t.model_b), "b_on_a", _b_on_a_note(t, seed)),
                               splits=tracking.split_files(splits_dir, "b"), resume=resume) as tracker:
            model, metrics, history = train_b_on_a(params, model_a, data, seed,
                                                   live=tracker.epoch_callback if tracker is not None else None)
            train.save_model(model, Path(models_dir) / f"seed_{seed}.keras")
            acc_b = b["per_seed"][str(seed)]["test_accuracy"]
            factors[seed] = error_rate_reduction(acc_b, metrics["test_accuracy"])
            metrics["error_rate_reduction"] = factors[seed]
            metrics["model_b_test_accuracy"] = acc_b
            if tracker is not None:
                info = log_training(tracker, f"b_on_a seed {seed}", model, metrics, history, data, _classes(splits_dir, "b"))
                tracker.log_metrics({"error_rate_reduction": factors[seed]})
                models_info[seed] = (tracker, info)
                metrics["mlflow_run_id"] = tracker.run_id
        per_seed[seed], histories[seed] = metrics, history
        log.info("b_on_a seed %d: test_accuracy=%.4f vs model_b %.4f -> error-rate reduction x%.2f",
                 seed, metrics["test_accuracy"], acc_b, factors[seed])
    if any(not np.array_equal(x, y) for x, y in zip(a_before, model_a.get_weights())):
        raise RuntimeError("model A's weights changed while training B-on-A: the clone shares layers with A")
    summary = _summary("b_on_a", per_seed)
    metric = params.mlflow.registry.metric
    best = max(per_seed, key=lambda sd: per_seed[sd][metric])
    if best in models_info and models_info[best][1] is not None:  # register the seed that validates best
        tracking.register(models_info[best][0], models_info[best][1].model_uri, "b_on_a", per_seed[best][metric], params)
    fs = _mean_std(list(factors.values()))
    summary.update(
        error_rate_reduction_mean=fs["mean"], error_rate_reduction_std=fs["std"],
        model_b_test_accuracy_mean=b["test_accuracy_mean"], model_b_test_accuracy_std=b["test_accuracy_std"],
        transfer_helped_seeds=int(sum(f > 1 for f in factors.values())),
    )
    for s in per_seed:
        summary["per_seed"][str(s)]["error_rate_reduction"] = factors[s]
        summary["per_seed"][str(s)]["model_b_test_accuracy"] = per_seed[s]["model_b_test_accuracy"]
    train.write_history_csv(history_path, _stack_histories(histories))
    write_json(metrics_path, summary)
    log.info("b_on_a over %d seeds: B %.4f ± %.4f, B-on-A %.4f ± %.4f, error-rate reduction x%.2f ± %.2f",
             len(t.seeds), b["test_accuracy_mean"], b["test_accuracy_std"], summary["test_accuracy_mean"],
             summary["test_accuracy_std"], fs["mean"], fs["std"])
    return summary


def _classes(splits_dir: Path, task: str) -> list[str]:
    return read_meta(Path(splits_dir) / f"{task}_test.parquet")["class_names"]


def _b_on_a_note(t, seed: int) -> str:
    c = t.b_on_a
    return (f"B-on-A: a clone of model A with a new sigmoid head, on the task-B images; reused layers frozen for "
            f"{c.frozen_epochs} epochs (SGD {c.frozen_learning_rate:g}), then unfrozen and re-compiled for "
            f"{c.unfrozen_epochs} epochs (SGD {c.unfrozen_learning_rate:g}) (seed {seed})")


def _transfer(params: Params):
    if params.transfer is None:
        raise ValueError("params.yaml has no 'transfer' section")
    return params.transfer
