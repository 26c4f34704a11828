"""A warm stage server for ``dvc repro``: TensorFlow is imported once, each stage runs in a forked child.

Importing TensorFlow + Keras costs ~10 s per process on the reference 2-core box, and the chapter has
~50 stages. ``python -m components.worker run -- dvc repro`` starts a server that imports them once,
runs the command with ``CH11_WORKER`` pointing at it, and stops the server afterwards. Every DVC stage
is still its own ``python -m components <step>`` process as written in dvc.yaml; when ``CH11_WORKER``
is set, that thin client (which imports no TensorFlow) hands its arguments to the server, which forks
a child that runs exactly what the client would have run, with the client's working directory and
environment, and streams its output back. Semantics are unchanged:

* one fresh child per stage (no state shared between stages; same results as a cold process — the
  determinism test compares them);
* the stage's exit code is the child's; killing the client (Ctrl-C, ``kill -9``) kills the child, so an
  interrupted stage resumes exactly as it would without the server;
* if the server is absent, or its code differs from the client's (an edit since it started, another
  checkout), the client runs the stage itself.
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
import subprocess
import sys
import threading
import time
from pathlib import Path

ENV = "CH11_WORKER"
EXIT_MARK = b"\x00ch11-exit:"
PKG = Path(__file__).resolve().parent


def code_digest() -> str:
    """Hash of this package's source: a server only runs stages for identical code."""
    h = hashlib.sha256()
    for p in sorted(PKG.rglob("*.py")):
        h.update(p.relative_to(PKG).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ client

def try_remote(argv: list[str]) -> int | None:
    """Run ``python -m components <argv>`` on the server named by $CH11_WORKER; None = run locally."""
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
    except OSError:
        return None
    env = {k: v for k, v in os.environ.items() if k != ENV}
    request = {"argv": argv, "cwd": os.getcwd(), "env": env, "digest": code_digest(), "pkg": str(PKG)}
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
            return None
        return int(code)
    out.write(tail)
    return 1


# ------------------------------------------------------------------------------------------ server

def _preload() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import importlib

    # What a stage child would otherwise import itself, every time: TensorFlow/Keras, matplotlib (pyplot:
    # the plots), and MLflow's sqlite store with SQLAlchemy, Alembic and GitPython (2 s per stage when
    # a child first opens the tracking store), pyarrow's Parquet reader.
    for name in ("tensorflow", "keras", "matplotlib", "mlflow", "mlflow.keras", "mlflow.pyfunc",
                 "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
                 "mlflow.store.tracking.sqlalchemy_workspace_store", "mlflow.store.tracking.file_store",
                 "mlflow.models.display_utils", "sqlalchemy.dialects.sqlite", "alembic.command", "alembic.config",
                 "alembic.autogenerate", "git", "pyarrow.parquet", "pyarrow.dataset", "pyarrow.pandas_compat"):
        try:
            importlib.import_module(name)
        except ImportError:  # an optional part missing: the child imports (or fails) as it would without us
            pass

    from . import __main__, diagnostics, experiment, mc_dropout, models, registry, report, tracking, train, transfer  # noqa: F401
    from .plots import pyplot

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
    import stat

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
        if req.get("digest") != digest or req.get("pkg") != str(PKG):
            conn.sendall(EXIT_MARK + b"stale\n")
            return
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
                from .__main__ import main

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
            if readable and not conn.recv(1, socket.MSG_PEEK):
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return


def serve(path: str, ready: threading.Event | None = None) -> None:
    _preload()
    digest = code_digest()
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    print(f"[worker] ready on {path} (TensorFlow preloaded)", file=sys.stderr, flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn, digest), daemon=True).start()


@contextlib.contextmanager
def serving(path: str):
    """A server for the duration of the block, with $CH11_WORKER set for the processes it starts."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "components.worker", "serve", "--socket", path])
    old = os.environ.get(ENV)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(path):
            if server.poll() is not None or time.monotonic() > deadline:
                print("[worker] server did not start; running without it", file=sys.stderr)
                break
            time.sleep(0.2)
        if os.path.exists(path):
            os.environ[ENV] = path
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        if os.path.exists(path):
            os.unlink(path)


def run_with_server(cmd: list[str], path: str) -> int:
    """Start a server, run ``cmd`` with $CH11_WORKER set, stop the server."""
    with serving(path):
        return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m components.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve stages on a Unix socket until killed")
    s.add_argument("--socket", required=True)
    r = sub.add_parser("run", help="run a command (e.g. dvc repro) with a server for its stages")
    r.add_argument("--socket", default=f"/tmp/ch11-worker-{os.getpid()}.sock")
    r.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        serve(a.socket)
        return 0
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command to run, e.g. python -m components.worker run -- dvc repro")
    return run_with_server(cmd, a.socket)


if __name__ == "__main__":
    sys.exit(main())
