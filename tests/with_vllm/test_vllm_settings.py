"""Sampling settings the vLLM engine refuses stop the run at fit start, with the flag named (issue 22,
item 4; EasyR1 #399): ``temperature: 2.5`` passed the greedy start-up probe and died at the first
rollout, after the recipe's SFT warm-up. Each member of the class is refused before any update:

- the listed example, through ``train.py fit`` as a user runs it: configs/chord_phi.yaml (1,000 SFT-only
  updates first) with temperature 2.5 (vLLM takes [0, 2]; the HF sampler any temperature > 0);
- num_generations above vLLM's limit of completions per request (VLLM_MAX_N_SEQUENCES, 16384);
- max_new_tokens that leaves no room for a prompt in the engine's maximum length;
- the checkpoint's end tokens outside the model's vocabulary (the request the engine rejects).

Settings the engine takes (every filter on, temperature 2.0) start it, leave the process's random
stream as it was, and sample.
"""

import pytest
import torch
from _vllm_helpers import KV_CACHE_BYTES

from lit_align.modules.grpo import GRPOModule


def test_temperature_the_engine_refuses_stops_a_recipe_at_fit_start(tmp_path):
    from lit_align.cli import main

    args = [
        "fit",
        "--config",
        "configs/chord_phi.yaml",  # sft_warmup_steps 1000: the two updates below sample nothing
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.accelerator=cpu",
        "--data.init_args.expert_batch_size=4",
        "--data.init_args.prompt_batch_size=2",
        "--model.init_args.num_generations=2",
        "--model.init_args.rollout_engine=vllm",
        f"--model.init_args.vllm_kv_cache_memory_bytes={KV_CACHE_BYTES}",
        "--model.init_args.temperature=2.5",
    ]
    with pytest.raises(ValueError, match=r"model\.temperature=2\.5: the vLLM engine refuses it.*temperature must be"):
        main(args)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_generations": 16385}, r"model\.num_generations=16385: the vLLM engine refuses it.*n must be at most"),
        (
            {"max_new_tokens": 16, "vllm_max_model_length": 16},
            r"model\.max_new_tokens=16 leaves no room for a prompt in the vLLM engine's maximum length 16 "
            r"\(model\.vllm_max_model_length",
        ),
    ],
)
def test_settings_the_engine_refuses_fail_at_start(ckpt, settings, message):
    module = GRPOModule(
        model_name_or_path=ckpt, rollout_engine="vllm", vllm_kv_cache_memory_bytes=KV_CACHE_BYTES, **settings
    )
    try:
        with pytest.raises(ValueError, match=message):
            module.sampler.start(module.world, None)
        assert module.sampler.engine is None, "a refused engine is closed"
    finally:
        module.sampler.stop()


def test_end_tokens_outside_the_models_vocabulary_fail_at_start(ckpt):
    """Not a flag but the checkpoint's: an end token the model cannot emit (a tokenizer's added EOS without
    resized embeddings). The HF sampler samples on and never stops on it; the engine refuses the request."""
    module = GRPOModule(model_name_or_path=ckpt, rollout_engine="vllm", vllm_kv_cache_memory_bytes=KV_CACHE_BYTES)
    module.model.generation_config.eos_token_id = [module.tokenizer.eos_token_id, 999]
    try:
        with pytest.raises(ValueError, match=r"the checkpoint's end tokens \[1, 999\] .*the vLLM engine refuses them"):
            module.sampler.start(module.world, None)
        assert module.sampler.engine is None, "a refused engine is closed"
    finally:
        module.sampler.stop()


def test_settings_the_engine_takes_start_it_and_sample(ckpt):
    module = GRPOModule(
        model_name_or_path=ckpt,
        rollout_engine="vllm",
        vllm_kv_cache_memory_bytes=KV_CACHE_BYTES,
        num_generations=3,
        max_new_tokens=4,
        temperature=2.0,
        top_p=0.9,
        top_k=5,
        min_p=0.05,
        repetition_penalty=1.1,
    )
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    module.sampler.start(module.world, None)
    try:
        assert module.sampler.engine is not None
        assert torch.equal(torch.rand(3), expected), "the start-up checks leave the global random stream alone"
        enc = module.tokenizer(["12+34=", "4+4="], padding=True, return_tensors="pt")
        r = module.sample({"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask})
        assert r.sampler == "vllm" and r.completion_ids.shape[0] == 6
    finally:
        module.sampler.stop()
