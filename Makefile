# Everyday commands. `make demo` and `make test` set up .venv themselves on a fresh machine.
# Every pip run installs with the one constraints file (exact versions; torch stays pinned).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := deploy/constraints.txt
EXTRAS ?= serve,distributed,triton,plots,demo,dev
PIP := $(PY) -m pip install -q -c $(CONSTRAINTS)

.PHONY: setup demo test test-fast bench lint format gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -e ".[$(EXTRAS)]"
	$(PIP) --no-deps animal-mnist
	touch $(STAMP)

demo: setup  ## the main job: 5-shot MC-TI on real data with the embedded model
	$(VENV)/bin/mcti demo

# pytest exits 5 when it collected nothing (a typo in -k/-m, a broken testpath): say so, and fail.
test: setup  ## the whole CPU test suite (Triton kernels in interpreter mode)
	$(PY) -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow"

bench: setup  ## CPU benchmarks; results go to benchmarks/RESULTS.md by hand
	$(PY) benchmarks/classify_speed.py
	$(PY) benchmarks/kernel_speed.py
	$(PY) benchmarks/train_scaling.py
	$(PY) benchmarks/serve_load.py

# Lint: ruff, then the import layering rule (tests/test_layering.py: arrows and cycles).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layering.py

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

gpu-check:  ## on a CUDA machine only
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) mcti-demo .pytest_cache .ruff_cache
