"""DVC run for real in a temporary git clone of this repository, on a slice of the real data."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from .conftest import copy_repo, run

# The tests build on one another in one clone (repro, then rerun from scratch, then exp run): one worker, in order.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc")]

TINY = {"max_train_rows": 1200, "valid_size": 200, "max_test_rows": 300}


def lock_hashes(repo):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


@pytest.fixture(scope="module")
def clone(tmp_path_factory, debian_dir):
    repo = copy_repo(tmp_path_factory.mktemp("clone") / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(TINY)
    params["data"]["task_b"]["train_size"] = 20
    params["data"]["mirrors"] = [str(debian_dir)]  # offline
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny params"], cwd=repo)
    return repo


def test_repro_runs_the_data_stages_then_is_a_no_op(clone):
    out = run(["dvc", "repro", "standardize"], cwd=clone).stdout
    for stage in ("download", "split", "standardize"):
        assert f"Running stage '{stage}'" in out
    card = json.loads((clone / "metrics" / "dataset_card.json").read_text())
    assert card["full_train"]["rows"] == 1000 and card["full_valid"]["rows"] == 200 and card["b_train"]["rows"] == 20
    again = run(["dvc", "repro", "standardize"], cwd=clone).stdout
    assert "Running stage" not in again
    assert "up to date" in run(["dvc", "status", "standardize"], cwd=clone).stdout
    assert "dataset_card.json" in run(["dvc", "metrics", "show"], cwd=clone).stdout


DATA_OUTS = {"data/raw", "data/splits", "data/scaler.npz", "reports/dataset_card.md"}


def test_rerun_from_scratch_gives_the_same_hashes(clone):
    # the data stages' outputs (dvc.lock also holds the training stages of the committed full run)
    before = {p: h for p, h in lock_hashes(clone).items() if p in DATA_OUTS}
    assert set(before) == DATA_OUTS, "dvc.lock has no data outputs"
    for d in ("data/raw", "data/splits", "data/scaler.npz", "metrics", "reports/dataset_card.md", ".dvc/cache"):
        p = clone / d
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (clone / "dvc.lock").unlink()
    run(["dvc", "repro", "standardize"], cwd=clone)
    assert {p: h for p, h in lock_hashes(clone).items() if p in DATA_OUTS} == before


def test_push_then_pull_into_a_second_clone(clone, tmp_path):
    """The default remote lives outside the working copy (~/.cache/ch11-pipeline/dvcstore), so another clone on
    the same machine gets the data back with `dvc pull` and finds the stages up to date."""
    home = tmp_path / "home"  # the user's ~ for this test: the real ~/.cache is left alone
    run(["dvc", "push"], cwd=clone, HOME=str(home))
    assert any((home / ".cache/ch11-pipeline/dvcstore").rglob("*")), "nothing was pushed to the default remote"
    assert not (clone / "dvcstore").exists()
    run(["git", "add", "-A"], cwd=clone)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data", "--allow-empty"], cwd=clone)
    second = tmp_path / "second"
    run(["git", "clone", "-q", str(clone), str(second)], cwd=tmp_path)
    run(["dvc", "pull", "--with-deps", "standardize"], cwd=second, HOME=str(home))
    assert (second / "data" / "splits" / "b_train.parquet").is_file()
    assert "up to date" in run(["dvc", "status", "standardize"], cwd=second, HOME=str(home)).stdout


def test_exp_run_with_set_param(clone):
    run(["git", "add", "-A"], cwd=clone)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock", "--allow-empty"], cwd=clone)
    out = run(["dvc", "exp", "run", "standardize", "-S", "data.valid_size=300"], cwd=clone).stdout
    assert "Running stage 'split'" in out and "Running stage 'download'" not in out
    card = json.loads((clone / "metrics" / "dataset_card.json").read_text())
    assert card["full_valid"]["rows"] == 300 and card["full_train"]["rows"] == 900
