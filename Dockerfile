# One image recipe for every task of the pipeline (pipeline.py): a venv at /opt/venv from a runtime lock (no
# test tools), the project's code in /app. CPU and GPU images differ only in the lock they install:
#
#   make image        CPU image, requirements-runtime.lock          -> ch11-pipeline:<hash of locks + code>
#   make image-gpu    GPU image, requirements-gpu.lock (TensorFlow with CUDA and cuDNN as PyPI wheels, same
#                     base image)                                    -> ch11-pipeline:<hash>-gpu
#   make image OFFLINE=1 / make image-gpu OFFLINE=1: no registry, no package index in the build: the base is
#                     a local Debian made with debootstrap (`make base-image`), the wheels come from a
#                     wheelhouse downloaded on the host (`make wheelhouse`). See docs/kubeflow.md.
#
# By hand: docker build [--build-arg BASE=...] [--build-arg LOCK=requirements-gpu.lock] -t NAME:TAG .
# (with a wheelhouse/ folder of wheels in the context the build installs from it, offline; without one, from PyPI).
# Nothing is pip-installed when a task runs: component bodies import the `components` package from /app.
# Data comes from the mirrors in params.yaml (a URL, or a mounted folder; the Debian package is not in the image).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS venv
ARG LOCK=requirements-runtime.lock
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the locks, and the wheels when the context has a wheelhouse/ (the wildcard may match nothing)
COPY requirements-runtime.lock requirements-gpu.lock wheelhouse* /tmp/src/
RUN python3 -m venv /opt/venv \
    && if ls /tmp/src/*.whl >/dev/null 2>&1; then \
         echo "installing $LOCK from the wheelhouse (offline)"; \
         /opt/venv/bin/pip install -q --no-index --find-links /tmp/src -r /tmp/src/$LOCK; \
       else \
         echo "installing $LOCK from the package index"; \
         /opt/venv/bin/pip install -q -r /tmp/src/$LOCK; \
       fi

FROM ${BASE}
ARG LOCK=requirements-runtime.lock
LABEL org.opencontainers.image.title="ch11-pipeline" ch11.lock="${LOCK}"
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv PYTHONPATH=/app PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg MPLCONFIGDIR=/tmp/matplotlib
COPY --from=venv /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml params.yaml dvc.yaml pipeline.py ./
COPY components/ components/
RUN python -c "import components.kfp_step, kfp, mlflow, pyarrow, tensorflow as tf; print('image ok: TensorFlow', tf.__version__)"
