"""DAPO dynamic sampling with the vLLM engine: ``configs/grpo.yaml`` through ``python train.py fit`` with
``--model.init_args.rollout_engine vllm --model.init_args.dynamic_sampling true`` (3 updates at tiny sizes).

The reward (tests/_rewards.py: AnswerParityReward) gives every completion of a prompt with an even reference
answer the same score, so those groups carry no signal and must be dropped, while the odd ones spread. The
refill prompt batches are sampled by the same engine, synced after each update: every update's rollout batch
is the engine's, the groups it trains on all have unequal rewards (non-zero advantages), and the engine's
log-probs match the trainer's.
"""

import json

from _vllm_helpers import fit_config

from lit_align.events import read_scalars


def test_dynamic_sampling_refills_with_the_engine(tmp_path):
    proc = fit_config(
        "grpo",
        tmp_path,
        "--trainer.devices=1",
        "--data.init_args.retention_data=null",
        "--model.init_args.reward=_rewards.AnswerParityReward",
        "--model.init_args.dynamic_sampling=true",
        "--model.init_args.max_resample_batches=4",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "lit_align sampling: vllm sampler" in proc.stdout + proc.stderr
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["step"] == 3 and report["engine_during_steps"] == [True] * 3
    assert [r["sampler"] for r in report["rollouts"]] == ["vllm"] * 3
    s = read_scalars(tmp_path)
    for name in ("train/dynamic_sampling_dropped", "train/dynamic_sampling_batches", "train/dynamic_sampling_filled"):
        assert [step for step, _ in s[name]] == [0, 1, 2], name
    dropped = [v for _, v in s["train/dynamic_sampling_dropped"]]
    filled = [v for _, v in s["train/dynamic_sampling_filled"]]
    # the even-answer prompts' groups are dropped, and refills (engine samples) fill the batch
    assert any(v > 0 for v in dropped), dropped
    assert all(0 < v <= 1 for v in filled), filled
    assert any(v > 0 for _, v in s["train/dynamic_sampling_batches"]), s["train/dynamic_sampling_batches"]
    # the rollout statistics stay the training batch's as sampled (its even-answer groups tie) ...
    assert any(v > 0 for _, v in s["train/frac_reward_zero_std"]), s["train/frac_reward_zero_std"]
    # ... while the rollout batch trained on holds only groups with a signal
    assert [r["groups_without_signal"] for r in report["rollouts"]] == [0, 0, 0], report["rollouts"]
    assert all(v < 1e-4 for _, v in s["train/sampler_logp_diff_max"]), s["train/sampler_logp_diff_max"]
