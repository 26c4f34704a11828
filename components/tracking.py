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


# ------------------------------------------------------------------------------------------ data inputs

SPLIT_CONTEXT = {"train": "training", "valid": "validation", "test": "test"}  # mlflow.data.context of each split
SPLITS_DVC_DIR = "data/splits"  # the DVC output (a directory) that holds the split files


def split_files(splits_dir: str | Path, task: str, which: tuple[str, ...] = ("train", "valid", "test")) -> dict[str, Path]:
    """The Parquet files of ``task``'s splits that a step reads: {split: path} (see components/dataset.py)."""
    return {s: Path(splits_dir) / f"{task}_{s}.parquet" for s in which}


def _dvc_config(root: Path = Path(".")) -> dict[str, Any]:
    """DVC's config (``.dvc/config`` with ``.dvc/config.local`` over it), read with configobj as DVC reads it."""
    from configobj import ConfigObj

    merged: dict[str, Any] = {}
    for name in ("config", "config.local"):
        path = root / ".dvc" / name
        if path.is_file():
            for section, values in ConfigObj(str(path)).items():
                if isinstance(values, dict):
                    merged.setdefault(section, {}).update(values)
    return merged


def dvc_remote_url(root: Path = Path(".")) -> str:
    """The URL of the default DVC remote (``core.remote``), a local one as an absolute path; "" when none."""
    try:
        cfg = _dvc_config(root)
    except Exception:  # noqa: BLE001 - an unreadable config: no remote to name
        return ""
    name = cfg.get("core", {}).get("remote")
    url = cfg.get(f'remote "{name}"', {}).get("url", "") if name else ""
    if url and "://" not in url:  # a local remote: relative to .dvc/, as DVC resolves it
        url = str((root / ".dvc" / Path(url).expanduser()).resolve())
    return url


def dvc_object_url(remote: str, md5: str) -> str:
    """Where DVC 3 keeps the object of content hash ``md5`` in a remote (``files/md5/ab/cdef…``)."""
    return f"{remote.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}" if remote and md5 else ""


def dir_manifest(dir_md5: str, root: Path = Path(".")) -> dict[str, str]:
    """{relpath: md5} of the files of a DVC directory output, from its ``.dir`` manifest in the local DVC cache
    (``cache.dir``, default ``.dvc/cache``); empty where the manifest is not there (a Kubeflow pod, no cache)."""
    if not dir_md5.endswith(".dir"):
        return {}
    try:
        cache = Path(_dvc_config(root).get("cache", {}).get("dir", "cache")).expanduser()
    except Exception:  # noqa: BLE001
        cache = Path("cache")
    cache = cache if cache.is_absolute() else root / ".dvc" / cache
    for path in (cache / "files" / "md5" / dir_md5[:2] / dir_md5[2:], cache / dir_md5[:2] / dir_md5[2:]):
        if path.is_file():
            try:
                return {e["relpath"]: e["md5"] for e in json.loads(path.read_text())}
            except (ValueError, KeyError, TypeError):
                return {}
    return {}


def _dataset_source(url: str):
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": both are the local source
            return resolve_dataset_source(url)
    except Exception:  # noqa: BLE001 - a scheme MLflow has no source for (ssh://, azure://): the URL as it is
        return HTTPDatasetSource(url)


def split_dataset(path: Path, split: str, dvc_path: str, dvc_md5: str | None, remote: str):
    """One split file as an MLflow dataset: its Parquet schema, its row count (profile), the DVC md5 of the file as
    digest when DVC recorded one (else the first 32 hex digits of the ``content_sha256`` in the file's metadata) and,
    as source, the file's object in the DVC remote (else the file itself). Returns (dataset, input tags)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    from .dataset import DIGEST_KEY, read_meta

    meta = pq.read_metadata(path)  # the footer only: no page is read
    arrow = meta.schema.to_arrow_schema()

    def kind(t) -> DataType:
        if pa.types.is_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
            return DataType.binary
        if pa.types.is_integer(t):
            return DataType.long if t.bit_width > 32 or t == pa.uint32() else DataType.integer
        if pa.types.is_floating(t):
            return DataType.double if t.bit_width > 32 else DataType.float
        return DataType.string

    schema = Schema([ColSpec(kind(f.type), f.name, required=not f.nullable) for f in arrow])
    content = read_meta(path).get(DIGEST_KEY, "")
    digest, kind_of_digest = (dvc_md5, "dvc-md5") if dvc_md5 else (content[:32] or "unknown", "content-sha256")
    url = dvc_object_url(remote, dvc_md5 or "") or str(Path(path).resolve())
    rows = meta.num_rows

    class SplitDataset(MetaDataset):  # a metadata-only dataset with a profile (as mlflow's PandasDataset has)
        @property
        def profile(self) -> dict[str, int]:
            return {"num_rows": rows, "num_elements": rows * len(arrow)}

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    ds = SplitDataset(_dataset_source(url), name=dvc_path, digest=digest, schema=schema)
    tags = {"mlflow.data.context": SPLIT_CONTEXT.get(split, split), "dvc.path": dvc_path, "digest.kind": kind_of_digest,
            "rows": str(rows)}
    if dvc_md5:
        tags["dvc.md5"] = dvc_md5
    if content:
        tags["content_sha256"] = content
    return ds, tags


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
        self.logged: dict[str, int] = {}  # per metric key, the last step logged (a resumed run: from the server)

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
                 if k != "epoch" and isinstance(v, (int, float)) and not self._seen(prefix + k, int(h["epoch"]))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])
        self._note(items)

    def _seen(self, key: str, step: int) -> bool:
        """This epoch of ``key`` is in the run already (logged live by ``epoch_callback``, or before a resume)."""
        return step <= self.logged.get(key, step - 1)

    def _note(self, items: list) -> None:
        for m in items:
            self.logged[m.key] = max(m.step, self.logged.get(m.key, m.step))

    def log_epoch(self, step: int, values: dict[str, Any]) -> None:
        """One epoch's metrics, now (the epoch's real end time), at ``step`` = the epoch number; an epoch already in
        the run (a resumed step runs again the epoch that a kill cut short after it was logged) is not logged twice."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and not self._seen(k, step)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)
            self._note(items)

    def epoch_callback(self, offset: int = 0):
        """A Keras callback that logs each epoch's record at the end of that epoch (live curves in the UI, real
        timestamps), at step ``offset`` + the epoch number: the same keys and steps as ``log_history`` of the
        step's history, which then skips what was logged here. The training loop puts the learning rate and the
        epoch's seconds into the epoch's logs (components/train.py), so the record is the history row."""
        import keras

        tracker = self

        class LogEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                tracker.log_epoch(offset + epoch + 1, logs or {})

        return LogEpoch()

    def log_splits(self, files: dict[str, Path], dvc_dir: str = SPLITS_DVC_DIR) -> None:
        """One dataset input per split file the step reads, with its context (training / validation / test), schema
        and row count; digest and source from DVC (see ``split_dataset``)."""
        from mlflow.entities import DatasetInput, InputTag

        dir_md5 = dvc_hashes([dvc_dir]).get(dvc_dir, "")
        per_file = dir_manifest(dir_md5)
        remote = dvc_remote_url()
        inputs, tags = [], {}
        for split, path in files.items():
            dvc_path = f"{dvc_dir}/{Path(path).name}"
            ds, itags = split_dataset(Path(path), split, dvc_path, per_file.get(Path(path).name), remote)
            if dir_md5:
                itags["dvc.dir_md5"] = dir_md5
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(k, v) for k, v in itags.items()]))
            tags[f"dvc.md5.{dvc_path}"] = itags.get("dvc.md5", "")
        self.client.log_inputs(self.run_id, datasets=inputs)
        if dir_md5:
            tags[f"dvc.md5.{dvc_dir}"] = dir_md5
        self.set_tags({k: v for k, v in tags.items() if v})

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
        remote = dvc_remote_url()
        inputs, tags = [], {}
        for p in paths:
            digest = hashes.get(p, "untracked")
            # the output's object in the DVC remote (a directory's: its .dir manifest), else the DVC path
            url = dvc_object_url(remote, hashes.get(p, ""))
            ds = MetaDataset(_dataset_source(url) if url else HTTPDatasetSource(f"dvc://{p}"), name=p, digest=digest[:36])
            # what mlflow.log_input sends, in one call and without a fluent start_run per dataset
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[
                InputTag("mlflow.data.context", "training"), InputTag("dvc.md5", digest), InputTag("dvc.path", p)]))
            tags[f"dvc.md5.{p}"] = digest
        self.client.log_inputs(self.run_id, datasets=inputs)
        self.set_tags(tags)

    def log_run(self, model, metrics: dict, history: list[dict], files: list[Path]):
        """Final metrics, one point per epoch of the history, artifacts and the model of a training run."""
        self.log_metrics({k: v for k, v in metrics.items() if k.endswith(("accuracy", "loss")) or "seconds" in k},
                         step=int(metrics.get("epochs", 0)), prefix="final_")
        self.log_history(history)
        for f in files:
            self.log_artifact(f)
        return self.log_keras_model(model) if self.log_models else None

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


TRAINING_STEPS = {"experiment", "model_a", "model_b", "b_on_a"}  # steps with MLflow's system metrics on
SYSTEM_METRICS_INTERVAL = 10.0  # seconds between samples ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it)
RUN_FILE = "mlflow_run.json"  # in a step's resume directory (beside its checkpoint): the run a resumed step continues


class SystemMetrics:
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network; GPU where NVML is
    there) of one run, sampled by MLflow's ``SystemMetricsMonitor`` in a thread every ``SYSTEM_METRICS_INTERVAL``
    seconds (what ``mlflow.start_run(log_system_metrics=True)`` starts, here on a client-made run). ``stop`` ends
    the thread and logs the last, partial interval, so even a step shorter than the interval has one sample."""

    def __init__(self, run_id: str, uri: str, resumed: bool):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL,
                                            resume_logging=resumed, tracking_uri=uri)
        self.monitor.start()

    def stop(self) -> None:
        mon = self.monitor
        try:
            mon.finish()
            rest = mon.aggregate_metrics()  # samples taken since the last logged interval
            if rest:
                mon.publish_metrics(rest)
                mon.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001 - system metrics must never fail a step
            log.warning("system metrics: could not log the last samples (%s)", err)


def _system_metrics(step: str, wanted: bool | None, run_id: str, uri: str, resumed: bool) -> SystemMetrics | None:
    if not (step in TRAINING_STEPS if wanted is None else wanted):
        return None
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("false", "0"):
        return None  # MLflow's own switch, turned off
    try:
        return SystemMetrics(run_id, uri, resumed)
    except Exception as err:  # noqa: BLE001 - e.g. psutil missing on an odd platform
        log.warning("system metrics are off for this run: %s", err)
        return None


def _reopen(client, resume: Path, experiment_id: str, tags: dict[str, Any]) -> str | None:
    """The run that an interrupted attempt of this step left in ``resume`` (KILLED, FAILED, or RUNNING after a
    kill -9), back to RUNNING under the current parent; None when there is none to continue."""
    path = Path(resume) / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = client.get_run(json.loads(path.read_text())["run_id"])
    except Exception:  # noqa: BLE001 - unreadable, or a run of another tracking store: start a new one
        return None
    info = run.info
    if info.experiment_id != experiment_id or info.lifecycle_stage != "active" or info.status == "FINISHED":
        return None
    rid = info.run_id
    client.update_run(rid, status="RUNNING")
    stopped = run.data.tags.get("error", "")
    resumes = int(run.data.tags.get("ch11.resumes", "0")) + 1
    from mlflow.entities import RunTag

    extra = {"ch11.resumes": str(resumes),
             "mlflow.note.content": f"Resumed from its checkpoint ({resumes}x)" + (f"; stopped before by: {stopped}" if stopped else "")}
    if stopped:
        extra["ch11.stopped_before"] = stopped
        client.delete_tag(rid, "error")
    client.log_batch(rid, tags=[RunTag(k, str(v)) for k, v in {**tags, **extra}.items()])
    log.info("continuing MLflow run %s (resumed step)", rid)
    return rid


def _logged_steps(client, run_id: str) -> dict[str, int]:
    """The last step of every metric of a run (``run.data`` holds each key's latest point, at its largest step)."""
    run = client.get_run(run_id)
    return {m.key: int(m.step) for m in getattr(run.data, "_metric_objs", [])}


@contextlib.contextmanager
def step_run(step: str, params: Params, inputs: list[str], run_name: str | None = None,
             spec: dict[str, Any] | None = None, parent: str | None = None,
             splits: dict[str, Path] | None = None, resume: Path | None = None,
             system_metrics: bool | None = None) -> Iterator[Tracker | None]:
    """A child run for one step; FAILED with the error as a tag if the block raises, KILLED on Ctrl-C / SIGTERM.
    Yields None when disabled.

    ``splits``: the split files the step reads ({split: path}, ``split_files``), logged as one dataset input each
    in place of the whole ``data/splits`` input. ``resume``: the step's resume directory (its checkpoint): the run
    id is kept there, and a rerun after a stop continues that run instead of opening a new one.
    ``system_metrics``: MLflow's system metrics for the run (default: on for the training steps)."""
    if not params.mlflow.enabled:
        yield None
        return
    from mlflow import MlflowClient

    uri = tracking_uri()
    check_server(uri)
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, params.mlflow.experiment_name)
    parent_id = parent or parent_run(client, exp_id)
    tags = {"mlflow.parentRunId": parent_id, "mlflow.runName": run_name or step, **_base_tags(step, params, inputs)}
    run_id = _reopen(client, resume, exp_id, tags) if resume is not None else None
    resumed = run_id is not None
    if run_id is None:
        run_id = client.create_run(exp_id, tags=tags).info.run_id
        if resume is not None:
            from .io import write_json

            write_json(Path(resume) / RUN_FILE, {"run_id": run_id, "tracking_uri": uri})
    tracker = Tracker(client, run_id, exp_id, log_models=params.mlflow.log_models)
    if resumed:
        tracker.logged = _logged_steps(client, run_id)
    monitor = _system_metrics(step, system_metrics, run_id, uri, resumed)
    try:
        if spec is not None:
            tracker.log_params(spec)
        tracker.log_params({"seed": params.seed})
        others = [p for p in inputs if not (splits and p == SPLITS_DVC_DIR)]
        if others:
            tracker.log_datasets(others)
        if splits:
            tracker.log_splits(splits)
        yield tracker
    except BaseException as err:
        stopped = isinstance(err, KeyboardInterrupt)  # Ctrl-C, or SIGTERM (io.stop_on_sigterm): KILLED, resumable
        msg = f"{type(err).__name__}: {err}"[:5000]
        try:
            if monitor is not None:
                monitor.stop()
            client.set_tag(run_id, "error", msg)
            what = "Step stopped (rerun it to resume)" if stopped else "Step failed"
            client.set_tag(run_id, "mlflow.note.content", f"**{what}**\n\n```\n{msg}\n```")
            client.set_terminated(run_id, "KILLED" if stopped else "FAILED")
        finally:
            raise
    if monitor is not None:
        monitor.stop()
    client.set_terminated(run_id, "FINISHED")


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
