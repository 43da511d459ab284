"""Exact resume: a run killed with SIGKILL and resumed from its last checkpoint matches one that never stopped.

A checkpoint holds the policy, optimizer and LR schedule, the step (hence the mu schedule), each
training stream's position (ResumableLoader) and every rank's RNG states; checkpoints are written
atomically (AtomicCheckpointIO), so dying mid-save never replaces the last good one.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_align.events import read_scalars

ROOT = Path(__file__).resolve().parents[1]


class HangAfterStep(L.Callback):
    """Test helper: after policy update ``step`` write ``marker`` and wait to be killed."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(trainer.global_step))
            time.sleep(600)


def _data(tmp_path: Path) -> Path:
    """10 rows: 2 expert batches and 5 prompt batches per pass, so 7 steps cross pass and epoch ends."""
    rows = [
        {"prompt": f"{a}+{b}=", "response": str(a + b), "answer": str(a + b)}
        for a, b in [(12, 3), (40, 17), (8, 8), (55, 21), (9, 90), (33, 33), (71, 6), (18, 27), (64, 5), (2, 49)]
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(tmp_path: Path, save_dir: Path, *extra: str) -> list[str]:
    data = _data(tmp_path)
    return [
        "fit",
        "--config",
        "configs/chord_mu.yaml",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.max_steps=7",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.init_args.num_generations=2",
        "--model.init_args.warmup_steps=2",
        "--model.init_args.sft_warmup_steps=0",
        "--model.init_args.lr_decay=linear",  # the LR schedule's position matters too
        "--model.init_args.mu_schedule.init_args.warmup_steps=2",
        "--model.init_args.mu_schedule.init_args.decay_steps=4",  # mu changes every step
        "--model.init_args.reward=_rewards.LengthMatchReward",
        f"--data.init_args.expert_data={data}",
        f"--data.init_args.prompt_data={data}",
        "--data.init_args.expert_batch_size=4",
        "--data.init_args.prompt_batch_size=2",
        "--data.init_args.val_batch_size=4",
        # a checkpoint every 2 updates (the default one only follows val/accuracy)
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename=periodic-{step}",
        *extra,
    ]


def _run(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "hf_model" / "model.safetensors"))


# steps_per_generation 3: updates 3-5 share one rollout batch, so the checkpoint at step 4 falls
# between two of its mini-batches and the resumed run must train on the same rollouts
@pytest.mark.parametrize(
    "extra", [[], ["--model.init_args.steps_per_generation=3"]], ids=["on-policy", "mid-rollout-batch"]
)
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, ckpt, extra):
    def args(tmp_path, save_dir, *more):  # the run settings, plus this case's
        return _args(tmp_path, save_dir, *extra, *more)

    # 1. the reference: 7 steps, no interruption
    ref = _run(args(tmp_path, tmp_path / "ref"))
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]
    ref_dir = next((tmp_path / "ref").rglob("hf_model")).parent

    # 2. the same run, killed with SIGKILL after step 5 (last checkpoint: step 4)
    marker = tmp_path / "reached"
    killed = _run(
        args(
            tmp_path,
            tmp_path / "killed",
            "--trainer.callbacks+=test_resume.HangAfterStep",
            "--trainer.callbacks.step=5",
            f"--trainer.callbacks.marker={marker}",
        )
    )
    deadline = time.time() + 300
    while not marker.exists():
        assert killed.poll() is None, killed.stdout.read()[-3000:]
        assert time.time() < deadline, "the run never reached step 5"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    saved = sorted((tmp_path / "killed").rglob("periodic-*.ckpt"))
    assert [p.name for p in saved] == ["periodic-step=2.ckpt", "periodic-step=4.ckpt"]
    last = saved[-1]
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert not list(last.parent.glob("*.partial")), "no half-written checkpoint left next to it"

    # 3. resume from it
    resumed = _run(args(tmp_path, tmp_path / "killed", f"--ckpt_path={last}"))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    res_dir = max((tmp_path / "killed").rglob("hf_model")).parent

    ref_s, res_s = read_scalars(ref_dir), read_scalars(res_dir)
    # updates 5-7 (logged at steps 4-6, the count of updates before each) were redone after the kill
    for name in ("train/mu", "train/loss", "train/sft_loss", "train/rl_loss", "train/reward_mean", "train/lr"):
        after = {s: v for s, v in ref_s[name] if s >= 4}
        got = {s: v for s, v in res_s[name] if s >= 4}
        assert sorted(got) == sorted(after) == [4, 5, 6], (name, got, after)
        assert [got[s] for s in sorted(got)] == pytest.approx([after[s] for s in sorted(after)], rel=1e-4, abs=1e-5), (
            name
        )
    mus = [v for _, v in ref_s["train/mu"]]
    assert len(set(round(m, 6) for m in mus)) >= 4, "mu should move during the run"
    a, b = _weights(ref_dir), _weights(res_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_resumable_loader_continues_mid_pass_and_across_passes():
    from lit_align.data.datamodule import ResumableLoader

    make = lambda: ResumableLoader(list(range(10)), 3, lambda rows: rows, seed=7)  # noqa: E731
    full = make()
    stream = [b for _ in range(3) for b in full]  # 3 passes of 3 batches
    passes = [stream[i : i + 3] for i in (0, 3, 6)]
    assert passes[0] != passes[1], "each pass has its own order"
    for consumed in (0, 1, 3, 4, 8):
        first = make()
        seen = []
        it = iter(first)
        for _ in range(consumed):
            try:
                seen.append(next(it))
            except StopIteration:
                it = iter(first)
                seen.append(next(it))
        state = first.state_dict()
        second = make()
        second.load_state_dict(state)
        rest = list(second)
        while len(seen) + len(rest) < 9:
            rest += list(second)
        assert seen + rest[: 9 - len(seen)] == stream, consumed


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path):
    """SIGKILL in the middle of torch.save: the previous checkpoint is still whole and loadable."""
    target = tmp_path / "last.ckpt"
    marker = tmp_path / "writing"
    script = f"""
import time, torch
import lit_align.strategies as s
io = s.AtomicCheckpointIO()
io.save_checkpoint({{"step": 1, "w": torch.ones(1000)}}, {str(target)!r})
real = torch.save
def slow_save(obj, f, *a, **k):
    f.write(b"partial bytes of a checkpoint")
    f.flush()
    open({str(marker)!r}, "w").close()
    time.sleep(600)
s.torch.save = slow_save
io.save_checkpoint({{"step": 2, "w": torch.zeros(1000)}}, {str(target)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(target, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import lit_align.strategies as s

    io = s.AtomicCheckpointIO()
    target = tmp_path / "a.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def broken(obj, f, *a, **k):
        f.write(b"xx")
        raise OSError("disk full")

    monkeypatch.setattr(s.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


# ----------------------------------------------------------------------------- another number of devices
# GRPO with each rollout batch split over 2 updates (steps_per_generation 2): updates 3-4 and 5-6 share one
# rollout batch each, so the checkpoints after updates 3 and 5 fall inside a rollout batch. CharCodeReward:
# nearly every group has non-zero advantages, so each rank's rows move the weights.
INSIDE_A_ROLLOUT_BATCH = [
    "--model.init_args.steps_per_generation=2",
    "--model.init_args.reward=_rewards.CharCodeReward",
    "--trainer.limit_val_batches=0",
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=1",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.filename=periodic-{step}",
]


def _policy_weights(path: Path) -> dict:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.")}


def test_a_checkpoint_inside_a_rollout_batch_resumes_on_other_device_counts(tmp_path):
    """Taken on 2 devices after update 3 (the rollout batch of updates 3-4 half used), a checkpoint resumed
    on 1 device trains update 4 on both ranks' buffered rollouts: the weights after it are the 2-device run's
    (only rank 0's rows were kept, silently: half the update). A checkpoint taken on 1 device inside a rollout
    batch cannot be split over 2: the resume stops before training, naming both device counts."""
    from test_distributed import train

    proc, two = train("grpo", "ddp", tmp_path / "two", *INSIDE_A_ROLLOUT_BATCH, "--trainer.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = {p.name: p for p in two.rglob("periodic-step=*.ckpt")}
    assert {"periodic-step=3.ckpt", "periodic-step=4.ckpt"} <= set(saved)
    rollouts = torch.load(saved["periodic-step=3.ckpt"], weights_only=False)["lit_align_state"]["rng"]
    assert [len(r["rollout_batch"]["advantages"]) for r in rollouts] == [4, 4], "2 prompts x G=2 on each rank"

    proc, one = train(
        "grpo",
        "auto",
        tmp_path / "one",
        *INSIDE_A_ROLLOUT_BATCH,
        "--trainer.devices=1",
        "--trainer.max_steps=5",
        f"--ckpt_path={saved['periodic-step=3.ckpt']}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = {p.name: p for p in one.rglob("periodic-step=*.ckpt")}
    before, want = _policy_weights(saved["periodic-step=3.ckpt"]), _policy_weights(saved["periodic-step=4.ckpt"])
    got = _policy_weights(resumed["periodic-step=4.ckpt"])
    assert sum(float((want[k] - before[k]).abs().sum()) for k in want) > 1e-3, "update 4 moved the weights"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")

    # the 1-device run's checkpoint after update 5 holds one rank's half-used rollout batch: not for 2 devices
    proc, _ = train(
        "grpo", "ddp", tmp_path / "more", *INSIDE_A_ROLLOUT_BATCH, f"--ckpt_path={resumed['periodic-step=5.ckpt']}"
    )
    assert proc.returncode != 0, "resumed on 2 devices from 1 device's rollouts"
    err = proc.stderr
    assert "taken on 1 device" in err and "resumed on 2 devices" in err, err[-3000:]
    assert "periodic-step=5.ckpt" in err and "multiple of 2" in err, err[-3000:]
    assert "Epoch 0" not in err and not list((tmp_path / "more").rglob("periodic-step=6.ckpt"))


def _rank_batches(ckpt: str, module) -> list[dict]:
    """Two ranks' buffered rollout batches (as checkpoints hold them): their own prompts, of other widths."""
    from _rewards import CharCodeReward

    module.rewards = module.heldout.rewards = type(module.rewards)(CharCodeReward())
    out = []
    for texts, answers in ((["12+34=", "1+2="], ["46", "3"]), (["57+28=", "4+4=", "1999+10="], ["85", "8", "2009"])):
        enc = module.tokenizer(texts, padding=True, return_tensors="pt")
        prompts = {"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask, "prompts": texts, "answers": answers}
        module.rollout_buffer.cycle = module.rollout_batch(prompts)
        out.append({"rollout_batch": module.rollout_buffer.state_dict()})
    module.rollout_buffer.cycle = None
    return out


def test_fewer_devices_take_every_ranks_rollouts_each_update_its_own_mini_batches(ckpt):
    """The merge of 2 ranks' rollout batches on 1 device: update r of the batch trains on rank 0's mini-batch
    r and rank 1's, padded to common widths without changing a log-prob; the metrics are averaged (counts
    summed); at a rollout-batch boundary nothing is kept."""
    from lit_align.core.policy import Completions
    from lit_align.modules.grpo import GRPOModule

    torch.manual_seed(0)
    module = GRPOModule(model_name_or_path=ckpt, num_generations=2, max_new_tokens=6, steps_per_generation=3)
    states = _rank_batches(ckpt, module)
    sources = [s["rollout_batch"] for s in states]
    assert sources[0]["rollout"]["prompt_ids"].shape[1] != sources[1]["rollout"]["prompt_ids"].shape[1]
    assert module._buffered_rollouts(states, 0, 1, {"global_step": 3}) is None, "a boundary: sampled afresh"
    merged = module._buffered_rollouts(states, 0, 1, {"global_step": 4})
    module.rollout_buffer.load_state_dict(merged)
    cycle = module.rollout_buffer.cycle
    assert len(cycle["advantages"]) == len(cycle["rollout"].completions) == 4 + 6
    summed = sum(float(s["metrics"]["reward_errors"]) for s in sources)
    assert float(cycle["metrics"]["reward_errors"]) == summed
    mean = (float(sources[0]["metrics"]["reward_mean"]) + float(sources[1]["metrics"]["reward_mean"])) / 2
    assert float(cycle["metrics"]["reward_mean"]) == pytest.approx(mean)
    module.train()
    for position in range(3):
        rows = module.rollout_buffer.rollout_rows(cycle, position)
        want = []
        for s in sources:
            part = module.rollout_buffer.minibatch(len(s["advantages"]), position)
            want += [(s["rollout"]["completions"][i], float(s["advantages"][i])) for i in part.tolist()]
        got = list(zip(rows["rollout"].completions, rows["advantages"].tolist()))
        assert got == want, position
        r = rows["rollout"]
        with torch.no_grad():
            logp = module.policy.logprobs(Completions.of(r), torch.arange(len(got))).logp
        m = r.completion_mask[:, : logp.shape[1]].bool()
        # the sampling-time log-probs stand against the merged, padded rows: the first update has ratio 1
        assert (logp - r.old_logp[:, : logp.shape[1]]).abs()[m].max() < 1e-5


def test_a_rollout_batch_that_cannot_be_merged_is_refused_naming_the_device_counts(ckpt):
    """More devices than the checkpoint's (a rank would have no rows), and HPT on fewer (its buffered rows
    point into the training batch by prompt index): a ValueError before any update."""
    from lit_align.modules.grpo import GRPOModule
    from lit_align.modules.hpt import HPTModule

    module = GRPOModule(model_name_or_path=ckpt, num_generations=2, max_new_tokens=4, steps_per_generation=3)
    states = _rank_batches(ckpt, module)
    with pytest.raises(ValueError, match=r"taken on 1 device inside a rollout batch .* resumed on 2 devices"):
        module._buffered_rollouts(states[:1], 1, 2, {"global_step": 4})
    hpt = HPTModule(model_name_or_path=ckpt, num_generations=2, max_new_tokens=4, steps_per_generation=3)
    with pytest.raises(ValueError, match=r"taken on 2 devices .* resumed on 1 device: HPTModule reads each"):
        hpt._buffered_rollouts(states, 0, 1, {"global_step": 5})
    assert hpt._buffered_rollouts(states, 0, 1, {"global_step": 6}) is None  # a boundary: nothing to merge
