"""The claims run under DVC, for real, in a temporary git clone (a slice of the real data, a few experiments):
claims/dvc.yaml has one stage per (experiment, seed), a plain `dvc repro` of the chapter never runs it, and
`dvc exp run -S claims.seeds=...` runs only the seeds that are new (the others are up to date)."""
from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from .conftest import copy_repo, run
from .tiny import keep_experiments, tiny_params

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("claims-dvc")]

KEPT = {"act_relu", "act_sigmoid", "dropout", "alpha_dropout"}  # an order claim, and MC dropout's two sources
WARM = [sys.executable, "tools/warm.py", "run", "--"]  # as `make claims` runs the stages: one warm process


def trimmed(raw: dict) -> dict:
    """Tiny params with a few experiments and the claims that compare only those (plus MC dropout and B-on-A)."""
    keep_experiments(raw, KEPT)
    raw["claims"]["seeds"] = [43]
    raw["mlflow"]["enabled"] = False
    return raw


@pytest.fixture(scope="module")
def repo(tmp_path_factory, debian_dir):
    r = copy_repo(tmp_path_factory.mktemp("claims") / "repo")
    raw = trimmed(tiny_params(mirrors=[str(debian_dir)]))
    assert len(raw["claims"]["list"]) >= 3, "the trimmed params must keep a few claims"
    (r / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny params"], cwd=r)
    return r


def ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def test_the_chapters_repro_never_runs_the_claims(repo):
    stages = ran(run([*WARM, "dvc", "repro"], cwd=repo).stdout)
    assert "experiment@act_relu" in stages and not any("claims" in s for s in stages), stages
    assert "up to date" in run(["dvc", "status", "dvc.yaml"], cwd=repo).stdout


def test_claims_run_is_one_stage_per_experiment_and_seed(repo):
    """As `make claims` runs it: tools/repro.py on claims/dvc.yaml (stages at once through `dvc repro --single-item`),
    whose closing plain `dvc repro claims/dvc.yaml` must find nothing left."""
    out = run([*WARM, sys.executable, "tools/repro.py", "--jobs", "2", "claims/dvc.yaml"], cwd=repo).stdout
    stages = set(re.findall(r"\[repro\]\s+\d+/\d+ start\s+(\S+)", out))
    assert "Running stage" not in out.split("now a plain `dvc repro`")[-1], out[-2000:]
    assert {s for s in stages if "claims_experiment@" in s} == {
        f"claims/dvc.yaml:claims_experiment@{e}-43" for e in KEPT}
    assert {"claims/dvc.yaml:claims_mc_dropout@43", "claims/dvc.yaml:claims"} <= stages
    assert not stages & {"experiment@act_relu", "download"}, "the main job's stages were up to date"
    for e in KEPT:
        m = json.loads((repo / f"metrics/claims/seed_43/{e}.json").read_text())
        assert m["seed"] == 43 and m["experiment"] == e
        main = json.loads((repo / f"metrics/experiments/{e}.json").read_text())
        assert main["seed"] == 42
    result = json.loads((repo / "metrics/claims.json").read_text())
    assert result["seeds"] == [42, 43] and result["claims"]
    for c in result["claims"]:
        if c["better"] in KEPT:  # an experiment claim: paired over the main seed and the claims seed
            assert c["n"] == 2 and c["seeds"] == [42, 43], c
        assert c["verdict"].split(" ")[0] in ("supported", "not", "contradicted"), c["verdict"]
    text = (repo / "reports/claims.md").read_text()
    assert all(c["id"] in text for c in result["claims"])
    assert (repo / "reports/claims_forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exp_run_with_one_more_seed_runs_only_that_seed(repo):
    """The run-cache and the lock work per seed: adding seed 44 trains each experiment once more, seed 43's stages
    are not rerun."""
    out = run([*WARM, "dvc", "exp", "run", "claims/dvc.yaml", "-S", "claims.seeds=[43,44]"], cwd=repo).stdout
    stages = ran(out)
    trained = {s for s in stages if "claims_experiment@" in s}
    assert trained == {f"claims/dvc.yaml:claims_experiment@{e}-44" for e in KEPT}, stages
    assert "claims/dvc.yaml:claims_mc_dropout@44" in stages and "claims/dvc.yaml:claims_mc_dropout@43" not in stages
    assert (repo / "metrics/claims/seed_44/act_relu.json").is_file()
