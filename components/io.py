"""Small I/O helpers shared by the steps: atomic writes, JSON, logging."""
from __future__ import annotations

import contextlib
import errno
import importlib.abc
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or an exception leaves the previous file (or nothing) in place, never a half-written one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        _raise_if_disk_full(err, path)
        raise
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    except OSError as err:
        _raise_if_disk_full(err, path)
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


class DiskFullError(OSError):
    """No space left (or over quota) while writing an output; the message names the file and what to do."""

    def __str__(self) -> str:
        return self.strerror or "no space left on device"


def disk_full_message(path: str | os.PathLike[str] | None, atomic: bool = False) -> str:
    """What a user needs when a write fails for lack of space: which file, how much is free there, what to do."""
    probe = Path(path).absolute() if path else Path.cwd()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:,.0f} MiB free on that file system"
    except OSError:
        free = "free space unknown"
    what = f"while writing {path}" if path else f"(working directory {Path.cwd()})"
    kept = "; nothing half-written was kept" if atomic else ""
    return (f"no space left on the device {what} ({free}){kept}. Free some space (the DVC cache: see `dvc gc`; "
            "MLflow's mlartifacts/; .checkpoints/) or move the workspace to a larger disk, then rerun the same command")


def _raise_if_disk_full(err: OSError, path: Path) -> None:
    """A DiskFullError naming ``path`` if ``err`` says the disk is full (or the quota is used up)."""
    if not isinstance(err, DiskFullError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(err.errno, disk_full_message(path, atomic=True), str(path)) from err


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, `kill` and a Kubernetes eviction send), raised like Ctrl-C so that a step ends its
    MLflow run as KILLED and leaves its resume state, instead of dying with the run left RUNNING."""


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises ``Terminated`` in the main thread (a no-op elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def setup_logging(step: str) -> logging.Logger:
    """Log lines a user can read: ``[step] message`` on stderr.

    Unless ``LOGLEVEL=DEBUG``, TensorFlow's start-up noise is kept out of them (``quiet_tensorflow``): one
    ``device: ...`` line instead, when the step imports TensorFlow."""
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "INFO"),
        format=f"[{step}] %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if quiet_logs():
        quiet_tensorflow()
    return logging.getLogger(f"components.{step}")


def quiet_logs() -> bool:
    """False with ``LOGLEVEL=DEBUG``: then every line TensorFlow prints is shown."""
    return os.environ.get("LOGLEVEL", "").upper() != "DEBUG"


# ------------------------------------------------------------------------------------------ TensorFlow's noise

# TensorFlow's C++ code logs through Abseil, which writes everything to stderr until absl::InitializeLog() is
# called -- and TensorFlow never calls it, so TF_CPP_MIN_LOG_LEVEL does not reach what TensorFlow prints while it
# is imported or first looks for a GPU. Those lines are dropped here as the level asks (I lines at >= 1, W at
# >= 2, E at >= 3), plus Abseil's banner and errors that are harmless by design: no CUDA driver on a CPU machine,
# CUDA plugins registered twice. Every other line (a real error, Python's own output) goes through untouched.
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} [\d:. ]+\s+\d+ [\w.+-]+:\d+\] (.*)$")
_HARMLESS = re.compile(
    rb"All log messages before absl::InitializeLog\(\) is called|failed call to cuInit|Could not find cuda drivers|"
    rb"Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|TF-TRT Warning|"
    rb"oneDNN custom operations are on|This TensorFlow binary is optimized to use available CPU instructions")


def tensorflow_noise(line: bytes) -> bool:
    """Whether a line TensorFlow's native code wrote to stderr is noise at the current TF_CPP_MIN_LOG_LEVEL."""
    try:  # unset (a warm-server child gets its caller's environment): the package's default, see __init__.py
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL") or (2 if quiet_logs() else 0))
    except ValueError:
        level = 0
    if level <= 0:
        return False
    if _HARMLESS.search(line):
        return True
    m = _ABSL_LINE.match(line.rstrip(b"\r\n"))
    return bool(m) and "IWEF".index(m.group(1).decode()) < level


@contextlib.contextmanager
def native_stderr_filtered(drop: Callable[[bytes], bool] = tensorflow_noise) -> Iterator[None]:
    """For the block, pass what anything in this process writes to file descriptor 2 (native code included)
    through ``drop``, line by line, as it is written; restore stderr afterwards."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to filter
        yield
        return
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        with os.fdopen(r, "rb") as src:
            for line in src:  # keeps draining even if stderr went away: a full pipe would block the writer
                if not drop(line):
                    with contextlib.suppress(OSError):
                        os.write(saved, line)

    t = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    t.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer is gone: the pump reads to the end and stops
        t.join(timeout=10)
        if not t.is_alive():
            os.close(saved)


class _QuietImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``tensorflow`` (once, whoever imports it first) with its native stderr filtered, then logs the
    one-line device summary (``tracking.device``), whose first GPU query is the other noisy moment."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001 - importlib's signature
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self.loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):  # noqa: ANN001
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        module.__spec__.loader = module.__loader__ = self.loader  # the module sees its own loader, as usual
        with native_stderr_filtered():
            self.loader.exec_module(module)
        from .tracking import device

        device()


def quiet_tensorflow() -> None:
    """From now on the first ``import tensorflow`` in this process is quiet (see ``_QuietImport``)."""
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietImport())
