"""The step engine: one update's loss and gradients do not depend on the micro-batch size.

In float64 on the embedded model with rollouts held fixed, for SFT, GRPO, CHORD (phi and entropy token
weights), LUFFY and SRFT (mixed groups: a sample and a demonstration per prompt), HPT (one prompt routed
to its demonstration, one trained with GRPO), Prefix-RFT (the paper's and the official code's prefix
advantages, UFT's NLL form) and AMFT's meta-gradient, every loss aggregation: micro_batch_size 1, 2 and
the whole batch
give the same loss and the same gradient of every parameter as a direct whole-batch computation
(logits of every position, plain autograd), to 1e-6 relative. Rows have unequal token counts, so a
per-micro-batch mean would differ.
"""

import math

import pytest
import torch

from lit_align import losses
from lit_align.core import groups
from lit_align.modules.amft import AMFTModule
from lit_align.modules.chord import CHORDModule
from lit_align.modules.grpo import GRPOModule
from lit_align.modules.hpt import HPTModule
from lit_align.modules.luffy import LUFFYModule
from lit_align.modules.prefix_rft import PrefixRFTModule
from lit_align.modules.sft import SFTModule
from lit_align.modules.srft import SRFTModule
from lit_align.rollout import Rollout, position_ids_from_mask
from lit_align.weighting import ConstantMu

G = 2
MU = 0.3
HPT_SFT_COEF = 0.7


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 16, (5, 11), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate([11, 7, 9, 5, 10]):  # right padding: rows of unequal length
        mask[row, length:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    for row, prompt in enumerate([3, 2, 4, 3, 2]):
        labels[row, :prompt] = -100
    prompt_ids = torch.randint(3, 16, (2, 4), generator=g).repeat_interleave(G, 0)
    completion_ids = torch.randint(3, 16, (4, 6), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    for row, length in enumerate([6, 2, 4, 1]):
        completion_mask[row, length:] = 0
    old_logp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3 * completion_mask
    rollout = Rollout(
        prompt_ids,
        torch.ones_like(prompt_ids),
        completion_ids,
        completion_mask,
        old_logp,
        torch.zeros_like(old_logp),
        [""] * 4,
    )
    # the same rows as mixed groups (LUFFY, SRFT): each prompt's sample, then its demonstration (behaviour
    # log-prob 0), with the samples' sampling-time entropy (what SRFT's weights read)
    demo = torch.tensor([False, True, False, True])
    entropy = torch.rand(4, 6, generator=g, dtype=torch.float64) * 2 * completion_mask * (~demo).unsqueeze(-1)
    mixed = Rollout(
        prompt_ids,
        torch.ones_like(prompt_ids),
        completion_ids,
        completion_mask,
        old_logp.masked_fill(demo.unsqueeze(-1), 0.0),
        entropy,
        [""] * 4,
        group_ids=torch.tensor([0, 0, 1, 1]),
        off_policy=demo,
    )
    # each prompt's demonstration (HPT trains a routed prompt's own demonstration with SFT)
    demo_ids = torch.randint(3, 16, (2, 1, 5), generator=g)
    demo_mask = torch.tensor([[[1, 1, 1, 1, 1]], [[1, 1, 0, 0, 0]]])
    prompts = {
        "prompts": ["a", "b"],
        "answers": ["1", "2"],
        "prompt_ids": prompt_ids[::G],
        "prompt_mask": torch.ones_like(prompt_ids[::G]),
        "demo_ids": demo_ids * demo_mask,
        "demo_mask": demo_mask,
        "demonstrations": [["a"], ["b"]],
    }
    return {
        "expert": {"input_ids": ids, "attention_mask": mask, "labels": labels},
        "rollout": rollout,
        "mixed": mixed,
        "rewards": torch.tensor([1.0, 0.0, 0.2, 0.9], dtype=torch.float64),
        "prompts": prompts,
    }


def _prefixed(r: Rollout, objective: str) -> Rollout:
    """``r`` with the last row of each prompt's pair continuing a 1-token prefix (rows 1 and 3; row 1 then
    samples one more token): sampling-time entropies 0.3 and 0.8 at the given tokens, so with entropy_share
    0.5 row 3's alone keeps a gradient. The off-policy objective marks the hybrid rows off-policy."""
    prefix = torch.zeros_like(r.completion_mask)
    prefix[1, 0] = prefix[3, 0] = 1
    entropy = torch.rand(r.entropy.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    entropy[1, 0], entropy[3, 0] = 0.3, 0.8
    out = Rollout(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, r.old_logp, entropy, r.completions)
    out.prefix_mask = prefix
    if objective == "off_policy":
        out.group_ids = torch.arange(4) // G
        out.off_policy = prefix.bool().any(-1)
    return out


def _fixed(cls):
    class Fixed(cls):
        def rollout_and_score(self, prompts):
            rows = self._fixed["mixed" if isinstance(self, LUFFYModule) else "rollout"]
            return rows, self._fixed["rewards"], {}

    return Fixed


def _module(cls, aggregation, micro, **kwargs):
    module = _fixed(cls)(
        model_name_or_path=pytest.ckpt_path,
        model_dtype="float64",
        num_generations=G,
        loss_aggregation=aggregation,
        micro_batch_size=micro,
        epsilon_low=0.1,
        epsilon_high=0.1,
        **kwargs,
    )
    module._fixed = _batch()
    return module


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


def _mixed_reference(module, batch, srft: bool) -> torch.Tensor:
    """LUFFY's (SRFT's) update in one piece: advantages over each mixed group, the samples' clipped surrogate
    (SRFT: a positive sample's weighted w_RL), the demonstrations' -A p / (p + gamma), aggregated together
    [+ w_SFT x the demonstrations' NLL, aggregated over their own tokens]."""
    agg, hp = module.hparams.loss_aggregation, module.hparams
    r = batch["mixed"]
    demo = r.off_policy
    adv, _ = losses.group_advantages_by_id(batch["rewards"], r.group_ids, ~demo, hp.advantage_norm, "all")
    m = r.completion_mask
    if srft:
        on_tokens = m.bool() & ~demo.unsqueeze(-1)
        H = float((r.entropy * on_tokens).sum() / on_tokens.sum())
        w_sft, w_rl = hp.sft_coef * math.exp(-H), hp.rl_coef * math.exp(H)
        adv = torch.where(~demo & (adv > 0), adv * w_rl, adv)
    P = r.prompt_ids.shape[1]
    logits = _logits(module.model, r.input_ids, r.attention_mask)[:, P - 1 : -1]
    logp = torch.log_softmax(logits / hp.temperature, -1).gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)
    A = adv.unsqueeze(-1)
    ratio = torch.exp(logp - r.old_logp)
    surrogate = -torch.minimum(ratio * A, ratio.clamp(1 - hp.epsilon_low, 1 + hp.epsilon_high) * A)
    p = logp.exp()
    shaped = -A * p / (p + hp.off_policy_gamma)
    total = losses.aggregate(torch.where(demo.unsqueeze(-1), shaped, surrogate), m, agg, module.aggregation_norm)
    if srft:  # the demonstrations' NLL at temperature 1 (the SFT term's), over their own tokens
        # from a forward of their own, as the module runs the term (one backward through a forward shared with
        # the RL part differs from two in about the 7th digit of some gradients on this model)
        logits = _logits(module.model, r.input_ids[demo], r.attention_mask[demo])[:, P - 1 : -1]
        nll = -torch.log_softmax(logits, -1).gather(-1, r.completion_ids[demo].unsqueeze(-1)).squeeze(-1)
        total = total + w_sft * losses.aggregate(nll, m[demo], agg, module.aggregation_norm)
    return total


def _reference(module, batch, mu: float, weighting: str | None) -> torch.Tensor:
    """The update's loss, computed in one piece: every position's logits, whole-batch aggregation."""
    if weighting in ("luffy", "srft"):
        return _mixed_reference(module, batch, weighting == "srft")
    agg, hp = module.hparams.loss_aggregation, module.hparams
    if isinstance(module, HPTModule):
        return _hpt_reference(module, batch)
    total = torch.zeros((), dtype=torch.float64)
    if weighting in ("prefix", "prefix_code", "uft"):
        return _prefix_reference(module, batch, weighting)
    if mu < 1:
        r = batch["rollout"]
        adv, _ = losses.group_advantages(batch["rewards"], G, hp.advantage_norm)
        P = r.prompt_ids.shape[1]
        logits = _logits(module.model, r.input_ids, r.attention_mask)[:, P - 1 : -1]
        logp = torch.log_softmax(logits / hp.temperature, -1).gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)
        rl, _ = losses.clipped_surrogate(
            logp, r.old_logp, adv, r.completion_mask, hp.epsilon_low, hp.epsilon_high, agg, norm=module.aggregation_norm
        )
        total = total + (1 - mu) * rl
    if mu > 0:
        e = batch["expert"]
        logits = _logits(module.model, e["input_ids"], e["attention_mask"])[:, :-1]
        labels = e["labels"][:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        p = logp.detach().exp()
        weights = None
        if weighting == "phi":
            weights = p * (1 - p)
        elif weighting == "entropy":
            lp = torch.log_softmax(logits.detach(), -1)
            weights = (-(lp.exp() * lp).sum(-1) / torch.log(torch.tensor(logits.shape[-1], dtype=torch.float64))).clamp(
                0, 1
            )
        sft, _ = losses.masked_nll(logp, labels != -100, weights, agg, module.aggregation_norm)
        total = total + mu * sft
    return total


def _hpt_reference(module, batch) -> torch.Tensor:
    """HPT at gate 1, P counting rewards > 0: prompt 0 (rewards 1.0, 0.0: P = 1) trains its demonstration
    with SFT, prompt 1 (0.2, 0.9: P = 2) its samples with GRPO; L = L_RL(rows 2-3) + HPT_SFT_COEF * L_SFT."""
    agg, hp = module.hparams.loss_aggregation, module.hparams
    r = batch["rollout"]
    adv, _ = losses.group_advantages(batch["rewards"], G, hp.advantage_norm)
    P = r.prompt_ids.shape[1]
    logits = _logits(module.model, r.input_ids, r.attention_mask)[2:, P - 1 : -1]
    logp = torch.log_softmax(logits / hp.temperature, -1).gather(-1, r.completion_ids[2:].unsqueeze(-1)).squeeze(-1)
    rl, _ = losses.clipped_surrogate(
        logp,
        r.old_logp[2:],
        adv[2:],
        r.completion_mask[2:],
        hp.epsilon_low,
        hp.epsilon_high,
        agg,
        norm=module.aggregation_norm,
    )
    e = {k: v[:1] for k, v in groups.demonstration_labelled(batch["prompts"], 1, 0).items()}
    logits = _logits(module.model, e["input_ids"], e["attention_mask"])[:, :-1]
    labels = e["labels"][:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sft, _ = losses.masked_nll(logp, labels != -100, None, agg, module.aggregation_norm)
    return rl + HPT_SFT_COEF * sft


def _prefix_reference(module, batch, form: str) -> torch.Tensor:
    """Prefix-RFT's update in one piece: advantages over the on-policy rows (the paper) or the official
    code's, sampled tokens the clipped surrogate, the kept given token (row 3's) -A_prefix p / (p + 0.1), row
    1's given token 0 (counted); UFT: the surrogate over the sampled tokens + 0.5 x the NLL of the given ones."""
    agg, hp = module.hparams.loss_aggregation, module.hparams
    r, rewards = module._fixed["rollout"], batch["rewards"]
    P = r.prompt_ids.shape[1]
    logits = _logits(module.model, r.input_ids, r.attention_mask)[:, P - 1 : -1]
    logp = torch.log_softmax(logits, -1).gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)
    given = r.prefix_mask.bool()
    if form == "uft":
        adv, _ = losses.group_advantages(rewards, G, hp.advantage_norm)
        sampled = r.completion_mask.bool() & ~given
        rl, _ = losses.clipped_surrogate(
            logp, r.old_logp, adv, sampled, hp.epsilon_low, hp.epsilon_high, agg, norm=module.aggregation_norm
        )
        # the NLL from a forward of its own, as the module's second term (the embedded Llama's RMSNorm runs
        # in float32: one backward of a sum and two summed backward passes differ in float32 rounding)
        again = _logits(module.model, r.input_ids, r.attention_mask)[:, P - 1 : -1]
        logp = torch.log_softmax(again, -1).gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)
        return rl + 0.5 * losses.masked_nll(logp, given, None, agg, module.aggregation_norm)[0]
    hybrid = given.any(-1)
    adv, _ = losses.group_advantages_by_id(rewards, r.group_ids, ~hybrid, hp.advantage_norm, "on_policy")
    prefix_adv = adv
    if form == "prefix_code":  # hybrid rows: continuation r / (1 + eps), prefix that minus the on-policy mean
        on_mean = rewards.view(-1, G)[:, 0].repeat_interleave(G)
        adv = torch.where(hybrid, rewards / (1 + 1e-6), adv)
        prefix_adv = adv - on_mean
    ratio = torch.exp(logp - r.old_logp)
    A = adv.unsqueeze(-1)
    per_token = -torch.minimum(ratio * A, ratio.clamp(1 - hp.epsilon_low, 1 + hp.epsilon_high) * A)
    p = logp.exp()
    kept = torch.zeros_like(given)
    kept[3, 0] = True
    shaped = -(prefix_adv.unsqueeze(-1) * kept) * p / (p + 0.1)
    return losses.aggregate(torch.where(given, shaped, per_token), r.completion_mask, agg, module.aggregation_norm)


def _grads(module) -> dict:
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


CASES = {
    "sft": (SFTModule, {}, 1.0, None),
    "grpo": (GRPOModule, {}, 0.0, None),
    "chord_phi": (CHORDModule, {"mu_schedule": ConstantMu(MU), "token_weighting": "phi"}, MU, "phi"),
    "chord_entropy": (CHORDModule, {"mu_schedule": ConstantMu(MU), "token_weighting": "entropy"}, MU, "entropy"),
    "luffy": (LUFFYModule, {"off_policy_gamma": 0.3}, None, "luffy"),
    "srft": (SRFTModule, {"off_policy_gamma": 0.3, "sft_coef": 0.7, "rl_coef": 0.4}, None, "srft"),
    "hpt": (HPTModule, {"gate": 1, "correct_by": "reward", "sft_loss_coef": HPT_SFT_COEF}, None, None),
    "prefix_rft": (PrefixRFTModule, {"prefix_rollouts": 1, "entropy_share": 0.5}, 0.0, "prefix"),
    "prefix_rft_code": (
        PrefixRFTModule,
        {"prefix_rollouts": 1, "entropy_share": 0.5, "prefix_advantage": "code"},
        0.0,
        "prefix_code",
    ),
    "uft": (PrefixRFTModule, {"prefix_rollouts": 2, "prefix_objective": "nll", "sft_loss_coef": 0.5}, 0.0, "uft"),
}


@pytest.fixture(autouse=True, scope="module")
def _ckpt_path(ckpt):
    pytest.ckpt_path = ckpt


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_micro_batches_give_the_whole_batch_loss_and_gradients(case, aggregation):
    cls, kwargs, mu, weighting = CASES[case]
    results = []
    for micro in (1, 2, None):
        module = _module(cls, aggregation, micro, **kwargs)
        batch = module._fixed
        if cls is PrefixRFTModule:
            batch["rollout"] = _prefixed(batch["rollout"], kwargs.get("prefix_objective", "off_policy"))
        loss, metrics = module.accumulate_update({"expert": batch["expert"], "prompts": batch["prompts"]})
        results.append((float(loss), _grads(module)))
    module.policy.zero_grad()
    ref = _reference(module, batch, mu, weighting)
    ref.backward()
    want = _grads(module)
    assert float(ref) != 0.0 and want
    for loss, grads in results:
        assert loss == pytest.approx(float(ref), rel=1e-6)
        assert grads.keys() == want.keys()
        for name, g in want.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-10, msg=name)


def test_micro_batches_run_at_most_that_many_rows_per_forward():
    module = _module(CHORDModule, "token-mean", 2, mu_schedule=ConstantMu(MU), token_weighting="phi")
    rows = []
    hook = module.model.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        batch = module._fixed
        module.accumulate_update({"expert": batch["expert"], "prompts": batch["prompts"]})
    finally:
        hook.remove()
    assert max(rows) <= 2 and sum(rows) >= 5 + 4  # every expert row and every rollout row, in pieces


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_amft_meta_gradient_does_not_depend_on_micro_batches(aggregation):
    batch = _batch()
    meta = {k: v.flip(0) for k, v in batch["expert"].items()}
    out = []
    for micro in (1, 2, None):
        m = _module(AMFTModule, aggregation, micro, meta_objective="expert_nll", warmup_sft_steps=0, meta_interval=1)
        adv, _ = losses.group_advantages(batch["rewards"], G, "std")
        l_sft, l_rl, g_sft, g_rl, _ = m.split_gradients(batch["expert"], batch["rollout"], adv)
        theta, es, er = m.look_ahead(g_sft, g_rl, 0.5, 0.1)
        dV, V = m.meta_gradient(theta, es, er, 0.1, {"expert": meta})
        out.append((float(l_sft), float(l_rl), dV, V, g_sft))
    assert out[0][2] != 0.0
    for l_sft, l_rl, dV, V, g_sft in out[1:]:
        assert l_sft == pytest.approx(out[0][0], rel=1e-6)
        assert l_rl == pytest.approx(out[0][1], rel=1e-6)
        assert dV == pytest.approx(out[0][2], rel=1e-6)
        assert V == pytest.approx(out[0][3], rel=1e-6)
        for a, b in zip(g_sft, out[0][4]):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
