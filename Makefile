# The two commands of the README:  `make demo`  and  `make test`.
# Every job chooses its threads itself (cores / ranks on the machine); the test suite pins one per process.
PY := .venv/bin/python
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast
setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/deepflow demo

test test-fast: export OMP_NUM_THREADS ?= 1
test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests
