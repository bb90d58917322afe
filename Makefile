# Everyday commands. `make demo` and `make test` set up .venv themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench lint format gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	touch $(STAMP)

demo: setup  ## the main job: 5-shot MC-TI on real data with the embedded model
	$(VENV)/bin/mcti demo

test: setup  ## the whole CPU test suite (Triton kernels in interpreter mode)
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow"

bench: setup  ## CPU benchmarks; results go to benchmarks/RESULTS.md by hand
	$(PY) benchmarks/classify_speed.py
	$(PY) benchmarks/kernel_speed.py
	$(PY) benchmarks/train_scaling.py
	$(PY) benchmarks/serve_load.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

gpu-check:  ## on a CUDA machine only
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) mcti-demo .pytest_cache .ruff_cache
