#!/usr/bin/env bash
# Rollout tokens/s of lit-align's HF path against the colocated vLLM engine on one NVIDIA GPU, on a
# randomly initialised checkpoint of Qwen2.5-0.5B's architecture (~494M parameters, bf16) built on the spot.
# One command, from the repository root:  bash benchmarks/rollout_engines_gpu.sh
# It makes .venv-gpu (pip install -e ".[vllm]": vllm 0.32.0 and its CUDA build of torch) and writes
# benchmarks/results/rollout_engines_gpu.json. Extra arguments go to benchmarks/rollout_engines.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[vllm]"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
LIT_ALIGN_CACHE=${LIT_ALIGN_CACHE:-/tmp/lit_align_bench} "$VENV/bin/python" benchmarks/rollout_engines.py \
  --qwen2-0.5b --device cuda --dtype bfloat16 --prompts 32 --G 8 --prompt-len 64 --max-new-tokens 256 \
  --repeats 3 --gpu-memory-utilization 0.3 --out benchmarks/results/rollout_engines_gpu.json "$@"
