from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
BIN = Path(sys.executable).parent  # the venv's bin: python, dvc, mlflow


def repo_env(**extra: str | None) -> dict[str, str]:
    """This process's environment with the venv first on PATH; ``extra`` sets variables, or unsets them with None."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PARAMS_FILE", None)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


ISOLATED_LOAD = """
import importlib.abc, json, sys
import numpy as np


class NoProject(importlib.abc.MetaPathFinder):  # as if this repository were not installed at all
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("components", "pipeline", "tests", "benchmarks", "tools"):
            raise ImportError(f"{name} must not be needed to load a saved model")
        return None


sys.meta_path.insert(0, NoProject())
import keras

job = json.loads(sys.stdin.read())
x = np.load(job["x"])
out = {}
for i, path in enumerate(job["models"]):
    model = keras.models.load_model(path)
    out[f"m{i}"] = model.predict(x[: job["rows"]].astype("float32"), verbose=0)
assert not [m for m in sys.modules if m.split(".")[0] == "components"]
np.savez(job["out"], **out)
"""


def predict_isolated(models: list[Path], x, tmp: Path, rows: int = 64) -> list:
    """Predictions of saved ``.keras`` models loaded by ``keras.models.load_model`` in a fresh ``python -I``
    (no PYTHONPATH, no working-directory import, this repository's packages blocked), run from an empty folder."""
    import json

    import numpy as np

    work = tmp / "isolated"
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "x.npy", np.asarray(x))
    job = {"x": str(work / "x.npy"), "models": [str(Path(m).resolve()) for m in models], "rows": rows,
           "out": str(work / "pred.npz")}
    env = {k: v for k, v in repo_env().items() if not k.startswith(("PYTHON", "CH11_"))}
    proc = subprocess.run([sys.executable, "-I", "-c", ISOLATED_LOAD], input=json.dumps(job), cwd=work, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(job["out"]) as z:
        return [z[f"m{i}"] for i in range(len(models))]


def assert_loads_alone(models: list[Path], x, tmp: Path, rows: int = 64) -> None:
    """Every model loads without this repository and predicts what it predicts here."""
    import keras
    import numpy as np

    isolated = predict_isolated(models, x, tmp, rows)
    for path, got in zip(models, isolated):
        here = keras.models.load_model(path).predict(np.asarray(x)[:rows].astype("float32"), verbose=0)
        np.testing.assert_allclose(got, here, rtol=1e-5, atol=1e-6, err_msg=str(path))


@pytest.fixture(scope="session", autouse=True)
def isolated_tracking(tmp_path_factory):
    """Tests never write into the repository's mlflow.db: a throw-away sqlite store unless a test says otherwise."""
    d = tmp_path_factory.mktemp("mlflow_default")
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "CH11_PIPELINE_RUN")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'mlflow.db'}"
    os.environ["CH11_PIPELINE_RUN"] = f"pytest-{os.getpid()}"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serves ``root`` over HTTP on 127.0.0.1; yields the base URL and the list of paths requested."""
    import functools
    import http.server
    import threading

    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, local artifacts) on 127.0.0.1, stopped by PID at the end."""
    import signal
    import time
    import urllib.request

    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=repo_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no idle job-runner processes eating the CPU
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"mlflow server did not start:\n{(d / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="session", autouse=True)
def tf_runtime():
    """Thread settings of params.yaml's runtime, applied before any test touches TensorFlow (as a stage does)."""
    from components import train
    from components.config import Runtime

    train.configure(Runtime())


@pytest.fixture(scope="session")
def debian_dir() -> Path:
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"{DEBIAN_DIR} is missing: the real-data tests need the Debian package dataset-fashion-mnist "
            "(`make test` installs it when run as root; otherwise `sudo apt-get install dataset-fashion-mnist`)"
        )
    return DEBIAN_DIR


@pytest.fixture(scope="session")
def params():
    from components.config import load_params

    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def real_splits(tmp_path_factory, debian_dir, params):
    """The real Fashion-MNIST, split by the split step into Parquet (once per session)."""
    from components import split

    out = tmp_path_factory.mktemp("splits")
    split.run(params, raw_dir=debian_dir, out_dir=out / "splits", card_json=out / "card.json", card_md=out / "card.md")
    return out


def copy_repo(dest: Path) -> Path:
    """A temporary git clone of the working tree as it is now (tracked + untracked, not ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode().split("\0")
    dest.mkdir(parents=True, exist_ok=True)
    for f in filter(None, files):
        src = ROOT / f
        if not src.is_file() or src.is_symlink():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / f)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def cli_sets(sets: dict) -> list[str]:
    """``-S key=value`` arguments of a stage command (``python -m components <step>``) for a dict of params."""
    return [a for k, v in sets.items() for a in ("-S", f"{k}={v}")]


def run(cmd: list[str], cwd: Path, check: bool = True, **env: str | None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=repo_env(**env), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_ws(tmp_path_factory, debian_dir):
    """A workspace with tiny params (a slice of the real data) and its data stages already run."""
    from components import download, split, standardize
    from components.config import load_params

    from .tiny import write_tiny

    ws = tmp_path_factory.mktemp("tiny_ws")
    write_tiny(ws / "params.yaml", rows=1200, mirrors=[str(debian_dir)])
    p = load_params(ws / "params.yaml")
    download.run(p, out_dir=ws / "data/raw")
    split.run(p, raw_dir=ws / "data/raw", out_dir=ws / "data/splits", card_json=ws / "metrics/dataset_card.json",
              card_md=ws / "reports/dataset_card.md")
    standardize.run(ws / "data/splits", ws / "data/scaler.npz", ws / "metrics/scaler.json")
    return ws


def ws_params(ws: Path, **updates):
    """Load the workspace's params with dotted-key overrides, checkpoints inside the workspace."""
    from components.config import load_params

    sets = [f"{k}={v}" for k, v in updates.items()] + [f"runtime.checkpoint_dir={ws / '.checkpoints'}"]
    return load_params(ws / "params.yaml", sets)


CHAPTER_EPOCHS = 2


@pytest.fixture(scope="session")
def chapter_repo(tmp_path_factory, debian_dir):
    """A temporary git clone with tiny params (a slice of the real data, every experiment, 2 epochs)."""
    from .tiny import write_tiny

    r = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    write_tiny(r / "params.yaml", mirrors=[str(debian_dir)], epochs=CHAPTER_EPOCHS)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny params"], cwd=r)
    return r


@pytest.fixture(scope="session")
def chapter_repro(chapter_repo, mlflow_server):
    """The whole chapter as `make repro` runs it (warm stage server, independent stages two at a time through
    `dvc repro`, then a plain `dvc repro` that finds nothing left) in that clone; its output."""
    proc = run([sys.executable, "tools/warm.py", "run", "--", sys.executable, "tools/repro.py",
                "--jobs", "2"], cwd=chapter_repo,
               MLFLOW_TRACKING_URI=mlflow_server, CH11_PIPELINE_RUN="tiny-pipeline-1")
    return proc.stdout + proc.stderr


def pytest_collection_modifyitems(config, items):
    """The tiny chapter (the longest group, ~half the suite) goes first, so under xdist one worker starts it at
    once while the other takes every other test, starting with the task image's build (tests/test_docker.py),
    which the chapter's worker needs at its end."""
    order = {"chapter": 0, "docker-image": 1}

    def key(item) -> int:
        group = item.get_closest_marker("xdist_group")
        return 3 if group is None else order.get(group.args[0] if group.args else "", 2)

    items.sort(key=key)
