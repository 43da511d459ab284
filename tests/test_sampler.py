"""The sampler as a user relies on it (lit_align.rollout.generate):

- generation in chunks of ``generation_batch_size`` rows gives sampling-time log-probs equal to a
  fresh forward's, and None is the single-chunk sampler of before;
- sampling exactly as configured: a real instruct checkpoint's generation config (Qwen's
  temperature 0.7, top_p 0.8, top_k 20, repetition_penalty) changes nothing, the decode loop runs
  (no per-step logits over a 152k vocabulary kept), old_logp is the raw distribution's (ratio 1 at the
  first update), and lit-align's own repetition_penalty / min_p shape the proposal exactly as HF's
  processors do;
- models the loop cannot run (sliding-window caches) go to HF generate, still with lit-align's
  settings only and log-probs from a forward;
- synced decoding over 2 processes (plain and FSDP2) finishes when ranks stop at different lengths
  and run different numbers of chunks.
"""

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _qwen2 import qwen2_checkpoint

from lit_align.hf import load_model, load_tokenizer
from lit_align.losses import entropy_from_logits, token_logprobs
from lit_align.rollout import (
    completion_mask,
    decode,
    decode_supports,
    generate,
    position_ids_from_mask,
    sampling_overrides,
    sampling_settings,
)

PROMPTS = ["12+34=", "1+2=", "57+28=", "4+4="]
G, T = 4, 10


@pytest.fixture(scope="module")
def setup(ckpt):
    tok, model = load_tokenizer(ckpt), load_model(ckpt).eval()
    return tok, model, tok(PROMPTS, padding=True, return_tensors="pt")


def _fresh(model, rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature) at the sampled tokens and the entropies, from one forward over
    prompt + completion, as the training forward computes them (float32, 0 after EOS)."""
    ids, mask = rollout.input_ids, rollout.attention_mask
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, rollout.prompt_ids.shape[1] - 1 : -1].float()
    m = rollout.completion_mask
    return token_logprobs(logits, rollout.completion_ids, temperature) * m, entropy_from_logits(logits, temperature) * m


def _rows_per_forward(model) -> tuple[list[int], object]:
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape[0]), with_kwargs=True)
    return seen, hook


# ------------------------------------------------------------------------------------------- chunks
@pytest.mark.parametrize("gbs", [1, 3, G, None])
def test_chunked_generation_keeps_exact_log_probs(setup, gbs):
    tok, model, enc = setup
    rows, hook = _rows_per_forward(model)
    try:
        torch.manual_seed(0)
        r = generate(
            model,
            tok,
            enc.input_ids,
            enc.attention_mask,
            num_generations=G,
            max_new_tokens=T,
            temperature=0.8,
            generation_batch_size=gbs,
        )
    finally:
        hook.remove()
    B = len(PROMPTS) * G
    assert r.sampler == "decode" and r.completion_ids.shape[0] == B and len(r.completions) == B
    assert torch.equal(r.prompt_ids, enc.input_ids.repeat_interleave(G, 0))
    assert max(rows) <= (gbs or B), "never more rows in the KV cache than generation_batch_size"
    m = r.completion_mask
    assert torch.equal(m, completion_mask(r.completion_ids, tok.eos_token_id) * m)  # nothing after the first EOS
    assert 0 < m.sum() < m.numel(), "rows stop at different lengths"
    assert (r.completion_ids[m == 0] == tok.pad_token_id).all()
    assert (r.old_logp[m == 0] == 0).all() and (r.entropy[m == 0] == 0).all()
    logp, entropy = _fresh(model, r, 0.8)
    torch.testing.assert_close(r.old_logp, logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(r.entropy, entropy, rtol=0, atol=1e-5)
    if gbs is None:  # one chunk: exactly the single call generate made before chunks existed
        settings = sampling_settings(model, tok, T, temperature=0.8)
        torch.manual_seed(0)
        ids, old_logp, ent = decode(model, enc.input_ids, enc.attention_mask, settings, repeats=G)
        assert torch.equal(r.completion_ids, ids) and torch.equal(r.old_logp, old_logp) and torch.equal(r.entropy, ent)
    else:  # the chunks draw from one random stream, so they differ from the single chunk's samples
        assert r.completion_ids.shape[1] <= T


def test_chunked_hf_generate_keeps_exact_log_probs(setup):
    tok, model, enc = setup
    rows, hook = _rows_per_forward(model)
    try:
        torch.manual_seed(0)
        r = generate(
            model,
            tok,
            enc.input_ids,
            enc.attention_mask,
            num_generations=G,
            max_new_tokens=T,
            temperature=1.2,
            generation_batch_size=6,
            drop_finished=False,
        )
    finally:
        hook.remove()
    assert r.sampler == "hf-generate" and r.completion_ids.shape[0] == len(PROMPTS) * G
    assert max(rows) <= 6 and rows.count(6) >= 2, "generation and scoring forwards run on chunks of 6 rows"
    logp, entropy = _fresh(model, r, 1.2)
    torch.testing.assert_close(r.old_logp, logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(r.entropy, entropy, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- exactly as configured
class IdTokenizer:
    """The three things generate needs from a tokenizer, for models with made-up vocabularies."""

    def __init__(self, pad: int, eos: int):
        self.pad_token_id, self.eos_token_id = pad, eos

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(i) for i in row.tolist()) for row in ids]


QWEN_PAD, QWEN_EOS = 151643, 151645


@pytest.fixture(scope="module")
def instruct_ckpt(tmp_path_factory) -> str:
    """A tiny Qwen2 with Qwen2.5-Instruct's vocabulary size and its kind of generation_config.json."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=QWEN_PAD,
        eos_token_id=QWEN_EOS,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=QWEN_PAD,
        pad_token_id=QWEN_PAD,
        eos_token_id=[QWEN_EOS, QWEN_PAD],
        do_sample=True,
        repetition_penalty=1.1,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    )
    path = tmp_path_factory.mktemp("qwen_like")
    model.save_pretrained(path)
    return str(path)


def test_an_instruct_checkpoints_sampling_defaults_are_overridden(instruct_ckpt, monkeypatch):
    model = load_model(instruct_ckpt).eval()
    tok = IdTokenizer(QWEN_PAD, QWEN_EOS)
    assert model.generation_config.top_k == 20 and model.generation_config.repetition_penalty == 1.1
    assert sampling_overrides(model, sampling_settings(model, tok)) == {
        "repetition_penalty": (1.1, 1.0),
        "temperature": (0.7, 1.0),
        "top_p": (0.8, 1.0),
        "top_k": (20, 0),
    }
    assert sampling_overrides(model, sampling_settings(model, tok, temperature=0.7, top_k=20)) == {
        "repetition_penalty": (1.1, 1.0),
        "top_p": (0.8, 1.0),
    }

    def no_generate(*a, **k):
        raise AssertionError("HF generate (and its per-step logits) must not run for this checkpoint")

    monkeypatch.setattr(model, "generate", no_generate)
    positions, hook = [], model.lm_head.register_forward_hook(lambda m, a, out: positions.append(out.shape[1]))
    prompts = torch.tensor([[QWEN_PAD, 17, 300, 9000], [5, 6, 7, 8]])
    try:
        torch.manual_seed(0)
        r = generate(model, tok, prompts, (prompts != QWEN_PAD).long(), num_generations=4, max_new_tokens=6)
    finally:
        hook.remove()
    assert r.sampler == "decode"
    assert set(positions) == {1}, "each forward kept the logits of one position: never (rows, T, V)"
    logp, _ = _fresh(model, r, 1.0)  # lit-align's temperature, not the checkpoint's 0.7
    torch.testing.assert_close(r.old_logp, logp, rtol=0, atol=1e-5)  # so the first update's ratio is 1
    # the checkpoint's top_k=20 would keep each draw among the 20 likeliest tokens; lit-align's top_k=0 does not
    with torch.no_grad():
        ids, mask = r.input_ids, r.attention_mask
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, prompts.shape[1] - 1 : -1]
    ranks = (logits > logits.gather(-1, r.completion_ids.unsqueeze(-1))).sum(-1)
    assert int(ranks.max()) > 20


SHAPED = {
    "penalty": dict(repetition_penalty=1.3, temperature=0.9),
    "min_p": dict(min_p=0.2, temperature=0.8),
    "all": dict(repetition_penalty=1.1, top_k=5, top_p=0.9, min_p=0.05, temperature=0.7),
}


@pytest.mark.parametrize("name", list(SHAPED))
def test_repetition_penalty_and_min_p_shape_the_proposal_as_hf_does(setup, name, monkeypatch):
    """decode draws from HF's processed distribution (HF generate's scores, token for token while no
    row is dropped), and its log-probs stay the raw logits' / temperature."""
    tok, model, enc = setup
    shaping = SHAPED[name]
    ids, mask = enc.input_ids.repeat_interleave(G, 0), enc.attention_mask.repeat_interleave(G, 0)
    settings = dict(
        max_new_tokens=T, pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id], do_sample=True, **shaping
    )
    torch.manual_seed(3)
    hf = model.generate(
        input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **settings
    )
    drawn, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, *a, **k: (drawn.append(p.clone()), multinomial(p, *a, **k))[1])
    torch.manual_seed(3)
    out, logp, entropy = decode(model, ids, mask, settings, compact_at=float("inf"))
    monkeypatch.undo()
    hf_ids = hf.sequences[:, ids.shape[1] :]
    assert torch.equal(out, hf_ids)
    assert len(drawn) == len(hf.scores) == out.shape[1]
    for probs, scores in zip(drawn, hf.scores):
        torch.testing.assert_close(probs, torch.softmax(scores, -1), rtol=0, atol=1e-6)
    m = completion_mask(out, tok.eos_token_id)
    full = torch.cat([mask, torch.ones_like(out)], 1)  # finished rows are fed padding, attended, as in HF
    with torch.no_grad():
        raw = (
            model(input_ids=torch.cat([ids, out], 1), attention_mask=full, position_ids=position_ids_from_mask(full))
            .logits[:, ids.shape[1] - 1 : -1]
            .float()
        )
    t = shaping["temperature"]
    torch.testing.assert_close(logp, token_logprobs(raw, out, t) * m, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, entropy_from_logits(raw, t) * m, rtol=0, atol=1e-5)
    proposal, policy = torch.stack(drawn, 1), torch.softmax(raw / t, -1)
    assert (proposal - policy).abs().amax() > 0.02, "the shaping did change the distribution sampled"
    if name == "min_p":  # tokens under min_p x the top probability are never proposed; the others keep their odds
        cut = policy < shaping["min_p"] * policy.amax(-1, keepdim=True)
        assert cut.any() and (proposal[cut] == 0).all()
        kept = torch.where(cut, 0.0, policy)
        torch.testing.assert_close(proposal, kept / kept.sum(-1, keepdim=True), rtol=0, atol=1e-5)
    if name == "penalty":  # a token already in the prompt or the completion loses probability
        seen = torch.zeros_like(policy, dtype=torch.bool)
        for s in range(out.shape[1]):
            history = torch.cat([ids * mask, out[:, :s]], 1)
            seen[:, s].scatter_(1, history, True)
        seen[..., tok.pad_token_id] = False
        ratio = proposal / policy  # the same for every unseen token of a (row, step): its normaliser
        unseen = torch.where(seen, float("-inf"), ratio).amax(-1, keepdim=True).expand_as(ratio)
        assert seen.any() and (ratio[seen] < unseen[seen]).all()


@pytest.mark.parametrize(
    "bad",
    [
        dict(min_p=1.5),
        dict(min_p=-0.1),
        dict(repetition_penalty=0.0),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(temperature=0.0),
        dict(generation_batch_size=0),
        dict(max_new_tokens=0),
    ],
)
def test_an_invalid_setting_raises_naming_it(setup, bad):
    tok, model, enc = setup
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        generate(model, tok, enc.input_ids, enc.attention_mask, num_generations=2, **bad)


def test_a_sliding_window_model_samples_with_hf_generate_and_only_lit_aligns_settings(monkeypatch):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=4,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    model.generation_config.update(do_sample=True, top_k=1, repetition_penalty=3.0, no_repeat_ngram_size=1)
    assert not decode_supports(model)
    seen, hf = [], model.generate

    def recording_generate(*a, generation_config, **k):
        seen.append((generation_config, model.generation_config, k))
        return hf(*a, generation_config=generation_config, **k)

    monkeypatch.setattr(model, "generate", recording_generate)
    prompts = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    torch.manual_seed(0)
    r = generate(
        model,
        IdTokenizer(0, 1),
        prompts,
        (prompts != 0).long(),
        num_generations=3,
        max_new_tokens=8,
        temperature=1.5,
        top_p=0.95,
        generation_batch_size=4,
    )
    assert r.sampler == "hf-generate" and len(seen) == 2  # 6 rows in chunks of 4
    for used, during, kwargs in seen:
        assert used is during, "the checkpoint's generation config was swapped out for the call"
        assert (used.top_k, used.top_p, used.temperature, used.repetition_penalty) == (0, 0.95, 1.5, 1.0)
        assert used.no_repeat_ngram_size is None and not used.output_logits and not used.output_scores
        assert not kwargs.get("output_logits") and not kwargs.get("output_scores")
    assert model.generation_config.top_k == 1, "and put back afterwards"
    logp, entropy = _fresh(model, r, 1.5)
    torch.testing.assert_close(r.old_logp, logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(r.entropy, entropy, rtol=0, atol=1e-5)
    assert any(len(set(r.completions[i * 3 : i * 3 + 3])) > 1 for i in range(2)), "top_k=1 was not applied"


# ----------------------------------------------------------------------------------- synced, 2 ranks
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synced_worker(rank: int, port: int, ckpt: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))  # a hang fails
    torch.set_num_threads(1)
    tok = load_tokenizer(ckpt)
    prompts = [["12+34=", "1+2=", "57+28="], ["4+4="]][rank]  # 3 chunks of G rows on rank 0, 1 on rank 1
    enc = tok(prompts, padding=True, return_tensors="pt")
    args = (tok, enc.input_ids, enc.attention_mask)
    results = {}

    def run(model, **kw):
        seen, hook = _rows_per_forward(model)
        try:
            return generate(model, *args, **kw), len(seen)
        finally:
            hook.remove()

    from torch.distributed.device_mesh import init_device_mesh

    from lit_align.strategies import shard_model

    plain = load_model(ckpt).eval()
    sharded = shard_model(load_model(ckpt).eval(), init_device_mesh("cpu", (2,)))
    sampled = dict(num_generations=G, max_new_tokens=T, temperature=1.0, generation_batch_size=G)
    torch.manual_seed(rank)
    alone, _ = run(plain, **sampled)
    for name, model in (("plain", plain), ("fsdp2", sharded)):
        torch.manual_seed(rank)
        synced, forwards = run(model, synced_gpus=True, **sampled)
        results[name] = {
            "forwards": forwards,
            "ids": synced.completion_ids,
            "logp": synced.old_logp,
            "mask": synced.completion_mask,
            "alone_ids": alone.completion_ids,
            "alone_logp": alone.old_logp,
        }
    # greedy, one prompt per rank: rank 1 stops after its first token, rank 0 runs to max_new_tokens
    args = (tok, enc.input_ids[:1], enc.attention_mask[:1])
    first = generate(plain, *args, greedy=True, max_new_tokens=T).completion_ids[0].tolist()
    unused = next(t for t in range(2, 16) if t not in first)
    for model in (plain, sharded):
        model.generation_config.eos_token_id = first[0] if rank == 1 else unused
    for name, model in (("plain-greedy", plain), ("fsdp2-greedy", sharded)):
        r, forwards = run(model, greedy=True, max_new_tokens=T, synced_gpus=True)
        results[name] = {"forwards": forwards, "lengths": r.completion_mask.sum(-1)}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def synced_results(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("synced")
    mp.start_processes(_synced_worker, args=(_free_port(), ckpt, str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("kind", ["plain", "fsdp2"])
def test_synced_decode_over_two_ranks_stopping_at_different_lengths(synced_results, kind):
    r0, r1 = (r[kind] for r in synced_results)
    assert r0["forwards"] == r1["forwards"], "every rank ran the same number of forwards (FSDP's collectives)"
    for r in (r0, r1):  # synced sampling draws what one process draws alone; stand-in forwards record nothing
        assert torch.equal(r["ids"], r["alone_ids"])
        torch.testing.assert_close(r["logp"], r["alone_logp"], rtol=0, atol=1e-5)
    assert r0["ids"].shape[0] == 3 * G and r1["ids"].shape[0] == G
    g0, g1 = (r[f"{kind}-greedy"] for r in synced_results)
    assert g1["lengths"].tolist() == [1] and g0["lengths"].tolist() == [T]
    assert g0["forwards"] == g1["forwards"] == T, "one prefill and T - 1 steps on both ranks"


def test_the_module_samples_with_its_settings_and_logs_what_it_overrode_once(ckpt, monkeypatch, caplog):
    import logging

    from lit_align.core import sampler as policy_module
    from lit_align.modules.grpo import GRPOModule

    module = GRPOModule(
        model_name_or_path=ckpt,
        num_generations=2,
        max_new_tokens=3,
        repetition_penalty=1.2,
        min_p=0.1,
        generation_batch_size=3,
    )
    module.model.generation_config.update(top_k=20, do_sample=True)  # as an instruct checkpoint ships it
    calls, real = [], policy_module.generate
    monkeypatch.setattr(policy_module, "generate", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    enc = module.tokenizer(PROMPTS[:2], padding=True, return_tensors="pt")
    prompts = {"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask}
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(2):
            rollout = module.sample(prompts)
    assert rollout.completion_ids.shape[0] == 4 and rollout.sampler == "decode"
    assert {k: calls[0][k] for k in ("repetition_penalty", "min_p", "generation_batch_size", "top_k")} == {
        "repetition_penalty": 1.2,
        "min_p": 0.1,
        "generation_batch_size": 3,
        "top_k": 0,
    }
    lines = [r.getMessage() for r in caplog.records if "lit_align sampling" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "decode sampler" in lines[0] and "top_k=20 (sampling with 0)" in lines[0]


def test_an_instruct_checkpoints_first_on_policy_update_has_ratio_one(instruct_ckpt, tmp_path, monkeypatch, caplog):
    """The module on a 151,936-token checkpoint whose generation config sets repetition_penalty 1.1,
    top_k 20, top_p 0.8 and temperature 0.7: it samples with the decode loop, as a checkpoint without
    them does, so the training forward reproduces old_logp (ratio 1 to 1e-6 on the first update), and
    the start-up log names each overridden field."""
    import logging
    import shutil

    from lit_align import losses
    from lit_align.data.embedded import build_tokenizer
    from lit_align.modules.grpo import GRPOModule

    path = tmp_path / "instruct"
    shutil.copytree(instruct_ckpt, path)
    build_tokenizer().save_pretrained(path)  # ids below 16: valid in the 151,936-token vocabulary
    torch.manual_seed(0)
    module = GRPOModule(model_name_or_path=str(path), num_generations=4, max_new_tokens=8)
    assert module.model.generation_config.repetition_penalty == 1.1
    enc = module.tokenizer(PROMPTS[:2], padding=True, return_tensors="pt")
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger=logger.name):
        rollout = module.sample({"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask})
    assert rollout.sampler == "decode"
    line = next(r.getMessage() for r in caplog.records if "lit_align sampling" in r.getMessage())
    for field in ("repetition_penalty=1.1", "top_k=20", "top_p=0.8", "temperature=0.7"):
        assert field in line, (field, line)
    module.train()
    with torch.no_grad():
        logits = module.policy.logits(rollout.input_ids, rollout.attention_mask, start=rollout.prompt_ids.shape[1] - 1)
    logp = losses.token_logprobs(logits, rollout.completion_ids, module.hparams.temperature)
    mask = rollout.completion_mask.bool()
    assert mask.sum() > 0
    assert (torch.exp(logp - rollout.old_logp) - 1).abs()[mask].max().item() < 1e-6


def test_num_generations_below_one_is_an_error_not_the_default(ckpt):
    """sample(num_generations=0) (e.g. a LUFFY-style G - 1 samples at G = 1) used to sample the default G
    per prompt, silently; a negative count failed deep in the sampler."""
    from lit_align.modules.grpo import GRPOModule

    module = GRPOModule(model_name_or_path=ckpt, num_generations=4, max_new_tokens=2)
    enc = module.tokenizer(["12+34=", "1+2="], padding=True, return_tensors="pt")
    prompts = {"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask}
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"sample\(num_generations={bad}\): at least 1 completion per prompt"):
            module.sample(prompts, num_generations=bad)
    assert len(module.sample(prompts, num_generations=3).completions) == 6
    assert len(module.sample(prompts).completions) == 8


# ------------------------------------------------------------------------------- on-policy in any precision
@pytest.fixture(scope="module")
def small_qwen2(ckpt, tmp_path_factory) -> str:
    """A random Qwen2 (hidden 64, 512 tokens: the embedded tokenizer grown) saved in float32: wide enough
    that bf16 rounding shows in its log-probs."""
    return qwen2_checkpoint(ckpt, tmp_path_factory.mktemp("qwen2_64"), tied=False, hidden=64)


def _first_update_ratios(path: str, monkeypatch, model_dtype=None, precision="32-true") -> torch.Tensor:
    """|ratio - 1| of every RL token of the first update of a GRPO run (one Lightning training step with the
    HF sampler, strictly on-policy): the ratio exp(logp - old_logp) the clipped surrogate computes."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lit_align import losses
    from lit_align.modules.grpo import GRPOModule

    seen, real = [], losses.surrogate_per_token

    def recording(logp, old_logp, advantages, *args, **kwargs):  # the real surrogate, its ratio kept
        seen.append((torch.exp(logp.detach().float() - old_logp.float()) - 1).abs())
        return real(logp, old_logp, advantages, *args, **kwargs)

    monkeypatch.setattr(losses, "surrogate_per_token", recording)
    module = GRPOModule(model_name_or_path=path, model_dtype=model_dtype, num_generations=4, max_new_tokens=12)
    enc = module.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    batch = {
        "prompts": {
            "prompt_ids": enc.input_ids,
            "prompt_mask": enc.attention_mask,
            "prompts": PROMPTS,
            "answers": ["46", "3", "85", "8"],
        }
    }
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    torch.manual_seed(1)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    rollout = module.rollout_buffer.cycle["rollout"]
    masks = [rollout.completion_mask[:, : r.shape[1]] for r in seen]  # one forward over every row (micro-batch)
    assert len(seen) >= 1 and sum(int(m.sum()) for m in masks) == int(rollout.completion_mask.sum())
    return torch.cat([r[m.bool().to(r.device)] for r, m in zip(seen, masks)])


# transformers#31267: bf16 logits of a KV-cache decode step differ from the full forward's, so old_logp taken
# from the decode loop made the first, strictly on-policy update off-policy (|ratio - 1| up to 0.31)
@pytest.mark.parametrize(
    "model_dtype, precision",
    [("bfloat16", "32-true"), (None, "bf16-mixed")],
    ids=["bf16-weights", "bf16-mixed-autocast"],
)
def test_the_first_on_policy_update_has_ratio_one_in_bf16(small_qwen2, monkeypatch, model_dtype, precision):
    ratios = _first_update_ratios(small_qwen2, monkeypatch, model_dtype, precision)
    assert ratios.numel() > 20
    assert ratios.max().item() < 1e-3, f"max |ratio - 1| = {ratios.max().item():.4f} on a strictly on-policy update"


def test_float32_keeps_the_decode_loops_log_probs_without_a_second_forward(small_qwen2):
    """In float32 the decode loop's log-probs are the training forward's to rounding (1e-6): no forward is
    added to sampling, and old_logp is exactly what the loop recorded."""
    from lit_align.modules.grpo import GRPOModule
    from lit_align.rollout import sampling_settings

    module = GRPOModule(model_name_or_path=small_qwen2, num_generations=4, max_new_tokens=12)
    enc = module.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    rows, hook = _rows_per_forward(module.model)
    try:
        torch.manual_seed(1)
        r = module.sample({"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask})
    finally:
        hook.remove()
    assert len(rows) == r.completion_ids.shape[1], "one prefill and one forward per further token, nothing more"
    settings = sampling_settings(module.model, module.tokenizer, 12)
    torch.manual_seed(1)
    ids, old_logp, entropy = decode(module.model, enc.input_ids, enc.attention_mask, settings, repeats=4)
    assert torch.equal(r.completion_ids, ids) and torch.equal(r.old_logp, old_logp * r.completion_mask)
    module.train()
    logp, _ = _fresh(module.model, r, 1.0)
    assert (torch.exp(logp - r.old_logp) - 1).abs()[r.completion_mask.bool()].max().item() < 1e-5


# ----------------------------------------------------------------------------- where rollouts stop
def _set_up(checkpoint: str, tmp_path, **data) -> tuple:
    """A GRPO module and the data module of GSM8K rows, set up as a run sets them up (the data module's
    setup, then the module's), by a validation of one batch."""
    import lightning as L
    from _gsm8k import gsm8k_rows, write_jsonl

    from lit_align.data.datamodule import MixedDataModule
    from lit_align.modules.grpo import GRPOModule

    path = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(4))
    dm = MixedDataModule(
        model_name_or_path=checkpoint,
        expert_data=path,
        prompt_data=path,
        val_data=path,
        val_batch_size=2,
        prompt_column="question",
        response_column="answer",
        answer_column="answer",
        answer_pattern=r"####\s*(.+)",
        **data,
    )
    module = GRPOModule(model_name_or_path=checkpoint, num_generations=2, max_new_tokens=6)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.validate(module, datamodule=dm, verbose=False)
    return module, dm, trainer


def test_rollouts_stop_at_the_token_demonstrations_end_with(base_chat_ckpt, tmp_path):
    """A base checkpoint (EOS <|endoftext|>) with a ChatML template: prompts are chat turns and demonstrations
    end with <|im_end|>, so a rollout must end there too, on the HF loop and (same settings) on vLLM, else the
    policy is trained to stop where its sampler never stops. The exported checkpoint stops there as well."""
    from transformers import GenerationConfig

    from lit_align.callbacks import export
    from lit_align.export import export_checkpoint

    module, dm, trainer = _set_up(base_chat_ckpt, tmp_path)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    tok = module.tokenizer
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert sampling_settings(module.model, tok)["eos_token_id"] == [eos, im_end]  # what either sampler stops at
    # a policy that always says <|im_end|>: each completion is that one token, ended, not truncated
    head = torch.nn.Linear(module.model.config.hidden_size, len(tok), bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[im_end] = 30.0
    module.model.lm_head = head
    rollout = module.sample(dm.collate_prompts(dm.prompt_rows[:2]))
    assert rollout.completion_mask.sum(-1).tolist() == [1] * 4 and (rollout.completion_ids[:, 0] == im_end).all()
    assert not module.sampler.truncated(rollout).any() and rollout.completions == [""] * 4
    for saved in (export(module, tmp_path / "hf"), export_checkpoint(tmp_path / "run.ckpt", tmp_path / "offline")):
        assert GenerationConfig.from_pretrained(saved).eos_token_id == [eos, im_end]


def test_rollouts_stop_at_a_named_end_token(base_chat_ckpt, tmp_path):
    """data.eos_token names any token: the greedy completion is cut right after its first occurrence."""
    module, dm, _ = _set_up(base_chat_ckpt, tmp_path, eos_token="eos")
    prompts = dm.collate_prompts(dm.prompt_rows[:1])
    free = module.sample(prompts, greedy=True).completion_ids[0].tolist()
    assert len(free) == 6 and module.tokenizer.eos_token_id not in free
    token = free[2]
    module, dm, _ = _set_up(base_chat_ckpt, tmp_path, eos_token=module.tokenizer.convert_ids_to_tokens(token))
    assert _ends_of(dm) == {token}
    cut = module.sample(prompts, greedy=True)
    assert cut.completion_ids[0][cut.completion_mask[0].bool()].tolist() == free[: free.index(token) + 1]


def _ends_of(dm) -> set[int]:
    return {r["response_ids"][-1] for r in dm.expert_rows}
