"""End-to-end: train.py's CLI on every config, a few steps on a tiny setting."""

import math
from pathlib import Path

import pytest
import torch

from lit_align.cli import main
from lit_align.events import read_scalars

TINY = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.expert_batch_size=4",
    "--data.init_args.prompt_batch_size=2",
    "--data.init_args.val_batch_size=8",
]
SFT_NAMES = {
    "train/loss",
    "train/sft_loss",
    "train/expert_nll",
    "train/entropy",
    "train/grad_norm",
    "train/lr",
    "train/mu",
}
RL_NAMES = {
    "train/loss",
    "train/rl_loss",
    "train/reward_mean",
    "train/reward_std",
    "train/frac_reward_zero_std",
    "train/entropy",
    "train/completion_length",
    "train/clip_ratio",
    "train/grad_norm",
    "train/lr",
    "train/mu",
}
VAL_NAMES = {"val/accuracy", "val/reward", "val/expert_nll", "val/expert_token_acc"}


def fit(config: str, save_dir: Path, *extra: str):
    args = [
        "fit",
        "--config",
        f"configs/{config}.yaml",
        *TINY,
        f"--trainer.logger.init_args.save_dir={save_dir}",
        *extra,
    ]
    return main(args)


def weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.parametrize(
    "config,names,extra",
    [
        ("sft", SFT_NAMES, []),
        # a freshly initialised policy earns no exact-answer reward (all advantages 0, no update):
        # a length-match reward gives GRPO a signal to learn from
        (
            "grpo",
            RL_NAMES | {"train/kl"},
            [
                "--model.init_args.num_generations=4",
                "--model.init_args.beta=0.05",
                "--model.init_args.reward=_rewards.LengthMatchReward",
            ],
        ),
        (
            "sft_then_grpo",
            SFT_NAMES | RL_NAMES,
            ["--model.init_args.num_generations=2", "--model.init_args.sft_steps=2"],
        ),
        (
            "chord_mu",
            SFT_NAMES | RL_NAMES | {"train/entropy_usual", "train/entropy_expert"},
            ["--model.init_args.num_generations=2", "--model.init_args.sft_warmup_steps=1"],
        ),
        (
            "chord_phi",
            SFT_NAMES | RL_NAMES | {"train/token_weight_mean"},
            ["--model.init_args.num_generations=2", "--model.init_args.sft_warmup_steps=0"],
        ),
        # CHORD on other RL objectives (docs/guides/rl_objectives.md): GSPO's sequence ratio with the top-entropy
        # token mask and an entropy bonus; CISPO with Dr.GRPO's constant normaliser
        (
            "chord_phi",
            SFT_NAMES | RL_NAMES | {"train/top_entropy_token_share"},
            [
                "--model.init_args.num_generations=2",
                "--model.init_args.sft_warmup_steps=0",
                "--model.init_args.importance_sampling_level=sequence",
                "--model.init_args.top_entropy_quantile=0.5",
                "--model.init_args.entropy_coef=0.01",
            ],
        ),
        (
            "chord_phi",
            SFT_NAMES | RL_NAMES,
            [
                "--model.init_args.num_generations=2",
                "--model.init_args.sft_warmup_steps=0",
                "--model.init_args.policy_loss=cispo",
                "--model.init_args.epsilon_high=5.0",
                "--model.init_args.loss_aggregation=seq-mean-token-sum-norm",
            ],
        ),
    ],
    ids=["sft", "grpo", "sft_then_grpo", "chord_mu", "chord_phi", "chord_phi-gspo", "chord_phi-cispo-dr"],
)
def test_config_trains_logs_and_checkpoints(config, names, extra, tmp_path, ckpt):
    cli = fit(config, tmp_path, *extra)
    trainer = cli.trainer
    assert trainer.global_step == 4, "max_steps counts policy updates"
    log_dir = Path(trainer.log_dir)
    scalars = read_scalars(log_dir)
    missing = (names | VAL_NAMES) - set(scalars)
    assert not missing, f"not logged: {sorted(missing)}"
    assert all(math.isfinite(v) for _, v in scalars["train/loss"])
    assert (log_dir / "config.yaml").is_file()
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    exported = weights(log_dir / "hf_model")
    start = weights(ckpt)
    changed = [k for k in start if not torch.equal(start[k], exported[k])]
    assert changed, "the policy did not change"


def test_exported_model_loads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli = fit("sft", tmp_path)
    out = Path(cli.trainer.log_dir) / "hf_model"
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    enc = tok(["12+3="], return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > enc.input_ids.shape[1]


def test_rerun_into_same_log_dir_and_print_config(tmp_path, capsys):
    first = fit("sft", tmp_path, "--trainer.max_steps=1")
    second = fit("sft", tmp_path, "--trainer.max_steps=1")
    assert first.trainer.log_dir != second.trainer.log_dir
    assert (Path(second.trainer.log_dir) / "config.yaml").is_file()
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "configs/chord_phi.yaml", "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "lit_align.CHORDModule" in printed and "token_weighting: phi" in printed


def test_validate_and_test_subcommands_report_accuracy(tmp_path):
    common = [
        "--config",
        "configs/sft.yaml",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(["validate", *common, "--trainer.limit_val_batches=1"])
    assert {"val/accuracy", "val/expert_nll"} <= set(cli.trainer.callback_metrics)
    cli = main(["test", *common, "--trainer.limit_test_batches=1"])
    assert {"test/accuracy", "test/reward", "test/expert_token_acc"} <= set(cli.trainer.callback_metrics)


def test_validation_scores_each_batch_once(tmp_path):
    """A reward without its own ``correct`` is called once per validation batch; accuracy is the
    share of full rewards among those same scores."""
    cli = main(
        [
            "validate",
            "--config",
            "configs/sft.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=2",
            "--data.init_args.val_batch_size=16",
            "--model.init_args.reward=_rewards.CountingReward",
            "--data.init_args.retention_data=null",
        ]
    )
    calls = cli.model.reward.calls
    # per batch: the greedy answers, then (first pass only) the demonstrations for val/expert_nll_correct
    assert len(calls) == 4, "one reward call per validation batch, plus one per batch of unseen demonstrations"
    rewards = torch.cat(calls[0::2])
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/accuracy"]) == pytest.approx(float((rewards >= 1).float().mean()))
    assert float(metrics["val/reward"]) == pytest.approx(float(rewards.mean()))
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert len(calls) == 6, "a second validation pass checks no demonstration again"


def test_retention_is_the_greedy_accuracy_on_each_held_out_skill(ckpt, tmp_path):
    """val/retention/<skill> is the share of the skill's held-out prompts whose greedy answer is right, one metric
    per skill, next to the task's own val/ metrics (no dataloader suffix on any of them)."""
    import json

    from lit_align.data.embedded import build_tokenizer
    from lit_align.hf import load_model

    model, tok = load_model(ckpt), build_tokenizer()
    prompts = [f"{a}-{b}=" for a in range(10, 30) for b in range(3)]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    greedy = [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    rows = [(p, g) for p, g in zip(prompts, greedy) if g][:12]
    assert len(rows) == 12, greedy
    files = {}
    for skill, right in (("half", 5), ("none", 0)):  # the model's own greedy answer for the first `right` rows
        files[skill] = tmp_path / f"{skill}.jsonl"
        files[skill].write_text(
            "".join(
                json.dumps({"prompt": p, "answer": g if i < right else g + "7"}) + "\n" for i, (p, g) in enumerate(rows)
            )
        )
    cli = main(
        [
            "validate",
            "--config",
            "configs/sft.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=2",
            "--data.init_args.val_batch_size=5",
            f"--data.init_args.retention_data={json.dumps({k: str(v) for k, v in files.items()})}",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/retention/half"]) == pytest.approx(0.5)  # 2 batches of 5: rows 0-9, 0-4 right
    assert float(metrics["val/retention/none"]) == 0.0
    assert {"val/accuracy", "val/expert_nll", "val/expert_nll_correct"} <= set(metrics)
    assert not [k for k in metrics if "dataloader_idx" in k]


def test_bad_model_path_fails_before_training(tmp_path):
    # the CLI reports the constructor's error (jsonargparse wraps it in a ValueError)
    with pytest.raises((FileNotFoundError, ValueError), match="no_such_dir.*directory does not exist"):
        fit("sft", tmp_path, f"--model.init_args.model_name_or_path={tmp_path / 'no_such_dir'}")


def test_grpo_needs_two_generations(tmp_path):
    with pytest.raises(ValueError, match="num_generations=1"):
        fit("grpo", tmp_path, "--model.init_args.num_generations=1")


def test_a_flag_out_of_range_ends_the_output_with_its_message_not_the_parsed_config(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "train.py"),
            "fit",
            "--config",
            str(root / "configs" / "grpo.yaml"),
            "--model.init_args.micro_batch_size=0",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert (
        lines[-1]
        == "ValueError: model.micro_batch_size=0 is out of range: it must be null (the whole batch) or an integer >= 1"
    )
    assert "Namespace(" not in proc.stderr and "Union subtypes" not in proc.stderr and len(lines) < 20
    assert not list(tmp_path.rglob("*.ckpt"))


def test_missing_data_file_fails_before_training(tmp_path):
    from lit_align.data.loading import DataError

    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        fit("sft", tmp_path, f"--data.init_args.expert_data={tmp_path / 'missing.jsonl'}")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_expert_nll_is_split_by_the_verifiers_verdict_on_each_demonstration(tmp_path):
    """val/expert_nll_correct / _incorrect: the token-weighted NLL of the held-out demonstrations the
    reward accepts / rejects (here: the expert's carry mistakes), recomputed by hand; together they
    make up val/expert_nll. With an error-free expert the incorrect class is empty: NaN."""
    from lit_align import losses

    args = [
        "validate",
        "--config",
        "configs/sft.yaml",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=2",
        "--data.init_args.val_batch_size=50",
        "--data.init_args.retention_data=null",
    ]  # the task's own held-out loader only
    cli = main(args)
    model, metrics = cli.model, cli.trainer.callback_metrics
    sums = {True: [0.0, 0], False: [0.0, 0]}
    loader = cli.datamodule.val_dataloader()
    with torch.no_grad():
        for _, batch in zip(range(2), loader):
            e = batch["expert"]
            logits = model.model(input_ids=e["input_ids"], attention_mask=e["attention_mask"]).logits[:, :-1]
            labels = e["labels"][:, 1:]
            logp = losses.token_logprobs(logits.float(), labels.clamp(min=0))
            for row, (resp, ans) in enumerate(zip(batch["responses"], batch["answers"])):
                keep = labels[row] != -100
                sums[resp == ans][0] += float(-logp[row][keep].sum())
                sums[resp == ans][1] += int(keep.sum())
    assert sums[False][1] > 0 and sums[True][1] > 0, "both kinds of demonstration in two batches of 50"
    assert float(metrics["val/expert_nll_correct"]) == pytest.approx(sums[True][0] / sums[True][1], rel=1e-4)
    assert float(metrics["val/expert_nll_incorrect"]) == pytest.approx(sums[False][0] / sums[False][1], rel=1e-4)
    total = (sums[True][0] + sums[False][0]) / (sums[True][1] + sums[False][1])
    assert float(metrics["val/expert_nll"]) == pytest.approx(total, rel=1e-4)

    clean = main([*args, "--data.init_args.expert_error_rate=0.0"]).trainer.callback_metrics
    assert math.isnan(float(clean["val/expert_nll_incorrect"])) and math.isfinite(
        float(clean["val/expert_nll_correct"])
    )


@pytest.mark.parametrize("checkpointing", [False, True])
def test_enable_checkpointing_false_writes_no_checkpoint(checkpointing, tmp_path):
    """``--trainer.enable_checkpointing=false`` leaves the default ModelCheckpoint out (Lightning refuses
    one then); otherwise the default one writes, next to a config's own ModelCheckpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    mine = tmp_path / "mine"
    extra = (
        ["--trainer.enable_checkpointing=false"]
        if not checkpointing
        else [
            "--trainer.callbacks+=ModelCheckpoint",
            f"--trainer.callbacks.dirpath={mine}",
            "--trainer.callbacks.every_n_train_steps=1",
            "--trainer.callbacks.save_top_k=-1",
        ]
    )
    cli = fit("sft", tmp_path / "runs", "--trainer.max_steps=2", "--data.init_args.val_batch_size=4", *extra)
    assert cli.trainer.global_step == 2
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "hf_model" / "model.safetensors").is_file(), "the export does not need checkpoints"
    checkpoints = sum(isinstance(c, ModelCheckpoint) for c in cli.trainer.callbacks)
    if not checkpointing:
        assert checkpoints == 0 and not list(tmp_path.rglob("*.ckpt"))
    else:
        assert checkpoints == 2
        assert (log_dir / "checkpoints" / "last.ckpt").is_file()
        assert sorted(p.name for p in mine.glob("*.ckpt")) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_a_command_line_value_starting_with_hash_stops_instead_of_becoming_null(form, tmp_path):
    """jsonargparse reads a command-line value that starts with '#' as a YAML comment: GSM8K's
    answer_pattern '####\\s*(.+)' silently became null (every reward 0); the documented form is read as
    written."""
    from lit_align.cli import check_hash_values

    pattern = r"####\s*(.+)"
    flag = "--data.init_args.answer_pattern"
    args = [flag, pattern] if form == "separate" else [f"{flag}={pattern}"]
    with pytest.raises(ValueError, match=r"answer_pattern=.*YAML comment.*'\[#\]\{4\}\\s\*\(\.\+\)'"):
        main(["fit", "--config", "configs/grpo.yaml", *args, "--print_config"])
    with pytest.raises(ValueError, match="system_prompt"):
        check_hash_values(["fit", "--data.init_args.system_prompt", " # Rules"])
    check_hash_values(["fit", "--data.init_args.system_prompt", "Answer after ####.", "--print_config"])
    cli = main(["--config", "configs/grpo.yaml", flag, r"[#]{4}\s*(.+)"], run=False)
    assert cli.datamodule.hparams.answer_pattern == r"[#]{4}\s*(.+)"
