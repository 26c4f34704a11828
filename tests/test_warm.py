"""The warm stage server (tools/warm.py): a local convenience that wraps `dvc repro` from outside."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import warm  # noqa: E402


def test_a_stage_child_does_not_hold_the_other_stages_connections():
    other_server_end, other_client_end = socket.socketpair()  # a stage already running when this one forks
    own_server_end, _own_client_end = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the new stage's child, as the server forks it
        warm._close_other_sockets(own_server_end.fileno())
        time.sleep(3)  # a longer stage than the other one
        os._exit(0)
    try:
        other_server_end.close()  # the other stage is done: its client must see end-of-file now
        other_client_end.settimeout(1.5)  # the child lives 3 s: a copy of the connection there would time out
        assert other_client_end.recv(1) == b""
    finally:
        os.waitpid(pid, 0)


def test_the_step_path_does_not_know_the_warm_server():
    """`python -m components`, the Kubeflow edge and pipeline.py never import it (it wraps the CLI from outside)."""
    for path in [*sorted((ROOT / "components").glob("*.py")), ROOT / "pipeline.py"]:
        text = path.read_text()
        assert "tools/warm" not in text and "import warm" not in text and "CH11_WARM" not in text, path.name


def test_the_shim_sends_only_component_steps_to_the_server(tmp_path):
    """With no server listening, a step falls back to the real interpreter and other calls pass straight through."""
    bin_dir = tmp_path / "ch11-warm-bin"
    warm.write_shims(bin_dir, sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", warm.ENV: str(tmp_path / "none.sock"),
           warm.REAL_PYTHON_ENV: sys.executable}
    out = subprocess.run(["python", "-c", "import sys; print(sys.executable)"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == sys.executable
    out = subprocess.run(["python", "-m", "components", "check-params"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "params are valid" in out.stderr + out.stdout
