"""MC dropout: dropout samples, BN stays in inference mode, the statistics are right."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from components.config import ModelSpec
from components.mc_dropout import analyse, calibration, mc_predict, rejection_curve
from components.models import build_model, to_mc


@pytest.fixture(scope="module")
def bn_dropout_model():
    spec = ModelSpec.model_validate({"hidden": [{"units": 32}, {"units": 16}], "activation": "relu",
                                     "batch_norm": "after", "dropout": {"kind": "dropout", "rate": 0.3}})
    model = build_model(spec, seed=1)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (256, 784)).astype(np.float32)
    model.fit(x, rng.integers(0, 10, 256), epochs=1, verbose=0)  # BN moving stats move away from 0/1
    return model, x


def bn_state(model):
    return [v.numpy().copy() for l in model.layers if isinstance(l, keras.layers.BatchNormalization) for v in (l.moving_mean, l.moving_variance)]


def test_bn_statistics_untouched_and_samples_vary(bn_dropout_model):
    model, x = bn_dropout_model
    mc = to_mc(model)
    before = bn_state(mc)
    probs = mc_predict(mc, x[:50], samples=20, batch_rows=16)
    assert probs.shape == (20, 50, 10)
    for a, b in zip(before, bn_state(mc)):
        np.testing.assert_array_equal(a, b)
    assert probs.std(axis=0).mean() > 1e-3, "MC samples should differ"
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    d1, d2 = model.predict(x[:50], verbose=0), model.predict(x[:50], verbose=0)
    np.testing.assert_array_equal(d1, d2)  # deterministic inference does not vary


def test_bn_in_inference_mode_inside_mc(bn_dropout_model):
    """With dropout rate forced to 0, the MC twin must equal the deterministic model (BN uses moving stats)."""
    model, x = bn_dropout_model
    mc = to_mc(model)
    for l in mc.layers:
        if "dropout" in l.name:
            l.rate = 0.0
    np.testing.assert_allclose(mc(x[:20], training=False).numpy(), model(x[:20], training=False).numpy(), rtol=1e-5, atol=1e-6)


def test_calibration_and_rejection_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    y = np.array([0, 1, 1, 0])
    cal = calibration(probs, y, bins=2)  # bin [0.5,1): conf .9 .6 .8 .55 all in the upper bin
    assert cal["ece"] == pytest.approx(abs(0.5 - np.mean([0.9, 0.6, 0.8, 0.55])))
    rej = rejection_curve(probs, y, [0.5])
    assert rej["0.0"] == 0.5 and rej["0.5"] == 1.0  # the two most uncertain are the two mistakes


def test_analyse_binary_and_per_class():
    det = np.array([[0.9], [0.2], [0.7]])  # sigmoid outputs
    mc = np.stack([det, det * 0.5, det])
    res = analyse(det, mc, np.array([1, 0, 0]), ["Sandal", "Shirt"], bins=5, fractions=[0.3])
    assert res["deterministic_accuracy"] == pytest.approx(2 / 3)
    assert set(res["per_class"]) == {"Sandal", "Shirt"}
