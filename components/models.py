"""The one builder: a ``ModelSpec`` / ``OptimizerSpec`` / schedule spec from params.yaml → Keras objects.

Every model takes raw pixels (0..255, flattened: 784 for Fashion-MNIST, 3072 for CIFAR-10) and carries its own preprocessing, so a saved
``.keras`` file is self-contained: ``Rescaling(1/255)`` and, for standardized inputs, a fixed
``Normalization`` holding the per-pixel mean/std fitted on the training split.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import keras
import numpy as np

from .config import (
    Activation,
    ExponentialSchedule,
    Initializer,
    ModelSpec,
    OneCycleSchedule,
    OptimizerSpec,
    PiecewiseSchedule,
    PowerSchedule,
)

PACKAGE = "ch11"


@keras.saving.register_keras_serializable(package=PACKAGE)
class MCDropout(keras.layers.Dropout):
    """Dropout that stays on at inference (MC dropout) while the rest of the model (BN) is in inference mode."""

    def call(self, inputs, training=None):
        return super().call(inputs, training=True)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MCAlphaDropout(keras.layers.AlphaDropout):
    def call(self, inputs, training=None):
        return super().call(inputs, training=True)


@keras.saving.register_keras_serializable(package=PACKAGE)
class InPlaceDense(keras.layers.Dense):
    """A Dense layer whose backward pass runs in a fixed order — input gradient, then weight gradient, then bias
    gradient — so that the optimizer updates the kernel in place and the chain of input gradients stays on one thread.

    Same function, parameters, initial values and gradients as ``Dense``: the same ops (``x @ W``, the bias added
    as Dense adds it; input gradient ``dy @ W.T``, weight gradient ``x.T @ dy``, bias gradient ``BiasAddGrad(dy)``),
    so the same bits (tests train both and compare). One exception: a kernel whose gradient has three terms (the
    product's and l1_l2's two penalties) may have them summed in another order by TensorFlow's graph optimizer, so
    its bits differ by rounding. What changes is the order, by two control edges:

    * the weight gradient waits for the input gradient. A variable's update writes into its buffer only while no
      other tensor holds it, and otherwise copies the whole kernel first; TensorFlow computes a layer's two backward
      products side by side, so when the weight gradient finished first, the update found the kernel still held by
      the input-gradient product and copied it (a third of the 100-layer nets' updates: ~0.5 ms of a 4.5 ms step).
    * the bias gradient waits for the weight gradient. TensorFlow's executor runs one expensive op (a product) of
      those an op makes ready on the same thread, and only when no cheap op is ready with it; otherwise it queues
      the product for the thread pool and runs the cheap ops first. When a layer's output gradient was ready, the
      bias gradient (cheap) and the input-gradient product (the backward chain) became ready together, so the
      chain waited behind the bias gradient and its update, or moved to the other thread, at every layer. Hung
      behind the weight gradient, the bias gradient and both updates run on the thread that computes the weight
      gradient, and the chain goes on at once (the 100-layer net's step: 1.07-1.16x as fast in three same-process A/Bs
      of alternating chunks).

    Neither costs time: the other thread is busy with the chain meanwhile. Use it where the input gradient is
    needed (every Dense after a trainable layer): a layer that needs none would compute one for nothing."""

    def call(self, inputs, training=None):
        if (keras.backend.backend() != "tensorflow" or len(inputs.shape) != 2 or self.lora_enabled
                or getattr(self, "quantization_mode", None)):
            return super().call(inputs, training=training)
        if self.bias is not None and self.units > 1:  # Dense adds such a bias with a BiasAdd (keras.ops.add)
            x = _product_in_place(inputs, self.kernel, self.bias)
        else:  # no bias, or one unit: Keras adds a bias of one unit by broadcasting, with another gradient
            x = _product_in_place(inputs, self.kernel)
            if self.bias is not None:
                x = keras.ops.add(x, self.bias)
        return self.activation(x) if self.activation is not None else x


def _product_in_place(x, kernel, bias=None):
    """``x @ kernel`` (``+ bias`` as a BiasAdd, which TensorFlow fuses into the product) with InPlaceDense's
    gradient (TensorFlow). The variables are read here, outside the custom-gradient function, which then sees
    tensors (the tape still records the reads)."""
    import tensorflow as tf

    @tf.custom_gradient
    def product(x, kernel, *bias):
        def backward(dy):
            dx = tf.linalg.matmul(dy, kernel, transpose_b=True)
            with tf.control_dependencies([dx]):  # the kernel's update needs dw, so it now comes after dx: in place
                dw = tf.linalg.matmul(x, dy, transpose_a=True)
            if not bias:
                return dx, dw
            with tf.control_dependencies([dw]):  # off the chain: runs on dw's thread, after it
                db = tf.raw_ops.BiasAddGrad(out_backprop=dy, data_format="NHWC")  # BiasAdd's own gradient
            return dx, dw, db

        y = tf.linalg.matmul(x, kernel)
        return (tf.nn.bias_add(y, bias[0], data_format="NHWC") if bias else y), backward

    def tensor(v):
        return tf.convert_to_tensor(keras.ops.convert_to_tensor(v))

    return product(tf.convert_to_tensor(x), tensor(kernel), *([] if bias is None else [tensor(bias)]))


@keras.saving.register_keras_serializable(package=PACKAGE)
class ShardedDense(keras.layers.Dense):
    """A Dense layer whose kernel is held as ``shards`` blocks of columns (tensor parallelism on the CPU's cores).

    Same function, same parameters and the same initial values as ``Dense`` (the full kernel is drawn from the
    initializer, then cut into column blocks). Each block's products (forward ``x @ w_j``, weight gradient
    ``x.T @ dy_j``) and its optimizer update are separate ops, which TensorFlow's two inter-op threads run at once;
    one intra-op thread per op keeps each op deterministic, and since no block's result depends on the other's,
    the weights do not depend on how the ops were scheduled (a test trains on one thread and on two and compares
    the bits). ``kernel`` reads the whole matrix."""

    def __init__(self, units, shards: int = 2, **kwargs):
        super().__init__(units, **kwargs)
        self.shards = int(shards)

    def build(self, input_shape):
        n_in = int(input_shape[-1])
        full = self.kernel_initializer((n_in, self.units), dtype=self.variable_dtype)
        cuts = [self.units * j // self.shards for j in range(self.shards + 1)]
        self.kernels = [
            self.add_weight(
                name=f"kernel_{j}",
                shape=(n_in, cuts[j + 1] - cuts[j]),
                initializer=lambda shape, dtype=None, block=full[:, cuts[j]:cuts[j + 1]]: keras.ops.convert_to_tensor(block, dtype),
                regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint,  # MaxNorm works per column: the same on a block
            )
            for j in range(self.shards)
        ]
        self.bias = (
            self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer,
                            regularizer=self.bias_regularizer, constraint=self.bias_constraint)
            if self.use_bias else None
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: n_in})
        self.built = True

    @property
    def kernel(self):
        return keras.ops.concatenate([k.value for k in self.kernels], axis=-1)

    def call(self, inputs, training=None):
        x = keras.ops.concatenate([keras.ops.matmul(inputs, k) for k in self.kernels], axis=-1)
        if self.bias is not None:
            x = keras.ops.add(x, self.bias)
        return self.activation(x) if self.activation is not None else x

    # Dense's own (quantization-aware) variable storage expects one kernel; store the blocks as variables.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "shards": self.shards}


@keras.saving.register_keras_serializable(package=PACKAGE)
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """1cycle (Smith 2018) as in the book's OneCycleScheduler, but computed from the step in-graph
    (no per-batch Python callback): start → max linearly over the first half of the non-final steps,
    back to start over the second half, then down to ``last_lr`` over the last ``annihilation`` part."""

    def __init__(self, total_steps: int, max_lr: float, start_lr: float, last_lr: float, last_steps: int):
        self.total_steps = int(total_steps)
        self.max_lr = float(max_lr)
        self.start_lr = float(start_lr)
        self.last_lr = float(last_lr)
        self.last_steps = int(last_steps)
        self.half = max((self.total_steps - self.last_steps) // 2, 1)

    def __call__(self, step):
        ops = keras.ops
        s = ops.cast(step, "float32")
        half, total = float(self.half), float(self.total_steps)

        def interp(s1, s2, r1, r2):
            return (r2 - r1) * (s - s1) / max(s2 - s1, 1.0) + r1

        up = interp(0.0, half, self.start_lr, self.max_lr)
        down = interp(half, 2 * half, self.max_lr, self.start_lr)
        last = interp(2 * half, total, self.start_lr, self.last_lr)
        lr = ops.where(s < half, up, ops.where(s < 2 * half, down, last))
        return ops.maximum(lr, self.last_lr)

    def get_config(self) -> dict[str, Any]:
        return {
            "total_steps": self.total_steps, "max_lr": self.max_lr, "start_lr": self.start_lr,
            "last_lr": self.last_lr, "last_steps": self.last_steps,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class ExponentialRange(keras.optimizers.schedules.LearningRateSchedule):
    """LR-range test: lr grows exponentially from ``min_lr`` to ``max_lr`` over ``steps``."""

    def __init__(self, min_lr: float, max_lr: float, steps: int):
        self.min_lr, self.max_lr, self.steps = float(min_lr), float(max_lr), int(steps)

    def __call__(self, step):
        ops = keras.ops
        frac = ops.cast(step, "float32") / float(max(self.steps - 1, 1))
        return self.min_lr * ops.exp(frac * math.log(self.max_lr / self.min_lr))

    def get_config(self) -> dict[str, Any]:
        return {"min_lr": self.min_lr, "max_lr": self.max_lr, "steps": self.steps}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Pixels(keras.layers.Layer):
    """Raw pixels (0..255) → model inputs: ``x / 255`` or, with a scaler, ``(x / 255 - mean) / std``.

    One fused multiply-add per pixel; unlike Keras' preprocessing layers it runs under XLA."""

    def __init__(self, mean=None, std=None, **kwargs):
        super().__init__(**kwargs)
        self.mean = None if mean is None else [float(v) for v in np.ravel(mean)]
        self.std = None if std is None else [float(v) for v in np.ravel(std)]
        if self.mean is None:
            self._scale, self._offset = 1 / 255.0, 0.0
        else:
            m, s = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
            self._scale, self._offset = (1 / (255.0 * s)).astype(np.float32), (-m / s).astype(np.float32)

    def call(self, x):
        x = keras.ops.cast(x, "float32")
        return x * self._scale + self._offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


def initializer(spec: Initializer, seed: int | None = None) -> keras.initializers.Initializer:
    if spec.name == "variance_scaling":
        return keras.initializers.VarianceScaling(spec.scale, spec.mode, spec.distribution, seed=seed)
    return keras.initializers.get({"class_name": spec.name, "config": {"seed": seed}})


def activation_layer(spec: Activation, name: str) -> keras.layers.Layer:
    if spec.name == "leaky_relu":
        slope = 0.3 if spec.negative_slope is None else spec.negative_slope
        return keras.layers.LeakyReLU(negative_slope=slope, name=name)
    if spec.name == "prelu":
        return keras.layers.PReLU(name=name)
    if spec.name == "elu":
        return keras.layers.ELU(alpha=1.0 if spec.alpha is None else spec.alpha, name=name)
    fn = {"swish": "silu"}.get(spec.name, spec.name)
    return keras.layers.Activation(fn, name=name)


def regularizer(spec) -> keras.regularizers.Regularizer | None:
    if spec is None or (spec.l1 == 0 and spec.l2 == 0):
        return None
    return keras.regularizers.L1L2(l1=spec.l1, l2=spec.l2)


def output_for(task: str) -> tuple[int, str, str]:
    """units, activation, loss of the output layer for a task."""
    return {
        "full": (10, "softmax", "sparse_categorical_crossentropy"),
        "a": (8, "softmax", "sparse_categorical_crossentropy"),
        "b": (1, "sigmoid", "binary_crossentropy"),
    }[task]


def build_model(
    spec: ModelSpec,
    task: str = "full",
    scaler: tuple[np.ndarray, np.ndarray] | None = None,
    n_inputs: int = 784,
    mc: bool = False,
    seed: int | None = None,
    name: str = "model",
    shard_min_weights: int = 0,
    shards: int = 2,
    shard_min_share: float = 0.0,
) -> keras.Sequential:
    """Build the Sequential MLP a spec describes. ``mc=True`` swaps dropout for its MC twin (same weights).

    Hidden Dense layers of at least ``shard_min_weights`` kernel weights (0: none) and at least
    ``shard_min_share`` of all the net's kernel weights are ``ShardedDense`` with ``shards`` column blocks: the
    same function and initial weights, computed on several cores at once. Every other Dense whose input gradient is
    needed (after a trainable layer: all but a first layer on the pixels) is ``InPlaceDense``: the same layer and
    bits, with its kernel updated in place.

    ``seed`` fixes every initializer (each layer gets seed + its index), so the same spec and seed
    give the same initial weights whatever else was built before.
    """
    n_out, out_act, _ = output_for(task)
    mean, std = scaler if scaler is not None else (None, None)
    layers: list[keras.layers.Layer] = [
        keras.Input((n_inputs,), name="pixels"),
        Pixels(mean, std, name="standardize" if scaler is not None else "scale"),
    ]
    if spec.input_batch_norm:
        layers.append(keras.layers.BatchNormalization(name="input_bn"))

    def dropout(i: int) -> keras.layers.Layer:
        assert spec.dropout is not None
        if spec.dropout.kind == "alpha_dropout":
            cls = MCAlphaDropout if mc else keras.layers.AlphaDropout
        else:
            cls = MCDropout if mc else keras.layers.Dropout
        return cls(spec.dropout.rate, seed=None if seed is None else seed + 10_000 + i, name=f"dropout_{i}")

    reg = regularizer(spec.regularizer)
    constraint = keras.constraints.MaxNorm(spec.max_norm) if spec.max_norm else None
    simple_act = spec.activation.name not in ("leaky_relu", "prelu") and spec.activation.alpha is None
    widths = [n_inputs] + [b.units for b in spec.hidden for _ in range(b.repeat)] + [n_out]
    total_weights = sum(a * b for a, b in zip(widths, widths[1:]))
    i = 0
    # a Dense after a trainable layer computes its input gradient: there, InPlaceDense updates the kernel in place
    dense = InPlaceDense if spec.input_batch_norm else keras.layers.Dense
    for block in spec.hidden:
        for _ in range(block.repeat):
            i += 1
            if spec.dropout and spec.dropout.where == "every":
                layers.append(dropout(i))
            fused = simple_act and spec.batch_norm != "before"
            act_name = {"swish": "silu"}.get(spec.activation.name, spec.activation.name)
            size = widths[i - 1] * block.units
            sharded = shards > 1 and 0 < shard_min_weights <= size and size >= shard_min_share * total_weights
            layers.append(
                (partial(ShardedDense, shards=shards) if sharded else dense)(
                    block.units,
                    activation=act_name if fused else None,
                    use_bias=spec.batch_norm != "before",
                    kernel_initializer=initializer(spec.initializer, None if seed is None else seed + i),
                    kernel_regularizer=reg,
                    kernel_constraint=constraint,
                    name=f"dense_{i}",
                )
            )
            dense = InPlaceDense
            if spec.batch_norm == "before":
                layers.append(keras.layers.BatchNormalization(name=f"bn_{i}"))
            if not fused:
                layers.append(activation_layer(spec.activation, name=f"act_{i}"))
            if spec.batch_norm == "after":
                layers.append(keras.layers.BatchNormalization(name=f"bn_{i}"))
    if spec.dropout:
        layers.append(dropout(i + 1))
    layers.append(
        dense(
            n_out,
            activation=out_act,
            kernel_initializer=initializer(spec.output_initializer, None if seed is None else seed + i + 1),
            kernel_regularizer=reg if (spec.regularizer and spec.regularizer.output) else None,
            name="output",
        )
    )
    return keras.Sequential(layers, name=name)


def learning_rate(opt: OptimizerSpec, schedule, steps_per_epoch: int, epochs: int, max_lr: float | None = None):
    """The optimizer's learning rate: a float, or an in-graph schedule of the step."""
    if schedule is None or schedule.kind == "performance":
        return opt.learning_rate
    if isinstance(schedule, PowerSchedule):
        return keras.optimizers.schedules.InverseTimeDecay(opt.learning_rate, schedule.decay_steps, schedule.decay_rate)
    if isinstance(schedule, ExponentialSchedule):
        return keras.optimizers.schedules.ExponentialDecay(
            opt.learning_rate, decay_steps=int(schedule.decay_epochs * steps_per_epoch), decay_rate=schedule.decay_rate
        )
    if isinstance(schedule, PiecewiseSchedule):
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [b * steps_per_epoch for b in schedule.boundaries_epochs], list(schedule.values)
        )
    if isinstance(schedule, OneCycleSchedule):
        peak = schedule.max_lr or max_lr
        if peak is None:
            raise ValueError("one_cycle needs max_lr (from params or the LR-range test)")
        total = steps_per_epoch * epochs
        start = peak / schedule.start_div
        return OneCycle(total, peak, start, start / schedule.end_div, int(total * schedule.annihilation) + 1)
    raise ValueError(f"unknown schedule {schedule!r}")


def build_optimizer(opt: OptimizerSpec, lr: Any) -> keras.optimizers.Optimizer:
    kwargs: dict[str, Any] = {"learning_rate": lr}
    for f in ("momentum", "nesterov", "rho", "beta_1", "beta_2", "epsilon", "weight_decay", "clipvalue", "clipnorm"):
        v = getattr(opt, f)
        if v is not None:
            kwargs[f] = v
    cls = {
        "sgd": keras.optimizers.SGD, "adagrad": keras.optimizers.Adagrad, "rmsprop": keras.optimizers.RMSprop,
        "adam": keras.optimizers.Adam, "adamax": keras.optimizers.Adamax, "nadam": keras.optimizers.Nadam,
        "adamw": keras.optimizers.AdamW,
    }[opt.name]
    return cls(**kwargs)


def swap_layers(model: keras.Model, mapping: dict[type, type]) -> keras.Model:
    """A clone of ``model`` in which every layer whose exact type is a key of ``mapping`` is rebuilt, from its
    config, as the mapped class; the other layers are rebuilt as themselves. The clone carries the weights."""

    def swap(layer: keras.layers.Layer) -> keras.layers.Layer:
        return mapping.get(type(layer), type(layer)).from_config(layer.get_config())

    twin = keras.models.clone_model(model, clone_function=swap)
    twin.set_weights(model.get_weights())
    return twin


def to_mc(model: keras.Sequential) -> keras.Sequential:
    """The same network with every Dropout/AlphaDropout replaced by its MC twin, carrying the weights.

    BatchNormalization layers stay as they are, so calling the twin with ``training=False`` keeps BN in
    inference mode (moving statistics used, never updated) while dropout samples."""
    return swap_layers(model, {keras.layers.Dropout: MCDropout, keras.layers.AlphaDropout: MCAlphaDropout})
