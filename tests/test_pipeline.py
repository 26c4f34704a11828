"""The whole chapter as `make repro` runs it (tools/repro.py: `dvc repro`, two stages at a time) on tiny params
(a slice of the real data), against a real MLflow server."""
from __future__ import annotations

import hashlib
import json
import re
import sys

import pytest
import yaml

from .conftest import CHAPTER_EPOCHS as EPOCHS
from .conftest import assert_loads_alone, run

# One xdist worker holds the tiny chapter (a session fixture) for this module and the Kubeflow parity tests.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chapter")]


@pytest.fixture(scope="module")
def repo(chapter_repo):
    return chapter_repo


@pytest.fixture(scope="module")
def repro(chapter_repro):
    return chapter_repro


def test_every_stage_runs_and_the_report_holds_every_experiment(repo, repro):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    expected = ["download", "split", "standardize", "model_a", "model_b", "b_on_a", "report"]
    expected += [f"experiment@{n}" for n in params["experiments"]]
    expected += ["mc_dropout", "selu_simulation"]
    for stage in expected:  # tools/repro.py's progress lines; each stage's own log is in .dvc/tmp/repro-logs/
        assert re.search(rf"done\s+{re.escape(stage)}\b", repro), stage
    assert "Data and pipelines are up to date" in repro  # the closing plain `dvc repro` found nothing left
    assert "[warm] serving: python -m components experiment " in repro  # stages went through the warm server
    report = json.loads((repo / "metrics/report.json").read_text())
    summary = json.loads((repo / "metrics/summary.json").read_text())  # the one file `dvc metrics show` lists
    best = max(report["experiments"], key=lambda r: r["valid_accuracy"])
    assert (summary["best"], summary["best_test"]) == (best["experiment"], round(best["test_accuracy"], 4))
    assert summary["b_on_a"] == round(report["transfer"]["b_on_a_test_accuracy"][0], 4)
    shown = run(["dvc", "metrics", "show"], cwd=repo).stdout
    assert "metrics/summary.json" in shown and max(map(len, shown.splitlines())) < 120, shown[:300]
    assert {r["experiment"] for r in report["experiments"]} == set(params["experiments"])
    assert report["transfer"]["seeds"] == params["transfer"]["seeds"]
    assert set(report["mc_dropout"]) == set(params["mc_dropout"]["sources"])
    md = (repo / "reports/report.md").read_text()
    for name in params["experiments"]:
        assert f"| {name} |" in md
        m = json.loads((repo / f"metrics/experiments/{name}.json").read_text())
        assert m["epochs"] == EPOCHS and 0 <= m["test_accuracy"] <= 1
        assert (repo / f"models/experiments/{name}.keras").is_file()
        assert (repo / f"reports/experiments/{name}/learning_curves.png").is_file()
    assert (repo / "reports/experiments/lr_1cycle/lr_range_test.json").is_file()
    assert (repo / "reports/mc_dropout/dropout/reliability.png").is_file()


def test_every_saved_model_loads_with_keras_alone(repo, repro, tmp_path):
    """Every .keras file the chapter writes (each experiment family, model A, model B and B-on-A per seed) opens
    with `keras.models.load_model` in a Python without this repository, predicting what it predicts here, on
    real test rows (raw 0-255 pixels)."""
    from components.dataset import read_split

    models = sorted((repo / "models").rglob("*.keras"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert set(params["experiments"]) <= {p.stem for p in models}
    assert (repo / "models/transfer/model_a.keras") in models
    for side in ("model_b", "b_on_a"):
        assert {f"seed_{s}" for s in params["transfer"]["seeds"]} == {p.stem for p in models if p.parent.name == side}
    x_full = read_split(repo / "data/splits/full_test.parquet").x.reshape(-1, 784)
    x_b = read_split(repo / "data/splits/b_test.parquet").x.reshape(-1, 784)
    transfer = [p for p in models if "transfer" in p.parts]
    assert_loads_alone([p for p in models if p not in transfer], x_full, tmp_path / "full")
    assert_loads_alone(transfer, x_b, tmp_path / "b")


def test_mlflow_hierarchy_metrics_artifacts_lineage_registry(repo, repro, mlflow_server):
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("ch11-training-deep-nets")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("ch11.step") == "pipeline"
               and r.data.tags.get("ch11.pipeline_run") == "tiny-pipeline-1"]  # other tests share the server
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["ch11.pipeline_run"] == "tiny-pipeline-1"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    names = {r.data.tags["mlflow.runName"] for r in children}
    expected = set(params["experiments"]) | {"download", "split", "standardize", "model_a", "report"}
    expected |= {f"model_b seed {s}" for s in params["transfer"]["seeds"]} | {f"b_on_a seed {s}" for s in params["transfer"]["seeds"]}
    expected |= {f"mc_dropout {s}" for s in params["mc_dropout"]["sources"]}
    assert expected <= names, expected - names
    assert all(r.info.status == "FINISHED" for r in children)
    lock_md5 = {o["path"]: o["md5"] for st in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values() for o in st.get("outs", [])}
    head = run(["git", "rev-parse", "HEAD"], cwd=repo).stdout.strip()
    for r in children:
        if r.data.tags["ch11.step"] != "experiment":
            continue
        name = r.data.tags["mlflow.runName"]
        for key in ("val_accuracy", "loss", "learning_rate", "epoch_seconds"):
            hist = c.get_metric_history(r.info.run_id, key)
            assert [m.step for m in hist] == list(range(1, EPOCHS + 1)), (name, key)
        assert "test_accuracy" in r.data.metrics
        assert r.data.params["experiment"] == name and "model.hidden.0.units" in r.data.params
        t = r.data.tags
        assert t["git.commit"] == head and t["git.dirty"] in ("true", "false") and len(t["params.sha256"]) == 16
        assert t["mlflow.source.git.commit"] == head and t["mlflow.source.name"] == "python -m components experiment"
        assert t["mlflow.user"] and t["mlflow.source.type"] == "LOCAL"
        assert t["device"].startswith(("CPU", "GPU")) and t["version.tensorflow"]
        assert t["dvc.md5.data/splits"] == lock_md5["data/splits"]
        # one dataset per split the experiment read, its DVC md5 (the file's md5, from the .dir manifest) as digest
        task = params["experiments"][name].get("task", "full")
        inputs = {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}) for d in r.inputs.dataset_inputs}
        for split, context in (("train", "training"), ("valid", "validation"), ("test", "test")):
            path = f"data/splits/{task}_{split}.parquet"
            digest, tags = inputs[path]
            assert digest == hashlib.md5((repo / path).read_bytes()).hexdigest() and tags["mlflow.data.context"] == context
        assert "system/cpu_utilization_percentage" in r.data.metrics
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"learning_curves.png", "confusion_matrix.png", "history.csv"} <= arts, arts
    models = {m.name for m in c.search_logged_models([exp.experiment_id])}
    assert models, "no model was logged"
    for short in ("model_a", "b_on_a", "best_variant"):
        mv = c.get_model_version_by_alias(f"ch11_{short}", "champion")
        assert float(mv.tags["valid_accuracy"]) >= 0
    report_arts = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in report_arts


PYFUNC_ALONE = """
import importlib.abc, json, sys
import numpy as np


class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("components", "pipeline", "tests", "tools"):
            raise ImportError(f"{name} must not be needed to serve a registered model")


sys.meta_path.insert(0, NoProject())
import mlflow

job = json.loads(sys.stdin.read())
mlflow.set_tracking_uri(job["uri"])
x = np.load(job["x"]).astype("float32")
out = {name: np.asarray(mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(x)) for name in job["names"]}
for name in job["names"]:  # the logged input example: raw pixels, as float32, and what the model takes
    example = mlflow.models.Model.load(f"models:/{name}@champion").load_input_example()
    out[f"{name}.example"] = np.asarray(example)
np.savez(job["out"], **out)
"""


def test_registered_models_serve_with_mlflow_alone(repo, repro, mlflow_server, tmp_path, monkeypatch):
    """`mlflow.pyfunc.load_model("models:/ch11_<name>@champion")` in a `python -I` without this repository serves
    every registered model on real test rows (raw pixels), predicting what the registered Keras model predicts."""
    import subprocess

    import mlflow
    import numpy as np

    from components.dataset import read_split

    from .conftest import repo_env

    test = read_split(repo / "data/splits/full_test.parquet")
    x, y = test.x.reshape(-1, 784), test.y
    np.save(tmp_path / "x.npy", x)
    names = ["ch11_model_a", "ch11_b_on_a", "ch11_best_variant"]
    job = {"uri": mlflow_server, "x": str(tmp_path / "x.npy"), "names": names, "out": str(tmp_path / "out.npz")}
    env = {k: v for k, v in repo_env().items() if not k.startswith(("PYTHON", "CH11_", "MLFLOW_"))}
    proc = subprocess.run([sys.executable, "-I", "-c", PYFUNC_ALONE], input=json.dumps(job), cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(np.load(tmp_path / "out.npz"))
    n = len(x)
    assert got["ch11_model_a"].shape == (n, 8) and got["ch11_b_on_a"].shape == (n, 1)
    assert got["ch11_best_variant"].shape == (n, 10)
    np.testing.assert_allclose(got["ch11_best_variant"].sum(axis=1), 1.0, rtol=1e-4)
    # served from a clean process, the best variant scores on the real test rows what its training run reported
    c = mlflow.MlflowClient(mlflow_server)
    champion = c.get_model_version_by_alias("ch11_best_variant", "champion")
    reported = c.get_run(champion.run_id).data.metrics["test_accuracy"]
    assert abs(float(np.mean(got["ch11_best_variant"].argmax(axis=1) == y)) - reported) < 2 / n
    for name in names:
        example = got[f"{name}.example"]
        assert example.dtype == np.float32 and example.shape[1] == 784 and example.max() > 1, name  # raw 0-255 pixels
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for name in names:
        here = mlflow.keras.load_model(f"models:/{name}@champion").predict(x.astype("float32"), verbose=0)
        np.testing.assert_allclose(got[name], here, rtol=1e-5, atol=1e-6, err_msg=name)


def test_second_repro_is_a_no_op(repo, repro):
    out = run(["dvc", "repro"], cwd=repo).stdout
    assert "Running stage" not in out
    assert "up to date" in run(["dvc", "status", "dvc.yaml"], cwd=repo).stdout  # the chapter (claims/dvc.yaml: make claims)


def test_alias_moves_only_for_a_better_version(repo, repro, mlflow_server):
    from mlflow import MlflowClient

    from components import tracking
    from components.config import load_params

    c = MlflowClient(mlflow_server)
    p = load_params(repo / "params.yaml")
    current = c.get_model_version_by_alias("ch11_model_a", "champion")
    run_id = current.run_id
    tr = tracking.Tracker(c, run_id, c.get_run(run_id).info.experiment_id)
    worse = tracking.register(tr, current.source, "model_a", float(current.tags["valid_accuracy"]) - 0.1, p)
    assert not worse["alias_moved"]
    assert c.get_model_version_by_alias("ch11_model_a", "champion").version == current.version
    better = tracking.register(tr, current.source, "model_a", float(current.tags["valid_accuracy"]) + 0.1, p)
    assert better["alias_moved"]
    assert c.get_model_version_by_alias("ch11_model_a", "champion").version == better["version"]


def test_a_registered_version_names_the_run_that_trained_it(repo, repro, mlflow_server):
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server)
    mv = c.get_model_version_by_alias("ch11_best_variant", "champion")
    trained = c.get_run(mv.run_id)
    assert trained.data.tags["ch11.step"] == "experiment"  # the training run, not the report's
    best = trained.data.params["experiment"]
    assert json.loads((repo / f"metrics/experiments/{best}.json").read_text())["mlflow_run_id"] == mv.run_id
    t = mv.tags
    assert t["experiment"] == best and t["dvc.md5.data/splits"] == trained.data.tags["dvc.md5.data/splits"]
    assert t["git.commit"] == trained.data.tags["git.commit"] and t["params.sha256"] == trained.data.tags["params.sha256"]
    assert best in mv.description and mv.run_id in mv.description


def test_the_alias_stays_among_versions_trained_on_the_same_data(repo, repro, mlflow_server, caplog):
    """A better number on other data (a tiny run beside a full one) does not take the champion alias."""
    import logging

    from mlflow import MlflowClient

    from components import tracking
    from components.config import load_params

    c = MlflowClient(mlflow_server)
    p = load_params(repo / "params.yaml")
    current = c.get_model_version_by_alias("ch11_model_a", "champion")
    exp_id = c.get_run(current.run_id).info.experiment_id
    other = c.create_run(exp_id, tags={"mlflow.runName": "model_a on other data", "dvc.md5.data/splits": "f" * 32 + ".dir"})
    tr = tracking.Tracker(c, other.info.run_id, exp_id)
    with caplog.at_level(logging.WARNING, logger="components.tracking"):
        out = tracking.register(tr, current.source, "model_a", float(current.tags["valid_accuracy"]) + 1.0, p)
    assert not out["alias_moved"] and "trained on other data" in caplog.text
    assert c.get_model_version_by_alias("ch11_model_a", "champion").version == current.version
    c.set_terminated(tr.run_id, "FINISHED")


def test_a_model_from_another_mlflow_is_skipped_with_a_warning_not_an_error(repo, repro, mlflow_server, caplog):
    """Metrics fetched with `dvc pull` name the models of the MLflow that made them; when the report registers
    the best variant from them, a model missing here must not fail the stage: it is skipped, and said so."""
    import logging

    from mlflow import MlflowClient

    from components import tracking
    from components.config import load_params

    c = MlflowClient(mlflow_server)
    p = load_params(repo / "params.yaml")
    current = c.get_model_version_by_alias("ch11_model_a", "champion")
    exp_id = c.get_run(current.run_id).info.experiment_id
    tr = tracking.Tracker(c, c.create_run(exp_id, tags={"mlflow.runName": "foreign model"}).info.run_id, exp_id)
    versions = len(c.search_model_versions("name='ch11_model_a'"))
    with caplog.at_level(logging.WARNING, logger="components.tracking"):
        out = tracking.register(tr, "models:/m-0123456789abcdef0123456789abcdef", "model_a", 2.0, p)
    assert out is None
    assert "not in this MLflow" in caplog.text and "dvc repro -f" in caplog.text
    assert len(c.search_model_versions("name='ch11_model_a'")) == versions
    assert c.get_model_version_by_alias("ch11_model_a", "champion").version == current.version
    assert c.get_run(tr.run_id).data.tags["registry.model_a"].startswith("skipped:")
    c.set_terminated(tr.run_id, "FINISHED")


def test_failed_step_is_a_failed_run(repo, repro, mlflow_server):
    from mlflow import MlflowClient

    proc = run([sys.executable, "-m", "components", "experiment", "opt_sgd", "-S", "experiments.opt_sgd.optimizer.learning_rate=1e8"],
               cwd=repo, check=False, MLFLOW_TRACKING_URI=mlflow_server, CH11_PIPELINE_RUN="tiny-pipeline-1")
    assert proc.returncode == 1
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("ch11-training-deep-nets")
    failed = c.search_runs([exp.experiment_id], filter_string="attributes.status = 'FAILED'")
    assert any("TrainingDiverged" in r.data.tags.get("error", "") for r in failed)
