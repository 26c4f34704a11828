"""How far the chapter's numbers move across CPUs: one experiment stage run under several instruction-set /
oneDNN settings of this machine, side by side, each in a fresh process.

On one machine the same params and data give bit-identical weights (tests/test_training.py). Another CPU runs
other kernels (AVX2 instead of AVX-512, oneDNN or Eigen), which sum in other orders and round differently; a deep
net carries such differences forward. This script imitates that on one machine:

    default          TensorFlow as installed (oneDNN, the best instruction set the CPU has)
    avx2             ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN without AVX-512: an older or smaller x86 CPU)
    eigen            TF_ENABLE_ONEDNN_OPTS=0 (TensorFlow's Eigen kernels instead of oneDNN)

    python benchmarks/isa_spread.py leaky_relu selu_deep relu_deep     # after `dvc repro standardize`

It prints each setting's validation and test accuracy and, per experiment, the spread (max - min). Outputs go to a
temporary folder; nothing in the workspace or the MLflow store is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "eigen": {"TF_ENABLE_ONEDNN_OPTS": "0"},
}


def run_stage(name: str, setting: str, out: Path) -> dict:
    from components import registry

    paths = registry.get("experiment").bind(name)
    binds = []
    for kwarg, path in paths.items():
        if kwarg in registry.get("experiment").inputs:
            continue
        target = out / setting / path
        target.parent.mkdir(parents=True, exist_ok=True)
        binds += ["--bind", f"{kwarg}={target}"]
    env = {**os.environ, **SETTINGS[setting], "PYTHONPATH": str(ROOT), "CH11_RUNTIME_PROFILE": "local"}
    cmd = [sys.executable, "-m", "components", "experiment", name, "-S", "mlflow.enabled=false",
           "-S", f"runtime.checkpoint_dir={out / setting / 'ckpt'}", *binds]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} under {setting} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / setting / paths["metrics_path"]).read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="+")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if not (ROOT / "data/scaler.npz").is_file():
        print("run `dvc repro standardize` first (the stage reads the real splits)", file=sys.stderr)
        return 2
    print(f"{'experiment':<12} " + " ".join(f"{s:>16}" for s in a.settings) + f" {'spread':>8}   (valid / test accuracy)")
    with tempfile.TemporaryDirectory(prefix="ch11-isa-") as tmp:
        for name in a.experiments:
            got = {s: run_stage(name, s, Path(tmp)) for s in a.settings}
            cells = " ".join(f"{got[s]['valid_accuracy']:.4f}/{got[s]['test_accuracy']:.4f}".rjust(16) for s in a.settings)
            spread = max(max(m[k] for m in got.values()) - min(m[k] for m in got.values())
                         for k in ("valid_accuracy", "test_accuracy"))
            print(f"{name:<12} {cells} {spread:8.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
