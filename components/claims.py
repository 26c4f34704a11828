"""Claims step: the chapter's claims (params.yaml ``claims.list``) tested over seeds, with effect sizes and verdicts.

Each claim compares two sides (experiments, an MC-dropout model against its deterministic pass, B-on-A against
model B) on one metric. Per seed it takes the difference better - than (for the error-rate factor the log of
err_B / err_BonA); over the seeds the mean difference and a Student t confidence interval of that mean, paired by
seed (``claims.interval: paired_t``). The verdict: **supported** when the interval lies entirely on the side the
claim expects, **contradicted** when it lies entirely on the other side, **not shown** when it crosses 0.

The seeds of an experiment: the main job's (``seed``: metrics/experiments/<name>.json, metrics/mc_dropout.json)
and each of ``claims.seeds`` (metrics/claims/seed_<s>/<name>.json, metrics/claims/mc_dropout/seed_<s>.json,
written by `make claims`). The transfer claims use the transfer seeds (``transfer.seeds``) the main job runs.
Outputs: reports/claims.md, metrics/claims.json, reports/claims_forest.png; the table and the plot go to the
parent MLflow run of the execution.
"""
from __future__ import annotations

import logging
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from .claims_schema import TRANSFER_SIDES, ClaimPair
from .config import Params
from .io import read_json, write_json, write_text
from .plots import pyplot, save_png
from .report import load_book_values

log = logging.getLogger("components.claims")

SUPPORTED, NOT_SHOWN, CONTRADICTED = "supported", "not shown", "contradicted"
ONE_SEED = "not shown (one seed: run `make claims`)"
VERDICT_COLOURS = {SUPPORTED: "#1a9850", NOT_SHOWN: "#878787", CONTRADICTED: "#d73027"}
ERROR_FLOOR = 1e-4  # an error rate of 0 (every test image right) is counted as this, so that its log is finite
DETERMINISM = ("Same params and data give bit-identical weights on one machine only (tested there). Another CPU "
               "(other oneDNN kernels, another instruction set) or a GPU rounds differently, and a deep net "
               "amplifies that: compare the spread across seeds, not single values, across machines.")


class MissingSeedError(FileNotFoundError):
    """A seed's metrics file is not there: the claims run has not run (or not for this seed)."""


# ------------------------------------------------------------------------------------------------- reading

def seeds_of(params: Params) -> list[int]:
    """The seeds of every experiment and MC-dropout claim: the main job's seed first, then claims.seeds."""
    return [params.seed, *params.claims.seeds]


def _read_seed_file(path: Path, seed: int, what: str, main: bool = False) -> dict:
    if not Path(path).is_file():
        if main:
            raise MissingSeedError(f"no metrics for {what}, seed {seed} (the main job's): {path} is missing. Run "
                                   "`dvc repro` (the main job) first, then `make claims`")
        raise MissingSeedError(
            f"no metrics for {what}, seed {seed}: {path} is missing. Run `make claims` (it trains every experiment "
            f"with each of claims.seeds), or drop seed {seed} from claims.seeds in params.yaml")
    data = read_json(path)
    found = data.get("seed") if isinstance(data, dict) else None
    if found is not None and found != seed:
        raise MissingSeedError(f"{path} holds seed {found}, not {seed}: it is stale; run `make claims` again")
    return data


def experiment_path(name: str, seed: int, params: Params, experiments_dir: Path, claims_dir: Path) -> Path:
    if seed == params.seed:
        return Path(experiments_dir) / f"{name}.json"
    return Path(claims_dir) / f"seed_{seed}" / f"{name}.json"


def mc_path(seed: int, params: Params, mc_json: Path, claims_dir: Path) -> Path:
    return Path(mc_json) if seed == params.seed else Path(claims_dir) / "mc_dropout" / f"seed_{seed}.json"


def is_transfer(pair: ClaimPair, params: Params) -> bool:
    """B-on-A against model B (the transfer steps), unless experiments of those names exist (claims_schema.problems)."""
    return all(side in TRANSFER_SIDES and side not in params.experiments for side in (pair.better, pair.than))


def sides_of(params: Params) -> tuple[list[str], list[str], bool]:
    """(experiments, MC-dropout sources, whether a transfer claim is there) the claims compare, in order."""
    exps: list[str] = []
    mc: list[str] = []
    transfer = False
    for p in params.claims.pairs():
        if is_transfer(p, params):
            transfer = True
            continue
        for side in (p.better, p.than):
            if "@" in side:
                src = side.partition("@")[2]
                if src not in mc:
                    mc.append(src)
            elif side not in exps:
                exps.append(side)
    return exps, mc, transfer


def load_data(params: Params, experiments_dir: Path, claims_dir: Path, mc_json: Path, model_b_metrics: Path,
              b_on_a_metrics: Path) -> dict[str, Any]:
    """Every metrics file the claims need, by seed: {"experiments": {name: {seed: metrics}}, "mc": {seed: {source:
    metrics}}, "transfer": {seed: {"model_b": metrics, "b_on_a": metrics}}}. A missing seed is an error."""
    exps, mc, transfer = sides_of(params)
    seeds = seeds_of(params)
    data: dict[str, Any] = {"experiments": {}, "mc": {}, "transfer": {}}
    for name in dict.fromkeys([*exps, *params.experiments]):  # the claims' sides, then every other experiment
        data["experiments"][name] = {
            s: _read_seed_file(experiment_path(name, s, params, experiments_dir, claims_dir), s, f"experiment {name!r}",
                               main=s == params.seed)
            for s in seeds}
    if mc:
        for s in seeds:
            d = _read_seed_file(mc_path(s, params, mc_json, claims_dir), s, "MC dropout", main=s == params.seed)
            missing = [m for m in mc if m not in d]
            if missing:
                raise MissingSeedError(f"{mc_path(s, params, mc_json, claims_dir)} has no MC-dropout result for "
                                       f"{', '.join(missing)} (seed {s}); rerun the mc_dropout step (`make claims`)")
            data["mc"][s] = d
    if transfer:
        b, ba = (read_json(p) if Path(p).is_file() else None for p in (model_b_metrics, b_on_a_metrics))
        for path, d in ((model_b_metrics, b), (b_on_a_metrics, ba)):
            if d is None:
                raise MissingSeedError(f"{path} is missing: the transfer claims need the main job's transfer steps; "
                                       "run `dvc repro` first")
        for s in params.transfer.seeds:
            rows = {k: d.get("per_seed", {}).get(str(s)) for k, d in (("model_b", b), ("b_on_a", ba))}
            lost = [k for k, v in rows.items() if v is None]
            if lost:
                raise MissingSeedError(f"transfer seed {s} is not in {', '.join(lost)}'s per_seed "
                                       f"({model_b_metrics}, {b_on_a_metrics}): rerun `dvc repro` (transfer.seeds changed?)")
            data["transfer"][s] = rows
    return data


# ------------------------------------------------------------------------------------------------- statistics

def metric_value(metrics: dict, metric: str) -> float:
    """One side's value at one seed (``overfit_gap`` = train - valid accuracy)."""
    if metric == "overfit_gap":
        return float(metrics["train_accuracy"]) - float(metrics["valid_accuracy"])
    return float(metrics[metric])


def side_values(pair: ClaimPair, data: dict[str, Any], params: Params) -> tuple[list[int], list[float], list[float]]:
    """(seeds, better's values, than's values) of a claim. For the error-rate factor the values are the test
    error rates (1 - test accuracy)."""
    if "@" in pair.better:
        seeds = sorted(data["mc"])
        key = {"accuracy": "{}_accuracy", "ece": "{}_ece"}[pair.metric]

        def mc_value(side: str, s: int) -> float:
            kind, _, src = side.partition("@")
            return float(data["mc"][s][src][key.format("mc" if kind == "mc_dropout" else "deterministic")])

        return seeds, [mc_value(pair.better, s) for s in seeds], [mc_value(pair.than, s) for s in seeds]
    if is_transfer(pair, params):
        seeds = list(data["transfer"])
        if pair.metric == "error_rate_factor":
            def err(side: str, s: int) -> float:
                return max(1.0 - float(data["transfer"][s][side]["test_accuracy"]), ERROR_FLOOR)
            return seeds, [err(pair.better, s) for s in seeds], [err(pair.than, s) for s in seeds]
        return (seeds, [metric_value(data["transfer"][s][pair.better], pair.metric) for s in seeds],
                [metric_value(data["transfer"][s][pair.than], pair.metric) for s in seeds])
    runs_b, runs_t = data["experiments"][pair.better], data["experiments"][pair.than]
    seeds = list(runs_b)
    return seeds, [metric_value(runs_b[s], pair.metric) for s in seeds], [metric_value(runs_t[s], pair.metric) for s in seeds]


def differences(metric: str, better: list[float], than: list[float]) -> list[float]:
    """Per seed: better - than; for the error-rate factor log(err_than / err_better) (> 0: fewer errors)."""
    if metric == "error_rate_factor":
        return [math.log(t / b) for b, t in zip(better, than)]
    return [b - t for b, t in zip(better, than)]


def paired_t_interval(diffs: list[float], confidence: float) -> tuple[float, float, float]:
    """(mean, low, high): the Student t interval of the mean of the paired differences (n - 1 degrees of freedom).
    Needs n >= 2; identical differences give the point interval [mean, mean]."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    n = d.size
    if n < 2:
        raise ValueError("a confidence interval needs at least two seeds")
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * se
    return mean, mean - half, mean + half


def verdict(low: float, high: float, expect: str) -> str:
    """supported: the interval entirely on the expected side of 0; contradicted: entirely on the other; else not shown."""
    sign = 1 if expect == "higher" else -1
    lo, hi = sorted((sign * low, sign * high))
    return SUPPORTED if lo > 0 else CONTRADICTED if hi < 0 else NOT_SHOWN


def evaluate(pair: ClaimPair, seeds: list[int], better: list[float], than: list[float], confidence: float) -> dict:
    """One claim's result: the per-seed values, the mean difference, its interval, n and the verdict."""
    diffs = differences(pair.metric, better, than)
    n = len(diffs)
    out: dict[str, Any] = {
        **pair.model_dump(), "n": n, "seeds": seeds,
        "per_seed": {str(s): {"better": b, "than": t, "diff": d} for s, b, t, d in zip(seeds, better, than, diffs)},
    }
    if n < 2:
        out.update(mean_diff=float(diffs[0]) if diffs else None, ci_low=None, ci_high=None, verdict=ONE_SEED)
    else:
        mean, lo, hi = paired_t_interval(diffs, confidence)
        out.update(mean_diff=mean, ci_low=lo, ci_high=hi, verdict=verdict(lo, hi, pair.expect))
    if pair.metric == "error_rate_factor":
        out["factor"] = {k: (math.exp(out[k]) if out[k] is not None else None) for k in ("mean_diff", "ci_low", "ci_high")}
    return out


def evaluate_all(params: Params, data: dict[str, Any]) -> list[dict]:
    return [evaluate(p, *side_values(p, data, params), params.claims.confidence) for p in params.claims.pairs()]


def summary_line(results: list[dict]) -> str:
    count = {v: sum(r["verdict"].startswith(v) for r in results) for v in (SUPPORTED, NOT_SHOWN, CONTRADICTED)}
    return (f"{count[SUPPORTED]} supported, {count[NOT_SHOWN]} not shown, {count[CONTRADICTED]} contradicted "
            f"of {len(results)} claims")


# ------------------------------------------------------------------------------------------------- ours vs the book

def spread(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def _book_accuracy(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["metric"].startswith(("val_accuracy", "test_accuracy")) and "stated" not in e["metric"]]


def ours_vs_book(params: Params, data: dict[str, Any], book: dict[str, list[dict]]) -> list[dict]:
    """Per experiment (and model B, B-on-A): valid / test accuracy over the seeds and the value
    the seeds print, with whether it lies within our range (min-max). A value printed at another epoch than our
    last one is shown but not compared (not the same quantity)."""
    rows: list[dict] = []
    for name, runs in data["experiments"].items():
        vals = list(runs.values())
        row = {"experiment": name, "seeds": [int(s) for s in runs],
               "valid_accuracy": spread([m["valid_accuracy"] for m in vals]),
               "test_accuracy": spread([m["test_accuracy"] for m in vals]), "book": []}
        spec = params.experiments.get(name)
        for e in _book_accuracy(book.get(name, [])):
            which = "valid_accuracy" if e["metric"].startswith("val_") else "test_accuracy"
            epoch = str(e.get("epoch") or "")
            at, _, of = epoch.partition("/")
            ours_epochs = spec.train.epochs if spec else None
            comparable = not epoch or (at == of and ours_epochs is not None and int(at) == ours_epochs)
            s = row[which]
            row["book"].append({
                "value": float(e["value"]), "quantity": which, "epoch": epoch or None, "source": e["seed"],
                "line": e.get("line"), "comparable": comparable,
                "within": (s["min"] <= float(e["value"]) <= s["max"]) if comparable else None})
        rows.append(row)
    if data["transfer"]:
        for key in ("model_b", "b_on_a"):
            accs = [data["transfer"][s][key]["test_accuracy"] for s in data["transfer"]]
            s = spread(accs)
            rows.append({"experiment": key, "seeds": [int(x) for x in data["transfer"]], "valid_accuracy": None,
                         "test_accuracy": s,
                         "book": [{"value": float(e["value"]), "quantity": "test_accuracy", "epoch": None,
                                   "source": e["seed"], "line": e.get("line"), "comparable": True,
                                   "within": s["min"] <= float(e["value"]) <= s["max"]}
                                  for e in _book_accuracy(book.get(key, []))]})
        factors = [(1 - data["transfer"][s]["model_b"]["test_accuracy"]) / max(1 - data["transfer"][s]["b_on_a"]["test_accuracy"], ERROR_FLOOR)
                   for s in data["transfer"]]
        f = spread(factors)
        rows.append({"experiment": "error-rate factor (B / B-on-A)", "seeds": [int(x) for x in data["transfer"]],
                     "valid_accuracy": None, "test_accuracy": None, "factor": f,
                     "book": [{"value": float(e["value"]), "quantity": "factor", "epoch": None, "source": e["seed"],
                               "line": e.get("line"), "comparable": True, "within": f["min"] <= float(e["value"]) <= f["max"]}
                              for e in book.get("transfer_factor", [])]})
    return rows


# ------------------------------------------------------------------------------------------------- the machine

def machine(params: Params | None = None) -> dict[str, Any]:
    """The machine and build that produced the numbers: CPU model and instruction sets, TensorFlow's version and
    build info, the oneDNN setting, the threads."""
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu or platform.processor() or "unknown",
        "cpu_isa": [f for f in ("avx512f", "avx512_vnni", "amx_tile", "avx2", "fma", "sse4_2") if f in flags],
        "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
    }
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    info["onednn"] = (f"TF_ENABLE_ONEDNN_OPTS={onednn}" if onednn is not None
                      else "TF_ENABLE_ONEDNN_OPTS unset (TensorFlow's default: oneDNN on for x86 CPUs)")
    try:
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
        info["tensorflow_build"] = {k: (v if isinstance(v, (str, int, float, bool)) else str(v))
                                    for k, v in dict(tf.sysconfig.get_build_info()).items()}
        info["gpus"] = [d.name for d in tf.config.list_physical_devices("GPU")]
    except Exception as err:  # noqa: BLE001 - the report still names what it can
        info["tensorflow"] = f"unavailable ({type(err).__name__}: {err})"
        info["tensorflow_build"] = {}
    if params is not None:
        info["deterministic"] = params.runtime.deterministic
        tuning = params.runtime.tuning
        info["threads"] = (f"intra-op {tuning.intra_op_threads or 'TensorFlow default'}, "
                           f"inter-op {tuning.inter_op_threads or 'TensorFlow default'}")
    return info


# ------------------------------------------------------------------------------------------------- rendering

def _unit(metric: str) -> str:
    if metric == "error_rate_factor":
        return "factor"
    if metric.endswith("accuracy") or metric == "overfit_gap":
        return "points"
    return "raw"


def _fmt_value(metric: str, v: float) -> str:
    if metric == "error_rate_factor":
        return f"{100 * v:.2f}"  # an error rate, in %
    return f"{100 * v:.2f}" if _unit(metric) == "points" else f"{v:.4f}"


def _fmt_diff(r: dict, v: float | None) -> str:
    if v is None:
        return "–"
    if r["metric"] == "error_rate_factor":
        return f"×{math.exp(v):.2f}"
    return f"{100 * v:+.2f}" if _unit(r["metric"]) == "points" else f"{v:+.4f}"


def _metric_label(metric: str) -> str:
    return {"overfit_gap": "overfit gap (train − valid acc)", "error_rate_factor": "test error-rate factor",
            "accuracy": "test accuracy", "ece": "test ECE"}.get(metric, metric.replace("_", " "))


def render_md(params: Params, results: list[dict], book_rows: list[dict], info: dict[str, Any],
              forest_link: str = "claims_forest.png") -> str:
    conf = round(100 * params.claims.confidence)
    seeds = seeds_of(params)
    md = ["# The chapter's claims, tested over seeds", "",
          f"**{summary_line(results)}** ({conf} % confidence intervals, seeds {', '.join(map(str, seeds))}; "
          f"transfer: seeds {', '.join(map(str, params.transfer.seeds)) if params.transfer else '–'}).", "",
          f"Each claim compares *better* against *than* on one metric, paired by seed: per seed the difference "
          f"better − than, then the mean and a {conf} % Student t interval of that mean (n − 1 degrees of freedom; "
          "`claims.interval: paired_t`). **supported**: the interval lies entirely on the side the book expects; "
          "**contradicted**: entirely on the other side; **not shown**: it crosses 0. Accuracies and differences in "
          "points (%); the error-rate factor is (1 − acc_B) / (1 − acc_BonA) on the test set, averaged as its log "
          "per seed (its per-seed values are the test error rates, %). Claims are data: `claims.list` in params.yaml.", ""]
    if len(seeds) < 2:
        md += ["Only one seed (`claims.seeds` is empty): no claim on the experiments can be shown. Run `make claims`.", ""]
    md += ["| claim | better | than | metric | expect | mean diff | CI | n | verdict | per seed: better / than | source |",
           "|---|---|---|---|---|---:|---|---:|---|---|---|"]
    for r in results:
        ci = "–" if r["ci_low"] is None else f"[{_fmt_diff(r, r['ci_low'])}, {_fmt_diff(r, r['ci_high'])}]"
        per = "; ".join(f"{s}: {_fmt_value(r['metric'], v['better'])} / {_fmt_value(r['metric'], v['than'])}"
                        for s, v in r["per_seed"].items())
        word = f"**{r['verdict']}**" if r["verdict"] in (SUPPORTED, CONTRADICTED) else r["verdict"]
        md.append(f"| {r['id']} | {r['better']} | {r['than']} | {_metric_label(r['metric'])} | {r['expect']} | "
                  f"{_fmt_diff(r, r['mean_diff'])} | {ci} | {r['n']} | {word} | {per} | {r['source']} |")
    md += ["", "What each claim says (the seed's words, then the claim as tested here):", ""]
    for name, c in params.claims.list.items():
        quote = f"“{c.quote}” " if c.quote else ""
        md.append(f"- **{name}** ({c.source}{f':{c.line}' if c.line else ''}): {quote}— {c.text}.")
    md += ["", f"![forest plot]({forest_link})", "",
           "The forest plot shows each claim's mean difference and interval in the direction the book expects "
           "(right of 0: as the book says), coloured by verdict.", ""]
    md += ["## Ours vs the book", "",
           "Valid / test accuracy (%) of every experiment, mean ± std over the seeds and the range "
           "(min–max), beside the value the seed documents print (`components/data/book_values.yaml`) and whether it "
           "lies within our range. A value printed at an earlier epoch than our last is not the same quantity: shown, "
           "not compared. The error-rate factor here is the arithmetic mean over the transfer seeds (the claim above "
           "averages its log: a geometric mean).", "",
           "| experiment | n | valid acc mean ± std | valid min–max | test acc mean ± std | test min–max | book | within our range |",
           "|---|---:|---:|---:|---:|---:|---|---|"]

    def ms(s: dict | None) -> tuple[str, str]:
        if not s:
            return "–", "–"
        std = f" ± {100 * s['std']:.2f}" if s["std"] is not None else ""
        return f"{100 * s['mean']:.2f}{std}", f"{100 * s['min']:.2f}–{100 * s['max']:.2f}"

    for row in book_rows:
        (vm, vr), (tm, tr) = ms(row["valid_accuracy"]), ms(row["test_accuracy"])
        if row.get("factor"):
            f = row["factor"]
            tm, tr = f"×{f['mean']:.2f} ± {f['std'] or 0:.2f}", f"×{f['min']:.2f}–×{f['max']:.2f}"
        book = "; ".join((f"×{b['value']:.2f} (" if b["quantity"] == "factor" else f"{100 * b['value']:.2f} (")
                         + f"{b['quantity'].split('_')[0]}"
                         + (f", epoch {b['epoch']}" if b["epoch"] else "") + f", {b['source'][:3]})" for b in row["book"]) or "–"
        within = "; ".join("yes" if b["within"] else "no" if b["within"] is False else "not comparable (other epoch)"
                           for b in row["book"]) or "–"
        md.append(f"| {row['experiment']} | {len(row['seeds'])} | {vm} | {vr} | {tm} | {tr} | {book} | {within} |")
    build = info.get("tensorflow_build") or {}
    md += ["", "## Machine", "",
           f"- CPU: {info['cpu']} ({info.get('cores')} logical cores; instruction sets: "
           f"{', '.join(info.get('cpu_isa') or []) or 'unknown'}); {info.get('platform')}; Python {info.get('python')}",
           f"- TensorFlow {info.get('tensorflow')}; build: "
           + (", ".join(f"{k}={v}" for k, v in sorted(build.items())) or "unknown"),
           f"- oneDNN: {info.get('onednn')}"
           + (f"; GPUs: {', '.join(info['gpus'])}" if info.get("gpus") else "; no GPU"),
           f"- runtime.deterministic: {str(info.get('deterministic', '–')).lower()}; threads: {info.get('threads', '–')}",
           "", DETERMINISM, ""]
    return "\n".join(md)


def forest_plot(results: list[dict], path: Path, confidence: float) -> None:
    """Every claim's mean difference with its interval, in the direction the claim expects (right of 0: as the book
    says), one panel per unit, coloured by verdict."""
    plt = pyplot()
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(_unit(r["metric"]) if r["metric"] != "ece" else "ece", []).append(r)
    titles = {"points": "accuracy / overfit gap: difference in points, signed so that right of 0 is what the book says",
              "raw": "loss: difference, signed so that right of 0 is what the book says",
              "ece": "ECE: decrease with MC dropout (right of 0: lower ECE, as the book says)",
              "factor": "test error-rate factor B / B-on-A (log scale; right of 1: as the book says)"}
    order = [g for g in ("points", "raw", "ece", "factor") if g in groups]
    heights = [max(len(groups[g]), 1) + 1.5 for g in order] or [2]
    fig, axes = plt.subplots(len(order) or 1, 1, figsize=(11, 0.32 * sum(heights) + 1.2), layout="constrained",
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, g in zip(axes[:, 0], order):
        rows = groups[g]
        for i, r in enumerate(rows):
            y = len(rows) - 1 - i
            sign = 1 if r["expect"] == "higher" else -1
            scale = 100 if g == "points" else 1
            colour = VERDICT_COLOURS.get(r["verdict"], VERDICT_COLOURS[NOT_SHOWN])
            if g == "factor":
                tf = lambda v: math.exp(v)  # noqa: E731
                sign = 1
            else:
                tf = lambda v: v * scale  # noqa: E731
            if r["mean_diff"] is not None:
                ax.plot([tf(sign * r["mean_diff"])], [y], "o", color=colour)
            if r["ci_low"] is not None:
                lo, hi = sorted((tf(sign * r["ci_low"]), tf(sign * r["ci_high"])))
                ax.plot([lo, hi], [y, y], "-", color=colour, lw=2)
        ax.axvline(1 if g == "factor" else 0, color="black", lw=0.8)
        if g == "factor":
            from matplotlib.ticker import FuncFormatter, LogLocator

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(0.25, 0.5, 1.0, 2.0, 4.0)))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"×{v:g}"))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["id"] for r in reversed(rows)], fontsize=7)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_title(titles[g], fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", color=c, ls="-", label=v) for v, c in VERDICT_COLOURS.items()]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(f"The chapter's claims: mean paired difference, {round(100 * confidence)} % CI (paired t)", fontsize=10)
    save_png(fig, Path(path))


# ------------------------------------------------------------------------------------------------- MLflow

TABLE_COLUMNS = ("id", "claim", "better", "than", "metric", "expect", "mean_diff", "ci_low", "ci_high", "n", "verdict",
                 "source", "text")


def claims_table(results: list[dict]) -> dict[str, list]:
    """The claims as columns (``mlflow.log_table``), one row per pairwise claim, the per-seed values as JSON text."""
    import json

    table: dict[str, list] = {c: [r.get(c) for r in results] for c in TABLE_COLUMNS}
    table["per_seed"] = [json.dumps(r["per_seed"]) for r in results]
    return table


def log_to_mlflow(params: Params, results: list[dict], files: list[Path]) -> None:
    """The claims on their own child run and on the execution's parent run: the table and the files (report,
    JSON, forest plot); the parent gets the summary line as a tag."""
    from . import tracking

    summary = summary_line(results)
    with tracking.step_run("claims", params, [], tags=tracking.run_tags(
            "claims", "claims", f"The chapter's claims over seeds {seeds_of(params)}: {summary}")) as tracker:
        if tracker is None or tracker._offline():
            return
        table = claims_table(results)
        for f in files:
            tracker.log_artifact(f)
        tracker.client.log_table(tracker.run_id, table, "claims_table.json")
        tracker.set_tags({"claims": summary})
        parent = tracker.client.get_run(tracker.run_id).data.tags["mlflow.parentRunId"]
        parent_tracker = tracking.Tracker(tracker.client, parent, tracker.experiment_id)
        for f in files:
            parent_tracker.log_artifact(f, "claims")
        tracker.client.log_table(parent, table, "claims_table.json")
        parent_tracker.set_tags({"claims": summary})
        log.info("MLflow: the claims table (claims_table.json) and the forest plot are on the parent run %s", parent)


# ------------------------------------------------------------------------------------------------- the step

def run(params: Params, experiments_dir: Path, claims_dir: Path, mc_json: Path, model_b_metrics: Path,
        b_on_a_metrics: Path, report_md: Path, forest_png: Path, claims_json: Path) -> dict:
    """Read every seed's metrics, test every claim, write reports/claims.md, the forest plot and metrics/claims.json,
    log them to MLflow. A missing seed file is an error naming it (run `make claims`)."""
    pairs = params.claims.pairs()
    if not pairs:
        log.warning("claims.list in params.yaml is empty: nothing to test")
    seeds = seeds_of(params)
    log.info("testing %d claims (%d pairwise) over seeds %s", len(params.claims.list), len(pairs),
             ", ".join(map(str, seeds)))
    data = load_data(params, experiments_dir, claims_dir, mc_json, model_b_metrics, b_on_a_metrics)
    results = evaluate_all(params, data)
    book_rows = ours_vs_book(params, data, load_book_values())
    info = machine(params)
    out = {"summary": summary_line(results), "seeds": seeds,
           "transfer_seeds": list(params.transfer.seeds) if params.transfer else [],
           "confidence": params.claims.confidence, "interval": params.claims.interval,
           "claims": results, "ours_vs_book": book_rows, "machine": info, "determinism": DETERMINISM}
    forest_plot(results, Path(forest_png), params.claims.confidence)
    link = Path(os.path.relpath(Path(forest_png).resolve(), Path(report_md).resolve().parent)).as_posix()
    write_text(report_md, render_md(params, results, book_rows, info, link))
    write_json(claims_json, out)
    log_to_mlflow(params, results, [Path(report_md), Path(claims_json), Path(forest_png)])
    log.info("claims: %s -> %s", out["summary"], Path(report_md).resolve())
    for r in results:
        if r["verdict"] == CONTRADICTED:
            log.info("contradicted: %s (%s)", r["id"], r["text"])
    return out
