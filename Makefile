# Everything runs inside .venv, created on demand from the system python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo toy-e2e 8-ball bench clean

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

# The whole pipeline on a toy task, offline (mlx_distill/demo.py, configs/demo/): teacher ->
# teacher server -> KD records -> 4x+ smaller student -> Core ML fp16/int8 -> verify -> eval ->
# runs/<timestamp>-<task>/report.md. Each finishes within 10 minutes on 2 CPU cores.
demo: toy-e2e

toy-e2e: setup
	$(VENV)/bin/mlx-distill demo --config toolcall

8-ball: setup
	$(VENV)/bin/mlx-distill demo --config eightball

bench: setup
	$(PY) benchmarks/blas.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/teacher_throughput.py

# The longer quality benchmark (~10 min): KD vs CE-only students on the toy tool-call task.
.PHONY: bench-kd
bench-kd: setup
	$(PY) benchmarks/kd_vs_sft.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .coverage runs

# Apple's MIL op tests (from the installed coremltools) run through our numpy interpreter, on
# its fp32 and fp16 backends (~40 min on 2 cores; see tests/peer/conftest.py). `pytest tests`
# alone skips them; the quick subset (fp32, ~35 s) is what CI runs.
.PHONY: peer-tests peer-tests-quick
peer-tests: setup
	PEER_PRECISIONS=fp32,fp16 $(VENV)/bin/pytest tests/peer -q

peer-tests-quick: setup
	$(VENV)/bin/pytest tests/peer -q -m peer_quick

# Core ML export cost (benchmarks/export.py: small config; `--sizes small,0.5b` adds 0.5B). The
# torch trace -> ct.convert baseline runs when .bench-venv/ exists; bench-export-torch creates it
# (torch is never a project dependency).
.PHONY: bench-export bench-export-torch
bench-export: setup
	$(PY) benchmarks/export.py

bench-export-torch: setup
	@test -x .bench-venv/bin/python || $(PYTHON) -m venv .bench-venv
	.bench-venv/bin/python -m pip install -q torch==2.13.0 coremltools==9.0 numpy
	$(PY) benchmarks/export.py
