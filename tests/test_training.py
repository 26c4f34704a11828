"""Training is deterministic, stops on NaN without writing a model, and resumes after kill -9."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from components import experiment, train

from .conftest import ROOT, cli_sets, run, ws_params


def outputs(ws: Path, name: str, tag: str) -> dict[str, Path]:
    d = ws / "out" / tag
    return {"model_path": d / f"{name}.keras", "metrics_path": d / f"{name}.json",
            "history_path": d / f"{name}.csv", "artifacts_dir": d / name, "diagnostics_path": d / "diagnostics" / f"{name}.csv"}


def train_in_process(ws, name, seed=42, **upd):
    """An uninterrupted run of one experiment in this process: (model, metrics, history, extras)."""
    p = ws_params(ws, seed=seed, **upd)
    data = train.load_task(ws / "data/splits", p.experiments[name].task)
    exp = p.experiments[name]
    model, metrics, history, extras = experiment.train_experiment(name, exp, p, data, experiment.load_scaler_if(exp, ws / "data/scaler.npz"))
    extras["checkpoint"].clear()
    return model, metrics, history, extras


def train_weights(ws, name, seed=42, **upd):
    model, metrics, _, _ = train_in_process(ws, name, seed, **upd)
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


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tiny_ws, tmp_path):
    name = "dropout"  # dropout RNG state and Nadam slots must survive the restart too; so must the diagnostics
    sets = {f"experiments.{name}.train.epochs": 4, f"experiments.{name}.train.diagnostics.enabled": "true"}
    args = [sys.executable, "-m", "components", "experiment", name] + cli_sets(sets)
    killed = run(args, cwd=tiny_ws, check=False, PYTHONPATH=str(ROOT), CH11_FAULT_KILL_AFTER_EPOCH="2")
    assert killed.returncode in (-9, 137), killed.stderr[-2000:]
    assert not (tiny_ws / f"models/experiments/{name}.keras").exists()
    assert list((tiny_ws / ".checkpoints").glob(f"{name}-*/state.json"))
    resumed = run(args, cwd=tiny_ws, PYTHONPATH=str(ROOT))
    assert "resuming after epoch 2/4" in resumed.stderr
    assert "epoch 1/4" not in resumed.stderr and "epoch 3/4" in resumed.stderr
    assert not list((tiny_ws / ".checkpoints").glob(f"{name}-*")), "resume state should be cleared after success"
    import keras

    from components import diagnostics  # noqa: F401

    got = keras.models.load_model(tiny_ws / f"models/experiments/{name}.keras").get_weights()
    model, _, _, extras = train_in_process(tiny_ws, name, **sets)
    assert all(np.array_equal(a, b) for a, b in zip(got, model.get_weights())), "resumed run differs from an uninterrupted one"
    diagnostics.write_csv(tmp_path / "ref.csv", extras["diagnostics"])
    assert {r.epoch for r in extras["diagnostics"]} == {0, 1, 2, 3, 4}
    assert (tiny_ws / f"plots/diagnostics/{name}.csv").read_text() == (tmp_path / "ref.csv").read_text(), \
        "the resumed run's gradient diagnostics differ from an uninterrupted run's (an epoch lost at the kill?)"


def _history(ws: Path, name: str) -> list[dict]:
    import csv

    with open(ws / f"plots/experiments/{name}.csv") as f:
        return list(csv.DictReader(f))


def test_resume_keeps_the_counters_of_early_stopping_and_reduce_lr_on_plateau(tiny_ws, tmp_path):
    """A kill -9 in the middle of a patience window, and one right after the epoch where early stopping fired:
    both resumed runs stop, and lower the learning rate, exactly when the uninterrupted run does."""
    name = "lr_performance"  # ReduceLROnPlateau; early stopping and diagnostics added below
    sets = {f"experiments.{name}.train.epochs": 8, f"experiments.{name}.schedule.patience": 1,
            f"experiments.{name}.train.diagnostics.enabled": "true",
            f"experiments.{name}.train.early_stopping": "{monitor: val_loss, patience: 3, restore_best_weights: true}"}
    model, _, ref_hist, extras = train_in_process(tiny_ws, name, **sets)
    ref_w = model.get_weights()
    from components import diagnostics

    diagnostics.write_csv(tmp_path / "ref.csv", extras["diagnostics"])
    lrs = [h["learning_rate"] for h in ref_hist]
    stopped_at = len(ref_hist)
    # the test means something only if the rate was lowered and training stopped early, after the first kill
    assert stopped_at < 8, f"early stopping did not fire: {ref_hist}"
    lowered = [i + 1 for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1]]  # epochs (1-based) run at a lowered rate
    assert lowered, f"the learning rate was never lowered: {lrs}"
    first_kill = lowered[0] - 1  # right after ReduceLROnPlateau lowered the rate, inside early stopping's patience
    assert 0 < first_kill < stopped_at
    args = [sys.executable, "-m", "components", "experiment", name] + cli_sets(sets)
    import keras

    for kill_after in (first_kill, stopped_at):
        killed = run(args, cwd=tiny_ws, check=False, PYTHONPATH=str(ROOT), CH11_FAULT_KILL_AFTER_EPOCH=str(kill_after))
        assert killed.returncode in (-9, 137), killed.stderr[-2000:]
        resumed = run(args, cwd=tiny_ws, PYTHONPATH=str(ROOT))
        assert f"resuming after epoch {kill_after}/8" in resumed.stderr, resumed.stderr[-2000:]
        got = keras.models.load_model(tiny_ws / f"models/experiments/{name}.keras").get_weights()
        assert all(np.array_equal(a, b) for a, b in zip(got, ref_w)), f"killed after epoch {kill_after}: resumed run differs"
        hist = _history(tiny_ws, name)
        assert len(hist) == stopped_at, f"killed after epoch {kill_after}: {len(hist)} epochs, not {stopped_at}"
        assert [float(h["learning_rate"]) for h in hist] == lrs, f"killed after epoch {kill_after}: other learning rates"
        assert (tiny_ws / f"plots/diagnostics/{name}.csv").read_text() == (tmp_path / "ref.csv").read_text(), \
            f"killed after epoch {kill_after}: other gradient diagnostics"


def test_checkpoint_round_trips_callback_counters(tmp_path):
    import keras

    from components.config import ModelSpec
    from components.models import build_model

    model = build_model(ModelSpec(hidden=[{"units": 4}], activation="relu"), seed=1)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
    es = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
    rl = keras.callbacks.ReduceLROnPlateau(patience=2)
    es.wait, es.best, es.best_epoch, es.stopped_epoch = 2, np.float32(0.25), 4, 0
    es.best_weights = [w + 1 for w in model.get_weights()]
    rl.wait, rl.best, rl.cooldown_counter = 1, 0.5, 0
    ckpt = train.Checkpoint(tmp_path / "c")
    ckpt.save(model, 5, [{"epoch": 5}], [object(), rl, es], stopped=True)
    es2, rl2 = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True), keras.callbacks.ReduceLROnPlateau(patience=2)
    for cb in (es2, rl2):
        cb.on_train_begin()  # what fit does first: resets every counter
    restored = ckpt.load(model)
    assert restored is not None and restored.epoch == 5 and restored.stopped
    restored.apply([object(), rl2, es2])
    assert (es2.wait, es2.best, es2.best_epoch, rl2.wait, rl2.best) == (2, 0.25, 4, 1, 0.5)
    assert all(np.array_equal(a, b) for a, b in zip(es2.best_weights, es.best_weights))


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


@pytest.mark.parametrize("n, first_epoch, epochs", [(70, 0, 2), (64, 1, 3), (10, 0, 2), (200, 2, 4)])
def test_batches_are_the_epochs_order_in_slices_of_batch_size(n, first_epoch, epochs):
    """Each epoch's batches are its (seed, epoch) row order cut into batches, the remainder last, the images still
    uint8 (the model converts them); a resumed fit (first_epoch > 0) gets the same batches as an uninterrupted one."""
    x = (np.arange(n * 6) * 7 % 251).astype(np.uint8).reshape(n, 6)
    y = np.arange(n, dtype=np.int32)
    got = [(bx.numpy(), by.numpy()) for bx, by in train.train_dataset(x, y, 32, 7, first_epoch, epochs)]
    want = []
    for e in range(first_epoch, epochs):
        order = train.epoch_permutation(7, e, n)
        want += [(x[order[i:i + 32]], y[order[i:i + 32]]) for i in range(0, n, 32)]
    assert len(got) == len(want) == (epochs - first_epoch) * -(-n // 32)
    for (gx, gy), (wx, wy) in zip(got, want):
        assert gx.dtype == np.uint8
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)


def test_the_runtime_profile_follows_where_the_step_runs(monkeypatch):
    """This box's tuning locally; TensorFlow's defaults in a Kubeflow pod (Kubernetes sets KUBERNETES_SERVICE_HOST)."""
    from components.config import ParamsError, load_params, where_running

    p = load_params(ROOT / "params.yaml")
    monkeypatch.delenv("CH11_RUNTIME_PROFILE", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert where_running() == "local" and p.runtime.tuning.intra_op_threads == 1
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert where_running() == "cluster"
    t = p.runtime.tuning
    assert (t.intra_op_threads, t.inter_op_threads) == (0, 0)
    monkeypatch.setenv("CH11_RUNTIME_PROFILE", "laptop")
    with pytest.raises(ParamsError, match="CH11_RUNTIME_PROFILE"):
        where_running()


def test_the_cluster_profile_trains_the_same_model(tiny_ws):
    """The cluster profile (TensorFlow's default threads) trains the same network: the same layers, and
    weights equal to the local profile's within rounding (threads change the order of float sums, not the math)."""
    import keras

    name = "leaky_relu"
    weights, kinds = [], []
    for profile in ("local", "cluster"):
        run([sys.executable, "-m", "components", "experiment", name, "-S", f"experiments.{name}.train.epochs=1"],
            cwd=tiny_ws, PYTHONPATH=str(ROOT), CH11_RUNTIME_PROFILE=profile)
        model = keras.models.load_model(tiny_ws / f"models/experiments/{name}.keras")
        weights.append(model.get_weights())
        kinds.append([type(layer).__name__ for layer in model.layers])
    assert kinds[0] == kinds[1]
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
