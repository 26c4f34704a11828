"""The MLflow view of the tiny chapter (tests/conftest.py `chapter_repro`, a real `mlflow server`): can a user tell
which variant is best in one view? Tags, descriptions, shared metric keys and artifact names on every child run,
a table (not one metric per experiment) on the parent, and the UI itself in headless Chromium."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chapter")]

TRAINING_STEPS = ("experiment", "model_a", "model_b", "b_on_a")
SHARED_METRICS = {"train_accuracy", "valid_accuracy", "test_accuracy", "train_loss", "valid_loss", "test_loss",
                  "seconds_per_epoch", "epochs"}
COMMON_ARTIFACTS = {"learning_curves.png", "history.csv", "confusion_matrix.png"}


@pytest.fixture(scope="module")
def view(chapter_repo, chapter_repro, mlflow_server):
    """(client, experiment id, parent run, {run name: child run}, params) of the tiny chapter's pipeline run."""
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("ch11-training-deep-nets")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("ch11.step") == "pipeline"
               and r.data.tags.get("ch11.pipeline_run") == "tiny-pipeline-1"]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["mlflow.runName"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and r.info.status == "FINISHED"}
    params = yaml.safe_load((chapter_repo / "params.yaml").read_text())
    return c, exp.experiment_id, parent, children, params


def test_every_child_has_family_experiment_and_its_description(view):
    from components.config import family_of

    c, _, _, children, raw = view
    p = load_params_from(raw)
    assert children
    for name, r in children.items():
        t = r.data.tags
        assert t.get("family") and t.get("experiment"), (name, t)
    for name, spec in p.experiments.items():
        t, prm = children[name].data.tags, children[name].data.params
        assert t["family"] == family_of(name, spec) == raw["experiments"][name]["family"]
        assert t["experiment"] == name
        assert t["mlflow.note.content"] == spec.description  # the run description, not a param
        assert "description" not in prm and "family" not in prm
    for seed in raw["transfer"]["seeds"]:
        for side in ("model_b", "b_on_a"):
            t = children[f"{side} seed {seed}"].data.tags
            assert t["family"] == "transfer" and t["experiment"] == side and f"seed {seed}" in t["mlflow.note.content"]
    assert children["model_a"].data.tags["mlflow.note.content"] == raw["transfer"]["model_a"]["description"]
    for name in raw["mc_dropout"]["sources"]:
        assert children[f"mc_dropout {name}"].data.tags["experiment"] == f"mc_dropout@{name}"
    assert {children[s].data.tags["family"] for s in ("download", "split", "standardize")} == {"data"}


def load_params_from(raw: dict):
    import tempfile
    from pathlib import Path

    from components.config import load_params

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "params.yaml").write_text(yaml.safe_dump(raw))
        return load_params(Path(d) / "params.yaml")


def test_training_children_share_metric_keys_and_artifact_names(view):
    """The same final metric keys on every training run (one chart per metric across the variants) and the same
    artifact names at the artifact root (the compare page shows them side by side); model_b and b_on_a included."""
    c, _, _, children, raw = view
    training = {n: r for n, r in children.items() if r.data.tags["ch11.step"] in TRAINING_STEPS}
    expected = set(raw["experiments"]) | {"model_a"} | {f"{s} seed {seed}" for s in ("model_b", "b_on_a")
                                                         for seed in raw["transfer"]["seeds"]}
    assert set(training) == expected
    for name, r in training.items():
        assert SHARED_METRICS <= set(r.data.metrics), (name, SHARED_METRICS - set(r.data.metrics))
        assert not [k for k in r.data.metrics if k.startswith("final_")], name
        assert 0 <= r.data.metrics["test_accuracy"] <= 1
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert COMMON_ARTIFACTS <= arts, (name, arts)
        assert len(c.get_metric_history(r.info.run_id, "loss")) == r.data.metrics["epochs"], name  # curves per epoch
    for name in raw["mc_dropout"]["sources"]:  # MC dropout's accuracy sits in the same column
        assert "test_accuracy" in children[f"mc_dropout {name}"].data.metrics


def test_parent_logs_the_summary_as_a_table_not_one_metric_per_experiment(view, tmp_path):
    c, exp_id, parent, children, raw = view
    assert not [k for k in parent.data.metrics if k.split(".")[0] in set(raw["experiments"]) | {"transfer"}]
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert "experiments_table.json" in arts and "report" in arts
    table = json.loads(open(c.download_artifacts(parent.info.run_id, "experiments_table.json", str(tmp_path))).read())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert {r["experiment"] for r in rows} == set(raw["experiments"])
    for r in rows:
        run = children[r["experiment"]]
        assert r["mlflow_run_id"] == run.info.run_id and r["family"] == run.data.tags["family"]
        assert r["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
    note = parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["best_variant"] in note and "viewStateShareKey=" in note and f"/experiments/{exp_id}/" in note


def test_selu_simulation_has_a_run(view):
    c, _, _, children, raw = view
    r = children["selu_simulation"]
    assert r.data.tags["family"] == "selu" and r.data.tags["mlflow.note.content"]
    layers = raw["selu_simulation"]["layers"]
    std = c.get_metric_history(r.info.run_id, "selu_std")
    assert sorted(m.step for m in std) == list(range(layers))
    assert all(0.5 < m.value < 1.5 for m in std)  # the book's point: SELU keeps std ~1 through depth
    assert {"activations_through_depth.png", "history.csv"} <= {a.path for a in c.list_artifacts(r.info.run_id)}


def test_the_ui_shows_the_variants_in_one_view(view, mlflow_server, tmp_path):
    """Headless Chromium, as a user: the run list's saved view (the link in the parent run's description; also
    one click in the run list's Views menu) lists the child runs with a test_accuracy column, the chart view draws
    test_accuracy across them, and the compare page of three variants shows their common artifacts.
    Screenshots: the test's tmp folder and test-artifacts/."""
    import re

    from .conftest import ROOT

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (make test installs it when run as root)")
    from playwright.sync_api import sync_playwright

    c, exp_id, parent, children, raw = view
    link = re.search(r"\((http[^)]*viewStateShareKey=[^)]*)\)", parent.data.tags["mlflow.note.content"]).group(1)
    assert link.startswith(mlflow_server)
    three = ["leaky_relu", "bn_after", "elu"]
    ids = ",".join(f'"{children[n].info.run_id}"' for n in three)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1600, "height": 2600})  # every row rendered (the grid virtualizes)

        # 1. the link of the parent run's description: no clicks
        page.goto(link)
        page.get_by_role("columnheader", name="test_accuracy").first.wait_for(timeout=90_000)
        page.get_by_text("leaky_relu", exact=True).first.wait_for(timeout=30_000)
        listed = page.inner_text("body")
        page.screenshot(path=str(shots / "mlflow-runs.png"))
        # 2. the chart view of the same view; the diagnostics' per-layer sections (grad_norm/, act_std/) come first
        # and the metric charts render lazily, so the chart search box picks the one chart across the variants
        page.goto(link + "&compareRunsMode=CHART")
        page.get_by_placeholder("Search metric charts").fill("test_accuracy", timeout=60_000)
        page.get_by_text("test_accuracy", exact=True).first.wait_for(timeout=60_000)
        page.wait_for_timeout(2000)
        charts = page.inner_text("body")
        page.screenshot(path=str(shots / "mlflow-charts.png"))
        # 3. the compare page of three variants
        page.goto(f'{mlflow_server}/#/compare-runs?runs=[{ids}]&experiments=["{exp_id}"]')
        page.get_by_text("learning_curves.png").first.wait_for(timeout=60_000)
        compared = page.inner_text("body")
        page.screenshot(path=str(shots / "mlflow-compare.png"), full_page=True)
        # 4. the plain run list: the same view is one click away in the Views menu
        page.goto(f"{mlflow_server}/#/experiments/{exp_id}/runs")
        page.get_by_role("button", name="Views").click(timeout=90_000)
        page.get_by_text("ch11: compare variants").first.click(timeout=30_000)
        page.get_by_role("columnheader", name="test_accuracy").first.wait_for(timeout=60_000)
        browser.close()
    for name in three + [f"model_b seed {raw['transfer']['seeds'][0]}", f"b_on_a seed {raw['transfer']['seeds'][0]}"]:
        assert name in listed, name  # child runs in the list itself, not folded under the parent
    assert "test_accuracy" in listed and "valid_accuracy" in listed
    assert "pipeline tiny-pipeline-1" not in listed and "selu_simulation" not in listed  # only runs with a test accuracy
    assert "test_accuracy" in charts and not re.search(r"\b(leaky_relu|elu|bn_after)\.test_accuracy", charts)
    assert "No common artifacts" not in compared
    assert all(a in compared for a in COMMON_ARTIFACTS), compared[-2000:]
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    for png in shots.iterdir():
        assert png.stat().st_size > 10_000
        shutil.copy2(png, out / png.name)
