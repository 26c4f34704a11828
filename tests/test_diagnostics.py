"""Gradient / activation health (components/diagnostics.py), the NumPy SELU simulation and the report's
verdict and reproduction sections, on tiny slices of the real Fashion-MNIST."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from components import diagnostics, experiment, report, selu_simulation, train
from components.config import Diagnostics, ParamsError, load_params

from .conftest import ROOT, ws_params


@pytest.fixture(scope="module")
def probe_data(tiny_ws):
    data = train.load_task(tiny_ws / "data/splits", "full")
    return data.x["train"][:300], data.y["train"][:300]


def keras_net(depth: int, units: int, activation: str, init, scaler=None, n_out: int = 10):
    import keras

    from components.models import input_scaling

    layers = [keras.Input((784,)), input_scaling(scaler)]
    layers += [keras.layers.Dense(units, activation=activation, kernel_initializer=init(i)) for i in range(depth)]
    layers.append(keras.layers.Dense(n_out, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(seed=0)))
    model = keras.Sequential(layers)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.SGD(1e-3))
    return model


def fit_with_health(model, x, y, cfg: Diagnostics, epochs: int = 1) -> diagnostics.GradientHealth:
    cb = diagnostics.GradientHealth(x, y, cfg, label="test")
    model.fit(x.astype(np.float32), y, batch_size=32, epochs=epochs, callbacks=[cb], shuffle=False, verbose=0)
    return cb


def test_deep_sigmoid_with_a_tiny_init_is_vanishing(probe_data):
    import keras

    x, y = probe_data
    model = keras_net(24, 32, "sigmoid", lambda i: keras.initializers.RandomNormal(stddev=0.05, seed=i))
    cfg = Diagnostics(enabled=True, probe_rows=128)
    cb = fit_with_health(model, x, y, cfg)
    v = diagnostics.verdict(cb.records, cfg)
    assert v["verdict"] == "vanishing", v
    assert v["first_to_last_grad_rms_ratio"] < cfg.thresholds.vanishing_ratio  # dies on the way down, not only collapse
    assert sorted({r.epoch for r in cb.records}) == [0, 1] and v["verdict_per_epoch"] == {"0": "vanishing", "1": "vanishing"}
    assert len(cb.records) == 2 * 25  # 24 hidden + output, per diagnosed epoch


def test_deep_selu_with_lecun_init_and_standardized_inputs_is_healthy(tiny_ws, probe_data):
    import keras

    from components.standardize import load_scaler

    x, y = probe_data
    scaler = load_scaler(tiny_ws / "data/scaler.npz")
    model = keras_net(30, 100, "selu", lambda i: keras.initializers.LecunNormal(seed=i), scaler=scaler)
    cfg = Diagnostics(enabled=True, probe_rows=256)
    v = diagnostics.verdict(fit_with_health(model, x, y, cfg).records, cfg)
    assert v["verdict"] == "healthy", v
    assert v["act_mean_max_abs"] < 0.3 and 0.6 < v["act_std_range"][0] and v["act_std_range"][1] < 1.5, v


def test_deep_relu_activations_collapse(tiny_ws, probe_data):
    """The book's 100-layer ReLU net (he_normal, standardized inputs), at initialization: the forward signal collapses."""
    from components.models import build_model
    from components.standardize import load_scaler

    p = ws_params(tiny_ws)
    x, y = probe_data
    model = build_model(p.experiments["relu_deep"].model, scaler=load_scaler(tiny_ws / "data/scaler.npz"), seed=42)
    cfg = p.experiments["relu_deep"].train.diagnostics
    records = diagnostics.Probe(model, x[:256].astype(np.float32), y[:256], "sparse_categorical_crossentropy").measure(0)
    v = diagnostics.verdict(records, cfg)
    assert v["verdict"] == "vanishing" and "collapse" in v["reason"], v
    assert [r.layer for r in records][:2] == ["dense_001", "dense_002"] and records[-1].layer == "output"


def test_run_verdict_is_the_worst_epoch_and_says_when_it_recovered():
    def rec(epoch, depth, g, std):
        return diagnostics.LayerRecord(epoch, depth, f"dense_{depth:02d}", g, g, 0.0, std)

    collapsed = [rec(0, 1, 1.0, 0.8), rec(0, 2, 0.5, 0.01)]  # activation std 0.01 < min_act_std
    fine = [rec(e, d, 1.0, 1.0) for e in (1, 2) for d in (1, 2)]
    v = diagnostics.verdict(collapsed + fine, Diagnostics())
    assert (v["verdict"], v["verdict_epoch"], v["healthy_from_epoch"]) == ("vanishing", 0, 1)
    assert v["verdict_per_epoch"] == {"0": "vanishing", "1": "healthy", "2": "healthy"}
    assert diagnostics.verdict(fine, Diagnostics())["verdict"] == "healthy"
    exploding = [rec(3, 1, 1e4, 1.0), rec(3, 2, 1.0, 1.0)]  # first/last ratio 1e4 > exploding_ratio
    assert diagnostics.verdict(collapsed + fine + exploding, Diagnostics())["verdict"] == "exploding"


def test_callback_gradient_norms_equal_a_direct_gradient_tape(probe_data):
    import keras
    import tensorflow as tf

    x, y = probe_data
    model = keras_net(4, 64, "elu", lambda i: keras.initializers.HeNormal(seed=i))
    cfg = Diagnostics(enabled=True, probe_rows=100)
    cb = fit_with_health(model, x, y, cfg, epochs=2)
    idx = diagnostics.probe_indices(len(x), cfg.probe_rows)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0)
    xp, yp = tf.constant(x[idx].astype(np.float32)), tf.constant(y[idx])
    kernels = [layer.kernel for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(yp, model(xp, training=False)))
    expected = [float(tf.norm(g)) for g in tape.gradient(loss, kernels)]
    got = [r.grad_norm for r in cb.records if r.epoch == 2]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    h1 = keras.Model(model.inputs, model.layers[1].output)(xp).numpy()  # first hidden Dense (after the input scaling)
    first = next(r for r in cb.records if r.epoch == 2 and r.depth == 1)
    np.testing.assert_allclose([first.act_mean, first.act_std], [h1.mean(0).mean(), h1.std(0).mean()], rtol=1e-4)


@pytest.mark.parametrize("name", ["dropout", "bn_after"])
def test_diagnostics_on_or_off_give_bit_identical_weights(tiny_ws, name):
    runs = {}
    for on in (False, True):
        p = ws_params(tiny_ws, **{f"experiments.{name}.train.epochs": 2, f"experiments.{name}.train.diagnostics.enabled": on})
        exp = p.experiments[name]
        data = train.load_task(tiny_ws / "data/splits", exp.task)
        model, metrics, _, extras = experiment.train_experiment(name, exp, p, data, experiment.load_scaler_if(exp, tiny_ws / "data/scaler.npz"))
        extras["checkpoint"].clear()
        runs[on] = (model.get_weights(), metrics)
    assert "diagnostics" not in runs[False][1] and runs[True][1]["diagnostics"]["verdict"] in ("healthy", "vanishing", "exploding")
    assert all(np.array_equal(a, b) for a, b in zip(runs[False][0], runs[True][0])), "diagnostics changed the trained weights"
    assert runs[False][1]["test_loss"] == runs[True][1]["test_loss"]


def test_experiment_step_writes_csv_heatmap_verdict_and_mlflow_metrics(tiny_ws):
    from mlflow import MlflowClient

    from components import tracking
    from components.io import read_json

    name = "selu_shallow"
    p = ws_params(tiny_ws, **{f"experiments.{name}.train.epochs": 2, f"experiments.{name}.train.diagnostics.enabled": True,
                              "mlflow.log_models": False})
    d = tiny_ws / "out" / "diag"
    out = {"model_path": d / f"{name}.keras", "metrics_path": d / f"{name}.json", "history_path": d / f"{name}.csv",
           "artifacts_dir": d / name, "diagnostics_path": d / "diagnostics" / f"{name}.csv"}
    experiment.run(p, name, tiny_ws / "data/splits", tiny_ws / "data/scaler.npz", **out)
    rows = list(csv.DictReader(open(out["diagnostics_path"])))
    assert list(rows[0]) == list(diagnostics.COLUMNS)
    assert len(rows) == 3 * 3 and {r["epoch"] for r in rows} == {"0", "1", "2"}  # 2 hidden + output, epochs 0..2
    assert (out["artifacts_dir"] / "diagnostics.png").stat().st_size > 1000
    m = read_json(out["metrics_path"])
    assert m["diagnostics"]["verdict"] == "healthy", m["diagnostics"]
    hist = MlflowClient(tracking.tracking_uri()).get_metric_history(m["mlflow_run_id"], "grad_norm/dense_01")
    assert sorted(h.step for h in hist) == [0, 1, 2]
    # diagnostics off: the DVC plot file still exists, with the header only
    experiment.run(ws_params(tiny_ws, **{"mlflow.enabled": False}), "act_relu", tiny_ws / "data/splits", tiny_ws / "data/scaler.npz",
                   **{**out, "metrics_path": d / "off.json", "model_path": d / "off.keras",
                      "diagnostics_path": d / "diagnostics" / "off.csv"})
    assert (d / "diagnostics" / "off.csv").read_text().strip() == ",".join(diagnostics.COLUMNS)


def test_schema_validates_diagnostics():
    with pytest.raises(ParamsError, match="vanishing_ratio must be smaller"):
        load_params(ROOT / "params.yaml", ["experiments.selu_deep.train.diagnostics.thresholds.vanishing_ratio=1000"])
    with pytest.raises(ParamsError, match="unknown key.*probe_row"):
        load_params(ROOT / "params.yaml", ["experiments.selu_deep.train.diagnostics.probe_row=3"])
    p = load_params(ROOT / "params.yaml")
    assert p.experiments["selu_deep"].train.diagnostics.enabled and p.experiments["relu_deep"].train.diagnostics.enabled
    assert not p.experiments["elu"].train.diagnostics.enabled


# ------------------------------------------------------------------------------------------ simulation

def test_selu_simulation_self_normalizes_while_relu_and_sigmoid_do_not(tmp_path):
    p = load_params(ROOT / "params.yaml", ["selu_simulation.layers=300", "selu_simulation.activations=[selu,relu,sigmoid]"])
    out = {"csv_path": tmp_path / "sim.csv", "figure_path": tmp_path / "sim.png", "metrics_path": tmp_path / "sim.json"}
    summary = selu_simulation.run(p, **out)
    rows = list(csv.DictReader(open(out["csv_path"])))
    assert len(rows) == 300 and list(rows[0]) == ["layer", "selu_mean", "selu_std", "relu_mean", "relu_std", "sigmoid_mean", "sigmoid_std"]
    assert out["figure_path"].stat().st_size > 1000
    assert list(summary["selu"]["at_layer"]) == ["0", "100", "200"]
    assert summary["selu_self_normalizes"]
    assert summary["selu"]["max_abs_mean"] < 0.25 and 0.5 < summary["selu"]["std_range"][0] < summary["selu"]["std_range"][1] < 1.5
    assert summary["relu"]["last_layer"]["std"] < 0.1 and summary["sigmoid"]["last_layer"]["std"] < 0.1


def test_selu_simulation_is_the_books_loop():
    """Same RNG stream as the book's np.random.seed(42) loop: layer 100 prints 'mean 0.02, std deviation 0.96'."""
    p = load_params(ROOT / "params.yaml", ["selu_simulation.layers=101"])
    c = selu_simulation.simulate(p.selu_simulation, "selu")
    assert c.shape == (101, 2)
    assert f"{c[0, 0]:.2f}" in ("0.00", "-0.00") and f"{c[0, 1]:.2f}" == "1.00"
    assert (f"{c[100, 0]:.2f}", f"{c[100, 1]:.2f}") == ("0.02", "0.96")


# ------------------------------------------------------------------------------------------ report

def _verdict(v: str, ratio: float, min_std: float, last_grad: float, healthy_from: int | None = None) -> dict:
    return {"verdict": v, "reason": "r", "first_to_last_grad_rms_ratio": ratio, "min_hidden_act_std": min_std,
            "verdict_epoch": 0, "healthy_from_epoch": healthy_from,
            "act_mean_last_hidden": 0.01, "act_std_last_hidden": min_std, "first_hidden_grad_norm": 1.0,
            "last_hidden_grad_norm": last_grad, "act_mean_max_abs": 0.05, "act_std_range": [min_std, 1.0]}


def test_report_shows_verdicts_and_the_reproduction_table():
    p = load_params(ROOT / "params.yaml")
    base = {"epochs": 5, "batch_size": 32, "train_accuracy": 0.8, "valid_accuracy": 0.8, "test_accuracy": 0.8,
            "valid_loss": 0.5, "test_loss": 0.5, "seconds_per_epoch": 1.0}
    experiments = {"selu_deep": {**base, "diagnostics": _verdict("healthy", 3.0, 0.9, 1.0)},
                   "relu_deep": {**base, "diagnostics": _verdict("vanishing", 3.5, 0.014, 0.04, healthy_from=1)},
                   "opt_adam": {**base, "epochs": 10}}
    histories = {"selu_deep": [{"epoch": e, "val_accuracy": 0.80} for e in range(1, 6)],
                 "relu_deep": [{"epoch": e, "val_accuracy": 0.45} for e in range(1, 6)]}
    per_seed = {"42": {"model_b_test_accuracy": 0.95, "test_accuracy": 0.97, "error_rate_reduction": 1.6}}
    transfer = {"model_a": {"test_accuracy": 0.9},
                "model_b": {"test_accuracy_mean": 0.95, "test_accuracy_std": 0.01},
                "b_on_a": {"test_accuracy_mean": 0.97, "test_accuracy_std": 0.005, "error_rate_reduction_mean": 1.6,
                           "error_rate_reduction_std": 0.4, "per_seed": per_seed, "seeds": [42, 43], "transfer_helped_seeds": 1}}
    sim = {"layers": 1000, "selu": {"at_layer": {"0": {"mean": 0.0, "std": 1.0}}}, "selu_self_normalizes": True}
    out, md = report.build_report(p, experiments, histories, transfer, {}, {}, report.load_book_values(), sim)
    assert out["gradient_health"]["relu_deep"]["verdict"] == "vanishing"
    assert "| relu_deep | **vanishing** (epoch 0; healthy from epoch 1) |" in md and "| selu_deep | **healthy** (epoch 0) |" in md
    assert "The ReLU net recovers: healthy from epoch 1 on" in md
    assert "SELU keeps mean ≈ 0 and std ≈ 1" in md
    repro = {r["experiment"]: r for r in out["reproduction"]}
    assert repro["selu_deep"]["book"] == [0.8126] and repro["selu_deep"]["diff"] == pytest.approx(0.80 - 0.8126)
    assert repro["relu_deep"]["diff"] == pytest.approx(0.45 - 0.6082) and "below" in repro["relu_deep"]["note"]
    assert repro["opt_adam"]["book"] == [] and "no value printed" in repro["opt_adam"]["note"]
    assert repro["model_b"]["ours_std"] == 0.01 and repro["model_b"]["n"] == 2 and repro["model_b"]["diff"] == 0.0
    assert repro["transfer_factor"]["book"] == [4.0] and repro["transfer_factor"]["diff"] == pytest.approx(1.6 - 4.0)
    assert "## Reproduction: ours vs the seed documents" in md and "×1.60 ± 0.40 (n=2)" in md
