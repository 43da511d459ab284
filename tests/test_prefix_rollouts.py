"""Prefix rollouts (lit_align.rollout.generate's prefix_ids / prefix_mask), on both HF sampling paths (the
KV-cache decode loop and HF generate + a scoring forward), in chunks that cut prompts' rows apart:

- each completion starts with its row's given prefix, then the policy's samples; rows without a prefix
  sample freely, and passing no prefix (or only empty ones) changes nothing, random draws included;
- an EOS inside the prefix ends the completion there; a prefix longer than max_new_tokens is cut to it;
- old_logp and entropy at prefix positions equal an independent float64 forward's (as at sampled ones);
- Rollout.prefix_mask marks exactly the given positions that are part of the completion.
"""

import copy

import pytest
import torch

from lit_align.hf import load_model, load_tokenizer
from lit_align.losses import entropy_from_logits, token_logprobs
from lit_align.rollout import completion_mask, decode, generate, position_ids_from_mask, sampling_settings

PROMPTS = ["12+34=", "1+2=", "57+28=", "4+4="]
G, T, TEMPERATURE = 4, 10, 0.8
SAMPLERS = {"decode": True, "hf-generate": False}  # sampler -> generate's drop_finished
EOS_AT = 2  # where the EOS sits in PREFIX_LENGTHS' EOS rows (see _prefixes)
# the prefix length of each of the B * G = 16 rows; None: no prefix. Rows 4 and 10 hold an EOS (_prefixes),
# row 5's and row 11's reach max_new_tokens (13 > T: cut; exactly T).
PREFIX_LENGTHS = [None, 3, None, 1, 5, T + 3, 2, None, 4, None, 2, T, None, 6, 1, None]
EOS_ROWS = {4: EOS_AT, 10: 0}  # row -> index of the EOS in its prefix


def _prefixes(vocab: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prefixes of PREFIX_LENGTHS: random digits-and-symbols (no pad, EOS or unk), an EOS
    at EOS_ROWS' positions; the padding columns hold -100 (a label-style pad), which must be ignored."""
    g = torch.Generator().manual_seed(0)
    L = max(n or 0 for n in PREFIX_LENGTHS)
    ids = torch.full((len(PREFIX_LENGTHS), L), -100, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(PREFIX_LENGTHS):
        if n:
            ids[r, :n] = torch.randint(3, vocab, (n,), generator=g)
            mask[r, :n] = 1
    for r, k in EOS_ROWS.items():
        ids[r, k] = eos
    return ids, mask


@pytest.fixture(scope="module")
def setup(ckpt):
    tok, model = load_tokenizer(ckpt), load_model(ckpt).eval()
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    prefix_ids, prefix_mask = _prefixes(len(tok), tok.eos_token_id)
    return tok, model, enc, prefix_ids, prefix_mask


def _generate(setup, drop_finished: bool, seed: int = 0, **kwargs):
    tok, model, enc, _, _ = setup
    torch.manual_seed(seed)
    return generate(
        model,
        tok,
        enc.input_ids,
        enc.attention_mask,
        num_generations=G,
        max_new_tokens=T,
        temperature=TEMPERATURE,
        top_k=3,  # the given token may lie outside the top 3: it is taken all the same
        generation_batch_size=6,  # chunks of 6 rows: prompts' rows straddle chunks, and so do the prefixes
        drop_finished=drop_finished,
        **kwargs,
    )


@pytest.fixture(scope="module", params=list(SAMPLERS))
def prefixed(request, setup):
    """(sampler, rollout with PREFIX_LENGTHS' prefixes) on each HF sampling path."""
    _, _, _, prefix_ids, prefix_mask = setup
    r = _generate(setup, SAMPLERS[request.param], prefix_ids=prefix_ids, prefix_mask=prefix_mask)
    assert r.sampler == request.param
    return request.param, r


def _expected_completion_start(row: int, prefix_ids) -> list[int]:
    """The tokens row ``row``'s completion must start with: its prefix, cut at T and after its EOS."""
    n = PREFIX_LENGTHS[row] or 0
    if row in EOS_ROWS:
        n = EOS_ROWS[row] + 1
    return prefix_ids[row, : min(n, T)].tolist()


def test_each_completion_starts_with_its_prefix(setup, prefixed):
    tok, _, _, prefix_ids, _ = setup
    _, r = prefixed
    lengths = r.completion_mask.sum(-1).tolist()
    for row in range(len(PREFIX_LENGTHS)):
        start = _expected_completion_start(row, prefix_ids)
        assert r.completion_ids[row, : len(start)].tolist() == start, f"row {row}"
        assert lengths[row] >= len(start), f"row {row}: the completion holds its whole (cut) prefix"
    # the whole completion (prefix + continuation) is what completion_mask and the texts cover
    assert torch.equal(r.completion_mask, completion_mask(r.completion_ids, tok.eos_token_id))
    for text, ids, m in zip(r.completions, r.completion_ids, r.completion_mask):
        assert text == tok.decode(ids[m.bool()], skip_special_tokens=True)
    free = [row for row, n in enumerate(PREFIX_LENGTHS) if n is None or n < T]
    assert any(lengths[row] > len(_expected_completion_start(row, prefix_ids)) for row in free), "sampled after"


def test_an_eos_in_the_prefix_ends_the_completion(setup, prefixed):
    tok, _, _, prefix_ids, _ = setup
    _, r = prefixed
    for row, k in EOS_ROWS.items():
        assert int(r.completion_mask[row].sum()) == k + 1, f"row {row}: prefix up to and including its EOS"
        assert r.completion_ids[row, k] == tok.eos_token_id
        assert (r.completion_ids[row, k + 1 :] == tok.pad_token_id).all(), "nothing after the EOS"
        assert (r.old_logp[row, k + 1 :] == 0).all() and (r.entropy[row, k + 1 :] == 0).all()


def test_a_prefix_longer_than_max_new_tokens_is_cut(setup, prefixed):
    _, _, _, prefix_ids, _ = setup
    _, r = prefixed
    assert r.completion_ids.shape[1] == T
    for row in (5, 11):  # prefixes of T + 3 and T tokens (no EOS): the completion is the prefix's first T
        assert r.completion_ids[row].tolist() == prefix_ids[row, :T].tolist()
        assert r.completion_mask[row].all() and r.prefix_mask[row].all()


def test_prefix_mask_marks_exactly_the_given_positions(prefixed):
    _, r = prefixed
    assert r.prefix_mask is not None and r.prefix_mask.shape == r.completion_mask.shape
    expected = torch.zeros_like(r.completion_mask)
    for row, n in enumerate(PREFIX_LENGTHS):
        n = EOS_ROWS[row] + 1 if row in EOS_ROWS else min(n or 0, T)
        expected[row, :n] = 1
    assert r.prefix_mask.tolist() == expected.tolist()


def test_logprobs_and_entropies_at_prefix_positions_are_the_policys(setup, prefixed):
    """old_logp / entropy equal log softmax(logits / T) and the entropy of one independent float64 forward
    over prompt + completion, at prefix positions as at sampled ones (decode: from the forwards that fed
    the prefix token by token; HF generate: from its scoring forward)."""
    _, model, _, _, _ = setup
    _, r = prefixed
    reference = copy.deepcopy(model).double()
    ids, mask = r.input_ids, r.attention_mask
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, r.prompt_ids.shape[1] - 1 : -1]
    m = r.completion_mask
    logp = token_logprobs(logits, r.completion_ids, TEMPERATURE) * m
    entropy = entropy_from_logits(logits.double(), TEMPERATURE).double() * m
    given = r.prefix_mask.bool()
    assert given.sum() > 10
    torch.testing.assert_close(r.old_logp.double()[given], logp[given], rtol=0, atol=1e-5)
    torch.testing.assert_close(r.entropy.double()[given], entropy[given], rtol=0, atol=1e-5)
    torch.testing.assert_close(r.old_logp.double(), logp, rtol=0, atol=1e-5)  # sampled positions too
    torch.testing.assert_close(r.entropy.double(), entropy, rtol=0, atol=1e-5)
    assert (r.old_logp[given] < 0).all() and (r.entropy[given] > 0).all()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_no_prefix_or_empty_prefixes_change_nothing(setup, sampler):
    _, _, _, prefix_ids, _ = setup
    plain = _generate(setup, SAMPLERS[sampler])
    empty = _generate(setup, SAMPLERS[sampler], prefix_ids=prefix_ids, prefix_mask=torch.zeros_like(prefix_ids))
    assert plain.prefix_mask is None and empty.prefix_mask is None
    for name in ("completion_ids", "completion_mask", "old_logp", "entropy"):
        assert torch.equal(getattr(plain, name), getattr(empty, name)), name
    assert plain.completions == empty.completions


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_rows_without_a_prefix_draw_what_they_draw_without_prefixes(setup, sampler):
    """Every row's draw is made as without prefixes (a row inside its prefix then takes its given token),
    so the rows without a prefix sample token for token what they sample in a run without prefixes: on
    the HF path always, in the decode loop while no row is dropped from its cache."""
    tok, model, enc, prefix_ids, prefix_mask = setup
    ids, mask = enc.input_ids, enc.attention_mask
    free = [row for row, n in enumerate(PREFIX_LENGTHS) if n is None]
    lengths = prefix_mask.sum(-1)
    if sampler == "decode":
        settings = sampling_settings(model, tok, T, temperature=TEMPERATURE, top_k=3)
        runs = []
        for given in ({}, dict(prefix_ids=prefix_ids, prefix_lengths=lengths)):
            torch.manual_seed(1)
            out, _, _ = decode(model, ids, mask, settings, compact_at=float("inf"), repeats=G, **given)
            runs.append(out)
    else:
        runs = [
            _generate(setup, False, seed=1, **given).completion_ids
            for given in ({}, dict(prefix_ids=prefix_ids, prefix_mask=prefix_mask))
        ]
    plain, prefixed = runs
    for row in free:
        n = int(completion_mask(plain[row : row + 1], tok.eos_token_id).sum())
        assert plain[row, :n].tolist() == prefixed[row, :n].tolist(), f"row {row}"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_greedy_continues_from_prompt_plus_prefix(setup, sampler):
    """Greedy with a prefix = greedy from the prompt with the prefix appended: the continuation is the
    policy's, conditioned on prompt + prefix (positions and cache included)."""
    tok, model, enc, _, _ = setup
    prefixes = [[5, 6], [], [13, 9, 9], [11]]
    prefix_ids = torch.tensor([p + [0] * (3 - len(p)) for p in prefixes])
    prefix_mask = torch.tensor([[1] * len(p) + [0] * (3 - len(p)) for p in prefixes])
    drop = SAMPLERS[sampler]
    r = generate(
        model, tok, enc.input_ids, enc.attention_mask, greedy=True, max_new_tokens=T, drop_finished=drop,
        prefix_ids=prefix_ids, prefix_mask=prefix_mask,
    )  # fmt: skip
    longer = [ids[m.bool()].tolist() + p for ids, m, p in zip(enc.input_ids, enc.attention_mask, prefixes)]
    width = max(map(len, longer))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in longer])
    att = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in longer])
    for row, p in enumerate(prefixes):
        alone = generate(
            model, tok, ids[row : row + 1], att[row : row + 1], greedy=True, max_new_tokens=T - len(p),
            drop_finished=drop,
        )  # fmt: skip
        n = int(alone.completion_mask.sum())
        assert r.completion_ids[row, : len(p) + n].tolist() == p + alone.completion_ids[0, :n].tolist(), f"row {row}"
    assert r.prefix_mask[:, :3].tolist() == prefix_mask.tolist()


def test_prefixes_that_do_not_fit_raise(setup):
    tok, model, enc, prefix_ids, prefix_mask = setup
    with pytest.raises(ValueError, match="one row per output row"):
        generate(model, tok, enc.input_ids, enc.attention_mask, num_generations=2, prefix_ids=prefix_ids)
    holes = prefix_mask.clone()
    holes[1, 0] = 0  # a 0 before the row's 1s
    with pytest.raises(ValueError, match="right-padded"):
        generate(
            model, tok, enc.input_ids, enc.attention_mask, num_generations=G, prefix_ids=prefix_ids, prefix_mask=holes
        )


def test_a_modules_prefix_rollout_is_what_the_trainer_recomputes(ckpt, setup):
    """Through the module (Sampler.sample): the completions start with their prefixes, Rollout.prefix_mask
    marks them, and the training forward (Policy.logprobs, what the RL term's ratio reads) gives the same
    log-probs at prefix positions as the sampler's old_logp, as at sampled ones."""
    from lit_align.core.policy import Completions
    from lit_align.modules.grpo import GRPOModule

    tok, _, enc, prefix_ids, prefix_mask = setup
    module = GRPOModule(model_name_or_path=ckpt, num_generations=G, max_new_tokens=T, temperature=TEMPERATURE)
    torch.manual_seed(0)
    r = module.sample(
        {"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask}, prefix_ids=prefix_ids, prefix_mask=prefix_mask
    )
    for row, n in enumerate(PREFIX_LENGTHS):
        n = min(n or 0, T, EOS_ROWS.get(row, T) + 1)
        assert r.completion_ids[row, :n].tolist() == prefix_ids[row, :n].tolist()
        assert int(r.prefix_mask[row].sum()) == n
    with torch.no_grad():
        s = module.policy.logprobs(Completions.of(r), torch.arange(len(PREFIX_LENGTHS)), TEMPERATURE)
    given = r.prefix_mask[:, : s.logp.shape[1]].bool()
    assert given.any()
    torch.testing.assert_close(s.logp[given], r.old_logp[:, : s.logp.shape[1]][given], rtol=1e-4, atol=1e-5)


def test_prefix_ids_outside_the_vocabulary_or_a_mask_alone_stop_before_sampling(ckpt, setup):
    """A given token id the model cannot embed is named (row, column, value) before any forward, on the
    module's sampler and on generate, rather than an index error deep in the decode loop (a device-side
    assert on a GPU); a prefix_mask without prefix_ids is an error, not a silent free sample."""
    from lit_align.modules.grpo import GRPOModule

    tok, model, enc, prefix_ids, prefix_mask = setup
    vocab = model.get_input_embeddings().num_embeddings
    bad = prefix_ids.clone()
    bad[3, 0] = vocab  # row 3 has a 1-token prefix
    module = GRPOModule(model_name_or_path=ckpt, num_generations=G, max_new_tokens=T)
    prompts = {"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask}
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {vocab}\), e.g. row 3, column 0: {vocab}"):
        module.sample(prompts, prefix_ids=bad, prefix_mask=prefix_mask)
    bad[3, 0] = -100  # a label-style pad under mask 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(
            model, tok, enc.input_ids, enc.attention_mask, num_generations=G, prefix_ids=bad, prefix_mask=prefix_mask
        )
    with pytest.raises(ValueError, match="prefix_mask is given without prefix_ids"):
        module.sample(prompts, prefix_mask=prefix_mask)
    with pytest.raises(ValueError, match="prefix_mask is given without prefix_ids"):
        generate(model, tok, enc.input_ids, enc.attention_mask, num_generations=G, prefix_mask=prefix_mask)
    # -100 under mask 0 (padding) stays fine
    module.sample(prompts, prefix_ids=prefix_ids, prefix_mask=prefix_mask)
