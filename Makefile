# Everything runs inside .venv, created on demand from the system python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py mlx_distill/_blas_shim.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check mlx_distill converters benchmarks tests

test: lint
	$(VENV)/bin/pytest --cov --cov-report=term --cov-fail-under=80 tests

demo: setup
	$(VENV)/bin/mlx-distill demo

bench: setup
	$(PY) benchmarks/blas.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .coverage runs
