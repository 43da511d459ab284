"""Shared by the vLLM tests: the KV-cache bound of every engine they build, and a callback for the fit
tests' subprocesses that writes what each rank saw to <out>/rank<r>.json."""

import json
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

# every engine here holds a small, bounded KV cache (unbounded, vLLM's CPU engine takes most of the machine)
KV_CACHE_BYTES = 256 << 20


class EngineReport(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.samplers: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samplers.append(pl_module.sampler.engine is not None)

    def teardown(self, trainer, pl_module, stage) -> None:
        """After on_fit_end closed the engines: the trainer's process group must still work."""
        reduced = None
        if dist.is_available() and dist.is_initialized():
            t = torch.ones(1)
            dist.all_reduce(t)
            reduced = float(t.item())
        report = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "step": trainer.global_step,
            "engine_during_steps": self.samplers,
            "engine_after_fit": pl_module.sampler.engine is not None,
            "all_reduce_after_fit": reduced,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
