"""Steps of the "Training Deep Neural Networks" pipeline (Géron, Hands-On ML, ch. 11).

Each module is one step: a pure function (arrays/tables in, arrays/metrics out) and a thin
``run(params)`` edge used by both the DVC stage (``python -m components <step>``) and the
Kubeflow component in ``pipeline.py``.  Importing this package must stay cheap: TensorFlow is
imported only by the training steps that need it.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
