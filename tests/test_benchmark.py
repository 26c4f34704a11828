"""The benchmark's plain side is the textbook model: Keras' own Dense layers, the builder's weights."""
from __future__ import annotations

import importlib.util

import keras
import numpy as np

from components.config import load_params
from components.models import InPlaceDense, build_model

from .conftest import ROOT


def _fit_speed():
    spec = importlib.util.spec_from_file_location("fit_speed", ROOT / "benchmarks/fit_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_model_is_the_builders_model_with_keras_dense_layers():
    """No InPlaceDense (a speed-up of the pipeline's) is left in the plain fit's model; its layers, names,
    initial weights and outputs are the builder's."""
    p = load_params(ROOT / "params.yaml")
    scaler = (np.full(784, 72.9, np.float32), np.full(784, 89.9, np.float32))
    model = build_model(p.experiments["init_he_normal"].model, scaler=scaler, seed=5)
    assert sum(isinstance(layer, InPlaceDense) for layer in model.layers) == 3
    plain = _fit_speed().textbook(model)
    dense = [layer for layer in plain.layers if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 4 and all(type(layer) is keras.layers.Dense for layer in dense)
    assert [layer.name for layer in plain.layers] == [layer.name for layer in model.layers]
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), plain.get_weights()))
    x = np.random.default_rng(0).integers(0, 256, (16, 784)).astype(np.float32)
    assert np.array_equal(plain(x).numpy(), model(x).numpy())
