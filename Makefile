# The two commands of the README:  `make demo`  and  `make test`.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast bench
setup:
	./scripts/setup.sh

demo: setup
	$(PY) jobs/demo.py

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests
