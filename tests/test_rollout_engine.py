"""model.rollout_engine without vLLM itself (the engine's own tests run in .venv-vllm, tests/with_vllm):
the knobs are checked when the module is built, with messages naming them; a vLLM rollout's
train/sampler_logp_diff and TRL's truncated importance-sampling weights are what they say, by hand;
the weights scale the RL term and nothing else; a rollout batch split into mini-batches keeps them."""

import importlib.util

import pytest
import torch
from _rollouts import mixed_length_rollout

from lit_align.modules.grpo import GRPOModule
from lit_align.rollout import Rollout


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rollout_engine", "sglang", "model.rollout_engine='sglang': choose one of"),
        ("vllm_gpu_memory_utilization", 1.5, "model.vllm_gpu_memory_utilization=1.5 is out of range"),
        ("vllm_kv_cache_memory_bytes", 1024, "model.vllm_kv_cache_memory_bytes=1024 is out of range"),
        ("vllm_max_model_length", 0, "model.vllm_max_model_length=0 is out of range"),
        ("vllm_tensor_parallel_size", 2, "model.vllm_tensor_parallel_size=2 is out of range: it must be 1"),
        ("vllm_importance_sampling_cap", 0.5, "model.vllm_importance_sampling_cap=0.5 is out of range"),
    ],
)
def test_bad_engine_settings_name_the_flag(ckpt, field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GRPOModule(model_name_or_path=ckpt, **{field: value})


@pytest.mark.skipif(getattr(importlib.util.find_spec("vllm"), "origin", None) is not None, reason="vLLM is installed")
def test_the_vllm_engine_without_vllm_says_how_to_install_it(ckpt):
    with pytest.raises(ImportError, match=r"model.rollout_engine=vllm needs vLLM.*lit-align\[vllm\].*make setup-vllm"):
        GRPOModule(model_name_or_path=ckpt, rollout_engine="vllm")


def _vllm_rollout(module, shift: torch.Tensor) -> Rollout:
    """A rollout as the vLLM path builds it: sampler_logp = old_logp + shift (on completion tokens)."""
    r = mixed_length_rollout(len(module.tokenizer), module.tokenizer.pad_token_id)
    r.old_logp = r.old_logp.float()
    r.sampler, r.sampler_logp = "vllm", (r.old_logp + shift) * r.completion_mask
    return r


def test_sampler_logp_diff_and_importance_weights_by_hand(ckpt):
    module = GRPOModule(
        model_name_or_path=ckpt, vllm_importance_sampling_correction=True, vllm_importance_sampling_cap=2.0
    )
    hf = mixed_length_rollout(len(module.tokenizer), module.tokenizer.pad_token_id)
    assert module.sampler.metrics(hf) == {}, "the HF path logs no sampler difference"
    shift = torch.zeros_like(hf.old_logp, dtype=torch.float32)
    shift[0, 0], shift[3, 2], shift[7, 6] = 0.5, -1.0, 2.0  # rows 0, 3, 7 have 9, 9, 7 completion tokens
    shift[1, 5] = 9.0  # after row 1's only token: padding, not counted
    r = _vllm_rollout(module, shift)
    m = module.sampler.metrics(r)
    tokens = int(r.completion_mask.sum())
    assert float(m["sampler_logp_diff"]) == pytest.approx(3.5 / tokens, rel=1e-5)
    assert float(m["sampler_logp_diff_max"]) == pytest.approx(2.0, rel=1e-6)
    rows = torch.tensor([0, 3, 7])
    w = module.sampler.importance_weights(r, rows, 9)
    expected = torch.ones(3, 9)
    expected[0, 0], expected[1, 2], expected[2, 6] = torch.exp(torch.tensor(-0.5)), 2.0, torch.exp(torch.tensor(-2.0))
    torch.testing.assert_close(
        w * r.completion_mask[rows, :9], expected * r.completion_mask[rows, :9]
    )  # exp(1) capped at 2
    module.hparams.vllm_importance_sampling_correction = False
    assert module.sampler.importance_weights(r, rows, 9) is None


def test_a_groups_demonstration_is_not_counted_as_the_engines_tokens(ckpt):
    """LUFFY's and SRFT's groups (and HPT's soft ones) mix a vLLM rollout with each prompt's demonstration,
    which the engine never sampled (no engine log-prob) and whose behaviour log-probs may be given
    (LUFFY's behaviour_logprobs=given): train/sampler_logp_diff(_max) average the engine's tokens only,
    and the importance-sampling weights of the demonstration's tokens are 1. A Prefix-RFT row (off-policy, with
    given tokens) keeps its sampled continuation in both."""
    from lit_align.core import groups
    from lit_align.modules.luffy import given_logprobs

    module = GRPOModule(model_name_or_path=ckpt, vllm_importance_sampling_correction=True)
    shift = torch.zeros(8, 9)
    shift[0, 0], shift[3, 2] = 0.5, -1.0
    sampled = _vllm_rollout(module, shift)  # 2 prompts x 4 engine samples
    # row 3 continues 2 given tokens, off-policy as Prefix-RFT marks it: its continuation is the engine's
    sampled.prefix_mask = torch.zeros_like(sampled.completion_mask)
    sampled.prefix_mask[3, :2] = 1
    sampled.off_policy = sampled.prefix_mask.any(-1)
    D = 5
    prompts = {
        "prompt_ids": sampled.prompt_ids[::4],
        "prompt_mask": sampled.prompt_mask[::4],
        "demo_ids": torch.randint(3, len(module.tokenizer), (2, 1, D)),
        "demo_mask": torch.ones(2, 1, D, dtype=torch.long),
        "demo_logp": torch.full((2, 1, D), -1.5),
        "demonstrations": [["first"], ["second"]],
    }
    demos = groups.demonstration_rows(prompts, 1)
    demos.old_logp = given_logprobs(prompts, 1, demos)
    mixed = groups.mix(sampled, 4, demos)
    demo = groups.off_policy(mixed) & ~mixed.prefix_mask.bool().any(-1)
    assert int(demo.sum()) == 2 and float(mixed.sampler_logp[demo].abs().sum()) == 0
    m = module.sampler.metrics(mixed)
    engine_tokens = int(sampled.completion_mask.sum()) - 2
    assert float(m["sampler_logp_diff"]) == pytest.approx(1.5 / engine_tokens, rel=1e-5)
    assert float(m["sampler_logp_diff_max"]) == pytest.approx(1.0, rel=1e-6)
    rows = torch.arange(len(mixed.completions))
    w = module.sampler.importance_weights(mixed, rows, mixed.completion_ids.shape[1])
    drawn = mixed.completion_mask.bool() & ~mixed.prefix_mask.bool() & ~demo.unsqueeze(-1)
    assert bool((w[~drawn] == 1).all()), "no correction on tokens the engine did not sample"
    torch.testing.assert_close(w[drawn], torch.exp(mixed.old_logp[drawn] - mixed.sampler_logp[drawn]).clamp(max=3.0))


def test_importance_weights_scale_the_rl_term(ckpt):
    module = GRPOModule(
        model_name_or_path=ckpt, vllm_importance_sampling_correction=True, loss_aggregation="token-mean"
    )
    r = _vllm_rollout(module, torch.tensor(-0.5))  # sampler log-probs 0.5 below the trainer's: weight e^0.5
    adv = torch.linspace(-1.0, 1.0, len(r.completions))
    corrected, metrics = module.run_terms([module.rl_term(r, adv, 1.0)], grad=False)
    assert float(metrics["importance_sampling_ratio"]) == pytest.approx(float(torch.exp(torch.tensor(0.5))), rel=1e-5)
    module.hparams.vllm_importance_sampling_correction = False
    plain, metrics = module.run_terms([module.rl_term(r, adv, 1.0)], grad=False)
    assert "importance_sampling_ratio" not in metrics
    assert float(corrected) == pytest.approx(float(torch.exp(torch.tensor(0.5))) * float(plain), rel=1e-4)


def test_minibatches_of_a_vllm_rollout_keep_the_sampler_logprobs(ckpt):
    module = GRPOModule(model_name_or_path=ckpt, steps_per_generation=2)
    r = _vllm_rollout(module, torch.tensor(-0.25))
    cycle = {"rollout": r, "advantages": torch.zeros(len(r.completions)), "mask": r.completion_mask}
    part = module.rollout_buffer.rollout_rows(cycle, 1)["rollout"]
    rows = module.rollout_buffer.minibatch(len(r.completions), 1)
    assert part.sampler == "vllm" and torch.equal(part.sampler_logp, r.sampler_logp[rows])
    module.rollout_buffer.cycle = {**cycle, "rewards": torch.zeros(8), "reward_mean": 0.0, "metrics": {}}
    state = module.rollout_buffer.state_dict()
    module.rollout_buffer.load_state_dict(state)
    assert module.rollout_buffer.cycle["rollout"].sampler == "vllm" and torch.equal(
        module.rollout_buffer.cycle["rollout"].sampler_logp, r.sampler_logp
    )
