"""Research benchmark: what a custom fused kernel could give the 100-layer SELU net's critical path.

Not part of the pipeline. `benchmarks/critical_path.py` shows that the pipeline's step is within 4-20 % of its
critical path, the chain of 100 forward and 100 input-gradient products with their SELU and SELU-gradient ops.
This script prices a shorter chain. It builds `benchmarks/kernels/selu_chain.cc` with g++ into a temporary
folder: the 98 100×100 layers of that chain in hand-blocked AVX2/FMA code, bias and SELU fused into the forward
product, the SELU gradient fused ahead of the backward one, no TensorFlow executor in between. It checks the
result against TensorFlow's, then times both in one process, in alternating rounds, with the pipeline's thread
settings. It prints both times per step and their ratio.

    python benchmarks/hand_kernel_chain.py            # needs g++ and a CPU with AVX2 and FMA
    python benchmarks/hand_kernel_chain.py --rounds 16 --steps 500

The prototype is fixed to this net's shapes (a batch of 32, 100 units padded to 112 columns). Made into TensorFlow
ops for any shape and used by the model (branch ``wip/selu-dense-op``), the kernel's gain did not carry over: the
pipeline's epoch ran 1.02x as fast, within this box's noise (docs/speed.md).
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "benchmarks/kernels/selu_chain.cc"
BATCH, UNITS, PADDED, LAYERS = 32, 100, 112, 98


def build(out_dir: Path) -> ctypes.CDLL:
    import tensorflow as tf

    if not shutil.which("g++"):
        raise SystemExit("g++ is not installed: this research benchmark compiles a C++ kernel (apt-get install g++)")
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    if " avx2" not in flags or " fma" not in flags:
        raise SystemExit("this CPU lacks AVX2 or FMA, which the prototype kernel is written for")
    lib = out_dir / "selu_chain.so"
    cmd = ["g++", "-O3", "-mavx2", "-mfma", "-DNDEBUG", "-shared", "-fPIC", f"-I{tf.sysconfig.get_include()}",
           str(SOURCE), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"building {SOURCE.name} failed:\n{proc.stderr[-3000:]}")
    dll = ctypes.CDLL(str(lib))
    fp = ctypes.POINTER(ctypes.c_float)
    dll.run_hand.restype = ctypes.c_double
    dll.run_hand.argtypes = [ctypes.c_int, fp, fp, fp, fp, ctypes.c_int, fp, fp]
    return dll


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds of each way, alternating")
    ap.add_argument("--steps", type=int, default=300, help="chains (one per SGD step) per round")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from components import train
    from components.config import load_params

    train.configure(load_params(ROOT / "params.yaml").runtime)  # the pipeline's threads: one per op, two inter-op
    import tensorflow as tf

    rng = np.random.default_rng(0)
    kernels = [(rng.standard_normal((UNITS, UNITS)) / np.sqrt(UNITS)).astype(np.float32) for _ in range(LAYERS)]  # lecun_normal scale
    biases = [(rng.standard_normal(UNITS) * 0.1).astype(np.float32) for _ in range(LAYERS)]
    x = rng.standard_normal((BATCH, UNITS)).astype(np.float32)

    def pad(m):
        out = np.zeros((m.shape[0], PADDED), np.float32)
        out[:, :m.shape[1]] = m
        return out

    w_p = np.ascontiguousarray(np.stack([pad(w) for w in kernels]))
    wt_p = np.ascontiguousarray(np.stack([pad(np.ascontiguousarray(w.T)) for w in kernels]))
    b_p = np.ascontiguousarray(np.stack([np.pad(b, (0, PADDED - UNITS)) for b in biases]))
    x_p = pad(x)
    fp = ctypes.POINTER(ctypes.c_float)

    with tempfile.TemporaryDirectory() as tmp:
        dll = build(Path(tmp))

        def hand(n: int, out_h=None, out_dy=None) -> float:
            ptr = (lambda m: m.ctypes.data_as(fp) if m is not None else None)
            return dll.run_hand(LAYERS, ptr(w_p), ptr(wt_p), ptr(b_p), ptr(x_p), n, ptr(out_h), ptr(out_dy))

        ws = [tf.constant(w) for w in kernels]
        bs = [tf.constant(b) for b in biases]
        x_tf = tf.constant(x)

        def chain(x_in):
            hs, h = [], x_in
            for w, b in zip(ws, bs):
                h = tf.nn.selu(tf.nn.bias_add(tf.linalg.matmul(h, w), b))
                hs.append(h)
            dy = h * 0.01
            for w, h in zip(reversed(ws), reversed(hs)):
                dy = tf.linalg.matmul(tf.raw_ops.SeluGrad(gradients=dy, outputs=h), w, transpose_b=True)
            return hs[-1], dy

        @tf.function
        def run(n):
            def body(i, done):
                with tf.control_dependencies([done]):  # one chain after the other, as SGD's steps
                    _, dy = chain(x_tf)
                return i + 1, tf.reduce_sum(dy)

            return tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), tf.constant(0.0)))[1]

        # the same function: last activations and first-layer input gradients agree to rounding
        h_tf, dy_tf = (t.numpy() for t in tf.function(chain)(x_tf))
        h_hand, dy_hand = np.zeros((BATCH, PADDED), np.float32), np.zeros((BATCH, PADDED), np.float32)
        hand(1, h_hand, dy_hand)
        err_h = float(np.abs(h_hand[:, :UNITS] - h_tf).max() / np.abs(h_tf).max())
        err_dy = float(np.abs(dy_hand[:, :UNITS] - dy_tf).max() / np.abs(dy_tf).max())
        if max(err_h, err_dy) > 1e-3 or np.abs(h_hand[:, UNITS:]).max() or np.abs(dy_hand[:, UNITS:]).max():
            raise SystemExit(f"the hand kernel disagrees with TensorFlow (relative error {err_h:.2e}, {err_dy:.2e})")

        run(tf.constant(3)).numpy()
        hand(3)
        times: dict[str, list[float]] = {"tensorflow": [], "hand kernel": []}
        for r in range(a.rounds):
            for way in (("tensorflow", "hand kernel") if r % 2 == 0 else ("hand kernel", "tensorflow")):
                if way == "tensorflow":
                    t = time.perf_counter()
                    run(tf.constant(a.steps)).numpy()
                    times[way].append((time.perf_counter() - t) / a.steps * 1e3)
                else:
                    times[way].append(hand(a.steps) / a.steps * 1e3)
    print(f"(the 100-layer SELU net's chain of {LAYERS} 100x100 layers, forward and input gradients, batch {BATCH}; "
          f"{a.rounds} rounds of {a.steps} chains each way, alternating; relative difference to TensorFlow "
          f"{err_h:.1e} forward, {err_dy:.1e} backward)")
    for way, ms in times.items():
        print(f"{way:<12} {statistics.median(ms):7.3f} ms a chain   (rounds: {', '.join(f'{m:.2f}' for m in ms)})")
    ratios = [t / h for t, h in zip(times["tensorflow"], times["hand kernel"])]
    print(f"tensorflow / hand kernel: {statistics.median(ratios):.2f}x   (per round: {', '.join(f'{r:.2f}x' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
