"""The whole chapter through `dvc repro` on tiny params (a slice of the real data, 1 epoch), every stage."""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from .conftest import copy_repo, run
from .tiny import write_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory, debian_dir):
    r = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    write_tiny(r / "params.yaml", mirrors=[str(debian_dir)])
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny params"], cwd=r)
    return r


def test_every_stage_runs_and_the_report_holds_every_experiment(repo):
    proc = run([sys.executable, "-m", "components.worker", "run", "--", "dvc", "repro"], cwd=repo)
    out = proc.stdout + proc.stderr
    params = yaml.safe_load((repo / "params.yaml").read_text())
    expected = ["download", "split", "standardize", "model_a", "model_b", "b_on_a", "report"]
    expected += [f"experiment@{n}" for n in params["experiments"]]
    expected += [f"mc_dropout@{n}" for n in params["mc_dropout"]["sources"]]
    for stage in expected:
        assert f"Running stage '{stage}'" in out, stage
    report = json.loads((repo / "metrics/report.json").read_text())
    assert {r["experiment"] for r in report["experiments"]} == set(params["experiments"])
    assert report["transfer"]["seeds"] == params["transfer"]["seeds"]
    assert set(report["mc_dropout"]) == set(params["mc_dropout"]["sources"])
    md = (repo / "reports/report.md").read_text()
    for name in params["experiments"]:
        assert f"| {name} |" in md
    for name in params["experiments"]:
        m = json.loads((repo / f"metrics/experiments/{name}.json").read_text())
        assert m["epochs"] == 1 and 0 <= m["test_accuracy"] <= 1
        assert (repo / f"models/experiments/{name}.keras").is_file()
        assert (repo / f"reports/experiments/{name}/learning_curves.png").is_file()
    assert (repo / "reports/experiments/lr_1cycle/lr_range_test.json").is_file()
    assert (repo / "reports/mc_dropout/dropout/reliability.png").is_file()


def test_second_repro_is_a_no_op(repo):
    out = run(["dvc", "repro"], cwd=repo).stdout
    assert "Running stage" not in out
    assert "up to date" in run(["dvc", "status"], cwd=repo).stdout
