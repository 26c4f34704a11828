"""A stopped step (SIGTERM: `timeout`, `kill`, a Kubernetes eviction) ends its MLflow run honestly and resumes."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from .conftest import ROOT, cli_sets, repo_env


def test_sigterm_ends_the_run_killed_and_a_rerun_resumes(tiny_ws, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "relu_deep"  # 100 layers: epochs long enough to stop one in the middle
    sets = {f"experiments.{name}.train.epochs": 40, "runtime.checkpoint_dir": tiny_ws / ".checkpoints-stop"}
    args = [sys.executable, "-m", "components", "experiment", name] + cli_sets(sets)
    env = repo_env(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=uri, CH11_PIPELINE_RUN="stop-test")
    proc = subprocess.Popen(args, cwd=tiny_ws, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # wait for a few finished epochs (their resume state saved), then stop the step
        seen.append(line)
        if f"{name} epoch 3/40" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[1]
    log = "".join(seen) + rest
    assert proc.returncode == 143, log[-3000:]
    assert "terminated (SIGTERM); rerun the same command to resume" in log
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ch11-training-deep-nets")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")
    assert [r.info.status for r in runs] == ["KILLED"], [r.info.status for r in runs]
    assert "Terminated" in runs[0].data.tags["error"]
    again = subprocess.run(args, cwd=tiny_ws, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch" in again.stderr
    # the rerun continued the stopped run (its id kept beside the checkpoint): one run, each epoch logged once
    after = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")
    assert [(r.info.run_id, r.info.status) for r in after] == [(runs[0].info.run_id, "FINISHED")]
    assert "Terminated" in after[0].data.tags["ch11.stopped_before"] and "error" not in after[0].data.tags
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss"))
    assert steps == list(range(1, 41)), steps
