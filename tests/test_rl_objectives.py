"""The RL objectives TRL also ships equal TRL's own loss function: GSPO's sequence-level ratio, CISPO, SAPO,
Dr.GRPO's constant normaliser, two-sided clipping (delta), the top-entropy token mask and the entropy bonus.

Two levels, in float64:
- on given tensors: our per-token objective aggregated (:mod:`lit_align.losses`) against
  GRPOTrainer._compute_loss (tests/_trl.py), loss and gradient d/d logp;
- through a module: GRPOModule's update on the embedded model with its rollouts held fixed (the RL term of
  :mod:`lit_align.core.terms` run by the step engine, micro-batches 1, 2 and the whole batch) against TRL's
  loss on the same model's log-probs and entropies from one whole-batch forward: the gradient of every
  parameter. So the settings reach the objective, and the engine's exact normalisation is TRL's for one
  process and one accumulation step.
Plus hand-computed values where TRL has no counterpart (GSPO-token, the per-completion entropy quantile).
"""

from __future__ import annotations

import math

import pytest
import torch
from _trl import trl_loss

from lit_align import losses
from lit_align.modules.grpo import GRPOModule
from lit_align.rollout import Rollout, position_ids_from_mask

pytest.importorskip("trl", reason="TRL is not installed (pip install 'lit-align[bench]')")

G = 2


def _tensors(seed: int = 0, rows: int = 6, tokens: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, tokens, generator=g, dtype=torch.float64) * 3
    old_logp = logp + 0.25 * torch.randn(rows, tokens, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 6, 2, 5])[:rows]
    mask = (torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)).long()
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    # float32 values (TRL takes its entropy quantile in float32: a float64 entropy at the threshold would
    # compare against its float32 rounding)
    entropy = (torch.rand(rows, tokens, generator=g, dtype=torch.float64) * 2).float().double()
    return {"logp": logp, "old_logp": old_logp, "mask": mask, "adv": adv, "entropy": entropy}


# ours (aggregation, surrogate keywords) -> TRL's GRPOConfig fields
OBJECTIVES = {
    "gspo-token-mean": (
        "token-mean",
        {"importance_sampling_level": "sequence", "eps_low": 0.03, "eps_high": 0.03},
        {"loss_type": "dapo", "importance_sampling_level": "sequence", "epsilon": 0.03, "epsilon_high": 0.03},
    ),
    "gspo-seq-mean": (
        "seq-mean-token-mean",
        {"importance_sampling_level": "sequence", "eps_low": 0.03, "eps_high": 0.03},
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 0.03, "epsilon_high": 0.03},
    ),
    "cispo": ("token-mean", {"policy_loss": "cispo", "eps_high": 1.1}, {"loss_type": "cispo", "epsilon_high": 1.1}),
    "cispo-sequence": (
        "token-mean",
        {"policy_loss": "cispo", "eps_high": 1.05, "importance_sampling_level": "sequence"},
        {"loss_type": "cispo", "epsilon_high": 1.05, "importance_sampling_level": "sequence"},
    ),
    "sapo": ("seq-mean-token-mean", {"policy_loss": "sapo"}, {"loss_type": "sapo"}),
    "dr_grpo": ("seq-mean-token-sum-norm", {}, {"loss_type": "dr_grpo"}),
    "delta": (
        "token-mean",
        {"delta": 1.1, "eps_high": 0.05},
        {"loss_type": "dapo", "delta": 1.1, "epsilon_high": 0.05},
    ),
}


def _ours(b: dict, aggregation: str, kw: dict, logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
    kw = dict(kw)
    eps_low, eps_high = kw.pop("eps_low", 0.2), kw.pop("eps_high", 0.2)
    per_token, metrics = losses.surrogate_per_token(
        logp, b["old_logp"], b["adv"], eps_low, eps_high, mask=b["mask"], **kw
    )
    return losses.aggregate(per_token, b["mask"], aggregation, norm=b["mask"].shape[1]), metrics


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_equals_trls_loss_and_gradient(name):
    aggregation, ours_kw, trl_kw = OBJECTIVES[name]
    b = _tensors()
    logp = b["logp"].clone().requires_grad_(True)
    ours, metrics = _ours(b, aggregation, ours_kw, logp)
    (our_grad,) = torch.autograd.grad(ours, logp)
    logp = b["logp"].clone().requires_grad_(True)
    theirs = trl_loss(logp, b["old_logp"], b["mask"], b["adv"], **{"epsilon": 0.2, **trl_kw})
    (their_grad,) = torch.autograd.grad(theirs, logp)
    assert ours.item() != 0.0 and our_grad.abs().sum() > 0
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-10, atol=1e-12)
    if "clip_ratio" in metrics and name != "sapo":  # the capped / clipped branch is exercised, and not everywhere
        share = float(losses.aggregate(metrics["clip_ratio"], b["mask"]))
        assert 0 < share < 1, share


def test_delta_caps_only_negative_advantages_and_differs_from_plain_clipping():
    b = _tensors()
    plain, _ = _ours(b, "token-mean", {"eps_high": 0.05}, b["logp"])
    capped, _ = _ours(b, "token-mean", {"eps_high": 0.05, "delta": 1.1}, b["logp"])
    ratio = torch.exp(b["logp"] - b["old_logp"])
    touched = (ratio > 1.1) & (b["adv"] < 0).unsqueeze(-1) & b["mask"].bool()
    assert touched.any() and plain.item() != capped.item()
    # only tokens with ratio > delta and A < 0 change: -min(min(r, delta) A, clip(r) A) = -delta A there
    pt_plain, _ = losses.surrogate_per_token(b["logp"], b["old_logp"], b["adv"], 0.2, 0.05)
    pt_capped, _ = losses.surrogate_per_token(b["logp"], b["old_logp"], b["adv"], 0.2, 0.05, delta=1.1)
    changed = (pt_plain != pt_capped) & b["mask"].bool()
    assert torch.equal(changed, touched)
    torch.testing.assert_close(pt_capped[touched], (-1.1 * b["adv"].unsqueeze(-1).expand_as(ratio))[touched])


def test_top_entropy_mask_per_completion_equals_trls_on_one_completion_at_a_time():
    """TRL's quantile is over the tokens of the batch it is given; ours over each completion's: TRL called on
    one completion at a time gives our per-row losses and gradients."""
    b = _tensors()
    logp = b["logp"].clone().requires_grad_(True)
    keep = losses.top_entropy_mask(b["entropy"], b["mask"], 0.4)
    per_token, _ = losses.surrogate_per_token(logp, b["old_logp"], b["adv"], 0.2, 0.2, token_mask=keep)
    for i in range(b["mask"].shape[0]):
        ours = losses.aggregate(per_token[i : i + 1], b["mask"][i : i + 1])
        (our_grad,) = torch.autograd.grad(ours, logp, retain_graph=True)
        row = b["logp"][i : i + 1].clone().requires_grad_(True)
        theirs = trl_loss(
            row,
            b["old_logp"][i : i + 1],
            b["mask"][i : i + 1],
            b["adv"][i : i + 1],
            entropies=b["entropy"][i : i + 1],
            loss_type="dapo",
            top_entropy_quantile=0.4,
        )
        (their_grad,) = torch.autograd.grad(theirs, row)
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(our_grad[i : i + 1], their_grad, rtol=1e-10, atol=1e-12)


def test_top_entropy_mask_by_hand():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.3, 7.0], [2.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    # row 0: 4 tokens, the 0.5 quantile of [0.1, 0.3, 0.5, 0.9] is 0.4: keeps 0.9 and 0.5 (7.0 is padding)
    # row 1: 2 tokens, the 0.5 quantile of [1.0, 2.0] is 1.5: keeps 2.0
    want = torch.tensor([[False, True, True, False, False], [True, False, False, False, False]])
    assert torch.equal(losses.top_entropy_mask(entropy, mask, 0.5), want)
    assert torch.equal(losses.top_entropy_mask(entropy, mask, 1.0), mask.bool())
    # quantile 0: each row's highest-entropy token only
    top = torch.tensor([[False, True, False, False, False], [True, False, False, False, False]])
    assert torch.equal(losses.top_entropy_mask(entropy, mask, 0.0), top)
    # a row without tokens keeps none
    assert not losses.top_entropy_mask(entropy, torch.zeros_like(mask), 0.2).any()


def test_gspo_token_has_the_sequence_ratios_value_and_each_tokens_own_gradient():
    """GSPO-token (arXiv 2507.18071, eq. 13): s_t = sg[s] pi_t / sg[pi_t]; its value is the sequence
    ratio's, and d s_t / d logp_t' = s 1[t = t'] (with no clipping active)."""
    b = _tensors()
    logp = b["logp"].clone().requires_grad_(True)
    seq = losses.importance_log_weights(logp, b["old_logp"], b["mask"], "sequence")
    tok = losses.importance_log_weights(logp, b["old_logp"], b["mask"], "sequence_token")
    torch.testing.assert_close(seq.detach(), tok.detach())
    m = b["mask"].double()
    want = ((b["logp"] - b["old_logp"]) * m).sum(-1) / m.sum(-1)
    torch.testing.assert_close(seq.detach()[:, 0], want)
    # per-token loss -s_t A unclipped (huge eps): gradient -A s at each token of the row, by hand
    per_token, _ = losses.surrogate_per_token(
        logp, b["old_logp"], b["adv"], 10.0, 10.0, mask=b["mask"], importance_sampling_level="sequence_token"
    )
    (grad,) = torch.autograd.grad((per_token * m).sum(), logp)
    s = want.exp()
    torch.testing.assert_close(grad, -(b["adv"] * s).unsqueeze(-1) * m)
    # the sequence level spreads it: d(-s A)/d logp_t = -A s / |y| at each token
    per_token, _ = losses.surrogate_per_token(
        logp, b["old_logp"], b["adv"], 10.0, 10.0, mask=b["mask"], importance_sampling_level="sequence"
    )
    (grad,) = torch.autograd.grad((per_token * m).sum(), logp)
    torch.testing.assert_close(grad, -(b["adv"] * s * m.sum(-1)).unsqueeze(-1) * m / m.sum(-1, keepdim=True))


def test_sequence_levels_need_the_mask_and_unknown_choices_are_named():
    b = _tensors()
    with pytest.raises(ValueError, match="importance_sampling_level='sequence' needs the token mask"):
        losses.surrogate_per_token(b["logp"], b["old_logp"], b["adv"], importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="policy_loss='ppo'"):
        losses.surrogate_per_token(b["logp"], b["old_logp"], b["adv"], policy_loss="ppo")
    with pytest.raises(ValueError, match="top_entropy_quantile=1.5"):
        losses.top_entropy_mask(b["entropy"], b["mask"], 1.5)


def test_seq_mean_token_sum_norm_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # rows holding tokens: 2; token sums 6 and 4; constant 8: (6 + 4) / (2 x 8)
    assert losses.aggregate(v, m, "seq-mean-token-sum-norm", norm=8).item() == pytest.approx(10 / 16)
    assert losses.aggregate(v, m, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 6)  # norm None: T = 3


# ----------------------------------------------------------------------------- through the module
def _rollout(module) -> tuple[Rollout, torch.Tensor]:
    """Two prompts x G completions of unequal length, old log-probs near the model's own (ratios both inside
    and outside the clip range) and rewards with spread in each group."""
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, 16, (2, 4), generator=g).repeat_interleave(G, 0)
    completion_ids = torch.randint(3, 16, (4, 6), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    for row, length in enumerate([6, 2, 4, 5]):
        completion_mask[row, length:] = 0
    r = Rollout(
        prompt_ids,
        torch.ones_like(prompt_ids),
        completion_ids,
        completion_mask,
        torch.zeros(4, 6, dtype=torch.float64),
        torch.zeros(4, 6, dtype=torch.float64),
        [""] * 4,
    )
    with torch.no_grad():
        logp, _ = _logp_entropy(module, r)
    r.old_logp = (logp + 0.15 * torch.randn(logp.shape, generator=g, dtype=torch.float64)) * completion_mask
    return r, torch.tensor([1.0, 0.0, 0.2, 0.9], dtype=torch.float64)


def _logp_entropy(module, r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    P = r.prompt_ids.shape[1]
    mask = r.attention_mask
    logits = module.model(input_ids=r.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, P - 1 : -1] / module.hparams.temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


# ours (module settings) -> TRL's GRPOConfig fields; "per_row": TRL called one completion at a time (its
# entropy quantile is over the batch it is given; ours per completion), the loss the mean over rows
MODULE_CASES = {
    "gspo": ({"importance_sampling_level": "sequence"}, {"loss_type": "dapo", "importance_sampling_level": "sequence"}),
    "cispo": (
        {"policy_loss": "cispo", "epsilon_high": 1.1},
        {"loss_type": "cispo", "epsilon_high": 1.1},
    ),
    "sapo": ({"policy_loss": "sapo", "loss_aggregation": "seq-mean-token-mean"}, {"loss_type": "sapo"}),
    "dr_grpo": (
        {"loss_aggregation": "seq-mean-token-sum-norm", "max_new_tokens": 6},
        {"loss_type": "dr_grpo", "max_completion_length": 6},
    ),
    "dr_grpo-scale": (
        {"loss_aggregation": "seq-mean-token-sum-norm", "loss_scale_factor": 10.0},
        {"loss_type": "dr_grpo", "max_completion_length": 10},
    ),
    "delta": ({"delta": 1.1, "epsilon_high": 0.05}, {"loss_type": "dapo", "delta": 1.1, "epsilon_high": 0.05}),
    "entropy_bonus": ({"entropy_coef": 0.3}, {"loss_type": "dapo", "entropy_coef": 0.3}),
    "top_entropy": (
        {"top_entropy_quantile": 0.5, "loss_aggregation": "seq-mean-token-mean"},
        {"loss_type": "grpo", "top_entropy_quantile": 0.5, "per_row": True},
    ),
}


class _Fixed(GRPOModule):
    def rollout_and_score(self, prompts):
        return self._fixed[0], self._fixed[1], {}


def _prompts() -> dict:
    return {"prompts": ["a", "b"], "answers": ["1", "2"]}


@pytest.mark.parametrize("case", sorted(MODULE_CASES))
def test_module_update_equals_trls_loss_on_the_same_model(ckpt, case):
    ours_kw, trl_kw = MODULE_CASES[case]
    trl_kw = dict(trl_kw)
    per_row = trl_kw.pop("per_row", False)
    results = []
    for micro in (1, 2, None):
        module = _Fixed(
            model_name_or_path=ckpt,
            model_dtype="float64",
            num_generations=G,
            micro_batch_size=micro,
            temperature=0.9,
            **{"max_new_tokens": 6, **ours_kw},
        )
        module._fixed = _rollout(module)
        loss, metrics = module.accumulate_update({"prompts": _prompts()})
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        results.append((float(loss), grads, metrics))
    module.policy.zero_grad()
    r, rewards = module._fixed
    adv, _ = losses.group_advantages(rewards, G, "std")
    logp, entropy = _logp_entropy(module, r)
    eps_high = trl_kw.pop("epsilon_high", 0.2)
    if per_row:
        rows = range(r.completion_mask.shape[0])
        parts = [
            trl_loss(
                logp[i : i + 1],
                r.old_logp[i : i + 1],
                r.completion_mask[i : i + 1],
                adv[i : i + 1],
                entropies=entropy[i : i + 1],
                epsilon=0.2,
                epsilon_high=eps_high,
                **trl_kw,
            )
            for i in rows
        ]
        theirs = torch.stack(parts).mean()
    else:
        theirs = trl_loss(
            logp, r.old_logp, r.completion_mask, adv, entropies=entropy, epsilon=0.2, epsilon_high=eps_high, **trl_kw
        )
    theirs.backward()
    want = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    assert want and any(g.abs().sum() > 0 for g in want.values())
    for loss, grads, metrics in results:
        assert math.isfinite(loss)
        if case != "entropy_bonus":  # TRL's loss there includes the bonus; ours too (rl_loss), checked below
            assert loss == pytest.approx(float(theirs), rel=1e-6, abs=1e-12)
        assert grads.keys() == want.keys()
        for name, g in want.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-10, msg=f"{case}: {name}")
    if case == "entropy_bonus":
        assert results[0][0] == pytest.approx(float(theirs), rel=1e-6)
    if case == "top_entropy":
        share = float(results[0][2]["top_entropy_token_share"])
        assert 0.4 < share < 0.8, share


def test_settings_are_checked_at_construction_naming_the_flag(ckpt):
    with pytest.raises(ValueError, match=r"model.delta=1.1 must exceed 1 \+ model.epsilon_high=1.2"):
        GRPOModule(model_name_or_path=ckpt, delta=1.1)
    with pytest.raises(ValueError, match="model.policy_loss=cispo caps the importance weight"):
        GRPOModule(model_name_or_path=ckpt, policy_loss="cispo")
    with pytest.raises(ValueError, match=r"model.importance_sampling_level='seq': choose one of"):
        GRPOModule(model_name_or_path=ckpt, importance_sampling_level="seq")
    with pytest.raises(ValueError, match=r"model.top_entropy_quantile=0 is out of range|model.top_entropy_quantile=-"):
        GRPOModule(model_name_or_path=ckpt, top_entropy_quantile=-0.1)
    with pytest.raises(ValueError, match="model.loss_scale_factor=0"):
        GRPOModule(model_name_or_path=ckpt, loss_aggregation="seq-mean-token-sum-norm", loss_scale_factor=0)


@pytest.mark.parametrize(
    "settings, flag",
    [
        (
            {"policy_loss": "cispo", "epsilon_high": 5.0, "delta": 4.0},
            r"model.delta=4.0 is read by policy_loss=clip only",
        ),
        ({"policy_loss": "sapo", "delta": 1.5}, r"model.delta=1.5 is read by policy_loss=clip only"),
        ({"sapo_temperature_neg": 2.0}, r"model.sapo_temperature_neg=2.0 is read by policy_loss=sapo only"),
        ({"loss_scale_factor": 512.0}, r"model.loss_scale_factor=512.0 is read by loss_aggregation="),
    ],
)
def test_a_setting_the_chosen_objective_does_not_read_is_refused(ckpt, settings, flag):
    """delta with CISPO or SAPO, a SAPO temperature with another policy loss, loss_scale_factor with another
    aggregation: each was accepted and silently unused (and CISPO's delta was checked against its cap, asking for
    delta > 6 that then did nothing); now construction stops naming the flag and the setting that would read it."""
    with pytest.raises(ValueError, match=flag):
        GRPOModule(model_name_or_path=ckpt, **settings)


def test_settings_each_objective_reads_are_accepted(ckpt):
    GRPOModule(model_name_or_path=ckpt, delta=1.5)
    GRPOModule(model_name_or_path=ckpt, policy_loss="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)
    GRPOModule(model_name_or_path=ckpt, loss_aggregation="seq-mean-token-sum-norm", loss_scale_factor=512.0)
