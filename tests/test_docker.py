"""The task images: their locks, and the whole pipeline inside the CPU image.

`pipeline.py run-local --runner docker` runs every task of the pipeline with kfp.local's DockerRunner in the image
`make image OFFLINE=1` builds (local Debian base, host wheelhouse; reused while its hash tag matches the locks and
the code), on the tiny chapter's params, logging to the real MLflow server of the session: its numbers must be the
ones `dvc repro` gave for the same params (which the Subprocess run is held to in tests/test_kfp.py).

Docker is required where CI=true (`make test` starts dockerd as root): no Docker there is a failure, never a skip.
Elsewhere, without a reachable Docker daemon (or, not being root, without the base image) these tests skip and say why.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, run
from .test_kfp import _kfp_metrics, _results, one_parent_and_its_children
from .tiny import keep_experiments

sys.path.insert(0, str(ROOT))
import pipeline  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"
MAX_IMAGE_BYTES = 2.5e9
TEST_TOOLS = ("pytest", "pytest-xdist", "playwright", "dvc", "mlflow")  # `mlflow` (the server); the client is mlflow-skinny


def _locks() -> dict[str, dict[str, str]]:
    out = {}
    for name in ("requirements.lock", "requirements-runtime.lock", "requirements-gpu.lock"):
        pins = {}
        for line in (ROOT / name).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^]]*\])?==(\S+)", line)
            if m:
                pins[m.group(1).lower().replace("_", "-").replace(".", "-")] = m.group(3)
        out[name] = pins
    return out


def test_the_image_locks_pin_what_the_dev_lock_pins_without_the_test_tools():
    locks = _locks()
    dev, runtime, gpu = locks["requirements.lock"], locks["requirements-runtime.lock"], locks["requirements-gpu.lock"]
    assert runtime and gpu and dev
    for name, lock in (("runtime", runtime), ("gpu", gpu)):
        shared = set(lock) & set(dev)
        assert {p: (lock[p], dev[p]) for p in shared if lock[p] != dev[p]} == {}, f"{name} lock disagrees with requirements.lock"
        assert not set(TEST_TOOLS) & set(lock), f"{name} lock has test/dev tools: {set(TEST_TOOLS) & set(lock)}"
    assert set(runtime) <= set(dev), f"runtime packages missing from the dev lock: {set(runtime) - set(dev)}"
    assert set(runtime) <= set(gpu) and gpu["tensorflow"] == runtime["tensorflow"]
    cuda = {p for p in gpu if re.fullmatch(r"nvidia-.+-cu\d+", p)}  # CUDA and cuDNN as wheels: the GPU image has the CPU base
    assert {"nvidia-cudnn-cu12", "nvidia-cuda-runtime-cu12", "nvidia-cublas-cu12"} <= cuda and not cuda & set(runtime)


def test_the_dockerfile_installs_a_lock_and_copies_only_what_exists():
    text = (ROOT / "Dockerfile").read_text()
    sources = [s for line in text.splitlines() if line.startswith("COPY ") for s in line.split()[1:-1]]
    assert "${LOCK}" in sources and "components/" in sources and "pipeline.py" in sources
    for s in sources:
        if not s.startswith("$"):
            assert (ROOT / s).exists(), f"Dockerfile copies {s}, which is not in the repository"
    assert "ARG LOCK=requirements-runtime.lock" in text and "ARG BASE=python:3.11-slim-bookworm" in text
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[0 if not ignore[0].startswith("#") else 1] == "*", ".dockerignore must allow-list the context"


def test_run_local_in_docker_needs_an_mlflow_server_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(SystemExit) as err:
        pipeline.main(["run-local", "--runner", "docker", "--image", "x:1", "--pipeline-root", str(tmp_path / "o")])
    assert "MLflow server" in str(err.value) and "MLFLOW_TRACKING_URI=http" in str(err.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    with pytest.raises(SystemExit) as err:
        pipeline.main(["run-local", "--runner", "docker", "--image", "x:1", "-S", "data.mirrors=[some/dir]",
                       "--pipeline-root", str(tmp_path / "o")])
    assert "relative path" in str(err.value)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ in Docker

def _unavailable(why: str):
    if IN_CI:
        pytest.fail(f"Docker is required in CI (CI=true) and {why}. `make test` as root installs docker.io and "
                    "starts dockerd (make docker-daemon); see its output and /var/log/ch11-dockerd.log.")
    pytest.skip(f"no Docker here: {why}")


def _make(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["make", "--no-print-directory", *args], cwd=ROOT, check=check)


@pytest.fixture(scope="session")
def cpu_image() -> str:
    """The CPU image of this checkout, built offline (`make image OFFLINE=1`) or reused; one build at a time."""
    if not shutil.which("docker"):
        _unavailable("the docker command is missing (apt-get install docker.io)")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        _unavailable(f"the Docker daemon does not answer ({info.stderr.strip()[-300:]})")
    if os.getuid() != 0 and subprocess.run(["docker", "image", "inspect", "ch11-base:bookworm"],
                                           capture_output=True).returncode != 0:
        _unavailable("the base image ch11-base:bookworm is missing and `make base-image` (debootstrap) needs root")
    name = _make("-s", "image-name", "OFFLINE=1").stdout.strip()
    with open(Path(tempfile.gettempdir()) / "ch11-image-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other xdist worker may be building the same image
        t0 = time.monotonic()
        proc = _make("image", "OFFLINE=1", check=False)
        print(f"make image OFFLINE=1: {time.monotonic() - t0:.0f} s\n{proc.stdout[-2000:]}", file=sys.stderr)
        assert proc.returncode == 0, f"make image OFFLINE=1 failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return name


def _in_image(image: str, code: str) -> str:
    proc = subprocess.run(["docker", "run", "--rm", "-i", image, "python", "-"], input=code, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("docker-image")  # early on the worker that is not running the tiny chapter
def test_the_cpu_image_has_the_runtime_lock_and_no_test_tools(cpu_image):
    size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", cpu_image], capture_output=True,
                              text=True, check=True).stdout)
    assert size <= MAX_IMAGE_BYTES, f"{cpu_image} is {size / 1e9:.2f} GB (goal: {MAX_IMAGE_BYTES / 1e9} GB)"
    installed = json.loads(_in_image(cpu_image, "import importlib.metadata as m, json\n"
                                     "print(json.dumps({d.metadata['Name'].lower().replace('_', '-').replace('.', '-'): "
                                     "d.version for d in m.distributions()}))"))
    runtime = _locks()["requirements-runtime.lock"]
    assert {p: v for p, v in runtime.items() if installed.get(p) != v} == {}, "the image differs from the runtime lock"
    assert not set(TEST_TOOLS) & set(installed)
    out = _in_image(cpu_image, "import components.kfp_step, tensorflow as tf; print(tf.__version__)")
    assert out.strip().endswith(runtime["tensorflow"])


DOCKER_KEEP = ("dropout",)  # one experiment, also the one MC-dropout source: every step kind runs once or twice


@pytest.fixture(scope="module")
def docker_run(chapter_repo, chapter_repro, mlflow_server, cpu_image, debian_dir):
    """`pipeline.py run-local --runner docker` in the tiny chapter's clone, beside its `dvc repro`, on the same
    params cut to DOCKER_KEEP (each task's numbers depend only on its own params slice)."""
    raw = yaml.safe_load((chapter_repo / "params.yaml").read_text())
    keep_experiments(raw, DOCKER_KEEP)
    assert raw["data"]["mirrors"] == [str(debian_dir)]  # a local folder: mounted into every container
    (chapter_repo / "docker_params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    t0 = time.monotonic()
    proc = run([sys.executable, "-W", "ignore", "pipeline.py", "run-local", "--runner", "docker", "--image", cpu_image,
                "--params", "docker_params.yaml", "--pipeline-root", "docker_out"], cwd=chapter_repo,
               MLFLOW_TRACKING_URI=mlflow_server, CH11_PIPELINE_RUN="kfp-docker-side")
    print(f"run-local --runner docker: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return chapter_repo, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("chapter")  # same worker as tests/test_pipeline.py: shares the tiny chapter
def test_run_local_in_docker_gives_the_numbers_of_dvc_repro(docker_run, cpu_image):
    repo, log = docker_run
    assert log.count(f"Found image '{cpu_image}'") >= len(pipeline.registry.STEPS), log[-3000:]  # every task in it
    got = _kfp_metrics(repo / "docker_out")
    pairs = {name: repo / f"metrics/experiments/{name}.json" for name in DOCKER_KEEP}
    pairs.update({step: repo / f"metrics/transfer/{step}.json" for step in ("model_a", "model_b", "b_on_a")})
    for name, path in pairs.items():
        want = _results(json.loads(path.read_text()))
        assert len(want) >= 4 and _results(got[name]) == want, name  # same seeds, same data, same wheels
    mc = json.loads(next(p for p in (repo / "docker_out").rglob("metrics_path") if p.parent.name == "mc-dropout").read_text())
    mc_dvc = json.loads((repo / "metrics/mc_dropout.json").read_text())
    assert set(mc) == set(DOCKER_KEEP) and _results(mc["dropout"]) == _results(mc_dvc["dropout"])
    selu = json.loads(next(p for p in (repo / "docker_out").rglob("metrics_path") if p.parent.name == "selu-simulation").read_text())
    assert selu == json.loads((repo / "metrics/selu_simulation.json").read_text())
    report = next((repo / "docker_out").rglob("report_md")).read_text()
    assert "| dropout |" in report


@pytest.mark.slow
@pytest.mark.xdist_group("chapter")
def test_run_local_in_docker_logs_one_parent_run_with_every_step_as_a_child(docker_run, mlflow_server):
    children = one_parent_and_its_children(mlflow_server, "kfp-docker-side")
    assert {r.data.tags["ch11.step"] for r in children} == {s.name for s in pipeline.registry.STEPS}
    assert all(r.info.status == "FINISHED" for r in children)
    exp_run = next(r for r in children if r.data.tags["mlflow.runName"] == "dropout")
    assert exp_run.data.tags["data.version"] and exp_run.data.tags["git.commit"] != "unknown"
