"""MLflow tracking: one parent run per pipeline execution, one child run per step (and per seed).

Where runs go: ``$MLFLOW_TRACKING_URI`` when set (a team server); otherwise a local SQLite store
``sqlite:///mlflow.db`` in the repository with artifacts in ``mlartifacts/`` (never the deprecated
``./mlruns`` file store).

Which parent: a pipeline execution is identified by ``$CH11_PIPELINE_RUN`` (``make repro`` sets a fresh
one per run; on Kubeflow it is the KFP run id). Without it, by the code and params: the git commit
(+ "dirty") and the hash of params.yaml, so re-running stages of the same code and params joins the same
parent. ``$MLFLOW_RUN_ID`` names the parent run directly and ``$MLFLOW_EXPERIMENT_ID`` the experiment,
when the environment provides them. The parent run stays RUNNING while stages join it; the report step
finishes it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import yaml

from .config import Params

log = logging.getLogger("components.tracking")

PIPELINE_ENV = "CH11_PIPELINE_RUN"
TAG_PIPELINE = "ch11.pipeline_run"
TAG_STEP = "ch11.step"
TAG_FAMILY, TAG_EXPERIMENT, TAG_NOTE = "family", "experiment", "mlflow.note.content"
DATA_STEPS = ("download", "split", "standardize")
FINAL_COUNTS = ("epochs", "best_epoch", "params_count")
VIEW_KEY = "ch11-variants"  # the run list's saved view "Views → ch11: compare variants"
ROOT = Path.cwd


class TrackingError(RuntimeError):
    """The tracking server cannot be used; nothing was trained."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def artifact_root() -> str:
    return (Path.cwd() / "mlartifacts").as_uri()


def check_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking URI must answer /health within seconds; otherwise a clear error, at once."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - the user's own tracking server
            if r.status != 200:
                raise TrackingError(f"MLflow server at {uri} answered {r.status} on /health")
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {uri} ({getattr(err, 'reason', err)}). "
            "Start it (README: `make mlflow-ui`), fix MLFLOW_TRACKING_URI, or unset it to log to the local "
            "sqlite store. Nothing was trained."
        ) from None


# ------------------------------------------------------------------------------------------ lineage

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state() -> dict[str, str]:
    if os.environ.get("CH11_GIT_COMMIT"):  # in a Kubeflow container: recorded by pipeline.py at compile time
        return {"git.commit": os.environ["CH11_GIT_COMMIT"], "git.dirty": os.environ.get("CH11_GIT_DIRTY", "false")}
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def _load_yaml(path: Path) -> Any:
    """YAML with libyaml's C loader, cached by (path, mtime, size): dvc.lock of the whole chapter takes
    seconds to parse in pure Python, and every step's lineage reads it."""
    st = path.stat()
    return _load_yaml_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _load_yaml_cached(path: str, mtime_ns: int, size: int) -> Any:
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def params_hash(path: Path | None = None) -> str:
    path = Path(path or os.environ.get("PARAMS_FILE", "params.yaml"))
    try:
        resolved = _load_yaml(path)
    except OSError:
        return "none"
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def dvc_repo_lock(root: Path, timeout: float = 120.0) -> Iterator[bool]:
    """Hold DVC's repository lock (``.dvc/tmp/lock``, a ``zc.lockfile`` flock, as DVC takes it) while reading
    what DVC writes under it; yields whether it is held.

    DVC rewrites dvc.lock in place (truncate, then write) under this lock when a stage finishes. With stages
    running at once (``tools/repro.py``), a stage that reads dvc.lock unlocked can see half a file: a
    YAML error, or worse a hash cut short. DVC releases the lock while a stage's command runs, so the wait
    is only for another stage's bookkeeping. A repo without ``.dvc/tmp`` (or with ``core.hardlink_lock``,
    a flufl lock this one does not exclude) yields False and the caller reads unlocked.
    """
    path = root / ".dvc" / "tmp" / "lock"
    config = root / ".dvc" / "config"
    hardlink = config.is_file() and re.search(r"^\s*hardlink_lock\s*=\s*(true|1|yes)\s*$", config.read_text(), re.M | re.I)
    if not path.parent.is_dir() or hardlink:
        yield False
        return
    import zc.lockfile

    deadline = time.monotonic() + timeout
    while True:
        try:
            held = zc.lockfile.LockFile(str(path))
            break
        except zc.lockfile.LockError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"DVC's repository lock {path} has been held for over {timeout:.0f} s, so "
                                   "dvc.lock cannot be read safely. If no dvc command is running, a killed one "
                                   "left it: delete the file and run the stage again.") from None
            time.sleep(0.05)
    try:
        yield True
    finally:
        held.close()


def lock_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """Every output's DVC content hash (md5) as dvc.lock records it: {path: md5}; empty before a first repro.

    Read under DVC's repository lock (`dvc_repo_lock`), so a stage finishing beside this one cannot be
    caught halfway through rewriting the file."""
    with dvc_repo_lock(lock.resolve().parent):
        if not lock.is_file():
            return {}
        stages = (_load_yaml(lock) or {}).get("stages") or {}
    return {o["path"]: o["md5"] for st in stages.values() for o in st.get("outs", []) if o.get("md5")}


def dvc_hashes(paths: list[str], lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """The DVC content hash (md5) of each path, as recorded in dvc.lock by the stage that wrote it.

    In a Kubeflow container there is no dvc.lock: pipeline.py passes the hashes it read at compile time.
    """
    recorded = json.loads(os.environ["CH11_DVC_HASHES"]) if os.environ.get("CH11_DVC_HASHES") else lock_hashes(lock)
    return {p: recorded[p] for p in paths if p in recorded}


def dvc_remote() -> str:
    cfg = Path(".dvc/config")
    if not cfg.is_file():
        return ""
    text = cfg.read_text()
    for line in text.splitlines():
        if line.strip().startswith("url ="):
            return line.split("=", 1)[1].strip()
    return ""


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("tensorflow", "keras", "mlflow", "dvc", "pyarrow", "kfp"):
        try:
            out[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def device() -> str:
    try:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    except Exception:  # noqa: BLE001
        gpus = []
    return f"GPU x{len(gpus)}" if gpus else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested spec → ``model.hidden.0.units``-style keys (MLflow params are flat strings)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


# ------------------------------------------------------------------------------------------ runs

class Tracker:
    """Logging of one step's run (a child of the pipeline's parent run)."""

    def __init__(self, client, run_id: str, experiment_id: str, log_models: bool = True):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.log_models = log_models

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> None:
        import math

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(prefix + k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_history(self, history: list[dict], prefix: str = "") -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(prefix + k, float(v), ts, int(h["epoch"])) for h in history for k, v in h.items()
                 if k != "epoch" and isinstance(v, (int, float))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():  # a folder keeps its name: <run>/<folder>/...
            self.client.log_artifacts(self.run_id, str(path), f"{artifact_path}/{path.name}" if artifact_path else path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_datasets(self, paths: list[str]) -> None:
        """``mlflow.log_input`` per dataset: the DVC hash as digest, the DVC path (and remote) as source."""
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        hashes = dvc_hashes(paths)
        remote = dvc_remote()
        inputs, tags = [], {}
        for p in paths:
            digest = hashes.get(p, "untracked")
            ds = MetaDataset(HTTPDatasetSource(f"dvc://{p}" + (f"?remote={remote}" if remote else "")), name=p, digest=digest[:36])
            # what mlflow.log_input sends, in one call and without a fluent start_run per dataset
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[
                InputTag("mlflow.data.context", "training"), InputTag("dvc.md5", digest), InputTag("dvc.path", p)]))
            tags[f"dvc.md5.{p}"] = digest
        self.client.log_inputs(self.run_id, datasets=inputs)
        self.set_tags(tags)

    def log_run(self, model, metrics: dict, history: list[dict], files: "list[Path] | dict[str, Path]"):
        """Final metrics, one point per epoch of the history, artifacts and the model of a training run.

        Final metrics keep the names of the metrics JSON (``test_accuracy``, ``valid_accuracy``,
        ``seconds_per_epoch``, ...) on every training run, at step 0, so that the chart view draws one bar chart
        per metric across the variants. ``files`` as a dict logs each file under a common name at the artifact root
        (``learning_curves.png``, ``history.csv``), so that the compare page shows them side by side."""
        self.log_metrics({k: v for k, v in metrics.items()
                          if k.endswith(("accuracy", "loss")) or "seconds" in k or k in FINAL_COUNTS})
        self.log_history(history)
        if isinstance(files, dict):
            self.log_named(files)
        else:
            for f in files:
                self.log_artifact(f)
        return self.log_keras_model(model) if self.log_models else None

    def log_named(self, files: dict[str, Path], artifact_path: str | None = None) -> None:
        """Files under the names given ({artifact name: local file}), in one upload; missing files are skipped."""
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ch11-artifacts-") as tmp:
            for name, src in files.items():
                if Path(src).is_file():
                    shutil.copyfile(src, Path(tmp) / name)
            if any(Path(tmp).iterdir()):
                self.client.log_artifacts(self.run_id, tmp, artifact_path)

    def log_keras_model(self, model, name: str = "model", registered_name: str | None = None):
        """The model in MLflow's Keras flavour with a signature (raw pixels in, probabilities out)."""
        import mlflow
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        # what infer_signature(x, model.predict(x)) gives, read off the shapes: a predict call here would
        # trace a predict function for one more batch shape (~0.3 s per stage)
        sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.input_shape[-1]))]),
                             outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.output_shape[-1]))]))
        reqs = [f"{p}=={v}" for p, v in ((k.split('.', 1)[1], v) for k, v in package_versions().items())
                if p in ("tensorflow", "keras")]
        from .train import plain_copy

        with _active(self.run_id):  # the network alone, as in the .keras file: no optimizer or schedule of ours
            return mlflow.keras.log_model(plain_copy(model), name=name, signature=sig, pip_requirements=reqs,
                                          registered_model_name=registered_name)


@contextlib.contextmanager
def _active(run_id: str):
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id):
        yield


def _experiment_id(client, name: str) -> str:
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kwargs = {} if os.environ.get("MLFLOW_TRACKING_URI") else {"artifact_location": artifact_root()}
    try:
        return client.create_experiment(name, **kwargs)
    except Exception:  # noqa: BLE001 - created meanwhile by a parallel step
        return client.get_experiment_by_name(name).experiment_id


def pipeline_run_key() -> str:
    key = os.environ.get(PIPELINE_ENV)
    if key:
        return key
    g = git_state()
    return f"{g['git.commit'][:12]}{'-dirty' if g['git.dirty'] == 'true' else ''}-params-{params_hash()}"


def parent_run(client, experiment_id: str) -> str:
    if os.environ.get("MLFLOW_RUN_ID"):
        return os.environ["MLFLOW_RUN_ID"]
    key = pipeline_run_key()
    query = f"tags.`{TAG_PIPELINE}` = '{key}' and tags.`{TAG_STEP}` = 'pipeline'"

    def first() -> str | None:
        found = client.search_runs([experiment_id], filter_string=query, max_results=20)
        return min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if found else None

    existing = first()
    if existing:
        return existing
    own = client.create_run(experiment_id, tags={TAG_PIPELINE: key, TAG_STEP: "pipeline",
                                                 "mlflow.runName": f"pipeline {key[:40]}", **git_state()}).info.run_id
    # Stages run in parallel (tools/repro.py, Kubeflow): two may have created a parent at the same time.
    # Every one of them settles on the earliest; the others delete their own, so there is one parent.
    chosen = first() or own
    if chosen != own:
        client.delete_run(own)
    return chosen


def source_tags(step: str, commit: str) -> dict[str, str]:
    """MLflow's own source and user tags (the Source and User columns of the run list)."""
    import getpass

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    tags = {"mlflow.source.name": f"python -m components {step}", "mlflow.user": user,
            "mlflow.source.type": "JOB" if os.environ.get("KFP_RUN_ID") else "LOCAL"}
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def _base_tags(step: str, params: Params, inputs: list[str]) -> dict[str, Any]:
    git = git_state()
    tags = {TAG_STEP: step, TAG_PIPELINE: pipeline_run_key(), **git, "params.sha256": params_hash(),
            "device": device(), **package_versions(), **source_tags(step, git["git.commit"])}
    if os.environ.get("KFP_RUN_ID"):
        tags["kfp.run_id"] = os.environ["KFP_RUN_ID"]
    if os.environ.get("CH11_DATA_VERSION"):
        tags["data.version"] = os.environ["CH11_DATA_VERSION"]
    return tags


def run_tags(family: str, experiment: str, description: str | None = None) -> dict[str, str]:
    """The tags every child run has: its family and experiment (to group and filter by), its description as the
    run's description (MLflow's ``mlflow.note.content``, shown on the run page and in the run list's tooltip)."""
    tags = {TAG_FAMILY: family, TAG_EXPERIMENT: experiment}
    if description:
        tags[TAG_NOTE] = description
    return tags


def _child_tags(step: str, run_name: str | None, tags: dict[str, str] | None) -> dict[str, str]:
    out = {TAG_FAMILY: "data" if step in DATA_STEPS else step, TAG_EXPERIMENT: run_name or step}
    out.update({k: str(v) for k, v in (tags or {}).items() if v not in (None, "")})
    return out


def compare_view_state() -> dict[str, Any]:
    """The run list as a data scientist wants it: every run with a test accuracy (the variants, model B and B-on-A
    per seed, MC dropout), flat (a filter or a metric sort turns off nesting under the parent), best validation
    accuracy first, with the accuracy, time and family columns, and every run drawn in the charts."""
    return {
        "searchFilter": "metrics.test_accuracy >= 0", "orderByKey": "metrics.`valid_accuracy`", "orderByAsc": False,
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": ["metrics.`test_accuracy`", "metrics.`valid_accuracy`", "metrics.`seconds_per_epoch`",
                            "tags.`family`", "attributes.`Models`"],
        "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True,
    }


def _view_tag_value(name: str, state: dict[str, Any]) -> str:
    """A saved view of the run list as MLflow's UI (3.x) stores one: an experiment tag
    ``mlflow.sharedViewState.<key>`` = {name, createdAt, updatedAt, state: "deflate;" + base64(zlib(JSON))}."""
    import base64
    import zlib

    now = int(time.time() * 1000)
    packed = "deflate;" + base64.b64encode(zlib.compress(json.dumps(state).encode(), 9)).decode()
    return json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": packed})


def ensure_compare_view(client, experiment_id: str) -> None:
    """Once per experiment: mark it a model-training experiment (MLflow's experiment kind) and add the saved view
    "ch11: compare variants" to the run list's Views menu. Kept if already there
    (a user may have changed them); a failure is logged, never fatal."""
    try:
        tags = client.get_experiment(experiment_id).tags or {}
        if "mlflow.experimentKind" not in tags:
            client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
        if f"mlflow.sharedViewState.{VIEW_KEY}" not in tags:
            client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}",
                                      _view_tag_value("ch11: compare variants", compare_view_state()))
    except Exception as err:  # noqa: BLE001 - a convenience of the UI
        log.warning("could not add the compare view to MLflow experiment %s: %s", experiment_id, err)


def compare_view_url(experiment_id: str, uri: str | None = None, mode: str | None = None) -> str:
    """The link that opens the run list on that saved view (``make mlflow-ui`` serves the local store on :5000)."""
    uri = uri or tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}" + (f"&compareRunsMode={mode}" if mode else "")


@contextlib.contextmanager
def step_run(step: str, params: Params, inputs: list[str], run_name: str | None = None,
             spec: dict[str, Any] | None = None, parent: str | None = None,
             tags: dict[str, str] | None = None) -> Iterator[Tracker | None]:
    """A child run for one step; FAILED with the error as a tag if the block raises. Yields None when disabled.

    Every child has the tags ``family`` and ``experiment`` (defaults: "data" for the data steps, else the step;
    the run name); ``tags`` adds or overrides them (see `run_tags`)."""
    if not params.mlflow.enabled:
        yield None
        return
    from mlflow import MlflowClient

    uri = tracking_uri()
    check_server(uri)
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, params.mlflow.experiment_name)
    ensure_compare_view(client, exp_id)
    parent_id = parent or parent_run(client, exp_id)
    tags = {"mlflow.parentRunId": parent_id, "mlflow.runName": run_name or step, **_base_tags(step, params, inputs),
            **_child_tags(step, run_name, tags)}
    run = client.create_run(exp_id, tags=tags)
    tracker = Tracker(client, run.info.run_id, exp_id, log_models=params.mlflow.log_models)
    try:
        if spec is not None:
            tracker.log_params(spec)
        tracker.log_params({"seed": params.seed})
        if inputs:
            tracker.log_datasets(inputs)
        yield tracker
    except BaseException as err:
        stopped = isinstance(err, KeyboardInterrupt)  # Ctrl-C, or SIGTERM (io.stop_on_sigterm): KILLED, resumable
        msg = f"{type(err).__name__}: {err}"[:5000]
        try:
            client.set_tag(run.info.run_id, "error", msg)
            what = "Step stopped (rerun it to resume)" if stopped else "Step failed"
            client.set_tag(run.info.run_id, "mlflow.note.content", f"**{what}**\n\n```\n{msg}\n```")
            client.set_terminated(run.info.run_id, "KILLED" if stopped else "FAILED")
        finally:
            raise
    client.set_terminated(run.info.run_id, "FINISHED")


def register(tracker: Tracker | None, model_uri: str, short_name: str, value: float, params: Params) -> dict | None:
    """Register a model version; move the alias to it only if it beats the alias's current version on the metric."""
    if tracker is None or short_name not in params.mlflow.registry.models:
        return None
    reg = params.mlflow.registry
    name = f"{reg.name_prefix}_{short_name}"
    client = tracker.client
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None  # an MLflow 3 logged model
    if model_id is not None:
        try:
            client.get_logged_model(model_id)
        except Exception:  # noqa: BLE001 - not in this tracking store
            # metrics fetched with `dvc pull` (or copied from another clone) name models of the MLflow that made them
            log.warning("not registering %s: its model %s is not in this MLflow (%s); the metrics that name it were "
                        "made against another tracking store. Rerun the step that trained it (`dvc repro -f <stage>`) "
                        "to log it here.", name, model_uri, tracking_uri())
            client.set_tag(tracker.run_id, f"registry.{short_name}", f"skipped: {model_uri} not in this tracking store")
            return None
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not registered yet
        client.create_registered_model(name, description=f"Hands-On ML ch. 11: {short_name}")
    mv = client.create_model_version(name, source=model_uri, run_id=tracker.run_id, tags={reg.metric: str(value)},
                                     model_id=model_id)
    try:
        current = client.get_model_version_by_alias(name, reg.alias)
        best = float(current.tags.get(reg.metric, "-inf"))
    except Exception:  # noqa: BLE001 - no alias yet
        current, best = None, float("-inf")
    moved = value > best
    if moved:
        client.set_registered_model_alias(name, reg.alias, mv.version)
    client.set_tag(tracker.run_id, f"registry.{short_name}", f"{name} v{mv.version}" + (f" ({reg.alias})" if moved else ""))
    log.info("registered %s version %s (%s=%.4f)%s", name, mv.version, reg.metric, value,
             f"; alias '{reg.alias}' moved to it" if moved else f"; '{reg.alias}' stays on version {current.version}")
    return {"name": name, "version": mv.version, "alias_moved": moved}
