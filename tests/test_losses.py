import math

import pytest
import torch

from lit_align import losses


def test_aggregate_modes_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert losses.aggregate(v, m, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert losses.aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert losses.aggregate(v, m, "seq-mean-token-sum").item() == pytest.approx((6.0 + 4.0) / 2)
    # an empty row is ignored by the seq modes, an empty mask gives 0
    m2 = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert losses.aggregate(v, m2, "seq-mean-token-mean").item() == pytest.approx(2.0)
    assert losses.aggregate(v, torch.zeros_like(m), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="loss_aggregation"):
        losses.aggregate(v, m, "mean")


def test_token_logprobs_and_entropy_match_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    ids = torch.randint(0, 5, (2, 3))
    for t in (1.0, 0.7):
        ref = torch.log_softmax(logits / t, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(losses.token_logprobs(logits, ids, t), ref, atol=1e-6)
    uniform = torch.zeros(1, 1, 4)
    assert losses.entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert losses.entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_masked_nll_weighted_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = losses.masked_nll(logp, mask)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    w = torch.tensor([[0.5, 0.0, 1.0]])
    loss_w, m = losses.masked_nll(logp, mask, w)
    assert loss_w.item() == pytest.approx(0.5 * math.log(2) / 2)
    assert m["expert_nll"].item() == pytest.approx(loss.item())


def test_group_advantages_modes_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, m = losses.group_advantages(r, 4, "std")
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std().item()  # unbiased: 0.5
    assert std == pytest.approx(0.5)
    assert adv[:4].tolist() == pytest.approx([0.75 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 2)
    assert adv[4:].tolist() == [0.0] * 4  # identical rewards: no signal
    assert m["frac_reward_zero_std"].item() == 0.5
    assert m["reward_mean"].item() == pytest.approx(5 / 8)
    adv_none, _ = losses.group_advantages(r, 4, "none")
    assert adv_none[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    adv_b, _ = losses.group_advantages(r, 4, "batch-std")
    assert adv_b[0].item() == pytest.approx(0.75 / (r.std().item() + 1e-6))
    with pytest.raises(ValueError, match="num_generations"):
        losses.group_advantages(r, 1)
    with pytest.raises(ValueError, match="groups of 3"):
        losses.group_advantages(r, 3)


def test_clipped_surrogate_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.5, 0.75, 0.25]]))  # ratios 1, 1.5, 0.5
    mask = torch.ones(1, 3)
    loss, m = losses.clipped_surrogate(new, old, torch.tensor([1.0]), mask, 0.2, 0.3)
    # A > 0: min(rho, clip(rho)) -> 1, 1.3, 0.5
    assert loss.item() == pytest.approx(-(1.0 + 1.3 + 0.5) / 3)
    assert m["clip_ratio"].item() == pytest.approx(1 / 3)
    loss_neg, m = losses.clipped_surrogate(new, old, torch.tensor([-2.0]), mask, 0.2, 0.3)
    # A < 0: -min(rho A, clip A) = max(rho, clip(rho)) * 2 -> 1, 1.5, 0.8
    assert loss_neg.item() == pytest.approx(2 * (1.0 + 1.5 + 0.8) / 3)
    assert m["clip_ratio"].item() == pytest.approx(1 / 3)


def test_kl_estimators_by_hand_and_in_surrogate():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    lr = math.log(0.5)  # log(p_ref / p)
    assert losses.kl_penalty(logp, ref, "k1").item() == pytest.approx(-lr)
    assert losses.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * lr**2)
    assert losses.kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 - lr)
    base, _ = losses.clipped_surrogate(logp, logp, torch.tensor([1.0]), torch.ones(1, 1))
    with_kl, m = losses.clipped_surrogate(logp, logp, torch.tensor([1.0]), torch.ones(1, 1), ref_logp=ref, beta=0.1)
    assert (with_kl - base).item() == pytest.approx(0.1 * (0.5 - 1 - lr))
    assert m["kl"].item() == pytest.approx(0.5 - 1 - lr)
    with pytest.raises(ValueError, match="ref_logp"):
        losses.clipped_surrogate(logp, logp, torch.tensor([1.0]), torch.ones(1, 1), beta=0.1)


def test_surrogate_gradient_is_advantage_weighted_score():
    # at rho = 1 the gradient of the token-mean surrogate is -A * grad logp / n_tokens
    logits = torch.randn(1, 2, 4, requires_grad=True)
    ids = torch.tensor([[1, 3]])
    logp = losses.token_logprobs(logits, ids)
    loss, _ = losses.clipped_surrogate(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2))
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(-(2.0 * logp).sum() / 2, logits)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_importance_weights_scale_the_clipped_surrogate_but_not_the_kl():
    logp = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.0, -2.5]])
    ref = torch.tensor([[-1.5, -2.0]])
    adv = torch.tensor([2.0])
    w = torch.tensor([[0.5, 3.0]])
    plain, _ = losses.surrogate_per_token(logp, old, adv, 0.2, 0.2, ref, 0.1, "k1")
    weighted, _ = losses.surrogate_per_token(logp, old, adv, 0.2, 0.2, ref, 0.1, "k1", is_weights=w)
    rho = math.exp(0.5)  # token 2: clipped at 1.2 (A > 0 takes the smaller)
    surrogate = torch.tensor([[-1.0 * 2.0, -min(rho, 1.2) * 2.0]])
    kl = torch.tensor([[0.5, 0.0]])  # k1: logp - ref_logp
    torch.testing.assert_close(plain, surrogate + 0.1 * kl)
    torch.testing.assert_close(weighted, w * surrogate + 0.1 * kl)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_consumed_logits_give_the_same_gradient_in_their_own_storage(temperature):
    # a model's output (logits from a linear head, as an LM head gives them), consumed by the loss:
    # the gradient that reaches the head's weight is autograd's log_softmax one, and the backward
    # writes it where the logits were instead of a second (B, T, V) tensor
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, dtype=torch.float64)
    head = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 50, (3, 5))
    weights = torch.randn(3, 5, dtype=torch.float64)
    ref_logp = torch.log_softmax((hidden @ head.T) / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (g_ref,) = torch.autograd.grad((weights * ref_logp).sum(), head)
    logits = hidden @ head.T
    storage = logits.untyped_storage().data_ptr()
    seen = []
    logits.register_hook(lambda g: seen.append(g.untyped_storage().data_ptr()))
    logp = losses.token_logprobs(logits, ids, temperature, consume=True)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad((weights * logp).sum(), head)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)
    assert seen == [storage]  # the gradient lives in the logits' storage


def test_consumed_logits_read_by_another_backward_raise_instead_of_a_wrong_gradient():
    logits = torch.randn(2, 3, 7) * torch.ones(1, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3))
    other = (logits * logits).sum()  # saves the logits; its backward runs after the log-softmax's
    logp = losses.token_logprobs(logits, ids, consume=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (logp.sum() + other).backward()
