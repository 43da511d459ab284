"""CHORDModule: L = (1 - mu) * L_GRPO + mu * L_SFT with a scheduled mu and token weights phi.

Per training step (arXiv 2508.11408, Trinity-RFT's "mix_chord" loss):
  1. sample G completions for each prompt row and score them (rollout tokens: "usual"),
  2. mu <- schedule(step [, mean reward])
  3. L_GRPO over usual tokens only; L_SFT over expert tokens only, each token weighted by
     phi_t = sg(p_t (1 - p_t)) (CHORD-phi) or another strategy; each term is normalised over
     its own tokens, so mu stays a convex weight whatever the expert share of the batch,
  4. one policy update on L.
"""

from __future__ import annotations

from typing import Literal

import torch

from lit_align.modules.policy import PolicyModule
from lit_align.weighting import AdaptiveMu, MuSchedule, ReferenceMu, token_weights


class CHORDModule(PolicyModule):
    """CHORD: a global SFT weight mu from a schedule plus per-token weights on the SFT term.

    Args:
        mu_schedule: a ``lit_align.weighting`` schedule (class path in YAML): ReferenceMu
            (warm-up then cosine decay; CHORD-mu), ConstantMu (CHORD-phi uses 0.1), LinearMu,
            CosineMu, ExponentialMu, or AdaptiveMu (mu = max(0, tau - mean reward)).
            Default: ReferenceMu(0.9 -> 0.05 over 200 steps).
        token_weighting: weight of each expert token in the SFT term: ``phi`` = p(1-p)
            (CHORD-phi), ``sft_is`` = p, ``none`` (plain SFT; CHORD-mu), or ``adaptive``,
            ``entropy``, ``margin``. Always detached and within [0, 1].
        sft_warmup_steps: plain SFT (mu = 1, no token weights, no rollouts) for this many policy
            updates before the schedule starts; the schedule's step counts from the warm-up's end.
            The paper starts CHORD from an instruct model that already answers in format; from a
            freshly initialised model (the embedded task) the warm-up plays that part. Default 0.
        **kwargs: the shared PolicyModule arguments (model, optimizer, G, clipping, reward, ...).
    """

    def __init__(
        self,
        *args,
        mu_schedule: MuSchedule | None = None,
        token_weighting: Literal["none", "phi", "sft_is", "adaptive", "entropy", "margin"] = "phi",
        sft_warmup_steps: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        allowed = ("none", "phi", "sft_is", "adaptive", "entropy", "margin")
        if token_weighting not in allowed:
            raise ValueError(f"model.token_weighting={token_weighting!r}: choose one of {list(allowed)}")
        if self.hparams.num_generations < 2:
            raise ValueError(
                f"model.num_generations={self.hparams.num_generations}: CHORD's GRPO term needs at least 2 samples per prompt"
            )
        if isinstance(sft_warmup_steps, bool) or not isinstance(sft_warmup_steps, int) or sft_warmup_steps < 0:
            raise ValueError(f"model.sft_warmup_steps={sft_warmup_steps!r} must be an integer >= 0")
        self.sft_warmup_steps = sft_warmup_steps
        self.hparams["sft_warmup_steps"] = sft_warmup_steps
        self.mu_schedule = mu_schedule if mu_schedule is not None else ReferenceMu()
        self.token_weighting = token_weighting
        self.hparams["token_weighting"] = token_weighting
        self.hparams["mu_schedule"] = repr(self.mu_schedule)

    def _warming_up(self) -> bool:
        return self.global_step < self.sft_warmup_steps

    @property
    def mu_needs_reward(self) -> bool:
        adaptive = isinstance(self.mu_schedule, AdaptiveMu) or self.token_weighting == "adaptive"
        return adaptive and not self._warming_up()

    def mixing_weight(self, step: int, mean_reward: float | None = None) -> float:
        if step < self.sft_warmup_steps:
            return 1.0
        return float(self.mu_schedule(step - self.sft_warmup_steps, mean_reward))

    def token_weights(self, logp: torch.Tensor, logits: torch.Tensor, reward_mean: float | None) -> torch.Tensor | None:
        if self.token_weighting == "none" or self._warming_up():
            return None
        return token_weights(self.token_weighting, logp, logits, reward_mean)
