# One image recipe for every step of the pipeline (pipeline.py), from the same lock file as the local venv.
#
#   CPU build (download, split, standardize, report):
#     docker build -t REGISTRY/ch11-pipeline:TAG .
#   GPU build (every training / variant task), on a TensorFlow GPU base (CUDA + cuDNN inside, Python 3.11):
#     docker build --build-arg BASE=tensorflow/tensorflow:2.21.0-gpu -t REGISTRY/ch11-pipeline:TAG-gpu .
#
# The tags go into params.yaml (kubeflow.image / kubeflow.gpu_image) or `pipeline.py compile --image ... --gpu-image ...`.
# Nothing is pip-installed when a task runs: component bodies import the `components` package installed here.
# Data comes from the public mirrors in params.yaml (the Debian package's directory is not in the image).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /app
COPY requirements.lock ./
RUN python3 -m pip install -r requirements.lock
COPY pyproject.toml README.md params.yaml dvc.yaml pipeline.py ./
COPY components/ components/
RUN python3 -m pip install --no-deps . \
    && python3 -c "import components.kfp_step, kfp, mlflow, pyarrow, tensorflow; print('image ok')"
