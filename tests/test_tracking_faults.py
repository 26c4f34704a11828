"""The MLflow server dying in the middle of a step (issue 33, defect 1): the step waits seconds, not minutes,
writes its own outputs, says what it could not log and how to log it, and its run is ended once the server is
back."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from components import tracking

from .conftest import BIN, ROOT, free_port, repo_env

HTTP_VARS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def _start_server(store: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on ``store`` (sqlite + artifacts), the same store every time it is started."""
    log = open(store / "server.log", "a")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=repo_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    log.close()
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise RuntimeError(f"mlflow server did not start:\n{(store / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the server's process group (the server and its uvicorn worker): the server dies, as in a crash."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def test_http_bounds_are_defaults_the_user_can_override(monkeypatch):
    from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                                              MLFLOW_HTTP_REQUEST_TIMEOUT)

    for k in HTTP_VARS:
        monkeypatch.setenv(k, "0")  # records the original value, restored after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the user's own setting wins
    used = tracking.bounded_http_defaults()
    assert used["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300" and MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 300
    # MLflow's own defaults are 7 retries and a backoff factor of 2 (minutes per failing call): ours are bounded
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() <= 3 and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() <= 1


def test_a_real_mlflow_error_with_the_server_up_is_still_raised(mlflow_server):
    """The guard is for a server that is gone, not a way to swallow MLflow's errors."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(mlflow_server)
    exp = client.create_experiment(f"faults-{time.time_ns()}")
    run_id = client.create_run(exp).info.run_id
    tracker = tracking.Tracker(client, run_id, exp, uri=mlflow_server)
    tracker.log_params({"a": 1})
    with pytest.raises(MlflowException):
        tracker.log_params({"a": 2})  # MLflow refuses to change a logged param
    assert tracking._lost is None


def _runs(client, exp_name: str) -> list:
    exp = client.get_experiment_by_name(exp_name)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.`ch11.step` = 'experiment'")


def test_server_dying_mid_step(tiny_ws, tmp_path):
    from mlflow import MlflowClient

    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy2(tiny_ws / "params.yaml", ws / "params.yaml")
    shutil.copytree(tiny_ws / "data", ws / "data")
    store = tmp_path / "store"
    store.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = repo_env(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=uri, CH11_PIPELINE_RUN="faults-1",
                   **{k: None for k in HTTP_VARS})  # our bounds, not whatever this shell has
    cmd = [sys.executable, "-m", "components", "experiment", "elu", "-S", "experiments.elu.train.epochs=5"]
    exp_name = "ch11-training-deep-nets"
    server = _start_server(store, port)
    client = MlflowClient(uri)
    step = subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the run exists with its inputs logged (the last call before training): stop the step, kill the server
        deadline = time.monotonic() + 300
        while True:
            runs = [r for r in _runs(client, exp_name) if r.inputs and r.inputs.dataset_inputs]
            if runs or step.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert runs, f"the step's run never appeared:\n{step.communicate()[1][-3000:] if step.poll() is not None else ''}"
        step.send_signal(signal.SIGSTOP)
        _kill(server)
        killed = time.monotonic()
        step.send_signal(signal.SIGCONT)
        out, err = step.communicate(timeout=180)  # today: 498 s of retries
        took = time.monotonic() - killed
    finally:
        if step.poll() is None:
            step.kill()
        _kill(server)
    run_id = runs[0].info.run_id

    # seconds, not MLflow's default minutes of retries; then a clear error, not a raw MlflowException
    assert step.returncode == 1, err[-3000:]
    assert took < 90, f"the step took {took:.0f}s after the server died"  # its last epochs + ~3 s of retries
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("[experiment] TrackingLost: "), last
    assert "stopped answering during this step (runs/log-batch: [Errno 111] Connection refused" in last
    # what was not logged, and how to log it
    assert "Not logged to MLflow" in last and "metrics " in last and "per-epoch" in last
    assert "the model (Keras flavour)" in last and f"run 'elu' ({run_id})" in last
    assert "rerun this step" in last and "MLFLOW_HTTP_REQUEST_MAX_RETRIES=2" in last
    # the step's own outputs are written
    metrics = json.loads((ws / "metrics/experiments/elu.json").read_text())
    assert metrics["mlflow_run_id"] == run_id and "mlflow_model_uri" not in metrics
    assert metrics["epochs"] == 5 and 0 <= metrics["test_accuracy"] <= 1
    assert (ws / "models/experiments/elu.keras").stat().st_size > 0
    assert len((ws / "plots/experiments/elu.csv").read_text().splitlines()) == 1 + 5
    record = json.loads((ws / ".mlflow-lost" / f"{run_id}.json").read_text())
    assert record["uri"] == uri and record["status"] == "FAILED"
    assert any(x.startswith("metrics ") for x in record["not_logged"])

    # the server is back on the same store: the run is still RUNNING until a step reaches the server
    server = _start_server(store, port)
    try:
        assert client.get_run(run_id).info.status == "RUNNING"
        rerun = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        old = client.get_run(run_id)
        assert old.info.status == "FAILED"
        assert "not logged" in old.data.tags["error"] and "metrics " in old.data.tags["error"]
        assert "test_accuracy" not in old.data.metrics
        assert not (ws / ".mlflow-lost" / f"{run_id}.json").exists()
        # the rerun logged everything to a new run, as the message said
        new_id = json.loads((ws / "metrics/experiments/elu.json").read_text())["mlflow_run_id"]
        new = client.get_run(new_id)
        assert new_id != run_id and new.info.status == "FINISHED"
        assert "test_accuracy" in new.data.metrics
        assert len(client.get_metric_history(new_id, "loss")) == 5
        assert json.loads((ws / "metrics/experiments/elu.json").read_text())["mlflow_model_uri"].startswith("models:/")
    finally:
        _kill(server)


def test_a_steps_own_mlflow_call_after_the_server_died(tmp_path, monkeypatch, params):
    """A step that calls the MLflow client itself (the report step does) fails with TrackingLost, in seconds,
    naming what its Tracker could not log; the run is recorded for ending later."""
    store = tmp_path / "store"
    store.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(tracking.LOST_DIR_ENV, str(tmp_path / "lost"))
    for k in HTTP_VARS:
        monkeypatch.setenv(k, "0")
        monkeypatch.delenv(k)
    (tmp_path / "report.md").write_text("# report\n")
    server = _start_server(store, port)
    try:
        with pytest.raises(tracking.TrackingLost) as lost, tracking.watch():
            with tracking.step_run("report", params, []) as tracker:
                _kill(server)
                t = time.monotonic()
                tracker.log_artifact(tmp_path / "report.md")
                tracker.set_tags({"best_variant": "elu"})  # skipped at once: the server is known to be gone
                tracker.client.get_run(tracker.run_id)  # not through the Tracker
    finally:
        _kill(server)
    took = time.monotonic() - t
    assert took < 30, f"{took:.0f}s"
    msg = str(lost.value)
    assert f"artifact {tmp_path / 'report.md'}" in msg and "tags best_variant" in msg
    assert "the rest of the step's MLflow logging (stopped at runs/get: [Errno 111] Connection refused)" in msg
    record = json.loads((tmp_path / "lost" / f"{tracker.run_id}.json").read_text())
    assert record["status"] == "FAILED" and record["uri"] == uri
    assert tracking._lost is None  # the next step starts afresh
