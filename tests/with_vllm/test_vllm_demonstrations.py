"""LUFFY, SRFT and HPT through ``python train.py fit`` with ``--model.init_args.rollout_engine vllm`` (the
shipped embedded-task configs, 3 updates at tiny sizes, lr 1e-2 so each update moves the weights):

- every update samples with the engine, and the engine is synced after each: train/sampler_logp_diff_max
  stays below 1e-4 (float32), and train/sampler_logp_diff is the mean over the tokens the engine sampled
  (a group's demonstration was not sampled by it: its tokens are not in the mean);
- LUFFY / SRFT: each prompt's group holds G - 1 engine samples and the prompt's own demonstration, with no
  engine log-prob; the demonstration metrics (train/off_policy_token_share, train/expert_advantage_mean,
  SRFT's train/srft_w_sft and train/srft_w_rl) are logged and finite at every update;
- HPT: the gate reads the verdicts of the engine's samples; with a reward that the embedded checkpoint
  earns on some prompts and not others, one run routes some prompts to SFT on their demonstration and
  trains the others with GRPO (train/gate_sft_share, train/sft_loss and train/rl_loss logged).
"""

import json
import math

import pytest
from _vllm_helpers import fit_config

from lit_align.events import read_scalars

G = 4  # TINY's num_generations
METHOD = {
    "luffy": ["train/off_policy_token_share", "train/expert_advantage_mean", "train/expert_reward_mean"],
    "srft": ["train/off_policy_token_share", "train/expert_advantage_mean", "train/srft_w_sft", "train/srft_w_rl"],
    "hpt": ["train/gate_sft_share", "train/sft_loss"],
}
EXTRA = {
    "luffy": [],
    "srft": [],
    # 1 for a completion as long as the answer: some prompts earn it, others not (a mixed gate)
    "hpt": ["--model.init_args.reward=_rewards.LengthMatchReward"],
}


@pytest.mark.parametrize("config", ["luffy", "srft", "hpt"])
def test_three_updates_with_the_vllm_engine(config, tmp_path):
    proc = fit_config(config, tmp_path, "--trainer.devices=1", "--data.init_args.retention_data=null", *EXTRA[config])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "lit_align sampling: vllm sampler" in proc.stdout + proc.stderr
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["step"] == 3 and report["engine_during_steps"] == [True] * 3
    assert not report["engine_after_fit"], "the engine is shut down when fit ends"
    scalars = read_scalars(tmp_path)

    for name in ["train/loss", "train/grad_norm", "train/sampler_logp_diff_max", *METHOD[config]]:
        assert [s for s, _ in scalars[name]] == [0, 1, 2], name
        assert all(math.isfinite(v) for _, v in scalars[name]), (name, scalars[name])
    assert all(v < 1e-4 for _, v in scalars["train/sampler_logp_diff_max"]), scalars["train/sampler_logp_diff_max"]
    moved = [v > 0 for _, v in scalars["train/grad_norm"]][:2]
    assert any(moved), "an update before the last moved the weights the engine must follow"

    rollouts = report["rollouts"]
    assert len(rollouts) == 3
    for step, r in enumerate(rollouts):
        assert r["sampler"] == "vllm"
        # the logged mean covers exactly the engine's tokens
        assert scalars["train/sampler_logp_diff"][step][1] == pytest.approx(r["sampled_logp_diff_mean"], rel=1e-5)
        if config in ("luffy", "srft"):  # G - 1 engine samples and the prompt's demonstration per group
            assert r["rows"] == r["groups"] * G and r["off_policy_per_group"] == [1] * r["groups"], r
            assert r["off_policy_rows_are_their_demonstrations"] and r["engine_logp_on_off_policy_rows"] == 0
        else:  # switch: the groups are the engine's G samples; routed prompts train their demonstration
            assert r["rows"] == r["groups"] * G and r["off_policy_per_group"] == [0] * r["groups"], r

    if config in ("luffy", "srft"):
        assert all(0 < v < 1 for _, v in scalars["train/off_policy_token_share"])
    if config == "srft":
        for (_, H), (_, w_sft), (_, w_rl) in zip(
            scalars["train/srft_entropy"], scalars["train/srft_w_sft"], scalars["train/srft_w_rl"]
        ):
            assert w_sft == pytest.approx(0.5 * math.exp(-H), rel=1e-5) and w_rl == pytest.approx(0.1 * math.exp(H))
    if config == "hpt":
        shares = [v for _, v in scalars["train/gate_sft_share"]]
        assert all(0 <= v <= 1 for v in shares)
        assert any(0 < v < 1 for v in shares), f"no update mixed SFT-routed and GRPO prompts: {shares}"
        assert "train/rl_loss" in scalars
