"""CHORDModule: L = (1 - mu) * L_GRPO + mu * L_SFT with a scheduled mu and token weights phi.

Per policy update (arXiv 2508.11408; Trinity-RFT's "mix_chord" loss):
  1. mu <- schedule(step [, mean reward of this update's rollouts])
  2. L_GRPO over the G samples of each prompt ("usual" tokens); L_SFT over the demonstrations' tokens,
     each weighted by phi_t = sg(p_t (1 - p_t)) (CHORD-phi) or another strategy. Each term is normalised
     over its own tokens, so mu stays a convex weight whatever the expert share of the batch;
  3. one policy update on L (see :meth:`CHORDModule.loss`).
"""

from __future__ import annotations

import torch

from lit_align.core import settings as S
from lit_align.core.terms import Loss
from lit_align.core.update import Update
from lit_align.modules.policy import PolicyModule
from lit_align.weighting import AdaptiveMu, MuSchedule, ReferenceMu, TokenWeighting, token_weights


class CHORDModule(PolicyModule):
    """CHORD: a global SFT weight mu from a schedule plus per-token weights on the SFT term.

    Args:
        mu_schedule: a ``lit_align.weighting`` schedule (class path in YAML): ReferenceMu
            (warm-up then cosine decay; CHORD-mu), ConstantMu (CHORD-phi uses 0.1), LinearMu,
            CosineMu, ExponentialMu, or AdaptiveMu (mu = max(0, tau - mean reward)).
            Default: ReferenceMu(0.9 -> 0.05 over 200 steps).
        token_weighting: weight of each expert token in the SFT term: ``phi`` = p(1-p)
            (CHORD-phi), ``sft_is`` = p, ``none`` (plain SFT; CHORD-mu), or ``adaptive``,
            ``entropy``, ``margin`` (:func:`lit_align.weighting.token_weights`). Always detached and
            within [0, 1].
        sft_warmup_steps: plain SFT (mu = 1, no token weights, no rollouts) for this many policy
            updates before the schedule starts; the schedule's step counts from the warm-up's end.
            The paper starts CHORD from an instruct model that already answers in format; from a
            freshly initialised model (the embedded task) the warm-up plays that part. Default 0.
        **kwargs: the shared PolicyModule arguments (model, optimizer, G, clipping, reward, ...).
    """

    NOT_HPARAMS = (*PolicyModule.NOT_HPARAMS, "mu_schedule")  # logged as its repr
    HEADLINE_METRICS = ("train/mu", "train/reward_mean", "train/token_weight_mean")

    def __init__(
        self,
        *args,
        mu_schedule: MuSchedule | None = None,
        token_weighting: TokenWeighting = "phi",
        sft_warmup_steps: int = 0,
        **kwargs,
    ):
        S.check(CHORDModule.__init__, locals(), {"sft_warmup_steps": S.integer(0)})
        super().__init__(*args, **kwargs)
        if self.hparams.num_generations < 2:
            raise ValueError(
                f"model.num_generations={self.hparams.num_generations}: CHORD's GRPO term needs at least 2 samples "
                "per prompt"
            )
        self.sft_warmup_steps = sft_warmup_steps
        self.mu_schedule = mu_schedule if mu_schedule is not None else ReferenceMu()
        self.token_weighting = token_weighting
        self.hparams.update(
            sft_warmup_steps=sft_warmup_steps, token_weighting=token_weighting, mu_schedule=repr(self.mu_schedule)
        )

    def loss(self, u: Update) -> Loss:
        """L = (1 - mu) * L_GRPO + mu * L_SFT(token weights), mu from the schedule."""
        mu = self.mixing_weight(u.step, u.reward_mean if self.mu_needs_reward(u.step) else None)
        u.metrics["mu"] = mu

        def weights(logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
            if self.token_weighting == "none" or u.step < self.sft_warmup_steps:
                return None
            return token_weights(self.token_weighting, logp, logits, u.reward_mean if u.sampled else None)

        return (1.0 - mu) * u.grpo() + mu * u.sft(weights)

    def mu_needs_reward(self, step: int) -> bool:
        """True when mu depends on this step's rewards (then rollouts are always sampled)."""
        adaptive = isinstance(self.mu_schedule, AdaptiveMu) or self.token_weighting == "adaptive"
        return adaptive and step >= self.sft_warmup_steps

    def mixing_weight(self, step: int, mean_reward: float | None = None) -> float:
        """mu at policy update ``step``: 1 during the SFT warm-up, then the schedule's value."""
        if step < self.sft_warmup_steps:
            return 1.0
        return float(self.mu_schedule(step - self.sft_warmup_steps, mean_reward))
