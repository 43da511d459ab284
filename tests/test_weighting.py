"""Tests for lit_align.weighting: mu schedules and SFT token weights (hand-computed values)."""

import math
import warnings

import pytest
import torch

from lit_align.weighting import (
    TOKEN_WEIGHT_STRATEGIES,
    AdaptiveMu,
    ConstantMu,
    CosineMu,
    ExponentialMu,
    LinearMu,
    MuSchedule,
    ReferenceMu,
    token_weights,
)

COS_PI_4 = 0.7071067811865476  # cos(pi / 4)


# ----------------------------------------------------------------------------- schedules


def test_constant_mu():
    s = ConstantMu(0.1)
    assert isinstance(s, MuSchedule)
    assert [s(0), s(7), s(10_000)] == [0.1, 0.1, 0.1]
    assert ConstantMu()(3) == 0.1


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),  # warm-up starts at 0
        (5, 0.45),  # mid warm-up: 5/10 * 0.9
        (10, 0.9),  # warm-up/decay boundary: cos(0) -> mu_peak
        (15, 0.05 + 0.85 * 0.5 * (1 + COS_PI_4)),  # a quarter into decay
        (20, 0.475),  # mid decay: 0.05 + 0.85 * 0.5
        (29, 0.05 + 0.85 * 0.5 * (1 + math.cos(math.pi * 19 / 20))),
        (30, 0.05),  # end of decay
        (1000, 0.05),  # past end: hold
    ],
)
def test_reference_mu_with_warmup(step, expected):
    s = ReferenceMu(mu_peak=0.9, mu_valley=0.05, warmup_steps=10, decay_steps=20)
    assert s(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.9), (50, 0.05 + 0.85 * 0.5 * (1 + COS_PI_4)), (100, 0.475), (200, 0.05), (201, 0.05), (5000, 0.05)],
)
def test_reference_mu_paper_defaults(step, expected):
    # Paper setting: 0.9 -> 0.05 over the first 200 steps, no warm-up (s < 0 never holds).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = ReferenceMu()
    assert s(step) == pytest.approx(expected, abs=1e-12)


def test_reference_mu_zero_warmup_zero_decay_pitfall():
    with pytest.warns(UserWarning, match="mu_valley"):
        s = ReferenceMu(mu_peak=0.9, mu_valley=0.05, warmup_steps=0, decay_steps=0)
    assert [s(0), s(1), s(500)] == [0.05, 0.05, 0.05]
    with warnings.catch_warnings():  # no pitfall when peak == valley
        warnings.simplefilter("error")
        assert ReferenceMu(mu_peak=0.3, mu_valley=0.3, warmup_steps=0, decay_steps=0)(4) == 0.3


def test_reference_mu_warmup_without_decay():
    s = ReferenceMu(mu_peak=0.8, mu_valley=0.2, warmup_steps=4, decay_steps=0)
    assert [s(0), s(2), s(3), s(4), s(9)] == pytest.approx([0.0, 0.4, 0.6, 0.2, 0.2])


@pytest.mark.parametrize("step, expected", [(0, 0.9), (25, 0.7), (50, 0.5), (75, 0.3), (100, 0.1), (150, 0.1)])
def test_linear_mu(step, expected):
    assert LinearMu(0.9, 0.1, 100)(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.9), (25, 0.1 + 0.4 * (1 + COS_PI_4)), (50, 0.5), (75, 0.1 + 0.4 * (1 - COS_PI_4)), (100, 0.1), (400, 0.1)],
)
def test_cosine_mu(step, expected):
    assert CosineMu(0.9, 0.1, 100)(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step, expected", [(0, 0.8), (25, 0.4), (50, 0.2), (75, 0.1), (100, 0.05), (200, 0.05)])
def test_exponential_mu(step, expected):
    # ratio 0.05 / 0.8 = 1/16: each quarter of the way halves mu.
    assert ExponentialMu(0.8, 0.05, 100)(step) == pytest.approx(expected, abs=1e-12)


def test_interpolated_zero_total_steps_is_end_value():
    for cls in (LinearMu, CosineMu, ExponentialMu):
        assert cls(0.9, 0.2, 0)(0) == pytest.approx(0.2)
        assert cls(0.9, 0.2, 0)(10) == pytest.approx(0.2)


def test_adaptive_mu():
    s = AdaptiveMu(tau=0.5, mu_max=0.3)
    assert s(0, mean_reward=0.4) == pytest.approx(0.1)
    assert s(1, mean_reward=0.1) == pytest.approx(0.3)  # 0.4 capped at mu_max
    assert s(2, mean_reward=0.8) == 0.0  # reward above tau -> no imitation
    assert AdaptiveMu()(0, mean_reward=0.25) == pytest.approx(0.25)
    assert AdaptiveMu()(0, mean_reward=torch.tensor(0.0)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mean reward"):
        s(3)
    with pytest.raises(ValueError, match="mean_reward"):
        s(3, mean_reward=float("nan"))


@pytest.mark.parametrize(
    "factory, field",
    [
        (lambda: ConstantMu(1.5), "mu"),
        (lambda: ConstantMu(-0.1), "mu"),
        (lambda: ReferenceMu(mu_peak=1.1), "mu_peak"),
        (lambda: ReferenceMu(mu_valley=-0.01), "mu_valley"),
        (lambda: ReferenceMu(warmup_steps=-1), "warmup_steps"),
        (lambda: ReferenceMu(decay_steps=2.5), "decay_steps"),
        (lambda: LinearMu(mu_start=2.0), "mu_start"),
        (lambda: CosineMu(mu_end=-1.0), "mu_end"),
        (lambda: LinearMu(total_steps=-5), "total_steps"),
        (lambda: ExponentialMu(mu_end=0.0), "mu_end"),
        (lambda: ExponentialMu(mu_start=0.0), "mu_start"),
        (lambda: AdaptiveMu(mu_max=1.5), "mu_max"),
        (lambda: AdaptiveMu(tau=float("inf")), "tau"),
    ],
)
def test_invalid_args_name_the_field(factory, field):
    with pytest.raises(ValueError, match=rf"\.{field} must"):
        factory()


def test_negative_step_rejected():
    with pytest.raises(ValueError, match="step"):
        LinearMu()(-1)


# ----------------------------------------------------------------------------- token weights


def _expert_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def test_token_weights_hand_values():
    p = torch.tensor([[0.5, 0.25, 1.0, 0.0]])
    logp = p.log()  # includes -inf for p = 0
    torch.testing.assert_close(token_weights("phi", logp), torch.tensor([[0.25, 0.1875, 0.0, 0.0]]))
    torch.testing.assert_close(token_weights("sft_is", logp), p)
    torch.testing.assert_close(token_weights("none", logp), torch.ones(1, 4))
    torch.testing.assert_close(token_weights("adaptive", logp, reward=-2.0), p)  # |r| clamped to 1
    torch.testing.assert_close(token_weights("adaptive", logp, reward=0.5), p * 0.5)


def test_adaptive_per_row_reward():
    logp = torch.tensor([[0.5, 0.25], [0.5, 1.0]]).log()
    w = token_weights("adaptive", logp, reward=torch.tensor([0.5, -0.2]))
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.125], [0.1, 0.2]]))
    with pytest.raises(ValueError, match="adaptive"):
        token_weights("adaptive", logp, reward=torch.tensor([0.5, 0.1, 0.3]))


def test_entropy_and_margin_hand_values():
    probs = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    logits = probs.log()  # -inf entries: zero-probability tokens
    targets = torch.tensor([[2, 1, 0]])
    logp = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).log()
    ent = token_weights("entropy", logp, logits=logits)
    h_mid = (0.5 * math.log(2) + 2 * 0.25 * math.log(4)) / math.log(4)  # = 0.75
    torch.testing.assert_close(ent, torch.tensor([[1.0, h_mid, 0.0]]))
    # margin: top prob minus expert prob (0.25 - 0.25, 0.5 - 0.25, 1 - 1)
    torch.testing.assert_close(token_weights("margin", logp, logits=logits), torch.tensor([[0.0, 0.25, 0.0]]))
    # expert token not the top choice: 0.5 - 0.25
    targets2 = torch.tensor([[0, 2, 0]])
    logp2 = probs.gather(-1, targets2.unsqueeze(-1)).squeeze(-1).log()
    torch.testing.assert_close(token_weights("margin", logp2, logits=logits), torch.tensor([[0.0, 0.25, 0.0]]))
    # logp inconsistent with logits (e.g. other precision): 0.25 - 0.9, 0.5 - 0.9 clamped to 0
    w = token_weights("margin", torch.full((1, 3), math.log(0.9)), logits=logits)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.1]]))


def test_entropy_three_way():
    logits = torch.tensor([[[math.log(0.5), math.log(0.25), math.log(0.25)]]])
    w = token_weights("entropy", torch.tensor([[math.log(0.5)]]), logits=logits)
    torch.testing.assert_close(w, torch.tensor([[1.5 * math.log(2) / math.log(3)]]))


def test_phi_gradient_is_one_minus_p_times_grad_p():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))

    logp = _expert_logp(logits, targets)
    loss = -(token_weights("phi", logp) * logp).sum()
    (grad,) = torch.autograd.grad(loss, logits)

    p = _expert_logp(logits, targets).exp()
    ref = -((1 - p.detach()) * p).sum()
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(grad, grad_ref)

    # Sanity: a non-detached phi would give a different gradient, so the test can fail.
    logp = _expert_logp(logits, targets)
    p = logp.exp()
    (grad_attached,) = torch.autograd.grad(-(p * (1 - p) * logp).sum(), logits)
    assert not torch.allclose(grad, grad_attached)


def test_sft_is_gradient_is_grad_p():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (3, 4))
    logp = _expert_logp(logits, targets)
    (grad,) = torch.autograd.grad(-(token_weights("sft_is", logp) * logp).sum(), logits)
    (grad_ref,) = torch.autograd.grad(-_expert_logp(logits, targets).exp().sum(), logits)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("strategy", TOKEN_WEIGHT_STRATEGIES)
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_weights_in_unit_interval_and_detached(strategy, scale):
    torch.manual_seed(2)
    logits = (torch.randn(4, 6, 11) * scale).requires_grad_()
    targets = torch.randint(0, 11, (4, 6))
    logp = _expert_logp(logits, targets)
    w = token_weights(strategy, logp, logits=logits, reward=torch.tensor([3.0, -0.5, 0.0, 0.9]))
    assert w.shape == logp.shape
    assert w.dtype == logp.dtype
    assert not w.requires_grad and w.grad_fn is None
    assert torch.isfinite(w).all()
    assert (w >= 0).all() and (w <= 1).all()


def test_chunked_vocab_reduction_matches_unchunked(monkeypatch):
    import lit_align.weighting as weighting

    torch.manual_seed(3)
    logits = torch.randn(3, 5, 13)
    logp = _expert_logp(logits, torch.randint(0, 13, (3, 5)))
    full = {s: token_weights(s, logp, logits=logits) for s in ("entropy", "margin")}
    monkeypatch.setattr(weighting, "_CHUNK_ELEMS", 2 * 13)  # 2 rows per chunk, 8 chunks
    for s, expected in full.items():
        torch.testing.assert_close(token_weights(s, logp, logits=logits), expected)


def test_bf16_logits_and_slightly_positive_logp():
    logits = torch.randn(2, 3, 5).to(torch.bfloat16)
    logp = torch.full((2, 3), 1e-3)  # numerically p > 1 must not give negative phi
    assert (token_weights("phi", logp) == 0).all()
    w = token_weights("entropy", logp, logits=logits)
    assert w.dtype == torch.float32 and ((w >= 0) & (w <= 1)).all()


def test_unknown_strategy_or_missing_input():
    logp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"one of .*'phi'.*'margin'.*got 'bogus'"):
        token_weights("bogus", logp)
    for strategy in ("entropy", "margin"):
        with pytest.raises(ValueError, match=f"'{strategy}'.*logits"):
            token_weights(strategy, logp)
    with pytest.raises(ValueError, match="'adaptive'.*reward"):
        token_weights("adaptive", logp)
    with pytest.raises(ValueError, match="shape"):
        token_weights("entropy", logp, logits=torch.zeros(1, 3, 4))
