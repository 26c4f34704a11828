"""A warm stage server for a local ``dvc repro`` (a convenience of this machine, never on the step path).

Importing TensorFlow, Keras and MLflow costs seconds per process, and the chapter has ~50 stages.

    python tools/warm.py run -- dvc repro      # or: -- python -m components.repro (what `make repro` runs)

starts a server that imports them once, then runs the command with a ``python`` shim first on ``PATH``. DVC
runs each stage's command as written in dvc.yaml, ``python -m components <step> ...``; the shim hands exactly
those calls to the server, which forks a child that runs the step (``components.__main__.main``) with the
stage's working directory, environment and arguments, and streams its output back. Every other ``python`` call
goes straight to the real interpreter. Nothing in ``components/``, ``pipeline.py`` or a Kubeflow task knows about
this file: without it (a plain ``dvc repro``, a pod) each stage imports TensorFlow itself. Semantics are unchanged:

* one fresh child per stage (no state shared between stages; same results as a cold process);
* the stage's exit code is the child's; killing the client (Ctrl-C, ``kill -9``) kills the child, so an
  interrupted stage resumes exactly as it would without the server;
* if the server is gone, or its code differs from the ``components`` package the stage would import (an edit
  since it started, another checkout), the stage runs in a fresh interpreter as usual.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV = "CH11_WARM_SOCKET"
REAL_PYTHON_ENV = "CH11_WARM_PYTHON"
EXIT_MARK = b"\x00ch11-exit:"
ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "components"


def code_digest(pkg: Path) -> str:
    """Hash of a ``components`` package's source: a server only runs stages for identical code."""
    h = hashlib.sha256()
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def package_for(cwd: str, env: dict[str, str]) -> Path | None:
    """The ``components`` package that ``python -m components`` would import there: the working directory first,
    then ``$PYTHONPATH``; None where it would come from site-packages (the server cannot tell)."""
    for entry in [cwd, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]:
        pkg = Path(cwd, entry, "components").resolve()
        if (pkg / "__main__.py").is_file():
            return pkg
    return None


# ------------------------------------------------------------------------------------------ client

def client(argv: list[str]) -> int:
    """``python -m components <argv>`` through the server named by $CH11_WARM_SOCKET, or in the real interpreter."""
    real = os.environ.get(REAL_PYTHON_ENV, sys.executable)
    fallback = [real, "-m", "components", *argv]
    path, cwd = os.environ.get(ENV), os.getcwd()
    pkg = package_for(cwd, dict(os.environ))
    if not path or pkg is None:
        os.execv(real, fallback)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
    except OSError:
        os.execv(real, fallback)
    env = {k: v for k, v in os.environ.items() if k not in (ENV, REAL_PYTHON_ENV)}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.endswith("ch11-warm-bin"))
    # the step runs under the server, not under this client: tell it whose child it stands in for, so that it
    # finds the `dvc` command running it (its MLflow parent run; it stops when that process is killed)
    env.setdefault("CH11_STAGE_PARENT", str(os.getppid()))
    request = {"argv": argv, "cwd": cwd, "env": env, "digest": code_digest(pkg), "pkg": str(pkg)}
    with sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        tail = b""
        out = sys.stdout.buffer
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data = tail + chunk
            cut = data.rfind(b"\x00")
            if cut >= 0:
                out.write(data[:cut])
                tail = data[cut:]
            else:
                out.write(data)
                tail = b""
            out.flush()
    if tail.startswith(EXIT_MARK):
        code = tail[len(EXIT_MARK):].strip()
        if code == b"stale":
            os.execv(real, fallback)
        return int(code)
    out.write(tail)
    return 1


SHIM = """#!/bin/sh
# python -m components ... goes to the warm stage server (tools/warm.py); everything else to the real python
if [ "$1" = "-m" ] && [ "$2" = "components" ]; then
  shift 2
  exec "{python}" "{warm}" client -- "$@"
fi
exec "{python}" "$@"
"""


def write_shims(directory: Path, python: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        shim = directory / name
        shim.write_text(SHIM.format(python=python, warm=Path(__file__).resolve()))
        shim.chmod(0o755)


# ------------------------------------------------------------------------------------------ server

def _preload() -> None:
    import importlib

    sys.path.insert(0, str(ROOT))
    from components.io import native_stderr_filtered, quiet_logs

    # What a stage child would otherwise import itself, every time: TensorFlow/Keras, matplotlib (pyplot:
    # the plots), and MLflow's sqlite store with SQLAlchemy, Alembic and GitPython (2 s per stage when
    # a child first opens the tracking store), pyarrow's Parquet reader. TensorFlow's import noise is
    # filtered as a stage filters it (no GPU query here: each child asks, after the fork).
    with native_stderr_filtered() if quiet_logs() else contextlib.nullcontext():
        for name in ("tensorflow", "keras", "matplotlib", "mlflow", "mlflow.keras", "mlflow.pyfunc",
                     "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
                     "mlflow.store.tracking.sqlalchemy_workspace_store", "mlflow.store.tracking.file_store",
                     "mlflow.models.display_utils", "sqlalchemy.dialects.sqlite", "alembic.command", "alembic.config",
                     "alembic.autogenerate", "git", "pyarrow.parquet", "pyarrow.dataset", "pyarrow.pandas_compat"):
            try:
                importlib.import_module(name)
            except ImportError:  # an optional part missing: the child imports (or fails) as it would without us
                pass

    from components import __main__, diagnostics, experiment, mc_dropout, models, registry, report, tracking, train, transfer  # noqa: F401
    from components.plots import pyplot

    pyplot()  # matplotlib.pyplot on the Agg backend
    # MLflow maps every installed distribution to its modules (a scan of site-packages, ~0.5 s) the first
    # time a child logs a model, to check the model's pip requirements; the installed packages do not
    # change while the server runs. A private helper: if it moves, the child simply does the scan itself.
    with contextlib.suppress(Exception):
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()


def _close_other_sockets(keep: int) -> None:
    """In a stage child: close the sockets inherited from the server (its listener, the connections of the
    other stages running at fork time). A fork copies every descriptor, and a client sees its stage end only
    when no process holds its connection any more: a copy left here kept a finished stage's ``dvc repro``
    waiting until this (unrelated, maybe much longer) stage exited."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: nothing to enumerate
        return
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.close(fd)
            except OSError:  # already gone (e.g. the descriptor of the listdir itself)
                pass


def _serve_one(conn: socket.socket, digest: str) -> None:
    with conn:
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        req = json.loads(buf.split(b"\n", 1)[0])
        if req.get("digest") != digest or req.get("pkg") != str(PKG.resolve()):
            conn.sendall(EXIT_MARK + b"stale\n")
            return
        print(f"[warm] serving: python -m components {' '.join(req['argv'])}", file=sys.stderr, flush=True)
        pid = os.fork()
        if pid == 0:  # child: become the stage process
            code = 1
            try:
                os.setsid()
                _close_other_sockets(conn.fileno())
                os.chdir(req["cwd"])
                os.environ.clear()
                os.environ.update(req["env"])
                fd = conn.fileno()
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                from components.__main__ import main

                code = main(req["argv"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
        # parent: wait for the child; if the client goes away, kill the child (kill -9 semantics)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                try:
                    conn.sendall(EXIT_MARK + str(code if code >= 0 else 128 - code).encode() + b"\n")
                except OSError:
                    pass
                return
            readable, _, _ = select.select([conn], [], [], 0.2)
            if readable and not conn.recv(1, socket.MSG_PEEK):  # the client is gone: stop the stage as it would
                os.killpg(pid, signal.SIGTERM)  # stop: its MLflow run ends KILLED, its resume state stays
                for _ in range(100):
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        return
                    time.sleep(0.1)
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return


def serve(path: str) -> None:
    _preload()
    digest = code_digest(PKG)
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    print(f"[warm] ready on {path} (TensorFlow preloaded)", file=sys.stderr, flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn, digest), daemon=True).start()


@contextlib.contextmanager
def serving(path: str):
    """A server for the duration of the block, and the ``python`` shims first on $PATH for the processes it starts."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "serve", "--socket", path])
    saved = {k: os.environ.get(k) for k in (ENV, REAL_PYTHON_ENV, "PATH")}
    bin_dir = Path(tempfile.mkdtemp(prefix="ch11-warm-")) / "ch11-warm-bin"
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(path):
            if server.poll() is not None or time.monotonic() > deadline:
                print("[warm] server did not start; the stages import TensorFlow themselves", file=sys.stderr)
                break
            time.sleep(0.2)
        if os.path.exists(path):
            write_shims(bin_dir, sys.executable)
            os.environ.update({ENV: path, REAL_PYTHON_ENV: sys.executable,
                               "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])})
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        if os.path.exists(path):
            os.unlink(path)
        import shutil

        shutil.rmtree(bin_dir.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/warm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve stages on a Unix socket until killed")
    s.add_argument("--socket", required=True)
    r = sub.add_parser("run", help="run a command (e.g. dvc repro) with a server for its stages")
    r.add_argument("--socket", default=f"/tmp/ch11-warm-{os.getpid()}.sock")
    r.add_argument("command", nargs=argparse.REMAINDER)
    c = sub.add_parser("client", help=argparse.SUPPRESS)
    c.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        serve(a.socket)
        return 0
    if a.cmd == "client":
        return client(a.args[1:] if a.args[:1] == ["--"] else a.args)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command to run, e.g. python tools/warm.py run -- dvc repro")
    with serving(a.socket):
        return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
