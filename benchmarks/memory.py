"""Peak memory per rank: DDP against the sharded strategy (FSDP2), 2 CPU processes.

    python benchmarks/memory.py [--hidden 512 --layers 6 --steps 2 --out memory.json]

Builds a Llama of about 25M parameters (the embedded tokenizer, hidden 512, 6 layers), trains it
with SFTModule for a few AdamW steps under ``--trainer.strategy=ddp`` and then ``fsdp2`` (2 ranks,
gloo), and reports for every rank, measured after the last step:

- ``param_bytes``, ``grad_bytes``, ``optimizer_bytes``: what this rank holds (its local shards
  under FSDP2), counted tensor by tensor;
- ``param_and_optimizer_bytes``: the sum of those two, the number sharding is meant to halve;
- ``rss_mb``: the process's resident memory then (after ``malloc_trim``, so freed heap is not
  counted); ``peak_rss_mb``: its peak over the run. Both
  include the interpreter, torch and transformers (about 0.6 GB here), and the peak includes the
  whole model as loaded by ``from_pretrained`` on every rank before sharding.

Prints one JSON object; ``fsdp2_over_ddp`` is the ratio of param+optimizer bytes per rank.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(args) -> None:
    """One rank (Lightning's launcher starts rank 1 by re-running this command)."""
    import lightning as L
    import torch

    import lit_align.strategies  # noqa: F401  registers fsdp2
    from lit_align.data.datamodule import MixedDataModule
    from lit_align.modules.sft import SFTModule

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != args.steps:
                return
            params = list(pl_module.model.parameters())
            opt = trainer.optimizers[0]
            state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
            gc.collect()
            try:  # hand freed heap back to the OS (glibc), so RSS shows live memory
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            report = {
                "rank": trainer.global_rank,
                "param_bytes": sum(_local_bytes(p) for p in params),
                "grad_bytes": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
                "optimizer_bytes": sum(_local_bytes(v) for v in state),
                "rss_mb": int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "model_params": sum(p.numel() for p in params),
            }
            report["param_and_optimizer_bytes"] = report["param_bytes"] + report["optimizer_bytes"]
            Path(args.out_dir, f"{args.strategy}-rank{trainer.global_rank}.json").write_text(json.dumps(report))

    L.seed_everything(0)
    module = SFTModule(model_name_or_path=args.ckpt, max_new_tokens=4)
    data = MixedDataModule(
        model_name_or_path=args.ckpt,
        expert_data="embedded",
        prompt_data=None,
        val_data=None,
        expert_batch_size=args.batch_size,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=args.strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Probe()],
    )
    trainer.fit(module, datamodule=data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp2"])
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from lit_align.data.embedded import build_checkpoint

    with tempfile.TemporaryDirectory(prefix="lit_align_memory-") as tmp:
        ckpt = build_checkpoint(
            Path(tmp) / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads
        )
        result: dict = {"ranks": 2, "device": "cpu (gloo)", "steps": args.steps, "optimizer": "AdamW"}
        for strategy in args.strategies:
            env = {**os.environ, "MASTER_PORT": str(free_port()), "TOKENIZERS_PARALLELISM": "false"}
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--strategy",
                strategy,
                "--ckpt",
                str(ckpt),
                "--out-dir",
                tmp,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
            ]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{strategy} failed:\n{proc.stderr[-4000:]}")
            ranks = [json.loads((Path(tmp) / f"{strategy}-rank{r}.json").read_text()) for r in range(2)]
            result["model_params"] = ranks[0]["model_params"]
            result[strategy] = {"per_rank": ranks}
        if "ddp" in result and "fsdp2" in result:
            mean = lambda s, k: sum(r[k] for r in result[s]["per_rank"]) / 2  # noqa: E731
            result["fsdp2_over_ddp"] = {
                k: round(mean("fsdp2", k) / mean("ddp", k), 3)
                for k in (
                    "param_and_optimizer_bytes",
                    "param_bytes",
                    "optimizer_bytes",
                    "grad_bytes",
                    "rss_mb",
                    "peak_rss_mb",
                )
            }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
