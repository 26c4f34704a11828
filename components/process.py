"""The processes around a step run from the command line (``python -m components``): which ``dvc`` command runs
it, one writer per output, no stray temporary files. Linux ``/proc``; elsewhere the ``dvc`` lookup finds nothing.

* ``dvc_command()``: the nearest ``dvc`` process above this step (``dvc repro``, ``dvc exp run``), by pid and
  start time, so that every stage of one execution can name the same MLflow parent run (DVC sets no variable
  per execution) and the step can stop when that process is gone.
* ``die_with(proc)``: a step whose ``dvc`` was killed (``kill -9``, a closed terminal) stops too, as on SIGTERM
  (its MLflow run ends KILLED, its resume state stays), instead of writing on while a rerun starts a second
  writer. A shell may sit between ``dvc`` and the step, so it watches the ``dvc`` process itself rather than
  relying on ``PR_SET_PDEATHSIG``, which only follows the direct parent.
* ``hold_outputs(...)``: an exclusive ``flock`` per set of outputs, kept in the checkpoint folder (not a DVC
  output, so no lock file lands in a tracked folder); a second writer is refused with the holder's pid.
* ``clean_stale_tmp(outputs)``: removes the temporary files of our atomic writes (``io.atomic_path``,
  ``train.save_model``) that a killed run left beside or inside the step's outputs.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger("components.process")

# Set by a launcher that sits between ``dvc`` and the step process (the warm stage server's client): the pid
# to start the search for the ``dvc`` process from, instead of this process's parent.
STAGE_PARENT_ENV = "CH11_STAGE_PARENT"


def boot_id() -> str:
    """This machine's boot and pid namespace: a pid means the same process only where both are equal (pods on one
    node share the boot id, not the pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        ns = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        return "noboot"
    return f"{boot}.{ns}"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process; None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid ... starttime (field 22)
    if fields[0] in ("Z", "X"):  # a zombie has exited; only its exit status is left to collect
        return None
    return int(fields[1]), int(fields[19])


def _argv(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def _dvc_args(argv: list[str]) -> list[str] | None:
    """``argv`` from the ``dvc`` word on when it is a dvc command (``dvc ...``, ``python .../dvc ...``,
    ``python -m dvc ...``), else None."""
    for i, a in enumerate(argv[:2]):
        if os.path.basename(a) == "dvc":
            return ["dvc", *argv[i + 1:]]
    if argv[1:3] == ["-m", "dvc"]:
        return ["dvc", *argv[3:]]
    return None


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int
    boot: str
    args: tuple[str, ...]

    @property
    def ident(self) -> str:
        """Unique on this machine across reboots and pid reuse: boot id, pid, start time."""
        return f"{self.boot}-{self.pid}-{self.start}"

    def alive(self) -> bool:
        st = _stat(self.pid)
        return st is not None and st[1] == self.start


def ident_alive(ident: str) -> bool | None:
    """Whether the process named by ``Proc.ident`` still runs; None when it ran on another machine or boot."""
    boot, _, rest = ident.partition("-")
    pid, _, start = rest.partition("-")
    if boot != boot_id() or not pid.isdigit() or not start.isdigit():
        return None
    st = _stat(int(pid))
    return st is not None and st[1] == int(start)


def this_process() -> Proc:
    st = _stat(os.getpid())
    return Proc(os.getpid(), st[1] if st else 0, boot_id(), ())


@functools.cache
def dvc_command(max_depth: int = 6) -> Proc | None:
    """The nearest ``dvc`` process above this one (through a shell or a launcher), or None."""
    try:
        pid = int(os.environ.get(STAGE_PARENT_ENV) or os.getppid())
    except ValueError:
        pid = os.getppid()
    for _ in range(max_depth):
        if pid <= 1:
            return None
        st = _stat(pid)
        if st is None:
            return None
        args = _dvc_args(_argv(pid))
        if args is not None:
            return Proc(pid, st[1], boot_id(), tuple(args))
        pid = st[0]
    return None


def die_with(proc: Proc, interval: float = 0.5) -> threading.Thread:
    """Stop this process (SIGTERM to itself: ``io.stop_on_sigterm`` turns it into a clean stop) once ``proc`` is gone."""

    def watch() -> None:
        while proc.alive():
            time.sleep(interval)
        log.error("the `%s` process that ran this step (pid %d) is gone: stopping this step too; rerun it to "
                  "resume", " ".join(proc.args[:2]), proc.pid)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=watch, name="die-with-dvc", daemon=True)
    t.start()
    return t


class OutputsBusy(RuntimeError):
    """Another process is writing the same outputs."""


@contextlib.contextmanager
def hold_outputs(name: str, lock_dir: Path, outputs: list[Path], wait: float = 5.0) -> Iterator[Path]:
    """Hold an exclusive lock on ``outputs`` (a file in ``lock_dir`` named by the step and the outputs' absolute
    paths) for the block; if another process holds it for more than ``wait`` seconds, ``OutputsBusy``."""
    where = sorted(str(Path(o).resolve()) for o in outputs)
    digest = hashlib.sha256("\0".join(where).encode()).hexdigest()[:12]
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{re.sub(r'[^A-Za-z0-9_.@-]', '_', name)}-{digest}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    shown = ", ".join(os.path.relpath(o) for o in where)
                    raise OutputsBusy(
                        f"another process (pid {holder}) is already writing {shown}; wait for it to finish or stop "
                        f"it (`kill {holder}`), then run this step again (lock: {path})") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with the next locker)


# Our atomic writes: io.atomic_path -> ".<name>.<8 random chars of mkstemp>.tmp";
# train.save_model -> ".<stem>.<pid>.tmp.keras" and ".<stem>.<pid>.raw.tmp.keras".
_TMP = re.compile(r"^\.(?P<base>.+)\.(?:[a-z0-9_]{8}\.tmp|\d+\.(?:raw\.)?tmp\.keras)$")


def clean_stale_tmp(outputs: list[Path]) -> list[Path]:
    """Remove the temporary files our atomic writes left for ``outputs`` (anywhere inside an output folder;
    beside an output file only those named after it, since a sibling may be another step's). Call it while
    holding ``hold_outputs``: then no live writer of these outputs can own them. Returns what was removed."""
    removed: list[Path] = []
    for out in map(Path, outputs):
        candidates: list[Path] = []
        if out.is_dir():
            candidates += [p for p in out.rglob(".*") if _TMP.match(p.name)]
        if out.parent.is_dir():
            candidates += [p for p in out.parent.iterdir()
                           if (m := _TMP.match(p.name)) and m["base"] in (out.name, out.stem)]
        for p in candidates:
            if p.is_file() and not p.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) an interrupted run left: %s", len(removed),
                 ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed
