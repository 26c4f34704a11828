"""Gradient and activation health, per layer and per epoch, on a fixed probe batch.

On a fixed set of training rows (evenly spaced, no random generator involved) the callback measures,
at the start of training and after every ``every_n_epochs``-th epoch:

* the L2 norm of the loss gradient w.r.t. every Dense kernel (hidden layers and the output layer);
* the mean and standard deviation of every hidden layer's output (after its activation / BN), defined
  as in the book's SELU simulation: the per-unit mean and std over the probe rows, averaged over units.

The probe pass runs in inference mode (``training=False``): dropout draws no random numbers and BN
updates no statistics, and the gradient is computed but never applied, so the trained weights are
bit-identical with and without diagnostics (tests/test_diagnostics.py). The loss is the data loss of the
compiled model (regularization penalties are left out: they do not flow through depth).

A run gets one verdict from thresholds in params (``train.diagnostics.thresholds``). Gradients are
compared per weight (RMS = norm / sqrt(kernel size)), since the first kernel (784 x 300) is far larger
than the others:

* **exploding**: a gradient norm is not finite, or the first hidden layer's RMS gradient exceeds the last
  hidden layer's by more than ``exploding_ratio``;
* **vanishing**: the first hidden layer's RMS gradient is below ``vanishing_ratio`` times the last hidden
  layer's (gradients die on the way down, as in a deep sigmoid net), or the activations collapse: some
  hidden layer's activation std falls below ``min_act_std`` (every input maps to nearly the same vector,
  so the gradient of every kernel reading it vanishes: the 100-layer ReLU net on Fashion-MNIST), or a
  hidden gradient norm falls below ``min_grad_norm``;
* otherwise **healthy**.

Each diagnosed epoch gets a verdict; the run's verdict is its worst (exploding > vanishing > healthy), with the
epoch it was seen at: the book's point is the start of training, and the 100-layer ReLU net on the full
Fashion-MNIST collapses at initialization but recovers after its first epoch.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import Diagnostics
from .io import atomic_path, read_json, write_json

log = logging.getLogger("components.diagnostics")

COLUMNS = ("epoch", "depth", "layer", "grad_norm", "grad_rms", "act_mean", "act_std")


@dataclass(frozen=True)
class LayerRecord:
    epoch: int  # 0 = before the first update
    depth: int  # 1-based position of the Dense layer (the output layer is the last)
    layer: str  # metric-friendly name: dense_001 ... dense_100, output
    grad_norm: float
    grad_rms: float  # grad_norm / sqrt(kernel size): comparable across layers of different shapes
    act_mean: float | None  # None for the output layer (its activations are the predictions)
    act_std: float | None


def probe_indices(n: int, rows: int) -> np.ndarray:
    """``rows`` evenly spaced row indices of ``n`` (all rows when ``rows >= n``): fixed, no RNG."""
    if rows >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, rows).round().astype(np.int64))


def dense_layers(model) -> list:
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def hidden_outputs(model) -> list:
    """For each hidden Dense layer, the last layer of its block (activation, BN...) before the next Dense or
    dropout: its output is "the hidden layer's activations"."""
    import keras

    blocks: list = []
    current = None
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            if current is not None:
                blocks.append(current)
            current = layer
        elif isinstance(layer, (keras.layers.Dropout, keras.layers.AlphaDropout)):
            if current is not None:
                blocks.append(current)
            current = None
        elif current is not None:
            current = layer
    return blocks  # the output Dense (current at the end) is not a hidden layer


def layer_names(model) -> list[str]:
    dense = dense_layers(model)
    width = max(2, len(str(len(dense) - 1)))
    return [f"dense_{i:0{width}d}" for i in range(1, len(dense))] + ["output"]


class Probe:
    """One forward + backward pass over the probe batch; builds a multi-output view of the model once."""

    def __init__(self, model, x: np.ndarray, y: np.ndarray, loss: Any):
        import keras
        import tensorflow as tf

        self.model = model
        self.x = tf.constant(x)
        self.y = tf.constant(y)
        self.loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
        self.kernels = [[layer.kernel] for layer in dense_layers(model)]
        self.names = layer_names(model)
        outs = [layer.output for layer in hidden_outputs(model)]
        self.view = keras.Model(model.inputs, [*outs, model.outputs[0]])
        # one graph, traced at the first measure: run eagerly, the 100-layer nets' pass took 0.22-0.41 s an epoch
        # (hundreds of ops dispatched one by one from Python), as a graph ~0.04 s; the same kernels, same values
        self._pass = tf.function(self._forward_backward)

    def _forward_backward(self, x, y):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            *hidden, pred = self.view(x, training=False)
            loss = tf.reduce_mean(self.loss_fn(y, pred))
        grads = tape.gradient(loss, self.kernels)
        return hidden, [[tf.norm(g) for g in gs if g is not None] for gs in grads]

    def measure(self, epoch: int) -> list[LayerRecord]:
        hidden, kernel_norms = self._pass(self.x, self.y)
        norms = [math.sqrt(sum(float(n) ** 2 for n in ns)) for ns in kernel_norms]
        sizes = [sum(int(np.prod(k.shape)) for k in ks) for ks in self.kernels]
        records = []
        for i, (name, g, size) in enumerate(zip(self.names, norms, sizes)):
            if i < len(hidden):
                h = hidden[i].numpy().astype(np.float64)
                mean, std = float(h.mean(axis=0).mean()), float(h.std(axis=0).mean())
            else:
                mean = std = None
            records.append(LayerRecord(epoch, i + 1, name, g, g / math.sqrt(size), mean, std))
        return records


def grad_norms(model, x: np.ndarray, y: np.ndarray, loss: Any) -> dict[str, float]:
    """The per-layer kernel gradient norms of one probe pass (a pure helper for scripts and tests)."""
    return {r.layer: r.grad_norm for r in Probe(model, x, y, loss).measure(0)}


# ------------------------------------------------------------------------------------------ verdict

SEVERITY = {"healthy": 0, "vanishing": 1, "exploding": 2}


def epoch_verdict(hidden: list[LayerRecord], cfg: Diagnostics) -> dict[str, Any]:
    """The verdict of one diagnosed epoch from its hidden layers' records (rule in the module doc)."""
    t = cfg.thresholds
    last = hidden[-1].grad_rms
    ratio = hidden[0].grad_rms / last if last > 0 else math.inf
    min_grad = min(r.grad_norm for r in hidden)
    min_std = min(r.act_std for r in hidden)  # type: ignore[type-var]
    stats = {"first_to_last_grad_rms_ratio": float(ratio), "min_hidden_grad_norm": float(min_grad),
             "min_hidden_act_std": float(min_std)}
    if not all(math.isfinite(r.grad_norm) for r in hidden):
        return {"verdict": "exploding", "reason": "a gradient norm is not finite", **stats}
    if ratio > t.exploding_ratio:
        return {"verdict": "exploding", **stats,
                "reason": f"first/last hidden RMS gradient ratio {ratio:.3g} > exploding_ratio {t.exploding_ratio:g}"}
    if ratio < t.vanishing_ratio:
        return {"verdict": "vanishing", **stats,
                "reason": f"first/last hidden RMS gradient ratio {ratio:.3g} < vanishing_ratio {t.vanishing_ratio:g}"}
    if min_std < t.min_act_std:
        return {"verdict": "vanishing", **stats,
                "reason": f"activations collapse: smallest hidden activation std {min_std:.3g} < min_act_std "
                          f"{t.min_act_std:g}, so the gradients of the layers reading them vanish"}
    if min_grad < t.min_grad_norm:
        return {"verdict": "vanishing", **stats,
                "reason": f"smallest hidden gradient norm {min_grad:.3g} < min_grad_norm {t.min_grad_norm:g}"}
    return {"verdict": "healthy", **stats,
            "reason": f"first/last hidden RMS gradient ratio {ratio:.3g} within [{t.vanishing_ratio:g}, "
                      f"{t.exploding_ratio:g}], hidden activation std >= {min_std:.3g}"}


def verdict(records: list[LayerRecord], cfg: Diagnostics) -> dict[str, Any]:
    """The run's verdict: the worst epoch's (see the module doc), its numbers, and the last epoch's activations."""
    per_epoch: dict[int, dict[str, Any]] = {}
    for e in sorted({r.epoch for r in records}):
        hidden = [r for r in records if r.epoch == e and r.act_mean is not None]
        if hidden:
            per_epoch[e] = epoch_verdict(hidden, cfg)
    if not per_epoch:
        return {"verdict": "unknown", "reason": "no hidden layer was measured"}
    worst = max(per_epoch, key=lambda e: (SEVERITY[per_epoch[e]["verdict"]], -e))  # the first epoch of the worst kind
    last_epoch = max(per_epoch)
    last = [r for r in records if r.epoch == last_epoch and r.act_mean is not None]
    healthy_after = [e for e in per_epoch if e > worst and all(per_epoch[k]["verdict"] == "healthy" for k in per_epoch if k >= e)]
    return {
        **per_epoch[worst],
        "verdict_epoch": worst,
        "healthy_from_epoch": min(healthy_after) if per_epoch[worst]["verdict"] != "healthy" and healthy_after else None,
        "verdict_per_epoch": {str(e): v["verdict"] for e, v in per_epoch.items()},
        "grad_rms_ratio_per_epoch": {str(e): v["first_to_last_grad_rms_ratio"] for e, v in per_epoch.items()},
        "min_act_std_per_epoch": {str(e): v["min_hidden_act_std"] for e, v in per_epoch.items()},
        "first_hidden_grad_norm": float(next(r.grad_norm for r in records if r.epoch == worst and r.depth == 1)),
        "last_hidden_grad_norm": float([r for r in records if r.epoch == worst and r.act_mean is not None][-1].grad_norm),
        "act_mean_last_hidden": last[-1].act_mean,
        "act_std_last_hidden": last[-1].act_std,
        "act_mean_max_abs": float(max(abs(r.act_mean) for r in last)),  # type: ignore[arg-type]
        "act_std_range": [float(min(r.act_std for r in last)), float(max(r.act_std for r in last))],  # type: ignore[type-var]
        "epochs_measured": sorted(per_epoch),
    }


# ------------------------------------------------------------------------------------------ callback

def _callback_base():
    import keras

    return keras.callbacks.Callback


class GradientHealth(_callback_base()):  # type: ignore[misc]
    """Keras callback: probe before training (fresh runs) and after every ``every_n_epochs``-th epoch.

    With ``state_path`` (in the run's resume directory) the records survive a crash: a resumed run keeps
    those of the epochs it does not redo.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, cfg: Diagnostics, label: str = "", state_path: Path | None = None):
        super().__init__()
        idx = probe_indices(len(x), cfg.probe_rows)
        self.x, self.y = np.asarray(x)[idx].astype(np.float32), np.asarray(y)[idx]
        self.cfg, self.label, self.state_path = cfg, label, state_path
        self.records: list[LayerRecord] = []
        self.seconds = 0.0
        self._probe: Probe | None = None

    def _measure(self, epoch: int) -> None:
        t0 = time.perf_counter()
        if self._probe is None:
            self._probe = Probe(self.model, self.x, self.y, self.model.loss)
        recs = self._probe.measure(epoch)
        self.records += recs
        self.seconds += time.perf_counter() - t0
        if self.state_path is not None:
            write_json(self.state_path, {"records": rows(self.records)})
        hidden = [r for r in recs if r.act_mean is not None]
        if hidden:
            log.info("%s diagnostics epoch %d: grad norm first hidden %.3g, last hidden %.3g; last hidden activations "
                     "mean %.2f std %.2f (%.2fs)", self.label, epoch, hidden[0].grad_norm, hidden[-1].grad_norm,
                     hidden[-1].act_mean, hidden[-1].act_std, time.perf_counter() - t0)

    def on_train_begin(self, logs=None):
        done = int(self.model.optimizer.iterations) // max(int(self.params.get("steps") or 1), 1)
        if done == 0:  # a fresh run: epoch 0 = the initialization
            self.records = []
            self._measure(0)
        elif self.state_path is not None and self.state_path.is_file():  # resumed after `done` epochs
            saved = read_json(self.state_path)["records"]
            self.records = [LayerRecord(**r) for r in saved if r["epoch"] <= done]

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.cfg.every_n_epochs == 0 or done == self.params.get("epochs"):
            self._measure(done)


# ------------------------------------------------------------------------------------------ outputs

def rows(records: list[LayerRecord]) -> list[dict[str, Any]]:
    return [{c: getattr(r, c) for c in COLUMNS} for r in records]


def write_csv(path: Path, records: list[LayerRecord]) -> None:
    """Long format (one row per epoch and layer) for ``dvc plots``; only a header when nothing was measured."""
    lines = [",".join(COLUMNS)]
    for r in records:
        lines.append(",".join("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
                              for v in (getattr(r, c) for c in COLUMNS)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def per_epoch_metrics(records: list[LayerRecord]) -> list[dict[str, float]]:
    """One dict per diagnosed epoch: ``grad_norm/<layer>``, ``act_mean/<layer>``, ``act_std/<layer>`` (for MLflow)."""
    by_epoch: dict[int, dict[str, float]] = {}
    for r in records:
        m = by_epoch.setdefault(r.epoch, {"epoch": r.epoch})
        m[f"grad_norm/{r.layer}"] = r.grad_norm
        if r.act_mean is not None:
            m[f"act_mean/{r.layer}"] = r.act_mean
            m[f"act_std/{r.layer}"] = r.act_std  # type: ignore[assignment]
    return [by_epoch[e] for e in sorted(by_epoch)]


def heatmap_png(path: Path, records: list[LayerRecord], title: str) -> None:
    """Layer × epoch heat-maps: log10 gradient norm, activation mean and activation std."""
    from .plots import pyplot, save_png

    plt = pyplot()
    epochs = sorted({r.epoch for r in records})
    layers = sorted({(r.depth, r.layer) for r in records})
    grid = {k: np.full((len(layers), len(epochs)), np.nan) for k in ("grad_norm", "act_mean", "act_std")}
    col = {e: j for j, e in enumerate(epochs)}
    row = {d: i for i, (d, _) in enumerate(layers)}
    for r in records:
        for k in grid:
            v = getattr(r, k)
            if v is not None:
                grid[k][row[r.depth], col[r.epoch]] = v
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.6 + max(3.0, 0.045 * len(layers))))
    panels = (("grad_norm", "log10 ‖∂loss/∂kernel‖", np.log10(np.maximum(grid["grad_norm"], 1e-30)), "viridis", None),
              ("act_mean", "activation mean", grid["act_mean"], "coolwarm", (-1.0, 1.0)),
              ("act_std", "activation std", grid["act_std"], "magma", (0.0, 2.0)))
    for ax, (_, label, data, cmap, lim) in zip(axes, panels):
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest",
                       vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
        ax.set(xlabel="epoch", ylabel="layer (depth)", title=label)
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        step = max(1, len(layers) // 10)
        ax.set_yticks(range(0, len(layers), step), [layers[i][1] for i in range(0, len(layers), step)], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{title}: gradient and activation health (probe batch)")
    fig.tight_layout()
    save_png(fig, Path(path))
