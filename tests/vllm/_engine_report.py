"""A callback for the vLLM fit tests' subprocesses: what each rank saw, written to <out>/rank<r>.json."""
import json
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist


class EngineReport(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.samplers: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samplers.append(pl_module._engine is not None)

    def teardown(self, trainer, pl_module, stage) -> None:
        """After on_fit_end closed the engines: the trainer's process group must still work."""
        reduced = None
        if dist.is_available() and dist.is_initialized():
            t = torch.ones(1)
            dist.all_reduce(t)
            reduced = float(t.item())
        report = {"rank": trainer.global_rank, "world": trainer.world_size, "step": trainer.global_step,
                  "engine_during_steps": self.samplers, "engine_after_fit": pl_module._engine is not None,
                  "all_reduce_after_fit": reduced}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
