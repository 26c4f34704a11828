"""pipeline.py: the Kubeflow pipeline is the DVC pipeline (same steps, same params), compiles with the cluster
settings, runs whole under kfp.local with the same numbers as `dvc repro`, and submits over HTTP."""
from __future__ import annotations

import inspect
import json
import re
import sys
import threading
import time
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from components import registry
from components.config import load_raw, resolve_defaults

from .conftest import CHAPTER_EPOCHS, ROOT, free_port, run
from .tiny import keep_experiments, tiny_params

sys.path.insert(0, str(ROOT))
import pipeline  # noqa: E402

SECRET = "s3cr3t-value-that-must-not-leak"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, monkeypatch_module):
    # credentials in the compiling shell must never reach the YAML
    monkeypatch_module.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch_module.setenv("MLFLOW_TRACKING_USERNAME", SECRET + "-user")
    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    assert pipeline.main(["compile", "-o", str(out)]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    return {"text": out.read_text(), "spec": docs[0], "platform": docs[1]["platforms"]["kubernetes"]["deploymentSpec"]}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _artifact_args(fn) -> dict[str, str]:
    """Component argument -> 'in' / 'out' for the artifact arguments of a component function."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        ann = p.annotation
        if getattr(ann, "__origin__", None) is typing.Annotated or "Input" in str(ann) or "Output" in str(ann):
            out[name] = "out" if "Output" in str(ann) else "in"
    return out


def test_one_component_per_registry_step_with_the_step_arguments():
    for step in registry.STEPS:
        fn = pipeline.component_function(step)
        args = _artifact_args(fn)
        assert {k for k, v in args.items() if v == "in"} == set(step.inputs), step.name
        assert {k for k, v in args.items() if v == "out"} == set(step.outputs) | set(step.metrics) | set(step.plots), step.name
        # KFP ships the source: it must be retrievable, and the body calls the shared step function, nothing else
        src = inspect.getsource(fn)
        assert f"run_step({step.name!r}, **artifacts)" in src
        assert src.count("\n") == 4, src


def test_component_types_follow_what_the_producer_writes():
    src = {s.name: pipeline.component_source(s) for s in registry.STEPS}
    assert "model_path: Output[Model]" in src["experiment"]
    assert "model_a_path: Input[Model]" in src["b_on_a"]
    assert "models_dir: Input[List[Model]]" in src["mc_dropout"]  # a fan-in of the experiments' models
    assert "experiments_dir: Input[List[Metrics]]" in src["report"]
    assert "report_md: Output[Markdown]" in src["report"]
    out = run([sys.executable, str(ROOT / "pipeline.py"), "components"], cwd=ROOT)
    assert out.stdout.count("def ") == len(registry.STEPS)


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of the compiled pipeline, loops flattened: name -> task spec (with its DAG's loop items)."""
    comps = spec["components"]
    found: dict[str, dict] = {}

    def walk(dag: dict, loop_items: list | None) -> None:
        for name, t in dag["tasks"].items():
            comp = comps[t["componentRef"]["name"]]
            if "dag" in comp:
                items = t.get("parameterIterator", {}).get("items", {}).get("raw")
                walk(comp["dag"], json.loads(items) if items else None)
            else:
                found[name] = {**t, "loop_items": loop_items, "executor": comp["executorLabel"]}

    walk(spec["root"]["dag"], None)
    return found


def _param_const(task: dict) -> str | None:
    p = task["inputs"]["parameters"]["params"]
    return p.get("runtimeValue", {}).get("constant")


def _kfp_stages() -> dict[str, dict]:
    """dvc.yaml's stages but the params guard (DVC-only: pipeline.py validates the params before compiling)."""
    guard = registry.PIPELINES["main"].guard
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert guard.name in stages
    return {name: stage for name, stage in stages.items() if name != guard.name}


def test_compiled_tasks_are_the_dvc_stages_with_the_same_params(compiled):
    dvc = _kfp_stages()
    raw = resolve_defaults(load_raw(ROOT / "params.yaml"))
    tasks = _tasks(compiled["spec"])
    # task names are the step names; a foreach stage is a ParallelFor over the same entries
    assert {t.replace("-", "_") for t in tasks} == set(dvc)
    for name, task in tasks.items():
        step = registry.get(name.replace("-", "_"))
        stage = dvc[step.name]
        if "foreach" in stage:
            entries = registry.foreach_entries(pipeline.validate_params(raw), step.foreach)
            slices = [yaml.safe_load(i) for i in task["loop_items"]]
            assert [list(s["experiments"]) for s in slices] == [[e] for e in entries]
            declared = stage["do"]["params"]
        else:
            slices, entries, declared = [yaml.safe_load(_param_const(task))], [None], stage.get("params", [])
        for sl, entry in zip(slices, entries):
            for key in declared:  # every param DVC tracks for the stage reaches the task, with its value
                key = key.replace("${key}", entry or "")
                if key == "defaults":  # merged into each experiment / transfer model, compared through those
                    continue
                want, got = raw, sl
                for part in key.split("."):
                    want, got = want[part], got[part]
                assert got == want, (name, key)
            assert set(sl) <= {k.split(".")[0] for k in declared} | set(registry.ALWAYS_KEPT), (name, set(sl))


def _producer(arg: dict) -> str:
    """The task that writes an artifact input: direct, a loop's collected output, or a loop's input channel."""
    chan = "pipelinechannel--"
    if "taskOutputArtifact" in arg:
        key = arg["taskOutputArtifact"]["outputArtifactKey"]
        return key[len(chan):].rsplit("-", 1)[0] if key.startswith(chan) else arg["taskOutputArtifact"]["producerTask"]
    return arg["componentInputArtifact"][len(chan):].rsplit("-", 1)[0]


def test_compiled_dag_edges_are_the_dvc_deps(compiled):
    dvc = _kfp_stages()
    outs = {}
    for name, stage in dvc.items():
        body = stage.get("do", stage)
        for o in body.get("outs", []) + [next(iter(m)) for m in body.get("metrics", []) + body.get("plots", [])]:
            outs[re.sub(r"\$\{\w+\}", "{item}", o if isinstance(o, str) else next(iter(o)))] = name
    tasks = _tasks(compiled["spec"])
    for name, task in tasks.items():
        body = dvc[name.replace("-", "_")]
        body = body.get("do", body)
        want = set()
        for dep in body["deps"]:
            dep = re.sub(r"\$\{\w+\}", "{item}", dep)
            want |= {st for path, st in outs.items() if path == dep or path.startswith(dep.rstrip("/") + "/")}
        got = {_producer(a).replace("-", "_") for a in task["inputs"].get("artifacts", {}).values()}
        assert want == got, (name, want, got)


def test_gpu_tasks_request_gpus_and_every_task_has_retries_secrets_and_run_id(compiled):
    from components.config import load_params

    P = load_params(ROOT / "params.yaml")
    kf = P.kubeflow
    execs = compiled["spec"]["deploymentSpec"]["executors"]
    platform = compiled["platform"]["executors"]
    tasks = _tasks(compiled["spec"])
    gpu_steps = {s.name for s in registry.STEPS if s.gpu}
    assert gpu_steps >= {"experiment", "model_a", "model_b", "b_on_a", "mc_dropout"}
    for name, task in tasks.items():
        step = registry.get(name.replace("-", "_"))
        container = execs[task["executor"]]["container"]
        k8s = platform[task["executor"]]
        assert task["retryPolicy"]["maxRetryCount"] == kf.retry.num_retries
        assert task["cachingOptions"].get("enableCache") is True
        # one secret: the tracking URI required, credentials (server auth, S3 artifact store) only where present
        required, optional = k8s["secretAsEnv"]
        assert required["secretName"] == optional["secretName"] == kf.mlflow_secret.name
        assert {e["envVar"] for e in required["keyToEnv"]} == {"MLFLOW_TRACKING_URI"} and not required["optional"]
        assert {e["envVar"] for e in optional["keyToEnv"]} >= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                                                "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                                "AWS_SECRET_ACCESS_KEY"} and optional["optional"]
        assert k8s["fieldPathAsEnv"] == [{"fieldPath": "metadata.labels['pipeline/runid']", "name": "KFP_RUN_ID"}]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", env["CH11_GIT_COMMIT"])
        assert "install" not in " ".join(container["command"])  # nothing pip-installed at run time
        res = container["resources"]
        if step.name in gpu_steps:
            assert container["image"] == kf.gpu_image
            acc = res["accelerator"]
            assert (acc["resourceType"], acc["resourceCount"]) == (kf.gpu.accelerator, str(kf.gpu.count))
            assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}  # the NVIDIA GPU operator's
            assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert env["CH11_REQUIRE_GPU"] == "1"
        else:
            assert container["image"] == kf.image
            assert "accelerator" not in res and "nodeSelector" not in k8s
        # requests and limits on every task (a ResourceQuota rejects pods without them), and a timeout per try
        want = kf.gpu.resources if step.name in gpu_steps else kf.cpu_resources
        assert (res["resourceCpuRequest"], res["resourceMemoryRequest"]) == (want.cpu, want.memory)
        assert (res["resourceCpuLimit"], res["resourceMemoryLimit"]) == (want.cpu_limit, want.memory_limit)
        assert int(k8s["activeDeadlineSeconds"]) == want.timeout_seconds
        # the cluster profile (TensorFlow's defaults, threads from the CPU limit), never this box's tuning
        assert env["CH11_RUNTIME_PROFILE"] == "cluster"
        # lineage: only the DVC hashes of the task's own inputs, not the whole dvc.lock
        hashes = json.loads(env["CH11_DVC_HASHES"])
        assert set(hashes) <= set(step.inputs.values()) and len(env["CH11_DVC_HASHES"]) < 1024
    assert SECRET not in compiled["text"]
    # run-time pipeline parameters (the KFP UI's run form): the data version, fed to every task (KFP's cache key),
    # and the seeds, fed to the tasks that use them
    root = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    assert {"data_version", "seed", "transfer_seeds"} <= set(root)
    assert root["seed"]["defaultValue"] == P.seed and root["transfer_seeds"]["defaultValue"] == P.transfer.seeds
    for name, task in tasks.items():
        step = registry.get(name.replace("-", "_"))
        fed = {k for k, v in task["inputs"]["parameters"].items() if "componentInputParameter" in v}
        assert ("seed" in fed) == ("seed" in step.params), name
        assert ("transfer_seeds" in fed) == ("transfer.seeds" in step.params), name
    assert {"model_b", "b_on_a"} <= {n.replace("-", "_") for n, t in tasks.items()
                                     if "transfer_seeds" in t["inputs"]["parameters"]}


def test_the_checkpoint_volume_is_mounted_on_the_training_tasks_only(compiled, tmp_path):
    # by default no task mounts anything: the resume state lives in the pod
    assert "pvcMount" not in compiled["text"] and "CH11_CHECKPOINT_VOLUME" not in compiled["text"]
    out = tmp_path / "p.yaml"
    assert pipeline.main(["compile", "-o", str(out), "-S", "kubeflow.checkpoints.pvc=ch11-ckpt",
                          "-S", "kubeflow.checkpoints.mount_path=/ckpt"]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, task in _tasks(spec).items():
        step = registry.get(name.replace("-", "_"))
        mounts = platform[task["executor"]].get("pvcMount", [])
        env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"][task["executor"]]["container"].get("env", [])}
        if step.gpu:  # every training task: the claim at the mount path, and the step told where it is
            assert [(m["constant"], m["mountPath"]) for m in mounts] == [("ch11-ckpt", "/ckpt")], name
            assert env["CH11_CHECKPOINT_VOLUME"] == "/ckpt", name
        else:
            assert mounts == [] and "CH11_CHECKPOINT_VOLUME" not in env, name
    code = pipeline.main(["compile", "-o", str(tmp_path / "bad.yaml"), "-S", "kubeflow.checkpoints.mount_path=ckpt"])
    assert code == 2 and not (tmp_path / "bad.yaml").exists()


def _compile(tmp_path: Path, *args: str) -> tuple[dict, dict]:
    """Compile with these arguments: (the pipeline spec, the Kubernetes platform spec's executors)."""
    out = tmp_path / f"p{len(list(tmp_path.glob('p*.yaml')))}.yaml"
    assert pipeline.main(["compile", "-o", str(out), *args]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _images(spec: dict) -> dict[str, str]:
    return {n: spec["deploymentSpec"]["executors"][t["executor"]]["container"]["image"] for n, t in _tasks(spec).items()}


def test_images_by_registry_and_tag_or_pinned_by_digest_and_a_warning_for_the_placeholder(tmp_path, capsys):
    gpu = {s.name.replace("_", "-") for s in registry.STEPS if s.gpu}
    spec, _ = _compile(tmp_path)
    assert "placeholder" in capsys.readouterr().err  # the default images cannot be pulled anywhere: say so
    spec, _ = _compile(tmp_path, "--registry", "registry.example.com/team", "--tag", "1.2.0")
    assert "placeholder" not in capsys.readouterr().err
    for name, image in _images(spec).items():
        assert image == "registry.example.com/team/ch11-pipeline:1.2.0" + ("-gpu" if name in gpu else ""), name
    digest = "sha256:" + "ab" * 32
    pinned = tmp_path / "images.json"  # what `make image-push` writes
    pinned.write_text(json.dumps({"image": f"reg.example/ch11-pipeline@{digest}",
                                  "gpu_image": f"reg.example/ch11-pipeline@sha256:{'cd' * 32}"}))
    spec, _ = _compile(tmp_path, "--images", str(pinned))
    for name, image in _images(spec).items():
        assert image.startswith("reg.example/ch11-pipeline@sha256:") and (image.endswith("cd" * 32) == (name in gpu))


def test_image_pull_secrets_on_every_task(compiled, tmp_path):
    assert "imagePullSecret" not in compiled["text"]
    spec, platform = _compile(tmp_path, "-S", "kubeflow.image_pull_secrets=[regcred]")
    for name, task in _tasks(spec).items():
        assert [s.get("secretName") for s in platform[task["executor"]]["imagePullSecret"]] == ["regcred"], name


@pytest.mark.parametrize("preset, gpu_type, label", [
    ("nvidia-operator", None, ("nvidia.com/gpu.present", "true")),
    ("gke", "nvidia-l4", ("cloud.google.com/gke-accelerator", "nvidia-l4")),
    ("eks", "g5.xlarge", ("node.kubernetes.io/instance-type", "g5.xlarge")),
])
def test_gpu_node_presets(tmp_path, preset, gpu_type, label):
    args = ["-S", f"kubeflow.gpu.preset={preset}"] + (["-S", f"kubeflow.gpu.type={gpu_type}"] if gpu_type else [])
    spec, platform = _compile(tmp_path, *args)
    for name, task in _tasks(spec).items():
        k8s = platform[task["executor"]]
        if registry.get(name.replace("-", "_")).gpu:
            assert k8s["nodeSelector"]["labels"] == dict([label]), name
            assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu", name
        else:
            assert "nodeSelector" not in k8s and "tolerations" not in k8s, name


def test_a_gpu_preset_without_its_type_is_named(tmp_path, capsys):
    assert pipeline.main(["compile", "-o", str(tmp_path / "p.yaml"), "-S", "kubeflow.gpu.preset=gke"]) == 2
    assert "gpu.type" in capsys.readouterr().err and not (tmp_path / "p.yaml").exists()


def test_a_data_volume_for_clusters_without_egress(compiled, tmp_path):
    spec, platform = _compile(tmp_path, "-S", "kubeflow.data_volume.pvc=fashion-mnist",
                              "-S", "kubeflow.data_volume.sub_path=fmnist")
    for name, task in _tasks(spec).items():
        mounts = platform[task["executor"]].get("pvcMount", [])
        if name == "download":  # the claim, read first; then the public mirrors
            assert [(m["constant"], m["mountPath"], m.get("subPath")) for m in mounts] == [
                ("fashion-mnist", "/mnt/ch11-data", "fmnist")]
            mirrors = yaml.safe_load(_param_const(task))["data"]["mirrors"]
            assert mirrors[0] == "/mnt/ch11-data" and any(m.startswith("http") for m in mirrors[1:])
        else:
            assert mounts == [], name


def test_run_values_reach_the_step_params():
    from components.kfp_step import with_run_values

    text = yaml.safe_dump({"seed": 42, "transfer": {"seeds": [42, 43]}, "data": {"x": 1}})
    assert with_run_values(text) == text
    got = yaml.safe_load(with_run_values(text, seed=7, transfer_seeds=[1, 2, 3]))
    assert got == {"seed": 7, "transfer": {"seeds": [1, 2, 3]}, "data": {"x": 1}}


def test_threads_follow_the_containers_cpu_limit(tmp_path):
    from components.train import container_cpus

    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert container_cpus(tmp_path) is None  # no limit: TensorFlow's default
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert container_cpus(tmp_path) == 3  # 2.5 CPUs
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert container_cpus(v1) == 1
    assert container_cpus(tmp_path / "missing") is None
    code = ("from components import train\nfrom components.config import Runtime\nimport tensorflow as tf\n"
            "train.container_cpus = lambda: 3\ntrain.configure(Runtime())\n"
            "print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())")
    proc = run([sys.executable, "-c", code], cwd=ROOT, CH11_RUNTIME_PROFILE="cluster")
    assert proc.stdout.split()[-2:] == ["3", "3"]  # a pod limited to 3 CPUs: 3 threads, not the node's cores


def test_a_retried_training_task_resumes_from_the_checkpoint_volume(tiny_ws, tmp_path, monkeypatch):
    """A Kubeflow training task whose pod dies after epoch 2: KFP's retry (a new process, same run id) resumes
    from the state on the volume and ends with the weights of an uninterrupted run."""
    import keras
    import numpy as np

    from components import kfp_step

    from .test_training import train_in_process

    name, epochs = "dropout", 4
    raw = resolve_defaults(load_raw(tiny_ws / "params.yaml"))
    raw["experiments"][name]["train"]["epochs"] = epochs
    params_file = tmp_path / "task-params.yaml"
    params_file.write_text(yaml.safe_dump(registry.task_params(raw, registry.get("experiment"), name)))
    monkeypatch.delenv(kfp_step.CHECKPOINT_ENV, raising=False)  # no volume: the params stay as they are
    assert kfp_step.checkpoints_on_volume(params_file.read_text()) == params_file.read_text()
    out, volume = tmp_path / "artifacts", tmp_path / "volume"
    task = f"""
import sys, types
from pathlib import Path
from components import kfp_step
art = lambda p: types.SimpleNamespace(path=str(p), metadata={{}})
ws, out = Path({str(tiny_ws)!r}), Path({str(out)!r})
kfp_step.run_step("experiment", Path({str(params_file)!r}).read_text(), "v1",
                  splits_dir=art(ws / "data/splits"), scaler_path=art(ws / "data/scaler.npz"),
                  model_path=art(out / "model"), artifacts_dir=art(out / "reports"), metrics_path=art(out / "metrics.json"),
                  history_path=art(out / "history.csv"), diagnostics_path=art(out / "diagnostics.csv"))
"""
    env = {"PYTHONPATH": str(ROOT), kfp_step.CHECKPOINT_ENV: str(volume), "KFP_RUN_ID": "run-1"}
    killed = run([sys.executable, "-c", task], cwd=tiny_ws, check=False, CH11_FAULT_KILL_AFTER_EPOCH="2", **env)
    assert killed.returncode in (-9, 137), killed.stderr[-2000:]
    assert list((volume / "run-1").glob(f"{name}-*/state.json")), "the state was not saved on the volume"
    retried = run([sys.executable, "-c", task], cwd=tiny_ws, **env)
    assert f"resuming after epoch 2/{epochs}" in retried.stderr, retried.stderr[-2000:]
    assert not list((volume / "run-1").glob(f"{name}-*")), "resume state should be cleared after success"
    got = keras.models.load_model(out / "model" / f"{name}.keras").get_weights()
    model, _, _, _ = train_in_process(tiny_ws, name, **{f"experiments.{name}.train.epochs": epochs})
    assert all(np.array_equal(a, b) for a, b in zip(got, model.get_weights())), "resumed task differs from an uninterrupted run"


def test_compile_takes_overrides_and_names_a_bad_key(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert pipeline.main(["compile", "-o", str(out), "-S", "kubeflow.gpu.count=2", "-S", "kubeflow.image=reg/x:1"]) == 0
    text = out.read_text()
    assert "resourceCount: '2'" in text and "image: reg/x:1" in text
    code = pipeline.main(["compile", "-o", str(tmp_path / "bad.yaml"), "-S", "experiments.elu.model.activation=relu6"])
    assert code == 2 and not (tmp_path / "bad.yaml").exists()
    assert "experiments.elu.model.activation" in capsys.readouterr().err


def test_a_gpu_task_without_a_gpu_fails_fast_with_a_clear_message():
    code = ("from components import train\nfrom components.config import Runtime\ntrain.configure(Runtime())")
    proc = run([sys.executable, "-c", code], cwd=ROOT, check=False, CH11_REQUIRE_GPU="1")
    assert proc.returncode != 0 and "requested a GPU but TensorFlow sees none" in proc.stderr
    assert "kubeflow.gpu.required: false" in proc.stderr


# ------------------------------------------------------------------------------------------ submit

class _Recorder(BaseHTTPRequestHandler):
    """A stand-in KFP API on 127.0.0.1: records every request, answers like ml-pipeline does."""

    calls: list = []
    version = "2.5.0"
    token: str | None = None  # when set, the API wants this bearer token (a multi-user cluster)
    login = False  # when set, every API call is redirected to a login page (Kubeflow's Dex / oauth2-proxy)

    def log_message(self, *a):  # quiet
        pass

    def _gate(self) -> bool:
        if self.login and not self.path.startswith("/dex"):
            self.send_response(302)
            self.send_header("Location", "/dex/auth?client_id=kubeflow-oidc-authservice")
            self.end_headers()
            return True
        if self.path.startswith("/dex"):
            page = b"<html><body>Log in to Your Account</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return True
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            self._answer({"error": "unauthenticated"}, 401)
            return True
        return False

    def _answer(self, body: dict, code: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.calls.append(("GET", self.path, None))
        if self._gate():
            return None
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._answer({"commit_sha": "test", "tag_name": self.version, "multi_user": bool(self.token)})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._answer({"experiments": [], "total_size": 0})
        return self._answer({}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.calls.append(("POST", self.path, body))
        if self._gate():
            return None
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._answer({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        if self.path.startswith("/apis/v2beta1/runs"):
            return self._answer({"run_id": "run-123", "display_name": body.get("display_name"), "experiment_id": "exp-1"})
        return self._answer({}, 404)


def test_submit_sends_the_compiled_pipeline_to_the_kfp_api(tmp_path, capsys):
    _Recorder.calls = []
    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), _Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{srv.server_address[1]}"
        code = pipeline.main(["submit", "--host", host, "--experiment", "ch11-test", "--run-name", "r1",
                              "-o", str(tmp_path / "p.yaml")])
    finally:
        srv.shutdown()
    assert code == 0
    posts = {path.split("?")[0]: body for method, path, body in _Recorder.calls if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "ch11-test"
    run_body = posts["/apis/v2beta1/runs"]
    assert run_body["display_name"] == "r1" and run_body["experiment_id"] == "exp-1"
    spec = run_body["pipeline_spec"]
    spec, platform = spec.get("pipeline_spec", spec), spec.get("platform_spec", {})  # wrapped when a platform spec exists
    assert spec["pipelineInfo"]["name"] == "ch11-training-deep-nets" and "root" in spec
    assert "nvidia.com/gpu.present" in json.dumps(platform)  # the platform spec (GPU, secret) travels with it
    assert "run-123" in capsys.readouterr().out


@pytest.fixture()
def kfp_api():
    _Recorder.calls, _Recorder.version, _Recorder.token, _Recorder.login = [], "2.5.0", None, False
    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), _Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_submit_to_a_multi_user_cluster_with_a_token_file_and_run_parameters(kfp_api, tmp_path, monkeypatch):
    _Recorder.token = "sa-token-123"
    args = ["submit", "--host", kfp_api, "--namespace", "team-a", "-o", str(tmp_path / "p.yaml")]
    with pytest.raises(SystemExit) as err:  # no credentials: refused, and the message says what to pass
        pipeline.main(args)
    assert "--token-file" in str(err.value) and "Nothing was submitted" in str(err.value)
    token = tmp_path / "token"
    token.write_text("sa-token-123\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))  # as in a Kubeflow notebook pod
    assert pipeline.main(args + ["--arguments", '{"seed": 7, "transfer_seeds": [1, 2]}']) == 0
    run_body = next(b for m, p, b in _Recorder.calls if m == "POST" and p.startswith("/apis/v2beta1/runs"))
    assert run_body["runtime_config"]["parameters"] == {"seed": 7, "transfer_seeds": [1, 2]}
    with pytest.raises(SystemExit):  # a token file that is not there is named
        pipeline.main(["submit", "--host", kfp_api, "--token-file", str(tmp_path / "nope"), "-o", str(tmp_path / "q.yaml")])


def test_submit_detects_a_login_page_and_an_old_backend(kfp_api, tmp_path):
    _Recorder.login = True
    with pytest.raises(SystemExit) as err:
        pipeline.main(["submit", "--host", kfp_api, "-o", str(tmp_path / "p.yaml")])
    assert "login page" in str(err.value) and "--cookies" in str(err.value)
    _Recorder.login, _Recorder.version = False, "2.0.5"
    with pytest.raises(SystemExit) as err:
        pipeline.main(["submit", "--host", kfp_api, "-o", str(tmp_path / "p.yaml")])
    assert "2.0.5" in str(err.value) and "2.5.0 or later" in str(err.value)
    assert not (tmp_path / "p.yaml").exists() and not any(m == "POST" for m, _, _ in _Recorder.calls)


def test_submit_help_shows_the_auth_options():
    out = run([sys.executable, str(ROOT / "pipeline.py"), "submit", "--help"], cwd=ROOT).stdout
    for opt in ("--token", "--token-file", "KF_PIPELINES_SA_TOKEN_PATH", "--cookies", "--ca-bundle", "--namespace"):
        assert opt in out, opt


def test_submit_to_an_unreachable_host_fails_fast_and_clearly(tmp_path):
    host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as err:
        pipeline.main(["submit", "--host", host, "-o", str(tmp_path / "p.yaml")])
    assert time.monotonic() - t0 < 15
    assert "cannot reach the Kubeflow Pipelines API" in str(err.value) and "Nothing was submitted" in str(err.value)
    assert not (tmp_path / "p.yaml").exists()


# ------------------------------------------------------------------------------------------ run-local

KEEP = ("leaky_relu", "dropout", "alpha_dropout")  # one plain net and the two MC-dropout sources


@pytest.fixture(scope="module")
def both_runs(chapter_repo, chapter_repro, mlflow_server):
    """`pipeline.py run-local` beside the `dvc repro` of the tiny chapter, in the same clone, on the same params
    (cut to three experiments: each task's numbers depend only on its own params slice)."""
    raw = yaml.safe_load((chapter_repo / "params.yaml").read_text())
    keep_experiments(raw, KEEP)
    (chapter_repo / "kfp_params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = run([sys.executable, "-W", "ignore", "pipeline.py", "run-local", "--params", "kfp_params.yaml",
                "--pipeline-root", "kfp_out"], cwd=chapter_repo, MLFLOW_TRACKING_URI=mlflow_server,
               CH11_PIPELINE_RUN="kfp-local-side")
    return chapter_repo, proc.stdout + proc.stderr


def _kfp_metrics(root: Path) -> dict[str, dict]:
    """Metrics JSON of every kfp.local task, by what they stand for (experiment name or step)."""
    found = {}
    for p in root.rglob("metrics_path"):
        if p.is_file():
            d = json.loads(p.read_text())
            found[d.get("experiment") or p.parent.name] = d
    return found


def _results(d, prefix=""):
    """The result numbers of a metrics JSON (accuracies, losses, reduction factors), nested keys joined."""
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else ()):
        if isinstance(v, dict):
            out.update(_results(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and any(w in k for w in ("accuracy", "loss", "reduction", "ece", "epochs")):
            out[prefix + k] = v
    return out


@pytest.mark.xdist_group("chapter")  # same worker as tests/test_pipeline.py: shares the tiny chapter
def test_run_local_gives_the_numbers_of_dvc_repro(both_runs):
    repo, log = both_runs
    kfp = _kfp_metrics(repo / "kfp_out")
    pairs = {name: repo / f"metrics/experiments/{name}.json" for name in KEEP}
    pairs.update({step: repo / f"metrics/transfer/{step}.json" for step in ("model_a", "model_b", "b_on_a")})
    for name, path in pairs.items():
        want = _results(json.loads(path.read_text()))
        assert len(want) >= 4 and _results(kfp[name]) == want, name  # same seeds, same data: the same numbers
    mc_kfp = json.loads(next(p for p in (repo / "kfp_out").rglob("metrics_path") if p.parent.name == "mc-dropout").read_text())
    mc_dvc = json.loads((repo / "metrics/mc_dropout.json").read_text())
    assert set(mc_dvc) == {"dropout", "alpha_dropout"} and _results(mc_kfp) == _results(mc_dvc)
    report = next((repo / "kfp_out").rglob("report_md"))
    assert "| leaky_relu |" in report.read_text()


@pytest.mark.xdist_group("chapter")  # same worker as tests/test_pipeline.py: shares the tiny chapter
def one_parent_and_its_children(mlflow_server: str, key: str) -> list:
    """The child runs of the one FINISHED parent run of pipeline execution ``key`` (asserting there is one)."""
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("ch11-training-deep-nets")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`ch11.pipeline_run` = '{key}'", max_results=500)
    parents = [r for r in runs if r.data.tags["ch11.step"] == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def test_run_local_logs_one_parent_run_with_every_step_as_a_child(both_runs, mlflow_server):
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server)
    children = {r.data.tags["mlflow.runName"]: r for r in one_parent_and_its_children(mlflow_server, "kfp-local-side")}
    assert {"download", "split", "standardize", "model_a", "report", *KEEP, "mc_dropout dropout"} <= set(children)
    exp_run = children["leaky_relu"]
    assert exp_run.data.tags["data.version"] and exp_run.data.tags["git.commit"] != "unknown"
    assert len(c.get_metric_history(exp_run.info.run_id, "val_accuracy")) == CHAPTER_EPOCHS  # one point per epoch


# ------------------------------------------------------------------------------------------ claims run (--claims)

@pytest.fixture(scope="module")
def compiled_claims(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfp_claims") / "pipeline.yaml"
    assert pipeline.main(["compile", "--claims", "-o", str(out)]) == 0
    return list(yaml.safe_load_all(out.read_text()))[0]


def test_claims_pipeline_fans_out_over_experiments_x_seeds_in_one_parallel_for(compiled_claims):
    raw = resolve_defaults(load_raw(ROOT / "params.yaml"))
    seeds, experiments = raw["claims"]["seeds"], list(raw["experiments"])
    assert len(seeds) >= 2 and len(experiments) >= 2
    root = compiled_claims["root"]["dag"]["tasks"]
    comps = compiled_claims["components"]
    # exactly one loop runs claims_experiment, its items every (experiment, seed) pair once
    loops = {n: t for n, t in root.items() if "claims-experiment" in comps[t["componentRef"]["name"]].get("dag", {}).get("tasks", {})}
    assert len(loops) == 1
    (loop_name, loop), = loops.items()
    slices = [yaml.safe_load(i) for i in json.loads(loop["parameterIterator"]["items"]["raw"])]
    pairs = [(next(iter(s["experiments"])), s["seed"]) for s in slices]
    assert all(len(s["experiments"]) == 1 for s in slices)
    assert sorted(pairs) == sorted((e, s) for e in experiments for s in seeds)  # each pair once
    for sl, (name, _) in zip(slices, pairs):
        assert sl["experiments"][name] == raw["experiments"][name] and sl["runtime"] == raw["runtime"]
    # MC dropout once per seed, on the models the loop collected; the claims task after both (and the chapter)
    mc = {n: t for n, t in root.items() if t["componentRef"]["name"].startswith("comp-claims-mc-dropout")}
    assert sorted(yaml.safe_load(t["inputs"]["parameters"]["params"]["runtimeValue"]["constant"])["seed"]
                  for t in mc.values()) == sorted(seeds)
    for t in mc.values():
        assert loop_name in t["dependentTasks"]
        assert t["inputs"]["artifacts"]["models_dir"]["taskOutputArtifact"]["producerTask"] == loop_name
    claims = root["claims"]
    assert {loop_name, *mc, "mc-dropout", "model-b", "b-on-a"} <= set(claims["dependentTasks"])
    assert _param_const(claims) and yaml.safe_load(_param_const(claims))["claims"]["seeds"] == seeds
    # the chapter's tasks are all there (a claims run reads its metrics), its experiment loop as in the main job
    chapter = {t.replace("-", "_") for t in _tasks(compiled_claims) if t not in mc and t not in ("claims", "claims-experiment")}
    assert chapter == set(_kfp_stages())
    # the training tasks of a claims run are GPU tasks; the claims report is not
    execs = compiled_claims["deploymentSpec"]["executors"]
    tasks = _tasks(compiled_claims)
    gpu = {n for n, t in tasks.items() if "accelerator" in execs[t["executor"]]["container"]["resources"]}
    assert {"claims-experiment", *mc} <= gpu and "claims" not in gpu


def test_default_compile_has_no_claims_tasks(compiled):
    tasks = {t.replace("-", "_") for t in _tasks(compiled["spec"])}
    assert tasks == set(_kfp_stages())
    assert not any(t.startswith("claims") for t in tasks)
    assert "claims-experiment" not in compiled["text"]


def test_claims_pipeline_without_claims_seeds_is_refused_clearly(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert pipeline.main(["compile", "--claims", "-S", "claims.seeds=[]", "-o", str(out)]) == 2
    assert "no claims.seeds" in capsys.readouterr().err and not out.exists()


def test_claims_components_take_each_part_of_a_shared_folder():
    out = run([sys.executable, str(ROOT / "pipeline.py"), "components", "--claims", "-S", "claims.seeds=[7,8]"], cwd=ROOT)
    src = out.stdout
    assert out.stdout.count("def ") == len(registry.STEPS) + len(registry.CLAIMS_STEPS)
    assert "def claims_mc_dropout(params: str, data_version: str, splits_dir: Input[Dataset], models_dir: Input[List[Model]]" in src
    claims = next(d for d in src.split("\n\n") if d.strip().startswith("def claims("))
    # metrics/claims is filled by the claims experiments (a loop) and the MC dropout tasks (one per seed)
    assert "claims_dir__claims_experiment: Input[List[Metrics]]" in claims
    assert "claims_dir__claims_mc_dropout__7: Input[Metrics]" in claims and "claims_dir__claims_mc_dropout__8" in claims
    assert "seed: int" in claims  # the main job's seed, a run-time parameter, which the claims pair with


CLAIMS_KEEP = ("dropout", "dropout_none")  # an MC-dropout source and its baseline
CLAIMS_SEED = 43


def _claims_params(debian_dir: Path) -> dict:
    """Tiny params for a claims run: two experiments, one claims seed, the claims whose sides these cover."""
    raw = keep_experiments(tiny_params(mirrors=[str(debian_dir)]), CLAIMS_KEEP)
    raw["claims"]["seeds"] = [CLAIMS_SEED]
    return raw


def test_run_local_claims_trains_each_experiment_per_seed_and_reports_the_claims(
        tmp_path, monkeypatch, debian_dir, mlflow_server):
    """The claims pipeline under kfp.local (SubprocessRunner) on tiny params: the chapter's steps the claims read,
    the (experiment, seed) loop, MC dropout per seed and the claims step, which pairs the chapter's seed with the
    claims seed. (`run-local --claims` runs the same with the chapter's report and SELU simulation too.)"""
    from kfp import local

    raw = _claims_params(debian_dir)
    claim_names = set(raw["claims"]["list"])
    assert {"dropout_gap", "mc_dropout_ece", "transfer_error_rate"} <= claim_names
    steps = [s for s in pipeline.pipeline_steps(claims=True) if s.name not in ("selu_simulation", "report")]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("CH11_PIPELINE_RUN", "kfp-local-claims")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp_out"),
               raise_on_error=True)
    pipeline.build_pipeline(raw, local=True, steps=steps)()

    out = tmp_path / "kfp_out"
    metrics = _kfp_metrics(out)
    for name in CLAIMS_KEEP:
        assert metrics[name]["experiment"] == name and len(_results(metrics[name])) >= 4, name
    claims_models = [p for p in out.rglob("*.keras") if "claims-experiment" in str(p)]
    assert sorted(p.name for p in claims_models) == sorted(f"{n}.keras" for n in CLAIMS_KEEP)
    mc = [json.loads(p.read_text()) for p in out.rglob("metrics_path") if "claims-mc-dropout" in str(p)]
    assert len(mc) == 1 and set(mc[0]) == {"dropout"}  # the seed's dropout model, sampled
    # the claims step: every kept claim, over the chapter's seed and the claims seed
    report = json.loads(next(out.rglob("claims_json")).read_text())
    assert report["seeds"] == [raw["seed"], CLAIMS_SEED]
    assert {r["claim"] for r in report["claims"]} == claim_names
    assert all(r["n"] == 2 and r["verdict"] for r in report["claims"] if r["claim"] != "transfer_error_rate")
    assert "dropout_gap" in next(out.rglob("report_md")).read_text()
    assert next(out.rglob("forest_png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name(raw["mlflow"]["experiment_name"] + registry.CLAIMS_EXPERIMENT_SUFFIX)
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`ch11.pipeline_run` = 'kfp-local-claims'")
    trained = {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("ch11.step") == "experiment"}
    assert set(trained) == set(CLAIMS_KEEP)
    assert all(r.data.tags["seed"] == str(CLAIMS_SEED) for r in trained.values())  # the item's seed, not `seed`


def test_a_fan_in_keeps_the_tasks_seed_and_lays_shared_folders_out_by_workspace_path(tmp_path):
    """run_step's fan-in: of the models collected over (experiment x seed), a seed's MC dropout keeps its seed's;
    the claims step gets metrics/claims as the workspace has it, from the loop's list and the per-seed tasks."""
    from types import SimpleNamespace

    from components import kfp_step

    def art(workspace_path: str, text: str):
        p = tmp_path / "store" / text  # a .keras file lives inside its artifact, a JSON file is the artifact
        f = kfp_step.artifact_file(p, workspace_path)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        return SimpleNamespace(path=str(p), uri=str(p), metadata={"file": workspace_path})

    step = registry.get("claims_mc_dropout")
    models = [art(f"models/claims/seed_{s}/{n}.keras", f"{n}-{s}") for n in ("dropout", "elu") for s in (43, 44)]
    into = kfp_step._materialize(models, tmp_path / "m", step.bind(None, 44)["models_dir"])
    assert {p.name: p.read_text() for p in into.iterdir()} == {"dropout.keras": "dropout-44", "elu.keras": "elu-44"}
    with pytest.raises(ValueError, match="none of the 4"):
        kfp_step._materialize(models, tmp_path / "none", step.bind(None, 7)["models_dir"])
    parts = [art("metrics/claims/seed_43/elu.json", "e43"), art("metrics/claims/mc_dropout/seed_43.json", "mc43")]
    into = kfp_step._materialize(parts, tmp_path / "c", registry.get("claims").inputs["claims_dir"])
    assert {str(p.relative_to(into)): p.read_text() for p in into.rglob("*.json")} == {
        "seed_43/elu.json": "e43", "mc_dropout/seed_43.json": "mc43"}
