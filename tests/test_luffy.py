"""LUFFYModule: a prompt's demonstration in its own GRPO group (arXiv 2504.14945).

- the group: G - k samples and k demonstrations of each prompt, through the module's own group_rollouts;
- the loss and gradient by hand in float64 (mixed-group advantages in both statistics, on-policy tokens the
  clipped surrogate, demonstration tokens -A p / (p + gamma) with the module's gamma, one token-mean),
  for every micro-batch size, and the metrics (off_policy_token_share, off_policy_weight_mean,
  expert_advantage_mean, expert_reward_mean); given behaviour log-probs;
- no demonstration in the group (demonstrations_per_prompt 0) is GRPO exactly;
- settings errors; configs/luffy.yaml trains and logs; steps_per_generation x num_iterations with LoRA and
  micro-batches, resumed mid rollout batch, ends where the uninterrupted run does.
"""

import math

import lightning as L
import pytest
import torch
from _rewards import CharCodeReward

from lit_align import GRPOModule, LUFFYModule, MixedDataModule
from lit_align.cli import main
from lit_align.events import read_scalars
from lit_align.rollout import Rollout, position_ids_from_mask

S = 3  # samples per prompt; with one demonstration, G = 4
EPS = 1e-6


def exact(prompts, completions, answers):
    return [float(c == a) for c, a in zip(completions, answers)]


def prompts_batch() -> dict:
    return {
        "prompt_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
        "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "prompts": ["p0", "p1"],
        "answers": ["1", "2"],
        "demo_ids": torch.tensor([[[4, 3, 0]], [[5, 6, 3]]]),  # (B, k, D), right-padded
        "demo_mask": torch.tensor([[[1, 1, 0]], [[1, 1, 1]]]),
        "demonstrations": [["1"], ["2"]],
    }


def sampled(prompts: dict, n: int, dtype=torch.float64) -> Rollout:
    """``n`` fixed samples per prompt (rows of unequal length, old log-probs away from the new ones)."""
    g = torch.Generator().manual_seed(1)
    B = len(prompts["prompts"])
    ids = torch.randint(3, 12, (B * n, 4), generator=g)
    lengths = [4, 2, 1, 3, 4, 2, 3, 1][: B * n]
    mask = torch.tensor([[1] * k + [0] * (4 - k) for k in lengths])
    old = -torch.rand(B * n, 4, generator=g, dtype=dtype) * 3 * mask
    texts = ["1", "x", "x", "x", "x", "x", "x", "x"][: B * n]
    entropy = torch.rand(B * n, 4, generator=g, dtype=torch.float32) * mask
    return Rollout(
        prompts["prompt_ids"].repeat_interleave(n, 0),
        prompts["prompt_mask"].repeat_interleave(n, 0),
        ids,
        mask,
        old,
        entropy,
        texts,
    )


class FixedSamples:
    """The policy's samples held fixed (``sample`` returns them); everything else is the module's own."""

    def sample(self, prompts, greedy=False, num_generations=None, prefix_ids=None, prefix_mask=None):
        assert num_generations == self.hparams.num_generations - self.demonstrations_per_prompt
        return sampled(prompts, num_generations)


class FixedLUFFY(FixedSamples, LUFFYModule):
    pass


def luffy(ckpt, **kw) -> LUFFYModule:
    kw = {
        "model_name_or_path": ckpt,
        "model_dtype": "float64",
        "num_generations": S + 1,
        "reward": exact,
        "epsilon_low": 0.1,
        "epsilon_high": 0.1,
        "off_policy_gamma": 0.25,  # not the default: the module's gamma must reach the RL term
        **kw,
    }
    return FixedLUFFY(**kw)


def advantages_by_hand(stats: str) -> list[float]:
    """Rewards [1, 0, 0 | demo 1] and [0, 0, 0 | demo 1] (each row against its own prompt's answer)."""
    s0 = math.sqrt(1 / 3)
    if stats == "all":  # group 0: mean 1/2, std sqrt(1/3); group 1: mean 1/4, std 1/2
        return (
            [0.5 / (s0 + EPS), -0.5 / (s0 + EPS), -0.5 / (s0 + EPS), 0.5 / (s0 + EPS)]
            + [-0.25 / (0.5 + EPS)] * 3
            + [0.75 / (0.5 + EPS)]
        )
    # the samples' statistics: group 0 [1, 0, 0] mean 1/3, std sqrt(1/3); group 1 all 0 (std 0): the samples
    # get 0 and the demonstration r - mean = 1, not divided by a zero std
    return (
        [(2 / 3) / (s0 + EPS), (-1 / 3) / (s0 + EPS), (-1 / 3) / (s0 + EPS), (2 / 3) / (s0 + EPS)] + [0.0] * 3 + [1.0]
    )


def mixed_rows(prompts: dict, behaviour_logp=None) -> Rollout:
    """The groups by hand: prompt i's 3 samples then its demonstration (left-padded prompts, completions
    padded to the widest)."""
    s = sampled(prompts, S)
    rows, off = [], []
    for i in range(2):
        for j in range(S):
            rows.append(("s", i * S + j))
        rows.append(("d", i))
    T = 4
    ids = torch.zeros(8, T, dtype=torch.long)
    mask = torch.zeros(8, T, dtype=torch.long)
    old = torch.zeros(8, T, dtype=torch.float64)
    for r, (kind, j) in enumerate(rows):
        if kind == "s":
            ids[r], mask[r], old[r] = s.completion_ids[j], s.completion_mask[j], s.old_logp[j]
        else:
            d = prompts["demo_ids"][j, 0]
            dm = prompts["demo_mask"][j, 0]
            ids[r, :3], mask[r, :3] = d * dm, dm
            if behaviour_logp is not None:
                old[r, :3] = behaviour_logp[j, 0] * dm
        off.append(kind == "d")
    P = prompts["prompt_ids"].repeat_interleave(S + 1, 0)
    M = prompts["prompt_mask"].repeat_interleave(S + 1, 0)
    r = Rollout(P, M, ids, mask, old, torch.zeros_like(old), [""] * 8)
    r.off_policy = torch.tensor(off)
    return r


def loss_by_hand(module, r: Rollout, adv: torch.Tensor, gamma: float, behaviour: bool = False):
    """Every position's logits, plain autograd: clipped surrogate on samples, -A f(p / pi_beta) on
    demonstrations, token-mean over all tokens. Returns the loss and the off-policy metrics."""
    P = r.prompt_ids.shape[1]
    att = r.attention_mask
    logits = module.model(input_ids=r.input_ids, attention_mask=att, position_ids=position_ids_from_mask(att)).logits
    logp = torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)
    A = adv.unsqueeze(-1)
    ratio = torch.exp(logp - r.old_logp)
    on = -torch.minimum(ratio * A, ratio.clamp(0.9, 1.1) * A)
    x = logp.exp() / (r.old_logp.exp() if behaviour else 1.0)
    f = x / (x + gamma)
    off = r.off_policy.unsqueeze(-1).expand_as(logp)
    m = r.completion_mask.double()
    loss = (torch.where(off, -A * f, on) * m).sum() / m.sum()
    share = float((m * off).sum() / m.sum())
    weight_mean = float((f.detach() * m * off).sum() / (m * off).sum())
    return loss, share, weight_mean


def _grads(module) -> dict:
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def module_advantages(module, stats: str) -> torch.Tensor:
    """The advantages of the module's last rollout batch, checked against the hand values (rewards are
    float32, so are they), in float64 for the loss by hand."""
    adv = module.rollout_buffer.cycle["advantages"]
    want = torch.tensor(advantages_by_hand(stats), dtype=torch.float64)
    torch.testing.assert_close(adv.double(), want, rtol=1e-6, atol=1e-6)
    return adv.double()


@pytest.mark.parametrize("stats", ["all", "on_policy"])
@pytest.mark.parametrize("micro", [None, 1, 3])
def test_loss_gradient_and_metrics_by_hand(ckpt, stats, micro):
    module = luffy(ckpt, advantage_stats=stats, micro_batch_size=micro)
    assert module.rl_settings.off_policy_gamma == 0.25
    loss, metrics = module.accumulate_update({"prompts": prompts_batch()})
    got = _grads(module)
    module.policy.zero_grad()
    r = mixed_rows(prompts_batch())
    adv = module_advantages(module, stats)
    want, share, weight_mean = loss_by_hand(module, r, adv, 0.25)
    want.backward()
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-9)
    for n, g in _grads(module).items():
        torch.testing.assert_close(got[n], g, rtol=1e-7, atol=1e-10, msg=n)
    assert float(metrics["off_policy_token_share"]) == pytest.approx(share, rel=1e-9)  # 5 of 21 tokens
    assert share == 5 / 21
    assert float(metrics["off_policy_weight_mean"]) == pytest.approx(weight_mean, rel=1e-9)
    assert float(metrics["expert_advantage_mean"]) == pytest.approx((adv[3] + adv[7]).item() / 2, rel=1e-6)
    assert float(metrics["expert_reward_mean"]) == 1.0
    assert module.last_samples["completions"] == ["1", "x", "x", "1", "x", "x", "x", "2"]


def test_the_demonstration_is_pushed_up_by_the_shaped_gradient(ckpt):
    """One demonstration token: d loss / d logp = -A gamma p / (p + gamma)^2 (f carries the gradient)."""
    from lit_align import losses

    logp = torch.tensor([[-3.0, -0.1]], dtype=torch.float64, requires_grad=True)
    values, m = losses.shaped_off_policy_per_token(logp, torch.tensor([2.0], dtype=torch.float64), 0.25)
    values.sum().backward()
    p = logp.detach().exp()
    torch.testing.assert_close(logp.grad, -2.0 * 0.25 * p / (p + 0.25) ** 2)
    torch.testing.assert_close(m["off_policy_weight"], p / (p + 0.25))


def test_given_behaviour_logprobs_make_the_ratio_p_over_pi_beta(ckpt):
    prompts = prompts_batch()
    prompts["demo_logp"] = torch.tensor([[[-0.5, -1.5, 0.0]], [[-0.2, -0.7, -2.0]]], dtype=torch.float64)
    module = luffy(ckpt, behaviour_logprobs="given")
    loss, metrics = module.accumulate_update({"prompts": prompts})
    got = _grads(module)
    module.policy.zero_grad()
    r = mixed_rows(prompts, behaviour_logp=prompts["demo_logp"])
    adv = module_advantages(module, "all")
    want, _, weight_mean = loss_by_hand(module, r, adv, 0.25, behaviour=True)
    want.backward()
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-9)
    for n, g in _grads(module).items():
        torch.testing.assert_close(got[n], g, rtol=1e-7, atol=1e-10, msg=n)
    assert float(metrics["off_policy_weight_mean"]) == pytest.approx(weight_mean, rel=1e-9)
    # without them in the batch the setting says what it needs
    with pytest.raises(ValueError, match="demo_logp"):
        luffy(ckpt, behaviour_logprobs="given").group_rollouts(prompts_batch())


@pytest.fixture(scope="module")
def paired_batch(ckpt):
    dm = MixedDataModule(
        model_name_or_path=ckpt, expert_data=None, prompt_data="embedded", val_data=None, prompt_batch_size=3, seed=0
    )
    dm.setup("fit")
    dm.pair_demonstrations(1)
    return next(iter(dm.train_dataloader()))[0]


def _step(module, batch, seed=0):
    torch.manual_seed(seed)  # the same samples for every module
    loss, metrics = module.accumulate_update(batch)
    return loss, metrics, _grads(module)


def test_no_demonstration_in_the_group_is_grpo_exactly(ckpt, paired_batch):
    kw = dict(model_name_or_path=ckpt, num_generations=4, max_new_tokens=4, reward=CharCodeReward())
    module = LUFFYModule(**kw, demonstrations_per_prompt=0)
    assert module.demonstrations_per_prompt == 0  # the data module is not asked to pair
    loss, metrics, grads = _step(module, paired_batch)
    g_loss, g_metrics, g_grads = _step(GRPOModule(**kw), paired_batch)
    assert float(loss) != 0.0 and float(loss) == float(g_loss)
    assert grads.keys() == g_grads.keys()
    for n in grads:
        assert torch.equal(grads[n], g_grads[n]), n
    g_metrics.pop("mu")  # GRPO's mixing weight, always 0
    assert metrics.keys() == g_metrics.keys()
    for k, v in metrics.items():
        assert float(v) == float(g_metrics[k]) or (math.isnan(float(v)) and math.isnan(float(g_metrics[k]))), k


def test_a_real_group_holds_samples_then_the_demonstration(ckpt, paired_batch):
    module = LUFFYModule(model_name_or_path=ckpt, num_generations=4, max_new_tokens=4)
    torch.manual_seed(0)
    cycle = module.rollout_batch(paired_batch["prompts"])
    r = cycle["rollout"]
    assert r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert r.off_policy.tolist() == [False, False, False, True] * 3
    assert [r.completions[i] for i in (3, 7, 11)] == [d[0] for d in paired_batch["prompts"]["demonstrations"]]
    assert not r.old_logp[r.off_policy].any()  # behaviour probability 1


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"demonstrations_per_prompt": 4}, "demonstrations_per_prompt=4 leaves no sample"),
        ({"demonstrations_per_prompt": -1}, "demonstrations_per_prompt=-1 is out of range"),
        ({"off_policy_gamma": 0.0}, "off_policy_gamma=0.0 is out of range"),
        ({"advantage_stats": "split"}, "advantage_stats='split': choose one of"),
        ({"behaviour_logprobs": "target"}, "behaviour_logprobs='target': choose one of"),
        ({"num_generations": 1}, "num_generations=1"),
    ],
)
def test_settings_are_checked(ckpt, kw, match):
    with pytest.raises(ValueError, match=match):
        LUFFYModule(model_name_or_path=ckpt, **{"num_generations": 4, **kw})


TINY = [
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.prompt_batch_size=2",
    "--data.init_args.val_batch_size=8",
    "--model.init_args.num_generations=4",
]


def test_config_trains_and_logs_the_demonstration_metrics(tmp_path):
    cli = main(["fit", "--config", "configs/luffy.yaml", *TINY, f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert cli.trainer.global_step == 3
    s = read_scalars(cli.trainer.log_dir)
    for name in ("off_policy_token_share", "off_policy_weight_mean", "expert_advantage_mean", "expert_reward_mean"):
        assert [step for step, _ in s[f"train/{name}"]] == [0, 1, 2], name
    assert all(0 < v < 1 for _, v in s["train/off_policy_weight_mean"])
    assert cli.model.rl_settings.off_policy_gamma == 0.1 and cli.model.demonstrations_per_prompt == 1


def test_user_recipe_runs_offline_on_gsm8k_format_files(chat_ckpt, tmp_path):
    """configs/math_luffy.yaml with a chat checkpoint and GSM8K-format files: each question's worked
    solution is its demonstration."""
    from _gsm8k import gsm8k_rows, write_jsonl

    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(8))
    cli = main(
        [
            "fit",
            "--config",
            "configs/math_luffy.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--model.init_args.model_name_or_path={chat_ckpt}",
            "--model.init_args.max_new_tokens=8",
            "--model.init_args.num_generations=2",
            f"--data.init_args.prompt_data={data}",
            "--data.init_args.val_data=null",
            "--data.init_args.prompt_batch_size=2",
            "--data.init_args.max_response_length=48",
        ]
    )
    assert cli.trainer.global_step == 2
    s = read_scalars(cli.trainer.log_dir)
    assert len(s["train/expert_reward_mean"]) == 2 and all(v == 1.0 for _, v in s["train/expert_reward_mean"])


# ----------------------------------------------------------------------------- several updates per rollout batch
def _fit(module, steps: int, tmp_path, ckpt_path=None):
    dm = MixedDataModule(
        model_name_or_path=module.hparams.model_name_or_path,
        expert_data=None,
        prompt_data="embedded",
        val_data=None,
        prompt_batch_size=2,
        seed=0,
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=tmp_path,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_lora_micro_batches_several_updates_per_rollout_batch_and_an_exact_resume(ckpt, tmp_path):
    """steps_per_generation 3 x num_iterations 1, LoRA, micro-batches of 3 rows: the checkpoint at update 2
    falls inside a rollout batch (its mixed groups are in the checkpoint); the resumed run ends on the
    weights of the uninterrupted one."""
    pytest.importorskip("peft")

    def module():
        L.seed_everything(0)
        return LUFFYModule(
            model_name_or_path=ckpt,
            num_generations=4,
            max_new_tokens=4,
            micro_batch_size=3,
            steps_per_generation=3,
            lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
            reward=CharCodeReward(),
        )

    straight = module()
    _fit(straight, 4, tmp_path / "a")
    resumed = module()
    _fit(resumed, 4, tmp_path / "b", ckpt_path=str(next((tmp_path / "a").glob("*step=2.ckpt"))))
    a, b = straight.full_state_dict(), resumed.full_state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
    start = module().full_state_dict()
    moved = sum(float((a[k] - start[k]).abs().sum()) for k in a)
    assert moved > 0, "the run did not move the weights: the comparison would be vacuous"
