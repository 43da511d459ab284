"""Shared by the vLLM tests: the KV-cache bound of every engine they build, a small Qwen2 checkpoint,
``python train.py fit`` of a shipped config with the engine at a tiny size (:func:`fit_config`), and callbacks
for the fit tests' subprocesses that write what each rank saw to <out>/rank<r>.json."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from _qwen2 import qwen2_checkpoint  # noqa: F401  (the vLLM tests import it from here)

ROOT = Path(__file__).resolve().parents[2]

# every engine here holds a small, bounded KV cache (unbounded, vLLM's CPU engine takes most of the machine)
KV_CACHE_BYTES = 256 << 20

TINY = [
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
    "--data.init_args.expert_batch_size=4",
    "--data.init_args.prompt_batch_size=2",
    "--data.init_args.val_batch_size=4",
    "--model.init_args.num_generations=4",
    "--model.init_args.max_new_tokens=4",
    "--model.init_args.rollout_engine",
    "vllm",
    f"--model.init_args.vllm_kv_cache_memory_bytes={KV_CACHE_BYTES}",
    "--model.init_args.warmup_steps=0",
    "--model.init_args.optimizer.init_args.lr=0.01",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_config(config: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python train.py fit --config configs/<config>.yaml`` with the engine, 3 updates at TINY's sizes,
    ``extra`` flags after them, TensorBoard and :class:`EngineReport` writing to ``out``. tests/ and
    tests/with_vllm are on the subprocess's path (class paths of the test rewards and of the callback)."""
    env = {
        **os.environ,
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT / "tests"), str(ROOT)]),
    }
    args = [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        f"configs/{config}.yaml",
        *TINY,
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.callbacks+=_vllm_helpers.EngineReport",
        f"--trainer.callbacks.out={out}",
        *extra,
    ]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)


class EngineReport(L.Callback):
    """Per training step: whether the engine existed, and what the step's rollout batch held (its sampler,
    the members of each prompt's group the policy did not sample, and the mean |sampler - trainer| log-prob
    over the tokens the engine sampled, computed here from the rollout's own tensors)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.samplers: list[bool] = []
        self.rollouts: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samplers.append(pl_module.sampler.engine is not None)
        cycle = pl_module.rollout_buffer.cycle
        if cycle is None:
            return
        r = cycle["rollout"]
        n = len(r.completions)
        off = r.off_policy if r.off_policy is not None else torch.zeros(n, dtype=torch.bool)
        gid = r.group_ids if r.group_ids is not None else torch.arange(n) // pl_module.hparams.num_generations
        sampled = r.completion_mask.bool() & ~off.unsqueeze(-1)
        if r.prefix_mask is not None:
            sampled &= ~r.prefix_mask.bool()
        diff = (r.sampler_logp - r.old_logp).abs()[sampled] if r.sampler_logp is not None else None
        demos = batch["prompts"].get("demonstrations")
        self.rollouts.append(
            {
                "sampler": r.sampler,
                "rows": n,
                "groups": int(gid.max()) + 1,
                "off_policy_per_group": torch.bincount(gid[off], minlength=int(gid.max()) + 1).tolist(),
                # each off-policy row is its own prompt's demonstration, token for token
                "off_policy_rows_are_their_demonstrations": all(
                    r.completions[i] == demos[int(gid[i])][0] for i in torch.nonzero(off).flatten().tolist()
                )
                if demos is not None
                else None,
                "engine_logp_on_off_policy_rows": float(r.sampler_logp[off].abs().sum())
                if r.sampler_logp is not None
                else None,
                "sampled_logp_diff_mean": float(diff.mean()) if diff is not None and diff.numel() else None,
                # groups of the rollout batch trained on whose advantages are all 0 (equal rewards)
                "groups_without_signal": sum(
                    bool((cycle["advantages"][gid == g] == 0).all()) for g in gid.unique().tolist()
                ),
            }
        )

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
            "rollouts": self.rollouts,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class PolicyLogits(L.Callback):
    """At fit end (one process), writes the live policy's logits on fixed token ids to <out>/logits.json:
    what an exported model must reproduce."""

    IDS = [[1, 5, 6, 7, 8, 9, 10, 11], [3, 4, 12, 13, 14, 2, 5, 7]]

    def __init__(self, out: str):
        self.out = Path(out)

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module) -> None:
        ids = torch.tensor(self.IDS)
        logits = pl_module.policy.logits(ids, torch.ones_like(ids))
        (self.out / "logits.json").write_text(json.dumps(logits.float().tolist()))
