"""rollout.decode, the sampling loop that stops computing finished rows: HF generate's samples token
for token while no row is dropped, the right conditionals after rows are dropped, and a ValueError
(never a silent fallback) for a setting the loop does not apply."""

import pytest
import torch

from lit_align.hf import load_model, load_tokenizer
from lit_align.losses import entropy_from_logits, token_logprobs
from lit_align.rollout import completion_mask, decode, decode_supports, generate, position_ids_from_mask

PROMPTS = ["12+34=", "1+2=", "57+28=", "4+4="]
G, T = 4, 12


@pytest.fixture(scope="module")
def setup(ckpt):
    tok, model = load_tokenizer(ckpt), load_model(ckpt).eval()
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    ids, mask = enc.input_ids.repeat_interleave(G, 0), enc.attention_mask.repeat_interleave(G, 0)
    return tok, model, ids, mask


def _settings(tok, **sampling):
    greedy = not sampling
    return dict(
        max_new_tokens=T,
        pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id],
        do_sample=not greedy,
        **sampling,
    )


SAMPLING = [
    dict(temperature=0.7, top_k=5, top_p=0.9),
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.8),
    {},
]


@pytest.mark.parametrize("sampling", SAMPLING, ids=["t0.7-k5-p0.9", "plain", "t1.3-p0.8", "greedy"])
def test_without_dropping_rows_the_samples_are_hf_generates(setup, sampling):
    tok, model, ids, mask = setup
    settings = _settings(tok, **sampling)
    assert decode_supports(model)
    torch.manual_seed(3)
    hf = model.generate(
        input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True, **settings
    )
    torch.manual_seed(3)
    out, logp, entropy = decode(model, ids, mask, settings, compact_at=float("inf"))
    hf_ids = hf.sequences[:, ids.shape[1] :]
    assert torch.equal(out, hf_ids)
    m = completion_mask(hf_ids, tok.eos_token_id)
    if sampling:  # (the untrained model's greedy answers never reach EOS)
        assert 0 < m.sum() < m.numel(), "some rows stop early, some run to max_new_tokens"
    t = sampling.get("temperature", 1.0)
    logits = torch.stack(hf.logits, dim=1)
    torch.testing.assert_close(logp, token_logprobs(logits, hf_ids, t) * m, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, entropy_from_logits(logits, t) * m, rtol=0, atol=1e-6)


def test_after_dropping_rows_each_step_samples_from_the_full_forward(setup):
    tok, model, ids, mask = setup
    settings = _settings(tok, temperature=0.8, top_k=0, top_p=1.0)
    torch.manual_seed(5)
    out, logp, entropy = decode(model, ids, mask, settings, compact_at=0.0)  # drop rows at every step
    m = completion_mask(out, tok.eos_token_id)
    lengths = m.sum(-1)
    assert lengths.min() < lengths.max() == out.shape[1], "rows finish at different steps"
    assert (out[m == 0] == tok.pad_token_id).all()
    full = torch.cat([mask, m], dim=1)
    with torch.no_grad():
        logits = model(
            input_ids=torch.cat([ids, out], 1), attention_mask=full, position_ids=position_ids_from_mask(full)
        ).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(logp, token_logprobs(logits, out, 0.8) * m, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, entropy_from_logits(logits, 0.8) * m, rtol=0, atol=1e-5)


def test_fixed_length_rollouts_equal_hf_generate(setup):
    """min_new_tokens = max_new_tokens: no row finishes early, so dropping rows changes nothing, and HF
    generate (drop_finished=False: the path kept for models decode cannot run) draws the same tokens;
    its log-probs come from a forward over prompt + completion after sampling."""
    tok, model, _, _ = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    runs = []
    for drop in (True, False):
        torch.manual_seed(1)
        runs.append(
            generate(
                model,
                tok,
                enc.input_ids,
                enc.attention_mask,
                num_generations=G,
                max_new_tokens=T,
                temperature=0.9,
                drop_finished=drop,
                min_new_tokens=T,
            )
        )
    ours, hf = runs
    assert (ours.sampler, hf.sampler) == ("decode", "hf-generate")
    assert ours.completion_ids.shape == (len(PROMPTS) * G, T) and ours.completion_mask.all()
    assert torch.equal(ours.completion_ids, hf.completion_ids) and ours.completions == hf.completions
    torch.testing.assert_close(ours.old_logp, hf.old_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.entropy, hf.entropy, rtol=0, atol=1e-5)


def test_a_setting_the_loop_does_not_apply_raises_naming_it(setup, monkeypatch):
    """Before: a checkpoint's repetition_penalty, or a setting such as no_repeat_ngram_size, sent
    sampling to HF generate with per-step logits kept. Now the checkpoint's generation config is never
    read, and a setting decode does not apply is an error naming it, not another sampler."""
    tok, model, ids, mask = setup
    plain = _settings(tok, temperature=1.0, top_k=0, top_p=1.0)
    for name, value in (("no_repeat_ngram_size", 2), ("min_length", 3), ("typical_p", 0.9)):
        with pytest.raises(ValueError, match=name):
            decode(model, ids, mask, {**plain, name: value})
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.2)  # the checkpoint's: ignored

    def no_generate(*a, **k):
        raise AssertionError("HF generate must not run here")

    monkeypatch.setattr(model, "generate", no_generate)
    enc = tok(PROMPTS[:2], padding=True, return_tensors="pt")
    r = generate(model, tok, enc.input_ids, enc.attention_mask, num_generations=2, max_new_tokens=4)
    assert r.sampler == "decode" and r.completion_ids.shape[0] == 4


@pytest.mark.parametrize("compact_at", [float("inf"), 0.25])
def test_one_prefill_per_prompt_samples_what_repeated_prompts_sample(setup, compact_at):
    """repeats=G runs each prompt through the model once and copies its KV cache to its G rows: the
    same tokens (same random draws), log-probs and entropies as decoding the repeated prompts."""
    tok, model, ids, mask = setup
    settings = _settings(tok, temperature=0.9, top_k=0, top_p=1.0)
    torch.manual_seed(7)
    full = decode(model, ids, mask, settings, compact_at=compact_at)
    torch.manual_seed(7)
    shared = decode(model, ids[::G], mask[::G], settings, compact_at=compact_at, repeats=G)
    assert torch.equal(shared[0], full[0])
    m = completion_mask(full[0], tok.eos_token_id)
    assert 0 < m.sum() < m.numel(), "some rows stop early"
    for a, b in zip(shared[1:], full[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_decode_loop_uses_no_deprecated_transformers_argument(tmp_path, arch):
    """transformers deprecates ``past_key_values`` as a forward argument (removed in 5.40): the loop
    passes its cache under the name the installed release's models take, so a user's next upgrade
    does not break sampling. Checked on the architectures users bring, with warnings as errors."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_key_value_heads=2,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=64,
        max_position_embeddings=64,
    )
    config = AutoConfig.for_model(arch, **{k: v for k, v in small.items() if hasattr(AutoConfig.for_model(arch), k)})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = load_model(str(tmp_path)).eval()
    ids = torch.randint(3, 32, (2, 4))
    settings = dict(
        max_new_tokens=5, pad_token_id=0, eos_token_id=[1], do_sample=True, temperature=1.0, top_k=0, top_p=1.0
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning, module="transformers")
        warnings.filterwarnings("error", message=".*past_key_values.*")
        out, logp, _ = decode(model, ids, torch.ones_like(ids), settings)
    assert out.shape == (2, 5) and bool((logp[out != 0] < 0).all())
