"""Several optimizer steps per rollout batch (steps_per_generation, num_iterations), truncated
completions (mask_truncated_completions, clipped_ratio) and the expert entropy's temperature."""

import math

import lightning as L
import pytest
import torch
from _rewards import CharCodeReward

from lit_align import CHORDModule, GRPOModule, MixedDataModule
from lit_align.rollout import Rollout
from lit_align.weighting import LinearMu


def _fit(module, steps: int, **data):
    """Trainer.fit on the embedded task; every metrics dict the module logged, and the rollout batches
    it sampled."""
    logged, sampled = [], []
    log, sample = module.log_metrics, module.rollout_batch

    def record(metrics):
        logged.append({k: float(v) for k, v in metrics.items()} | {"step": module.global_step})
        log(metrics)

    def counted(prompts):
        sampled.append(module.global_step)
        return sample(prompts)

    module.log_metrics, module.rollout_batch = record, counted
    dm = MixedDataModule(model_name_or_path=module.hparams.model_name_or_path, val_data=None, seed=0, **data)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, logged, sampled


@pytest.mark.parametrize("spg,iters", [(2, 2)])  # (4, 1) and (1, 4) pass too; one case keeps CI short
def test_one_rollout_batch_serves_several_updates_with_the_clip_at_work(ckpt, spg, iters):
    torch.manual_seed(0)
    module = CHORDModule(
        model_name_or_path=ckpt,
        num_generations=4,
        max_new_tokens=4,
        steps_per_generation=spg,
        num_iterations=iters,
        mu_schedule=LinearMu(0.5, 0.1, total_steps=8),
        token_weighting="phi",
        epsilon_low=0.01,
        epsilon_high=0.01,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        warmup_steps=4,
        reward=CharCodeReward(),
    )
    trainer, logged, sampled = _fit(module, 8, prompt_batch_size=4, expert_batch_size=8)
    assert trainer.global_step == 8  # max_steps counts optimizer steps
    assert sampled == [0, 4]  # one rollout batch per 4 updates
    steps = [m for m in logged if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))  # read after each update
    # mu and the lr schedule advance with every optimizer step
    assert [m["mu"] for m in steps] == pytest.approx([LinearMu(0.5, 0.1, total_steps=8)(s) for s in range(8)])
    assert [m["lr"] for m in steps[:4]] == pytest.approx(
        [1e-2 * min(1, (s + 2) / 4) for s in range(4)]
    )  # the next update's
    # the first update of a rollout batch is on-policy (ratio 1: nothing clipped); later ones use the
    # sampling-time log-probs of a policy that has moved since, and the clip bites
    assert steps[0]["clip_ratio"] == 0.0 and steps[4]["clip_ratio"] == 0.0
    assert all(steps[i]["clip_ratio"] > 0 for i in (1, 2, 3, 5, 6, 7)), [m["clip_ratio"] for m in steps]
    # the reward statistics are those of the rollout batch, the same for its 4 updates
    assert len({steps[i]["reward_mean"] for i in range(4)}) == 1


def test_several_updates_need_a_data_module_that_repeats_batches(ckpt):
    module = GRPOModule(model_name_or_path=ckpt, num_generations=2, steps_per_generation=2)
    with pytest.raises(ValueError, match="steps_per_generation"):
        module.rollout_buffer.position({"prompts": {"prompts": ["1+1="]}})


def test_more_mini_batches_than_rows_stop_at_the_first_update_naming_the_flags(ckpt):
    # 2 prompts x G 2 = 4 rollout rows cannot make 8 mini-batches: half the updates would be empty steps
    module = GRPOModule(
        model_name_or_path=ckpt, num_generations=2, max_new_tokens=2, steps_per_generation=8, reward=CharCodeReward()
    )
    with pytest.raises(
        ValueError, match=r"model.steps_per_generation=8 .* only 4 rollout rows .*data.prompt_batch_size"
    ):
        _fit(module, 8, prompt_batch_size=2, expert_batch_size=8)
    assert module.global_step == 0  # no optimizer step ran
    # a split that does not divide the rows: mini-batches differ by one row, none empty
    sizes = [len(module.rollout_buffer.minibatch(10, r)) for r in range(8)]
    assert sizes == [2, 2, 1, 1, 1, 1, 1, 1]


def _rollout(completions: list[list[int]], eos: int, pad: int) -> Rollout:
    T = max(map(len, completions))
    ids = torch.full((len(completions), T), pad)
    mask = torch.zeros(len(completions), T, dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    prompt = torch.full((len(completions), 3), 5)
    return Rollout(
        prompt,
        torch.ones_like(prompt),
        ids,
        mask,
        torch.zeros(ids.shape),
        torch.zeros(ids.shape),
        [""] * len(completions),
    )


@pytest.mark.parametrize("masked", [False, True])
def test_truncated_completions_leave_the_rl_term_when_asked(ckpt, masked):
    module = GRPOModule(model_name_or_path=ckpt, num_generations=2, max_new_tokens=4, mask_truncated_completions=masked)
    eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    # rows 0 and 2 reach max_new_tokens without EOS (truncated); row 1 ends with EOS at the limit
    rollout = _rollout([[7, 8, 9, 10], [7, 8, 9, eos], [7, 8, 9, 11], [7, eos]], eos, pad)
    assert module.sampler.truncated(rollout).tolist() == [True, False, True, False]
    module.rollout_and_score = lambda prompts: (rollout, torch.tensor([1.0, 0.0, 1.0, 0.0]), {})
    cycle = module.rollout_batch({"prompts": ["a", "b"], "answers": ["1", "2"]})
    assert cycle["metrics"]["clipped_ratio"].item() == 0.5  # always logged
    # group statistics come from every completion, truncated or not
    assert cycle["advantages"].tolist() == pytest.approx([0.7071, -0.7071, 0.7071, -0.7071], abs=1e-3)
    expected = rollout.completion_mask.clone()
    if masked:
        expected[[0, 2]] = 0
    assert torch.equal(cycle["mask"], expected)
    # the truncated rows' tokens get no loss: their gradient vanishes from the update
    module.policy.zero_grad()
    loss, metrics = module.run_terms([module.rl_term(rollout, cycle["advantages"], 1.0, cycle["mask"])])
    assert math.isfinite(float(loss))
    if masked:  # only rows 1 and 3 count: their tokens alone normalise the term
        assert metrics["entropy_usual"].item() > 0


def test_a_rollout_batch_masked_entirely_says_so_once(ckpt):
    module = GRPOModule(model_name_or_path=ckpt, num_generations=2, max_new_tokens=3, mask_truncated_completions=True)
    eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    rollout = _rollout([[7, 8, 9], [7, 8, 10], [7, 8, 11], [7, 9, 9]], eos, pad)  # all truncated
    module.rollout_and_score = lambda prompts: (rollout, torch.tensor([1.0, 0.0, 1.0, 0.0]), {})
    with pytest.warns(UserWarning, match=r"every completion .* model.max_new_tokens=3 .* no tokens this update"):
        cycle = module.rollout_batch({"prompts": ["a", "b"], "answers": ["1", "2"]})
    assert int(cycle["mask"].sum()) == 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.rollout_batch({"prompts": ["a", "b"], "answers": ["1", "2"]})  # said once


def test_entropy_expert_uses_the_sampling_temperature(ckpt):
    from lit_align import losses

    module = CHORDModule(model_name_or_path=ckpt, num_generations=2, temperature=0.6, token_weighting="none")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    labels = ids.clone()
    labels[:, :2] = -100
    expert = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    _, metrics = module.sft_terms(expert)
    with torch.no_grad():
        logits = module.model(input_ids=ids).logits[:, 1:-1]
    want = losses.entropy_from_logits(logits, 0.6).mean()
    assert metrics["entropy_expert"].item() == pytest.approx(want.item(), rel=1e-5)
    assert metrics["entropy_expert"].item() != pytest.approx(
        losses.entropy_from_logits(logits, 1.0).mean().item(), rel=1e-3
    )
