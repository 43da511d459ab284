"""The vLLM engine samples with the policy's adapters merged as peft merges them (one merge, shared with the
export: lit_align.adapters.merged_state_dict): DoRA's magnitude vector (unsloth-zoo PR 828) and a trained
``modules_to_save`` output layer (unsloth PR 9331), on tied and untied checkpoints.

Per case, one engine: after every trainable tensor moved, (a) the engine's own weights equal peft's
``merge_and_unload()`` of the policy to 1e-6 (vLLM's fused qkv_proj / gate_up_proj compared as the
concatenations of the Hugging Face matrices) and (b) the log-probs it samples with equal an independent
forward of the live policy (< 1e-4), while the same completions under the base weights are far off (the
check has teeth).
"""

import copy
import warnings

import pytest
import torch
from _vllm_helpers import KV_CACHE_BYTES, qwen2_checkpoint

from lit_align.losses import token_logprobs
from lit_align.modules.grpo import GRPOModule
from lit_align.rollout import position_ids_from_mask

PROMPTS = ["12+34=", "1+2=", "57+28=", "4+4="]
G, T, TEMPERATURE = 4, 8, 0.7
CASES = {
    "dora-embedded-tied": ("embedded", {"target_modules": ["q_proj", "v_proj", "o_proj"], "use_dora": True}),
    "modules_to_save-lm_head-embedded-tied": (
        "embedded",
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    ),
    "modules_to_save-lm_head-qwen2-untied": (
        "qwen2-untied",
        {"target_modules": ["v_proj"], "modules_to_save": ["lm_head"]},
    ),
    "lora_bias-qwen2-untied": ("qwen2-untied", {"target_modules": ["q_proj", "k_proj"], "lora_bias": True}),
    "modules_to_save-embed_tokens-qwen2-tied": (
        "qwen2-tied",
        {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
    ),
}


@torch.no_grad()
def _engine_weights(worker) -> dict:
    """In the engine's worker: the weights its model computes with, under vLLM's names (float32 CPU copies).
    The CPU engine packs a linear layer's weight for its kernels and empties the parameter, so such a layer's
    weight is read back through its own kernel: W = cpu_linear(I)^T."""
    out = {}
    for name, module in worker.model_runner.model.named_modules():
        for key, p in module.named_parameters(prefix=name, recurse=False):
            out[key] = p.detach().float().cpu().clone()
        if callable(getattr(module, "cpu_linear", None)):
            size = getattr(module, "input_size_per_partition", None) or module.embedding_dim
            eye = torch.eye(size, dtype=worker.model_runner.model_config.dtype)
            out[f"{name}.weight"] = module.cpu_linear(eye, module.weight, None).T.float().cpu().clone()
    return out


def _as_vllm(hf: dict) -> dict:
    """Hugging Face weights under vLLM's names: q/k/v and gate/up stacked as vLLM fuses them."""
    fused = {
        "q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
        "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    }
    parts = {p for _, members in fused.values() for p in members}
    out = {}
    for name, tensor in hf.items():
        layer = name.split(".")[-2]
        if layer in fused:
            into, members = fused[layer]
            out[name.replace(layer, into)] = torch.cat([hf[name.replace(layer, m)] for m in members])
        elif layer not in parts:
            out[name] = tensor
    return {k: v.float() for k, v in out.items()}


@torch.no_grad()
def _fresh_logp(model, rollout) -> torch.Tensor:
    """log softmax(logits / T) at the sampled tokens from one plain forward of ``model`` (0 on padding)."""
    ids, mask = rollout.input_ids, rollout.attention_mask
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, rollout.prompt_ids.shape[1] - 1 : -1].float()
    return token_logprobs(logits, rollout.completion_ids, TEMPERATURE) * rollout.completion_mask


@pytest.mark.parametrize("case", list(CASES))
def test_the_engine_holds_peft_merged_weights_and_samples_with_the_live_policy(case, ckpt, tmp_path):
    kind, lora = CASES[case]
    path = ckpt if kind == "embedded" else qwen2_checkpoint(ckpt, tmp_path, tied=kind.endswith("-tied"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: a tied layer in the adapter
        module = GRPOModule(
            model_name_or_path=path,
            rollout_engine="vllm",
            vllm_kv_cache_memory_bytes=KV_CACHE_BYTES,
            num_generations=G,
            max_new_tokens=T,
            temperature=TEMPERATURE,
            lora={"r": 4, "lora_alpha": 8, **lora},
        )
    torch.manual_seed(0)
    with torch.no_grad():  # as training moves them: LoRA's B starts at 0, DoRA's magnitude at the norm
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(module.model).merge_and_unload()
    module.sampler.start(module.world, None)
    try:
        engine = module.sampler.engine
        assert engine is not None
        enc = module.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        torch.manual_seed(1)
        r = module.sample({"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask})
        assert r.sampler == "vllm"

        # (a) the engine's weights are peft's merge (the output layer its own matrix where peft unties it)
        assert engine.tied == merged.config.tie_word_embeddings
        held = engine.llm.collective_rpc(_engine_weights)[0]
        expected = _as_vllm({k: v.detach() for k, v in merged.state_dict().items()})
        assert set(held) <= set(expected), sorted(set(held) - set(expected))
        assert "lm_head.weight" in held or merged.config.tie_word_embeddings
        for name, tensor in held.items():  # vLLM pads the vocabulary rows of the embeddings (16 -> 64)
            torch.testing.assert_close(tensor[: len(expected[name])], expected[name], atol=1e-6, rtol=0, msg=name)

        # (b) its log-probs are the live policy's; the base weights' are far off
        m = r.completion_mask.bool()
        diff = float((r.sampler_logp - _fresh_logp(module.model, r)).abs()[m].max())
        assert diff < 1e-4, f"max |vLLM - policy| log-prob {diff}"
        with module.model.disable_adapter():
            base = _fresh_logp(module.model, r)
        assert float((base - r.sampler_logp).abs()[m].max()) > 1e-2
    finally:
        module.sampler.stop()
