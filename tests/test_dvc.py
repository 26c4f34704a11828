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
    assert "full_train.rows" in run(["dvc", "metrics", "show", "metrics/dataset_card.json"], cwd=clone).stdout


def test_metrics_show_is_the_narrow_summary(clone):
    """`dvc metrics show` lists the one summary file (a few keys on a line that fits a terminal); a step's own file
    is still there on request."""
    out = run(["dvc", "metrics", "show"], cwd=clone).stdout
    lines = out.splitlines()
    assert lines and max(map(len, lines)) < 120, out[:500]
    assert "metrics/summary.json" in out and "metrics/experiments/" not in out and "dataset_card" not in out
    assert set(lines[0].split()) == {"Path", "best", "best_test", "model_a", "model_b", "b_on_a", "mc_dropout"}
    one = run(["dvc", "metrics", "show", "metrics/experiments/elu.json"], cwd=clone).stdout
    assert "test_accuracy" in one


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


def _workspace_state(repo) -> dict:
    """Every output's bytes (md5), params.yaml, dvc.lock, the git index and status: what a rejected run must keep."""
    import hashlib

    files = [p for d in ("data", "metrics", "reports", "models", "plots") for p in sorted((repo / d).rglob("*")) if p.is_file()]
    return {
        "outputs": {str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest() for p in files},
        "params.yaml": (repo / "params.yaml").read_bytes(),
        "dvc.lock": (repo / "dvc.lock").read_bytes(),
        "index": run(["git", "ls-files", "--stage"], cwd=repo).stdout,
        "status": run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo).stdout,
        "head": run(["git", "rev-parse", "HEAD", "--symbolic-full-name", "HEAD"], cwd=repo).stdout,
    }


@pytest.mark.parametrize("override, error", [
    ("data.valid_size=abc", "data.valid_size"),  # a string for an int, in a stage whose outputs exist
    ("+data.bogus=1", "data.bogus"),  # an unknown key
])
def test_rejected_set_param_leaves_the_workspace_as_it_was(clone, override, error):
    """`dvc exp run -S <bad>`: the params guard (first stage) rejects it before DVC deletes any output; outputs,
    params.yaml (DVC wrote the -S value into it), dvc.lock and the git index are as they were."""
    run(["git", "add", "-A"], cwd=clone)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "before exp", "--allow-empty"], cwd=clone)
    assert (clone / "data/splits/full_train.parquet").is_file()  # outputs a run of split would delete
    before = _workspace_state(clone)
    proc = run(["dvc", "exp", "run", "-S", override], cwd=clone, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Running stage 'check_params'" in out and "Running stage 'split'" not in out, out
    assert error in out and "nothing ran" in out and "back as it was" in out, out
    after = _workspace_state(clone)
    assert after["outputs"] == before["outputs"]
    assert after == before


def test_rejected_set_param_keeps_edits_not_committed(clone):
    """With params.yaml edited but not committed, a rejected -S is taken back out and the edits stay."""
    edited = (clone / "params.yaml").read_text().replace("valid_size: 200", "valid_size: 250") + "# my note\n"
    assert "valid_size: 250" in edited
    (clone / "params.yaml").write_text(edited)
    before = _workspace_state(clone)
    proc = run(["dvc", "exp", "run", "-S", "data.max_test_rows=-5"], cwd=clone, check=False)
    assert proc.returncode != 0 and "back as it was" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert _workspace_state(clone) == before
    run(["git", "checkout", "--", "params.yaml"], cwd=clone)


def test_rejected_edit_in_a_plain_repro_touches_nothing(clone):
    """A bad value typed into params.yaml stops a plain `dvc repro` before any output is deleted; the file keeps the
    user's edit (theirs to fix)."""
    text = (clone / "params.yaml").read_text()
    (clone / "params.yaml").write_text(text.replace("valid_size: 200", "valid_size: lots"))
    before = _workspace_state(clone)
    proc = run(["dvc", "repro", "standardize"], cwd=clone, check=False)
    assert proc.returncode != 0 and "nothing ran" in proc.stdout + proc.stderr
    assert _workspace_state(clone) == before
    run(["git", "checkout", "--", "params.yaml"], cwd=clone)


def test_exp_run_with_set_param(clone):
    run(["git", "add", "-A"], cwd=clone)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock", "--allow-empty"], cwd=clone)
    out = run(["dvc", "exp", "run", "standardize", "-S", "data.valid_size=300"], cwd=clone).stdout
    assert "Running stage 'split'" in out and "Running stage 'download'" not in out
    card = json.loads((clone / "metrics" / "dataset_card.json").read_text())
    assert card["full_valid"]["rows"] == 300 and card["full_train"]["rows"] == 900
