"""What a user sees first and last (issue 22, items 13-14): TensorBoard opens on the training curves, not
on single-point set-up counts, which are in a text summary and the hyper-parameters instead; and a run
ends with its final scores, the TensorBoard command for it and where the exported model is."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lit_align.cli import main

ROOT = Path(__file__).resolve().parents[1]
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


def fit(config: str, save_dir: Path, *extra: str):
    return main(
        ["fit", "--config", f"configs/{config}.yaml", *TINY, f"--trainer.logger.init_args.save_dir={save_dir}", *extra]
    )


def events(log_dir) -> EventAccumulator:
    (path,) = Path(log_dir).glob("events.out.tfevents.*")
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_a_clean_run_opens_on_no_zero_data_scalar_and_keeps_the_counts_in_text_and_hparams(tmp_path, capsys):
    cli = fit("sft", tmp_path)
    log_dir, dm = Path(cli.trainer.log_dir), cli.datamodule
    acc = events(log_dir)
    data = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith("data/")}
    # the headline of the set-up self-check stays a scalar; no count of a clean run is a chart
    assert set(data) == {"data/demo_reward_rate"}, sorted(data)
    assert all(v != 0 for values in data.values() for v in values)

    # every count is in the text summary (one table, at step 0) ...
    (text,) = acc.Tensors("data/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert text.step == 0
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert f"| {len(dm.expert_rows)} | 0 | 0 | 0 |" in rows["expert"]
    assert f"| {len(dm.val_rows)} | 0 | 0 | 0 |" in rows["val"]
    for skill, kept in dm.retention_rows.items():
        assert f"| {len(kept)} | 0 | 0 | 0 |" in rows[f"retention/{skill}"]
    assert "held-out prompts also in the training data: 0" in table
    assert f"{dm.stats['data/demo_reward_rate']:.0%}" in table

    # ... and in the hyper-parameters (hparams.yaml and TensorBoard's HPARAMS tab)
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert {k: v for k, v in hparams.items() if k.startswith("data/")} == pytest.approx(dm.stats)
    assert hparams["data/expert_rows"] == len(dm.expert_rows) and hparams["expert_batch_size"] == 4
    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    logged = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert logged["data/expert_rows"].number_value == len(dm.expert_rows)

    # the end of the run: the final validation's accuracy (the one of step 4) and SFT's headline metrics
    metrics = cli.trainer.callback_metrics
    lines = capsys.readouterr().out.splitlines()
    expert_nll = float(metrics["train/expert_nll"])
    assert lines[-3].startswith(f"val/accuracy {float(metrics['val/accuracy']):.3f} at step 4 (")
    assert f"train/expert_nll {expert_nll:.3g}" in lines[-3]
    for skill in dm.retention_rows:
        assert f"val/retention/{skill} {float(metrics[f'val/retention/{skill}']):.3f}" in lines[-3]
    assert lines[-2] == f"TensorBoard: tensorboard --logdir {log_dir.resolve()}"
    assert lines[-1] == f"Exported model: {log_dir.resolve() / 'hf_model'}"
    assert math.isfinite(expert_nll)


def test_an_rl_method_ends_with_its_own_headline_metrics(tmp_path, capsys):
    cli = main(
        [
            "fit",
            "--config",
            "configs/chord_phi.yaml",
            *TINY,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.init_args.num_generations=2",
            "--model.init_args.sft_warmup_steps=0",
            "--trainer.max_steps=2",  # one validation, at the last update
        ]
    )
    metrics = cli.trainer.callback_metrics
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("val/accuracy")]
    for name in ("train/mu", "train/reward_mean", "train/token_weight_mean"):
        assert f"{name} {float(metrics[name]):.3g}" in line, line
    assert "train/expert_nll" not in line, "CHORD's headline is its mixing, not SFT's loss"


def test_train_py_ends_with_the_score_the_tensorboard_command_and_the_exported_model(tmp_path):
    """``python train.py fit --config configs/sft.yaml --trainer.max_steps 3``: no validation falls in 3
    updates (val_check_interval 250), which the last lines say rather than print a stale or absent score."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "fit",
            "--config",
            str(ROOT / "configs" / "sft.yaml"),
            "--trainer.max_steps",
            "3",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = tmp_path / "runs" / "sft" / "version_0"
    lines = proc.stdout.strip().splitlines()
    assert lines[-3].startswith("val/accuracy: not measured (no validation ran in the 3 updates; ")
    assert "last update: train/expert_nll " in lines[-3]
    assert lines[-2] == f"TensorBoard: tensorboard --logdir {log_dir}"
    assert lines[-1] == f"Exported model: {log_dir / 'hf_model'}"
    assert (log_dir / "hf_model" / "model.safetensors").is_file()
    assert sum(line.startswith("TensorBoard: ") for line in proc.stdout.splitlines()) == 1, "printed once"
