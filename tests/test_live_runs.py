"""Live, honest MLflow runs of a training step against a real `mlflow server`: each epoch's metrics at that epoch's
end, a killed step resumed into the same run, system metrics, and one dataset input per split (issue 31: 2, 5)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .conftest import ROOT, cli_sets, repo_env, run

EXPERIMENT = "ch11-training-deep-nets"
NAME = "leaky_relu"  # a small MLP: epochs of a fraction of a second on the tiny slice


def _runs(client, name: str, pipeline: str):
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}' and "
                                                                  f"tags.`ch11.pipeline_run` = '{pipeline}'")


def _dvc_workspace(tiny_ws: Path, dest: Path) -> tuple[Path, Path, str]:
    """A copy of the tiny workspace as a git + DVC repository whose splits are DVC-tracked and pushed to a local
    remote; returns (workspace, remote, the splits' directory md5)."""
    dest.mkdir(parents=True)
    shutil.copy(tiny_ws / "params.yaml", dest / "params.yaml")
    shutil.copytree(tiny_ws / "data" / "splits", dest / "data" / "splits")
    shutil.copy(tiny_ws / "data" / "scaler.npz", dest / "data" / "scaler.npz")  # an input of every experiment stage
    remote = dest.parent / "remote"
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "remote", "add", "-d", "store", str(remote)],
                ["dvc", "add", "-q", "data/splits"], ["dvc", "push", "-q"],
                ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ws"]):
        run(cmd, cwd=dest)
    md5 = yaml.safe_load((dest / "data" / "splits.dvc").read_text())["outs"][0]["md5"]
    return dest, remote, md5


def test_epochs_are_logged_live_with_system_metrics_and_one_dataset_per_split(tiny_ws, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    from components.dataset import DIGEST_KEY, read_meta, read_split

    ws, remote, dir_md5 = _dvc_workspace(tiny_ws, tmp_path / "ws")
    epochs = 6
    pipeline = f"live-{os.getpid()}-{time.time_ns()}"
    args = [sys.executable, "-m", "components", "experiment", NAME] + cli_sets(
        {f"experiments.{NAME}.train.epochs": epochs, "runtime.checkpoint_dir": ws / ".checkpoints"})
    env = repo_env(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow_server, CH11_PIPELINE_RUN=pipeline,
                   CH11_DVC_HASHES=json.dumps({"data/splits": dir_md5}))  # as a Kubeflow task gets them
    client = MlflowClient(mlflow_server)
    proc = subprocess.Popen(args, cwd=ws, env=env, stderr=subprocess.PIPE, text=True)
    seen, during = [], None
    for line in proc.stderr:
        seen.append(line)
        if during is None and f"{NAME} epoch 2/{epochs}" in line:
            # epoch 1 ended before epoch 2 began: it must be on the server now, while the step still trains
            (r,) = _runs(client, NAME, pipeline)
            during = (r.info.status, [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")])
    assert proc.wait(timeout=300) == 0, "".join(seen)[-3000:]
    assert during is not None, "".join(seen)[-3000:]
    assert during[0] == "RUNNING" and 1 in during[1], during

    (r,) = _runs(client, NAME, pipeline)
    assert r.info.status == "FINISHED"
    for key in ("loss", "val_accuracy", "learning_rate", "epoch_seconds"):
        hist = sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in hist] == list(range(1, epochs + 1)), key  # each epoch once
        stamps = [m.timestamp for m in hist]
        assert all(a < b for a, b in zip(stamps, stamps[1:])), (key, stamps)  # its own end time, not one for all
        assert r.info.start_time <= stamps[0] and stamps[-1] <= r.info.end_time
    history = (ws / "plots" / "experiments" / f"{NAME}.csv").read_text().splitlines()
    header = history[0].split(",")
    last = dict(zip(header, history[-1].split(",")))
    assert abs(r.data.metrics["epoch_seconds"] - float(last["epoch_seconds"])) < 1e-9  # the history row, live

    metrics = r.data.metrics
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert key in metrics, sorted(k for k in metrics if k.startswith("system/"))

    inputs = r.inputs.dataset_inputs
    assert len(inputs) == 3, [d.dataset.name for d in inputs]
    manifest = {}
    for d in inputs:
        tags = {t.key: t.value for t in d.tags}
        ds = d.dataset
        split = {"training": "train", "validation": "valid", "test": "test"}[tags["mlflow.data.context"]]
        path = ws / "data" / "splits" / f"full_{split}.parquet"
        assert ds.name == f"data/splits/full_{split}.parquet"
        md5 = hashlib.md5(path.read_bytes()).hexdigest()  # what DVC records for the file
        assert ds.digest == md5 and tags["dvc.md5"] == md5 and tags["digest.kind"] == "dvc-md5"
        assert tags["content_sha256"] == read_meta(path)[DIGEST_KEY]
        assert json.loads(ds.profile)["num_rows"] == len(read_split(path))
        cols = {c["name"]: c["type"] for c in json.loads(ds.schema)["mlflow_colspec"]}
        assert cols == {"pixels": "binary", "label": "integer", "source_label": "integer", "source_index": "integer"}
        source = json.loads(ds.source)["uri"]
        assert ds.source_type == "local" and source == str(remote / "files" / "md5" / md5[:2] / md5[2:])
        assert hashlib.md5(Path(source).read_bytes()).hexdigest() == md5  # the source resolves to that very file
        manifest[split] = len(read_split(path))
    card = json.loads((tiny_ws / "metrics" / "dataset_card.json").read_text())
    assert manifest == {s: card[f"full_{s}"]["rows"] for s in ("train", "valid", "test")}


def test_without_dvc_the_digest_is_the_content_hash(tiny_ws, tmp_path, mlflow_server):
    """No dvc.lock or DVC cache (a plain folder): the splits' content hashes are the digests, and say so."""
    from mlflow import MlflowClient

    from components.dataset import DIGEST_KEY, read_meta

    pipeline = f"nodvc-{os.getpid()}-{time.time_ns()}"
    args = [sys.executable, "-m", "components", "experiment", NAME] + cli_sets(
        {f"experiments.{NAME}.train.epochs": 1, "runtime.checkpoint_dir": tmp_path / "ckpt", "mlflow.log_models": "false"})
    proc = run(args, cwd=tiny_ws, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow_server, CH11_PIPELINE_RUN=pipeline,
               CH11_DVC_HASHES=None)
    (r,) = _runs(MlflowClient(mlflow_server), NAME, pipeline)
    got = {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}) for d in r.inputs.dataset_inputs}
    assert len(got) == 3, proc.stderr[-2000:]
    for split in ("train", "valid", "test"):
        digest, tags = got[f"data/splits/full_{split}.parquet"]
        full = read_meta(tiny_ws / "data" / "splits" / f"full_{split}.parquet")[DIGEST_KEY]
        assert digest == full[:32] and tags["digest.kind"] == "content-sha256" and "dvc.md5" not in tags


def test_a_step_killed_after_epoch_2_resumes_into_the_same_run(tiny_ws, tmp_path, mlflow_server):
    """kill -9 after epoch 2 (the run stays RUNNING, its checkpoint keeps the run id), then a rerun: one run,
    FINISHED, every epoch's metrics once."""
    from mlflow import MlflowClient

    epochs = 4
    pipeline = f"resume-{os.getpid()}-{time.time_ns()}"
    args = [sys.executable, "-m", "components", "experiment", NAME] + cli_sets(
        {f"experiments.{NAME}.train.epochs": epochs, "runtime.checkpoint_dir": tmp_path / "ckpt",
         "mlflow.log_models": "false"})
    env = dict(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow_server, CH11_PIPELINE_RUN=pipeline)
    killed = run(args, cwd=tiny_ws, check=False, CH11_FAULT_KILL_AFTER_EPOCH="2", **env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    (first,) = _runs(client, NAME, pipeline)
    assert first.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(first.info.run_id, "loss")] == [1, 2]
    again = run(args, cwd=tiny_ws, check=False, **env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch 2" in again.stderr
    (r,) = _runs(client, NAME, pipeline)
    assert r.info.run_id == first.info.run_id and r.info.status == "FINISHED"
    assert r.data.tags["ch11.resumes"] == "1"
    for key in ("loss", "val_accuracy", "learning_rate", "epoch_seconds"):
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
        assert steps == list(range(1, epochs + 1)), (key, steps)
    assert len(r.inputs.dataset_inputs) == 3
    assert not any((tmp_path / "ckpt").glob("*/mlflow_run.json"))  # the resume state is gone with the checkpoint
