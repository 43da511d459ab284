"""Mixed groups in the core: a prompt's demonstration as a member of its GRPO group (LUFFY, SRFT).

- core.groups builds the demonstrations of a paired prompt batch as off-policy rows and mixes them into
  contiguous groups with their prompt's samples;
- a module's rollout batch over mixed groups scores each row against its own prompt's answer and takes
  advantages over the whole group or over its on-policy members (by hand, both forms);
- the RL term gives off-policy tokens -A f(p), f(p) = p / (p + gamma), no clip (value, gradient and
  metrics by hand in float64, equal for every micro-batch size), and a rollout with group ids but no
  off-policy row is plain GRPO exactly.
"""

import math

import pytest
import torch

from lit_align.core import groups
from lit_align.modules.grpo import GRPOModule
from lit_align.rollout import Rollout, position_ids_from_mask

G = 3


def exact(prompts, completions, answers):
    return [float(c == a) for c, a in zip(completions, answers)]


def _prompts() -> dict:
    return {
        "prompt_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
        "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "prompts": ["p0", "p1"],
        "answers": ["1", "2"],
        "demo_ids": torch.tensor([[[4, 3, 0]], [[5, 6, 3]]]),  # (B, k, D)
        "demo_mask": torch.tensor([[[1, 1, 0]], [[1, 1, 1]]]),
        "demonstrations": [["1"], ["2"]],
    }


def _sampled(prompts: dict, dtype=torch.float32) -> Rollout:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 12, (2 * G, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    old = -torch.rand(2 * G, 4, generator=g, dtype=dtype) * mask
    return Rollout(
        prompts["prompt_ids"].repeat_interleave(G, 0),
        prompts["prompt_mask"].repeat_interleave(G, 0),
        ids,
        mask,
        old,
        torch.zeros_like(old),
        ["1", "x", "x", "x", "x", "x"],
    )


def test_demonstrations_join_their_own_prompts_group():
    prompts = _prompts()
    demos = groups.demonstration_rows(prompts)
    assert demos.off_policy.tolist() == [True, True] and demos.group_ids.tolist() == [0, 1]
    assert demos.completion_ids.tolist() == [[4, 3, 0], [5, 6, 3]] and not demos.old_logp.any()
    mixed = groups.mix(_sampled(prompts), G, demos)
    assert mixed.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert mixed.off_policy.tolist() == [False, False, False, True] * 2
    assert mixed.completions == ["1", "x", "x", "1", "x", "x", "x", "2"]
    assert mixed.completion_ids[3, :2].tolist() == [4, 3] and mixed.completion_mask[3].tolist() == [1, 1, 0, 0]
    assert torch.equal(mixed.prompt_ids[3], prompts["prompt_ids"][0])  # each row keeps its prompt
    assert torch.equal(mixed.prompt_ids[7], prompts["prompt_ids"][1])
    with pytest.raises(ValueError, match="demonstration"):
        groups.demonstration_rows({k: v for k, v in prompts.items() if not k.startswith("demo")})


class Mixed(GRPOModule):
    """G - 0 samples plus the demonstration in each group (a LUFFY-shaped group), samples held fixed."""

    def group_rollouts(self, prompts):
        return groups.mix(_sampled(prompts), G, groups.demonstration_rows(prompts))


@pytest.mark.parametrize("stats", ["all", "on_policy"])
def test_mixed_group_advantages_by_hand(ckpt, stats):
    module = Mixed(model_name_or_path=ckpt, num_generations=G, reward=exact)
    module.advantage_stats = stats
    batch = module.rollout_batch(_prompts())
    assert batch["rewards"].tolist() == [1, 0, 0, 1, 0, 0, 0, 1]  # each row against its own prompt's answer
    eps = 1e-6
    if stats == "all":  # group 0: [1, 0, 0, 1] mean 1/2, std sqrt(1/3); group 1: [0, 0, 0, 1] mean 1/4, std 1/2
        s0 = math.sqrt(1 / 3)
        want = [0.5 / (s0 + eps), -0.5 / (s0 + eps), -0.5 / (s0 + eps), 0.5 / (s0 + eps)]
        want += [-0.25 / (0.5 + eps)] * 3 + [0.75 / (0.5 + eps)]
    else:  # statistics of the samples only: group 0 [1, 0, 0] mean 1/3, std sqrt(1/3); group 1 all 0: std 0
        s0 = math.sqrt(1 / 3)
        want = [(2 / 3) / (s0 + eps), (-1 / 3) / (s0 + eps), (-1 / 3) / (s0 + eps), (2 / 3) / (s0 + eps)]
        want += [0.0, 0.0, 0.0, 1.0]  # a demonstration that alone succeeds keeps r - mean (not divided by 0)
    torch.testing.assert_close(
        batch["advantages"].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6
    )


class WrongRows(GRPOModule):
    """group_rollouts with G - 1 (or G + 1) samples per prompt and no group ids: a method author's slip."""

    extra = -1

    def group_rollouts(self, prompts):
        r = _sampled(prompts)
        keep = [i for i in range(len(r.completions)) if self.extra >= 0 or i % G != G - 1]
        if self.extra > 0:
            keep = keep + keep[: len(prompts["prompts"])]
        return Rollout(
            *(t[keep] for t in (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)),
            r.old_logp[keep],
            r.entropy[keep],
            [r.completions[i] for i in keep],
        )


@pytest.mark.parametrize("extra", [-1, 1])
def test_rows_that_are_not_g_per_prompt_without_group_ids_stop_naming_the_hook(ckpt, extra):
    """B x (G - 1) rows would be grouped (and scored) across prompts without an error when B x (G - 1)
    happens to divide by G; B x (G + 1) rows would index past the batch's prompts."""
    module = WrongRows(model_name_or_path=ckpt, num_generations=G, reward=exact)
    module.extra = extra
    with pytest.raises(ValueError, match=r"WrongRows.group_rollouts returned \d+ rows for 2 prompts.*group_ids"):
        module.rollout_batch(_prompts())


def test_group_ids_outside_the_batchs_prompts_stop(ckpt):
    class BadIds(GRPOModule):
        def group_rollouts(self, prompts):
            r = groups.mix(_sampled(prompts), G, groups.demonstration_rows(prompts))
            r.group_ids = r.group_ids + 1  # prompt 1's rows claim a prompt 2 the batch does not have
            return r

    with pytest.raises(ValueError, match=r"group_ids .* must be one prompt index in \[0, 2\)"):
        BadIds(model_name_or_path=ckpt, num_generations=G, reward=exact).rollout_batch(_prompts())


def _float64_mixed(ckpt, micro=None, off=True):
    module = GRPOModule(
        model_name_or_path=ckpt,
        model_dtype="float64",
        num_generations=G,
        micro_batch_size=micro,
        epsilon_low=0.1,
        epsilon_high=0.1,
    )
    prompts = _prompts()
    mixed = groups.mix(_sampled(prompts, torch.float64), G, groups.demonstration_rows(prompts))
    mixed.old_logp = mixed.old_logp.double()
    if not off:
        mixed.off_policy = torch.zeros_like(mixed.off_policy)
    adv = torch.tensor([1.2, -0.4, -0.8, 0.9, -0.3, 0.0, 0.5, 1.5], dtype=torch.float64)
    return module, mixed, adv


def _reference(module, r: Rollout, adv: torch.Tensor, gamma: float = 0.1):
    """The term by hand: every position's logits, plain autograd, token-mean over all completion tokens."""
    P = r.prompt_ids.shape[1]
    ids, att = r.input_ids, r.attention_mask
    logits = module.model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att)).logits
    logp = torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)
    A = adv.unsqueeze(-1)
    ratio = torch.exp(logp - r.old_logp)
    on = -torch.minimum(ratio * A, ratio.clamp(0.9, 1.1) * A)
    p = logp.exp()
    shaped = -A * p / (p + gamma)  # behaviour probability 1: r = p
    off = r.off_policy.unsqueeze(-1).expand_as(logp) if r.off_policy is not None else torch.zeros_like(logp).bool()
    per_token = torch.where(off, shaped, on)
    m = r.completion_mask.double()
    loss = (per_token * m).sum() / m.sum()
    weight_mean = ((p / (p + gamma)) * m * off).sum().detach() / (m * off).sum()
    return loss, float((m * off).sum() / m.sum()), float(weight_mean)


@pytest.mark.parametrize("micro", [None, 1, 3])
def test_off_policy_tokens_get_the_shaped_objective_value_and_gradient(ckpt, micro):
    module, mixed, adv = _float64_mixed(ckpt, micro)
    loss, metrics = module.run_terms([module.rl_term(mixed, adv, 1.0)])
    got = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.policy.zero_grad()
    want, share, weight_mean = _reference(module, mixed, adv)
    want.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-9)
    for n, p in module.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-7, atol=1e-10)
    assert float(metrics["off_policy_token_share"]) == pytest.approx(share, rel=1e-9)  # 5 of 20 tokens
    assert float(metrics["off_policy_weight_mean"]) == pytest.approx(weight_mean, rel=1e-9)


def test_the_shaped_objectives_gradient_is_gamma_over_p_plus_gamma_squared(ckpt):
    """d(-A f(p))/dlogp = -A gamma p / (p + gamma)^2 on one demonstration token, by hand."""
    module, mixed, adv = _float64_mixed(ckpt)
    rows = torch.tensor([3])  # the first demonstration: 2 tokens
    scored = module.policy.logprobs(groups_completions(mixed), rows)
    logp = scored.logp.detach().requires_grad_(True)
    from lit_align import losses

    values, _ = losses.shaped_off_policy_per_token(logp, adv[rows], 0.1)
    values.sum().backward()
    p = logp.detach().exp()
    torch.testing.assert_close(logp.grad, -adv[rows].unsqueeze(-1) * 0.1 * p / (p + 0.1) ** 2)


def groups_completions(rollout):
    from lit_align.core.policy import Completions

    return Completions.of(rollout)


def test_group_ids_without_off_policy_rows_are_plain_grpo(ckpt):
    module, mixed, adv = _float64_mixed(ckpt, off=False)
    loss, metrics = module.run_terms([module.rl_term(mixed, adv, 1.0)])
    got = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.policy.zero_grad()
    plain = Rollout(
        *(
            getattr(mixed, f)
            for f in (
                "prompt_ids",
                "prompt_mask",
                "completion_ids",
                "completion_mask",
                "old_logp",
                "entropy",
                "completions",
            )
        )
    )
    want, m = module.run_terms([module.rl_term(plain, adv, 1.0)])
    assert float(loss) == float(want) and "off_policy_token_share" not in metrics
    for n, p in module.model.named_parameters():
        assert torch.equal(got[n], p.grad)


def test_off_advantages_give_each_off_policy_token_its_own(ckpt):
    """rl_term's off_advantages (N, T): each off-policy token's -A_t f(p) with its own A_t (0: no gradient
    there, the token still counted in the token-mean); on-policy tokens keep their row's advantage."""
    module, mixed, adv = _float64_mixed(ckpt)
    off_adv = torch.zeros(mixed.completion_mask.shape, dtype=torch.float64)
    off_adv[3, 0], off_adv[7, 1] = 2.0, -0.5  # one token of each demonstration; the other 3 get 0
    from lit_align.core import terms

    term = terms.rl_term(module.policy, mixed, adv, module.rl_settings, off_advantages=off_adv)
    loss, metrics = module.run_terms([term])
    got = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.policy.zero_grad()
    P = mixed.prompt_ids.shape[1]
    ids, att = mixed.input_ids, mixed.attention_mask
    logits = module.model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att)).logits
    logp = torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, mixed.completion_ids.unsqueeze(-1)).squeeze(-1)
    A = adv.unsqueeze(-1)
    ratio = torch.exp(logp - mixed.old_logp)
    on = -torch.minimum(ratio * A, ratio.clamp(0.9, 1.1) * A)
    p = logp.exp()
    off = mixed.off_policy.unsqueeze(-1).expand_as(logp)
    m = mixed.completion_mask.double()
    want = (torch.where(off, -off_adv * p / (p + 0.1), on) * m).sum() / m.sum()
    want.backward()
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-9)
    for n, param in module.model.named_parameters():
        torch.testing.assert_close(got[n], param.grad, rtol=1e-7, atol=1e-10)
    assert float(metrics["off_policy_token_share"]) == pytest.approx(5 / 21)  # the demonstrations: 5 of 21 tokens
