"""Prefix rollouts on the vLLM engine (VLLMEngine.generate's prefix_ids / prefix_mask), on the embedded
checkpoint (float32, one engine for the module):

- each completion starts with its row's given prefix (cut to max_new_tokens, ended by its own EOS), then
  the engine's continuation, whose log-probs equal an independent HF forward over prompt + prefix +
  continuation (so the engine continued from prompt + prefix); log-probs are 0 at prefix positions;
- no prefixes, or only empty ones, send exactly the requests of a call without them (same samples);
- greedy with prefixes equals lit-align's HF decode loop with the same prefixes, token for token.
"""

import pytest
import torch
from _vllm_helpers import KV_CACHE_BYTES

from lit_align.hf import load_model, load_tokenizer
from lit_align.losses import token_logprobs
from lit_align.rollout import completion_mask, generate, position_ids_from_mask, prefix_positions, sampling_settings

PROMPTS = ["12+34=", "1+2=", "57+28=", "4+4="]
G, T, TEMPERATURE = 4, 8, 0.7
# the prefix length of each of the 16 rows (None: no prefix); row 6's holds an EOS at index 1, row 9's is
# longer than T (cut), and rows 12-15 share one prefix (one request with n = 4)
PREFIX_LENGTHS = [None, 3, None, 1, 2, 2, 4, None, 5, T + 2, None, 1, 3, 3, 3, 3]
EOS_ROWS = {6: 1}


@pytest.fixture(scope="module")
def setup(ckpt):
    from lit_align.vllm_engine import VLLMEngine

    tok, model = load_tokenizer(ckpt), load_model(ckpt).eval()
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    L = max(n or 0 for n in PREFIX_LENGTHS)
    prefix_ids = torch.full((len(PREFIX_LENGTHS), L), -100, dtype=torch.long)
    for r, n in enumerate(PREFIX_LENGTHS):
        if n:
            prefix_ids[r, :n] = torch.randint(3, len(tok), (n,), generator=g)
    prefix_ids[4, :2] = prefix_ids[5, :2]  # rows 4 and 5 (prompt 1) share a prefix
    prefix_ids[13:16] = prefix_ids[12]  # so do rows 12-15 (prompt 3)
    for r, k in EOS_ROWS.items():
        prefix_ids[r, k] = tok.eos_token_id
    prefix_mask = (prefix_ids != -100).long()
    engine = VLLMEngine(ckpt, kv_cache_memory_bytes=KV_CACHE_BYTES)
    yield tok, model, enc, prefix_ids, prefix_mask, engine
    engine.close()


def _expected_start(row: int, prefix_ids) -> list[int]:
    n = EOS_ROWS[row] + 1 if row in EOS_ROWS else min(PREFIX_LENGTHS[row] or 0, T)
    return prefix_ids[row, :n].tolist()


def test_completions_start_with_their_prefix_and_continue_from_it(setup):
    tok, model, enc, prefix_ids, prefix_mask, engine = setup
    settings = sampling_settings(model, tok, T, temperature=TEMPERATURE)
    ids, mask, logp = engine.generate(
        enc.input_ids, enc.attention_mask, settings, G, seed=3, prefix_ids=prefix_ids, prefix_mask=prefix_mask
    )
    assert ids.shape == (len(PROMPTS) * G, T) and torch.equal(mask, completion_mask(ids, tok.eos_token_id) * mask)
    lengths = mask.sum(-1).tolist()
    for row in range(len(PREFIX_LENGTHS)):
        start = _expected_start(row, prefix_ids)
        assert ids[row, : len(start)].tolist() == start, f"row {row}"
        assert lengths[row] >= len(start)
    assert lengths[6] == 2, "an EOS in the prefix ends the completion"
    assert ids[9].tolist() == prefix_ids[9, :T].tolist() and lengths[9] == T, "a prefix beyond T is cut to it"
    assert len({tuple(ids[r].tolist()) for r in range(12, 16)}) > 1, "rows sharing a prefix still differ"
    given = prefix_positions(prefix_mask, mask)
    expected = torch.zeros_like(mask)
    for row in range(len(PREFIX_LENGTHS)):
        expected[row, : len(_expected_start(row, prefix_ids))] = 1
    assert given.tolist() == expected.tolist()
    assert (logp[given.bool()] == 0).all(), "no engine log-prob at given positions"
    # the continuation's log-probs are the policy's given prompt + prefix: an independent HF forward
    prompt_ids = enc.input_ids.repeat_interleave(G, 0)
    full_mask = torch.cat([enc.attention_mask.repeat_interleave(G, 0), mask], 1)
    with torch.no_grad():
        logits = model(
            input_ids=torch.cat([prompt_ids, ids], 1),
            attention_mask=full_mask,
            position_ids=position_ids_from_mask(full_mask),
        ).logits[:, prompt_ids.shape[1] - 1 : -1]
    fresh = token_logprobs(logits, ids, TEMPERATURE)
    sampled = mask.bool() & ~given.bool()
    assert sampled.sum() > 10
    assert float((logp - fresh).abs()[sampled].max()) < 1e-4


def test_no_or_empty_prefixes_send_the_requests_of_a_call_without_them(setup):
    tok, model, enc, prefix_ids, _, engine = setup
    settings = sampling_settings(model, tok, T, temperature=TEMPERATURE)
    plain = engine.generate(enc.input_ids, enc.attention_mask, settings, G, seed=5)
    empty = engine.generate(
        enc.input_ids, enc.attention_mask, settings, G, seed=5, prefix_ids=prefix_ids, prefix_mask=0 * prefix_ids
    )
    for a, b in zip(plain, empty):
        assert torch.equal(a, b)


def test_greedy_with_prefixes_equals_the_hf_decode_loop(setup):
    tok, model, enc, prefix_ids, prefix_mask, engine = setup
    rows = [1, 4, 6, 9]  # one prefix per prompt (greedy: one row each), the EOS and the cut one included
    p_ids, p_mask = prefix_ids[rows], prefix_mask[rows]
    settings = sampling_settings(model, tok, T, greedy=True)
    ids, mask, _ = engine.generate(enc.input_ids, enc.attention_mask, settings, 1, prefix_ids=p_ids, prefix_mask=p_mask)
    hf = generate(
        model,
        tok,
        enc.input_ids,
        enc.attention_mask,
        greedy=True,
        max_new_tokens=T,
        prefix_ids=p_ids,
        prefix_mask=p_mask,
    )
    assert hf.sampler == "decode"
    assert ids.tolist() == hf.completion_ids.tolist() and torch.equal(mask, hf.completion_mask)
