"""Prefix-RFT (lit_align.PrefixRFTModule) and UFT's variant of it.

- the loss and its gradient by hand in float64 on a fixed rollout of 2 prompts x 3 rows, one hybrid row
  per prompt: sampled tokens the clipped surrogate, given tokens -A p / (p + 0.1) on the top-entropy share
  and 0 on the rest (counted in the token-mean), for the paper's advantages and the official code's, and
  UFT's form (RL over the sampled tokens + coef x NLL of the given ones); the metrics by hand;
- prefix lengths: L = min(floor(l |y*|), |y*| - 1), l ~ U(low_t, high), low_t on the cosine; UFT's
  binomial hint shared by a prompt's rows and gone after prefix_steps; no draw at all when no prefix can
  be given (high = 0, no prefixed rollout);
- prefix length 0 is GRPO exactly: the same loss and gradient bits on a rollout, and the same weights
  after two updates of a run (high = 0, prefix_rollouts = 0);
- through the HF sampler: a rollout batch's prefixed rows start with their demonstration's prefix;
- ``python train.py fit --config configs/prefix_rft.yaml`` runs (micro-batches, steps_per_generation x
  num_iterations, and UFT's variant under LoRA) and logs the metrics; a resumed run equals an
  uninterrupted one.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_align import GRPOModule, PrefixRFTModule
from lit_align.events import read_scalars
from lit_align.rollout import Rollout, position_ids_from_mask

ROOT = Path(__file__).resolve().parents[1]
G = 3
EPS = 1e-6
GAMMA = 0.1
# the fixed rollout: rows 2 and 5 continue prefixes of 2 and 3 tokens; the given tokens' sampling-time
# entropies are 0.9, 0.1 | 0.5, 0.7, 0.2: with entropy_share 0.5, floor(0.5 * 5) = 2 lose their gradient
# (0.1 and 0.2), the 3 of highest entropy (0.9, 0.7, 0.5) keep it
MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
GIVEN = [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
ENTROPY = {(2, 0): 0.9, (2, 1): 0.1, (5, 0): 0.5, (5, 1): 0.7, (5, 2): 0.2}
KEPT = {(2, 0), (5, 0), (5, 1)}
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def _rollout(hybrid: bool = True) -> Rollout:
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, 16, (2, 4), generator=g).repeat_interleave(G, 0)
    mask = torch.tensor(MASK)
    ids = torch.randint(3, 16, (2 * G, 4), generator=g) * mask
    old = (-torch.rand(2 * G, 4, generator=g, dtype=torch.float64) * 3) * mask  # at given tokens too: unused
    entropy = torch.rand(2 * G, 4, generator=g, dtype=torch.float64) * mask
    for (row, t), h in ENTROPY.items():
        entropy[row, t] = h
    r = Rollout(prompt_ids, torch.ones_like(prompt_ids), ids, mask, old, entropy, [""] * (2 * G))
    if hybrid:
        r.prefix_mask = torch.tensor(GIVEN)
        r.group_ids = torch.arange(2 * G) // G
        r.off_policy = r.prefix_mask.bool().any(-1)
    return r


class Fixed(PrefixRFTModule):
    """Prefix-RFT on the fixed rollout and rewards (what group_rollouts + scoring would give)."""

    def rollout_and_score(self, prompts):
        return self._rollout, torch.tensor(REWARDS, dtype=torch.float64), {}


class FixedGRPO(GRPOModule):
    def rollout_and_score(self, prompts):
        return self._rollout, torch.tensor(REWARDS, dtype=torch.float64), {}


def _module(ckpt, cls=Fixed, rollout=None, micro=None, **kwargs):
    kwargs = {"prefix_rollouts": 1, "entropy_share": 0.5, **kwargs} if cls is Fixed else kwargs
    module = cls(
        model_name_or_path=ckpt,
        model_dtype="float64",
        num_generations=G,
        micro_batch_size=micro,
        epsilon_low=0.1,
        epsilon_high=0.1,
        **kwargs,
    )
    module._rollout = _rollout() if rollout is None else rollout
    return module


def _update(module) -> tuple[float, dict, dict]:
    module.policy.zero_grad()
    loss, metrics = module.accumulate_update({"prompts": {"prompts": ["a", "b"], "answers": ["1", "2"]}})
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return float(loss), metrics, grads


def _logp(module, r: Rollout) -> torch.Tensor:
    """log p of every completion token from one plain forward (float64, every position's logits)."""
    P = r.prompt_ids.shape[1]
    ids, att = r.input_ids, r.attention_mask
    logits = module.model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att)).logits
    return torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)


def _paper_advantages() -> tuple[list[float], list[float]]:
    """(row advantages, prefix-token advantages) of the paper's form with on-policy statistics: group 0's
    on-policy rewards [1, 0] (mean 1/2, std sqrt(1/2)), group 1's [0, 1] (the same)."""
    s = math.sqrt(0.5) + EPS
    row = [0.5 / s, -0.5 / s, 0.5 / s, -0.5 / s, 0.5 / s, 0.5 / s]
    return row, [0, 0, row[2], 0, 0, row[5]]


def _code_advantages() -> tuple[list[float], list[float]]:
    """The official code's: on-policy rows as above; a hybrid row's continuation r / (1 + eps) (its prefix's
    group of one: mean 0, std 1), its prefix tokens that minus the on-policy mean (1/2)."""
    s = math.sqrt(0.5) + EPS
    c = 1.0 / (1.0 + EPS)
    return [0.5 / s, -0.5 / s, c, -0.5 / s, 0.5 / s, c], [0, 0, c - 0.5, 0, 0, c - 0.5]


def _by_hand(module, row_adv, prefix_adv, kept=KEPT) -> torch.Tensor:
    """The RL term by hand: sampled tokens -min(rho A, clip(rho) A) with the sampling-time old_logp; given
    tokens -A_prefix p / (p + gamma) where kept, 0 elsewhere; token-mean over every completion token."""
    r = module._rollout
    logp = _logp(module, r)
    A = torch.tensor(row_adv, dtype=torch.float64).unsqueeze(-1)
    rho = torch.exp(logp - r.old_logp)
    on = -torch.minimum(rho * A, rho.clamp(0.9, 1.1) * A)
    p = logp.exp()
    per_token = on.clone()
    for row in range(2 * G):
        for t in range(4):
            if GIVEN[row][t]:
                a = prefix_adv[row] if (row, t) in kept else 0.0
                per_token[row, t] = -a * p[row, t] / (p[row, t] + GAMMA)
    m = torch.tensor(MASK, dtype=torch.float64)
    return (per_token * m).sum() / m.sum()


def _same_grads(got: dict, want: dict) -> None:
    """Gradients equal to float64 precision where one backward computes them; the embedded Llama's RMSNorm
    runs in float32 even in a float64 model, so two backward passes summed (two terms) and one backward of
    the sum differ by float32 rounding: tolerance 1e-6 of each gradient's scale."""
    assert got.keys() == want.keys()
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-7, atol=1e-6 * float(g.abs().max()) + 1e-12, msg=n)


def _grads_of(module, loss) -> dict:
    module.policy.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("form", ["sequence", "code"])
def test_loss_and_gradient_by_hand(ckpt, form):
    module = _module(ckpt, prefix_advantage=form)
    loss, metrics, grads = _update(module)
    row_adv, prefix_adv = _paper_advantages() if form == "sequence" else _code_advantages()
    want = _by_hand(module, row_adv, prefix_adv)
    want_grads = _grads_of(module, want)
    assert float(want.detach()) != 0.0
    assert loss == pytest.approx(float(want.detach()), rel=1e-9)
    _same_grads(grads, want_grads)
    # the metrics by hand: 5 given tokens of 17, 3 kept; the hybrid rows' prefix advantages; f(p) over given
    p = _logp(module, module._rollout).detach().exp()
    given = torch.tensor(GIVEN).bool()
    assert float(metrics["prefix_token_share"]) == pytest.approx(5 / 17)
    assert float(metrics["off_policy_token_share"]) == pytest.approx(5 / 17)
    assert float(metrics["prefix_kept_share"]) == pytest.approx(3 / 5)
    assert float(metrics["off_policy_weight_mean"]) == pytest.approx(float((p / (p + GAMMA))[given].mean()))
    assert float(metrics["expert_advantage_mean"]) == pytest.approx((prefix_adv[2] + prefix_adv[5]) / 2)


def test_the_kept_tokens_are_the_top_entropy_share(ckpt):
    """The gradient flows through the given tokens of highest entropy only: with entropy_share 0 no given
    token moves the weights, with 1 every one does (each against its by-hand value)."""
    row_adv, prefix_adv = _paper_advantages()
    for share, kept in ((0.0, set()), (1.0, set(ENTROPY)), (0.5, KEPT)):
        module = _module(ckpt, entropy_share=share)
        batch = module.rollout_batch({"prompts": ["a", "b"], "answers": ["1", "2"]})
        assert {tuple(x) for x in torch.nonzero(batch["prefix_keep"]).tolist()} == kept
        loss, _, grads = _update(module)
        want = _by_hand(module, row_adv, prefix_adv, kept)
        assert loss == pytest.approx(float(want.detach()), rel=1e-9)
        _same_grads(grads, _grads_of(module, want))


def test_given_tokens_are_behaviour_probability_one(ckpt):
    """The sampler's old_logp at given positions (the policy's) does not enter the loss: ratio = p."""
    a, b = _module(ckpt), _module(ckpt)
    b._rollout.old_logp = torch.where(torch.tensor(GIVEN).bool(), -7.0, b._rollout.old_logp)
    assert _update(a)[0] == _update(b)[0]


def test_advantage_stats_all_takes_the_whole_group(ckpt):
    module = _module(ckpt, advantage_stats="all")
    batch = module.rollout_batch({"prompts": ["a", "b"], "answers": ["1", "2"]})
    s0, s1 = math.sqrt(1 / 3), math.sqrt(1 / 3)  # group 0: [1, 0, 1] mean 2/3; group 1: [0, 1, 1] mean 2/3
    want = [(1 / 3) / (s0 + EPS), (-2 / 3) / (s0 + EPS), (1 / 3) / (s0 + EPS)]
    want += [(-2 / 3) / (s1 + EPS), (1 / 3) / (s1 + EPS), (1 / 3) / (s1 + EPS)]
    torch.testing.assert_close(batch["advantages"].double(), torch.tensor(want, dtype=torch.float64))


def test_uft_nll_form_by_hand(ckpt):
    """prefix_objective nll: the RL term over the sampled tokens only (group advantages over all rows: the
    hint is part of the state) + coef x the plain NLL of the given tokens, normalised over them."""
    rollout = _rollout()
    rollout.group_ids = rollout.off_policy = None  # what group_rollouts gives UFT's rows
    coef = 0.3
    module = _module(ckpt, rollout=rollout, prefix_objective="nll", sft_loss_coef=coef)
    loss, metrics, grads = _update(module)
    r = module._rollout
    logp = _logp(module, r)
    rewards = torch.tensor(REWARDS).view(2, G)  # GRPO's group advantages are float32 (losses.group_advantages)
    A = ((rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + EPS)).view(-1, 1).double()
    rho = torch.exp(logp - r.old_logp)
    on = -torch.minimum(rho * A, rho.clamp(0.9, 1.1) * A)
    given = torch.tensor(GIVEN, dtype=torch.float64)
    sampled = torch.tensor(MASK, dtype=torch.float64) * (1 - given)
    want = (on * sampled).sum() / sampled.sum() + coef * (-logp * given).sum() / given.sum()
    assert loss == pytest.approx(float(want.detach()), rel=1e-9)
    _same_grads(grads, _grads_of(module, want))
    assert float(metrics["prefix_nll_loss"]) == pytest.approx(float((-logp * given).sum() / given.sum()), rel=1e-9)


@pytest.mark.parametrize("micro", [None, 1])
def test_prefix_length_zero_is_grpo_bit_for_bit(ckpt, micro):
    """A rollout batch without given tokens: Prefix-RFT's loss and gradient are GRPO's, bit for bit."""
    plain = _rollout(hybrid=False)
    a = _module(ckpt, rollout=plain, micro=micro)
    b = _module(ckpt, FixedGRPO, rollout=_rollout(hybrid=False), micro=micro)
    (la, ma, ga), (lb, mb, gb) = _update(a), _update(b)
    assert la == lb and float(ma["rl_loss"]) == float(mb["rl_loss"])
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    assert "off_policy_token_share" not in ma and float(ma["prefix_token_share"]) == 0.0


# ----------------------------------------------------------------------------- prefix lengths
def _lengths_module(ckpt, **kwargs):
    return PrefixRFTModule(model_name_or_path=ckpt, num_generations=4, **{"prefix_rollouts": 2, **kwargs})


def test_uniform_prefix_lengths_follow_the_formula(ckpt):
    module = _lengths_module(ckpt, prefix_start=0.9, prefix_end=0.1, prefix_steps=10, prefix_high=0.8)
    assert module.schedule(0) == pytest.approx(0.9) and module.schedule(10) == pytest.approx(0.1)
    assert module.schedule(5) == pytest.approx(0.5) and module.schedule(50) == pytest.approx(0.1)
    D = torch.tensor([10, 7, 1])
    for step, low in ((0, 0.8), (5, 0.5), (20, 0.1)):  # low_t = min(c_t, high)
        torch.manual_seed(3)
        got = module.prefix_lengths(D, step).view(3, 4)
        torch.manual_seed(3)
        l = low + (0.8 - low) * torch.rand(3, 2, dtype=torch.float64)  # noqa: E741
        want = torch.minimum(torch.floor(l * D.unsqueeze(1)).long(), (D - 1).unsqueeze(1))
        assert got[:, :2].tolist() == [[0, 0]] * 3, "the first G - m rows sample freely"
        assert got[:, 2:].tolist() == want.tolist()
        assert (got[2] == 0).all(), "a one-token demonstration leaves its only token to the policy"


def test_uft_binomial_hint_is_shared_and_annealed_to_zero(ckpt):
    module = _lengths_module(
        ckpt,
        prefix_length="binomial",
        prefix_objective="nll",
        prefix_rollouts=4,
        prefix_start=0.95,
        prefix_end=0.05,
        prefix_steps=8,
    )
    D = torch.tensor([11, 3])
    torch.manual_seed(0)
    got = module.prefix_lengths(D, 2).view(2, 4)
    torch.manual_seed(0)
    p = 0.05 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8))
    k = torch.binomial(torch.tensor([5.0, 3.0], dtype=torch.float64), torch.full((2,), p, dtype=torch.float64))
    want = [min(round(int(k[0]) / 5 * 11), 10), min(round(int(k[1]) / 3 * 3), 2)]
    assert got.tolist() == [[want[0]] * 4, [want[1]] * 4], "one hint per prompt, on all its rows"
    state = torch.get_rng_state()
    assert module.prefix_lengths(D, 8) is None, "no hint from prefix_steps on"
    assert torch.equal(state, torch.get_rng_state()), "and no draw"


@pytest.mark.parametrize("kwargs", [{"prefix_high": 0.0}, {"prefix_rollouts": 0}])
def test_no_prefix_possible_draws_nothing(ckpt, kwargs):
    module = _lengths_module(ckpt, **kwargs)
    state = torch.get_rng_state()
    assert module.prefix_lengths(torch.tensor([5, 6]), 0) is None
    assert torch.equal(state, torch.get_rng_state())


def test_settings_are_checked(ckpt):
    with pytest.raises(ValueError, match=r"model.entropy_share=1.5 is out of range"):
        PrefixRFTModule(model_name_or_path=ckpt, entropy_share=1.5)
    with pytest.raises(ValueError, match=r"model.prefix_length='beta': choose one of"):
        PrefixRFTModule(model_name_or_path=ckpt, prefix_length="beta")
    with pytest.raises(ValueError, match=r"model.prefix_rollouts=9 is out of range"):
        PrefixRFTModule(model_name_or_path=ckpt, num_generations=8, prefix_rollouts=9)
    with pytest.raises(ValueError, match="no on-policy rollout"):
        PrefixRFTModule(model_name_or_path=ckpt, num_generations=4, prefix_rollouts=4)
    with pytest.raises(ValueError, match="batch-std"):
        PrefixRFTModule(model_name_or_path=ckpt, prefix_advantage="code", advantage_norm="batch-std")


# ----------------------------------------------------------------------------- through the sampler
def _paired_prompts(tok) -> dict:
    prompts, answers = ["12+34=", "57+28=", "1+2="], ["46", "85", "3"]
    enc = tok(prompts, padding=True, return_tensors="pt")
    demos = [tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id] for a in answers]
    D = max(map(len, demos))
    return {
        "prompt_ids": enc.input_ids,
        "prompt_mask": enc.attention_mask,
        "prompts": prompts,
        "answers": answers,
        "demo_ids": torch.tensor([d + [tok.pad_token_id] * (D - len(d)) for d in demos]).unsqueeze(1),
        "demo_mask": torch.tensor([[1] * len(d) + [0] * (D - len(d)) for d in demos]).unsqueeze(1),
        "demonstrations": [[a] for a in answers],
    }


def test_prefixed_rows_start_with_their_demonstrations_prefix(ckpt):
    module = PrefixRFTModule(
        model_name_or_path=ckpt, num_generations=4, prefix_rollouts=3, max_new_tokens=4, prefix_start=0.2
    )
    prompts = _paired_prompts(module.tokenizer)
    D = prompts["demo_mask"][:, 0].sum(-1)
    torch.manual_seed(0)
    lengths = module.prefix_lengths(D, 0)
    torch.manual_seed(0)
    batch = module.rollout_batch(prompts)
    r = batch["rollout"]
    assert bool((lengths > 0).any()) and bool((lengths == 0).any())
    for row, L in enumerate(lengths.tolist()):
        demo = prompts["demo_ids"][row // 4, 0]
        assert r.completion_ids[row, :L].tolist() == demo[:L].tolist(), f"row {row}"
        assert int(r.prefix_mask[row].sum()) == L
        assert bool(r.off_policy[row]) == (L > 0)
    assert r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    chosen = [row for row in range(12) if row % 4 >= 1]
    ratio = sum(lengths[row].item() / D[row // 4].item() for row in chosen) / len(chosen)
    assert float(batch["metrics"]["prefix_ratio_mean"]) == pytest.approx(ratio)


# ----------------------------------------------------------------------------- end to end
TINY = [
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.prompt_batch_size=2",
    "--data.init_args.val_batch_size=4",
    "--data.init_args.retention_data=null",
    "--model.init_args.num_generations=4",
    "--model.init_args.prefix_rollouts=2",
    "--model.init_args.prefix_steps=4",
]
METRICS = {
    "train/prefix_ratio_mean",
    "train/prefix_token_share",
    "train/off_policy_token_share",
    "train/off_policy_weight_mean",
    "train/expert_advantage_mean",
    "train/rl_loss",
    "train/reward_mean",
}


def fit(tmp_path: Path, *extra: str, config: str = "configs/prefix_rft.yaml") -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    args = [sys.executable, "train.py", "fit", "--config", config, *TINY]
    args += [f"--trainer.logger.init_args.save_dir={tmp_path}", *extra]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return max(tmp_path.rglob("hf_model")).parent


def test_config_trains_and_logs_the_metrics(tmp_path):
    """configs/prefix_rft.yaml, 4 updates: micro-batches of 3 rows, a rollout batch serving 2 x 2 updates."""
    run = fit(
        tmp_path,
        "--trainer.max_steps=4",
        "--model.init_args.micro_batch_size=3",
        "--model.init_args.steps_per_generation=2",
        "--model.init_args.num_iterations=2",
    )
    scalars = read_scalars(run)
    assert METRICS <= set(scalars), METRICS - set(scalars)
    assert [s for s, _ in scalars["train/prefix_token_share"]] == [0, 1, 2, 3]
    assert all(0 < v < 1 for _, v in scalars["train/prefix_token_share"])
    assert all(math.isfinite(v) for _, v in scalars["train/loss"])


def test_uft_variant_trains_under_lora(tmp_path):
    run = fit(
        tmp_path,
        "--trainer.max_steps=2",
        "--model.init_args.prefix_length=binomial",
        "--model.init_args.prefix_objective=nll",
        "--model.init_args.prefix_rollouts=4",
        "--model.init_args.sft_loss_coef=0.5",
        "--model.init_args.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj], lora_dropout: 0.0}",
    )
    scalars = read_scalars(run)
    assert {"train/prefix_nll_loss", "train/prefix_ratio_mean", "train/rl_loss"} <= set(scalars)
    assert "train/off_policy_token_share" not in scalars  # UFT's hint is not trained off-policy


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "hf_model" / "model.safetensors"))


def test_resume_draws_the_same_prefixes(tmp_path):
    """A run resumed from its step-2 checkpoint equals the uninterrupted one: the prefix-length draws come
    from the global RNG, which the checkpoint restores."""
    every_2 = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename=periodic-{step}",
    ]
    ref = fit(tmp_path / "ref", "--trainer.max_steps=4", *every_2)
    ckpt = next((tmp_path / "ref").rglob("periodic-step=2.ckpt"))
    resumed = fit(tmp_path / "resumed", "--trainer.max_steps=4", f"--ckpt_path={ckpt}")
    a, b = read_scalars(ref), read_scalars(resumed)
    for name in ("train/prefix_ratio_mean", "train/prefix_token_share", "train/loss"):
        assert dict(b[name])[3] == pytest.approx(dict(a[name])[3], rel=1e-5), name
    wa, wb = _weights(ref), _weights(resumed)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def _trained(module, steps: int = 2) -> dict:
    """The weights after ``steps`` updates on the embedded task (2 prompts x 4 rollouts per update)."""
    import lightning as L

    from lit_align import MixedDataModule

    L.seed_everything(0)
    dm = MixedDataModule(
        model_name_or_path=module.hparams.model_name_or_path, expert_data=None, val_data=None, prompt_batch_size=2
    )
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
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("kwargs", [{"prefix_high": 0.0}, {"prefix_rollouts": 0}])
def test_prefix_length_zero_trains_as_grpo(ckpt, kwargs):
    """No prefix ever given (high = 0, or no prefixed rollout) and GRPO with the same seed and settings:
    the same weights, bit for bit, after 2 updates (same samples: no prefix draw touches the RNG)."""
    from _rewards import CharCodeReward

    common = dict(model_name_or_path=ckpt, num_generations=4, max_new_tokens=3, reward=CharCodeReward())
    common["optimizer"] = lambda p: torch.optim.AdamW(p, lr=1e-2)
    grpo = _trained(GRPOModule(**common))
    prefix = _trained(PrefixRFTModule(**common, **kwargs))
    assert grpo.keys() == prefix.keys()
    moved = PrefixRFTModule(model_name_or_path=ckpt).model.state_dict()
    assert any(not torch.equal(grpo[n], moved[n]) for n in grpo), "the updates moved the weights"
    for n in grpo:
        assert torch.equal(grpo[n], prefix[n]), n


def test_math_recipe_runs_offline_on_gsm8k_format_files(chat_ckpt, tmp_path):
    """configs/math_prefix_rft.yaml offline: a GSM8K-format JSONL whose worked solutions are the
    demonstrations and a small random Qwen2 chat checkpoint; 2 updates at tiny lengths."""
    from _gsm8k import gsm8k_rows, write_jsonl

    from lit_align.cli import main

    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(12))
    cli = main(
        [
            "fit",
            "--config",
            "configs/math_prefix_rft.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--model.init_args.model_name_or_path={chat_ckpt}",
            "--model.init_args.max_new_tokens=24",
            "--model.init_args.num_generations=4",
            "--model.init_args.micro_batch_size=2",
            f"--data.init_args.prompt_data={data}",
            f"--data.init_args.val_data={data}",
            "--data.init_args.prompt_batch_size=2",
            "--data.init_args.val_batch_size=4",
            "--data.init_args.max_response_length=48",
        ]
    )
    assert cli.trainer.global_step == 2
    s = read_scalars(cli.trainer.log_dir)
    assert s["data/demo_reward_rate"] == [(0, 1.0)]
    assert all(v > 0 for _, v in s["train/prefix_token_share"]) and "train/off_policy_weight_mean" in s
    sample = cli.model.last_samples["completions"]
    assert len(sample) == 8
