# The README's commands. `make demo` sets up and trains on the embedded task; `make test` sets up
# and runs the test suite (with the bench extra, so the TRL loss-equivalence tests run). Both create .venv on first use; where no NVIDIA GPU is present the CPU
# build of torch is installed first, so pip does not pull the multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CONFIG ?= configs/chord_phi.yaml

.PHONY: setup setup-bench demo test bench bench-quick

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

setup: $(PY)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "no GPU found: installing the CPU build of torch"; \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[dev]"

setup-bench: setup
	$(PY) -m pip install -q -e ".[dev,bench]"

demo: setup
	$(PY) train.py fit --config $(CONFIG)

test: setup-bench
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup-bench
	$(PY) benchmarks/methods.py

bench-quick: setup-bench
	$(PY) benchmarks/methods.py --quick --out /tmp/lit_align_bench_quick
	$(PY) benchmarks/throughput.py --quick
	$(PY) benchmarks/compare_trl.py --quick
