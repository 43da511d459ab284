"""The loss terms a method states, and their weighted sums.

A method returns a :class:`Loss`, e.g. CHORD's ``(1 - mu) * u.grpo() + mu * u.sft(phi)``: a weighted sum
of lazily built terms. A term of weight 0 is never built (its rows are never forwarded, a rollout batch
only it reads is never sampled). :meth:`Loss.terms` builds the rest, in the order written, as
:class:`~lit_align.core.engine.Term` objects the step engine runs with exact global normalisation.

The per-token objectives are pure functions of :mod:`lit_align.losses`; the builders here only say
which rows a term forwards (through :meth:`lit_align.core.policy.Policy.logprobs`) and which objective
each row's tokens get.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lit_align import losses
from lit_align.core.engine import Term, TermOutput
from lit_align.core.policy import Completions, Labelled, Policy
from lit_align.rollout import Rollout


@dataclass
class RLSettings:
    """The RL term's settings (TRL's names; see :class:`lit_align.modules.policy.PolicyModule`)."""

    temperature: float = 1.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    kl_estimator: str = "k3"
    off_policy_gamma: float = 0.1  # LUFFY's shaping f(r) = r / (r + gamma) on off-policy tokens
    policy_loss: str = "clip"  # clip | cispo | sapo (lit_align.losses.surrogate_per_token)
    importance_sampling_level: str = "token"  # token | sequence (GSPO) | sequence_token (GSPO-token)
    delta: float | None = None  # two-sided clipping: rho capped at delta for A < 0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    top_entropy_quantile: float = 1.0  # the highest-entropy share of each completion's tokens keeps the loss
    entropy_coef: float = 0.0  # entropy bonus: - entropy_coef * token-mean entropy of the rollout tokens

    def objective(self) -> dict:
        """The keyword settings of :func:`lit_align.losses.surrogate_per_token`."""
        names = ("policy_loss", "importance_sampling_level", "delta", "sapo_temperature_pos", "sapo_temperature_neg")
        return {n: getattr(self, n) for n in names}

    @classmethod
    def from_hparams(cls, hp) -> RLSettings:
        return cls(**{name: hp[name] for name in cls.__dataclass_fields__ if name in hp})


class Lazy:
    """A term not built yet: ``build(weight)`` -> :class:`Term`, called only for a non-zero weight (None:
    the batch has no rows for it, e.g. no prompt rows for an RL term)."""

    def __init__(self, build: Callable[[float], Term]):
        self.build = build

    def __mul__(self, weight: float) -> Loss:
        return Loss([(float(weight), self)])

    __rmul__ = __mul__

    def __add__(self, other) -> Loss:
        return Loss([(1.0, self)]) + other

    def terms(self) -> list[Term]:
        """This term alone, with weight 1 (a loss of one term)."""
        return Loss([(1.0, self)]).terms()


class Loss:
    """A weighted sum of terms, sum_k w_k L_k, in the order written."""

    def __init__(self, parts: list[tuple[float, Lazy]] | None = None):
        self.parts = list(parts or [])

    def __add__(self, other) -> Loss:
        other = other if isinstance(other, Loss) else Loss([(1.0, other)])
        return Loss(self.parts + other.parts)

    __radd__ = __add__

    def __mul__(self, weight: float) -> Loss:
        return Loss([(w * float(weight), t) for w, t in self.parts])

    __rmul__ = __mul__

    def terms(self) -> list[Term]:
        """The terms of non-zero weight, built now, in order (those without rows left out)."""
        built = [t.build(w) for w, t in self.parts if w != 0.0]
        return [t for t in built if t is not None]


# ---------------------------------------------------------------------------------------------- RL
def rl_term(
    policy: Policy,
    rollout: Rollout,
    advantages: torch.Tensor,
    settings: RLSettings,
    weight: float = 1.0,
    mask: torch.Tensor | None = None,
    name: str = "rl",
    extra: Callable | None = None,
    is_weights: Callable[[torch.Tensor, int], torch.Tensor | None] | None = None,
    off_tokens: torch.Tensor | None = None,
    off_advantages: torch.Tensor | None = None,
) -> Term:
    """The policy-gradient term over ``rollout``'s tokens, as a :class:`Term` weighted ``weight``: on-policy
    tokens the clipped GRPO surrogate -min(rho A, clip(rho) A) [+ beta KL]
    (:func:`lit_align.losses.surrogate_per_token`); off-policy tokens (``off_tokens`` (N, T) bool, default:
    every token of the rows the policy did not sample, ``rollout.off_policy``) LUFFY's shaped objective
    -A f(r), r = p / pi_behaviour with pi_behaviour = exp(old_logp) (1 for a demonstration),
    f(r) = r / (r + gamma), no clip (:func:`lit_align.losses.shaped_off_policy_per_token`). Both kinds are
    normalised together (one term), as LUFFY does.

    Shapes: ``advantages`` (N,); ``mask`` (N, T) the tokens that count (default: the completion mask).
    ``extra(logits, mask)``: a scalar added to each micro-batch's loss from its completion logits (AMFT's
    entropy term). ``is_weights(rows, width)``: per-token importance weights (b, width) or None (TRL's
    vLLM correction). ``off_advantages`` (N, T): the advantage of each off-policy token, in place of its
    row's ``advantages`` (None: the row's), e.g. a different advantage for the given prefix of a row than
    for its sampled continuation, or 0 for given tokens that keep no gradient while still counting in the
    term's normaliser (Prefix-RFT). Logged per token: clip_ratio, kl (beta > 0), entropy_usual; with off-policy tokens
    also off_policy_token_share and off_policy_weight_mean (mean f over off-policy tokens), and clip_ratio /
    entropy_usual over the on-policy tokens only.
    """
    s = settings
    mask = rollout.completion_mask if mask is None else mask
    rows_of = Completions.of(rollout)
    if off_tokens is None and rollout.off_policy is not None and bool(rollout.off_policy.any()):
        off_tokens = rollout.off_policy.unsqueeze(-1).expand_as(rollout.completion_mask)

    def forward(rows: torch.Tensor) -> TermOutput:
        # the backward writes the logits' gradient over them, unless another graph (extra's, the entropy
        # bonus's) reads them too
        bonus = s.entropy_coef != 0.0
        scored = policy.logprobs(rows_of, rows, s.temperature, consume=extra is None and not bonus)
        width = scored.targets.shape[1]
        m = mask[rows][:, :width]
        off = off_tokens[rows][:, :width].to(torch.bool) if off_tokens is not None else None
        on = m.to(torch.bool) if off is None else m.to(torch.bool) & ~off  # the sampled tokens that count
        ref_logp = policy.logprobs(rows_of, rows, s.temperature, reference=True).logp if s.beta > 0 else None
        w = is_weights(rows, width) if is_weights is not None else None
        # the entropy at the sampling temperature, once: with its graph when the bonus trains on it
        entropy_graph = losses.entropy_from_logits(scored.logits, s.temperature) if bonus else None
        entropy = entropy_graph.detach() if bonus else losses.entropy_from_logits(scored.logits.detach(), s.temperature)
        keep = losses.top_entropy_mask(entropy, on, s.top_entropy_quantile) if s.top_entropy_quantile < 1 else None
        values, metrics = losses.surrogate_per_token(
            scored.logp,
            rollout.old_logp[rows, :width],
            advantages[rows],
            s.epsilon_low,
            s.epsilon_high,
            ref_logp,
            s.beta,
            s.kl_estimator,
            w,
            mask=on,
            token_mask=keep,
            **s.objective(),
        )
        if w is not None:
            metrics["importance_sampling_ratio"] = w
        metrics["entropy_usual"] = entropy
        if keep is not None:
            metrics["top_entropy_token_share"] = keep.to(entropy.dtype)
        if off is not None:
            adv = advantages[rows] if off_advantages is None else torch.ones_like(advantages[rows])
            shaped, more_metrics = losses.shaped_off_policy_per_token(
                scored.logp, adv, s.off_policy_gamma, rollout.old_logp[rows, :width]
            )
            if off_advantages is not None:  # -f(r) per token, times each token's own advantage
                shaped = shaped * off_advantages[rows][:, :width].to(shaped.dtype)
            values = torch.where(off, shaped, values)
            metrics = {k: (v, on) for k, v in metrics.items()}  # on-policy metrics over on-policy tokens
            metrics["off_policy_token_share"] = off.to(scored.logp.dtype)
            metrics["off_policy_weight_mean"] = (more_metrics["off_policy_weight"], off)
        token_mean = None
        if bonus:  # TRL's entropy bonus: - coef x the token-mean entropy, here over the term's tokens, sampled ones
            token_mean = -s.entropy_coef * entropy_graph * on
        more = None if extra is None else extra(scored.logits, m)
        return TermOutput(values, m, metrics, more, token_mean)

    return Term(name, weight, mask, forward)


def pg_term(
    policy: Policy, rollout: Rollout, advantages: torch.Tensor, temperature: float = 1.0, name: str = "val"
) -> Term:
    """Minus the advantage-weighted log-likelihood of ``rollout``'s completions, -A log p per token (the
    policy-gradient surrogate of expected reward; AMFT's held-out reward objective)."""
    rows_of = Completions.of(rollout)

    def forward(rows: torch.Tensor) -> TermOutput:
        scored = policy.logprobs(rows_of, rows, temperature, consume=True)
        return TermOutput(-advantages[rows].unsqueeze(-1).to(scored.logp.dtype) * scored.logp, scored.mask)

    return Term(name, 1.0, rollout.completion_mask, forward)


# ---------------------------------------------------------------------------------------------- SFT
TokenWeights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]


def sft_term(
    policy: Policy,
    expert: dict,
    weight: float = 1.0,
    token_weights: TokenWeights | None = None,
    temperature: float = 1.0,
    name: str = "sft",
    on_weights: Callable[[torch.Tensor], None] | None = None,
) -> Term:
    """The (weighted) NLL of the demonstrations over their response tokens, per token w_t * (-log p_t)
    (:func:`lit_align.losses.weighted_nll_per_token`), as a :class:`Term` weighted ``weight``.

    ``token_weights(logp, logits)`` -> detached (b, T) weights w (CHORD's phi, ...) or None (plain NLL);
    ``on_weights(w)`` receives the weights of the counted tokens as they are computed (a histogram's
    source). Logged per token: expert_nll (unweighted), entropy_expert (at ``temperature``, like
    entropy_usual) and token_weight_mean where weighted.
    """
    rows_of = Labelled.of(expert)

    def forward(rows: torch.Tensor) -> TermOutput:
        # the backward writes the logits' gradient over them (consume): metrics read them in the forward only
        scored = policy.logprobs(rows_of, rows, consume=True)
        logp, logits = scored.logp, scored.logits
        weights = token_weights(logp.detach(), logits.detach()) if token_weights is not None else None
        metrics = {
            "expert_nll": -logp.detach(),
            "entropy_expert": losses.entropy_from_logits(logits.detach(), temperature),
        }
        if weights is not None:
            metrics["token_weight_mean"] = weights
            if on_weights is not None:
                on_weights(weights[scored.mask].detach())
        return TermOutput(losses.weighted_nll_per_token(logp, weights), scored.mask, metrics)

    return Term(name, weight, rows_of.target_mask, forward)
