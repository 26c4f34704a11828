"""The benchmarks' own pieces: the critical-path step is the SGD step Keras computes."""
from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest

from components.config import load_params
from components.models import build_model

from .conftest import ROOT


def _benchmark(name: str):
    """A script of benchmarks/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _critical_path():
    return _benchmark("critical_path")


def _deep_spec(p, units=(30, 20), repeat=4):
    spec = p.experiments["selu_deep"].model
    first, rest = spec.hidden
    return spec.model_copy(update={"hidden": [first.model_copy(update={"units": units[0]}),
                                              rest.model_copy(update={"units": units[1], "repeat": repeat})]})


def test_critical_path_is_the_first_layers_sgd_update():
    """The critical-path benchmark runs what an SGD step's first-layer update waits on: its new first kernel equals
    the one Keras' own SGD step computes from the same weights and batch (so no layer, activation or loss term is
    missing from the chain), and the model itself is left untouched."""
    import tensorflow as tf

    cp = _critical_path()
    p = load_params(ROOT / "params.yaml")
    scaler = (np.full(784, 72.9, np.float32), np.full(784, 89.9, np.float32))
    model = build_model(_deep_spec(p), scaler=scaler, seed=5)
    lr = 0.05
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.SGD(lr))
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (16, 784)).astype(np.uint8)
    y = rng.integers(0, 10, 16).astype(np.int64)
    before = model.get_weights()
    expected_loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, model(x)).numpy()))
    step, w1 = cp.critical_path(model, model.loss, lr)
    loss = float(tf.function(step)(x, y))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights())), "the benchmark must not train the model"
    first = cp.dense_chain(model)[1][0]
    model.train_on_batch(x, y)
    keras_w1 = first.kernel.numpy()
    moved = np.abs(keras_w1 - before[0]).max()
    assert moved > 1e-4, "the SGD step should move the first kernel"
    np.testing.assert_allclose(w1.numpy(), keras_w1, rtol=0, atol=moved * 1e-4)
    assert abs(loss - expected_loss) < 1e-5 * expected_loss, (loss, expected_loss)

    # the runner chains consecutive batches of the training rows
    run = cp.chain_runner(step, np.repeat(x, 3, axis=0), np.repeat(y, 3), 16)
    assert np.isfinite(float(run(tf.constant(3))))
    assert not np.array_equal(w1.numpy(), keras_w1), "three more steps should move the copy again"


def test_critical_path_names_a_layer_it_does_not_model():
    p = load_params(ROOT / "params.yaml")
    model = build_model(p.experiments["bn_after"].model, seed=5)
    with pytest.raises(ValueError, match="input_bn"):
        _critical_path().dense_chain(model)
