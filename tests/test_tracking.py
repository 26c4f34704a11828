"""Tracking edge cases that need no pipeline run."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from components.tracking import dvc_repo_lock, flatten, lock_hashes

from .conftest import ROOT, run


def test_unreachable_server_is_a_clear_error_within_seconds(tiny_ws):
    t = time.monotonic()
    proc = run([sys.executable, "-m", "components", "experiment", "elu"], cwd=tiny_ws, check=False,
               PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    took = time.monotonic() - t
    assert proc.returncode == 1
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:9" in proc.stderr
    assert "Nothing was trained" in proc.stderr
    assert not (tiny_ws / "models/experiments/elu.keras").exists()
    assert took < 60, f"took {took:.0f}s"  # TensorFlow's import included; the check itself times out in 5 s


def test_flatten_names():
    assert flatten({"model": {"hidden": [{"units": 300}], "activation": {"name": "selu"}}}) == {
        "model.hidden.0.units": 300, "model.activation.name": "selu"}


# A DVC process rewriting dvc.lock: it takes the repository lock with DVC's own lock class, truncates the file,
# writes half of it, and finishes the write a second later (DVC's dump_yaml writes in place, not by rename).
_DVC_WRITER = """
import sys, time
from dvc.lock import make_lock
lock = make_lock(".dvc/tmp/lock", tmp_dir=".dvc/tmp")
lock.lock()
text = open("dvc.lock.new").read()
with open("dvc.lock", "w") as f:
    f.write(text[: len(text) // 2]); f.flush()
    print("held", flush=True)
    time.sleep(float(sys.argv[1]))
    f.write(text[len(text) // 2:])
lock.unlock()
"""


def _lock_text(n: int) -> str:
    lines = ["schema: '2.0'", "stages:"]
    for i in range(n):
        lines += [f"  stage{i}:", f"    cmd: python -m components stage{i}", "    outs:",
                  f"    - path: out/{i}", f"      md5: a{i:031x}", "      size: 10"]
    return "\n".join(lines) + "\n"


def _start_writer(root, seconds: float) -> subprocess.Popen:
    (root / ".dvc" / "tmp").mkdir(parents=True)
    (root / "dvc.lock").write_text(_lock_text(3))
    (root / "dvc.lock.new").write_text(_lock_text(60))
    proc = subprocess.Popen([sys.executable, "-c", _DVC_WRITER, str(seconds)], cwd=root, text=True,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_dvc_lock_is_read_under_dvcs_repository_lock(tmp_path):
    """A stage reading dvc.lock while another stage's DVC rewrites it (the CI failure: a ScannerError at
    line 2689) waits for DVC's lock and gets the whole new file."""
    writer = _start_writer(tmp_path, 1.0)
    try:
        hashes = lock_hashes(tmp_path / "dvc.lock")
    finally:
        writer.wait(timeout=30)
    assert hashes == {f"out/{i}": f"a{i:031x}" for i in range(60)}


def test_a_dvc_lock_held_too_long_is_a_clear_error(tmp_path):
    writer = _start_writer(tmp_path, 5.0)
    try:
        with pytest.raises(RuntimeError, match=r"repository lock .*lock has been held for over 0 s"):
            with dvc_repo_lock(tmp_path, timeout=0.3):
                pass
    finally:
        writer.kill()
        writer.wait(timeout=30)


@pytest.mark.parametrize("config, held", [("", True), ("[core]\n    hardlink_lock = false\n", True),
                                          ("[core]\n    hardlink_lock = true\n", False)])
def test_dvc_repo_lock_is_taken_unless_dvc_uses_hardlink_locks(tmp_path, config, held):
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    (tmp_path / ".dvc" / "config").write_text(config)
    with dvc_repo_lock(tmp_path) as got:
        assert got is held


def test_every_child_gets_family_and_experiment_tags_and_the_compare_view(tmp_path, monkeypatch, params):
    """step_run tags every child with `family` and `experiment` (defaults for the data steps, the given ones for the
    others, the description as the run description) and gives the experiment the run list's saved view, which
    MLflow's UI decodes (deflate + base64 JSON) into a flat list with a test_accuracy column."""
    import base64
    import json
    import zlib

    from mlflow import MlflowClient

    from components import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking.step_run("split", params, []) as data_run:
        pass
    with tracking.step_run("experiment", params, [], run_name="elu",
                           tags=tracking.run_tags("activations", "elu", "ELU")) as exp_run:
        pass
    c = MlflowClient(tracking.tracking_uri())
    t = c.get_run(data_run.run_id).data.tags
    assert (t["family"], t["experiment"]) == ("data", "split") and "mlflow.note.content" not in t
    t = c.get_run(exp_run.run_id).data.tags
    assert (t["family"], t["experiment"], t["mlflow.note.content"]) == ("activations", "elu", "ELU")
    tags = c.get_experiment(exp_run.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"])
    kind, packed = view["state"].split(";", 1)
    state = json.loads(zlib.decompress(base64.b64decode(packed)))
    assert kind == "deflate" and view["name"] == "ch11: compare variants"
    assert "metrics.`test_accuracy`" in state["selectedColumns"] and state["searchFilter"]  # a filter: not nested
    assert tracking.compare_view_url(exp_run.experiment_id, "http://h:5000/").endswith(
        f"/#/experiments/{exp_run.experiment_id}/runs?viewStateShareKey={tracking.VIEW_KEY}")


def test_every_experiment_of_params_yaml_names_its_family(params):
    from components.config import PREFIX_FAMILIES

    assert all(e.family for e in params.experiments.values())
    assert params.transfer.model_a.family == params.transfer.model_b.family == "transfer"
    assert {e.family for e in params.experiments.values()} <= set(PREFIX_FAMILIES.values())


def test_dataset_inputs_survive_two_steps_creating_the_same_dataset_at_once(tmp_path):
    """MLflow's SQL store looks a dataset up, then inserts it: two steps logging one new dataset at the same moment
    make one fail on the unique key. That step retries and links the dataset the other one wrote; other errors
    are raised as they are."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.entities import DatasetInput

    from components import tracking

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("race")
    run = client.create_run(exp)
    ds = MetaDataset(HTTPDatasetSource("dvc://data/splits/full_train.parquet"), name="full_train", digest="abc")
    inputs = [DatasetInput(ds._to_mlflow_entity())]
    calls = []

    class RacingClient:  # the real client, whose first call loses the race as the SQL store reports it
        def log_inputs(self, run_id, datasets):
            calls.append(run_id)
            if len(calls) == 1:
                raise mlflow.exceptions.MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                                        "datasets.experiment_id, datasets.name, datasets.digest")
            return client.log_inputs(run_id, datasets=datasets)

    tracking._log_inputs(RacingClient(), run.info.run_id, inputs)
    assert len(calls) == 2
    assert [d.dataset.name for d in client.get_run(run.info.run_id).inputs.dataset_inputs] == ["full_train"]

    class BrokenClient:
        def log_inputs(self, run_id, datasets):
            raise mlflow.exceptions.MlflowException("no such run")

    with pytest.raises(mlflow.exceptions.MlflowException, match="no such run"):
        tracking._log_inputs(BrokenClient(), run.info.run_id, inputs)
