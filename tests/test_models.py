"""The one builder: every spec in params.yaml builds into the network the book describes."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import yaml

from components.config import ParamsError, load_params, validate_params
from components.models import build_model, build_optimizer, learning_rate, to_mc

from .conftest import ROOT

SCALER = (np.zeros(784, np.float32), np.ones(784, np.float32))


@pytest.fixture(scope="module")
def P():
    return load_params(ROOT / "params.yaml")


def kinds(model) -> list[str]:
    return [type(l).__name__ for l in model.layers]


def test_every_spec_in_params_builds(P):
    specs = dict(P.experiments, model_a=P.transfer.model_a, model_b=P.transfer.model_b)
    for name, exp in specs.items():
        m = build_model(exp.model, exp.task, scaler=SCALER if exp.train.inputs == "standardized" else None, seed=1)
        dense = [l for l in m.layers if isinstance(l, keras.layers.Dense)]
        assert len(dense) == exp.model.depth + 1, name
        assert m.output_shape[-1] == {"full": 10, "a": 8, "b": 1}[exp.task], name
        build_optimizer(exp.optimizer, 1e-3)


def test_deep_nets_have_100_hidden_layers(P):
    for name in ("selu_deep", "relu_deep"):
        m = build_model(P.experiments[name].model, scaler=SCALER)
        units = [l.units for l in m.layers if isinstance(l, keras.layers.Dense)]
        assert units == [300] + [100] * 99 + [10]


def test_batch_norm_placement(P):
    before = kinds(build_model(P.experiments["bn_before"].model))
    after = kinds(build_model(P.experiments["bn_after"].model))
    assert before == ["Rescaling", "BatchNormalization", "Dense", "BatchNormalization", "Activation",
                      "Dense", "BatchNormalization", "Activation", "Dense"]
    assert after == ["Rescaling", "BatchNormalization", "Dense", "BatchNormalization", "Dense", "BatchNormalization", "Dense"]
    mb = build_model(P.experiments["bn_before"].model)
    assert [l.use_bias for l in mb.layers if isinstance(l, keras.layers.Dense)] == [False, False, True]
    ma = build_model(P.experiments["bn_after"].model)
    assert [l.activation.__name__ for l in ma.layers if isinstance(l, keras.layers.Dense)] == ["relu", "relu", "softmax"]


def test_dropout_models(P):
    d = kinds(build_model(P.experiments["dropout"].model, scaler=SCALER))
    assert d == ["Normalization", "Dropout", "Dense", "Dropout", "Dense", "Dropout", "Dense"]
    a = build_model(P.experiments["alpha_dropout"].model, scaler=SCALER)
    assert kinds(a).count("AlphaDropout") == 3 and all(l.rate == 0.2 for l in a.layers if "dropout" in l.name)
    mc = to_mc(a)
    assert kinds(mc).count("MCAlphaDropout") == 3
    for w1, w2 in zip(a.get_weights(), mc.get_weights()):
        np.testing.assert_array_equal(w1, w2)


def test_activations_initializers_regularizers(P):
    leaky = build_model(P.experiments["leaky_relu_0_2"].model)
    assert [l.negative_slope for l in leaky.layers if isinstance(l, keras.layers.LeakyReLU)] == [0.2, 0.2]
    assert kinds(build_model(P.experiments["prelu"].model)).count("PReLU") == 2
    vs = build_model(P.experiments["init_variance_scaling"].model).layers[1 + 0 + 1].kernel_initializer
    assert (vs.scale, vs.mode, vs.distribution) == (2.0, "fan_avg", "uniform")
    l2 = build_model(P.experiments["l2"].model, scaler=SCALER)
    regs = [l.kernel_regularizer for l in l2.layers if isinstance(l, keras.layers.Dense)]
    assert all(r is not None and np.isclose(r.l2, 0.01) and r.l1 == 0 for r in regs)  # output too, as in the book
    mn = build_model(P.experiments["max_norm"].model, scaler=SCALER)
    cons = [l.kernel_constraint for l in mn.layers if isinstance(l, keras.layers.Dense)]
    assert [type(c).__name__ if c else None for c in cons] == ["MaxNorm", "MaxNorm", None]


def test_same_seed_same_initial_weights(P):
    spec = P.experiments["elu"].model
    a, b, c = build_model(spec, seed=3), build_model(spec, seed=3), build_model(spec, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


def test_optimizers_are_the_books(P):
    expect = {
        "opt_sgd": ("SGD", {"momentum": 0.0, "nesterov": False}), "opt_momentum": ("SGD", {"momentum": 0.9}),
        "opt_nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}), "opt_adagrad": ("Adagrad", {}),
        "opt_rmsprop": ("RMSprop", {"rho": 0.9}), "opt_adam": ("Adam", {"beta_1": 0.9, "beta_2": 0.999}),
        "opt_adamax": ("Adamax", {}), "opt_nadam": ("Nadam", {"beta_1": 0.9}), "opt_adamw": ("AdamW", {"weight_decay": 1e-5}),
        "clip_value": ("SGD", {"clipvalue": 1.0}), "clip_norm": ("SGD", {"clipnorm": 1.0}),
    }
    for name, (cls, attrs) in expect.items():
        opt = build_optimizer(P.experiments[name].optimizer, P.experiments[name].optimizer.learning_rate)
        assert type(opt).__name__ == cls, name
        assert np.isclose(float(opt.learning_rate), 1e-3)
        for k, v in attrs.items():
            assert np.isclose(getattr(opt, k), v), (name, k)


def test_schedules(P):
    steps = 1719
    pw = learning_rate(P.experiments["lr_piecewise"].optimizer, P.experiments["lr_piecewise"].schedule, steps, 25)
    assert [float(pw(s)) for s in (0, 5 * steps - 1, 5 * steps + 1, 15 * steps + 1)] == pytest.approx([0.01, 0.01, 0.005, 0.001])
    ex = learning_rate(P.experiments["lr_exponential"].optimizer, P.experiments["lr_exponential"].schedule, steps, 25)
    assert float(ex(20 * steps)) == pytest.approx(0.001, rel=1e-5)
    po = learning_rate(P.experiments["lr_power"].optimizer, P.experiments["lr_power"].schedule, steps, 25)
    assert float(po(10_000)) == pytest.approx(0.005, rel=1e-5)
    oc_exp = P.experiments["lr_1cycle"]
    oc = learning_rate(oc_exp.optimizer, oc_exp.schedule, 430, 25, max_lr=0.05)
    total = 430 * 25
    half = (total - (int(total * 0.1) + 1)) // 2
    assert float(oc(0)) == pytest.approx(0.005)
    assert float(oc(half)) == pytest.approx(0.05)
    assert float(oc(2 * half)) == pytest.approx(0.005, rel=1e-3)
    assert float(oc(total)) == pytest.approx(0.005 / 1000, rel=1e-3)


def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["experiments"]["elu"]["model"].update(activation="relu6"), "'experiments.elu.model.activation.name': Input should be 'relu', "),
        (lambda r: r["experiments"]["elu"].setdefault("train", {}).update(epochs=0), "'experiments.elu.train.epochs': Input should be greater than 0"),
        (lambda r: r["defaults"]["train"].update(epochs=-1), "'experiments.leaky_relu.train.epochs'"),
        (lambda r: r["experiments"]["opt_adam"]["optimizer"].update(momentum=0.9), "'momentum' does not apply to adam"),
        (lambda r: r["experiments"]["elu"]["model"].update(dropuot=0.2), "unknown key 'experiments.elu.model.dropuot'"),
        (lambda r: r["experiments"]["lr_piecewise"]["schedule"].update(values=[0.1, 0.2, 0.3, 0.4]), "values must have exactly one more entry"),
        (lambda r: r["experiments"]["lr_power"]["schedule"].update(kind="cosine"), "experiments.lr_power.schedule"),
        (lambda r: r["mc_dropout"].update(sources=["elu"]), "experiment 'elu' has no dropout to sample"),
        (lambda r: r["transfer"].update(seeds=[]), "'transfer.seeds'"),
        (lambda r: r["runtime"]["local"].update(steps_per_execution="yes"), "'runtime.local.steps_per_execution'"),
    ],
)
def test_invalid_specs_are_named(mutate, expected):
    r = raw()
    mutate(r)
    with pytest.raises(ParamsError) as info:
        validate_params(r)
    assert expected in str(info.value)


def test_every_layer_is_a_keras_layer(P):
    """No class of ours in a model the builder makes: a saved model needs Keras alone."""
    specs = dict(P.experiments, model_a=P.transfer.model_a, model_b=P.transfer.model_b)
    for name, exp in specs.items():
        m = build_model(exp.model, exp.task, scaler=SCALER if exp.train.inputs == "standardized" else None, seed=1)
        foreign = [type(l).__module__ for l in m.layers if not type(l).__module__.startswith("keras.")]
        assert not foreign, (name, foreign)


def test_input_scaling_is_the_scaler_of_the_standardize_step():
    """Raw pixels in: /255 without a scaler; with one, (x / 255 - mean) / std as the standardize step applies it."""
    from components.standardize import apply_scaler, fit_scaler

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 784)).astype(np.uint8)
    x[:, :5] = 7  # constant pixels: std 0 -> 1
    mean, std = fit_scaler(x)
    from components.models import input_scaling

    got = input_scaling((mean, std))(x.astype(np.float32)).numpy()
    np.testing.assert_allclose(got, apply_scaler(x, mean, std), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(input_scaling(None)(x.astype(np.float32)).numpy(), x / 255.0, rtol=1e-6)


def test_a_saved_model_is_plain_and_byte_reproducible(P, tmp_path):
    """Saved without the optimizer (a 1cycle schedule of ours must not be needed to load it), and the same
    weights give the same bytes (no new md5 in dvc.lock)."""
    import hashlib
    import json
    import time
    import zipfile

    from components import train

    exp = P.experiments["lr_1cycle"]
    model = build_model(exp.model, scaler=SCALER, seed=3)
    lr = learning_rate(exp.optimizer, exp.schedule, 100, 2, max_lr=0.1)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=build_optimizer(exp.optimizer, lr))
    train.save_model(model, tmp_path / "a.keras")
    time.sleep(1.1)  # zip time stamps have a resolution of 2 s; the save date in metadata.json of 1 s
    train.save_model(model, tmp_path / "b.keras")
    digest = [hashlib.md5((tmp_path / f).read_bytes()).hexdigest() for f in ("a.keras", "b.keras")]
    assert digest[0] == digest[1]
    config = zipfile.ZipFile(tmp_path / "a.keras").read("config.json").decode()
    assert "OneCycle" not in config and not json.loads(config).get("compile_config")
    loaded = keras.models.load_model(tmp_path / "a.keras")
    assert getattr(loaded, "optimizer", None) is None
    x = np.random.default_rng(0).integers(0, 256, (8, 784)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"
