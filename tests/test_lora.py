"""LoRA through peft (switchable in YAML), precision flags, and exporting from a checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from lit_align.cli import main  # noqa: E402
from lit_align.events import read_scalars  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LORA = "{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj], lora_dropout: 0.0}"
TINY = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.expert_batch_size=4",
    "--data.init_args.prompt_batch_size=2",
    "--data.init_args.val_batch_size=4",
]


def _weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_lora_reference_is_the_policy_without_adapters(ckpt):
    from lit_align.modules.grpo import GRPOModule

    module = GRPOModule(
        model_name_or_path=ckpt, num_generations=2, beta=0.1, lora={"r": 4, "target_modules": ["q_proj"]}
    )
    assert module.ref_model is None, "no second model is loaded under LoRA"
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = module.configure_optimizers()["optimizer"]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in module.model.parameters() if p.requires_grad
    )
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref_before = module.policy.ref_logits(ids, mask)
        torch.testing.assert_close(module.policy.logits(ids, mask), ref_before)  # B = 0 at init
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
        assert not torch.allclose(module.policy.logits(ids, mask), ref_before)
        torch.testing.assert_close(module.policy.ref_logits(ids, mask), ref_before)  # the reference stays the base


def test_bad_lora_config_names_the_field(ckpt):
    from lit_align.modules.sft import SFTModule

    with pytest.raises(ValueError, match="model.lora"):
        SFTModule(model_name_or_path=ckpt, lora={"r": 4, "no_such_option": 1})


def test_lora_from_yaml_trains_adapters_and_exports_merged_weights(tmp_path, ckpt):
    cli = main(
        [
            "fit",
            "--config",
            "configs/grpo.yaml",
            *TINY,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.lora={LORA}",
            "--model.init_args.beta=0.05",
            "--model.init_args.num_generations=2",
            "--model.init_args.optimizer.init_args.lr=0.05",
            "--model.init_args.reward=_rewards.CharCodeReward",
        ]
    )
    log_dir = Path(cli.trainer.log_dir)
    assert "train/kl" in read_scalars(log_dir)
    exported, start = _weights(log_dir / "hf_model"), _weights(ckpt)
    assert set(exported) == set(start), "a plain Hugging Face checkpoint: no peft names"
    changed = {k for k in start if not torch.equal(start[k], exported[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed), sorted(changed)

    # the documented command exports the same merged weights from the training checkpoint
    last = log_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    out = tmp_path / "from_ckpt"
    subprocess.run([sys.executable, "-m", "lit_align.export", str(last), str(out)], cwd=ROOT, check=True)
    again = _weights(out)
    for k in exported:
        torch.testing.assert_close(again[k], exported[k], msg=k)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    enc = tok(["12+3="], return_tensors="pt")
    assert model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id).shape[1] > 5


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_precision_flag_runs_a_step_on_cpu(tmp_path, precision):
    cli = main(
        [
            "fit",
            "--config",
            "configs/chord_phi.yaml",
            *TINY,
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            f"--trainer.precision={precision}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.init_args.num_generations=2",
            "--model.init_args.sft_warmup_steps=0",
        ]
    )
    module = cli.trainer.lightning_module
    assert cli.trainer.global_step == 1 and module.skipped_steps == 0
    dtype = next(module.model.parameters()).dtype
    assert dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    loss = read_scalars(Path(cli.trainer.log_dir))["train/loss"]
    assert loss and all(torch.isfinite(torch.tensor(v)) for _, v in loss)


# ---------------------------------------------------------------- one merge for the export and the engine
# Each case: (checkpoint, model.lora). The merged weights must equal peft's own merge_and_unload() and the
# exported model's logits the live policy's: DoRA's magnitude vector (unsloth-zoo PR 828), a lora_bias, a
# LoRA on an embedding, and a trained modules_to_save layer on tied and untied checkpoints (unsloth PR 9331).
MERGE_CASES = {
    "lora-tied": ("tied", {"target_modules": ["q_proj", "v_proj"]}),
    "dora-tied": ("tied", {"target_modules": ["q_proj", "v_proj"], "use_dora": True}),
    "dora-untied-all-linear": ("untied", {"target_modules": "all-linear", "use_dora": True}),
    "dora-gpt2-fan_in_fan_out": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "use_dora": True}),
    "lora_bias-gpt2": ("gpt2", {"target_modules": ["c_attn"], "lora_bias": True}),
    "lora-embedding-untied": ("untied", {"target_modules": ["embed_tokens", "q_proj"]}),
    "modules_to_save-lm_head-tied": ("tied", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "modules_to_save-lm_head-untied": ("untied", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "modules_to_save-embed_tokens-tied": ("tied", {"target_modules": ["v_proj"], "modules_to_save": ["embed_tokens"]}),
    "modules_to_save-ensure_weight_tying-tied": (
        "tied",
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "ensure_weight_tying": True},
    ),
    "dora-modules_to_save-gpt2": (
        "gpt2",
        {"target_modules": ["c_attn"], "use_dora": True, "modules_to_save": ["lm_head"]},
    ),
}


@pytest.fixture(scope="module")
def checkpoints(ckpt, tmp_path_factory) -> dict[str, str]:
    """The embedded Llama (tied embeddings), the same with an untied output layer of its own, and a tiny
    GPT-2 (Conv1D layers, so fan_in_fan_out, with biases; tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(ckpt)
    tied = AutoModelForCausalLM.from_pretrained(ckpt)
    config = AutoConfig.from_pretrained(ckpt)
    config.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    with torch.no_grad():
        untied.model.load_state_dict(tied.model.state_dict())
        untied.lm_head.weight.copy_(tied.lm_head.weight + 0.5 * torch.randn_like(tied.lm_head.weight))
    paths = {
        "tied": ckpt,
        "untied": str(tmp_path_factory.mktemp("untied")),
        "gpt2": str(tmp_path_factory.mktemp("gpt2")),
    }
    untied.save_pretrained(paths["untied"])
    tok.save_pretrained(paths["untied"])
    gpt2 = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok),
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(gpt2).save_pretrained(paths["gpt2"])
    tok.save_pretrained(paths["gpt2"])
    return paths


def _trained(path: str, lora: dict, seed: int = 0):
    """An SFT module with ``lora`` whose every trainable tensor moved (as training would move it; LoRA's
    B starts at 0, DoRA's magnitude at the weight norm, a modules_to_save copy at the original)."""
    import warnings

    from lit_align.modules.sft import SFTModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out on Conv1D, tied layers in the adapter
        module = SFTModule(model_name_or_path=path, lora={"r": 4, "lora_alpha": 8, **lora})
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return module


def _peft_merge(model):
    """peft's own merge of a copy: (state dict under Hugging Face names, its tie_word_embeddings)."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no longer tied after merging": peft unties, as the export does
        merged = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}, merged.config.tie_word_embeddings


def _assert_same(ours: dict, expected: dict, what: str) -> None:
    assert set(ours) == set(expected), f"{what}: {sorted(set(ours) ^ set(expected))}"
    for k, v in expected.items():
        torch.testing.assert_close(ours[k], v, atol=1e-6, rtol=0, msg=f"{what}: {k}")


IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [3, 4, 12, 13, 14, 2, 5, 7]])


def _export_and_compare(module, target) -> object:
    """Export as a fit ends (HFExport), load with AutoModelForCausalLM and compare its logits with the live
    policy's; returns the exported config."""
    from lit_align.callbacks import export

    export(module, target)
    return _loads_as_live(module, target)


def _loads_as_live(module, target) -> object:
    """Load ``target`` with AutoModelForCausalLM: its logits equal the live policy's (1e-5); its config."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(target)
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        live = module.policy.logits(IDS, mask)
        exported = loaded(input_ids=IDS, attention_mask=mask).logits
    torch.testing.assert_close(exported, live, atol=1e-5, rtol=0)
    return loaded.config


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merged_weights_equal_peft_merge_and_the_export_equals_the_live_policy(case, checkpoints, tmp_path):
    kind, lora = MERGE_CASES[case]
    module = _trained(checkpoints[kind], lora)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    expected, peft_tied = _peft_merge(module.model)
    _assert_same(module.policy.full_state_dict(), expected, "export weights")
    _assert_same(dict(module.policy.streamed_weights()), expected, "engine weights")
    after = module.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the live policy was changed by the merge"
    config = _export_and_compare(module, tmp_path / "hf_model")
    assert config.tie_word_embeddings == peft_tied


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_a_lora_on_one_of_two_tied_embeddings_exports_them_untied(target, checkpoints, tmp_path):
    """peft's own merge adds the delta to the one matrix both layers share (its logits then differ from the
    live model's); the export writes the two matrices the policy actually uses, untied."""
    module = _trained(checkpoints["tied"], {"target_modules": ["q_proj", target]})
    assert module.model.config.tie_word_embeddings
    assert not _export_and_compare(module, tmp_path / "hf_model").tie_word_embeddings


@pytest.mark.parametrize(
    "lora, says",
    [
        ({"target_modules": ["q_proj"], "trainable_token_indices": [3, 4]}, "TrainableTokensWrapper"),
        ({"target_modules": ["q_proj"], "lora_bias": True}, "lora_bias on .*q_proj, whose base layer has no bias"),
        ({"target_modules": ["q_proj"], "alora_invocation_tokens": [3]}, "LoRA variant ALoraLinearVariant"),
    ],
)
def test_adapters_the_merge_cannot_export_are_refused_before_training(lora, says, ckpt):
    from lit_align.modules.sft import SFTModule

    with pytest.raises(ValueError, match=f"model.lora: .*{says}"):
        SFTModule(model_name_or_path=ckpt, lora={"r": 4, **lora})


@pytest.mark.parametrize("case", ["dora-tied", "modules_to_save-lm_head-tied", "modules_to_save-lm_head-untied"])
def test_a_fit_with_adapters_exports_a_model_that_loads_as_the_live_policy(case, checkpoints, tmp_path):
    """``train.py fit`` with DoRA or a trained lm_head: hf_model/ (written at fit end) and the documented
    ``python -m lit_align.export`` of last.ckpt load with AutoModelForCausalLM with the trained policy's logits."""
    import json

    from transformers import AutoModelForCausalLM

    from lit_align.export import main as export_main

    kind, lora = MERGE_CASES[case]
    cli = main(
        [
            "fit",
            "--config",
            "configs/sft.yaml",
            *TINY,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.model_name_or_path={checkpoints[kind]}",
            f"--model.init_args.lora={json.dumps({'r': 4, 'lora_alpha': 8, **lora})}",
            "--model.init_args.warmup_steps=0",
            "--model.init_args.optimizer.init_args.lr=0.05",
        ]
    )
    module, log_dir = cli.trainer.lightning_module, Path(cli.trainer.log_dir)
    assert cli.trainer.global_step == 2
    config = _loads_as_live(module, log_dir / "hf_model")
    assert config.tie_word_embeddings == (kind == "tied" and "modules_to_save" not in lora)
    base = AutoModelForCausalLM.from_pretrained(checkpoints[kind])
    with torch.no_grad():  # the fit moved the policy away from its checkpoint: the comparison has teeth
        moved = (module.policy.logits(IDS, torch.ones_like(IDS)) - base(input_ids=IDS).logits).abs().max()
    assert float(moved) > 1e-2
    out = tmp_path / "from_ckpt"
    export_main([str(log_dir / "checkpoints" / "last.ckpt"), str(out)])
    again, exported = _weights(out), _weights(log_dir / "hf_model")
    assert set(again) == set(exported)
    for k in exported:
        torch.testing.assert_close(again[k], exported[k], atol=1e-6, rtol=0, msg=k)
