"""Extra cost of AMFT's meta-step (look-ahead meta-gradient) against an ordinary AMFT update.

    python benchmarks/amft_cost.py                 # embedded model, 40 RL updates, K = 5, configs/amft.yaml's objective
    python benchmarks/amft_cost.py --meta-objective reward --lookahead sgd --meta-prompts 64   # the paper's
    python benchmarks/amft_cost.py --quick

Runs a real Lightning fit of AMFTModule on the embedded task and times every policy update from
batch start to batch end. Meta steps are the updates where the controller steps. Prints JSON:
mean seconds of ordinary RL updates and of meta updates, their ratio, and memory: the process's
peak resident memory before the first meta step and at the end, and the parameter-sized tensors a
meta step holds (g_SFT, g_RL, theta') computed from the model's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import lightning as L
    import torch

    from lit_align import AMFTModule, MixedDataModule
    from lit_align.controller import ScalarMu

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rl-steps", type=int, default=40)
    p.add_argument("--meta-interval", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--meta-prompts", type=int, default=256, help="held-out rows per meta step (configs/amft.yaml: 256)")
    p.add_argument(
        "--meta-objective",
        choices=["expert_nll", "reward"],
        default="expert_nll",
        help="model.meta_objective: NLL of the held-out verified answers (configs/amft.yaml), or "
        "held-out reward (G samples of each held-out prompt, the paper's)",
    )
    p.add_argument(
        "--lookahead",
        choices=["sgd", "optimizer"],
        default="optimizer",
        help="model.lookahead: the policy's AdamW step and its derivative (configs/amft.yaml), or the SGD formula",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.rl_steps, a.meta_interval, a.warmup, a.prompts, a.generations, a.meta_prompts = 6, 3, 1, 2, 2, 2
    torch.manual_seed(0)

    W, K = a.warmup, a.meta_interval
    times: dict[str, list[float]] = {"rl": [], "meta": []}
    rss: dict[str, int] = {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()
            self.step = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            t = self.step
            if t < W:
                return
            meta = (t - W + 1) % K == 0
            if meta and "before_meta" not in rss:
                rss["before_meta"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            times["meta" if meta else "rl"].append(time.perf_counter() - self.t0)

    model = AMFTModule(
        num_generations=a.generations,
        max_new_tokens=4,
        warmup_sft_steps=W,
        meta_interval=K,
        controller=ScalarMu(),
        controller_lr=30.0 if a.lookahead == "sgd" else 2.0,
        lookahead=a.lookahead,
        meta_objective=a.meta_objective,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0),  # configs/amft.yaml's
    )
    data = MixedDataModule(
        expert_batch_size=64,
        prompt_batch_size=a.prompts,
        meta_data="embedded",
        meta_response_column="answer",
        meta_batch_size=a.meta_prompts,
        val_data=None,
    )
    trainer = L.Trainer(
        max_steps=W + a.rl_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    trainer.fit(model, datamodule=data)
    n_params = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    rl, meta = statistics.mean(times["rl"]), statistics.mean(times["meta"])
    result = {
        "date": str(date.today()),
        "command": "python " + " ".join(["benchmarks/amft_cost.py", *sys.argv[1:]]),
        "params": n_params,
        "prompts_per_step": a.prompts,
        "num_generations": a.generations,
        "meta_prompts_per_meta_step": a.meta_prompts,
        "meta_objective": a.meta_objective,
        "lookahead": a.lookahead,
        "rl_updates": len(times["rl"]),
        "meta_updates": len(times["meta"]),
        "rl_update_s": round(rl, 4),
        "meta_update_s": round(meta, 4),
        "meta_over_rl": round(meta / rl, 2),
        "extra_tensors_mib": round(3 * n_params * 4 / 2**20, 2),
        "peak_rss_before_first_meta_mib": round(rss.get("before_meta", 0) / 1024, 1),
        "peak_rss_end_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
