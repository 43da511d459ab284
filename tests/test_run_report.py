"""What a user sees first (issue 22, item 13): TensorBoard opens on the training curves, not on single-point
set-up counts, which are in a text summary and the hyper-parameters instead."""

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lit_align.cli import main

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


def test_a_clean_run_opens_on_no_zero_data_scalar_and_keeps_the_counts_in_text_and_hparams(tmp_path):
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
