"""``python train.py fit`` with ``--model.init_args.rollout_engine vllm``, as a user runs it:

(d) 3 updates of configs/chord_phi.yaml and configs/amft.yaml (RL from the first update) log the usual
    metrics plus train/sampler_logp_diff, which stays below 1e-4 (float32) at every update although each
    update moves the weights far more (lr 1e-2, no warm-up): the engine is synced after every step;
(e) a 2-process gloo DDP run (and an FSDP2 one, whose engines get the gathered shards) with one engine
    per rank finishes, each rank sampling with its own engine at every update, sampler and trainer
    log-probs within 1e-4, and the trainer's process group still works after the engines are shut down
    at fit end;
(f) LoRA with DoRA and a trained lm_head (modules_to_save) on a tied checkpoint: the engine samples with
    the merged policy (within 1e-4) and the export loads with the live policy's logits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _vllm_helpers import ROOT, PolicyLogits, fit_config

from lit_align.events import read_scalars

RL_FROM_THE_START = {
    "chord_phi": ["--model.init_args.sft_warmup_steps=0"],
    "amft": [
        "--model.init_args.warmup_sft_steps=0",
        "--model.init_args.meta_interval=2",
        "--data.init_args.meta_batch_size=8",
    ],
}
USUAL = {
    "train/loss",
    "train/mu",
    "train/reward_mean",
    "train/completion_length",
    "train/entropy",
    "train/grad_norm",
    "train/clip_ratio",
    "train/sft_loss",
    "train/rl_loss",
    "val/accuracy",
}


def fit(config: str, out, *extra: str):
    return fit_config(config, out, *RL_FROM_THE_START[config], *extra)


def _check(proc, out: Path, world: int) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "lit_align sampling: vllm sampler" in proc.stdout + proc.stderr
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for r in reports:
        assert r["world"] == world and r["step"] == 3
        assert r["engine_during_steps"] == [True] * 3, "every rank sampled with its own engine"
        assert not r["engine_after_fit"], "the engine is shut down when fit ends"
    scalars = read_scalars(out)
    assert USUAL <= set(scalars), USUAL - set(scalars)
    diff, worst = scalars["train/sampler_logp_diff"], scalars["train/sampler_logp_diff_max"]
    assert [s for s, _ in diff] == [0, 1, 2] and [s for s, _ in worst] == [0, 1, 2]
    assert all(v < 1e-4 for _, v in worst), worst
    return {"reports": reports, "scalars": scalars}


@pytest.mark.parametrize("config", ["chord_phi", "amft"])
def test_d_three_updates_of_a_recipe_with_the_vllm_engine(config, tmp_path):
    # chord_phi also runs TRL's truncated importance-sampling correction (logged as its ratio)
    extra = ["--model.init_args.vllm_importance_sampling_correction=true"] if config == "chord_phi" else []
    proc = fit(config, tmp_path, "--trainer.devices=1", *extra)
    scalars = _check(proc, tmp_path, world=1)["scalars"]
    assert all(v > 0 for _, v in scalars["train/grad_norm"]), "each update moved the weights the engine must follow"
    if config == "amft":
        assert "train/meta_grad" in scalars
    else:  # float32: sampler and trainer agree, so the weights are 1 up to rounding
        ratio = scalars["train/importance_sampling_ratio"]
        assert len(ratio) == 3 and all(abs(v - 1.0) < 1e-4 for _, v in ratio), ratio


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])  # fsdp2: the weights the engine gets are gathered shards
def test_e_two_gloo_ranks_one_engine_each_finish_and_tear_down(tmp_path, strategy):
    proc = fit("chord_phi", tmp_path, f"--trainer.strategy={strategy}", "--trainer.devices=2")
    result = _check(proc, tmp_path, world=2)
    assert [r["all_reduce_after_fit"] for r in result["reports"]] == [2.0, 2.0], "the trainer's group survived"


def test_f_dora_and_a_trained_lm_head_on_a_tied_checkpoint_reach_the_engine_and_the_export(tmp_path):
    """LoRA with DoRA and modules_to_save [lm_head] on the embedded checkpoint (tied embeddings): the engine,
    built untied, gets the merged weights at every sync (sampler and trainer log-probs within 1e-4 at every
    update), and hf_model/ loads with AutoModelForCausalLM with the trained policy's logits."""
    from transformers import AutoModelForCausalLM

    lora = "{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj], use_dora: true, modules_to_save: [lm_head]}"
    extra = [f"--model.init_args.lora={lora}", "--trainer.callbacks+=_vllm_helpers.PolicyLogits"]
    proc = fit("chord_phi", tmp_path, "--trainer.devices=1", *extra, f"--trainer.callbacks.out={tmp_path}")
    _check(proc, tmp_path, world=1)
    exported = AutoModelForCausalLM.from_pretrained(next(tmp_path.rglob("hf_model")))
    assert not exported.config.tie_word_embeddings, "the trained head is exported as a matrix of its own"
    ids = torch.tensor(PolicyLogits.IDS)
    with torch.no_grad():
        logits = exported(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    live = torch.tensor(json.loads((tmp_path / "logits.json").read_text()))
    torch.testing.assert_close(logits, live, atol=1e-5, rtol=0)


def test_rollout_benchmark_runs(tmp_path):
    """benchmarks/rollout_engines.py --quick: both samplers produce the same number of tokens (it asserts
    it) and the JSON holds a positive rate for each."""
    out = tmp_path / "rollout.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/rollout_engines.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert set(result["tokens_per_s"]) == {"hf", "vllm", "vllm+score"}
    assert all(v > 0 for v in result["tokens_per_s"].values()) and result["weight_sync_s"] > 0
