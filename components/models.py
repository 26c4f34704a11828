"""The one builder: a ``ModelSpec`` / ``OptimizerSpec`` / schedule spec from params.yaml → Keras objects.

Every model takes raw pixels (0..255, flattened: 784 for Fashion-MNIST, 3072 for CIFAR-10) and carries its own preprocessing, so a saved
``.keras`` file is self-contained: ``Rescaling(1/255)`` and, for standardized inputs, a fixed
``Normalization`` holding the per-pixel mean/std fitted on the training split.
"""
from __future__ import annotations

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


def input_scaling(scaler: tuple[np.ndarray, np.ndarray] | None) -> keras.layers.Layer:
    """Raw pixels (0..255) -> model inputs, as a standard Keras layer: ``Rescaling(1/255)``, or with a scaler
    (per-pixel mean/std of ``x / 255`` on the training split) one ``Normalization`` on the raw pixels with the
    same statistics scaled by 255, i.e. ``(x - 255 mean) / (255 std)`` = ``(x / 255 - mean) / std``."""
    if scaler is None:
        return keras.layers.Rescaling(1 / 255.0, name="scale")
    mean, std = (np.asarray(a, np.float64).ravel() for a in scaler)
    return keras.layers.Normalization(mean=(255.0 * mean).astype(np.float32),
                                      variance=np.square(255.0 * std).astype(np.float32), name="standardize")


def build_model(
    spec: ModelSpec,
    task: str = "full",
    scaler: tuple[np.ndarray, np.ndarray] | None = None,
    n_inputs: int = 784,
    mc: bool = False,
    seed: int | None = None,
    name: str = "model",
) -> keras.Sequential:
    """Build the Sequential MLP a spec describes, from ``keras.layers`` only. ``mc=True`` swaps dropout for its
    MC twin (for sampling in-process; such a model is never saved).

    ``seed`` fixes every initializer (each layer gets seed + its index), so the same spec and seed
    give the same initial weights whatever else was built before.
    """
    n_out, out_act, _ = output_for(task)
    layers: list[keras.layers.Layer] = [keras.Input((n_inputs,), name="pixels"), input_scaling(scaler)]
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
    fused = simple_act and spec.batch_norm != "before"  # the activation inside Dense, as the book writes it
    act_name = {"swish": "silu"}.get(spec.activation.name, spec.activation.name)
    i = 0
    for block in spec.hidden:
        for _ in range(block.repeat):
            i += 1
            if spec.dropout and spec.dropout.where == "every":
                layers.append(dropout(i))
            layers.append(keras.layers.Dense(
                block.units,
                activation=act_name if fused else None,
                use_bias=spec.batch_norm != "before",
                kernel_initializer=initializer(spec.initializer, None if seed is None else seed + i),
                kernel_regularizer=reg,
                kernel_constraint=constraint,
                name=f"dense_{i}",
            ))
            if spec.batch_norm == "before":
                layers.append(keras.layers.BatchNormalization(name=f"bn_{i}"))
            if not fused:
                layers.append(activation_layer(spec.activation, name=f"act_{i}"))
            if spec.batch_norm == "after":
                layers.append(keras.layers.BatchNormalization(name=f"bn_{i}"))
    if spec.dropout:
        layers.append(dropout(i + 1))
    layers.append(keras.layers.Dense(
        n_out,
        activation=out_act,
        kernel_initializer=initializer(spec.output_initializer, None if seed is None else seed + i + 1),
        kernel_regularizer=reg if (spec.regularizer and spec.regularizer.output) else None,
        name="output",
    ))
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
