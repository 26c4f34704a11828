"""The GPU image, checked on a machine without a GPU (`make gpu-check` pipes this into the image).

TensorFlow's build info must name CUDA and cuDNN, and the CUDA libraries TensorFlow loads at start
(the nvidia-* wheels of requirements-gpu.lock) must load with the dynamic linker. Prints what it found;
exits 1 with the reason when something is missing. Whether a GPU is visible is reported, not required, and so
is a library that needs only the driver's libcuda.so.1 (the GPU node provides it to the container).
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys

# the libraries TensorFlow dlopens for a GPU (runtime, BLAS, JIT linker, sparse, solvers, FFT, RNG, cuDNN with its
# sub-libraries, NCCL), in an order where each one's dependencies are already loaded
LIBS = ("cudart", "cublasLt", "cublas", "nvJitLink", "cusparse", "cusolver", "cufft", "curand", "cudnn", "nccl")


def main() -> int:
    import tensorflow as tf

    info = tf.sysconfig.get_build_info()
    problems = []
    print(f"TensorFlow {tf.__version__}: is_cuda_build={info.get('is_cuda_build')} "
          f"cuda_version={info.get('cuda_version')} cudnn_version={info.get('cudnn_version')}")
    if not info.get("is_cuda_build") or not info.get("cuda_version") or not info.get("cudnn_version"):
        problems.append("TensorFlow's build info names no CUDA / cuDNN: this is a CPU-only TensorFlow")
    import nvidia  # the namespace package of the nvidia-* wheels

    driver_only: list[str] = []
    roots = [p for r in nvidia.__path__ for p in glob.glob(os.path.join(r, "*", "lib"))]
    for name in LIBS:
        found = sorted(p for root in roots for p in glob.glob(os.path.join(root, f"lib{name}[._]*so*")))
        if not found:
            problems.append(f"lib{name}.so is in no nvidia-* wheel")
        for path in found:  # cuDNN: the front library and every sub-library it opens later
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # its own dependencies must resolve too
                print(f"loaded {path}")
            except OSError as err:
                if "libcuda.so.1" in str(err):  # the driver, mounted into the pod on a GPU node: absent here is right
                    print(f"needs the driver (libcuda.so.1, from the GPU node): {path}")
                    driver_only.append(os.path.basename(path))
                else:
                    problems.append(f"{os.path.basename(path)} does not load: {err}")
    print(f"GPUs visible: {len(tf.config.list_physical_devices('GPU'))} (none is fine for this check)")
    if problems:
        print("GPU image check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("GPU image check passed: a CUDA build of TensorFlow, and its CUDA libraries load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
