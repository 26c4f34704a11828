"""The chapter as a Kubeflow pipeline (KFP v2): the same steps as dvc.yaml, on a cluster with GPU nodes.

    python pipeline.py compile [-o pipeline.yaml] [-S key=value ...]   # the YAML a Kubeflow 2.x cluster runs
    python pipeline.py run-local [-S key=value ...]                    # the whole pipeline here, kfp.local
    python pipeline.py submit --host URL [--experiment NAME] [--wait]  # compile and start a run on a cluster

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
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, List

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # run from a checkout; the image installs `components` as a package

from components import kfp_step, registry  # noqa: E402
from components.config import Params, ParamsError, load_raw, resolve_defaults, validate_params  # noqa: E402

# ------------------------------------------------------------------------------------------ components
# One per registry step; argument names are the step's run() arguments (tests/test_kfp.py checks them), written
# once here; each body hands them on as they are. A body runs in the task's container: it imports the project
# package there, installs nothing.


def download(params: str, data_version: str, out_dir: Output[Dataset]):
    artifacts = dict(locals())  # the arguments, named as in the registry (tests/test_kfp.py checks them)
    from components.kfp_step import run_step

    run_step("download", **artifacts)


def split(params: str, data_version: str, raw_dir: Input[Dataset], out_dir: Output[Dataset],
          card_md: Output[Markdown], card_json: Output[Metrics]):
    artifacts = dict(locals())  # the arguments, named as in the registry (tests/test_kfp.py checks them)
    from components.kfp_step import run_step

    run_step("split", **artifacts)


def standardize(params: str, data_version: str, splits_dir: Input[Dataset], scaler_path: Output[Artifact],
                metrics_path: Output[Metrics]):
    artifacts = dict(locals())  # the arguments, named as in the registry (tests/test_kfp.py checks them)
    from components.kfp_step import run_step

    run_step("standardize", **artifacts)


def experiment(params: str, data_version: str, splits_dir: Input[Dataset], scaler_path: Input[Artifact],
               model_path: Output[Model], artifacts_dir: Output[Artifact], metrics_path: Output[Metrics],
               history_path: Output[Dataset], diagnostics_path: Output[Dataset]):
    artifacts = dict(locals())  # the arguments, named as in the registry (tests/test_kfp.py checks them)
    from components.kfp_step import run_step  # which experiment: the one entry of `experiments` in params

    run_step("experiment", **artifacts)


def model_a(params: str, data_version: str, splits_dir: Input[Dataset], model_path: Output[Model],
            metrics_path: Output[Metrics], history_path: Output[Dataset]):
    artifacts = dict(locals())  # the arguments, named as in the registry (tests/test_kfp.py checks them)
    from components.kfp_step import run_step

    run_step("model_a", **artifacts)


def model_b(params: str, data_version: str, splits_dir: Input[Dataset], models_dir: Output[Model],
            metrics_path: Output[Metrics], history_path: Output[Dataset]):
    artifacts = dict(locals())  # the arguments, named as in the registry (tests/test_kfp.py checks them)
    from components.kfp_step import run_step

    run_step("model_b", **artifacts)


def b_on_a(params: str, data_version: str, splits_dir: Input[Dataset], model_a_path: Input[Model],
           model_b_metrics: Input[Metrics], models_dir: Output[Model], metrics_path: Output[Metrics],
           history_path: Output[Dataset]):
    artifacts = dict(locals())  # the arguments, named as in the registry (tests/test_kfp.py checks them)
    from components.kfp_step import run_step

    run_step("b_on_a", **artifacts)


def mc_dropout(params: str, data_version: str, splits_dir: Input[Dataset], models_dir: Input[List[Model]],
               artifacts_dir: Output[Artifact], metrics_path: Output[Metrics]):
    artifacts = dict(locals())  # the arguments, named as in the registry (tests/test_kfp.py checks them)
    from components.kfp_step import run_step

    run_step("mc_dropout", **artifacts)


def selu_simulation(params: str, data_version: str, figure_path: Output[Artifact], metrics_path: Output[Metrics],
                    csv_path: Output[Dataset]):
    artifacts = dict(locals())  # the arguments, named as in the registry (tests/test_kfp.py checks them)
    from components.kfp_step import run_step

    run_step("selu_simulation", **artifacts)


def report(params: str, data_version: str, experiments_dir: Input[List[Metrics]], model_a_metrics: Input[Metrics],
           model_b_metrics: Input[Metrics], b_on_a_metrics: Input[Metrics], mc_json: Input[Metrics],
           histories_dir: Input[List[Dataset]], card_json: Input[Metrics], selu_simulation_json: Input[Metrics],
           figures_dir: Output[Artifact], report_md: Output[Markdown], report_json: Output[Metrics],
           summary_json: Output[Metrics]):
    artifacts = dict(locals())  # the arguments, named as in the registry (tests/test_kfp.py checks them)
    from components.kfp_step import run_step

    run_step("report", **artifacts)


FUNCTIONS: dict[str, Callable] = {f.__name__: f for f in (
    download, split, standardize, experiment, model_a, model_b, b_on_a, mc_dropout, selu_simulation, report)}


# ------------------------------------------------------------------------------------------ wiring

def producers() -> dict[str, tuple[registry.Step, str]]:
    """Workspace path (pattern) -> the step and run() argument that writes it."""
    return {path: (s, kw) for s in registry.STEPS for kw, path in {**s.outputs, **s.metrics, **s.plots}.items()}


def source_of(path: str) -> tuple[registry.Step, str, bool]:
    """Who writes input ``path``: (step, argument, fan_in). A fan-in collects a foreach step's outputs."""
    made = producers()
    if path in made:
        step, kw = made[path]
        return step, kw, step.foreach is not None
    inside = [(s, kw) for p, (s, kw) in made.items() if p.startswith(path.rstrip("/") + "/")]
    if len(inside) == 1 and inside[0][0].foreach:
        return inside[0][0], inside[0][1], True
    raise LookupError(f"no step writes {path!r} (or several do: {[s.name for s, _ in inside]}); fix components/registry.py")


def data_version_of(lock: Path = ROOT / "dvc.lock", params: Params | None = None) -> str:
    """The DVC hash (md5) of the raw data in dvc.lock; before a first `dvc repro`, a hash of the pinned files."""
    import hashlib

    from components import tracking

    raw = tracking.lock_hashes(lock).get("data/raw")  # written by the download stage only
    if raw:
        return raw
    files = params.data.files.model_dump() if params else {}
    return "sha256-" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:32]


def lineage_env(lock: Path = ROOT / "dvc.lock") -> dict[str, str]:
    """Git commit and DVC hashes at compile time, for the tasks' lineage tags (no git or dvc.lock in a pod)."""
    from components import tracking

    git = tracking.git_state()
    return {"CH11_GIT_COMMIT": git["git.commit"], "CH11_GIT_DIRTY": git["git.dirty"],
            "CH11_DVC_HASHES": json.dumps(tracking.lock_hashes(lock), sort_keys=True)}


def build_pipeline(raw: dict[str, Any], *, local: bool = False, image: str | None = None,
                   gpu_image: str | None = None) -> Callable:
    """The pipeline function for these params (validated here, before anything is compiled or run).

    ``local``: for kfp.local (no Kubernetes settings; GPU tasks may run on CPU).
    """
    params = validate_params(raw)
    kf = params.kubeflow
    image, gpu_image = image or kf.image, gpu_image or kf.gpu_image
    resolved = resolve_defaults(raw)
    for section in ("defaults", "kubeflow"):  # merged into each experiment / compile-time only
        resolved.pop(section, None)
    comps = {name: dsl.component(fn, base_image=gpu_image if registry.get(name).gpu else image,
                                 install_kfp_package=False) for name, fn in FUNCTIONS.items()}
    missing = {s.name for s in registry.STEPS} - set(comps)
    if missing:
        raise LookupError(f"registry steps without a Kubeflow component in pipeline.py: {', '.join(sorted(missing))}")
    lineage = lineage_env()

    def task_yaml(step: registry.Step, item: str | None = None) -> str:
        import yaml

        return yaml.safe_dump(registry.task_params(resolved, step, item), sort_keys=True)

    def configure(task: dsl.PipelineTask, step: registry.Step) -> None:
        task.set_caching_options(kf.caching)
        for k, v in lineage.items():
            task.set_env_variable(k, v)
        if local:
            return
        r = kf.retry
        task.set_retry(r.num_retries, backoff_duration=f"{r.backoff_seconds}s", backoff_factor=r.backoff_factor,
                       backoff_max_duration=f"{r.backoff_max_seconds}s")
        kubernetes.use_field_path_as_env(task, env_name=kfp_step.RUN_ID_ENV, field_path="metadata.labels['pipeline/runid']")
        s = kf.mlflow_secret
        kubernetes.use_secret_as_env(task, secret_name=s.name, secret_key_to_env=s.keys, optional=s.optional)
        res = kf.gpu.resources if step.gpu else kf.cpu_resources
        task.set_cpu_request(res.cpu).set_memory_request(res.memory)
        if step.gpu:
            task.set_accelerator_type(kf.gpu.accelerator).set_accelerator_limit(kf.gpu.count)
            task.set_env_variable(kfp_step.GPU_ENV, "1" if kf.gpu.required else "0")
            for key, value in kf.gpu.node_selector.items():
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            for t in kf.gpu.tolerations:
                kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
            if kf.checkpoints.pvc:  # resume state outside the pod: a retried task resumes from its last epoch
                kubernetes.mount_pvc(task, pvc_name=kf.checkpoints.pvc, mount_path=kf.checkpoints.mount_path)
                task.set_env_variable(kfp_step.CHECKPOINT_ENV, kf.checkpoints.mount_path)

    @dsl.pipeline(name=kf.pipeline_name, description="Géron, Hands-On ML ch. 11: every experiment of 'Training Deep "
                  "Neural Networks' on Fashion-MNIST (same steps as dvc.yaml)")
    def ch11_pipeline(data_version: str = data_version_of(params=params)):
        tasks: dict[str, dsl.PipelineTask] = {}
        for step in registry.STEPS:
            args: dict[str, Any] = {}
            for kw, path in step.inputs.items():
                src, out, fan_in = source_of(path)
                channel = tasks[src.name].outputs[out]
                args[kw] = dsl.Collected(channel) if fan_in else channel
            if step.foreach:  # one iteration per entry, its item = the one entry of its params slice
                items = [task_yaml(step, n) for n in registry.foreach_entries(params, step.foreach)]
                with dsl.ParallelFor(items, name=step.name, parallelism=kf.parallelism) as it:
                    task = comps[step.name](params=it, data_version=data_version, **args)
            else:
                task = comps[step.name](params=task_yaml(step), data_version=data_version, **args)
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


def cmd_compile(args: argparse.Namespace) -> int:
    out = compile_pipeline(_params(args), Path(args.output), image=args.image, gpu_image=args.gpu_image)
    print(f"compiled {out} (upload it in the Kubeflow UI, or: python pipeline.py submit --host URL)")
    return 0


def cmd_run_local(args: argparse.Namespace) -> int:
    """The whole pipeline in local subprocesses (kfp.local): each task runs its component body as a pod would."""
    from kfp import local

    raw = _params(args)
    raw.setdefault("kubeflow", {}).setdefault("gpu", {})["required"] = False  # kfp.local ignores GPU requests
    os.environ.setdefault("CH11_PIPELINE_RUN", f"kfp-local-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    pipeline_func = build_pipeline(raw, local=True)
    root = Path(args.pipeline_root).resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    print(f"[run-local] pipeline run {os.environ['CH11_PIPELINE_RUN']}; artifacts under {root}", file=sys.stderr)
    pipeline_func()
    print(f"[run-local] done: artifacts under {root}; MLflow parent run tag ch11.pipeline_run = "
          f"{os.environ['CH11_PIPELINE_RUN']}", file=sys.stderr)
    return 0


def check_host(host: str, timeout: float = 10.0) -> None:
    """The KFP API must answer within seconds; otherwise say so clearly (no long hang)."""
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - the user's own cluster
            r.read()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return  # behind auth: the client's credentials take it from here
        raise SystemExit(f"submit: the Kubeflow Pipelines API at {host} answered {err.code} on {url}; "
                         "is --host the KFP endpoint (e.g. http://localhost:8080 after `kubectl port-forward "
                         "-n kubeflow svc/ml-pipeline-ui 8080:80`)?") from None
    except (urllib.error.URLError, OSError) as err:
        raise SystemExit(f"submit: cannot reach the Kubeflow Pipelines API at {host} ({getattr(err, 'reason', err)}). "
                         "Check --host, your VPN / port-forward (kubectl port-forward -n kubeflow svc/ml-pipeline-ui "
                         "8080:80), then retry. Nothing was submitted.") from None


def cmd_submit(args: argparse.Namespace) -> int:
    import kfp

    raw = _params(args)
    check_host(args.host)
    out = compile_pipeline(raw, Path(args.output), image=args.image, gpu_image=args.gpu_image)
    client = kfp.Client(host=args.host, namespace=args.namespace)
    run_name = args.run_name or f"ch11 {time.strftime('%Y-%m-%d %H:%M:%S')}"
    result = client.create_run_from_pipeline_package(str(out), arguments={}, run_name=run_name,
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

    def images(p: argparse.ArgumentParser) -> None:
        p.add_argument("--image", default=None, help="CPU image for data/report tasks (default: kubeflow.image)")
        p.add_argument("--gpu-image", default=None, help="GPU image for training tasks (default: kubeflow.gpu_image)")
        p.add_argument("-o", "--output", default="pipeline.yaml", help="where the compiled YAML goes (default: pipeline.yaml)")

    c = sub.add_parser("compile", help="compile the pipeline to YAML for a Kubeflow 2.x cluster")
    common(c)
    images(c)
    c.set_defaults(func=cmd_compile)
    r = sub.add_parser("run-local", help="run the whole pipeline here with kfp.local (subprocesses, CPU)")
    common(r)
    r.add_argument("--pipeline-root", default="local_outputs", help="where kfp.local keeps the artifacts")
    r.set_defaults(func=cmd_run_local)
    s = sub.add_parser("submit", help="compile, then start a run on a Kubeflow Pipelines cluster (kfp.Client)")
    common(s)
    images(s)
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    s.add_argument("--experiment", default="ch11-training-deep-nets", help="KFP experiment name")
    s.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user clusters)")
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
