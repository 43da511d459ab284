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
