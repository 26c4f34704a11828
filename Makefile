# The two commands of the README:
#   make repro   set up this machine, then run the whole pipeline (dvc repro) on the real data, offline
#   make test    set up this machine, then run the test suite
# Both create .venv from requirements.lock and, when run as root, install the Debian package
# dataset-fashion-mnist (the offline mirror of Fashion-MNIST).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
UV_VERSION := 0.13.9
DATASET_DIR := /usr/share/datasets/fashion-mnist
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: setup dataset browser plots-js plots repro test lock dvc-yaml mlflow-ui benchmark cifar10

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

test: setup dataset browser plots-js
	pytest

lock:
	$(VENV)/bin/uv pip compile --python-version 3.11 requirements.in -o requirements.lock

mlflow-ui: setup   # the local runs (sqlite:///mlflow.db + mlartifacts/) at http://127.0.0.1:5000
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts \
	  --host 127.0.0.1 --port 5000 --workers 1

benchmark: setup dataset
	dvc repro standardize
	python benchmarks/fit_speed.py

dvc-yaml:
	python -m components render-dvc > dvc.yaml
	python -m components render-dvc cifar10 > cifar10/dvc.yaml

# Exercise 8 (CIFAR-10): a DVC project of its own in cifar10/ (never part of `make repro`); needs a network
# for the download (or the tarball in cifar10/downloads/). Its runs join the MLflow store of `make mlflow-ui`.
cifar10: setup
	cd cifar10 && CH11_PIPELINE_RUN=$${CH11_PIPELINE_RUN:-cifar10-$$(date -u +%Y%m%dT%H%M%SZ)} \
	  MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	  PYTHONPATH=$(CURDIR) python $(CURDIR)/tools/warm.py run -- dvc repro
	@echo "==> done. Summary: $(CURDIR)/cifar10/reports/summary.md (metrics: cd cifar10 && dvc metrics show)"
