from pathlib import Path

import pytest
import torch

from lit_align import CHORDModule, GRPOModule, MixedDataModule, SFTModule
from lit_align.cli import main
from lit_align.events import read_scalars
from lit_align.weighting import ConstantMu, ReferenceMu


@pytest.fixture(scope="module")
def batch(ckpt):
    dm = MixedDataModule(model_name_or_path=ckpt, expert_batch_size=4, prompt_batch_size=3)
    dm.setup("fit")
    b, _, _ = next(iter(dm.train_dataloader()))
    return b


def _loss(module, batch, seed=0):
    torch.manual_seed(seed)  # the same rollouts for every module
    return module.accumulate_update(batch)


def test_mu_one_is_sft_and_mu_zero_is_grpo(ckpt, batch):
    kw = dict(model_name_or_path=ckpt, num_generations=4)
    sft, _ = _loss(SFTModule(**kw), batch)
    chord1, m1 = _loss(CHORDModule(**kw, mu_schedule=ConstantMu(1.0), token_weighting="none"), batch)
    assert chord1.item() == pytest.approx(sft.item(), abs=1e-7) and m1["mu"].item() == 1.0
    grpo, g = _loss(GRPOModule(**kw, reward=_Partial()), batch)
    chord0, c = _loss(CHORDModule(**kw, reward=_Partial(), mu_schedule=ConstantMu(0.0)), batch)
    assert grpo.item() != 0.0
    assert chord0.item() == pytest.approx(grpo.item(), abs=1e-7)
    assert c["reward_mean"].item() == g["reward_mean"].item()


def test_mixture_is_convex_and_per_term_normalised(ckpt, batch):
    kw = dict(model_name_or_path=ckpt, num_generations=4, reward=_Partial(), token_weighting="phi")
    mod = CHORDModule(**kw, mu_schedule=ConstantMu(0.3))
    loss, m = _loss(mod, batch)
    assert loss.item() == pytest.approx(0.7 * m["rl_loss"].item() + 0.3 * m["sft_loss"].item(), rel=1e-5)
    # duplicating every expert row changes the expert share of the batch, not the loss
    doubled = dict(batch)
    doubled["expert"] = {k: torch.cat([v, v]) for k, v in batch["expert"].items()}
    loss2, _ = _loss(mod, doubled)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-5)


def test_phi_weights_reach_the_sft_term(ckpt, batch):
    mod = CHORDModule(model_name_or_path=ckpt, num_generations=2, mu_schedule=ConstantMu(1.0), token_weighting="phi")
    loss, m = _loss(mod, batch)
    w = mod.last_token_weights
    assert w.numel() == int((batch["expert"]["labels"][:, 1:] != -100).sum())
    assert ((w >= 0) & (w <= 0.25 + 1e-6)).all()  # p(1-p) <= 1/4
    assert m["token_weight_mean"].item() == pytest.approx(w.mean().item())
    assert loss.item() < m["expert_nll"].item()  # weights < 1 shrink the NLL


def test_sft_warmup_then_schedule_from_its_end(ckpt, batch):
    mod = CHORDModule(
        model_name_or_path=ckpt,
        num_generations=2,
        sft_warmup_steps=3,
        mu_schedule=ReferenceMu(mu_peak=0.9, mu_valley=0.1, warmup_steps=0, decay_steps=4),
    )
    assert [mod.mixing_weight(s) for s in range(3)] == [1.0, 1.0, 1.0]
    assert mod.mixing_weight(3) == pytest.approx(0.9) and mod.mixing_weight(7) == pytest.approx(0.1)
    _, m = _loss(mod, batch)  # global_step 0: warm-up, plain SFT, no rollouts, no token weights
    assert m["mu"].item() == 1.0 and "reward_mean" not in m and "token_weight_mean" not in m
    with pytest.raises(ValueError, match="sft_warmup_steps"):
        CHORDModule(model_name_or_path=ckpt, sft_warmup_steps=-1)


def test_unknown_token_weighting_is_named(ckpt):
    with pytest.raises(ValueError, match="token_weighting='bogus'"):
        CHORDModule(model_name_or_path=ckpt, token_weighting="bogus")


def test_reference_schedule_pitfall_warns():
    with pytest.warns(UserWarning, match="mu_valley"):
        ReferenceMu(mu_peak=0.9, mu_valley=0.05, warmup_steps=0, decay_steps=0)


TINY = [
    "--trainer.max_steps=6",
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.expert_batch_size=4",
    "--data.init_args.prompt_batch_size=2",
    "--data.init_args.val_batch_size=8",
    "--model.init_args.num_generations=2",
    "--trainer.callbacks+=lit_align.callbacks.AlignmentMonitor",
    "--trainer.callbacks.every_n_steps=2",
]


@pytest.mark.parametrize(
    "config,extra,expected",
    [
        (
            "chord_mu",
            ["--model.init_args.sft_warmup_steps=1", "--model.init_args.mu_schedule.init_args.decay_steps=4"],
            lambda s: 1.0 if s < 1 else ReferenceMu(mu_peak=0.9, mu_valley=0.05, warmup_steps=0, decay_steps=4)(s - 1),
        ),
        ("chord_phi", ["--model.init_args.sft_warmup_steps=3"], lambda s: 1.0 if s < 3 else 0.1),
    ],
)
def test_cli_logs_mu_following_the_schedule(config, extra, expected, tmp_path):
    cli = main(
        ["fit", "--config", f"configs/{config}.yaml", *TINY, *extra, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    )
    log_dir = Path(cli.trainer.log_dir)
    mu = read_scalars(log_dir)["train/mu"]
    assert [s for s, _ in mu] == list(range(6)), "train/mu is logged every policy update"
    for step, value in mu:
        assert value == pytest.approx(expected(step), abs=1e-6), f"step {step}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(next(log_dir.glob("events.out.tfevents.*"))), size_guidance={"histograms": 0, "tensors": 0}
    )
    acc.Reload()
    assert "samples/text_summary" in acc.Tags()["tensors"]
    if config == "chord_phi":
        assert "train/token_weights" in acc.Tags()["histograms"]


class _Partial:
    """Reward that varies within a group even for an untrained model (half credit for length)."""

    def __call__(self, prompts, completions, answers):
        return torch.tensor([0.5 * (len(c) == len(a)) + 0.5 * (c[:1] == a[:1]) for c, a in zip(completions, answers)])

    def correct(self, prompts, completions, answers):
        return self(prompts, completions, answers) >= 1.0
