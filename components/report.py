"""Report step: every experiment in one table (Markdown + JSON), the transfer result over seeds, MC dropout,
learning curves (PNG), and the values printed in the seed documents beside ours.

A seed value is compared like for like: a value printed at "epoch 6/10" of a training log is set beside
our validation accuracy at epoch 6, a final test accuracy beside our test accuracy.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from .config import Params
from .io import read_json, write_json, write_text
from .plots import pyplot, save_png

log = logging.getLogger("components.report")

BOOK_VALUES = Path(__file__).parent / "data" / "book_values.yaml"


def load_book_values(path: Path = BOOK_VALUES) -> dict[str, list[dict]]:
    return yaml.safe_load(path.read_text()) or {}


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def book_comparison(name: str, metrics: dict, history: list[dict], book: dict[str, list[dict]]) -> dict | None:
    """Our value for the same quantity the seed printed (accuracy only), with the difference."""
    entries = [e for e in book.get(name, []) if "accuracy" in e["metric"] and not e["metric"].startswith("train")]
    if not entries:
        return None
    e = entries[0]
    ours = None
    if e["metric"].startswith("test_accuracy"):
        ours = metrics.get("test_accuracy", metrics.get("test_accuracy_mean"))
    elif e["metric"].startswith("val_accuracy"):
        epoch = int(str(e.get("epoch", "0/0")).split("/")[0] or 0)
        row = next((h for h in history if int(h.get("epoch", -1)) == epoch), None)
        ours = row.get("val_accuracy") if row else None  # not run to that epoch: nothing comparable
    if ours is None:
        return None
    return {
        "metric": e["metric"], "epoch": e.get("epoch"), "book": float(e["value"]), "ours": float(ours),
        "diff": float(ours) - float(e["value"]), "seed": e["seed"], "quote": e["quote"],
        "all_book_values": [float(x["value"]) for x in entries if x["metric"] == e["metric"]],
    }


def group_of(name: str) -> str:
    head = name.split("_")[0]
    return {
        "leaky": "activations", "prelu": "activations", "elu": "activations", "act": "activations",
        "selu": "selu_deep", "relu": "selu_deep", "bn": "batch_norm", "clip": "clipping", "init": "initializers",
        "opt": "optimizers", "lr": "lr_schedules", "l1": "regularization", "l2": "regularization",
        "dropout": "regularization", "alpha": "regularization", "max": "regularization",
    }.get(head, "other")


def learning_curves(figures_dir: Path, histories: dict[str, list[dict]]) -> list[str]:
    plt = pyplot()
    figures_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = defaultdict(list)
    for name in histories:
        groups[group_of(name)].append(name)
    written = []
    for group, names in sorted(groups.items()):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for name in names:
            h = histories[name]
            ep = [r["epoch"] for r in h]
            axes[0].plot(ep, [r.get("val_accuracy") for r in h], marker=".", label=name)
            axes[1].plot(ep, [r.get("loss") for r in h], marker=".", label=name)
        axes[0].set(xlabel="epoch", ylabel="validation accuracy", title=f"{group}: validation accuracy")
        axes[1].set(xlabel="epoch", ylabel="training loss", title=f"{group}: training loss")
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        out = figures_dir / f"curves_{group}.png"
        save_png(fig, out)
        written.append(out.name)
    return written


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def build_report(
    params: Params, experiments: dict[str, dict], histories: dict[str, list[dict]], transfer: dict[str, dict],
    mc: dict[str, dict], card: dict, book: dict[str, list[dict]],
) -> tuple[dict, str]:
    """Pure function: the gathered metrics → (report JSON, report Markdown)."""
    rows = []
    for name, m in experiments.items():
        spec = params.experiments.get(name)
        cmp_ = book_comparison(name, m, histories.get(name, []), book)
        rows.append({
            "experiment": name, "group": group_of(name), "description": spec.description if spec else "",
            "epochs": m.get("epochs"), "batch_size": m.get("batch_size"),
            "train_accuracy": m.get("train_accuracy"), "valid_accuracy": m.get("valid_accuracy"),
            "test_accuracy": m.get("test_accuracy"), "valid_loss": m.get("valid_loss"), "test_loss": m.get("test_loss"),
            "seconds_per_epoch": m.get("seconds_per_epoch"), "book": cmp_,
        })
    rows.sort(key=lambda r: (r["group"], r["experiment"]))
    out: dict[str, Any] = {"experiments": rows}
    md = ["# Training Deep Neural Networks — results", "",
          f"Fashion-MNIST: {card.get('full_train', {}).get('rows', '?')} train / {card.get('full_valid', {}).get('rows', '?')} valid / "
          f"{card.get('full_test', {}).get('rows', '?')} test images. Accuracies in %. 'book' = the value printed in the seed "
          "documents (../shared/seeds) for the same quantity, at the same epoch.", ""]
    md += ["## Experiments", "",
           "| group | experiment | epochs | batch | train acc | valid acc | test acc | valid loss | s/epoch | book | ours (same quantity) | diff |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["book"]
        md.append(
            f"| {r['group']} | {r['experiment']} | {r['epochs']} | {r['batch_size']} | {_pct(r['train_accuracy'])} | "
            f"{_pct(r['valid_accuracy'])} | {_pct(r['test_accuracy'])} | {r['valid_loss']:.4f} | {r['seconds_per_epoch'] or 0:.2f} | "
            + (f"{_pct(b['book'])} ({b['metric'].replace('_', ' ')}, epoch {b['epoch']}) | {_pct(b['ours'])} | {100 * b['diff']:+.2f} |" if b else "– | – | – |")
        )
    if transfer.get("b_on_a") and transfer.get("model_b"):
        ta, tb, tba = transfer.get("model_a", {}), transfer["model_b"], transfer["b_on_a"]
        out["transfer"] = {
            "model_a_test_accuracy": ta.get("test_accuracy"),
            "model_b_test_accuracy": [tb["test_accuracy_mean"], tb["test_accuracy_std"]],
            "b_on_a_test_accuracy": [tba["test_accuracy_mean"], tba["test_accuracy_std"]],
            "error_rate_reduction": [tba["error_rate_reduction_mean"], tba["error_rate_reduction_std"]],
            "per_seed": tba["per_seed"], "seeds": tba["seeds"],
        }
        md += ["", "## Transfer learning (B = Shirt vs Sandal, 200 training images)", "",
               f"Model A (8 classes) test accuracy: {_pct(ta.get('test_accuracy'))}. Over {len(tba['seeds'])} seeds "
               f"({', '.join(map(str, tba['seeds']))}): model B {_pct(tb['test_accuracy_mean'])} ± {_pct(tb['test_accuracy_std'])}, "
               f"B-on-A {_pct(tba['test_accuracy_mean'])} ± {_pct(tba['test_accuracy_std'])}; error-rate reduction "
               f"(100 − acc_B) / (100 − acc_BonA) = **×{tba['error_rate_reduction_mean']:.2f} ± {tba['error_rate_reduction_std']:.2f}** "
               f"(transfer helped on {tba['transfer_helped_seeds']} of {len(tba['seeds'])} seeds).", "",
               "| seed | model B test acc | B-on-A test acc | error-rate reduction |", "|---:|---:|---:|---:|"]
        for s, v in tba["per_seed"].items():
            md.append(f"| {s} | {_pct(v['model_b_test_accuracy'])} | {_pct(v['test_accuracy'])} | ×{v['error_rate_reduction']:.2f} |")
        bf = book.get("transfer_factor", [])
        bb = [e["value"] for e in book.get("model_b", []) if e["metric"].startswith("test_accuracy")]
        bba = [e["value"] for e in book.get("b_on_a", []) if e["metric"].startswith("test_accuracy")]
        md += ["", f"The seed documents print: model B {', '.join(_pct(v) for v in bb) or '–'}; B-on-A "
               f"{', '.join(_pct(v) for v in bba) or '–'}; factor {', '.join(str(e['value']) for e in bf) or '–'}. "
               "They disagree with each other (one seed even gets worse with transfer): the gain depends on the seed, "
               "which is why ours is reported as mean ± std over seeds."]
    if mc:
        out["mc_dropout"] = mc
        md += ["", "## MC dropout", "", "| model | samples | deterministic acc | MC acc | ECE det → MC | acc after setting aside 10 % most uncertain |",
               "|---|---:|---:|---:|---|---:|"]
        for name, m in mc.items():
            rej = m["accuracy_after_rejecting"].get("0.1")
            md.append(f"| {name} | {m['samples']} | {_pct(m['deterministic_accuracy'])} | {_pct(m['mc_accuracy'])} | "
                      f"{m['deterministic_ece']:.4f} → {m['mc_ece']:.4f} | {_pct(rej)} |")
        md += ["", "Reliability diagrams: `reports/mc_dropout/<model>/reliability.png`."]
    md += ["", "## Learning curves", ""] + [f"![{g}](figures/curves_{g}.png)" for g in sorted({r['group'] for r in rows})]
    return out, "\n".join(md) + "\n"


def log_to_mlflow(params: Params, report: dict, experiments: dict[str, dict], files: list[Path]) -> None:
    """The report on its own child run and on the parent run; register the best variant; finish the parent."""
    from . import tracking

    with tracking.step_run("report", params, []) as tracker:
        if tracker is None:
            return
        for f in files:
            tracker.log_artifact(f)
        metric = params.mlflow.registry.metric
        candidates = {n: m for n, m in experiments.items() if m.get("mlflow_model_uri")}
        if candidates:
            best = max(candidates, key=lambda n: candidates[n][metric])
            tracker.set_tags({"best_variant": best})
            tracking.register(tracker, candidates[best]["mlflow_model_uri"], "best_variant", candidates[best][metric], params)
        parent = tracker.client.get_run(tracker.run_id).data.tags["mlflow.parentRunId"]
        parent_tracker = tracking.Tracker(tracker.client, parent, tracker.experiment_id)
        for f in files:
            parent_tracker.log_artifact(f, "report")
        summary = {f"{r['experiment']}.test_accuracy": r["test_accuracy"] for r in report["experiments"] if r.get("test_accuracy") is not None}
        if "transfer" in report:
            summary["transfer.error_rate_reduction_mean"] = report["transfer"]["error_rate_reduction"][0]
        parent_tracker.log_metrics(summary)
        parent_tracker.set_tags({"experiment_runs": json.dumps({n: m.get("mlflow_run_id") for n, m in experiments.items()})[:5000]})
        tracker.client.set_terminated(parent, "FINISHED")


def run(
    params: Params, experiments_dir: Path, transfer_dir: Path, mc_dir: Path, histories_dir: Path, card_json: Path,
    figures_dir: Path, report_md: Path, report_json: Path,
) -> dict:
    experiments = {p.stem: read_json(p) for p in sorted(Path(experiments_dir).glob("*.json")) if p.stem in params.experiments}
    missing = sorted(set(params.experiments) - set(experiments))
    if missing:
        raise FileNotFoundError(f"no metrics for experiment(s) {', '.join(missing)} in {experiments_dir}: run `dvc repro` first")
    histories = {n: read_history(Path(histories_dir) / f"{n}.csv") for n in experiments}
    transfer = {p.stem: read_json(p) for p in sorted(Path(transfer_dir).glob("*.json"))} if Path(transfer_dir).is_dir() else {}
    mc = {p.stem: read_json(p) for p in sorted(Path(mc_dir).glob("*.json"))} if Path(mc_dir).is_dir() else {}
    card = read_json(card_json) if Path(card_json).is_file() else {}
    report, md = build_report(params, experiments, histories, transfer, mc, card, load_book_values())
    learning_curves(Path(figures_dir), histories)
    write_text(report_md, md)
    write_json(report_json, report)
    log_to_mlflow(params, report, experiments, [Path(report_md), Path(report_json), Path(figures_dir)])
    log.info("report: %d experiments -> %s", len(experiments), Path(report_md).resolve())
    return report
