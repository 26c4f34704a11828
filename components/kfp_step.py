"""The Kubeflow edge of a step: run one registry step inside a KFP component, on its artifacts.

A component body in ``pipeline.py`` calls ``run_step`` with its artifacts; this binds them to the step's
``run()`` arguments and calls the step function (``registry.call``) as ``python -m components`` does for a DVC
stage, so both orchestrators call the same function with the same params schema.

What it adds around the step:

* **params**: the task's slice of params.yaml (``registry.task_params``) arrives as YAML text, is written
  to a file and validated by the one schema before any work;
* **context**: the KFP run id joins the MLflow parent run (``CH11_PIPELINE_RUN = kfp-<run id>``, tag
  ``kfp.run_id``), and the git commit and DVC data hashes recorded at compile time become the lineage
  tags (there is no git checkout or dvc.lock inside the container); ``data_version`` keys the cache;
* **GPU**: a task that requested a GPU and sees none fails at once with a clear message (a dropped GPU
  request is a known cluster failure mode), unless params allow CPU;
* **resume**: where pipeline.py mounted the checkpoint volume (``kubeflow.checkpoints``), the training state
  goes there, so a task retried in a new pod resumes from its last finished epoch;
* **artifacts**: fan-in inputs (a list of artifacts from a ParallelFor, or several such lists where several
  steps fill one folder: ``<input>__<producer>``) become the directory the step expects, each file where its
  workspace path puts it under the input's path (a seed's input, ``models/claims/seed_{seed}``, keeps only that
  seed's); each output artifact carries the workspace path it stands for in its metadata, and Metrics artifacts
  get the step's scalar metrics for the KFP UI.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import config, registry

log = logging.getLogger("components.kfp")

GPU_ENV = "CH11_REQUIRE_GPU"
RUN_ID_ENV = "KFP_RUN_ID"  # from the pod's pipeline/runid label (pipeline.py)
CHECKPOINT_ENV = "CH11_CHECKPOINT_VOLUME"  # set by pipeline.py where it mounts kubeflow.checkpoints.pvc
PART = "__"  # component argument <input>__<producer>: one producer's part of an input several steps fill


# Readers that go by the file name (Keras loads only ``*.keras``): such a file lives inside its artifact,
# as ``<artifact>/<workspace name>``; every other file or directory is the artifact itself.
NAMED_SUFFIXES = (".keras",)


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def artifact_file(art_path: str | Path, workspace_path: str) -> Path:
    """Where the step reads or writes ``workspace_path`` inside an artifact at ``art_path``."""
    art_path = Path(art_path)
    return art_path / Path(workspace_path).name if workspace_path.endswith(NAMED_SUFFIXES) else art_path


def _materialize(values: list[Any], into: Path, workspace_dir: str) -> Path:
    """A fan-in input: the artifacts of ParallelFor loops, laid out as the directory ``workspace_dir`` the step reads
    (each where its workspace path puts it below that directory; those outside it, another seed's, are left out)."""
    into.mkdir(parents=True, exist_ok=True)
    top = workspace_dir.rstrip("/") + "/"
    kept = 0
    for art in values:
        rel = (art.metadata or {}).get("file")
        if not rel:
            raise ValueError(f"artifact {art.uri} has no 'file' metadata: was it written by a ch11 component?")
        if not rel.startswith(top):
            continue
        src, dst = artifact_file(art.path, rel), into / rel[len(top):]
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        kept += 1
    if values and not kept:
        raise ValueError(f"none of the {len(values)} collected artifacts is under {workspace_dir}: "
                         f"{sorted((a.metadata or {}).get('file', a.uri) for a in values)[:5]} ...")
    return into


def _scalars(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a metrics JSON (nested keys joined by '.') for the KFP UI."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def set_context(step: registry.Step, data_version: str) -> None:
    """Environment the step's tracking reads: the MLflow parent run and the data version.

    pipeline.py sets the rest as container env (outside KFP's cache key): ``KFP_RUN_ID`` from the pod's
    ``pipeline/runid`` label, ``CH11_GIT_COMMIT``/``CH11_GIT_DIRTY`` and ``CH11_DVC_HASHES`` recorded at
    compile time, and ``CH11_REQUIRE_GPU`` on GPU tasks (checked by ``train.configure``).
    """
    run_id = os.environ.get(RUN_ID_ENV, "")
    if run_id:
        os.environ.setdefault("CH11_PIPELINE_RUN", f"kfp-{run_id}")
    os.environ["CH11_DATA_VERSION"] = data_version
    if not step.gpu:
        os.environ.pop(GPU_ENV, None)


def checkpoints_on_volume(params_yaml: str) -> str:
    """The task's params with ``runtime.checkpoint_dir`` on the checkpoint volume, where pipeline.py mounted one.

    The state goes to ``<mount>/<KFP run id>``: when a training task's pod dies (eviction, preemption, OOM kill),
    KFP retries the task in a new pod of the same run, which finds the state saved after each finished epoch and
    resumes from there (with the same weights in the end as an uninterrupted run); other runs never share it.
    Without a volume the params are returned unchanged (the state lives in the pod)."""
    mount = os.environ.get(CHECKPOINT_ENV)
    if not mount:
        return params_yaml
    import yaml

    raw = yaml.safe_load(params_yaml) or {}
    where = Path(mount) / (os.environ.get(RUN_ID_ENV) or "no-run-id")
    raw.setdefault("runtime", {})["checkpoint_dir"] = str(where)
    log.info("resume state on the checkpoint volume, %s: a retried task resumes from its last finished epoch", where)
    return yaml.safe_dump(raw, sort_keys=True)


def with_run_values(params_yaml: str, seed: int | None = None, transfer_seeds: list[int] | None = None) -> str:
    """The task's params with the values of the run's pipeline parameters (set in the KFP UI at run time)."""
    if seed is None and transfer_seeds is None:
        return params_yaml
    import yaml

    raw = yaml.safe_load(params_yaml) or {}
    if seed is not None:
        raw["seed"] = int(seed)
    if transfer_seeds is not None:
        raw.setdefault("transfer", {})["seeds"] = [int(s) for s in transfer_seeds]
    return yaml.safe_dump(raw, sort_keys=True)


def run_step(step_name: str, params: str, data_version: str, seed: int | None = None,
             transfer_seeds: list[int] | None = None, **artifacts: Any) -> dict[str, Any]:
    """Run registry step ``step_name`` on KFP artifacts with its params slice (YAML text); return its metrics.

    ``data_version`` (the DVC hash of the raw data) is an input only so that KFP's cache key holds it;
    ``seed`` / ``transfer_seeds``, where the step uses them, are the run's pipeline parameters.
    """
    from .config import load_params
    from .io import setup_logging, stop_on_sigterm

    setup_logging(step_name)
    stop_on_sigterm()  # a pod's eviction (SIGTERM) ends the step's MLflow run as KILLED
    step = registry.get(step_name)
    expected = set(step.paths)
    parts: dict[str, list[Any]] = {}  # an input in parts (<input>__<producer>[__<task>]) -> one list of artifacts
    for name in [a for a in artifacts if PART in a and a.split(PART)[0] in step.inputs]:
        art = artifacts.pop(name)
        parts.setdefault(name.split(PART)[0], []).extend(art if _is_list(art) else [art])
    artifacts.update(parts)
    if set(artifacts) != expected:
        raise TypeError(f"component for {step_name}: artifacts {sorted(artifacts)} != registry's {sorted(expected)}")
    set_context(step, data_version)
    with tempfile.TemporaryDirectory(prefix=f"ch11-{step_name}-") as tmp:
        params_file = Path(tmp) / "params.yaml"  # the task's params as a file: its hash tags the MLflow run
        params_file.write_text(with_run_values(checkpoints_on_volume(params), seed, transfer_seeds))
        os.environ["PARAMS_FILE"] = str(params_file)
        p = load_params(params_file, schema=getattr(config, registry.pipeline_of(step_name).schema))
        item = None
        if step.foreach:  # the one entry of its params slice (registry.task_params)
            entries = registry.foreach_entries(p, step.foreach)
            if len(entries) != 1:
                raise ValueError(f"{step_name}: the task's params must hold exactly one entry of {step.foreach}, got {entries}")
            item = entries[0]
        run_seed = p.seed if step.seeds else None  # a seeds step's ParallelFor item sets the task's seed
        workspace = step.bind(item, run_seed)
        paths: dict[str, Path] = {}
        for kwarg, art in artifacts.items():
            if kwarg in step.inputs and _is_list(art):
                paths[kwarg] = _materialize(art, Path(tmp) / kwarg, workspace[kwarg])
            else:
                paths[kwarg] = artifact_file(art.path, workspace[kwarg])
                if kwarg not in step.inputs:
                    paths[kwarg].parent.mkdir(parents=True, exist_ok=True)
                    art.metadata.update({"file": workspace[kwarg], "step": step_name, "item": item or "",
                                         **({"seed": run_seed} if run_seed is not None else {})})
        log.info("running step %s%s%s on Kubeflow artifacts", step_name, f" {item}" if item else "",
                 f" (seed {run_seed})" if run_seed is not None else "")
        registry.call(step, p, item, paths)
    metrics: dict[str, Any] = {}
    for kwarg in step.metrics:
        art = artifacts[kwarg]
        data = json.loads(Path(art.path).read_text())
        metrics.update(data)
        if hasattr(art, "log_metric"):
            for k, v in _scalars(data).items():
                art.log_metric(k, v)
    return metrics
