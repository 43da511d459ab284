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
