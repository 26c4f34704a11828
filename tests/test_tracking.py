"""Tracking edge cases that need no pipeline run."""
from __future__ import annotations

import sys
import time

from components.tracking import flatten

from .conftest import ROOT, run


def test_unreachable_server_is_a_clear_error_within_seconds(tiny_ws):
    t = time.monotonic()
    proc = run([sys.executable, "-m", "components", "experiment", "elu"], cwd=tiny_ws, check=False,
               PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    took = time.monotonic() - t
    assert proc.returncode == 1
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:9" in proc.stderr
    assert "Nothing was trained" in proc.stderr
    assert not (tiny_ws / "models/experiments/elu.keras").exists()
    assert took < 60, f"took {took:.0f}s"  # TensorFlow's import included; the check itself times out in 5 s


def test_flatten_names():
    assert flatten({"model": {"hidden": [{"units": 300}], "activation": {"name": "selu"}}}) == {
        "model.hidden.0.units": 300, "model.activation.name": "selu"}
