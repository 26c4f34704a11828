"""Small matplotlib helpers (Agg backend, atomic PNG writes)."""
from __future__ import annotations

from pathlib import Path

from .io import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 90) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)


def history_png(path: Path, history: list[dict], title: str) -> None:
    """Learning curves of one run: accuracy and loss, train vs validation, and the learning rate."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ep = [h["epoch"] for h in history]
    for ax, key in zip(axes[:2], ("accuracy", "loss")):
        ax.plot(ep, [h.get(key) for h in history], "o-", label=f"train {key}")
        ax.plot(ep, [h.get(f"val_{key}") for h in history], "o-", label=f"valid {key}")
        ax.set(xlabel="epoch", title=f"{title}: {key}")
        ax.legend()
    axes[2].plot(ep, [h.get("learning_rate") for h in history], "o-")
    axes[2].set(xlabel="epoch", title="learning rate (end of epoch)", yscale="log")
    fig.tight_layout()
    save_png(fig, path)


def confusion_png(path: Path, y_true, y_pred, class_names: list[str], title: str) -> None:
    import numpy as np

    plt = pyplot()
    k = len(class_names)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: test confusion matrix")
    fig.tight_layout()
    save_png(fig, path)
