"""Prefix-RFT's rollout batch through the vLLM engine (model.rollout_engine=vllm, the embedded checkpoint):

- the prefixed rows (the last prefix_rollouts of each prompt's G) start with the first L tokens of their
  prompt's demonstration, L the module's draw, and Rollout.prefix_mask marks exactly them; the other rows
  sample from the prompt alone;
- the engine continued from prompt + prefix: no engine log-prob at given positions, and the trainer's
  old_logp there (what the top-entropy share and the loss read) is the policy's;
- one update on that batch runs, the prefix tokens trained off-policy (train/off_policy_token_share).
"""

import pytest
import torch
from _vllm_helpers import KV_CACHE_BYTES

from lit_align import PrefixRFTModule
from lit_align.core.policy import Completions

G, T = 4, 5
PROMPTS, ANSWERS = ["12+34=", "57+28=", "1+2="], ["46", "85", "3"]


@pytest.fixture(scope="module")
def module(ckpt):
    module = PrefixRFTModule(
        model_name_or_path=ckpt,
        rollout_engine="vllm",
        vllm_kv_cache_memory_bytes=KV_CACHE_BYTES,
        num_generations=G,
        prefix_rollouts=3,
        prefix_start=0.3,  # l ~ U(0.3, 1): prefixes of 0, 1 and 2 tokens of the 3-token demonstrations
        max_new_tokens=T,
        entropy_share=0.5,
    )
    module.sampler.start(module.world, None)
    assert module.sampler.engine is not None
    yield module
    module.sampler.stop()


def _prompts(tok) -> dict:
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    demos = [tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id] for a in ANSWERS]
    D = max(map(len, demos))
    return {
        "prompt_ids": enc.input_ids,
        "prompt_mask": enc.attention_mask,
        "prompts": PROMPTS,
        "answers": ANSWERS,
        "demo_ids": torch.tensor([d + [tok.pad_token_id] * (D - len(d)) for d in demos]).unsqueeze(1),
        "demo_mask": torch.tensor([[1] * len(d) + [0] * (D - len(d)) for d in demos]).unsqueeze(1),
        "demonstrations": [[a] for a in ANSWERS],
    }


def test_prefixed_rows_start_with_the_demonstrations_prefix(module):
    prompts = _prompts(module.tokenizer)
    torch.manual_seed(4)
    lengths = module.prefix_lengths(prompts["demo_mask"][:, 0].sum(-1), 0)
    torch.manual_seed(4)
    batch = module.rollout_batch(prompts)
    r = batch["rollout"]
    assert r.sampler == "vllm"
    assert bool((lengths > 0).any()) and bool((lengths[torch.arange(len(lengths)) % G >= 1] == 0).any())
    for row, L in enumerate(lengths.tolist()):
        demo = prompts["demo_ids"][row // G, 0]
        assert r.completion_ids[row, :L].tolist() == demo[:L].tolist(), f"row {row}"
        assert int(r.prefix_mask[row].sum()) == L, f"row {row}"
        assert bool(r.off_policy[row]) == (L > 0)
        if row % G == 0:
            assert L == 0, "the first G - prefix_rollouts rows sample from the prompt alone"
    given = r.prefix_mask.bool()
    assert (r.sampler_logp[given] == 0).all(), "the engine sampled none of the given tokens"
    with torch.no_grad():
        s = module.policy.logprobs(Completions.of(r), torch.arange(len(lengths)), module.hparams.temperature)
    width = s.logp.shape[1]
    torch.testing.assert_close(r.old_logp[:, :width][given[:, :width]], s.logp[given[:, :width]].float())
    assert float(batch["metrics"]["prefix_token_share"]) > 0


def test_one_update_on_the_engines_batch(module):
    prompts = _prompts(module.tokenizer)
    torch.manual_seed(5)
    u = module.begin_update({"prompts": prompts})
    loss, metrics = module.run_loss(module.loss(u), u)
    assert torch.isfinite(loss)
    assert float(metrics["off_policy_token_share"]) > 0 and "sampler_logp_diff" in metrics
    assert float(metrics["sampler_logp_diff"]) < 1e-4
