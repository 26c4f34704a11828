"""The chapter as a Kubeflow pipeline (KFP v2): the same steps as dvc.yaml, on a cluster with GPU nodes.

    python pipeline.py compile [-o pipeline.yaml] [-S key=value ...]   # the YAML a Kubeflow 2.x cluster runs
    python pipeline.py run-local [-S key=value ...]                    # the whole pipeline here, kfp.local
    python pipeline.py run-local --runner docker --image IMAGE         # ... each task in the task image
    python pipeline.py submit --host URL [--experiment NAME] [--wait]  # compile and start a run on a cluster
    python pipeline.py compile --claims   # (run-local, submit too) the chapter, then its claims over claims.seeds

One registry, one schema: each component below is the Kubeflow edge of one step of
``components/registry.py`` (the same registry dvc.yaml is rendered from) and calls the same step function
as its DVC stage, through ``components.kfp_step.run_step``. The DAG is wired from the registry too: an
input is the output of the step that writes that workspace path, and a directory filled by a foreach
step (``metrics/experiments``) is a fan-in (``dsl.Collected``) of its ParallelFor. Each task receives its
slice of params.yaml (the keys its DVC stage declares), so KFP's cache re-runs exactly what DVC would;
the DVC hash of the data is a pipeline parameter, so new data re-runs everything.

Training tasks (``gpu=True`` in the registry: every experiment, model_a, model_b, b_on_a, mc_dropout) run
on the GPU image and request ``kubeflow.gpu`` (accelerator, count, node selector, tolerations); all tasks
retry with backoff; with ``kubeflow.checkpoints.pvc`` the training tasks mount that claim for their resume
state, so a retried task resumes from its last finished epoch. MLflow's address and credentials come from
the Kubernetes secret ``kubeflow.mlflow_secret`` (never from params, code or the compiled YAML), and every
run joins one MLflow parent run per KFP run (tag ``kfp.run_id``). See README, "Kubeflow".
"""

import argparse
import json
import linecache
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, List, Sequence

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # run from a checkout; the image installs `components` as a package

from components import kfp_step, registry  # noqa: E402
from components.config import Params, ParamsError, load_raw, resolve_defaults, validate_params  # noqa: E402

# ------------------------------------------------------------------------------------------ components
# One lightweight component per registry step, made from the registry (a step's argument names and paths are
# written there, once, and in its step function's signature; tests/test_registry.py checks the two agree).
# Its arguments are typed by what they hold, and its body hands them, as they are, to the step function the
# DVC stage calls. In the task's container it imports the image's package; it installs nothing. For example:
#
#     def model_a(params: str, data_version: str, splits_dir: Input[Dataset], model_path: Output[Model],
#                 metrics_path: Output[Metrics], history_path: Output[Dataset]):
#         artifacts = dict(locals())
#         from components.kfp_step import run_step
#         run_step('model_a', **artifacts)
#
# `python pipeline.py components` prints them all.

Steps = Sequence[registry.Step]
ARTIFACT_TYPES = {t.__name__: t for t in (Artifact, Dataset, Markdown, Metrics, Model)}


def artifact_type(step: registry.Step, arg: str, steps: Steps = registry.STEPS) -> str:
    """The KFP artifact type of one step argument: what its output holds, or what its producer's output holds."""
    if arg in step.metrics:
        return "Metrics"
    if arg in step.plots:
        return "Dataset"
    if arg in step.outputs:
        path = step.outputs[arg]
        if path.endswith(".keras") or path.startswith("models/"):
            return "Model"
        return "Markdown" if path.endswith(".md") else "Dataset" if path.startswith("data/") else "Artifact"
    src, out, fan_in = sources_of(step.inputs[arg], steps)[0]  # several producers: the same kind of output
    return f"List[{artifact_type(src, out, steps)}]" if fan_in else artifact_type(src, out, steps)


# Pipeline parameters a user may change in the KFP UI at run time (no recompile): the data version and the seeds.
# A component takes those of its step's params; run_step puts them into the task's params before validation.
RUNTIME_PARAMETERS = {"seed": "seed: int", "transfer.seeds": "transfer_seeds: List[int]"}


Unrolled = dict[str, list[str]]  # step name -> the labels of its tasks, for a fan-out step that is unrolled


def input_args(step: registry.Step, steps: Steps = registry.STEPS, unrolled: Unrolled | None = None
               ) -> list[tuple[str, str, str, str, str]]:
    """The component arguments of the step's inputs: (argument, run() argument, its type, producer task, output).
    An input is one argument, or one per producer where several steps fill its folder (the claims step's
    ``metrics/claims``: ``claims_dir__<producer>``), and one per task of an unrolled producer
    (``claims_dir__claims_mc_dropout__<seed>``); run_step lays the parts out as the one folder the step reads."""
    out = []
    for kw, path in step.inputs.items():
        srcs = sources_of(path, steps)
        for src, o, fan_in in srcs:
            arg = kw if len(srcs) == 1 else f"{kw}{kfp_step.PART}{src.name}"
            if unrolled and src.name in unrolled:  # its tasks' outputs, one argument each
                out += [(f"{arg}{kfp_step.PART}{label}", kw, artifact_type(src, o, steps), f"{src.name}{kfp_step.PART}{label}", o)
                        for label in unrolled[src.name]]
            else:
                t = artifact_type(src, o, steps)
                out.append((arg, kw, f"List[{t}]" if fan_in else t, src.name, o))
    return out


def component_source(step: registry.Step, steps: Steps = registry.STEPS, unrolled: Unrolled | None = None) -> str:
    args = ["params: str", "data_version: str", *(a for k, a in RUNTIME_PARAMETERS.items() if k in step.params),
            *(f"{a}: Input[{t}]" for a, _, t, *_ in input_args(step, steps, unrolled)),
            *(f"{a}: Output[{artifact_type(step, a)}]" for a in (*step.outputs, *step.metrics, *step.plots))]
    return (f"def {step.name}({', '.join(args)}):\n"
            "    artifacts = dict(locals())\n"
            "    from components.kfp_step import run_step\n"
            f"    run_step({step.name!r}, **artifacts)\n")


def component_function(step: registry.Step, steps: Steps = registry.STEPS, unrolled: Unrolled | None = None) -> Callable:
    """The component's Python function, defined from its source. KFP ships a lightweight component's source to
    the task (inspect.getsource), so the source is registered with linecache as dataclasses does for __init__."""
    source = component_source(step, steps, unrolled)
    filename = f"<pipeline.py component {step.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"__name__": __name__, "Input": Input, "Output": Output, "List": List, **ARTIFACT_TYPES}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own source, made from the registry
    return namespace[step.name]


# ------------------------------------------------------------------------------------------ wiring

def pipeline_steps(claims: bool = False) -> Steps:
    """The steps a compiled pipeline runs: the chapter's; with ``--claims``, the claims run's after them (they read
    the chapter's data and metrics, so a claims pipeline is the chapter plus its claims steps)."""
    return registry.STEPS + (registry.CLAIMS_STEPS if claims else ())


def is_fan_out(step: registry.Step) -> bool:
    """A step run once per foreach entry and/or per seed: a ParallelFor on Kubeflow (or unrolled, see below)."""
    return bool(step.foreach or step.seeds)


def is_unrolled(step: registry.Step, steps: Steps) -> bool:
    """A fan-out step that reads a fan-in (claims_mc_dropout: each seed's models, collected from the claims
    experiments' ParallelFor) is one task per item, made at compile time, not a ParallelFor: KFP cannot hand a
    Collected list of artifacts into a loop (the compiler types it as a parameter; a sub-pipeline around the loop
    compiles, but kfp.local then loses the list), nor collect from nested loops. Each task takes the whole
    collected list and run_step keeps its seed's; its consumers take one argument per task."""
    return is_fan_out(step) and any(fan_in for path in step.inputs.values() for *_, fan_in in sources_of(path, steps))


def fan_out_items(params: Params, step: registry.Step) -> list[tuple[str | None, int | None]]:
    """A step's tasks: (foreach entry, seed) for each entry x seed of a fan-out step; [(None, None)] otherwise."""
    entries = registry.foreach_entries(params, step.foreach) if step.foreach else [None]
    seeds = registry.foreach_entries(params, step.seeds) if step.seeds else [None]
    return [(n, sd) for n in entries for sd in seeds]


def item_label(item: str | None, seed: int | None) -> str:
    """A fan-out task's label (an identifier part): its foreach entry and/or seed."""
    import re

    return re.sub(r"\W", "_", "_".join(str(x) for x in (item, seed) if x is not None))


def producers(steps: Steps = registry.STEPS) -> dict[str, tuple[registry.Step, str]]:
    """Workspace path (pattern) -> the step and run() argument that writes it."""
    return {path: (s, kw) for s in steps for kw, path in {**s.outputs, **s.metrics, **s.plots}.items()}


def sources_of(path: str, steps: Steps = registry.STEPS) -> list[tuple[registry.Step, str, bool]]:
    """Who writes input ``path``: [(step, argument, fan_in)]. A fan-in collects a fan-out step's outputs; a folder
    may be filled by several fan-out steps (``metrics/claims``: the claims experiments and MC dropout)."""
    made = producers(steps)
    if path in made:
        step, kw = made[path]
        return [(step, kw, is_fan_out(step))]
    inside = [(s, kw) for p, (s, kw) in made.items() if p.startswith(path.rstrip("/") + "/")]
    if inside and all(is_fan_out(s) for s, _ in inside) and len({s.name for s, _ in inside}) == len(inside):
        return [(s, kw, True) for s, kw in inside]
    raise LookupError(f"no step writes {path!r} (or several do: {[s.name for s, _ in inside]}); fix components/registry.py")


def source_of(path: str, steps: Steps = registry.STEPS) -> tuple[registry.Step, str, bool]:
    """Who writes input ``path`` where one step does: (step, argument, fan_in)."""
    found = sources_of(path, steps)
    if len(found) != 1:
        raise LookupError(f"{path!r} is filled by several steps: {[s.name for s, *_ in found]}")
    return found[0]


def data_version_of(lock: Path = ROOT / "dvc.lock", params: Params | None = None) -> str:
    """The DVC hash (md5) of the raw data in dvc.lock; before a first `dvc repro`, a hash of the pinned files."""
    import hashlib

    from components import tracking

    raw = tracking.lock_hashes(lock).get("data/raw")  # written by the download stage only
    if raw:
        return raw
    files = params.data.files.model_dump() if params else {}
    return "sha256-" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:32]


def lineage_env(step: registry.Step, hashes: dict[str, str], git: dict[str, str]) -> dict[str, str]:
    """Git commit and the DVC hashes of the step's inputs at compile time, for its lineage tags (there is no git
    checkout or dvc.lock in a pod): a few hundred bytes per task."""
    inputs = {p: hashes[p] for p in step.inputs.values() if p in hashes}
    return {"CH11_GIT_COMMIT": git["git.commit"], "CH11_GIT_DIRTY": git["git.dirty"],
            "CH11_DVC_HASHES": json.dumps(inputs, sort_keys=True)}


PLACEHOLDER_REGISTRY = "ghcr.io/your-org/"
MIN_BACKEND = (2, 5, 0)  # Kubeflow Pipelines backend: dsl.Collected of artifacts (the report's fan-in) since 2.5.0


def images_of(kf, image: str | None = None, gpu_image: str | None = None, registry_: str | None = None,
              tag: str | None = None, images_file: str | None = None) -> tuple[str, str]:
    """The CPU and GPU images: an images file written by `make image-push` (pinned by digest), else
    --registry/--tag, else --image/--gpu-image, else params (kubeflow.image / gpu_image)."""
    if images_file:
        pinned = json.loads(Path(images_file).read_text())
        return pinned["image"], pinned["gpu_image"]
    if registry_ or tag:
        repo = f"{(registry_ or PLACEHOLDER_REGISTRY).rstrip('/')}/ch11-pipeline"
        tag = tag or "latest"
        return image or f"{repo}:{tag}", gpu_image or f"{repo}:{tag}-gpu"
    return image or kf.image, gpu_image or kf.gpu_image


def warn_if_placeholder(*images: str) -> None:
    bad = [i for i in images if i.startswith(PLACEHOLDER_REGISTRY)]
    if bad:
        print(f"WARNING: the images are the placeholder {', '.join(bad)}: on a cluster every pod would stay in "
              "ImagePullBackOff. Build and push yours (make image image-gpu image-push REGISTRY=registry.example.com/team), "
              "then compile with --images build/images.json (pinned by digest) or --registry REG --tag TAG.",
              file=sys.stderr)


def build_pipeline(raw: dict[str, Any], *, local: bool = False, image: str | None = None,
                   gpu_image: str | None = None, steps: Steps = registry.STEPS) -> Callable:
    """The pipeline function for these params (validated here, before anything is compiled or run).

    ``local``: for kfp.local (no Kubernetes settings; GPU tasks may run on CPU). ``steps``: the chapter's, or
    ``pipeline_steps(claims=True)`` for a claims run.
    """
    from components import tracking

    params = validate_params(raw)
    claims = any(registry.pipeline_of(s.name).name == "claims" for s in steps)
    if claims and not (params.claims and params.claims.seeds):
        raise ParamsError("--claims: params.yaml has no claims.seeds, so a claims run has nothing to run; set "
                          "claims: {seeds: [43, 44, 45, 46]} (or -S 'claims.seeds=[43,44]').")
    kf = params.kubeflow
    image, gpu_image = image or kf.image, gpu_image or kf.gpu_image
    resolved = resolve_defaults(raw)
    for section in ("defaults", "kubeflow"):  # merged into each experiment / compile-time only
        resolved.pop(section, None)
    unrolled = {s.name: [item_label(n, sd) for n, sd in fan_out_items(params, s)] for s in steps if is_unrolled(s, steps)}
    comps = {s.name: dsl.component(component_function(s, steps, unrolled), base_image=gpu_image if s.gpu else image,
                                   install_kfp_package=False) for s in steps}
    hashes, git = tracking.lock_hashes(ROOT / "dvc.lock"), tracking.git_state()

    def task_yaml(step: registry.Step, item: str | None = None, seed: int | None = None) -> str:
        import yaml

        task_params = registry.task_params(resolved, step, item)
        if seed is not None:  # a seeds step's run: its seed is the one its params say (run_step binds {seed} to it)
            task_params["seed"] = int(seed)
        if step.name == "download" and kf.data_volume.pvc and not local:  # the claim first, then the public mirrors
            task_params["data"]["mirrors"] = [kf.data_volume.mount_path, *task_params["data"]["mirrors"]]
        return yaml.safe_dump(task_params, sort_keys=True)

    def configure(task: dsl.PipelineTask, step: registry.Step) -> None:
        task.set_caching_options(kf.caching)
        for k, v in lineage_env(step, hashes, git).items():
            task.set_env_variable(k, v)
        if local:
            return
        task.set_env_variable("CH11_RUNTIME_PROFILE", "cluster")  # TensorFlow's defaults, threads from the CPU limit
        r = kf.retry
        task.set_retry(r.num_retries, backoff_duration=f"{r.backoff_seconds}s", backoff_factor=r.backoff_factor,
                       backoff_max_duration=f"{r.backoff_max_seconds}s")
        kubernetes.use_field_path_as_env(task, env_name=kfp_step.RUN_ID_ENV, field_path="metadata.labels['pipeline/runid']")
        s = kf.mlflow_secret
        kubernetes.use_secret_as_env(task, secret_name=s.name, secret_key_to_env=s.keys, optional=s.optional)
        if s.optional_keys:
            kubernetes.use_secret_as_env(task, secret_name=s.name, secret_key_to_env=s.optional_keys, optional=True)
        if kf.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, list(kf.image_pull_secrets))
        res = kf.gpu.resources if step.gpu else kf.cpu_resources
        task.set_cpu_request(res.cpu).set_memory_request(res.memory)
        task.set_cpu_limit(res.cpu_limit).set_memory_limit(res.memory_limit)
        kubernetes.set_timeout(task, res.timeout_seconds)
        if step.name == "download" and kf.data_volume.pvc:
            kubernetes.mount_pvc(task, pvc_name=kf.data_volume.pvc, mount_path=kf.data_volume.mount_path,
                                 sub_path=kf.data_volume.sub_path)
        if step.gpu:
            task.set_accelerator_type(kf.gpu.accelerator).set_accelerator_limit(kf.gpu.count)
            task.set_env_variable(kfp_step.GPU_ENV, "1" if kf.gpu.required else "0")
            for key, value in kf.gpu.selector().items():
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            for t in kf.gpu.tolerations:
                kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
            if kf.checkpoints.pvc:  # resume state outside the pod: a retried task resumes from its last epoch
                kubernetes.mount_pvc(task, pvc_name=kf.checkpoints.pvc, mount_path=kf.checkpoints.mount_path)
                task.set_env_variable(kfp_step.CHECKPOINT_ENV, kf.checkpoints.mount_path)

    what = "the chapter's claims over seeds (claims/dvc.yaml), after the chapter" if claims else "same steps as dvc.yaml"
    @dsl.pipeline(name=kf.pipeline_name + ("-claims" if claims else ""),
                  description=f"Géron, Hands-On ML ch. 11: every experiment of 'Training Deep Neural Networks' on "
                              f"Fashion-MNIST ({what})")
    def ch11_pipeline(data_version: str = data_version_of(params=params), seed: int = params.seed,
                      transfer_seeds: List[int] = list(params.transfer.seeds) if params.transfer else []):
        runtime_values = {"seed": seed, "transfer.seeds": transfer_seeds}
        tasks: dict[str, dsl.PipelineTask] = {}  # step name (an unrolled step's: <name>__<label>) -> its task
        for step in steps:
            def inputs() -> dict[str, Any]:  # a new dsl.Collected for each task (KFP's compiler rewrites it in place)
                args: dict[str, Any] = {RUNTIME_PARAMETERS[k].split(":")[0]: v
                                        for k, v in runtime_values.items() if k in step.params}
                for arg, _, kind, src, out in input_args(step, steps, unrolled):
                    channel = tasks[src].outputs[out]
                    args[arg] = dsl.Collected(channel) if kind.startswith("List[") else channel
                return args

            items = fan_out_items(params, step)
            if step.name in unrolled:  # one task per item, made here (is_unrolled says why)
                for (n, sd), label in zip(items, unrolled[step.name]):
                    task = comps[step.name](params=task_yaml(step, n, sd), data_version=data_version, **inputs())
                    task.set_display_name(f"{step.name} {label}")
                    configure(task, step)
                    tasks[f"{step.name}{kfp_step.PART}{label}"] = task
                continue
            # A fan-out step is ONE ParallelFor over its foreach entries x seeds, each item the params slice of
            # one task (its entry, its seed): a claims run's (experiment, seed) tasks all run side by side.
            if is_fan_out(step):
                with dsl.ParallelFor([task_yaml(step, n, sd) for n, sd in items], name=step.name,
                                     parallelism=kf.parallelism) as it:
                    task = comps[step.name](params=it, data_version=data_version, **inputs())
            else:
                task = comps[step.name](params=task_yaml(step), data_version=data_version, **inputs())
            task.set_display_name(step.name)
            configure(task, step)
            tasks[step.name] = task

    return ch11_pipeline


# ------------------------------------------------------------------------------------------ CLI

def _params(args: argparse.Namespace) -> dict[str, Any]:
    raw = load_raw(args.params, args.set)
    validate_params(raw, str(args.params or "params.yaml"))  # a bad key stops here, named, before any work
    return raw


def compile_pipeline(raw: dict[str, Any], output: Path, **kw: Any) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.tmp.yaml")
    compiler.Compiler().compile(build_pipeline(raw, **kw), str(tmp))
    os.replace(tmp, output)
    return output


def _images(args: argparse.Namespace, raw: dict[str, Any]) -> dict[str, str]:
    kf = validate_params(raw).kubeflow
    image, gpu_image = images_of(kf, args.image, args.gpu_image, args.registry, args.tag, args.images)
    warn_if_placeholder(image, gpu_image)
    return {"image": image, "gpu_image": gpu_image}


def cmd_compile(args: argparse.Namespace) -> int:
    raw = _params(args)
    out = compile_pipeline(raw, Path(args.output), steps=pipeline_steps(args.claims), **_images(args, raw))
    print(f"compiled {out} (upload it in the Kubeflow UI, or: python pipeline.py submit --host URL)")
    return 0


def cmd_components(args: argparse.Namespace) -> int:
    steps = pipeline_steps(args.claims)
    params = validate_params(_params(args))
    unrolled = {s.name: [item_label(n, sd) for n, sd in fan_out_items(params, s)] for s in steps if is_unrolled(s, steps)}
    print("\n\n".join(component_source(s, steps, unrolled) for s in steps), end="")
    return 0


def docker_runner(raw: dict[str, Any], image: str) -> Any:
    """kfp.local's DockerRunner for `run-local --runner docker`: every task in ``image`` (which must be here or
    pullable), on the host's network (so an MLflow server on 127.0.0.1 is reachable), with the MLflow settings and
    pipeline run name of this shell, the local data mirrors mounted read-only at their own paths, and outputs
    owned by the caller. Anything missing stops here with what to do, before a task starts."""
    from urllib.parse import urlparse

    from kfp import local

    try:
        import docker
        from docker.types import Mount

        client = docker.from_env()
        client.ping()
    except Exception as err:  # noqa: BLE001 - no SDK, no socket, no daemon: all the same to the user
        raise SystemExit(f"run-local --runner docker: Docker is not reachable ({err}). Start the daemon (as root: "
                         "`make docker-daemon`; or `sudo systemctl start docker`), or use --runner subprocess.") from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
        except Exception as err:  # noqa: BLE001
            raise SystemExit(f"run-local --runner docker: image {image} is not here and cannot be pulled ({err}). "
                             "Build it with `make image` (`make image OFFLINE=1` without a registry), then pass "
                             "--image $(make -s image-name).") from None
    local_dirs: list[str] = []  # the mirrors that are folders here (absolute: cmd_run_local checked)
    for m in validate_params(raw).data.mirrors:
        path = urlparse(m).path if m.startswith("file://") else None if "://" in m else m
        if path and Path(path).is_dir() and path not in local_dirs:
            local_dirs.append(path)
    mounts = [Mount(target=d, source=d, type="bind", read_only=True) for d in local_dirs]
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    env["CH11_PIPELINE_RUN"] = os.environ["CH11_PIPELINE_RUN"]
    kw: dict[str, Any] = {}
    if os.getuid() != 0:  # files in the pipeline root owned by the caller; a HOME that user can write
        kw["user"], env["HOME"] = f"{os.getuid()}:{os.getgid()}", "/tmp"
    return local.DockerRunner(network_mode="host", mounts=mounts, environment=env, **kw)


def cmd_run_local(args: argparse.Namespace) -> int:
    """The whole pipeline here with kfp.local: each task runs its component body as a pod would, in a subprocess
    of this venv or (``--runner docker``) in a container of the task image."""
    from kfp import local

    raw = _params(args)
    raw.setdefault("kubeflow", {}).setdefault("gpu", {})["required"] = False  # kfp.local ignores GPU requests
    os.environ.setdefault("CH11_PIPELINE_RUN", f"kfp-local-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if args.runner == "docker":
        from urllib.parse import urlparse

        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if urlparse(uri).scheme not in ("http", "https"):
            raise SystemExit(f"run-local --runner docker: the tasks log to an MLflow server, and MLFLOW_TRACKING_URI is "
                             f"{uri or 'not set'}. Start one (`make mlflow-ui`) and set MLFLOW_TRACKING_URI=http://127.0.0.1:5000.")
        for m in validate_params(raw).data.mirrors:  # a relative mirror means nothing in the container
            if "://" not in m and not Path(m).is_absolute():
                raise SystemExit(f"run-local --runner docker: data mirror {m!r} is a relative path; give it as an "
                                 f"absolute one (-S 'data.mirrors=[\"{Path(m).resolve()}\"]').")
        image = args.image or validate_params(raw).kubeflow.image
        runner = docker_runner(raw, image)
        pipeline_func = build_pipeline(raw, local=True, image=image, gpu_image=image,  # CPU here: one image
                                       steps=pipeline_steps(args.claims))
    else:
        runner = local.SubprocessRunner(use_venv=False)
        pipeline_func = build_pipeline(raw, local=True, steps=pipeline_steps(args.claims))
    root = Path(args.pipeline_root).resolve()
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    print(f"[run-local] pipeline run {os.environ['CH11_PIPELINE_RUN']} ({args.runner}); artifacts under {root}",
          file=sys.stderr)
    pipeline_func()
    print(f"[run-local] done: artifacts under {root}; MLflow parent run tag ch11.pipeline_run = "
          f"{os.environ['CH11_PIPELINE_RUN']}", file=sys.stderr)
    return 0


def auth_of(args: argparse.Namespace) -> dict[str, Any]:
    """kfp.Client's credentials: a bearer token (--token, --token-file, or the file $KF_PIPELINES_SA_TOKEN_PATH
    names, as a ServiceAccount token projected into a notebook pod), session cookies, and a CA bundle."""
    token = args.token
    token_file = args.token_file or os.environ.get("KF_PIPELINES_SA_TOKEN_PATH")
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as err:
            raise SystemExit(f"submit: cannot read the token file {token_file}: {err.strerror}. Nothing was submitted.") from None
    if args.ca_bundle and not Path(args.ca_bundle).is_file():
        raise SystemExit(f"submit: --ca-bundle {args.ca_bundle} is not a file. Nothing was submitted.")
    return {"existing_token": token or None, "cookies": args.cookies or None, "ssl_ca_cert": args.ca_bundle or None}


def _version(text: str) -> tuple[int, ...] | None:
    import re

    m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(int(x) for x in m.groups()) if m else None


def check_host(host: str, auth: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The KFP API must answer within seconds, as the API (not a login page), and be recent enough; otherwise
    say so clearly (no long hang). Returns the health answer (its tag_name is the backend version)."""
    import ssl

    auth = auth or {}
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if auth.get("existing_token"):
        req.add_header("Authorization", f"Bearer {auth['existing_token']}")
    if auth.get("cookies"):
        req.add_header("Cookie", auth["cookies"])
    ctx = ssl.create_default_context(cafile=auth["ssl_ca_cert"]) if auth.get("ssl_ca_cert") else None
    login = ("submit: {host} answered with a login page ({where}), not the Kubeflow Pipelines API: the cluster is "
             "behind Kubeflow's login (Dex / oauth2-proxy). Pass --token-file (a ServiceAccount token; in a Kubeflow "
             "notebook $KF_PIPELINES_SA_TOKEN_PATH is used), --token, or --cookies 'authservice_session=...' from "
             "your browser. Nothing was submitted.")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:  # noqa: S310 - the user's own cluster
            body, final, ctype = r.read(), r.geturl(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise SystemExit(f"submit: the Kubeflow Pipelines API at {host} refused the credentials ({err.code}). "
                             "Pass --token-file / --token (a ServiceAccount token with access to your profile "
                             "namespace) or --cookies, and --namespace. Nothing was submitted.") from None
        raise SystemExit(f"submit: the Kubeflow Pipelines API at {host} answered {err.code} on {url}; "
                         "is --host the KFP endpoint (e.g. http://localhost:8080 after `kubectl port-forward "
                         "-n kubeflow svc/ml-pipeline-ui 8080:80`)?") from None
    except (urllib.error.URLError, OSError) as err:
        raise SystemExit(f"submit: cannot reach the Kubeflow Pipelines API at {host} ({getattr(err, 'reason', err)}). "
                         "Check --host, your VPN / port-forward (kubectl port-forward -n kubeflow svc/ml-pipeline-ui "
                         "8080:80), --ca-bundle for a private CA, then retry. Nothing was submitted.") from None
    if final.rstrip("/") != url.rstrip("/") or "html" in ctype:
        raise SystemExit(login.format(host=host, where=final))
    try:
        health = json.loads(body or b"{}")
    except ValueError:
        raise SystemExit(login.format(host=host, where=f"{ctype or 'not JSON'} at {final}")) from None
    version = _version(str(health.get("tag_name", "")))
    if version and version < MIN_BACKEND:
        need = ".".join(map(str, MIN_BACKEND))
        raise SystemExit(f"submit: the Kubeflow Pipelines backend at {host} is {health['tag_name']}; this pipeline "
                         f"needs {need} or later (the report collects the experiments' artifacts with dsl.Collected "
                         "across a ParallelFor). Upgrade Kubeflow Pipelines. Nothing was submitted.")
    return health


def cmd_submit(args: argparse.Namespace) -> int:
    import kfp

    raw = _params(args)
    auth = auth_of(args)
    health = check_host(args.host, auth)
    if not _version(str(health.get("tag_name", ""))):
        print(f"submit: the backend did not say its version; it must be {'.'.join(map(str, MIN_BACKEND))} or later",
              file=sys.stderr)
    out = compile_pipeline(raw, Path(args.output), steps=pipeline_steps(args.claims), **_images(args, raw))
    client = kfp.Client(host=args.host, namespace=args.namespace, **auth)
    run_name = args.run_name or f"ch11{' claims' if args.claims else ''} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    arguments = json.loads(args.arguments) if args.arguments else {}
    result = client.create_run_from_pipeline_package(str(out), arguments=arguments, run_name=run_name,
                                                     experiment_name=args.experiment, namespace=args.namespace)
    print(f"submitted run {result.run_id} ({run_name}) to {args.host}, experiment {args.experiment!r}")
    print(f"  in MLflow: the parent run tagged ch11.pipeline_run = kfp-{result.run_id}")
    if args.wait:
        run = client.wait_for_run_completion(result.run_id, timeout=args.timeout)
        state = getattr(run, "state", None) or getattr(getattr(run, "run", None), "status", "unknown")
        print(f"run {result.run_id} finished: {state}")
        return 0 if str(state).upper() in ("SUCCEEDED", "SUCCESS") else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python pipeline.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--params", default=None, help="params file (default: params.yaml)")
        p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param, e.g. -S experiments.elu.train.epochs=3 (as in dvc exp run -S)")
        claims_flag(p)

    def claims_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--claims", action="store_true",
                       help="the claims run: the chapter, then every experiment again with each seed of claims.seeds "
                            "(one ParallelFor over experiment x seed), MC dropout per seed and the claims report")

    def images(p: argparse.ArgumentParser) -> None:
        p.add_argument("--images", default=None, metavar="FILE",
                       help="images pinned by digest, as `make image-push` writes them (build/images.json)")
        p.add_argument("--registry", default=None, help="REGISTRY/ch11-pipeline:TAG and :TAG-gpu (with --tag)")
        p.add_argument("--tag", default=None, help="image tag (with --registry)")
        p.add_argument("--image", default=None, help="CPU image for data/report tasks (default: kubeflow.image)")
        p.add_argument("--gpu-image", default=None, help="GPU image for training tasks (default: kubeflow.gpu_image)")
        p.add_argument("-o", "--output", default="pipeline.yaml", help="where the compiled YAML goes (default: pipeline.yaml)")

    c = sub.add_parser("compile", help="compile the pipeline to YAML for a Kubeflow 2.x cluster")
    common(c)
    images(c)
    c.set_defaults(func=cmd_compile)
    comp = sub.add_parser("components", help="print the Python source of every component (made from the registry)")
    common(comp)
    comp.set_defaults(func=cmd_components)
    r = sub.add_parser("run-local", help="run the whole pipeline here with kfp.local (CPU; subprocesses or containers)")
    common(r)
    r.add_argument("--pipeline-root", default="local_outputs", help="where kfp.local keeps the artifacts")
    r.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   help="subprocess: each task in a subprocess of this venv (default); docker: each task in a "
                        "container of the task image (kfp.local.DockerRunner), logging to the MLflow server "
                        "$MLFLOW_TRACKING_URI")
    r.add_argument("--image", default=None,
                   help="with --runner docker: the image every task runs in (default: kubeflow.image); "
                        "`make -s image-name` names the one `make image` built")
    r.set_defaults(func=cmd_run_local)
    s = sub.add_parser("submit", help="compile, then start a run on a Kubeflow Pipelines cluster (kfp.Client)")
    common(s)
    images(s)
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    s.add_argument("--experiment", default="ch11-training-deep-nets", help="KFP experiment name")
    s.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user clusters)")
    a = s.add_argument_group("authentication (multi-user Kubeflow)")
    a.add_argument("--token", default=None, help="bearer token for the KFP API (prefer --token-file)")
    a.add_argument("--token-file", default=None,
                   help="file holding a ServiceAccount token (default: $KF_PIPELINES_SA_TOKEN_PATH, set in Kubeflow notebooks)")
    a.add_argument("--cookies", default=None, help="session cookies from a logged-in browser, e.g. 'authservice_session=...'")
    a.add_argument("--ca-bundle", default=None, help="CA certificates (PEM) for a cluster with a private CA")
    s.add_argument("--arguments", default=None, metavar="JSON",
                   help='run-time pipeline parameters, e.g. \'{"seed": 7, "transfer_seeds": [1, 2, 3]}\'')
    s.add_argument("--run-name", default=None)
    s.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeded")
    s.add_argument("--timeout", type=int, default=24 * 3600, help="seconds --wait waits (default: a day)")
    s.set_defaults(func=cmd_submit)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
