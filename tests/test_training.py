"""Training is deterministic, stops on NaN without writing a model, and resumes after kill -9."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from components import experiment, train

from .conftest import ROOT, run, ws_params


def outputs(ws: Path, name: str, tag: str) -> dict[str, Path]:
    d = ws / "out" / tag
    return {"model_path": d / f"{name}.keras", "metrics_path": d / f"{name}.json",
            "history_path": d / f"{name}.csv", "artifacts_dir": d / name, "diagnostics_path": d / "diagnostics" / f"{name}.csv"}


def train_weights(ws, name, seed=42, **upd):
    p = ws_params(ws, seed=seed, **upd)
    data = train.load_task(ws / "data/splits", p.experiments[name].task)
    exp = p.experiments[name]
    model, metrics, history, extras = experiment.train_experiment(name, exp, p, data, experiment.load_scaler_if(exp, ws / "data/scaler.npz"))
    extras["checkpoint"].clear()
    return model.get_weights(), metrics


@pytest.mark.parametrize("name", ["dropout", "bn_after"])
def test_same_params_and_data_give_identical_weights(tiny_ws, name):
    upd = {f"experiments.{name}.train.epochs": 2}
    w1, m1 = train_weights(tiny_ws, name, **upd)
    w2, m2 = train_weights(tiny_ws, name, **upd)
    w3, _ = train_weights(tiny_ws, name, seed=7, **upd)
    assert all(np.array_equal(a, b) for a, b in zip(w1, w2)), "same seed, different weights"
    assert m1["test_loss"] == m2["test_loss"]
    assert not np.array_equal(w1[0], w3[0]), "a different seed should change the weights"


def test_nan_loss_stops_with_a_clear_error_and_no_model(tiny_ws):
    p = ws_params(tiny_ws, **{"experiments.opt_sgd.optimizer.learning_rate": 1e8, "experiments.opt_sgd.train.epochs": 3})
    out = outputs(tiny_ws, "opt_sgd", "nan")
    with pytest.raises(train.TrainingDiverged, match=r"loss became (nan|inf).*no model was written.*learning_rate"):
        experiment.run(p, "opt_sgd", tiny_ws / "data/splits", tiny_ws / "data/scaler.npz", **out)
    assert not out["model_path"].exists() and not out["metrics_path"].exists()
    assert not any((tiny_ws / ".checkpoints").glob("opt_sgd-*/state.json")), "a diverged run must not be resumed"


def test_cli_exit_code_on_nan(tiny_ws, tmp_path):
    proc = run([sys.executable, "-m", "components", "experiment", "opt_sgd", "-S", "experiments.opt_sgd.optimizer.learning_rate=1e8"],
               cwd=tiny_ws, check=False, PYTHONPATH=str(ROOT))
    assert proc.returncode == 1
    assert "TrainingDiverged" in proc.stderr and "no model was written" in proc.stderr


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tiny_ws):
    name = "dropout"  # dropout RNG state and Nadam slots must survive the restart too
    args = [sys.executable, "-m", "components", "experiment", name, "-S", f"experiments.{name}.train.epochs=4"]
    killed = run(args, cwd=tiny_ws, check=False, PYTHONPATH=str(ROOT), CH11_FAULT_KILL_AFTER_EPOCH="2")
    assert killed.returncode in (-9, 137), killed.stderr[-2000:]
    assert not (tiny_ws / f"models/experiments/{name}.keras").exists()
    assert list((tiny_ws / ".checkpoints").glob(f"{name}-*/state.json"))
    resumed = run(args, cwd=tiny_ws, PYTHONPATH=str(ROOT))
    assert "resuming after epoch 2/4" in resumed.stderr
    assert "epoch 1/4" not in resumed.stderr and "epoch 3/4" in resumed.stderr
    assert not list((tiny_ws / ".checkpoints").glob(f"{name}-*")), "resume state should be cleared after success"
    import keras

    from components import models  # noqa: F401

    got = keras.models.load_model(tiny_ws / f"models/experiments/{name}.keras").get_weights()
    ref, _ = train_weights(tiny_ws, name, **{f"experiments.{name}.train.epochs": 4})
    assert all(np.array_equal(a, b) for a, b in zip(got, ref)), "resumed run differs from an uninterrupted one"


@pytest.mark.parametrize("name", ["bn_before", "alpha_dropout"])  # BN in inference mode; dropout off
def test_confusion_matrix_classes_are_model_predicts(tiny_ws, name):
    p = ws_params(tiny_ws, **{f"experiments.{name}.train.epochs": 1})
    exp = p.experiments[name]
    data = train.load_task(tiny_ws / "data/splits", exp.task)
    model, *_, extras = experiment.train_experiment(name, exp, p, data, experiment.load_scaler_if(exp, tiny_ws / "data/scaler.npz"))
    extras["checkpoint"].clear()
    want = np.argmax(model.predict(data.x["test"].astype("float32"), batch_size=50, verbose=0), axis=1)
    got = experiment.test_predictions(model, data, rows=64)  # several eager passes, the last one short
    assert len(data.x["test"]) % 64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_fit_traces_the_training_step_once(tiny_ws):
    """Metrics and optimizer slots exist before the first trace, so tf.function does not trace it again."""
    name = "opt_nadam"  # Nadam: slot variables too
    p = ws_params(tiny_ws, **{f"experiments.{name}.train.epochs": 1})
    exp = p.experiments[name]
    data = train.load_task(tiny_ws / "data/splits", exp.task)
    model, *_, extras = experiment.train_experiment(name, exp, p, data, experiment.load_scaler_if(exp, tiny_ws / "data/scaler.npz"))
    extras["checkpoint"].clear()
    from components.models import learning_rate

    traces = []
    step = model.train_step
    model.train_step = lambda batch: traces.append(1) or step(batch)  # runs once per trace (graph mode)
    steps = -(-len(data.x["train"]) // exp.train.batch_size)
    train.compile_model(model, exp, p.runtime, learning_rate(exp.optimizer, exp.schedule, steps, 1), "sparse_categorical_crossentropy", steps)
    train.fit(model, exp, data, p.runtime, 42, 1)
    assert len(traces) == 1
