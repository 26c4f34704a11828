"""The claims report (components/claims.py): the statistics against scipy and a hand computation, the schema's
errors, the report from small fake metrics files, a missing seed, one seed, and the table and plot on MLflow."""
from __future__ import annotations

import json
import math
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from components import claims
from components.claims_schema import Claim, ClaimPair
from components.config import ParamsError, validate_params

from .conftest import ROOT

SEEDS_DIR = ROOT.parent / "shared" / "seeds"


def raw_params(seeds: list[int] | None = None, mlflow: bool = False) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if seeds is not None:
        raw["claims"]["seeds"] = seeds
    raw["mlflow"]["enabled"] = mlflow
    return raw


def pair(metric: str = "valid_accuracy", expect: str = "higher", better: str = "a", than: str = "b") -> ClaimPair:
    return ClaimPair(id="c", claim="c", better=better, than=than, metric=metric, expect=expect, text="t",
                     source="seeds/000_1fd550067386462c.txt")


# ------------------------------------------------------------------------------------------------- statistics

A = [0.851, 0.862, 0.840, 0.871, 0.853]
B = [0.832, 0.845, 0.829, 0.850, 0.841]


def test_paired_interval_is_scipys_paired_t_and_the_hand_formula():
    diffs = [a - b for a, b in zip(A, B)]
    mean, lo, hi = claims.paired_t_interval(diffs, 0.95)
    ci = stats.ttest_rel(A, B).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-9)
    d = np.array(diffs)
    half = 2.7764451051977987 * d.std(ddof=1) / math.sqrt(5)  # t(0.975, 4 degrees of freedom), from a t table
    assert (mean, lo, hi) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half), rel=1e-9)
    mean90, lo90, hi90 = claims.paired_t_interval(diffs, 0.90)
    assert mean90 == pytest.approx(mean) and lo < lo90 < mean < hi90 < hi  # lower confidence: a narrower interval


@pytest.mark.parametrize("better, than, expect, verdict", [
    (A, B, "higher", "supported"),                                      # CI entirely above 0
    (B, A, "higher", "contradicted"),                                   # entirely below
    (A, [0.86, 0.84, 0.85, 0.86, 0.86], "higher", "not shown"),         # crosses 0
    (B, A, "lower", "supported"),                                       # lower is better: below 0 supports
    (A, B, "lower", "contradicted"),
])
def test_verdicts(better, than, expect, verdict):
    r = claims.evaluate(pair(expect=expect), [42, 43, 44, 45, 46], better, than, 0.95)
    ci = stats.ttest_rel(better, than).confidence_interval(0.95)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert r["mean_diff"] == pytest.approx(np.mean(better) - np.mean(than))
    assert r["verdict"] == verdict and r["n"] == 5
    assert r["per_seed"]["44"] == {"better": better[2], "than": than[2], "diff": pytest.approx(better[2] - than[2])}
    on_the_expected_side = ci.low > 0 if expect == "higher" else ci.high < 0
    assert (verdict == "supported") == on_the_expected_side


def test_identical_differences_give_a_point_interval():
    r = claims.evaluate(pair(), [1, 2, 3], [0.9, 0.8, 0.7], [0.8, 0.7, 0.6], 0.95)
    assert r["ci_low"] == pytest.approx(0.1) and r["ci_high"] == pytest.approx(0.1) and r["verdict"] == "supported"
    r = claims.evaluate(pair(), [1, 2], [0.8, 0.7], [0.8, 0.7], 0.95)
    assert r["verdict"] == "not shown"  # no difference at all is not an effect


def test_error_rate_factor_is_the_geometric_mean_of_the_per_seed_factors():
    acc_b, acc_ba = [0.97, 0.98, 0.96, 0.975], [0.99, 0.985, 0.99, 0.97]
    err_b, err_ba = [1 - a for a in acc_b], [1 - a for a in acc_ba]
    r = claims.evaluate(pair("error_rate_factor", better="b_on_a", than="model_b"), [42, 43, 44, 45], err_ba, err_b, 0.95)
    factors = [eb / eba for eb, eba in zip(err_b, err_ba)]
    assert r["factor"]["mean_diff"] == pytest.approx(stats.gmean(factors))
    ci = stats.ttest_1samp(np.log(factors), 0).confidence_interval(0.95)
    assert (r["factor"]["ci_low"], r["factor"]["ci_high"]) == pytest.approx((math.exp(ci.low), math.exp(ci.high)))
    assert r["verdict"] == ("supported" if ci.low > 0 else "contradicted" if ci.high < 0 else "not shown")


# ------------------------------------------------------------------------------------------------- the schema

def test_order_expands_to_adjacent_pairs():
    c = Claim(source="seeds/004_664fab4db3c7e4c7.txt", text="t", metric="valid_accuracy", expect="higher",
              order=["x", "y", "z"])
    got = [(p.id, p.better, p.than) for p in c.pairs("rank")]
    assert got == [("rank[x vs y]", "x", "y"), ("rank[y vs z]", "y", "z")]
    assert [(p.id, p.better, p.than) for p in Claim(source=c.source, text="t", metric="ece", expect="lower",
                                                        better="m", than="d").pairs("one")] == [("one", "m", "d")]


def test_the_repository_claims_cover_the_issue():
    p = validate_params(raw_params())
    assert p.claims.seeds == [43, 44, 45, 46] and p.seed not in p.claims.seeds
    pairs = {(x.better, x.than, x.metric) for x in p.claims.pairs()}
    order = ["act_mish", "act_swish", "act_gelu", "act_selu", "act_elu", "act_leaky_relu", "act_relu", "act_tanh", "act_sigmoid"]
    assert {(a, b, "valid_accuracy") for a, b in zip(order, order[1:])} <= pairs
    for opt in ("momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamax", "nadam", "adamw"):
        assert (f"opt_{opt}", "opt_sgd", "valid_accuracy") in pairs
    for sched in ("power", "exponential", "piecewise", "performance", "1cycle"):
        assert (f"lr_{sched}", "lr_constant", "valid_accuracy") in pairs
    for reg, base in (("l1", "reg_none"), ("l2", "reg_none"), ("l1_l2", "reg_none"), ("dropout", "dropout_none"),
                      ("alpha_dropout", "alpha_dropout_none"), ("max_norm", "max_norm_none")):
        assert {(reg, base, "overfit_gap"), (reg, base, "test_accuracy")} <= pairs
    for src in p.mc_dropout.sources:
        assert {(f"mc_dropout@{src}", f"deterministic@{src}", m) for m in ("accuracy", "ece")} <= pairs
    assert ("b_on_a", "model_b", "error_rate_factor") in pairs
    assert {("bn_after", "bn_none"), ("bn_before", "bn_none"), ("selu_deep", "relu_deep"), ("init_he_normal", "init_glorot_uniform"),
            ("act_selu", "init_selu_glorot"), ("clip_value", "opt_sgd"), ("clip_norm", "opt_sgd")} <= {(a, b) for a, b, _ in pairs}
    assert len(pairs) >= 15


def test_every_claim_quotes_its_seed_document():
    """The quote stands on the named line of the named seed document (../shared/seeds, beside the repository)."""
    assert SEEDS_DIR.is_dir(), f"{SEEDS_DIR} is missing: the seed documents sit beside the repository (../shared/seeds)"
    p = validate_params(raw_params())
    for name, c in p.claims.list.items():
        lines = (SEEDS_DIR.parent / c.source).read_text().splitlines()
        assert c.line is not None and c.quote and c.quote in lines[c.line - 1], (name, c.source, c.line)


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["list"]["he_vs_glorot_relu"].update(better="init_he_normall"),
     "claims.list.he_vs_glorot_relu: 'init_he_normall' is not an experiment"),
    (lambda c: c["list"]["activation_ranking"]["order"].append("act_softplus"),
     "claims.list.activation_ranking: 'act_softplus' is not an experiment"),
    (lambda c: c["list"]["he_vs_glorot_relu"].update(metric="val_accuracy"),
     "claims.list.he_vs_glorot_relu: unknown metric 'val_accuracy' for these sides; use one of: train_accuracy"),
    (lambda c: c["list"]["mc_dropout_ece"].update(metric="valid_accuracy"),
     "claims.list.mc_dropout_ece: unknown metric 'valid_accuracy' for these sides; use one of: accuracy, ece"),
    (lambda c: c["list"]["mc_dropout_ece"].update(better="mc_dropout@l2"), "'l2' is not an mc_dropout source"),
    (lambda c: c["list"]["transfer_error_rate"].update(than="opt_sgd"), "compares different kinds of sides"),
    (lambda c: c.update(seeds=[43, 44, 43]), "'claims.seeds': Value error, seed(s) [43] listed twice"),
    (lambda c: c.update(seeds=[42, 43]), "claims.seeds: 42 is `seed`, which the main job already runs"),
    (lambda c: c["list"]["he_vs_glorot_relu"].update(order=["a", "b"]), "give either better + than, or order"),
    (lambda c: c["list"]["he_vs_glorot_relu"].pop("than"), "give better and than"),
    (lambda c: c["list"]["he_vs_glorot_relu"].update(source="seeds/9.txt"), "'claims.list.he_vs_glorot_relu.source'"),
    (lambda c: c["list"]["he_vs_glorot_relu"].update(expect="more"), "'claims.list.he_vs_glorot_relu.expect'"),
])
def test_bad_claims_are_named_before_any_work(mutate, expected):
    r = raw_params()
    mutate(r["claims"])
    with pytest.raises(ParamsError) as info:
        validate_params(r)
    assert expected in str(info.value)


def test_adding_a_claim_is_yaml_only(tmp_path):
    r = raw_params(seeds=[43])
    r["claims"]["list"]["prelu_vs_leaky"] = {"source": "seeds/001_08583e6fb078cf42.txt", "text": "PReLU vs LeakyReLU",
                                             "metric": "test_loss", "expect": "lower", "better": "prelu", "than": "leaky_relu"}
    p = validate_params(r)
    d = fake_metrics(tmp_path, p)
    out = claims.run(p, **d)
    got = next(c for c in out["claims"] if c["id"] == "prelu_vs_leaky")
    want = [fake_value("prelu", s, "test_loss") - fake_value("leaky_relu", s, "test_loss") for s in (42, 43)]
    assert [v["diff"] for v in got["per_seed"].values()] == pytest.approx(want)


# ------------------------------------------------------------------------------------------------- the report

def fake_value(name: str, seed: int, key: str) -> float:
    """A reproducible made-up metric: a per-experiment level plus per-seed noise."""
    rng = np.random.default_rng(zlib.crc32(f"{name}/{key}".encode()) + 1000 * seed)
    level = 0.70 + (sum(map(ord, name)) % 23) / 100
    if key.endswith("loss"):
        return float(1.2 - level + rng.normal(0, 0.01))
    bump = {"train_accuracy": 0.03, "test_accuracy": -0.01}.get(key, 0.0)
    return float(level + bump + rng.normal(0, 0.01))


def fake_metrics(tmp: Path, p, write_seeds: list[int] | None = None) -> dict:
    """The files a claims run reads, made up, in tmp; returns run()'s keyword arguments."""
    exps, mc, _ = claims.sides_of(p)
    exps = list(dict.fromkeys([*exps, *p.experiments]))  # the report reads every experiment (ours vs the book)
    seeds = claims.seeds_of(p) if write_seeds is None else write_seeds
    keys = ("train_accuracy", "valid_accuracy", "test_accuracy", "train_loss", "valid_loss", "test_loss")
    d = {"experiments_dir": tmp / "metrics/experiments", "claims_dir": tmp / "metrics/claims",
         "mc_json": tmp / "metrics/mc_dropout.json", "model_b_metrics": tmp / "metrics/transfer/model_b.json",
         "b_on_a_metrics": tmp / "metrics/transfer/b_on_a.json", "report_md": tmp / "reports/claims.md",
         "forest_png": tmp / "reports/claims_forest.png", "claims_json": tmp / "metrics/claims.json"}
    for s in seeds:
        for name in exps:
            path = claims.experiment_path(name, s, p, d["experiments_dir"], d["claims_dir"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"experiment": name, **{k: fake_value(name, s, k) for k in keys}, "seed": s, "epochs": 3}))
        path = claims.mc_path(s, p, d["mc_json"], d["claims_dir"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({src: {k: fake_value(src, s, k) for k in (
            "deterministic_accuracy", "mc_accuracy", "deterministic_ece", "mc_ece")} for src in mc}))
    d["model_b_metrics"].parent.mkdir(parents=True, exist_ok=True)
    for side in ("model_b", "b_on_a"):
        per_seed = {str(s): {k: fake_value(side, s, k) for k in keys} for s in p.transfer.seeds}
        d[f"{side}_metrics"].write_text(json.dumps({"experiment": side, "per_seed": per_seed}))
    return d


def test_report_from_fake_metrics(tmp_path):
    p = validate_params(raw_params())
    d = fake_metrics(tmp_path, p)
    out = claims.run(p, **d)
    md = d["report_md"].read_text()
    saved = json.loads(d["claims_json"].read_text())
    assert saved["claims"] == json.loads(json.dumps(out["claims"]))
    pairs = p.claims.pairs()
    assert [c["id"] for c in saved["claims"]] == [x.id for x in pairs]
    for c in saved["claims"]:
        assert f"| {c['id']} |" in md and c["verdict"] in ("supported", "not shown", "contradicted")
        assert c["n"] == (len(p.transfer.seeds) if c["metric"] == "error_rate_factor" else 5)
        if c["metric"] in ("valid_accuracy", "test_accuracy", "overfit_gap"):  # recomputed from the files, by hand
            def v(name, s):
                if c["metric"] == "overfit_gap":
                    return fake_value(name, s, "train_accuracy") - fake_value(name, s, "valid_accuracy")
                return fake_value(name, s, c["metric"])
            diffs = [v(c["better"], s) - v(c["than"], s) for s in (42, 43, 44, 45, 46)]
            assert c["mean_diff"] == pytest.approx(np.mean(diffs))
            ci = stats.ttest_1samp(diffs, 0).confidence_interval(0.95)
            assert (c["ci_low"], c["ci_high"]) == pytest.approx((ci.low, ci.high))
    counts = {v: sum(c["verdict"] == v for c in saved["claims"]) for v in ("supported", "not shown", "contradicted")}
    assert (f"{counts['supported']} supported, {counts['not shown']} not shown, {counts['contradicted']} contradicted "
            f"of {len(pairs)} claims") in md
    assert "paired" in md and "Student t" in md
    assert "![forest plot](claims_forest.png)" in md and d["forest_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Ours vs the book" in md and "| selu_deep | 5 |" in md and "| b_on_a | 5 |" in md
    selu = next(r for r in saved["ours_vs_book"] if r["experiment"] == "selu_deep")
    vals = [fake_value("selu_deep", s, "valid_accuracy") for s in (42, 43, 44, 45, 46)]
    assert selu["valid_accuracy"]["mean"] == pytest.approx(np.mean(vals))
    assert selu["valid_accuracy"]["std"] == pytest.approx(np.std(vals, ddof=1))
    book = selu["book"][0]
    assert book["comparable"] and book["within"] == (min(vals) <= book["value"] <= max(vals))
    cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name"))
    machine = md.split("## Machine", 1)[1]
    import tensorflow as tf

    assert cpu in machine and f"TensorFlow {tf.__version__}" in machine and "oneDNN" in machine
    assert "bit-identical weights on one machine only" in machine and "spread across seeds" in machine


def test_a_missing_seed_file_is_named(tmp_path):
    p = validate_params(raw_params())
    d = fake_metrics(tmp_path, p)
    gone = d["claims_dir"] / "seed_45" / "act_gelu.json"
    gone.unlink()
    with pytest.raises(claims.MissingSeedError) as info:
        claims.run(p, **d)
    assert str(gone) in str(info.value) and "make claims" in str(info.value)
    assert not d["report_md"].exists() and not d["claims_json"].exists()
    fake_metrics(tmp_path, p)  # all back but the MC-dropout file of seed 43
    (d["claims_dir"] / "mc_dropout" / "seed_43.json").unlink()
    with pytest.raises(claims.MissingSeedError, match=r"mc_dropout/seed_43\.json is missing.*make claims"):
        claims.run(p, **d)


def test_a_stale_seed_file_is_refused(tmp_path):
    p = validate_params(raw_params())
    d = fake_metrics(tmp_path, p)
    f = d["claims_dir"] / "seed_44" / "bn_none.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "seed": 42}))
    with pytest.raises(claims.MissingSeedError, match="holds seed 42, not 44"):
        claims.run(p, **d)


def test_one_seed_still_renders(tmp_path):
    p = validate_params(raw_params(seeds=[]))
    d = fake_metrics(tmp_path, p)
    assert not d["claims_dir"].exists()
    out = claims.run(p, **d)
    md = d["report_md"].read_text()
    for c in out["claims"]:
        if c["metric"] == "error_rate_factor":  # paired by the transfer seeds the main job runs: still 5
            assert c["n"] == len(p.transfer.seeds) and c["verdict"] in ("supported", "not shown", "contradicted")
        else:
            assert c["n"] == 1 and c["verdict"] == "not shown (one seed: run `make claims`)" and c["ci_low"] is None
            assert f"| {c['id']} |" in md
    assert "run `make claims`" in md and d["forest_png"].is_file()


# ------------------------------------------------------------------------------------------------- MLflow

def test_parent_run_gets_the_table_and_the_plot(tmp_path, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    key = f"claims-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("CH11_PIPELINE_RUN", key)
    p = validate_params(raw_params(seeds=[43, 44], mlflow=True))
    d = fake_metrics(tmp_path, p)
    out = claims.run(p, **d)
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name(p.mlflow.experiment_name)
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`ch11.pipeline_run` = '{key}'")
    parents = [r for r in runs if r.data.tags.get("ch11.step") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert "claims_table.json" in arts and "claims" in arts
    assert {"claims/claims_forest.png", "claims/claims.md", "claims/claims.json"} <= {
        a.path for a in c.list_artifacts(parent.info.run_id, "claims")}
    table = json.loads(Path(c.download_artifacts(parent.info.run_id, "claims_table.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["id"], r["verdict"], r["n"]) for r in rows] == [(x["id"], x["verdict"], x["n"]) for x in out["claims"]]
    png = Path(c.download_artifacts(parent.info.run_id, "claims/claims_forest.png", str(tmp_path / "dl")))
    assert png.read_bytes() == d["forest_png"].read_bytes()
    assert c.get_run(parent.info.run_id).data.tags["claims"] == out["summary"]
    child = next(r for r in c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"))
    assert child.data.tags["ch11.step"] == "claims" and child.info.status == "FINISHED"
