"""DAPO's dynamic sampling (model.dynamic_sampling): groups whose rewards are all equal are dropped and the
rollout batch is refilled from the data module's refill stream; resume stays exact."""

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from _rewards import AnswerParityReward

from lit_align import GRPOModule, HPTModule, LUFFYModule, MixedDataModule, losses
from lit_align.core import dynamic_sampling
from lit_align.events import read_scalars
from lit_align.modules.policy import PolicyModule
from lit_align.rollout import Rollout


def _data(tmp_path: Path, n: int = 16, parity: str = "both") -> Path:
    """``n`` addition prompts whose answers alternate even, odd (``parity="even"``: all even)."""
    pairs = [(10 + i, 3) for i in range(n)] if parity == "both" else [(10 + 2 * i, 4) for i in range(n)]
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b), "answer": str(a + b)} for a, b in pairs]
    path = tmp_path / f"prompts_{parity}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _answer(prompt: str) -> int:
    """The sum a prompt ``"a+b="`` asks for."""
    return sum(map(int, prompt[:-1].split("+")))


class Recorder:
    """What a run did: every metrics dict logged (with its step), every round sampled, every rollout batch
    made and every refill batch drawn; the real methods run underneath."""

    def __init__(self, module, dm):
        self.logged, self.rounds, self.batches, self.refills = [], [], [], []
        log, sample, make, refill = module.log_metrics, module.sample_round, module.rollout_batch, dm.refill_prompts

        def logged(metrics):
            self.logged.append({k: float(v) for k, v in metrics.items()} | {"step": module.global_step})
            log(metrics)

        def sampled(batch):
            r = sample(batch)
            self.rounds.append((module.global_step, list(batch["prompts"]), r["rewards"].tolist()))
            return r

        def made(prompts):
            out = make(prompts)
            self.batches.append((module.global_step, out))
            return out

        def drawn():
            batch = refill()
            self.refills.append((module.global_step, list(batch["prompts"])))
            return batch

        module.log_metrics, module.sample_round, module.rollout_batch = logged, sampled, made
        dm.refill_prompts = drawn


def _fit(module, data: Path, steps: int, tmp_path: Path | None = None, ckpt_path=None, **data_args):
    dm = MixedDataModule(
        model_name_or_path=module.hparams.model_name_or_path,
        expert_data=None,
        prompt_data=str(data),
        val_data=None,
        seed=0,
        **data_args,
    )
    record = Recorder(module, dm)
    callbacks = []
    if tmp_path is not None:  # a checkpoint after every update
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1, save_last=False
            )
        )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=tmp_path is not None,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, record


def _grpo(ckpt: str, **kw) -> GRPOModule:
    settings = dict(
        model_name_or_path=ckpt,
        num_generations=4,
        max_new_tokens=4,
        reward=AnswerParityReward(),
        dynamic_sampling=True,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    return GRPOModule(**{**settings, **kw})


def _groups(values: list, G: int) -> list[list]:
    return [values[i : i + G] for i in range(0, len(values), G)]


# ----------------------------------------------------------------------------- the pure pieces
def test_signal_groups_are_those_whose_rewards_differ_over_every_member():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5 + 1e-10, 0.5, 2.0])
    gid = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    # equal, spread, equal up to a zero std (as the advantages see it), one member, no member
    assert dynamic_sampling.signal_groups(rewards, gid, 5).tolist() == [False, True, False, False, False]
    # LUFFY's group: every sample fails, the demonstration (last member) succeeds: a signal, kept
    assert dynamic_sampling.signal_groups(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.zeros(4).long(), 1).tolist() == [
        True
    ]
    # groups of G samples: kept exactly where GRPO's advantages are not all 0
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (40, 4), generator=g).float().reshape(-1)
    adv, _ = losses.group_advantages(rewards, 4)
    signal = dynamic_sampling.signal_groups(rewards, torch.arange(160) // 4, 40)
    assert signal.tolist() == (adv.view(40, 4) != 0).any(-1).tolist()
    assert 0 < int(signal.sum()) < 40


def _round(names: list[str], G: int, width: int, prompt_width: int, mixed: bool) -> dict:
    """A hand-made round: ``names`` prompts, G samples each (``mixed``: plus one demonstration per group)."""
    per = G + int(mixed)
    n = len(names) * per
    texts = [f"{p}/{j}" for p in names for j in range(per)]
    rollout = Rollout(
        torch.arange(n * prompt_width).view(n, prompt_width) + 1,
        torch.ones(n, prompt_width, dtype=torch.long),
        torch.arange(n * width).view(n, width) + 100,
        torch.ones(n, width, dtype=torch.long),
        torch.full((n, width), -0.5),
        torch.full((n, width), 0.25),
        texts,
        "decode",
        group_ids=torch.arange(len(names)).repeat_interleave(per) if mixed else None,
        off_policy=(torch.arange(n) % per == G) if mixed else None,
    )
    prompts = {
        "prompt_ids": torch.arange(len(names) * prompt_width).view(len(names), prompt_width) + 1,
        "prompt_mask": torch.ones(len(names), prompt_width, dtype=torch.long),
        "prompts": list(names),
        "answers": [f"answer of {p}" for p in names],
        "columns": {"id": [f"id of {p}" for p in names]},
        "repeat": 0,
    }
    rewards = torch.arange(n, dtype=torch.float32)
    return {"prompts": prompts, "rollout": rollout, "rewards": rewards, "rows": {"tag": rewards * 10}, "metrics": {}}


def test_take_and_cat_keep_every_row_with_its_prompt():
    a = _round(["a0", "a1"], G=2, width=2, prompt_width=3, mixed=False)
    b = _round(["b0", "b1"], G=2, width=3, prompt_width=4, mixed=True)
    out = dynamic_sampling.cat(
        [dynamic_sampling.take(a, torch.tensor([1]), 2), dynamic_sampling.take(b, torch.tensor([1, 0]), 2)], 2, 7
    )
    r = out["rollout"]
    assert out["prompts"]["prompts"] == ["a1", "b1", "b0"]
    assert out["prompts"]["answers"] == ["answer of a1", "answer of b1", "answer of b0"]
    assert out["prompts"]["columns"] == {"id": ["id of a1", "id of b1", "id of b0"]}
    assert out["prompts"]["repeat"] == 0
    assert r.completions == ["a1/0", "a1/1", "b1/0", "b1/1", "b1/2", "b0/0", "b0/1", "b0/2"]
    assert r.group_ids.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert r.off_policy.tolist() == [False, False, False, False, True, False, False, True]
    # each row's reward and per-row value came with it (a1's rows are a's 2, 3; b1's are b's 3, 4, 5)
    assert out["rewards"].tolist() == [2, 3, 3, 4, 5, 0, 1, 2]
    assert out["rows"]["tag"].tolist() == [20, 30, 30, 40, 50, 0, 10, 20]
    # widths: prompts left-padded (pad id under mask 0), completions right-padded (0 under mask 0)
    assert r.prompt_ids.shape == (8, 4) and r.completion_ids.shape == (8, 3)
    assert r.prompt_mask[:2].tolist() == [[0, 1, 1, 1]] * 2 and r.prompt_ids[0, 0] == 7
    assert r.completion_mask[:2].tolist() == [[1, 1, 0]] * 2 and r.completion_mask[2:].eq(1).all()
    assert torch.equal(r.completion_ids[0, :2], a["rollout"].completion_ids[2])
    assert torch.equal(r.completion_ids[2], b["rollout"].completion_ids[3])
    assert out["prompts"]["prompt_ids"].shape == (3, 4) and out["prompts"]["prompt_mask"][0].tolist() == [0, 1, 1, 1]
    assert torch.equal(out["prompts"]["prompt_ids"][0, 1:], a["prompts"]["prompt_ids"][1])
    # a round of plain groups cut to some of them keeps its layout (no group ids needed)
    plain = dynamic_sampling.take(a, torch.tensor([1, 0]), 2)
    assert plain["rollout"].group_ids is None and plain["rollout"].completions == ["a1/0", "a1/1", "a0/0", "a0/1"]


# ----------------------------------------------------------------------------- the refill stream
def test_refill_stream_resumes_where_it_stopped_and_has_an_order_of_its_own(tmp_path, ckpt):
    data = _data(tmp_path)

    def setup(state=None):
        dm = MixedDataModule(
            model_name_or_path=ckpt, expert_data=None, prompt_data=str(data), val_data=None, prompt_batch_size=4, seed=0
        )
        dm.setup("fit")
        if state is not None:
            dm.load_state_dict(state)
        return dm

    dm = setup()
    assert dm.state_dict() == {}, "nothing to save before the stream is used"
    drawn = [dm.refill_prompts()["prompts"] for _ in range(7)]  # 4 batches a pass: into the second pass
    first_pass = sorted(p for batch in drawn[:4] for p in batch)
    assert first_pass == sorted(r["prompt"] for r in map(json.loads, data.read_text().splitlines()))
    assert drawn[4:7] != drawn[:3], "each pass has an order of its own"
    training = [b["prompts"] for b in dm.train_dataloader().iterables["prompts"]][:4]
    assert training != drawn[:4], "the refill stream is not the training stream"
    for used in (2, 4, 5):  # mid pass, at a pass end, inside the next pass
        dm = setup()
        for _ in range(used):
            dm.refill_prompts()
        state = dm.state_dict()
        resumed = setup(state)
        assert resumed.state_dict() == state, "a loaded position is kept until the stream is used"
        assert [resumed.refill_prompts()["prompts"] for _ in range(7 - used)] == drawn[used:], used


# ----------------------------------------------------------------------------- through a Trainer
def test_equal_reward_groups_are_dropped_and_the_batch_refilled(tmp_path, ckpt):
    """Half the prompts (even answers) score 1 for every completion: their groups are dropped, and groups of
    refill prompts take their place until the batch holds 4 groups again; advantages over those groups."""
    torch.manual_seed(0)
    module = _grpo(ckpt, micro_batch_size=3)
    trainer, rec = _fit(module, _data(tmp_path), 2, prompt_batch_size=4)
    assert trainer.global_step == 2 and len(rec.batches) == 2
    G = 4
    for update, (step, out) in enumerate(rec.batches):
        rounds = [r for r in rec.rounds if r[0] == step]
        refills = [prompts for s, prompts in rec.refills if s == step]
        assert [r[1] for r in rounds[1:]] == refills, "each refill batch is sampled once"
        assert len(refills) >= 1, "this batch held even answers: a refill was needed"
        # which groups carry a signal, round by round, from the recorded rewards
        kept, sampled, dropped = [], 0, 0
        for _, prompts, rewards in rounds:
            for prompt, group in zip(prompts, _groups(rewards, G)):
                sampled += 1
                if max(group) - min(group) > 1e-6:
                    kept.append((prompt, group))
                else:
                    dropped += 1
                    assert _answer(prompt) % 2 == 0 or len(set(group)) == 1
        assert any(_answer(p) % 2 == 0 for p in rounds[0][1]), "the training batch held even answers"
        assert len(kept) >= 4, "refilled to the batch size within max_resample_batches=3"
        # the rollout batch: the first 4 groups kept, in sampling order, each row with its own prompt's rewards
        assert out["prompts"]["prompts"] == [p for p, _ in kept[:4]]
        assert out["rewards"].tolist() == pytest.approx([x for _, g in kept[:4] for x in g])
        assert all(_answer(p) % 2 for p in out["prompts"]["prompts"]), "no even answer is left"
        adv, _ = losses.group_advantages(out["rewards"], G)
        torch.testing.assert_close(out["advantages"], adv)
        assert out["rollout"].completion_ids.shape[0] == 16 and len(out["rollout"].completions) == 16
        # the metrics: what was dropped and drawn; the reward statistics of the training batch as sampled
        m = out["metrics"]
        assert m["dynamic_sampling_batches"] == len(refills)
        assert float(m["dynamic_sampling_dropped"]) == pytest.approx(dropped / sampled)
        assert float(m["dynamic_sampling_filled"]) == 1.0
        assert float(m["reward_mean"]) == pytest.approx(sum(rounds[0][2]) / len(rounds[0][2]))
        logged = [x for x in rec.logged if x["step"] == update + 1][0]
        for name in ("dynamic_sampling_dropped", "dynamic_sampling_batches", "dynamic_sampling_filled"):
            assert logged[name] == pytest.approx(float(m[name])), name
    # the refill stream's position is what the data module saves
    assert trainer.datamodule.state_dict()["refill_prompts"]["batches"] == len(rec.refills)


@pytest.mark.parametrize("case", ["short", "nothing-kept"])
def test_still_short_after_the_last_refill_trains_on_what_is_kept(tmp_path, ckpt, case):
    """max_resample_batches=0: the batch holds the groups kept (half of them); where none is kept, the
    first dropped groups fill in so that each of the steps_per_generation=2 updates has rows."""
    torch.manual_seed(0)
    module = _grpo(ckpt, num_generations=2, max_resample_batches=0, steps_per_generation=2)
    data = _data(tmp_path, parity="both" if case == "short" else "even")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, rec = _fit(module, data, 2, prompt_batch_size=4)
    said = [w for w in caught if "train/dynamic_sampling_filled 0" in str(w.message)]
    # a rollout batch with no group kept trains on nothing: said once on the console, not when some are kept
    assert len(said) == (1 if case == "nothing-kept" else 0)
    assert trainer.global_step == 2 and len(rec.batches) == 1 and not rec.refills
    out = rec.batches[0][1]
    first = rec.rounds[0]
    m = [x for x in rec.logged if x["step"] in (1, 2)]
    assert [x["dynamic_sampling_batches"] for x in m] == [0, 0]
    if case == "short":
        odd = [p for p in first[1] if _answer(p) % 2]
        assert 0 < len(odd) < 4 and out["prompts"]["prompts"] == odd
        assert [x["dynamic_sampling_filled"] for x in m] == pytest.approx([len(odd) / 4] * 2)
    else:
        assert out["prompts"]["prompts"] == first[1][:1], "one group: 2 rows, one for each mini-batch"
        assert out["advantages"].tolist() == [0.0, 0.0]
        assert [x["dynamic_sampling_filled"] for x in m] == [0.0, 0.0]
        assert [x["dynamic_sampling_dropped"] for x in m] == [1.0, 1.0]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in m)


def test_hpt_keeps_the_groups_its_gate_routes_to_sft(tmp_path, ckpt):
    """Under HPT (switch, gate 0, correct_by reward) a prompt no sample solves trains its demonstration with
    SFT: its group of equal (zero) rewards is kept, where plain dynamic sampling drops it."""
    torch.manual_seed(0)
    module = HPTModule(
        model_name_or_path=ckpt,
        num_generations=2,
        max_new_tokens=4,
        gate=0.0,
        correct_by="reward",
        reward=AnswerParityReward(even=0.0),
        dynamic_sampling=True,
    )
    trainer, rec = _fit(module, _data(tmp_path), 1, prompt_batch_size=4)
    out = rec.batches[0][1]
    prompts = rec.rounds[0][1]
    assert not rec.refills and out["prompts"]["prompts"] == prompts
    routed = [_answer(p) % 2 == 0 for p in prompts]
    assert any(routed) and out["sft_coef"].view(4, 2)[:, 0].bool().tolist() == routed
    assert out["metrics"]["dynamic_sampling_dropped"] == 0.0
    assert out["metrics"]["gate_sft_share"] == pytest.approx(sum(routed) / 4)
    r = {"prompts": {"prompts": prompts}, "rollout": out["rollout"], "rewards": out["rewards"]}
    assert PolicyModule.signal_groups(module, r).tolist() == [not x for x in routed], "plain: would be dropped"


def test_luffy_mixed_groups_refill_with_their_demonstrations(tmp_path, ckpt):
    """LUFFY: each group is 3 samples and the prompt's demonstration (an off-policy row). Equal-reward groups
    (even answers: 1 for every member, the demonstration included) are dropped; the groups joined from
    several rounds keep each demonstration with its own prompt, and advantages are those of the mixed
    groups kept."""
    torch.manual_seed(0)
    module = LUFFYModule(
        model_name_or_path=ckpt,
        num_generations=4,
        max_new_tokens=4,
        reward=AnswerParityReward(),
        dynamic_sampling=True,
    )
    trainer, rec = _fit(module, _data(tmp_path), 1, prompt_batch_size=4)
    out = rec.batches[0][1]
    rollout, prompts = out["rollout"], out["prompts"]["prompts"]
    assert rec.refills and len(prompts) == 4 and all(_answer(p) % 2 for p in prompts)
    assert rollout.group_ids.tolist() == [g for g in range(4) for _ in range(4)]
    assert rollout.off_policy.view(4, 4).tolist() == [[False, False, False, True]] * 4
    demos = [rollout.completions[4 * g + 3] for g in range(4)]
    assert demos == [str(_answer(p)) for p in prompts], "each demonstration with its own prompt"
    assert [d[0] for d in out["prompts"]["demonstrations"]] == demos
    adv, _ = losses.group_advantages_by_id(out["rewards"], rollout.group_ids, ~rollout.off_policy)
    torch.testing.assert_close(out["advantages"], adv)


def test_dynamic_sampling_needs_the_data_modules_refill_stream(ckpt):
    module = _grpo(ckpt)

    class Plain(L.LightningDataModule):
        pass

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=1, enable_checkpointing=False)
    with pytest.raises(ValueError, match="model.dynamic_sampling=true .* refill stream .* got Plain"):
        trainer.fit(module, datamodule=Plain())
    with pytest.raises(ValueError, match=r"model.max_resample_batches=-1 is out of range"):
        _grpo(ckpt, max_resample_batches=-1)
    with pytest.raises(ValueError, match=r"model.dynamic_sampling='yes' is out of range"):
        _grpo(ckpt, dynamic_sampling="yes")


# ----------------------------------------------------------------------------- exact resume
def test_resume_inside_and_after_a_refilled_rollout_batch_matches_the_uninterrupted_run(tmp_path, ckpt):
    """steps_per_generation=2: a checkpoint after update 3 falls between the two updates of a refilled rollout
    batch, one after update 4 right after that batch's last update (the next batch refills too, from the
    checkpoint's refill position). A fresh module, data module and Trainer resumed from either give the
    uninterrupted run's next updates (losses, metrics), data positions and weights."""
    data = _data(tmp_path)
    settings = dict(num_generations=2, steps_per_generation=2, micro_batch_size=2, warmup_steps=2, lr_decay="linear")

    def run(out: Path, ckpt_path=None):
        torch.manual_seed(0)
        return _fit(_grpo(ckpt, **settings), data, 6, out, ckpt_path, prompt_batch_size=2)

    ref_trainer, ref = run(tmp_path / "ref")
    ref_logged = {x["step"]: x for x in ref.logged}
    assert sorted(ref_logged) == [1, 2, 3, 4, 5, 6]
    # updates 3-4 and 5-6 share a rollout batch each, and each of those batches needed a refill
    assert [ref_logged[s]["dynamic_sampling_batches"] > 0 for s in (3, 4, 5, 6)] == [True] * 4
    assert [step for step, _ in ref.refills] == [2, 4]
    final = torch.load(tmp_path / "ref" / "step=6.ckpt", weights_only=True)
    for resume_at in (3, 4):
        out = tmp_path / f"from{resume_at}"
        _, res = run(out, tmp_path / "ref" / f"step={resume_at}.ckpt")
        got = {x["step"]: x for x in res.logged}
        assert sorted(got) == list(range(resume_at + 1, 7)), resume_at
        for step, metrics in got.items():
            for name in ("loss", "rl_loss", "reward_mean", "lr", "clip_ratio", "dynamic_sampling_dropped",
                         "dynamic_sampling_batches", "dynamic_sampling_filled", "grad_norm"):  # fmt: skip
                assert metrics[name] == pytest.approx(ref_logged[step][name], rel=1e-5, abs=1e-7), (resume_at, step)
        assert [step for step, _ in res.refills] == [4], "the one refill after the checkpoint, drawn again"
        again = torch.load(out / "step=6.ckpt", weights_only=True)
        # the data positions: the training stream (Lightning's loop state) and the refill stream (the data module's)
        loops = lambda c: c["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # noqa: E731
        assert loops(again) == loops(final), resume_at
        assert again["MixedDataModule"] == final["MixedDataModule"], resume_at
        for k, v in final["state_dict"].items():
            torch.testing.assert_close(again["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- two ranks
class RefillReport(L.Callback):
    """Test helper (``--trainer.callbacks+=test_dynamic_sampling.RefillReport``): each rank writes to
    ``<out>/refill<r>.json`` its refill stream's position and, per rollout batch, its groups and refills."""

    def __init__(self, out: str):
        self.out, self.batches = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cycle = pl_module.rollout_buffer.cycle
        m = cycle["metrics"]
        self.batches.append(
            [len(cycle["prompts"]["prompts"])] + [float(m[f"dynamic_sampling_{k}"]) for k in ("batches", "filled")]
        )

    def on_fit_end(self, trainer, pl_module):
        report = {"refill": trainer.datamodule.state_dict(), "batches": self.batches}
        Path(self.out, f"refill{trainer.global_rank}.json").write_text(json.dumps(report))


def test_two_ranks_under_fsdp2_run_as_many_refill_rounds(tmp_path):
    """FSDP2 on 2 CPU ranks, micro-batches of one row: sampling is a collective, so a rank already full runs
    every refill round the other needs; both refill streams end at the same position (rank 0's is saved)."""
    from test_distributed import _check_run, train

    proc, path = train(
        "grpo",
        "configs/trainer_fsdp.yaml",
        tmp_path,
        "--model.init_args.dynamic_sampling=true",
        "--model.init_args.reward=_rewards.AnswerParityReward",
        "--model.init_args.micro_batch_size=1",
        "--trainer.callbacks+=test_dynamic_sampling.RefillReport",
        f"--trainer.callbacks.out={tmp_path}",
    )
    _, log_dir = _check_run(proc, path)
    reports = [json.loads((tmp_path / f"refill{r}.json").read_text()) for r in range(2)]
    assert reports[0]["refill"] == reports[1]["refill"], "both ranks drew as many refill batches"
    refills = [b[1] for b in reports[0]["batches"]]
    assert refills == [b[1] for b in reports[1]["batches"]] and sum(refills) > 0, reports
    assert reports[0]["refill"]["refill_prompts"]["batches"] == sum(refills)
    for r in reports:  # a full batch of 2 groups wherever it was filled
        assert all(groups == 2 for groups, _, filled in r["batches"] if filled == 1.0), r
    scalars = read_scalars(log_dir)
    assert {"train/dynamic_sampling_dropped", "train/dynamic_sampling_batches", "train/dynamic_sampling_filled"} <= set(
        scalars
    )
    assert [v for _, v in scalars["train/dynamic_sampling_batches"]] == refills
