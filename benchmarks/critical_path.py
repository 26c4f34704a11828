"""Benchmark: the pipeline's training steps against their critical path, side by side in one process.

An SGD step of an MLP cannot end before its critical path: the forward chain through every layer, the chain of
input gradients back to the first layer, and the first layer's weight gradient and update (the next step's first
product reads that kernel). Everything else a step does (the other layers' weight and bias gradients and their
updates, the loss and metrics, the next batch) can run beside that path, on the other core. This script trains
an experiment as the pipeline does (``experiment.train_experiment``: same model, data, threads and compile
settings) and, after each epoch, runs that path alone, for as many steps as an epoch has, on the real training
batches and the model's own weights, in the same process and with the same threads. It prints both times and
their ratio, epoch by epoch (this box's speed drifts by 20-30 % from one minute to the next, so each pair is
measured back to back).

A ratio near 1 says the pipeline's step is at its floor for TensorFlow's kernels and executor on this machine:
a shorter epoch then needs faster products or fewer ops on the chain, not a better schedule of the rest; and no
speed-up over a plain ``model.fit`` can exceed (plain epoch) / (critical path) without them.

    python benchmarks/critical_path.py                       # selu_deep, after `dvc repro standardize`
    python benchmarks/critical_path.py --experiments selu_deep relu_deep --epochs 8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dense_chain(model) -> tuple[list, list]:
    """The model as (input layers, Dense layers): a Sequential of input scaling and Dense layers whose activation
    is part of the layer (the builder's deep nets). Anything else (batch norm, dropout, a separate activation
    layer) has a critical path this script does not model: a ``ValueError`` names the first such layer."""
    import keras

    pre, dense = [], []
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)) and not dense:
            pre.append(layer)
        elif isinstance(layer, keras.layers.Dense) and layer.bias is not None:
            dense.append(layer)
        else:
            raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}): this benchmark models MLPs of Dense layers "
                             "with their activation built in (as the deep nets are); pick such an experiment")
    if len(dense) < 2:
        raise ValueError("the model needs at least two Dense layers")
    return pre, dense


def batch_mean_loss(loss):
    """The compiled loss as Keras applies it to a batch: a ``Loss`` object as is, a name or a function averaged
    over the batch (Keras' default reduction, ``sum_over_batch_size``)."""
    import keras
    import tensorflow as tf

    if isinstance(loss, keras.losses.Loss):
        return loss
    fn = keras.losses.get(loss)
    return lambda y, p: tf.reduce_mean(fn(y, p))


def critical_path(model, loss, learning_rate: float):
    """``(step, first_kernel)``: ``step(x, y)`` runs one SGD step's critical path on a batch of raw pixels and
    labels (forward through every layer, loss, input gradients back to the first layer's pre-activation, the first
    layer's weight gradient and its update) and returns a scalar that depends on all of it; ``first_kernel`` is the
    variable it updates, a copy of the model's first kernel, so the model itself is untouched. The other layers'
    kernels and biases enter as constants (their values at this call): no weight gradient, bias gradient or update
    of theirs is computed."""
    import tensorflow as tf

    pre, dense = dense_chain(model)
    loss_fn = batch_mean_loss(loss)
    first = dense[0]
    w1 = tf.Variable(tf.convert_to_tensor(first.kernel), name="first_kernel_copy")
    b1 = tf.constant(first.bias.numpy())
    rest = [(tf.constant(d.kernel.numpy()), tf.constant(d.bias.numpy()), d.activation) for d in dense[1:]]
    lr = tf.constant(learning_rate, tf.float32)

    def step(x, y):
        h0 = x
        for layer in pre:
            h0 = layer(h0)
        z1 = tf.nn.bias_add(tf.linalg.matmul(h0, w1), b1)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(z1)
            h = first.activation(z1)
            for kernel, bias, activation in rest:
                h = activation(tf.nn.bias_add(tf.linalg.matmul(h, kernel), bias))
            loss = loss_fn(y, h)
        dz1 = tape.gradient(loss, z1)
        update = w1.assign_sub(lr * tf.linalg.matmul(h0, dz1, transpose_a=True))
        with tf.control_dependencies([update]):
            return tf.identity(loss)

    return step, w1


def chain_runner(step, x_train, y_train, batch_size: int):
    """A graph that runs ``n`` critical-path steps one after another on consecutive training batches (each step
    waits for the one before it, as SGD's steps do)."""
    import tensorflow as tf

    x_all, y_all = tf.constant(x_train), tf.constant(y_train)
    n_rows = x_train.shape[0]

    @tf.function
    def run(n):
        def body(i, done):
            start = (i * batch_size) % (n_rows - batch_size + 1)
            with tf.control_dependencies([done]):
                out = step(x_all[start:start + batch_size], y_all[start:start + batch_size])
            return i + 1, out

        return tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), tf.constant(0.0)))[1]

    return run


def measure(name: str, epochs: int | None) -> list[tuple[float, float]]:
    sys.path.insert(0, str(ROOT))
    import keras
    import tensorflow as tf

    from components import experiment, train
    from components.config import load_params

    overrides = ["runtime.checkpoint_dir=/tmp/ch11-bench-critical-path"]
    if epochs:
        overrides.append(f"experiments.{name}.train.epochs={epochs}")
    p = load_params(ROOT / "params.yaml", overrides)
    exp = p.experiments[name]
    train.configure(p.runtime)
    data = train.load_task(ROOT / "data/splits", exp.task)
    scaler = experiment.load_scaler_if(exp, ROOT / "data/scaler.npz")
    bs = exp.train.batch_size
    n_steps = -(-len(data.x["train"]) // bs)
    pairs: list[tuple[float, float]] = []

    class SideBySide(keras.callbacks.Callback):
        """Times the training steps of each epoch (to the validation pass), then the critical path alone."""

        def on_train_begin(self, logs=None):
            lr = self.model.optimizer.learning_rate
            lr = float(lr.numpy() if hasattr(lr, "numpy") else lr)
            step, _ = critical_path(self.model, self.model.loss, lr)
            self.run = chain_runner(step, data.x["train"], data.y["train"], bs)
            self.run(tf.constant(3)).numpy()  # trace once, outside the timings

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_test_begin(self, logs=None):
            self.steps = time.perf_counter() - self.t

        def on_epoch_end(self, epoch, logs=None):
            t = time.perf_counter()
            self.run(tf.constant(n_steps)).numpy()
            pairs.append((self.steps, time.perf_counter() - t))
            s, c = pairs[-1]
            print(f"{name:<12} epoch {epoch + 1:>2}  steps {s:7.2f} s  critical path {c:7.2f} s  ratio {s / c:5.2f}", flush=True)

    _, _, _, extras = experiment.train_experiment(name, exp, p, data, scaler, callbacks=[SideBySide()])
    extras["checkpoint"].clear()
    return pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", nargs="+", default=["selu_deep"])
    ap.add_argument("--epochs", type=int, default=None, help="epochs per experiment (default: params.yaml's)")
    a = ap.parse_args()
    if not (ROOT / "data/splits/full_train.parquet").is_file():
        print("run `dvc repro standardize` first (the benchmark uses the real splits)", file=sys.stderr)
        return 2
    print("(each epoch: the pipeline's training steps, then the same number of steps of their critical path alone, "
          "same process and threads; the first epoch includes tracing)")
    for name in a.experiments:
        pairs = measure(name, a.epochs)
        ratios = [s / c for s, c in pairs[1:] or pairs]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(f"{name:<12} steps / critical path: median {statistics.median(ratios):.2f} (quartiles {q[0]:.2f}-{q[2]:.2f}; "
              f"{len(ratios)} epoch(s) after the first; steps {statistics.median(s for s, _ in pairs[1:] or pairs):.2f} s, "
              f"critical path {statistics.median(c for _, c in pairs[1:] or pairs):.2f} s an epoch, medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
