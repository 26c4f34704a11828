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
    """Layer classes; InPlaceDense reads as Dense (the same layer, another backward order: its own tests below)."""
    return [{"InPlaceDense": "Dense"}.get(type(l).__name__, type(l).__name__) for l in model.layers]


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
    assert before == ["Pixels", "BatchNormalization", "Dense", "BatchNormalization", "Activation",
                      "Dense", "BatchNormalization", "Activation", "Dense"]
    assert after == ["Pixels", "BatchNormalization", "Dense", "BatchNormalization", "Dense", "BatchNormalization", "Dense"]
    mb = build_model(P.experiments["bn_before"].model)
    assert [l.use_bias for l in mb.layers if isinstance(l, keras.layers.Dense)] == [False, False, True]
    ma = build_model(P.experiments["bn_after"].model)
    assert [l.activation.__name__ for l in ma.layers if isinstance(l, keras.layers.Dense)] == ["relu", "relu", "softmax"]


def test_dropout_models(P):
    d = kinds(build_model(P.experiments["dropout"].model, scaler=SCALER))
    assert d == ["Pixels", "Dropout", "Dense", "Dropout", "Dense", "Dropout", "Dense"]
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
        (lambda r: r["runtime"].update(jit_compile="yes"), "'runtime.jit_compile'"),
    ],
)
def test_invalid_specs_are_named(mutate, expected):
    r = raw()
    mutate(r)
    with pytest.raises(ParamsError) as info:
        validate_params(r)
    assert expected in str(info.value)


def test_sharded_dense_is_dense_in_column_blocks(P, tmp_path):
    """Same initial weights, same function, saved, loaded and cloned as itself; only wide layers are sharded."""
    from components.models import ShardedDense

    spec = P.experiments["l2"].model.model_copy(update={"hidden": P.experiments["leaky_relu"].model.hidden})
    plain = build_model(spec, scaler=SCALER, seed=42)
    sharded = build_model(spec, scaler=SCALER, seed=42, shard_min_weights=200_000)
    assert "ShardedDense" not in kinds(plain)
    assert isinstance(sharded.get_layer("dense_1"), ShardedDense) and not isinstance(sharded.get_layer("dense_2"), ShardedDense)
    assert [tuple(v.shape) for v in sharded.get_layer("dense_1").kernels] == [(784, 150), (784, 150)]
    assert np.array_equal(plain.get_layer("dense_1").kernel.numpy(), sharded.get_layer("dense_1").kernel.numpy()), \
        "the blocks must hold the very initial kernel a Dense layer draws"
    x = np.random.default_rng(0).integers(0, 256, (64, 784)).astype(np.float32)
    np.testing.assert_allclose(sharded(x).numpy(), plain(x).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(sum(sharded.losses)), float(sum(plain.losses)), rtol=1e-6)  # l2 over the blocks
    sharded.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert kinds(loaded) == kinds(sharded)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), sharded.get_weights()))
    twin = to_mc(sharded)  # clone_model, as MC dropout and B-on-A use it
    assert kinds(twin) == kinds(sharded) and np.array_equal(twin(x).numpy(), sharded(x).numpy())
    narrow = build_model(P.experiments["opt_sgd"].model, seed=42, shard_min_weights=200_000)  # 784x100: stays Dense
    assert "ShardedDense" not in kinds(narrow)
    # the 100-layer net's 784x300 layer is a fifth of its weights: not sharded at the default share (0.5)
    share = P.runtime.shard_min_share
    assert "ShardedDense" not in kinds(build_model(P.experiments["selu_deep"].model, seed=1, shard_min_weights=200_000, shard_min_share=share))
    assert "ShardedDense" in kinds(build_model(P.experiments["selu_deep"].model, seed=1, shard_min_weights=200_000, shard_min_share=0.1))
    assert "ShardedDense" in kinds(build_model(spec, seed=1, shard_min_weights=200_000, shard_min_share=share))


def test_xla_is_off_for_nets_with_sharded_layers(P):
    """XLA runs one op at a time: the blocks of a sharded layer must run in TensorFlow's executor instead."""
    from components import train

    exp = P.experiments["leaky_relu"]  # 3 layers, no dropout: XLA when not sharded
    for shard_min, jit in ((200_000, False), (0, True)):
        m = build_model(exp.model, seed=1, shard_min_weights=shard_min)
        train.compile_model(m, exp, P.runtime, 1e-3, "sparse_categorical_crossentropy", 100)
        assert m.jit_compile is jit, (shard_min, m.jit_compile)


def test_in_place_dense_where_the_input_gradient_is_needed(P):
    """Plain Dense for a first layer (nothing trainable below it), InPlaceDense for every Dense after one."""
    from components.models import InPlaceDense

    def in_place(m):
        return [isinstance(l, InPlaceDense) for l in m.layers if isinstance(l, keras.layers.Dense)]

    assert in_place(build_model(P.experiments["init_he_normal"].model, seed=1)) == [False, True, True, True]  # base MLP
    assert in_place(build_model(P.experiments["selu_deep"].model, scaler=SCALER)) == [False] + [True] * 100
    assert in_place(build_model(P.experiments["bn_after"].model)) == [True, True, True]  # after the input BN
    sharded = build_model(P.experiments["leaky_relu"].model, seed=1, shard_min_weights=200_000)
    assert kinds(sharded)[1] == "ShardedDense" and in_place(sharded) == [False, True, True]


def _mlp(dense_cls, use_bias: bool = True, n_out: int = 3) -> keras.Sequential:
    layers = [keras.Input((20,))]
    for i, units in enumerate((16, 12)):
        layers.append((keras.layers.Dense if i == 0 else dense_cls)(
            units, activation="selu", use_bias=use_bias, kernel_initializer=keras.initializers.LecunNormal(seed=i),
            bias_initializer=keras.initializers.RandomNormal(seed=10 + i)))
    layers.append(dense_cls(n_out, activation="softmax" if n_out > 1 else "sigmoid",
                            kernel_initializer=keras.initializers.GlorotUniform(seed=9)))
    return keras.Sequential(layers)


@pytest.mark.parametrize("use_bias, n_out", [(True, 3), (False, 3), (True, 1)])
def test_in_place_dense_trains_to_the_bits_of_dense(use_bias, n_out, tmp_path):
    """The same ops in another order: the same gradients and, after 40 SGD steps in a compiled loop, the same
    weights bit for bit as Dense (a one-unit layer too, whose bias Keras adds with a broadcast, not a BiasAdd);
    saved, loaded and cloned as itself."""
    import tensorflow as tf

    from components.models import InPlaceDense

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 20)).astype(np.float32)
    y = rng.integers(0, n_out if n_out > 1 else 2, 64)
    loss_name = "sparse_categorical_crossentropy" if n_out > 1 else "binary_crossentropy"
    models = [_mlp(cls, use_bias, n_out) for cls in (keras.layers.Dense, InPlaceDense)]
    grads = []
    for m in models:
        with tf.GradientTape() as tape:
            loss = keras.losses.get(loss_name)(y if n_out > 1 else y[:, None].astype(np.float32), m(x))
        grads.append([g.numpy() for g in tape.gradient(loss, m.trainable_variables)])
    assert len(grads[1]) == len(models[1].trainable_variables) and all(g is not None for g in grads[1])
    assert all(np.array_equal(a, b) for a, b in zip(*grads)), "InPlaceDense's gradients differ from Dense's"
    for m in models:
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss_name, steps_per_execution=8)
        m.fit(x, y, batch_size=8, epochs=5, shuffle=False, verbose=0)
    plain, in_place = (m.get_weights() for m in models)
    assert not np.array_equal(plain[0], _mlp(keras.layers.Dense, use_bias, n_out).get_weights()[0]), "training moved nothing"
    assert all(np.array_equal(a, b) for a, b in zip(plain, in_place)), "InPlaceDense trained to other weights"
    models[1].save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert [type(l) for l in loaded.layers] == [type(l) for l in models[1].layers]
    assert np.array_equal(loaded(x).numpy(), models[1](x).numpy())
    assert [type(l) for l in to_mc(models[1]).layers] == [type(l) for l in models[1].layers]


def test_in_place_dense_computes_the_weight_gradient_after_the_input_gradient():
    """The point of InPlaceDense: in the traced backward pass each weight-gradient product has the layer's
    input-gradient product as a control input, so the kernel's update (which needs the weight gradient) runs
    when nothing holds the kernel any more and writes in place instead of copying it; and each bias gradient has
    the weight-gradient product as a control input, so that it never becomes ready beside the next input-gradient
    product (TensorFlow's executor would then run the cheap bias gradient first and queue the product)."""
    import tensorflow as tf

    from components.models import InPlaceDense

    for cls, ordered in ((InPlaceDense, True), (keras.layers.Dense, False)):
        m = _mlp(cls)
        x = tf.constant(np.ones((4, 20), np.float32))

        @tf.function
        def grads(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(m(x))
            return tape.gradient(loss, m.trainable_variables)

        graph = grads.get_concrete_function(x).graph
        products = [op for op in graph.get_operations() if op.type == "MatMul"]
        weight_grads = [op for op in products if op.get_attr("transpose_a")]
        input_grads = {op.name for op in products if op.get_attr("transpose_b")}
        assert len(weight_grads) == 3 and len(input_grads) == 2  # no input gradient for the first layer
        after = [any(c.name in input_grads for c in op.control_inputs) for op in weight_grads]
        assert after.count(True) == (2 if ordered else 0), (cls.__name__, after)
        # ...and each bias gradient waits for its layer's weight gradient, off the chain of input gradients
        bias_grads = [op for op in graph.get_operations() if op.type == "BiasAddGrad"]
        assert len(bias_grads) == 3
        behind = [any(c in weight_grads for c in op.control_inputs) for op in bias_grads]
        assert behind.count(True) == (2 if ordered else 0), (cls.__name__, behind)
