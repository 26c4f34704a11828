"""Benchmark: the pipeline's training path vs a plain ``model.fit`` of the same model, side by side.

Same model, same data (the real Fashion-MNIST train/valid splits), same batch size, same epochs, same
optimizer; each way runs in its own fresh process (TensorFlow's thread settings are per process).
Prints seconds per epoch (median after the first, which includes tracing/compilation; the pipeline's epoch is
its whole epoch, checkpoint and gradient-health probe included, the plain one Keras' epoch) of ``--rounds`` runs
of each way in alternating order (plain, pipeline, pipeline, plain, ...: this box's speed drifts by 20-30 %
between minutes, which a single pair of runs mistakes for a speed-up or a slow-down), the median of each
way, their ratio with the per-round ratios, and both validation accuracies. Both ways build the same plain
Keras model (``components.models.build_model``); only the training path differs.

    python benchmarks/fit_speed.py                       # both models, after `dvc repro standardize`
    python benchmarks/fit_speed.py --experiments leaky_relu --epochs 3
    python benchmarks/fit_speed.py --without steps_per_execution=1   # A/B of one speed setting of runtime.local

``--without KEY=VALUE[,KEY=VALUE]`` compares the pipeline with the pipeline whose ``runtime.local`` settings are
overridden (a speed setting switched off) instead of with the plain fit: what that one setting gives.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def dense_gflop(model, n_train: int, n_valid: int) -> float:
    """Arithmetic of one epoch in the Dense layers' matrix products (multiply-add = 2 FLOP): forward and
    backward (weight gradients; input gradients except for the first layer) on the training rows, forward
    on the validation rows. Activations, losses and updates are left out: a lower bound."""
    import keras

    dense = [layer.kernel.shape for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    fwd = sum(i * o for i, o in dense)
    bwd = fwd + sum(i * o for i, o in dense[1:])
    return 2 * ((fwd + bwd) * n_train + fwd * n_valid) / 1e9


def worker(mode: str, name: str, epochs: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from components import experiment, train
    from components.config import load_params
    from components.models import build_model, build_optimizer, output_for

    mode, _, without = mode.partition(":")
    off = [f"runtime.local.{kv}" for kv in filter(None, without.split(","))]
    p = load_params(ROOT / "params.yaml", [f"experiments.{name}.train.epochs={epochs}",
                                           "runtime.checkpoint_dir=/tmp/ch11-bench-ckpt", *off])
    exp = p.experiments[name]
    data = train.load_task(ROOT / "data/splits", exp.task)
    scaler = experiment.load_scaler_if(exp, ROOT / "data/scaler.npz")
    n = (len(data.x["train"]), len(data.x["valid"]))
    if mode == "pipeline":
        import keras

        secs: list[float] = []

        class Wall(keras.callbacks.Callback):
            """The whole epoch as the stage runs it, from one epoch's start to the next one's (the last: to the end
            of training): the training steps, the validation pass and the pipeline's own per-epoch work that the
            plain fit does not do (the resume checkpoint, the gradient-health probe where params turn it on)."""

            def on_epoch_begin(self, epoch, logs=None):
                now = time.perf_counter()
                if hasattr(self, "t"):
                    secs.append(now - self.t)
                self.t = now

            def on_train_end(self, logs=None):
                secs.append(time.perf_counter() - self.t)

        model, metrics, history, extras = experiment.train_experiment(name, exp, p, data, scaler, callbacks=[Wall()])
        extras["checkpoint"].clear()
        assert len(secs) == len(history) == epochs, (secs, len(history))
        return {"seconds": secs, "val_accuracy": history[-1]["val_accuracy"], "gflop": dense_gflop(model, *n)}
    # plain: the textbook call — float inputs in NumPy, model.fit(batch_size=32), default compile settings,
    # TensorFlow's default threads
    import keras

    keras.utils.set_random_seed(p.seed)
    model = build_model(exp.model, exp.task, scaler=scaler, seed=p.seed)
    model.compile(loss=output_for(exp.task)[2], optimizer=build_optimizer(exp.optimizer, exp.optimizer.learning_rate), metrics=["accuracy"])
    secs: list[float] = []

    class T(keras.callbacks.Callback):
        def on_epoch_begin(self, e, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, e, logs=None):
            secs.append(time.perf_counter() - self.t)

    h = model.fit(data.x["train"].astype(np.float32), data.y["train"], batch_size=exp.train.batch_size, epochs=epochs,
                  validation_data=(data.x["valid"].astype(np.float32), data.y["valid"]), callbacks=[T()], verbose=0)
    return {"seconds": secs, "val_accuracy": float(h.history["val_accuracy"][-1]), "gflop": dense_gflop(model, *n)}


def median_steady(secs: list[float]) -> float:
    s = sorted(secs[1:] or secs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", nargs="+", default=["leaky_relu", "selu_deep"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each way (alternating order); medians are reported")
    ap.add_argument("--without", metavar="KEY=VALUE[,KEY=VALUE]",
                    help="compare with the pipeline under these runtime.local settings instead of the plain fit")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2]))))
        return 0
    if not (ROOT / "data/splits/full_train.parquet").is_file():
        print("run `dvc repro standardize` first (the benchmark uses the real splits)", file=sys.stderr)
        return 2
    print(f"{'experiment':<12} {'way':<9} {'s/epoch':>8} {'val_acc':>8} {'GFLOP/s':>8}   (batch size and epochs as in "
          f"params.yaml; {a.epochs} epochs each, {a.rounds} round(s) of each way, alternating; GFLOP/s: the Dense "
          f"layers' matrix products per second of epoch; the pipeline's whole epoch, checkpoint and gradient-health "
          f"probe included)", flush=True)
    other = f"pipeline:{a.without}" if a.without else "plain"
    label = {other: f"without {a.without}" if a.without else "plain", "pipeline": "pipeline"}
    for name in a.experiments:
        runs: dict[str, list[dict]] = {other: [], "pipeline": []}
        for r in range(a.rounds):  # ABBA order: a drift of the machine's speed hits both ways alike
            for mode in ((other, "pipeline") if r % 2 == 0 else ("pipeline", other)):
                out = subprocess.run([sys.executable, __file__, "--worker", mode, name, str(a.epochs)], capture_output=True,
                                     text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {m: float(np.median([median_steady(r["seconds"]) for r in rs])) for m, rs in runs.items()}
        for mode, rs in runs.items():
            each = ", ".join(f"{median_steady(r['seconds']):.2f}" for r in rs)
            print(f"{name:<12} {label[mode]:<9} {med[mode]:8.2f} {rs[-1]['val_accuracy']:8.4f} {rs[-1]['gflop'] / med[mode]:8.1f}"
                  f"   (rounds: {each})")
        ratios = [median_steady(p["seconds"]) / median_steady(q["seconds"]) for p, q in zip(runs[other], runs["pipeline"])]
        print(f"{name:<12} speed-up  {med[other] / med['pipeline']:7.2f}x   (per round: "
              f"{', '.join(f'{x:.2f}x' for x in ratios)}; {runs['pipeline'][-1]['gflop']:.0f} GFLOP of matrix products "
              f"per epoch)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
