# The two commands of the README:
#   make repro   set up this machine, then run the whole pipeline (dvc repro) on the real data, offline
#   make test    set up this machine, then run the test suite
# Both create .venv from requirements.lock and, when run as root, install the Debian package
# dataset-fashion-mnist (the offline mirror of Fashion-MNIST); `make test` as root also starts Docker (installing
# docker.io and debootstrap when missing) for the test that runs the pipeline in the task image.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
UV_VERSION := 0.13.9
DATASET_DIR := /usr/share/datasets/fashion-mnist
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: setup dataset browser plots-js plots repro claims test lock dvc-yaml mlflow-ui benchmark cifar10 \
        docker-daemon base-image wheelhouse image image-gpu image-name image-push gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@echo "==> creating $(VENV) from requirements.lock (first time: a few minutes, ~3 GB)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --python $(VENV)/bin/python --compile-bytecode -r requirements.lock
	$(VENV)/bin/uv pip install --python $(VENV)/bin/python --no-deps -e .
	touch $@

dataset:
	@if [ -f $(DATASET_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "==> offline mirror present: $(DATASET_DIR)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "==> installing the Debian package dataset-fashion-mnist (offline mirror)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "==> $(DATASET_DIR) is missing and this is not root: run 'sudo apt-get install dataset-fashion-mnist'"; \
	  echo "    (without it the download step falls back to the public mirrors, which need a network)"; \
	fi

browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "==> installing Debian chromium (the MLflow UI browser test drives it headless)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "==> chromium missing and not root: the browser test will be skipped (sudo apt-get install chromium)"; fi

# `dvc plots show` that renders offline: vega, vega-lite and vega-embed from the npm registry (pinned in
# tools/plots/package-lock.json), loaded from tools/plots/node_modules by the template tools/plots/offline.html.
PLOTS_JS := tools/plots/node_modules/.installed
plots-js: $(PLOTS_JS)

$(PLOTS_JS): tools/plots/package.json tools/plots/package-lock.json
	@if command -v npm >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "==> installing Debian npm (for the pinned vega of make plots)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; \
	else echo "==> npm is missing and this is not root: sudo apt-get install npm"; exit 1; fi
	cd tools/plots && npm ci --no-audit --no-fund --ignore-scripts
	touch $@

plots: setup plots-js
	dvc plots show --html-template tools/plots/offline.html -o dvc_plots
	@echo "==> open $(CURDIR)/dvc_plots/index.html (works offline; JavaScript from tools/plots/node_modules)"

repro: setup dataset
	CH11_PIPELINE_RUN=$${CH11_PIPELINE_RUN:-repro-$$(date -u +%Y%m%dT%H%M%SZ)} python tools/warm.py run -- python tools/repro.py
	@echo "==> done. Report: $(CURDIR)/reports/report.md (figures in reports/figures/);"
	@echo "    metrics: dvc metrics show; runs: make mlflow-ui, then http://127.0.0.1:5000"

# The chapter's claims over seeds (claims/dvc.yaml): every experiment again with each of claims.seeds, paired with
# the main job's run -> reports/claims.md. Runs the main job's stages first where they are out of date.
claims: setup dataset
	CH11_PIPELINE_RUN=$${CH11_PIPELINE_RUN:-claims-$$(date -u +%Y%m%dT%H%M%SZ)} python tools/warm.py run -- python tools/repro.py claims/dvc.yaml
	@echo "==> done. Claims: $(CURDIR)/reports/claims.md (runs: make mlflow-ui, experiment ch11-training-deep-nets-claims)"

test: setup dataset browser plots-js docker-daemon
	pytest

# The dev lock first; the image locks take it as a constraint, so every package they share has the same version.
lock:
	$(VENV)/bin/uv pip compile -q --python-version 3.11 requirements.in -o requirements.lock
	$(VENV)/bin/uv pip compile -q --python-version 3.11 requirements-runtime.in -c requirements.lock -o requirements-runtime.lock
	$(VENV)/bin/uv pip compile -q --python-version 3.11 requirements-gpu.in -c requirements.lock -o requirements-gpu.lock

mlflow-ui: setup   # the local runs (sqlite:///mlflow.db + mlartifacts/) at http://127.0.0.1:5000
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts \
	  --host 127.0.0.1 --port 5000 --workers 1

benchmark: setup dataset
	dvc repro standardize
	python benchmarks/fit_speed.py

dvc-yaml:
	python -m components render-dvc > dvc.yaml
	python -m components render-dvc cifar10 > cifar10/dvc.yaml
	python -m components render-dvc claims > claims/dvc.yaml

# Exercise 8 (CIFAR-10): a DVC project of its own in cifar10/ (never part of `make repro`); needs a network
# for the download (or the tarball in cifar10/downloads/). Its runs join the MLflow store of `make mlflow-ui`.
cifar10: setup
	cd cifar10 && CH11_PIPELINE_RUN=$${CH11_PIPELINE_RUN:-cifar10-$$(date -u +%Y%m%dT%H%M%SZ)} \
	  MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	  PYTHONPATH=$(CURDIR) python $(CURDIR)/tools/warm.py run -- dvc repro
	@echo "==> done. Summary: $(CURDIR)/cifar10/reports/summary.md (metrics: cd cifar10 && dvc metrics show)"

# ------------------------------------------------------------------------------------------ images
# `make image` / `make image-gpu`: the task images of the Kubeflow pipeline, from one Dockerfile (docs/kubeflow.md).
# The tag is a hash of what goes into the image (base, Dockerfile, locks, code), so an unchanged image is reused.
# OFFLINE=1: no registry and no package index needed in the build (air-gapped sites, these machines): the base
# is a local Debian (`make base-image`, debootstrap) and the wheels come from a host-built wheelhouse.
IMAGE_NAME ?= ch11-pipeline
OFFLINE ?= 0
LOCAL_BASE := ch11-base:bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
WHEELS_PORT ?= 38117
ifeq ($(OFFLINE),1)
BASE ?= $(LOCAL_BASE)
else
BASE ?= python:3.11-slim-bookworm
endif
IMAGE_FILES := Dockerfile requirements-runtime.lock requirements-gpu.lock pyproject.toml params.yaml dvc.yaml \
  pipeline.py $(sort $(shell find components -type f -not -path '*/__pycache__/*' -not -name '*.pyc'))
IMAGE_TAG := $(shell (echo $(BASE); cat $(IMAGE_FILES)) | sha256sum | cut -c1-12)
IMAGE ?= $(IMAGE_NAME):$(IMAGE_TAG)
GPU_IMAGE ?= $(IMAGE_NAME):$(IMAGE_TAG)-gpu

image-name:   # the CPU image name:tag of this checkout (tests/test_docker.py asks)
	@echo $(IMAGE)

# A running Docker daemon (the images, and the test that runs the pipeline in one): as root, installs docker.io
# and starts dockerd when missing; otherwise says what to do (the Docker tests then skip, except in CI).
docker-daemon:
	@if docker info >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "==> the Docker daemon is not reachable (docker info failed) and this is not root: start it"; \
	  echo "    (sudo systemctl start docker) and add yourself to the docker group"; exit 0; fi; \
	if ! command -v dockerd >/dev/null; then \
	  echo "==> installing the Debian packages docker.io and debootstrap"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap; fi; \
	echo "==> starting dockerd (log: /var/log/ch11-dockerd.log)"; \
	nohup dockerd >/var/log/ch11-dockerd.log 2>&1 & \
	for i in $$(seq 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done; \
	echo "==> dockerd did not come up in 60 s; its log:"; tail -20 /var/log/ch11-dockerd.log; exit 1

base-image: docker-daemon   # a minimal Debian bookworm with python3 + venv, made here (no registry): ch11-base:bookworm
	@if docker image inspect $(LOCAL_BASE) >/dev/null 2>&1; then echo "==> $(LOCAL_BASE) present"; exit 0; fi; \
	command -v debootstrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } || \
	  { echo "==> debootstrap is missing: sudo apt-get install debootstrap"; exit 1; }; \
	echo "==> building $(LOCAL_BASE) with debootstrap from $(DEBIAN_MIRROR) (a few minutes)"; \
	d=$$(mktemp -d /var/tmp/ch11-base.XXXXXX); \
	debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm $$d $(DEBIAN_MIRROR) \
	  >$$d.log 2>&1 || { tail -20 $$d.log; rm -rf $$d $$d.log; exit 1; }; \
	rm -rf $$d/var/cache/apt/archives/*.deb $$d/var/lib/apt/lists/* $$d/usr/share/doc/* $$d/usr/share/man/* \
	  $$d/usr/share/locale/*; \
	tar -C $$d -c . | docker import -c 'CMD ["python3"]' - $(LOCAL_BASE); rc=$$?; rm -rf $$d $$d.log; exit $$rc

# wheels of a lock for an offline build, downloaded (or built, for the few sdists) on the host: wheelhouse/<lock>/
wheelhouse: wheelhouse/requirements-runtime/.done
wheelhouse/%/.done: %.lock | setup
	@echo "==> wheelhouse for $<: wheelhouse/$*/"
	$(VENV)/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -r $< -w wheelhouse/$*
	touch $@

# build $(1) from lock $(2). The context is streamed (Dockerfile, locks, code: nothing else of the checkout, no
# .venv or data). OFFLINE=1: the lock's wheelhouse is served on 127.0.0.1 for the build (--network host), so the
# wheels never land in a layer or the context; on a fixed port when free, as the URL is part of the layer cache key.
define build_image
	@if docker image inspect $(1) >/dev/null 2>&1; then echo "==> $(1) is up to date (same base, locks and code)"; exit 0; fi; \
	echo "==> building $(1) from $(2) on $(BASE)"; start=$$(date +%s); wheels=; \
	if [ "$(OFFLINE)" = 1 ]; then \
	  port=$(WHEELS_PORT); $(PYTHON) -c 'import socket; socket.create_server(("127.0.0.1", $(WHEELS_PORT))).close()' \
	    2>/dev/null || port=$$($(PYTHON) -c 'import socket; s=socket.create_server(("127.0.0.1", 0)); print(s.getsockname()[1])'); \
	  $(PYTHON) -m http.server -b 127.0.0.1 -d wheelhouse/$(basename $(2)) $$port >/dev/null 2>&1 & srv=$$!; \
	  trap "kill $$srv" EXIT; wheels=http://127.0.0.1:$$port/; \
	  for i in $$(seq 50); do $(PYTHON) -c "import urllib.request as u; u.urlopen('$$wheels')" 2>/dev/null && break; sleep 0.2; done; \
	fi; \
	tar -c $(IMAGE_FILES) | docker build --network host --build-arg BASE=$(BASE) --build-arg LOCK=$(2) \
	  --build-arg WHEELS=$$wheels -t $(1) - && \
	echo "==> built $(1) in $$(( $$(date +%s) - start )) s, $$(docker image inspect -f '{{.Size}}' $(1) | awk '{printf "%.2f GB", $$1/1e9}')"
endef

image: docker-daemon $(if $(filter 1,$(OFFLINE)),base-image wheelhouse/requirements-runtime/.done)
	$(call build_image,$(IMAGE),requirements-runtime.lock)

image-gpu: docker-daemon $(if $(filter 1,$(OFFLINE)),base-image wheelhouse/requirements-gpu/.done)
	$(call build_image,$(GPU_IMAGE),requirements-gpu.lock)

# Push both images to REGISTRY (docker login first), then write build/images.json with them pinned by digest:
# `python pipeline.py compile --images build/images.json` puts exactly these bytes on the cluster.
REGISTRY ?=
image-push: image image-gpu
	@[ -n "$(REGISTRY)" ] || { echo "==> set the registry: make image-push REGISTRY=registry.example.com/team"; exit 1; }
	@set -e; mkdir -p build; out=""; \
	for pair in image=$(IMAGE) gpu_image=$(GPU_IMAGE); do \
	  key=$${pair%%=*}; local=$${pair#*=}; remote=$(REGISTRY:%/=%)/$${local##*/}; \
	  docker tag $$local $$remote; docker push -q $$remote >/dev/null; \
	  digest=$$(docker image inspect -f '{{range .RepoDigests}}{{println .}}{{end}}' $$remote | grep "^$${remote%:*}@" | head -1); \
	  [ -n "$$digest" ] || { echo "==> no digest for $$remote after the push"; exit 1; }; \
	  echo "==> pushed $$remote: $$digest"; out="$$out\"$$key\": \"$$digest\", "; done; \
	echo "{$${out%, }}" > build/.images.json.tmp && mv build/.images.json.tmp build/images.json; \
	echo "==> build/images.json: compile with python pipeline.py compile --images build/images.json"

# The GPU image checked without a GPU: TensorFlow's build info names CUDA and cuDNN, and their libraries load.
gpu-check: image-gpu
	docker run --rm -i $(GPU_IMAGE) python - < tools/gpu_check.py
