"""model.disable_dropout: a strictly on-policy update is exactly on-policy (ratio 1, KL 0)."""

import json

import pytest
import torch

from lit_align import losses
from lit_align.hf import config_as_loaded, disable_dropout_in_model

RATES = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "summary_first_dropout": 0.1}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> str:
    """A tiny GPT-2 checkpoint with dropout 0.1 everywhere, on the embedded tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_align.data.embedded import build_tokenizer

    tok = build_tokenizer()
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=64,
        vocab_size=len(tok),
        **RATES,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _module(path: str, **kw):
    from lit_align.modules.grpo import GRPOModule

    torch.manual_seed(0)
    return GRPOModule(model_name_or_path=path, num_generations=4, max_new_tokens=8, **kw)


def _rollout(module):
    enc = module.tokenizer(["12+34=", "5+6=", "70+8="], padding=True, return_tensors="pt")
    return module.sample({"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask})


def _train_logp(module, rollout) -> torch.Tensor:
    """The policy's log-probs of the rollout's tokens as the training step computes them (train mode)."""
    assert module.model.training
    start = rollout.prompt_ids.shape[1] - 1
    with torch.no_grad():
        logits = module.policy.logits(rollout.input_ids, rollout.attention_mask, start=start)
    return losses.token_logprobs(logits, rollout.completion_ids, module.hparams.temperature)


def _max_ratio_gap(module, rollout) -> float:
    logp = _train_logp(module, rollout)
    mask = rollout.completion_mask.bool()
    assert mask.sum() > 0
    return (torch.exp(logp - rollout.old_logp) - 1).abs()[mask].max().item()


def test_first_on_policy_update_has_ratio_one_and_kl_zero(gpt2):
    module = _module(gpt2, beta=0.1)  # disable_dropout=True by default
    rollout = _rollout(module)
    assert _max_ratio_gap(module, rollout) < 1e-6
    torch.testing.assert_close(_train_logp(module, rollout), _train_logp(module, rollout), rtol=0, atol=0)
    with torch.no_grad():
        _, metrics = module.rl_terms(rollout, torch.rand(rollout.completion_ids.shape[0]))
    assert metrics["kl"].item() == 0.0
    assert metrics["clip_ratio"].item() == 0.0


def test_with_dropout_kept_the_update_is_off_policy(gpt2):
    module = _module(gpt2, beta=0.1, disable_dropout=False)
    rollout = _rollout(module)
    assert _max_ratio_gap(module, rollout) > 1e-3
    with torch.no_grad():
        _, metrics = module.rl_terms(rollout, torch.rand(rollout.completion_ids.shape[0]))
    assert metrics["kl"].item() > 0.0


@pytest.mark.parametrize("disable", [True, False])
def test_lora_dropout_and_the_adapter_free_reference(gpt2, disable):
    pytest.importorskip("peft")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "lora_dropout": 0.1}
    module = _module(gpt2, beta=0.1, lora=lora, disable_dropout=disable)
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # adapters that change the output, so their dropout shows
    rollout = _rollout(module)
    start = rollout.prompt_ids.shape[1] - 1
    with torch.no_grad():
        refs = [module.policy.ref_logits(rollout.input_ids, rollout.attention_mask, start=start) for _ in range(2)]
    policy = [_train_logp(module, rollout) for _ in range(2)]
    if disable:
        torch.testing.assert_close(refs[0], refs[1], rtol=0, atol=0)
        torch.testing.assert_close(policy[0], policy[1], rtol=0, atol=0)
        assert _max_ratio_gap(module, rollout) < 1e-6
    else:
        assert not torch.equal(refs[0], refs[1])
        assert not torch.equal(policy[0], policy[1])


def test_disable_dropout_in_model_zeroes_modules_attributes_and_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        attention_dropout=0.1,
    )
    model = LlamaForCausalLM(config)
    model.extra = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Dropout(0.0))
    model.extra.dropout_keep_prob = 0.9  # a keep probability is not a dropout rate
    # 2 attention modules' self.attention_dropout, 1 nn.Dropout with p > 0, config.attention_dropout
    assert disable_dropout_in_model(model) == 4
    assert model.config.attention_dropout == 0.0
    assert all(m.self_attn.attention_dropout == 0.0 for m in model.model.layers)
    assert model.extra[0].p == 0.0 and model.extra.dropout_keep_prob == 0.9
    assert disable_dropout_in_model(model) == 0
    as_loaded = config_as_loaded(model.config)
    assert as_loaded.attention_dropout == 0.1 and model.config.attention_dropout == 0.0


def test_export_keeps_the_checkpoints_dropout(gpt2, tmp_path):
    from lit_align.export import save_module

    module = _module(gpt2)
    assert all(getattr(module.model.config, k) == 0.0 for k in RATES)  # trained without dropout
    save_module(module, tmp_path, module.full_state_dict())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in RATES} == RATES  # exported as loaded
