"""The tensor building blocks of the demonstration-in-the-group methods (LUFFY, SRFT, HPT, Prefix-RFT):
the shaped off-policy objective, advantages over groups named by id, the weighted per-token NLL. Expected
values are written out by hand (closed forms in float64), never taken from the function under test."""

import math

import pytest
import torch

from lit_align import losses

D = torch.float64
EPS = 1e-6


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=D), rtol=1e-12, atol=1e-12)


# ---- shaped off-policy objective (LUFFY) --------------------------------------------------------------


def test_shaped_off_policy_value_and_gradient_with_behaviour_probability_one():
    p = torch.tensor([[0.5, 0.1, 0.9], [0.2, 0.05, 1.0]], dtype=D)
    logp = p.log().requires_grad_()
    adv = torch.tensor([2.0, -1.0], dtype=D)
    values, m = losses.shaped_off_policy_per_token(logp, adv, gamma=0.1)
    # f(p) = p / (p + 0.1): 0.5/0.6, 0.1/0.2, 0.9/1.0 | 0.2/0.3, 0.05/0.15, 1/1.1
    f = [[5 / 6, 1 / 2, 9 / 10], [2 / 3, 1 / 3, 10 / 11]]
    close(values, [[-2 * x for x in f[0]], [1 * x for x in f[1]]])
    close(m["off_policy_weight"], f)
    assert not m["off_policy_weight"].requires_grad
    # d loss / d logp = -A * gamma p / (p + gamma)^2 (no clipping: every token has a gradient)
    (g,) = torch.autograd.grad(values.sum(), logp)
    dfdlogp = [[0.05 / 0.36, 0.01 / 0.04, 0.09 / 1.0], [0.02 / 0.09, 0.005 / 0.0225, 0.1 / 1.21]]
    close(g, [[-2 * x for x in dfdlogp[0]], [1 * x for x in dfdlogp[1]]])


def test_shaped_off_policy_gradient_in_probability_is_gamma_over_p_plus_gamma_squared():
    # f carries the gradient (no detach, as LUFFY's code and paper): d f / d p = gamma / (p + gamma)^2
    p = torch.tensor([[0.5, 0.02]], dtype=D, requires_grad=True)
    values, _ = losses.shaped_off_policy_per_token(p.log(), torch.tensor([1.0], dtype=D), gamma=0.1)
    (g,) = torch.autograd.grad(values.sum(), p)
    close(g, [[-0.1 / 0.36, -0.1 / 0.0144]])  # the rare token gets 25x the push of the likely one


def test_shaped_off_policy_with_behaviour_logprobs_shapes_the_ratio():
    p = torch.tensor([[0.2, 0.03]], dtype=D)
    beta = torch.tensor([[0.4, 0.3]], dtype=D)  # ratios 0.5, 0.1
    logp = p.log().requires_grad_()
    blogp = beta.log().requires_grad_()
    values, m = losses.shaped_off_policy_per_token(logp, torch.tensor([1.0], dtype=D), 0.1, blogp)
    close(values, [[-5 / 6, -1 / 2]])
    close(m["off_policy_weight"], [[5 / 6, 1 / 2]])
    (g,) = torch.autograd.grad(values.sum(), logp)
    close(g, [[-0.1 * 0.5 / 0.36, -0.1 * 0.1 / 0.04]])  # -A gamma r / (r + gamma)^2
    assert blogp.grad is None  # the behaviour log-probs are constants


def test_shaped_off_policy_other_gamma_and_huge_ratio_stay_finite():
    logp = torch.tensor([[math.log(0.5), 0.0]], dtype=D, requires_grad=True)
    values, _ = losses.shaped_off_policy_per_token(logp, torch.tensor([3.0], dtype=D), gamma=0.5)
    close(values, [[-3 * 0.5, -3 / 1.5]])
    # a tiny behaviour probability: r = e^1000 overflows, f -> 1 and the gradient -> 0, not nan
    big, _ = losses.shaped_off_policy_per_token(logp, torch.tensor([1.0], dtype=D), 0.1, torch.full((1, 2), -1000.0))
    (g,) = torch.autograd.grad(big.sum(), logp)
    close(big.detach(), [[-1.0, -1.0]])
    close(g, [[0.0, 0.0]])


def test_shaped_off_policy_errors():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="gamma"):
        losses.shaped_off_policy_per_token(logp, torch.ones(2), gamma=0.0)
    with pytest.raises(ValueError, match="advantages"):
        losses.shaped_off_policy_per_token(logp, torch.ones(2, 3))


# ---- advantages over groups named by id -----------------------------------------------------------------

# rows, shuffled and of unequal groups: group 7 = 3 on-policy (1, 0, 0) + a demonstration (1); group 3 =
# 2 on-policy (0, 1) + a demonstration (1); group 5 = one on-policy row (1); group -2 = a demonstration alone
IDS = torch.tensor([7, 3, 5, 7, 7, -2, 3, 3, 7])
REWARDS = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=D)
ON = torch.tensor([True, True, True, False, True, False, False, True, True])


def test_mixed_groups_by_hand_statistics_over_all_members():
    adv, m = losses.group_advantages_by_id(REWARDS, IDS, ON, "std", "all")
    # group 7: (1, 1, 0, 0) mean 1/2, unbiased std sqrt(1/3); group 3: (0, 1, 1) mean 2/3, std sqrt(1/3);
    # groups 5 and -2 hold one member: std undefined -> advantage 0
    s = math.sqrt(1 / 3) + EPS
    close(adv, [0.5 / s, -2 / 3 / s, 0.0, 0.5 / s, -0.5 / s, 0.0, 1 / 3 / s, 1 / 3 / s, -0.5 / s])
    close(m["reward_mean"], 6 / 9)
    close(m["reward_std"], 2 * math.sqrt(1 / 3) / 4)
    close(m["frac_reward_zero_std"], 2 / 4)
    assert adv.dtype == D


def test_mixed_groups_by_hand_statistics_over_on_policy_members():
    adv, m = losses.group_advantages_by_id(REWARDS, IDS, ON, "std", "on_policy")
    # group 7: on-policy (1, 0, 0) mean 1/3, std sqrt(1/3), the demonstration (1) measured against them;
    # group 3: on-policy (0, 1) mean 1/2, std sqrt(1/2); group 5: one on-policy row -> 0; group -2: none -> 0
    s7, s3 = math.sqrt(1 / 3) + EPS, math.sqrt(1 / 2) + EPS
    close(adv, [2 / 3 / s7, -0.5 / s3, 0.0, 2 / 3 / s7, -1 / 3 / s7, 0.0, 0.5 / s3, 0.5 / s3, -1 / 3 / s7])
    close(m["reward_mean"], 3 / 6)  # the on-policy rows only
    close(m["reward_std"], (math.sqrt(1 / 3) + math.sqrt(1 / 2)) / 4)
    close(m["frac_reward_zero_std"], 2 / 4)
    none, _ = losses.group_advantages_by_id(REWARDS, IDS, ON, "none", "on_policy")
    close(none, [2 / 3, -0.5, 0.0, 2 / 3, -1 / 3, 0.0, 0.5, 0.5, -1 / 3])
    # batch-std: the std of the on-policy rewards (1, 0, 1, 0, 1, 0), unbiased: sqrt(6 * 0.25 / 5)
    b = math.sqrt(0.3) + EPS
    batch, _ = losses.group_advantages_by_id(REWARDS, IDS, ON, "batch-std", "on_policy")
    close(batch, [2 / 3 / b, -0.5 / b, 0.0, 2 / 3 / b, -1 / 3 / b, 0.0, 0.5 / b, 0.5 / b, -1 / 3 / b])


def test_demonstration_keeps_its_signal_when_every_rollout_failed():
    r = torch.tensor([0, 0, 0, 1], dtype=D)
    ids = torch.zeros(4, dtype=torch.long)
    on = torch.tensor([True, True, True, False])
    # over all members: mean 1/4, std sqrt(0.75 / 3) = 1/2
    adv_all, _ = losses.group_advantages_by_id(r, ids, on, "std", "all")
    close(adv_all, [-0.25 / (0.5 + EPS)] * 3 + [0.75 / (0.5 + EPS)])
    # over the on-policy members: zero std; the rollouts get 0, the demonstration r - mean = 1, not 0
    for norm in losses.ADVANTAGE_NORMS:
        adv, m = losses.group_advantages_by_id(r, ids, on, norm, "on_policy")
        close(adv, [0.0, 0.0, 0.0, 1.0])
        close(m["frac_reward_zero_std"], 1.0)


def test_single_member_groups_and_identical_rewards_give_zero():
    r = torch.tensor([0.3, 0.7, 0.1, 0.1, 0.1], dtype=D)
    adv, m = losses.group_advantages_by_id(r, torch.tensor([4, 9, 2, 2, 2]))
    close(adv, [0.0] * 5)  # 0 exactly, not the rounding residue of 0.1 - mean(0.1, 0.1, 0.1)
    close(m["reward_std"], 0.0)
    close(m["frac_reward_zero_std"], 1.0)


@pytest.mark.parametrize("norm", losses.ADVANTAGE_NORMS)
def test_contiguous_groups_equal_group_advantages_bit_for_bit(norm):
    torch.manual_seed(0)
    binary = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0], dtype=torch.float32)
    for rewards, g in ((torch.rand(24), 4), (binary, 4), (torch.randn(64), 8), (torch.rand(6), 2)):
        expected, em = losses.group_advantages(rewards, g, norm)
        ids = torch.arange(rewards.numel()) // g
        on = torch.rand(rewards.numel()) < 0.5  # ignored by stats="all"
        for kwargs in ({}, {"on_policy": torch.ones_like(on), "stats": "on_policy"}, {"on_policy": on}):
            adv, m = losses.group_advantages_by_id(rewards, ids, norm=norm, **kwargs)
            assert torch.equal(adv, expected)
            assert m.keys() == em.keys()
            for k in em:
                assert torch.equal(m[k], em[k]), k


def test_shuffled_ids_permute_the_advantages():
    torch.manual_seed(1)
    rewards = torch.rand(12)  # float32: group_advantages computes in float32 whatever the input
    expected, _ = losses.group_advantages(rewards, 4)
    perm = torch.randperm(12)
    ids = (torch.arange(12) // 4 * 10 + 5)[perm]  # any ids, in any order
    adv, _ = losses.group_advantages_by_id(rewards[perm], ids)
    torch.testing.assert_close(adv, expected[perm])  # summed in another order: equal to rounding


def test_group_advantages_by_id_errors():
    r = torch.zeros(4)
    with pytest.raises(ValueError, match="advantage_stats"):
        losses.group_advantages_by_id(r, torch.zeros(4, dtype=torch.long), stats="split")
    with pytest.raises(ValueError, match="advantage_norm"):
        losses.group_advantages_by_id(r, torch.zeros(4, dtype=torch.long), norm="mean")
    with pytest.raises(ValueError, match="integers"):
        losses.group_advantages_by_id(r, torch.zeros(4))
    with pytest.raises(ValueError, match="group_ids"):
        losses.group_advantages_by_id(r, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="on_policy"):
        losses.group_advantages_by_id(r, torch.zeros(4, dtype=torch.long), torch.ones(3, dtype=torch.bool))


# ---- weighted NLL ---------------------------------------------------------------------------------------


def test_weighted_nll_per_token_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=D, requires_grad=True)
    close(losses.weighted_nll_per_token(logp).detach(), [[math.log(2), math.log(4)]])
    w = torch.tensor([[2.0, 0.5]], dtype=D)
    values = losses.weighted_nll_per_token(logp, w)
    close(values.detach(), [[2 * math.log(2), 0.5 * math.log(4)]])
    (g,) = torch.autograd.grad(values.sum(), logp)
    close(g, [[-2.0, -0.5]])
