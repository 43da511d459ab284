"""The vLLM rollout engine against lit-align's own sampler and the trainer's forward, on three checkpoints:
the embedded one (Llama, tied input/output embeddings, 16 tokens) and a 512-token Qwen2 (attention
biases) with untied and with tied embeddings. Each checkpoint gets one engine (module-scoped), float32:

(a) greedy completions from the engine equal lit-align's HF-path sampler's, token for token;
(b) the engine's log-probs of sampled tokens equal the log-softmax of an independent forward at the
    sampling temperature (max |diff| < 1e-4), and old_logp is the trainer's own forward;
(c) after an optimizer step the engine, until synced, samples with the old weights (log-probs off by
    far more than 1e-4: the check has teeth); after the sync (a) and (b) hold with the new weights,
    the tied output layer included.

Also: the engine's rollouts are lit-align's Rollout (shapes, masks, padding, texts), a prompt the engine
cannot serve goes to the HF sampler with one warning, validation's greedy and sampled answers through the
engine leave the training random stream alone, and building an engine leaves the process's random state and
environment as they were.
"""

import os
import warnings

import pytest
import torch
from _vllm_helpers import KV_CACHE_BYTES, qwen2_checkpoint

from lit_align.losses import token_logprobs
from lit_align.modules.grpo import GRPOModule
from lit_align.rollout import completion_mask, generate, position_ids_from_mask

PROMPTS = ["12+34=", "1+2=", "57+28=", "4+4=", "99+1=", "3+75="]
G, T, TEMPERATURE = 4, 8, 0.7


@pytest.fixture(scope="module", params=["embedded", "qwen2-untied", "qwen2-tied"])
def policy(request, ckpt, tmp_path_factory):
    """A GRPO module with model.rollout_engine=vllm and its engine, one per checkpoint: the embedded Llama
    (tied embeddings, 16 tokens) and a 512-token Qwen2 with untied and with tied embeddings."""
    if request.param == "embedded":
        path = ckpt
    else:
        path = qwen2_checkpoint(ckpt, tmp_path_factory.mktemp(request.param), tied=request.param == "qwen2-tied")
    module = GRPOModule(
        model_name_or_path=path,
        rollout_engine="vllm",
        vllm_kv_cache_memory_bytes=KV_CACHE_BYTES,
        num_generations=G,
        max_new_tokens=T,
        temperature=TEMPERATURE,
        micro_batch_size=5,
    )
    tied = module.model.config.tie_word_embeddings
    assert tied == (request.param != "qwen2-untied")
    module.sampler.start(module.world, None)
    assert module.sampler.engine is not None and module.sampler.engine.tied == tied
    yield module
    module.sampler.stop()


def _prompts(module) -> dict:
    enc = module.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    return {"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask}


@torch.no_grad()
def _fresh_logp(model, rollout, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) at the sampled tokens from one plain HF forward over prompt +
    completion (float32, 0 on padding): independent of the engine and of the trainer's forward code."""
    ids, mask = rollout.input_ids, rollout.attention_mask
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, rollout.prompt_ids.shape[1] - 1 : -1].float()
    return token_logprobs(logits, rollout.completion_ids, temperature) * rollout.completion_mask


def _check_greedy(module, prompts) -> None:
    engine = module.sample(prompts, greedy=True, num_generations=1)
    hf = generate(
        module.model, module.tokenizer, prompts["prompt_ids"], prompts["prompt_mask"], greedy=True, max_new_tokens=T
    )
    assert engine.sampler == "vllm" and hf.sampler == "decode"
    assert engine.completion_ids.tolist() == hf.completion_ids.tolist()
    assert torch.equal(engine.completion_mask, hf.completion_mask)
    assert engine.completions == hf.completions


def _check_sampled(module, prompts) -> tuple[float, object]:
    torch.manual_seed(1)
    r = module.sample(prompts)
    fresh = _fresh_logp(module.model, r, TEMPERATURE)
    m = r.completion_mask.bool()
    diff = float((r.sampler_logp - fresh).abs()[m].max())
    assert float((r.old_logp - fresh).abs().max()) < 1e-5, "old_logp is the trainer's forward"
    return diff, r


def test_engine_rollout_is_a_lit_align_rollout(policy):
    prompts = _prompts(policy)
    torch.manual_seed(0)
    r = policy.sample(prompts)
    B, eos, pad = len(PROMPTS) * G, policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    assert r.sampler == "vllm" and r.completion_ids.shape[0] == B and r.completion_ids.shape[1] <= T
    assert torch.equal(r.prompt_ids, prompts["prompt_ids"].repeat_interleave(G, 0))
    m = r.completion_mask
    assert torch.equal(m, completion_mask(r.completion_ids, eos) * m), "nothing counts after the first end token"
    lengths = m.sum(-1)
    assert bool(((lengths == T) | (r.completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0] == eos)).all())
    assert (r.completion_ids[m == 0] == pad).all()
    for t in (r.old_logp, r.entropy, r.sampler_logp):
        assert t.dtype == torch.float32 and t.shape == m.shape and (t[m == 0] == 0).all()
    assert (r.entropy[m == 1] > 0).all()
    assert len(r.completions) == B and len(set(map(tuple, r.completion_ids.tolist()))) > len(PROMPTS), "G differ"
    torch.manual_seed(0)
    again = policy.sample(prompts)
    assert torch.equal(again.completion_ids, r.completion_ids), "seeded from the global stream: reproducible"


def test_a_greedy_equals_the_hf_path(policy):
    _check_greedy(policy, _prompts(policy))


def test_b_sampled_logprobs_equal_the_trainer_log_softmax_at_the_temperature(policy):
    diff, r = _check_sampled(policy, _prompts(policy))
    assert diff < 1e-4, f"max |vLLM - HF| log-prob {diff}"
    metrics = policy.sampler.metrics(r)
    assert float(metrics["sampler_logp_diff_max"]) < 1e-4 and float(metrics["sampler_logp_diff"]) <= diff + 1e-6


def test_c_after_an_optimizer_step_and_a_sync(policy):
    prompts = _prompts(policy)
    model = policy.model
    synced, _ = _check_sampled(policy, prompts)  # the engine holds the policy's current weights
    assert synced < 1e-4 and not policy.sampler.stale
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    batch = policy.tokenizer(["12+34=46", "57+28=85", "4+4=8"], padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.embed_tokens.weight" in moved and len(moved) == len(before)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    stale, _ = _check_sampled(policy, prompts)  # no sync yet: the engine still holds the old weights
    assert stale > 1e-2, f"the step moved the log-probs by only {stale}: this test would not see a missed sync"

    policy.sampler.weights_changed()  # what each applied optimizer step does (PolicyModule.policy_step)
    diff, _ = _check_sampled(policy, prompts)
    assert diff < 1e-4, f"after the sync, max |vLLM - HF| log-prob {diff}"
    _check_greedy(policy, prompts)


def test_prompts_the_engine_cannot_serve_go_to_the_hf_sampler_with_one_warning(policy, monkeypatch):
    prompts = _prompts(policy)
    monkeypatch.setattr(policy.sampler.engine, "max_model_length", 8)  # the longest prompt (6) + T (8) do not fit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = policy.sample(prompts), policy.sample(prompts)
    assert first.sampler == second.sampler == "decode" and first.sampler_logp is None
    said = [w for w in caught if "model.rollout_engine=vllm" in str(w.message)]
    assert len(said) == 1 and "vllm_max_model_length" in str(said[0].message)
    monkeypatch.undo()
    assert policy.sample(prompts).sampler == "vllm"


def test_validation_through_the_engine_leaves_the_training_random_stream(policy):
    """val/accuracy's greedy answers and val/pass@k's sampled ones come from the engine, and neither moves the global
    torch random stream that training's rollouts draw from (a greedy request needs no seed; the sampled answers
    have a seed of their own), so a validation changes no later rollout. The same batch index samples the same
    answers, another index others."""
    prompts = _prompts(policy)
    batch = {**prompts, "prompts": PROMPTS, "answers": ["46", "3", "85", "8", "100", "78"]}
    heldout, world = policy.heldout, policy.world
    torch.manual_seed(7)
    state = torch.get_rng_state()
    _, greedy = heldout.greedy_verdicts(batch, world)
    assert greedy.shape == (len(PROMPTS),)
    assert torch.equal(torch.get_rng_state(), state), "the greedy answers drew from the training stream"
    rollout, correct = heldout.sampled_verdicts(batch, world, G, batch_idx=0)
    assert torch.equal(torch.get_rng_state(), state), "the sampled answers drew from the training stream"
    assert rollout.sampler == "vllm" and correct.shape == (len(PROMPTS) * G,)
    assert torch.equal(rollout.prompt_ids, prompts["prompt_ids"].repeat_interleave(G, 0))
    assert len(set(map(tuple, rollout.completion_ids.tolist()))) > len(PROMPTS), "sampled, not greedy"
    again, _ = heldout.sampled_verdicts(batch, world, G, batch_idx=0)
    other, _ = heldout.sampled_verdicts(batch, world, G, batch_idx=1)
    assert again.completions == rollout.completions and other.completions != rollout.completions


def test_building_an_engine_leaves_the_process_as_it_was(ckpt):
    from lit_align.vllm_engine import VLLMEngine

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    environ = dict(os.environ)
    threads = torch.get_num_threads()
    engine = VLLMEngine(ckpt, kv_cache_memory_bytes=KV_CACHE_BYTES)
    try:
        assert torch.equal(torch.rand(3), expected), "the global torch stream was re-seeded"
        added = {k for k in set(os.environ) - set(environ) if not k.startswith("VLLM_")}
        changed = {k for k in environ if os.environ.get(k) != environ[k]}
        assert not added and not changed, (added, changed)
        torch.set_num_threads(2)
        assert torch.get_num_threads() == 2, "torch.set_num_threads works again"
    finally:
        torch.set_num_threads(threads)
        engine.close()
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size"):
        VLLMEngine(ckpt, tensor_parallel_size=2)


def test_lora_adapters_are_merged_into_the_engine(ckpt):
    """model.lora: the engine samples with base + adapters (merged on each sync), not with the base alone."""
    module = GRPOModule(
        model_name_or_path=ckpt,
        rollout_engine="vllm",
        vllm_kv_cache_memory_bytes=KV_CACHE_BYTES,
        num_generations=G,
        max_new_tokens=T,
        temperature=TEMPERATURE,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
    )
    with torch.no_grad():  # adapters start as a no-op (B = 0): make them matter
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    module.sampler.start(module.world, None)
    try:
        diff, r = _check_sampled(module, _prompts(module))
        assert diff < 1e-4, diff
        with module.model.disable_adapter():  # the adapters change the log-probs: the check has teeth
            base = _fresh_logp(module.model, r, TEMPERATURE)
        assert float((base - r.sampler_logp).abs().max()) > 1e-2
    finally:
        module.sampler.stop()


def test_an_architecture_vllm_does_not_implement_samples_with_the_hf_path(ckpt):
    from lit_align.vllm_engine import VLLMEngine

    module = GRPOModule(model_name_or_path=ckpt, rollout_engine="vllm", num_generations=2, max_new_tokens=3)
    assert VLLMEngine.unsupported(module.model.config) is None
    module.model.config.architectures = ["NoSuchModelForCausalLM"]
    with pytest.warns(
        UserWarning, match=r"model.rollout_engine=vllm: vLLM has no implementation .*NoSuchModelForCausalLM"
    ):
        module.sampler.start(module.world, None)
    assert module.sampler.engine is None and module.sample(_prompts(module)).sampler == "decode"


def test_a_checkpoint_the_engine_builds_but_cannot_run_samples_with_the_hf_path(ckpt, tmp_path):
    """A Qwen2 with head size 16, which vLLM's CPU attention has no kernel for: the engine builds, its
    first generate raises; the probe at start-up catches that, closes the engine, says so once, and the
    HF sampler samples (instead of the run dying at its first rollout)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(ckpt)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    module = GRPOModule(
        model_name_or_path=str(tmp_path),
        rollout_engine="vllm",
        vllm_kv_cache_memory_bytes=KV_CACHE_BYTES,
        num_generations=2,
        max_new_tokens=3,
    )
    with pytest.warns(UserWarning, match=r"model.rollout_engine=vllm: the vLLM engine cannot run this checkpoint"):
        module.sampler.start(module.world, None)
    assert module.sampler.engine is None and module.sample(_prompts(module)).sampler == "decode"


def test_the_engine_stops_where_the_demonstrations_end(ckpt):
    """The token demonstrations end with (data.eos_token, here a named one; the chat template's end of turn by
    default) ends the engine's completions as it ends the HF loop's: the greedy completion is cut right after
    its first occurrence, token for token as lit-align's HF sampler cuts it."""
    import lightning as L

    from lit_align.data.datamodule import MixedDataModule

    def set_up(eos_token: str) -> tuple:
        dm = MixedDataModule(model_name_or_path=ckpt, val_batch_size=2, eos_token=eos_token, demo_check_rows=0)
        module = GRPOModule(
            model_name_or_path=ckpt,
            rollout_engine="vllm",
            vllm_kv_cache_memory_bytes=KV_CACHE_BYTES,
            num_generations=2,
            max_new_tokens=T,
        )
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
        trainer.validate(module, datamodule=dm, verbose=False)  # the data module's setup, then the module's
        return module, dm.collate_prompts(dm.prompt_rows[:4])

    module, prompts = set_up("eos")
    free = module.sample(prompts, greedy=True)  # the HF loop: the engine is built at fit start
    lengths = free.completion_mask.sum(-1).tolist()
    row = next(i for i, n in enumerate(lengths) if n >= 3)  # a completion with two tokens before its end
    ids = free.completion_ids[row, : lengths[row]].tolist()
    token = ids[1]
    module, prompts = set_up(module.tokenizer.convert_ids_to_tokens(token))
    module.sampler.start(module.world, None)
    try:
        engine = module.sample(prompts, greedy=True)
        hf = generate(
            module.model, module.tokenizer, prompts["prompt_ids"], prompts["prompt_mask"], greedy=True, max_new_tokens=T
        )
    finally:
        module.sampler.stop()
    assert engine.sampler == "vllm" and hf.sampler == "decode"
    assert engine.completion_ids[row][engine.completion_mask[row].bool()].tolist() == ids[: ids.index(token) + 1]
    assert engine.completion_ids.tolist() == hf.completion_ids.tolist()
    assert torch.equal(engine.completion_mask, hf.completion_mask)
