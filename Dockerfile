# One image recipe for every task of the pipeline (pipeline.py): a venv at /opt/venv from a runtime lock (what a
# task imports; no DVC, MLflow server or test tools), the project's code in /app. The CPU and GPU images differ
# only in the lock they install:
#
#   make image        CPU image, requirements-runtime.lock      -> ch11-pipeline:<hash of base, locks and code>
#   make image-gpu    GPU image, requirements-gpu.lock (TensorFlow with CUDA and cuDNN as PyPI wheels, on the
#                     same base)                                 -> ch11-pipeline:<hash>-gpu
#   OFFLINE=1         no registry or package index needed: the base is a local Debian (`make base-image`,
#                     debootstrap) and the wheels come from a wheelhouse downloaded on the host (`make wheelhouse`),
#                     served to the build over HTTP on 127.0.0.1 (docker build --network host --build-arg WHEELS=URL)
#
# By hand: docker build [--build-arg BASE=...] [--build-arg LOCK=requirements-gpu.lock] -t NAME:TAG .
# Nothing is pip-installed when a task runs: component bodies import the `components` package from /app.
# Data comes from the mirrors in params.yaml (a URL, or a mounted folder; the Debian package is not in the image).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG LOCK=requirements-runtime.lock
# a pip find-links URL holding every wheel of the lock (offline build); empty: the package index
ARG WHEELS=
LABEL org.opencontainers.image.title="ch11-pipeline" ch11.lock="${LOCK}"
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv PYTHONPATH=/app PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg MPLCONFIGDIR=/tmp/matplotlib PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY ${LOCK} /tmp/
# One layer: install, then drop TensorFlow's C++ headers (tensorflow/include, ~430 MB, for compiling custom ops;
# nothing imports them) before the layer is written. Bytecode is compiled in parallel, not for test folders.
RUN set -e; python3 -m venv /opt/venv; \
    if [ -n "$WHEELS" ]; then src="--no-index --find-links $WHEELS"; else src=""; fi; \
    echo "installing $LOCK from ${WHEELS:-the package index}"; \
    /opt/venv/bin/pip install -q --no-compile $src -r /tmp/$(basename $LOCK); \
    site=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
    rm -rf "$site/tensorflow/include" /tmp/$(basename $LOCK); \
    /opt/venv/bin/python -m compileall -q -j 0 -x '/tests?/' "$site" >/dev/null || true  # a few packages ship files for other Pythons
WORKDIR /app
COPY pyproject.toml params.yaml dvc.yaml pipeline.py ./
COPY components/ components/
RUN python -m compileall -q components pipeline.py >/dev/null \
    && python -c "import components.kfp_step, kfp, mlflow, pyarrow, tensorflow as tf; print('image ok: TensorFlow', tf.__version__)"
