"""MLflow tracking: one parent run per pipeline execution, one child run per step (and per seed).

Where runs go: ``$MLFLOW_TRACKING_URI`` when set (a team server); otherwise a local SQLite store
``sqlite:///mlflow.db`` in the repository with artifacts in ``mlartifacts/`` (never the deprecated
``./mlruns`` file store).

Which parent: a pipeline execution is identified by ``$CH11_PIPELINE_RUN`` (``make repro`` sets a fresh
one per run; on Kubeflow it is the KFP run id). Without it, under a plain ``dvc repro`` or ``dvc exp run``,
by the ``dvc`` process that runs the stages (boot id, pid, start time: ``process.dvc_command``), so every
stage of that one command joins one parent. A step run by hand joins the parent of its code and params: the
git commit (+ "dirty") and the hash of params.yaml. ``$MLFLOW_RUN_ID`` names the parent run directly and
``$MLFLOW_EXPERIMENT_ID`` the experiment, when the environment provides them.

The parent's status follows its steps (``sync_parent``), so no orchestrator has to finish it: RUNNING while a
step runs; once none runs, FAILED if the latest run of some step failed, else KILLED if one was stopped, else
FINISHED. A step's run left RUNNING by a process that died without ending it (``kill -9``, out of memory) counts
as FAILED once that process is gone from this machine.
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
import types
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from . import process
from .config import Params

log = logging.getLogger("components.tracking")

PIPELINE_ENV = "CH11_PIPELINE_RUN"
TAG_PIPELINE = "ch11.pipeline_run"
TAG_STEP = "ch11.step"
TAG_PROCESS = "ch11.process"  # the step's process (process.Proc.ident): a RUNNING run whose process is gone failed
TAG_DVC = "ch11.dvc_process"  # on a parent run: the `dvc` process of the execution
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


# MLflow's own HTTP client retries a failing call 7 times with a backoff of 2 s and waits 120 s for an
# answer: a server that dies mid-step held the step for minutes per call. These bounds apply only where the
# user has not set the variable (a team server behind a rate limit may want more retries).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
LOST_DIR_ENV = "CH11_MLFLOW_LOST_DIR"


def bounded_http_defaults() -> dict[str, str]:
    """Set MLflow's HTTP retry/timeout variables to seconds-long bounds unless the user set them; the values used."""
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in HTTP_DEFAULTS}


def _health(uri: str, timeout: float) -> str | None:
    """None when an http(s) tracking server answers /health with 200 (or the URI is not http); else why not."""
    if not uri.startswith(("http://", "https://")):
        return None
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - the user's own tracking server
            return None if r.status == 200 else f"it answered {r.status} on /health"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def check_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking URI must answer /health within seconds; otherwise a clear error, at once."""
    why = _health(uri, timeout)
    if why is not None:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {uri} ({why}). "
            "Start it (README: `make mlflow-ui`), fix MLFLOW_TRACKING_URI, or unset it to log to the local "
            "sqlite store. Nothing was trained."
        )


# ------------------------------------------------------------------------------------------ lineage

def _git(*args: str, strip: bool = True) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip() if strip else out


def dvc_written(top: Path) -> list[str]:
    """Patterns (relative to the git top level ``top``) of what DVC itself writes into the tree: every pipeline's
    dvc.lock, every stage output of the registry (``{item}`` and ``{seed}`` as ``*``) and the .gitignore beside each."""
    from . import registry

    project = Path(__file__).resolve().parent.parent
    pats: list[str] = []
    for pipe in registry.PIPELINES.values():
        try:
            base = (project / pipe.directory).resolve().relative_to(top.resolve())
        except ValueError:  # this pipeline is not in that repository
            continue
        outs = [o for s in pipe.steps for o in (*s.outputs.values(), *s.metrics.values(), *s.plots.values())]
        workspace = base.parent if pipe.shared_workspace else base  # a shared workspace: outputs from the root
        pats.append((base / "dvc.lock").as_posix())
        for rel in [*outs, *{str(Path(o).parent / ".gitignore") for o in outs}]:
            pats.append((workspace / rel.replace("{item}", "*").replace("{seed}", "*")).as_posix())
    return pats


def _is_dvc_written(path: str, pats: list[str]) -> bool:
    import fnmatch

    return any(path == p or path.startswith(p + "/") or fnmatch.fnmatchcase(path, p)
               or fnmatch.fnmatchcase(path, p + "/*") for p in pats)


def git_state() -> dict[str, str]:
    """The commit and whether the tree the code runs from differs from it. What DVC writes while it runs the
    pipeline (dvc.lock, auto-staged by ``core.autostage``; the stages' outputs, such as the metrics files git
    tracks) does not make the tree dirty: a clean checkout stays clean for every stage of a ``dvc repro``.
    Any other change to a tracked file (code, params.yaml) does."""
    if os.environ.get("CH11_GIT_COMMIT"):  # in a Kubeflow container: recorded by pipeline.py at compile time
        return {"git.commit": os.environ["CH11_GIT_COMMIT"], "git.dirty": os.environ.get("CH11_GIT_DIRTY", "false")}
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "-z", "--untracked-files=no", strip=False)
    changed: list[str] = []
    entries = iter(status.split("\0"))
    for entry in entries:
        if len(entry) > 3:
            changed.append(entry[3:])
            if "R" in entry[:2] or "C" in entry[:2]:  # a rename or copy: the next entry is its source
                changed.append(next(entries, ""))
    pats = dvc_written(Path(_git("rev-parse", "--show-toplevel") or "."))
    dirty = any(p and not _is_dvc_written(p, pats) for p in changed)
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


_DEVICE: str | None = None


def device() -> str:
    """Where TensorFlow runs, in one line (``GPU x1 (NVIDIA H100 80GB HBM3), TensorFlow 2.21.0`` or
    ``CPU (x86_64, 2 cores), no GPU, TensorFlow 2.21.0``); logged once per process, the first time it is asked.
    The first GPU query is where TensorFlow prints its CUDA noise: filtered as at its import (io.quiet_tensorflow)."""
    from .io import native_stderr_filtered, quiet_logs

    global _DEVICE
    if _DEVICE is not None:
        return _DEVICE
    cpu = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    with native_stderr_filtered() if quiet_logs() else contextlib.nullcontext():
        try:
            import tensorflow as tf

            if _DEVICE is not None:  # the first import of TensorFlow asked already (io.quiet_tensorflow)
                return _DEVICE
            gpus = tf.config.list_physical_devices("GPU")
            names = []
            for g in gpus:
                try:
                    names.append(tf.config.experimental.get_device_details(g).get("device_name") or g.name)
                except Exception:  # noqa: BLE001 - details are optional
                    names.append(g.name)
            tf_version = f"TensorFlow {tf.__version__}"
        except Exception as err:  # noqa: BLE001 - TensorFlow missing or broken: say so, the step decides
            gpus, names, tf_version = [], [], f"TensorFlow unavailable ({type(err).__name__})"
    if gpus:
        _DEVICE = f"GPU x{len(gpus)} ({', '.join(dict.fromkeys(names))}), {tf_version}"
    else:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES") == "-1" and os.path.exists("/dev/nvidiactl")
        hidden = " visible (CUDA_VISIBLE_DEVICES=-1)" if hidden else ""
        _DEVICE = f"{cpu}, no GPU{hidden}, {tf_version}"
    log.info("device: %s", _DEVICE)
    return _DEVICE


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

class TrackingLost(TrackingError):
    """The tracking server stopped answering during a step: the step's outputs are written, its MLflow logging
    is incomplete (the message says what is missing and how to log it)."""


@dataclass
class _LostRun:
    run_id: str | None
    label: str
    not_logged: list[str] = field(default_factory=list)


@dataclass
class _Lost:
    """This process's step lost its tracking server: no more MLflow calls (each would wait out the retries)."""

    uri: str
    reason: str
    runs: dict[str, _LostRun] = field(default_factory=dict)

    def run(self, run_id: str | None, label: str) -> _LostRun:
        return self.runs.setdefault(run_id or f"none:{label}", _LostRun(run_id, label))

    def message(self) -> str:
        limits = ", ".join(f"{k}={os.environ.get(k, '?')}" for k in HTTP_DEFAULTS)
        parts = []
        for r in self.runs.values():
            what = "; ".join(dict.fromkeys(r.not_logged)) or "nothing"
            parts.append(f"run '{r.label}' ({r.run_id or 'never created'}): {what}")
        ids = [r.run_id for r in self.runs.values() if r.run_id]
        return (f"the MLflow tracking server at {self.uri} stopped answering during this step ({self.reason}; "
                f"MLflow HTTP limits: {limits}). The step's own outputs (models, metrics JSON, histories) are "
                f"written. Not logged to MLflow: {' | '.join(parts)}. To log it, start the server again and rerun "
                f"this step (`dvc repro`, or the same `python -m components ...` command): it logs everything to "
                f"a new run" + (f"; the next step that reaches the server ends run(s) {', '.join(ids)} as FAILED "
                                 f"(recorded in {lost_dir()})" if ids else "") + ".")


_lost: _Lost | None = None
_watching = False


def lost_dir() -> Path:
    """Where a step records the runs it could not end (``.mlflow-lost/``, or ``$CH11_MLFLOW_LOST_DIR``)."""
    return Path(os.environ.get(LOST_DIR_ENV) or Path.cwd() / ".mlflow-lost")


def _is_tracking_error(err: BaseException) -> bool:
    try:
        import requests
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    return isinstance(err, (MlflowException, requests.exceptions.RequestException, ConnectionError, TimeoutError))


def _lose(uri: str, err: BaseException) -> bool:
    """After a failed MLflow call: True (and this process stops tracking) if the server is gone, False if it is
    up (then the error is a real one and is raised)."""
    global _lost
    if _lost is not None and _lost.uri == uri:
        return True
    if not _is_tracking_error(err) or _health(uri, 5.0) is None:
        return False
    _lost = _Lost(uri, _short_reason(err))
    log.error("MLflow tracking server at %s stopped answering (%s); the step goes on without tracking and "
              "fails at its end with what was not logged", uri, _lost.reason)
    return True


def _short_reason(err: BaseException) -> str:
    """'log-batch: [Errno 111] Connection refused' rather than MLflow's paragraph about urllib3's retries."""
    text = str(err)
    call = re.search(r"/api/[\d.]+/[\w-]+/([\w/-]+)", text)
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+|(?:Read|Connect|Connection) timed out|timed out", text)
    where = f"{call.group(1)}: " if call else ""
    return where + (cause.group(0).strip() if cause else f"{type(err).__name__}: {text}"[:300])


@contextlib.contextmanager
def watch() -> Iterator[None]:
    """Around one step (``registry.call``): if its tracking server stopped answering, the step still runs to
    its end (writing its outputs), then fails with `TrackingLost` saying what was not logged."""
    global _lost, _watching
    _lost, _watching = None, True
    try:
        yield
        if _lost is not None:
            raise TrackingLost(_lost.message())
    finally:
        _lost, _watching = None, False


def _guarded(describe):
    """A Tracker method that, once the server is gone, records what it would have logged instead of failing."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            if not self._offline():
                try:
                    return fn(self, *args, **kwargs)
                except Exception as err:  # noqa: BLE001 - raised again unless the server is gone
                    if not _lose(self.uri, err):
                        raise
            _lost.run(self.run_id, self.label).not_logged.append(describe(*args, **kwargs))
            return None
        return wrapper
    return deco


def _log_inputs(client, run_id: str, inputs: list, tries: int = 4) -> None:
    """``client.log_inputs``, again when another step created the same dataset at the same moment: MLflow's store
    looks a dataset up, then inserts it, so two steps logging one new dataset at once make one of them fail on the
    store's unique key (SQLite / SQL stores); the retry finds the dataset the other one wrote."""
    for attempt in range(tries):
        try:
            return client.log_inputs(run_id, datasets=inputs)
        except Exception as err:  # noqa: BLE001 - only the unique-key race is retried
            if "UNIQUE constraint" not in str(err) and "Duplicate entry" not in str(err) or attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _names(d: dict, prefix: str = "", n: int = 6) -> str:
    keys = [prefix + str(k) for k in d]
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _history_names(history: list[dict], prefix: str = "") -> str:
    keys = dict.fromkeys(prefix + k for h in history for k in h if k != "epoch")
    return f"per-epoch {_names(keys)} ({len(history)} epochs)"


class Tracker:
    """Logging of one step's run (a child of the pipeline's parent run).

    Every logging call survives the tracking server going away: after MLflow's (bounded) retries the call
    records what it could not log and returns None, and so do the calls after it, at once (see `watch`)."""

    def __init__(self, client, run_id: str | None, experiment_id: str | None, log_models: bool = True,
                 label: str | None = None, uri: str | None = None):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.log_models = log_models
        self.label = label or str(run_id)
        self.uri = uri or getattr(client, "tracking_uri", None) or tracking_uri()
        self.logged: dict[str, int] = {}  # per metric key, the last step logged (a resumed run: from the server)

    def _offline(self) -> bool:
        return _lost is not None and _lost.uri == self.uri

    @_guarded(lambda params: f"params {_names(flatten(params))}")
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @_guarded(lambda metrics, step=None, prefix="": f"metrics {_names(metrics, prefix)}")
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> None:
        import math

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(prefix + k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    @_guarded(lambda history, prefix="": _history_names(history, prefix))
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

    @_guarded(lambda step, values: f"epoch {step}'s {_names(values)}")
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

    @_guarded(lambda files, dvc_dir=SPLITS_DVC_DIR: f"dataset inputs {', '.join(map(str, files))}")
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
        _log_inputs(self.client, self.run_id, inputs)
        if dir_md5:
            tags[f"dvc.md5.{dvc_dir}"] = dir_md5
        self.set_tags({k: v for k, v in tags.items() if v})

    @_guarded(lambda path, artifact_path=None: f"artifact {path}")
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():  # a folder keeps its name: <run>/<folder>/...
            self.client.log_artifacts(self.run_id, str(path), f"{artifact_path}/{path.name}" if artifact_path else path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_guarded(lambda tags: f"tags {_names(tags)}")
    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_guarded(lambda paths: f"dataset inputs {', '.join(paths)}")
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
        _log_inputs(self.client, self.run_id, inputs)
        self.set_tags(tags)

    def log_run(self, model, metrics: dict, history: list[dict], files: "list[Path] | dict[str, Path]", example=None):
        """Final metrics, one point per epoch of the history, artifacts and the model of a training run
        (``example``: a few raw test rows, logged as the model's input example).

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
        return self.log_keras_model(model, example=example) if self.log_models else None

    @_guarded(lambda files, artifact_path=None: f"artifacts {', '.join(files)}")
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

    @_guarded(lambda model, name="model", registered_name=None, example=None: "the model (Keras flavour)"
              + (f", registered as {registered_name}" if registered_name else ""))
    def log_keras_model(self, model, name: str = "model", registered_name: str | None = None, example=None):
        """The model in MLflow's Keras flavour with a signature and an input example: float32 raw pixels (0-255,
        flattened) in, probabilities out; ``mlflow.pyfunc.load_model`` serves it with Keras alone."""
        import mlflow
        import numpy as np
        from mlflow.models import Model, ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        # what infer_signature(x, model.predict(x)) gives, read off the shapes: a predict call here would
        # trace a predict function for one more batch shape (~0.3 s per stage)
        sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.input_shape[-1]))]),
                             outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.output_shape[-1]))]))
        reqs = [f"{p}=={v}" for p, v in ((k.split('.', 1)[1], v) for k, v in package_versions().items())
                if p in ("tensorflow", "keras")]
        from .train import plain_copy

        example = None if example is None else np.asarray(example, dtype=np.float32).reshape(-1, model.input_shape[-1])
        with _active(self.run_id):  # the network alone, as in the .keras file: no optimizer or schedule of ours
            return Model.log(artifact_path=None, name=name, flavor=_KERAS_FLAVOR, model=plain_copy(model), signature=sig,
                             input_example=example, pip_requirements=reqs, registered_model_name=registered_name)


def _save_keras_model(path: str, **kwargs):
    # mlflow.keras.log_model writes the input example before it makes the model's folder (mlflow/mlflow#16183, open):
    # the same flavour, its folder made first
    import mlflow

    os.makedirs(path, exist_ok=True)
    return mlflow.keras.save_model(path=path, **kwargs)


_KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model)


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
    dvc = process.dvc_command()
    if dvc is not None:  # one `dvc repro` / `dvc exp run`: all its stages, and only them
        return f"dvc-{dvc.ident}"
    g = git_state()
    return f"{g['git.commit'][:12]}{'-dirty' if g['git.dirty'] == 'true' else ''}-params-{params_hash()}"


def _parent_tags(key: str) -> dict[str, str]:
    git = git_state()
    tags = {TAG_PIPELINE: key, TAG_STEP: "pipeline", "mlflow.runName": f"pipeline {key[:40]}", **git}
    dvc = process.dvc_command()
    if not os.environ.get(PIPELINE_ENV) and dvc is not None:
        cmd = " ".join(dvc.args)
        tags.update({TAG_DVC: dvc.ident, "dvc.command": cmd[:500],
                     "mlflow.runName": f"pipeline {cmd[:60]} @{git['git.commit'][:8]}"})
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


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
    tags = _parent_tags(key)
    if TAG_DVC in tags:
        end_abandoned_parents(client, experiment_id)
    own = client.create_run(experiment_id, tags=tags).info.run_id
    # Stages run in parallel (tools/repro.py, Kubeflow): two may have created a parent at the same time.
    # Every one of them settles on the earliest; the others delete their own, so there is one parent.
    chosen = first() or own
    if chosen != own:
        client.delete_run(own)
    return chosen


def sync_parent(client, experiment_id: str, parent_id: str) -> str:
    """Set the parent's status from its children (module docstring) and return it. The latest run of each
    (step, run name) counts, so a step rerun by hand after a failure mends its parent."""
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=5000)
    latest: dict[tuple, Any] = {}
    for r in children:
        k = (r.data.tags.get(TAG_STEP), r.data.tags.get("mlflow.runName"))
        if k not in latest or (r.info.start_time, r.info.run_id) > (latest[k].info.start_time, latest[k].info.run_id):
            latest[k] = r
    seen = set()
    for r in latest.values():
        status = r.info.status
        if status in ("RUNNING", "SCHEDULED") and process.ident_alive(r.data.tags.get(TAG_PROCESS, "")) is False:
            note = "The process of this run ended without ending it (killed with SIGKILL, out of memory?)."
            client.set_tag(r.info.run_id, "error", note)
            client.set_tag(r.info.run_id, "mlflow.note.content", f"**Step died**\n\n{note}")
            client.set_terminated(r.info.run_id, "FAILED")
            status = "FAILED"
        seen.add(status)
    status = ("RUNNING" if seen & {"RUNNING", "SCHEDULED"} else "FAILED" if "FAILED" in seen
              else "KILLED" if "KILLED" in seen else "FINISHED")
    if client.get_run(parent_id).info.status != status:
        if status == "RUNNING":
            client.update_run(parent_id, status="RUNNING")
        else:
            client.set_terminated(parent_id, status)
    return status


def end_abandoned_parents(client, experiment_id: str) -> None:
    """Parents of earlier `dvc` executions on this machine still RUNNING although their `dvc` process is gone
    (a step killed with SIGKILL never ended its run): settle them from their children now."""
    query = (f"tags.`{TAG_STEP}` = 'pipeline' and attributes.status = 'RUNNING' "
             f"and tags.`{TAG_DVC}` LIKE '{process.boot_id()}-%'")
    for r in client.search_runs([experiment_id], filter_string=query, max_results=200):
        if process.ident_alive(r.data.tags[TAG_DVC]) is False:
            try:
                sync_parent(client, experiment_id, r.info.run_id)
            except Exception as err:  # noqa: BLE001 - tidying someone else's run must not stop this step
                log.warning("could not end the abandoned parent run %s: %s", r.info.run_id, err)


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


def _record_lost(tracker: Tracker, status: str, why: str) -> None:
    """Note a run this step could not end (the server was gone), for `end_lost_runs` to end it later."""
    if tracker.run_id is None:
        return
    from .io import write_json

    lost = _lost.run(tracker.run_id, tracker.label) if _lost is not None else None
    write_json(lost_dir() / f"{tracker.run_id}.json", {
        "uri": tracker.uri, "run_id": tracker.run_id, "run_name": tracker.label, "status": status, "error": why,
        "not_logged": list(dict.fromkeys(lost.not_logged)) if lost else []})


def end_lost_runs(client, uri: str) -> list[str]:
    """End the runs that steps left RUNNING because the server went away (recorded in `lost_dir()`), with the
    status they were recorded with (FAILED, or KILLED for a stopped step) and what was not logged as a note."""
    d = lost_dir()
    if not d.is_dir():
        return []
    from mlflow.entities import RunTag

    ended = []
    for f in sorted(d.glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("uri") != uri:
            continue
        try:
            if client.get_run(rec["run_id"]).info.status == "RUNNING":
                why = (f"tracking server lost during the step ({rec.get('error', '')}); not logged: "
                       + "; ".join(rec.get("not_logged") or ["unknown"]))[:5000]
                client.log_batch(rec["run_id"], tags=[RunTag("error", why), RunTag(
                    "mlflow.note.content", f"**MLflow tracking was lost during this step**; rerun the step to log "
                                           f"everything to a new run.\n\n```\n{why}\n```")])
                client.set_terminated(rec["run_id"], rec.get("status", "FAILED"))
                ended.append(rec["run_id"])
                log.warning("ended run %s (%s) as %s: its step lost the tracking server; rerun that step to log it",
                            rec["run_id"], rec.get("run_name"), rec.get("status", "FAILED"))
        except Exception as err:  # noqa: BLE001 - the server is gone (the caller handles it) or the run is
            if _health(uri, 5.0) is not None:  # gone / not endable: then the record has nothing left to do
                raise
            log.warning("could not end lost run %s (%s); forgetting it", rec.get("run_id"), err)
        f.unlink(missing_ok=True)
    return ended


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

        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # its start/stop lines at INFO: noise in a step's log
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
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
             splits: dict[str, Path] | None = None, resume: Path | None = None,
             system_metrics: bool | None = None, tags: dict[str, str] | None = None) -> Iterator[Tracker | None]:
    """A child run for one step; FAILED with the error as a tag if the block raises, KILLED on Ctrl-C / SIGTERM.
    Yields None when disabled.

    Every child has the tags ``family`` and ``experiment`` (defaults: "data" for the data steps, else the step;
    the run name); ``tags`` adds or overrides them (see `run_tags`).
    ``splits``: the split files the step reads ({split: path}, ``split_files``), logged as one dataset input each
    in place of the whole ``data/splits`` input. ``resume``: the step's resume directory (its checkpoint): the run
    id is kept there, and a rerun after a stop continues that run instead of opening a new one.
    ``system_metrics``: MLflow's system metrics for the run (default: on for the training steps).

    MLflow's HTTP retries are bounded (`bounded_http_defaults`). If the server goes away during the step, the
    block still runs to its end (the Tracker records what it could not log), the run is noted in `lost_dir()`
    for the next step that reaches the server to end it (`end_lost_runs`), and `watch` fails the step at its end."""
    if not params.mlflow.enabled:
        yield None
        return
    from mlflow import MlflowClient

    global _lost
    if not _watching:  # a step function called directly (not through registry.call): each run starts afresh
        _lost = None
    bounded_http_defaults()
    uri = tracking_uri()
    label = run_name or step
    client = MlflowClient(uri)
    run_id = exp_id = parent_id = None
    resumed = False
    own_parent = parent is None and not os.environ.get("MLFLOW_RUN_ID")  # a parent we keep the status of
    if _lost is None or _lost.uri != uri:
        check_server(uri)
        try:
            end_lost_runs(client, uri)
            exp_id = _experiment_id(client, params.mlflow.experiment_name)
            ensure_compare_view(client, exp_id)
            parent_id = parent or parent_run(client, exp_id)
            run_tags_ = {"mlflow.parentRunId": parent_id, "mlflow.runName": label, **_base_tags(step, params, inputs),
                         **_child_tags(step, run_name, tags), TAG_PROCESS: process.this_process().ident}
            run_id = _reopen(client, resume, exp_id, run_tags_) if resume is not None else None
            resumed = run_id is not None
            if run_id is None:
                run_id = client.create_run(exp_id, tags=run_tags_).info.run_id
                if resume is not None:
                    from .io import write_json

                    write_json(Path(resume) / RUN_FILE, {"run_id": run_id, "tracking_uri": uri})
            if own_parent and client.get_run(parent_id).info.status != "RUNNING":
                client.update_run(parent_id, status="RUNNING")  # a new step of an execution whose last step had ended
        except Exception as err:
            if not _lose(uri, err):
                raise
    tracker = Tracker(client, run_id, exp_id, log_models=params.mlflow.log_models, label=label, uri=uri)
    if run_id is None:
        _lost.run(None, label).not_logged.append("the run itself (never created)")
    elif resumed:
        tracker.logged = _logged_steps(client, run_id)
    monitor = _system_metrics(step, system_metrics, run_id, uri, resumed) if run_id and not tracker._offline() else None

    def settle_parent() -> None:
        if own_parent and parent_id and not tracker._offline():
            try:
                sync_parent(client, exp_id, parent_id)
            except Exception as err:  # noqa: BLE001 - the step's own run is already ended
                log.warning("could not update the status of the parent run %s: %s", parent_id, err)

    def stop_monitor() -> None:
        if monitor is not None:
            monitor.stop()

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
        status = "KILLED" if stopped else "FAILED"
        msg = f"{type(err).__name__}: {err}"[:5000]
        stop_monitor()
        if not stopped and not tracker._offline() and _is_tracking_error(err):
            _lose(uri, err)  # an MLflow call of the step's own (not through the Tracker): is the server gone?
        if tracker._offline():
            if _is_tracking_error(err):  # the step's own MLflow call failed: the rest of its logging is lost
                _lost.run(run_id, label).not_logged.append(
                    f"the rest of the step's MLflow logging (stopped at {_short_reason(err)})")
                _record_lost(tracker, status, msg)
                raise TrackingLost(_lost.message()) from err
            _record_lost(tracker, status, msg)
            raise
        try:
            client.set_tag(run_id, "error", msg)
            what = "Step stopped (rerun it to resume)" if stopped else "Step failed"
            client.set_tag(run_id, "mlflow.note.content", f"**{what}**\n\n```\n{msg}\n```")
            client.set_terminated(run_id, status)
            settle_parent()
        except Exception as end_err:  # noqa: BLE001 - the step's own error is the one to raise
            if _lose(uri, end_err):
                _lost.run(run_id, label).not_logged.append(f"the run's end ({status}, error tag)")
                _record_lost(tracker, status, msg)
            else:
                log.warning("could not mark run %s %s: %s", run_id, status, end_err)
        raise
    stop_monitor()
    if tracker._offline():
        _record_lost(tracker, "FAILED", _lost.reason)
        return
    try:
        client.set_terminated(run_id, "FINISHED")
    except Exception as err:
        if not _lose(uri, err):
            raise
        _lost.run(run_id, label).not_logged.append("the run's end (FINISHED)")
        _record_lost(tracker, "FAILED", _lost.reason)
        return
    settle_parent()


DATA_TAG = "dvc.md5.data/splits"  # the data a model was trained on: the DVC hash of the splits (tiny or full)


def register(tracker: Tracker | None, model_uri: str | None, short_name: str, value: float, params: Params,
             source_run_id: str | None = None) -> dict | None:
    """Register a model version whose source is the run that trained it (``source_run_id``, default the tracker's),
    with a description and lineage tags; move the alias to it only if it beats the alias's current version on the
    metric and was trained on the same data (the DVC hash of the splits): a tiny run never displaces a full one.

    Once the tracking server is gone (see `Tracker`), the registration is noted as not done instead."""
    if tracker is None or short_name not in params.mlflow.registry.models:
        return None
    return _register(tracker, model_uri, short_name, value, params, source_run_id)


@_guarded(lambda model_uri, short_name, value, params, source_run_id=None: f"model registration {short_name}")
def _register(tracker: Tracker, model_uri: str | None, short_name: str, value: float, params: Params,
              source_run_id: str | None = None) -> dict | None:
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
        src = client.get_run(source_run_id).data if source_run_id else None
    except Exception:  # noqa: BLE001 - a run of another tracking store (metrics fetched with `dvc pull`)
        src = None
    if src is None:
        source_run_id, src = tracker.run_id, client.get_run(tracker.run_id).data
    data = src.tags.get(DATA_TAG, "unknown")
    experiment = src.params.get("experiment") or src.tags.get("mlflow.runName", short_name)
    tags = {reg.metric: str(value), "experiment": experiment, DATA_TAG: data,
            **{k: src.tags[k] for k in ("family", "git.commit", "params.sha256", "data.version") if k in src.tags}}
    description = (f"{experiment}: {reg.metric} {value:.4f}, trained by run {source_run_id} on data {data[:12]} "
                   f"(git {tags.get('git.commit', 'unknown')[:12]}, params {tags.get('params.sha256', '?')}).")
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not registered yet
        client.create_registered_model(name, description=f"Hands-On ML ch. 11: {short_name}")
    mv = client.create_model_version(name, source=model_uri, run_id=source_run_id, tags=tags, model_id=model_id,
                                     description=description)
    try:
        current = client.get_model_version_by_alias(name, reg.alias)
        best = float(current.tags.get(reg.metric, "-inf"))
    except Exception:  # noqa: BLE001 - no alias yet
        current, best = None, float("-inf")
    other_data = current is not None and current.tags.get(DATA_TAG, "unknown") != data
    moved = value > best and not other_data
    if moved:
        client.set_registered_model_alias(name, reg.alias, mv.version)
    client.set_tag(tracker.run_id, f"registry.{short_name}", f"{name} v{mv.version}" + (f" ({reg.alias})" if moved else ""))
    if other_data:
        log.warning("registered %s version %s, but '%s' stays on version %s: that one was trained on other data "
                    "(splits %s, this one %s), so their %s do not compare. To serve this one anyway: "
                    "MlflowClient().set_registered_model_alias(%r, %r, %s)", name, mv.version, reg.alias,
                    current.version, current.tags.get(DATA_TAG, "unknown")[:12], data[:12], reg.metric, name,
                    reg.alias, mv.version)
    else:
        log.info("registered %s version %s (%s=%.4f)%s", name, mv.version, reg.metric, value,
                 f"; alias '{reg.alias}' moved to it" if moved else f"; '{reg.alias}' stays on version {current.version}")
    return {"name": name, "version": mv.version, "alias_moved": moved}
