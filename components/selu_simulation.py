"""The book's 1,000-layer NumPy simulation (seed 002): standardized random inputs through a deep stack of
random dense layers with LeCun initialization (N(0, 1/n)) and SELU keep mean ~0 and std ~1 at every layer.

No training, no TensorFlow: a few seconds of NumPy. For comparison the same stack with ReLU (He init,
N(0, 2/n)) and tanh (LeCun init). "mean" and "std" are the book's: per-unit mean / std over the rows,
averaged over the units. Outputs: one CSV row per layer (``dvc plots``), a PNG, and a metrics JSON with
the values at layers 0, 100, 200, ... as the book prints them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .config import Params, SeluSimulation
from .io import atomic_path, write_json

log = logging.getLogger("components.selu_simulation")

SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805
HE_INIT = {"relu", "elu"}  # N(0, 2/n); the others N(0, 1/n)


def activate(name: str, z: np.ndarray) -> np.ndarray:
    if name == "selu":
        return SELU_SCALE * np.where(z > 0, z, SELU_ALPHA * np.expm1(np.minimum(z, 0)))
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))
    if name == "relu":
        return np.maximum(z, 0)
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-z))
    raise ValueError(f"unknown activation {name!r}")


def simulate(cfg: SeluSimulation, activation: str) -> np.ndarray:
    """(layers, 2) array of the book's mean and std after each layer; the book's loop, any activation."""
    rng = np.random.RandomState(cfg.seed)  # the book's np.random.seed(42) stream, not the global one
    z = rng.normal(size=(cfg.rows, cfg.units))  # standardized inputs
    scale = np.sqrt((2.0 if activation in HE_INIT else 1.0) / cfg.units)
    out = np.empty((cfg.layers, 2))
    for layer in range(cfg.layers):
        w = rng.normal(size=(cfg.units, cfg.units), scale=scale)
        z = activate(activation, z @ w)
        out[layer] = np.mean(z, axis=0).mean(), np.std(z, axis=0).mean()
    return out


def summarize(curves: dict[str, np.ndarray], cfg: SeluSimulation) -> dict[str, Any]:
    shown = list(range(0, cfg.layers, cfg.print_every))
    summary: dict[str, Any] = {"layers": cfg.layers, "units": cfg.units, "rows": cfg.rows, "seed": cfg.seed}
    for act, c in curves.items():
        summary[act] = {
            "at_layer": {str(i): {"mean": float(c[i, 0]), "std": float(c[i, 1])} for i in shown},
            "last_layer": {"mean": float(c[-1, 0]), "std": float(c[-1, 1])},
            "max_abs_mean": float(np.nanmax(np.abs(c[:, 0]))),
            "std_range": [float(np.nanmin(c[:, 1])), float(np.nanmax(c[:, 1]))],
        }
    if "selu" in curves:
        c = curves["selu"]
        summary["selu_self_normalizes"] = bool(np.nanmax(np.abs(c[:, 0])) < 0.25 and 0.5 < np.nanmin(c[:, 1])
                                               and np.nanmax(c[:, 1]) < 1.5)
    return summary


def write_csv(path: Path, curves: dict[str, np.ndarray]) -> None:
    acts = list(curves)
    header = ["layer"] + [f"{a}_{k}" for a in acts for k in ("mean", "std")]
    n = len(next(iter(curves.values())))
    lines = [",".join(header)]
    for i in range(n):
        lines.append(",".join([str(i)] + [f"{curves[a][i, j]:.6g}" for a in acts for j in (0, 1)]))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def figure(path: Path, curves: dict[str, np.ndarray], cfg: SeluSimulation) -> None:
    from .plots import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for act, c in curves.items():
        init = "He" if act in HE_INIT else "LeCun"
        axes[0].plot(c[:, 0], label=f"{act} ({init} init)")
        axes[1].plot(c[:, 1], label=f"{act} ({init} init)")
    axes[0].set(xlabel="layer", ylabel="mean of the activations", title="mean through depth")
    axes[1].set(xlabel="layer", ylabel="std of the activations", title="std through depth", yscale="log")
    for ax in axes:
        ax.axhline(0 if ax is axes[0] else 1, color="k", lw=0.8, ls="--")
        ax.legend(fontsize=8)
    fig.suptitle(f"{cfg.layers} random dense layers of {cfg.units} units, {cfg.rows} standardized inputs (no training)")
    fig.tight_layout()
    save_png(fig, path)


def run(params: Params, csv_path: Path, figure_path: Path, metrics_path: Path) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    from . import tracking

    cfg = params.selu_simulation
    note = (f"The book's NumPy demo: {cfg.rows} standardized inputs through {cfg.layers} random dense layers of "
            f"{cfg.units} units (no training); SELU with LeCun init keeps mean ~0 and std ~1, beside "
            f"{', '.join(a for a in cfg.activations if a != 'selu')}")
    with tracking.step_run("selu_simulation", params, [], run_name="selu_simulation", spec=cfg.model_dump(),
                           tags=tracking.run_tags("selu", "selu_simulation", note)) as tracker:
        with threadpool_limits(1):  # 100 x 100 matmuls: BLAS threads only fight over the 2 shared cores (4x slower)
            curves = {act: simulate(cfg, act) for act in cfg.activations}
        for act, c in curves.items():
            for i in range(0, cfg.layers, cfg.print_every):
                log.info("%s layer %d: mean %.2f, std deviation %.2f", act, i, c[i, 0], c[i, 1])
        summary = summarize(curves, cfg)
        write_csv(Path(csv_path), curves)
        figure(Path(figure_path), curves, cfg)
        write_json(metrics_path, summary)
        if tracker is not None:
            # one point per layer (step = layer): the UI draws mean and std through depth per activation
            tracker.log_history([{"epoch": i, **{f"{a}_{k}": float(curves[a][i, j]) for a in curves
                                                 for j, k in ((0, "mean"), (1, "std")) if np.isfinite(curves[a][i, j])}}
                                 for i in range(cfg.layers)])
            tracker.log_metrics({f"{a}_{k}": summary[a][k] for a in curves for k in ("max_abs_mean",)})
            if "selu_self_normalizes" in summary:
                tracker.set_tags({"selu_self_normalizes": str(summary["selu_self_normalizes"]).lower()})
            tracker.log_named({"activations_through_depth.png": Path(figure_path), "history.csv": Path(csv_path)})
    if "selu_self_normalizes" in summary:
        log.info("SELU %s through %d layers (mean within ±%.2f, std in [%.2f, %.2f])",
                 "self-normalizes" if summary["selu_self_normalizes"] else "does NOT self-normalize", cfg.layers,
                 summary["selu"]["max_abs_mean"], *summary["selu"]["std_range"])
    return summary
