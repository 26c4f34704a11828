"""A plain `dvc repro` / `dvc exp run` (not `make repro`) in a temporary clone on tiny params against a real MLflow
server: one parent run per execution, ended with the execution; a killed `dvc` leaves no step writing on; one
writer per output; no stray temporary files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import copy_repo, repo_env, run
from .tiny import write_tiny

# The tests build on one another in one clone (data stages, then training, then a failure): one worker, in order.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc_execution")]

EXPERIMENT = "ch11-dvc-execution-test"  # an MLflow experiment of its own: other tests share the server
COMMIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, debian_dir):
    r = copy_repo(tmp_path_factory.mktemp("dvc_execution") / "repo")
    raw = write_tiny(r / "params.yaml", rows=1200, mirrors=[str(debian_dir)])
    raw["mlflow"]["experiment_name"] = EXPERIMENT
    raw["experiments"]["relu_deep"]["train"]["epochs"] = 40  # 100 layers: epochs long enough to kill one midway
    (r / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(COMMIT + ["tiny params"], cwd=r)
    return r


def sets(uri: str) -> dict[str, str | None]:
    """A shell's environment: no pipeline id (`make repro` sets one; a plain `dvc repro` has none)."""
    return {"MLFLOW_TRACKING_URI": uri, "CH11_PIPELINE_RUN": None, "PYTHONPATH": None}


def env(uri: str) -> dict[str, str]:
    return repo_env(**sets(uri))


def runs(uri: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    return c.search_runs([exp.experiment_id], max_results=1000) if exp else []


def new_runs(uri: str, before: set[str]) -> tuple[list, list]:
    """(children, parents) created since ``before`` (run ids), with the parents the children name."""
    from mlflow import MlflowClient

    children = [r for r in runs(uri) if r.info.run_id not in before and r.data.tags.get("ch11.step") != "pipeline"]
    parents = [MlflowClient(uri).get_run(i) for i in {r.data.tags["mlflow.parentRunId"] for r in children}]
    return children, parents


def ids(uri: str) -> set[str]:
    return {r.info.run_id for r in runs(uri)}


def git_state(repo: Path) -> dict:
    """tracking.git_state() as a stage in that clone computes it (its own `components`, its cwd)."""
    code = "import json; from components import tracking; print(json.dumps(tracking.git_state()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env("unused"), capture_output=True, text=True,
                         check=True).stdout
    return yaml.safe_load(out)


def test_a_plain_dvc_repro_is_one_parent_run_finished_on_a_clean_tree(repo, mlflow_server):
    before = ids(mlflow_server)
    run(["dvc", "repro", "standardize"], cwd=repo, **sets(mlflow_server))
    assert "dvc.lock" in run(["git", "diff", "--cached", "--name-only"], cwd=repo).stdout  # DVC auto-staged it
    children, parents = new_runs(mlflow_server, before)
    assert sorted(r.data.tags["ch11.step"] for r in children) == ["download", "split", "standardize"]
    assert len(parents) == 1, [p.data.tags["ch11.pipeline_run"] for p in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.end_time
    assert parent.data.tags["dvc.command"] == "dvc repro standardize"
    assert {r.info.status for r in children} == {"FINISHED"}
    head = run(["git", "rev-parse", "HEAD"], cwd=repo).stdout.strip()
    for r in [parent, *children]:
        assert r.data.tags["git.commit"] == head and r.data.tags["git.dirty"] == "false", r.data.tags["mlflow.runName"]
    # what DVC wrote (dvc.lock, metrics git tracks) keeps the tree clean; a change to the code does not
    assert git_state(repo)["git.dirty"] == "false"
    readme = repo / "README.md"
    text = readme.read_text()
    readme.write_text(text + "\nedited\n")
    try:
        assert git_state(repo)["git.dirty"] == "true"
    finally:
        readme.write_text(text)


def _step_pid(repo: Path, needle: str) -> int | None:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") \
                    and os.path.realpath(d / "cwd") == str(repo.resolve()):
                return int(d.name)
        except OSError:
            continue
    return None


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_for(path: Path, text: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} within {timeout} s:\n{log[-3000:]}")


def test_killing_dvc_repro_stops_its_training_step(repo, mlflow_server, tmp_path):
    before = ids(mlflow_server)
    log = tmp_path / "dvc.log"
    with open(log, "w") as out:
        dvc = subprocess.Popen(["dvc", "repro", "experiment@relu_deep"], cwd=repo, env=env(mlflow_server),
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    step = None
    try:
        _wait_for(log, "relu_deep epoch 2/40")
        step = _step_pid(repo, "components experiment relu_deep")
        assert step is not None, log.read_text()[-3000:]
        os.kill(dvc.pid, signal.SIGKILL)
        dvc.wait()
        killed = time.monotonic()
        while _running(step) and time.monotonic() - killed < 30:
            time.sleep(0.2)
        gone_after = time.monotonic() - killed
        assert not _running(step), "the training step outlived its `dvc repro` by 30 s"
        assert gone_after < 15, f"the training step took {gone_after:.0f} s to stop"
    finally:
        if step is not None and _running(step):
            os.kill(step, signal.SIGKILL)
    text = log.read_text()
    assert "is gone: stopping this step too" in text, text[-3000:]
    children, parents = new_runs(mlflow_server, before)
    assert [r.info.status for r in children] == ["KILLED"]
    assert len(parents) == 1 and parents[0].info.status == "KILLED"


def test_a_second_writer_of_the_same_outputs_is_refused(repo, mlflow_server):
    args = [sys.executable, "-m", "components", "experiment", "relu_deep"]
    first = subprocess.Popen(args, cwd=repo, env=env(mlflow_server), stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in first.stderr:  # the step has its lock once it trains
            seen.append(line)
            if "relu_deep epoch" in line:
                break
        assert first.poll() is None, "".join(seen)[-3000:]
        second = subprocess.run(args, cwd=repo, env=env(mlflow_server), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"another process (pid {first.pid}) is already writing" in second.stderr, second.stderr[-3000:]
        assert "models/experiments/relu_deep.keras" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)


def test_the_next_run_of_a_step_removes_the_temporary_files_a_killed_one_left(repo, mlflow_server):
    stale = [repo / "data/.scaler.npz.ab12cd34.tmp", repo / "metrics/.scaler.json.0a1b2c3d.tmp"]
    others = [repo / "metrics/.dataset_card.json.0a1b2c3d.tmp", repo / "data/.notes.tmp"]  # not this step's
    for p in stale + others:
        p.write_text("half-written")
    run([sys.executable, "-m", "components", "standardize"], cwd=repo, **sets(mlflow_server))
    assert [p.name for p in stale if p.exists()] == []
    assert [p.name for p in others if p.exists()] == [p.name for p in others]
    for p in others:
        p.unlink()


def test_clean_stale_tmp_knows_our_temporary_names_only(tmp_path):
    from components import process

    models = tmp_path / "models"
    arts = tmp_path / "reports" / "relu_deep"
    (arts / "sub").mkdir(parents=True)
    models.mkdir()
    ours = [models / ".relu_deep.4242.tmp.keras", models / ".relu_deep.4242.raw.tmp.keras",
            models / ".relu_deep.keras.k3y_9abc.tmp", arts / "sub" / ".confusion.png.abcdefgh.tmp"]
    kept = [models / ".leaky_relu.4242.tmp.keras", models / ".relu_deep.keras.toolongname.tmp",
            models / "relu_deep.keras", arts / "history.csv"]
    for p in ours + kept:
        p.write_text("x")
    removed = process.clean_stale_tmp([models / "relu_deep.keras", arts])
    assert sorted(removed) == sorted(ours)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in ours)


def test_dvc_exp_run_is_one_parent_run_finished(repo, mlflow_server):
    run(["git", "add", "-A"], cwd=repo)
    run(COMMIT + ["data", "--allow-empty"], cwd=repo)
    before = ids(mlflow_server)
    run(["dvc", "exp", "run", "-n", "valid150", "-S", "data.valid_size=150", "standardize"], cwd=repo,
        **sets(mlflow_server))
    children, parents = new_runs(mlflow_server, before)
    assert sorted(r.data.tags["ch11.step"] for r in children) == ["split", "standardize"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["dvc.exp_name"] == "valid150"
    # params.yaml differs from the commit (the -S): the tree the code ran from is not the commit's
    assert {r.data.tags["git.dirty"] for r in [*parents, *children]} == {"true"}


def test_a_failed_dvc_repro_leaves_its_parent_failed(repo, mlflow_server, tmp_path):
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["data"]["mirrors"] = [str(tmp_path)]  # an empty folder: the download fails at once
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    before = ids(mlflow_server)
    proc = run(["dvc", "repro", "standardize"], cwd=repo, check=False, **sets(mlflow_server))
    assert proc.returncode != 0
    children, parents = new_runs(mlflow_server, before)
    assert [(r.data.tags["ch11.step"], r.info.status) for r in children] == [("download", "FAILED")]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
