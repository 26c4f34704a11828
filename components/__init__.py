"""Steps of the "Training Deep Neural Networks" pipeline (Géron, Hands-On ML, ch. 11).

Each module is one step: a pure function (arrays/tables in, arrays/metrics out) and a thin
``run(params)`` edge used by both the DVC stage (``python -m components <step>``) and the
Kubeflow component in ``pipeline.py``.  Importing this package must stay cheap: TensorFlow is
imported only by the training steps that need it.
"""

import os as _os

# TensorFlow C++ INFO lines (CUDA probing, oneDNN, XLA notices) are noise for a user; warnings still show
# (io.setup_logging filters what TensorFlow prints before this setting takes effect). LOGLEVEL=DEBUG shows all.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if _os.environ.get("LOGLEVEL", "").upper() == "DEBUG" else "2")
if not _os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver here: skip CUDA probing (and its error lines)
    _os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

__all__ = ["__version__"]
__version__ = "0.1.0"
