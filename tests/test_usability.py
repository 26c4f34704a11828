"""What a user sees: quiet step logs with one device line, a missing input named with the stage that makes it
(before TensorFlow is imported), a full disk named with the file being written, and a CIFAR-10 member too large
to be a batch refused before it is read into memory."""
from __future__ import annotations

import errno
import os
import pickle
import re
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from components import registry
from components.config import CIFAR10_CLASSES, load_raw, resolve_defaults
from components.io import write_json

from .conftest import ROOT, run
from .tiny import write_tiny

# What TensorFlow prints on a machine without a GPU when nothing keeps it quiet (seen with TF 2.21 on CPU).
NOISE = ("cuInit", "oneDNN custom operations", "TF-TRT", "absl::InitializeLog", "Could not find cuda drivers")


def assert_quiet(stderr: str, step: str) -> None:
    noisy = [line for line in stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "TensorFlow noise in the step's log:\n" + "\n".join(noisy)
    devices = [line for line in stderr.splitlines() if line.startswith(f"[{step}] device: ")]
    assert len(devices) == 1, f"expected one device line:\n{stderr[-3000:]}"
    assert re.match(rf"\[{step}\] device: (CPU \(.+ cores\), no GPU|GPU x\d+ \(.+\)), TensorFlow \d", devices[0]), devices[0]


# ------------------------------------------------------------------------------------------ quiet logs

def test_a_step_logs_one_device_line_and_no_tensorflow_noise(tiny_ws, tmp_path):
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "components", "standardize", "--bind", f"scaler_path={out / 'scaler.npz'}",
                "--bind", f"metrics_path={out / 'scaler.json'}"], cwd=tiny_ws, PYTHONPATH=str(ROOT),
               TF_CPP_MIN_LOG_LEVEL=None, LOGLEVEL=None)
    assert_quiet(proc.stderr, "standardize")
    assert (out / "scaler.npz").is_file() and "fitted per-pixel mean/std" in proc.stderr


def test_a_kubeflow_task_log_is_quiet_too(tiny_ws, tmp_path):
    step = registry.get("standardize")
    params = yaml.safe_dump(registry.task_params(resolve_defaults(load_raw(tiny_ws / "params.yaml")), step))
    (tmp_path / "task.yaml").write_text(params)
    out = tmp_path / "artifacts"
    task = f"""
import types
from pathlib import Path
from components import kfp_step
art = lambda p: types.SimpleNamespace(path=str(p), metadata={{}})
ws, out = Path({str(tiny_ws)!r}), Path({str(out)!r})
kfp_step.run_step("standardize", Path({str(tmp_path / 'task.yaml')!r}).read_text(), "v1",
                  splits_dir=art(ws / "data/splits"), scaler_path=art(out / "scaler.npz"), metrics_path=art(out / "m.json"))
"""
    proc = run([sys.executable, "-c", task], cwd=tmp_path, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL=None, LOGLEVEL=None)
    assert_quiet(proc.stderr, "standardize")
    assert (out / "m.json").is_file()


def test_a_stage_through_the_warm_server_is_quiet_too(tiny_ws, tmp_path):
    """`make repro` runs stages through tools/warm.py: the server's TensorFlow import and the forked stage's
    first GPU query (the child gets its caller's environment, without TF_CPP_MIN_LOG_LEVEL) are filtered too."""
    out = tmp_path / "out"
    proc = run([sys.executable, str(ROOT / "tools/warm.py"), "run", "--", "python", "-m", "components", "standardize",
                "--bind", f"scaler_path={out / 'scaler.npz'}", "--bind", f"metrics_path={out / 'scaler.json'}"],
               cwd=tiny_ws, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL=None, LOGLEVEL=None)
    assert "[warm] serving: python -m components standardize" in proc.stderr, proc.stderr[-3000:]
    assert_quiet(proc.stdout + proc.stderr, "standardize")
    assert (out / "scaler.npz").is_file()


def test_the_filter_drops_only_noise_and_debug_keeps_everything(tmp_path):
    """Native writes to fd 2 go through the filter: known noise and lines under TF_CPP_MIN_LOG_LEVEL are dropped,
    a real error and Python's own output pass; LOGLEVEL=DEBUG leaves TensorFlow's level at 0 (everything)."""
    code = """
import os, sys
from components.io import native_stderr_filtered
with native_stderr_filtered():
    os.write(2, b"I0000 00:00:1796547456.810687    4500 port.cc:153] oneDNN custom operations are on.\\n")
    os.write(2, b"W0000 00:00:1.2    45 some_file.cc:7] a warning under level 2\\n")
    os.write(2, b"E0000 00:00:1.3    45 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\\n")
    os.write(2, b"E0000 00:00:1.4    45 real.cc:9] a real error\\n")
    print("python says hi", file=sys.stderr)
os.write(2, b"after the block\\n")
print(os.environ["TF_CPP_MIN_LOG_LEVEL"])
"""
    proc = run([sys.executable, "-c", code], cwd=tmp_path, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL=None, LOGLEVEL=None)
    assert proc.stderr.splitlines() == ["E0000 00:00:1.4    45 real.cc:9] a real error", "python says hi", "after the block"]
    assert proc.stdout.strip() == "2"
    debug = run([sys.executable, "-c", code], cwd=tmp_path, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL=None, LOGLEVEL="DEBUG")
    assert debug.stdout.strip() == "0" and len(debug.stderr.splitlines()) == 6
    mine = run([sys.executable, "-c", code], cwd=tmp_path, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="1", LOGLEVEL=None)
    assert mine.stdout.strip() == "1" and "a warning under level 2" in mine.stderr  # the user's own level wins


def test_noise_rule():
    from components.io import tensorflow_noise

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    assert tensorflow_noise(b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    assert not tensorflow_noise(b"Traceback (most recent call last):\n")
    assert not tensorflow_noise(b"F0000 00:00:1.0  1 x.cc:1] Check failed: a fatal error\n")


# ------------------------------------------------------------------------------------------ missing inputs

def test_a_missing_split_is_named_with_its_stage_in_well_under_a_second(tmp_path):
    write_tiny(tmp_path / "params.yaml")
    for argv, names, stage in ((["standardize"], ["data/splits"], "dvc repro split"),
                               (["experiment", "elu"], ["data/splits", "data/scaler.npz"], "dvc repro split standardize")):
        t0 = time.monotonic()
        proc = run([sys.executable, "-m", "components", *argv], cwd=tmp_path, check=False, PYTHONPATH=str(ROOT))
        took = time.monotonic() - t0
        assert proc.returncode != 0 and took < 5, (took, proc.stderr)
        assert all(n in proc.stderr for n in names) and f"`{stage}`" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "FileNotFoundError" not in proc.stderr, proc.stderr
    # the cifar10 pipeline's steps say where its stages live
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10/params.yaml").write_text((ROOT / "cifar10/params.yaml").read_text())
    proc = run([sys.executable, "-m", "components", "cifar10_split"], cwd=tmp_path / "cifar10", check=False,
               PYTHONPATH=str(ROOT))
    assert proc.returncode != 0 and "data/raw" in proc.stderr and "`dvc repro cifar10_download` in cifar10/" in proc.stderr


def test_a_file_missing_inside_an_input_folder_gets_the_same_hint(tmp_path):
    write_tiny(tmp_path / "params.yaml")
    (tmp_path / "data/splits").mkdir(parents=True)  # e.g. emptied by hand
    proc = run([sys.executable, "-m", "components", "standardize"], cwd=tmp_path, check=False, PYTHONPATH=str(ROOT))
    assert proc.returncode == 1
    assert "data/splits/full_train.parquet" in proc.stderr and "`dvc repro split`" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------ full disk

def _no_space(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() on a full disk: no file name in it


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    from components.io import DiskFullError, atomic_path

    target = tmp_path / "metrics" / "m.json"
    write_json(target, {"old": 1})
    monkeypatch.setattr(Path, "write_text", _no_space)
    with pytest.raises(DiskFullError) as info:
        write_json(target, {"new": 2})
    msg = str(info.value)
    assert str(target) in msg and "MiB free" in msg and "no space left" in msg
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    monkeypatch.undo()
    assert target.read_text().strip().startswith('{\n  "old": 1') and os.listdir(target.parent) == ["m.json"]
    with pytest.raises(PermissionError):  # other errors pass unchanged
        with atomic_path(tmp_path / "x"):
            raise PermissionError(errno.EACCES, "denied")
    # a full disk outside the atomic writers (MLflow's artifacts, a checkpoint): the step's one line still says so
    from components.__main__ import explain

    line = explain(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "mlartifacts/x")),
                   registry.get("standardize"), None, {})
    assert line.startswith(f"no space left on the device while writing {tmp_path / 'mlartifacts/x'}") and "MiB free" in line
    assert "half-written" not in line  # not one of ours: no promise about what it left


def test_a_step_on_a_full_disk_says_which_file(tiny_ws, tmp_path):
    """A real step whose first write into its output folder hits a full disk (the open() of the temp file raises
    ENOSPC, with no file name, as the kernel reports it): one line naming the output, no temp file left behind."""
    out = tmp_path / "out"
    code = f"""
import builtins, errno, io, os, sys
real_open = io.open
def full_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax") and str(file).startswith({str(out)!r}):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_open(file, mode, *a, **k)
builtins.open = io.open = full_open
from components.__main__ import main
sys.exit(main(["standardize", "--bind", "scaler_path={out / 'scaler.npz'}", "--bind", "metrics_path={out / 'scaler.json'}"]))
"""
    proc = run([sys.executable, "-c", code], cwd=tiny_ws, check=False, PYTHONPATH=str(ROOT))
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if "no space left" in line]
    assert len(err) == 1 and str(out / "scaler.npz") in err[0] and "MiB free" in err[0], proc.stderr[-2000:]
    assert os.listdir(out) == []


# ------------------------------------------------------------------------------------------ CIFAR-10 gzip bomb

def test_a_cifar10_gzip_bomb_is_refused_without_reading_it_into_memory(tmp_path):
    """A 256 MiB member of zeros (a few hundred KB compressed) where data_batch_1 should be: refused with a clear
    error, and the reader's peak memory grows by far less than the member (it used to read it whole)."""
    size = 256 * 2**20
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar, open("/dev/zero", "rb") as zeros:
        meta = pickle.dumps({b"label_names": [n.encode() for n in CIFAR10_CLASSES]}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(meta)
        tar.addfile(info, __import__("io").BytesIO(meta))
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = size
        tar.addfile(info, zeros)
    assert archive.stat().st_size < size / 100
    code = f"""
import resource, sys
from pathlib import Path
from components.cifar10 import ArchiveError, read_archive
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_archive(Path({str(archive)!r}))
    print("read it")
except ArchiveError as err:
    print(err)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    proc = run([sys.executable, "-c", code], cwd=tmp_path, PYTHONPATH=str(ROOT))
    message, grew = proc.stdout.strip().splitlines()
    assert "data_batch_1 is 256 MiB" in message and "over the 64 MiB" in message and "decompression bomb" in message
    assert int(grew) < size / 8, f"peak memory grew by {int(grew) / 2**20:.0f} MiB reading a refused member"
