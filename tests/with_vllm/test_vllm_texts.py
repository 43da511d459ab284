"""Both samplers hand rewards the same text for the same completion tokens (issue 22, item 1: with
``rollout_engine: vllm``, ``skip_special_tokens: false`` was ignored and a sampled special token never
reached the rewards, as in ms-swift #4771 and verl #1724).

The checkpoint is the embedded one with an added special token ``<answer>`` whose (tied) embedding is
1.05 x that of ``=``: wherever the model would say ``=`` with a positive logit it says ``<answer>``
instead, so greedy and sampled completions hold it beside ordinary tokens. One engine for the module:

- sampled training rollouts: the engine's completions, then the HF path forced to the same tokens (the
  engine's completions given as its prefixes): same ids, same texts, with skip_special_tokens true and
  false, the special token kept only with false;
- validation's greedy answers (HeldOut.greedy_verdicts, what val/reward scores): the same rewards from
  the engine and from the HF path, with a reward that looks for the tag.
"""

import shutil

import pytest
import torch
from _vllm_helpers import KV_CACHE_BYTES

from lit_align.modules.grpo import GRPOModule

PROMPTS = ["12+34=", "1+2=", "57+28=", "4+4=", "99+1=", "3+75="]
TAG = "<answer>"


def answer_tag(completions, **kwargs):
    """A TRL-style reward that checks a tag token."""
    return [float(TAG in c) for c in completions]


@pytest.fixture(scope="module")
def module(ckpt, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("answer_ckpt")
    shutil.copytree(ckpt, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": [TAG]})
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():  # tied: the output row too, so <answer> outscores "=" wherever "=" scores > 0
        emb = model.get_input_embeddings().weight
        emb[tok.convert_tokens_to_ids(TAG)] = 1.05 * emb[tok.convert_tokens_to_ids("=")]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    m = GRPOModule(
        model_name_or_path=str(path),
        rollout_engine="vllm",
        vllm_kv_cache_memory_bytes=KV_CACHE_BYTES,
        num_generations=4,
        max_new_tokens=8,
        reward=[answer_tag],
    )
    m.sampler.start(m.world, None)
    assert m.sampler.engine is not None
    yield m
    m.sampler.stop()


def _prompts(module) -> dict:
    enc = module.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    return {
        "prompt_ids": enc.input_ids,
        "prompt_mask": enc.attention_mask,
        "prompts": PROMPTS,
        "answers": [""] * len(PROMPTS),
        "columns": {},
    }


def _hf(module, fn):
    """``fn()`` with this rank's engine out of the way: the HF sampler samples."""
    engine, module.sampler.engine = module.sampler.engine, None
    try:
        return fn()
    finally:
        module.sampler.engine = engine


@pytest.mark.parametrize("skip", [True, False])
def test_sampled_rollouts_give_the_rewards_the_hf_paths_text(module, skip):
    module.hparams.skip_special_tokens = skip
    tag_id = module.tokenizer.convert_tokens_to_ids(TAG)
    prompts = _prompts(module)
    torch.manual_seed(0)
    engine = module.sample(prompts)
    hf = _hf(
        module, lambda: module.sample(prompts, prefix_ids=engine.completion_ids, prefix_mask=engine.completion_mask)
    )
    assert engine.sampler == "vllm" and hf.sampler == "decode"
    assert hf.completion_ids.tolist() == engine.completion_ids.tolist(), "the HF path holds the engine's tokens"
    assert torch.equal(hf.completion_mask, engine.completion_mask)
    tagged = [tag_id in ids[: int(n)] for ids, n in zip(engine.completion_ids.tolist(), engine.completion_mask.sum(-1))]
    assert 0 < sum(tagged) < len(tagged), "some completions sampled the special token, some did not"
    assert engine.completions == hf.completions
    assert [TAG in t for t in engine.completions] == ([False] * len(tagged) if skip else tagged)
    assert any(t.replace(TAG, "") for t in engine.completions), "ordinary tokens are in the texts too"


def test_validation_greedy_answers_score_the_same_on_both_samplers(module):
    module.hparams.skip_special_tokens = False
    batch = _prompts(module)
    engine_scores, engine_correct = module.heldout.greedy_verdicts(batch, module.world)
    hf_scores, hf_correct = _hf(module, lambda: module.heldout.greedy_verdicts(batch, module.world))
    assert 0 < float(hf_scores.total.sum()) < len(PROMPTS), "some greedy answers hold the tag, some do not"
    assert engine_scores.total.tolist() == hf_scores.total.tolist()
    assert engine_correct.tolist() == hf_correct.tolist()
