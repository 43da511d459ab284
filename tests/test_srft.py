"""SRFTModule: LUFFY's mixed group plus SRFT's entropy-aware weights (arXiv 2506.19767).

- the loss and gradient by hand in float64, every micro-batch size: H the mean sampling-time entropy of the
  sampled tokens, w_SFT = 0.5 exp(-H) (or exp(+H), the released code's sign), w_RL = 0.1 exp(H) on the
  positive samples' surrogate, LUFFY's term on the rest, the demonstrations' NLL over their own tokens;
  the metrics srft_w_sft, srft_w_rl, srft_entropy;
- degenerate settings: no SFT term and no reward split is LUFFY exactly; both coefficients 0 is LUFFY
  without its positive samples;
- settings errors; configs/srft.yaml trains and logs the weights.
"""

import math

import pytest
import torch
from _rewards import CharCodeReward
from test_luffy import FixedSamples, exact, loss_by_hand, mixed_rows, module_advantages, prompts_batch, sampled

from lit_align import LUFFYModule, MixedDataModule, SRFTModule
from lit_align.cli import main
from lit_align.events import read_scalars
from lit_align.rollout import position_ids_from_mask

S = 3


class FixedSRFT(FixedSamples, SRFTModule):
    pass


def srft(ckpt, **kw) -> SRFTModule:
    kw = {
        "model_name_or_path": ckpt,
        "model_dtype": "float64",
        "num_generations": S + 1,
        "reward": exact,
        "epsilon_low": 0.1,
        "epsilon_high": 0.1,
        "off_policy_gamma": 0.25,
        **kw,
    }
    return FixedSRFT(**kw)


def entropy_by_hand() -> float:
    """The samples' mean recorded entropy over their tokens (the demonstrations' is not the policy's)."""
    s = sampled(prompts_batch(), S)
    return float((s.entropy.double() * s.completion_mask).sum() / s.completion_mask.sum())


def sft_by_hand(module) -> torch.Tensor:
    """The demonstrations' NLL, token-mean over their tokens: prompt then completion, one forward."""
    p = prompts_batch()
    total, count = 0.0, 0
    for i in range(2):
        prompt = p["prompt_ids"][i][p["prompt_mask"][i].bool()]
        demo = p["demo_ids"][i, 0][p["demo_mask"][i, 0].bool()]
        ids = torch.cat([prompt, demo]).unsqueeze(0)
        att = torch.ones_like(ids)
        logits = module.model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att)).logits
        logp = torch.log_softmax(logits[0, len(prompt) - 1 : -1], -1).gather(-1, demo.unsqueeze(-1)).squeeze(-1)
        total, count = total - logp.sum(), count + len(demo)
    return total / count


def _grads(module) -> dict:
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sign", ["negative", "positive"])
@pytest.mark.parametrize("micro", [None, 1, 3])
def test_loss_gradient_and_weights_by_hand(ckpt, micro, sign):
    module = srft(ckpt, micro_batch_size=micro, sft_entropy_sign=sign)
    loss, metrics = module.accumulate_update({"prompts": prompts_batch()})
    got = _grads(module)
    module.policy.zero_grad()
    H = entropy_by_hand()
    w_sft = 0.5 * math.exp(-H if sign == "negative" else H)
    w_rl = 0.1 * math.exp(H)
    adv = module_advantages(module, "all")
    assert (adv > 0).tolist() == [True, False, False, True, False, False, False, True]
    # the one positive sample's advantage times w_RL (in the advantages' float32, as the rewards are); the
    # demonstrations (rows 3, 7) are off-policy: unscaled
    scaled = adv.clone()
    scaled[0] = float(adv[0].float() * w_rl)
    rl, _, _ = loss_by_hand(module, mixed_rows(prompts_batch()), scaled, 0.25)
    sft = sft_by_hand(module)
    want = rl + w_sft * sft
    want.backward()
    # logged as float32 scalars; the loss below holds the weights' float64 values
    assert float(metrics["srft_entropy"]) == pytest.approx(H, rel=1e-6)
    assert float(metrics["srft_w_sft"]) == pytest.approx(w_sft, rel=1e-6)
    assert float(metrics["srft_w_rl"]) == pytest.approx(w_rl, rel=1e-6)
    assert float(metrics["sft_loss"]) == pytest.approx(float(sft.detach()), rel=1e-9)
    assert float(metrics["rl_loss"]) == pytest.approx(float(rl.detach()), rel=1e-9)
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-9)
    for n, g in _grads(module).items():
        torch.testing.assert_close(got[n], g, rtol=1e-7, atol=1e-10, msg=n)


def test_both_coefficients_zero_is_luffy_without_its_positive_samples(ckpt):
    """The paper weights the positive samples' term by w_RL (it does not add to it): c_RL = 0 removes them,
    c_SFT = 0 the SFT term; the rest is LUFFY's term on the same groups."""
    module = srft(ckpt, sft_coef=0.0, rl_coef=0.0, micro_batch_size=2)
    loss, metrics = module.accumulate_update({"prompts": prompts_batch()})
    got = _grads(module)
    module.policy.zero_grad()
    adv = module_advantages(module, "all").clone()
    adv[0] = 0.0
    want, _, _ = loss_by_hand(module, mixed_rows(prompts_batch()), adv, 0.25)
    want.backward()
    assert "sft_loss" not in metrics and float(metrics["srft_w_sft"]) == 0.0  # the term is not computed
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-9)
    for n, g in _grads(module).items():
        torch.testing.assert_close(got[n], g, rtol=1e-7, atol=1e-10, msg=n)


@pytest.fixture(scope="module")
def paired_batch(ckpt):
    dm = MixedDataModule(
        model_name_or_path=ckpt, expert_data=None, prompt_data="embedded", val_data=None, prompt_batch_size=3, seed=0
    )
    dm.setup("fit")
    dm.pair_demonstrations(1)
    return next(iter(dm.train_dataloader()))[0]


def _step(module, batch):
    torch.manual_seed(0)
    loss, metrics = module.accumulate_update(batch)
    return loss, metrics, _grads(module)


def test_no_sft_term_and_no_reward_split_is_luffy_exactly(ckpt, paired_batch):
    kw = dict(model_name_or_path=ckpt, num_generations=4, max_new_tokens=4, reward=CharCodeReward())
    loss, metrics, grads = _step(SRFTModule(**kw, sft_coef=0.0, reward_split=False), paired_batch)
    l_loss, l_metrics, l_grads = _step(LUFFYModule(**kw), paired_batch)
    assert float(loss) != 0.0 and float(loss) == float(l_loss)
    assert grads.keys() == l_grads.keys()
    for n in grads:
        assert torch.equal(grads[n], l_grads[n]), n
    for k in ("srft_entropy", "srft_w_sft", "srft_w_rl"):
        metrics.pop(k)
    assert metrics.keys() == l_metrics.keys()
    for k, v in metrics.items():
        assert float(v) == float(l_metrics[k]) or (math.isnan(float(v)) and math.isnan(float(l_metrics[k]))), k


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"sft_coef": -0.5}, "sft_coef=-0.5 is out of range"),
        ({"rl_coef": float("nan")}, "rl_coef=nan is out of range"),
        ({"sft_entropy_sign": "minus"}, "sft_entropy_sign='minus': choose one of"),
        ({"reward_split": "yes"}, "reward_split='yes' is out of range: it must be true or false"),
        ({"demonstrations_per_prompt": 8}, "demonstrations_per_prompt=8 leaves no sample"),
    ],
)
def test_settings_are_checked(ckpt, kw, match):
    with pytest.raises(ValueError, match=match):
        SRFTModule(model_name_or_path=ckpt, **kw)


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


def test_config_trains_and_logs_the_weights(tmp_path):
    cli = main(["fit", "--config", "configs/srft.yaml", *TINY, f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert cli.trainer.global_step == 3
    s = read_scalars(cli.trainer.log_dir)
    names = ("srft_w_sft", "srft_w_rl", "srft_entropy", "sft_loss", "off_policy_token_share", "expert_advantage_mean")
    for name in names:
        assert [step for step, _ in s[f"train/{name}"]] == [0, 1, 2], name
    for (_, H), (_, w_sft), (_, w_rl) in zip(s["train/srft_entropy"], s["train/srft_w_sft"], s["train/srft_w_rl"]):
        assert w_sft == pytest.approx(0.5 * math.exp(-H), rel=1e-5)
        assert w_rl == pytest.approx(0.1 * math.exp(H), rel=1e-5)


def test_user_recipe_runs_offline_on_gsm8k_format_files(chat_ckpt, tmp_path):
    from _gsm8k import gsm8k_rows, write_jsonl

    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(8))
    cli = main(
        [
            "fit",
            "--config",
            "configs/math_srft.yaml",
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
    assert len(s["train/srft_w_sft"]) == 2 and len(s["train/sft_loss"]) == 2
