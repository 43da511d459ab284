"""GRPOModule (exploration only, L = L_GRPO) and SFTThenGRPOModule (the two-stage baseline)."""

from __future__ import annotations

from lit_align.core import settings as S
from lit_align.core.terms import Loss
from lit_align.core.update import Update
from lit_align.modules.policy import PolicyModule


class GRPOModule(PolicyModule):
    """Group-relative policy optimisation: L = L_GRPO on G sampled completions per prompt.

    Takes the shared PolicyModule arguments; ``num_generations`` (G) must be at least 2, since
    advantages compare the samples of one prompt with each other.
    """

    HEADLINE_METRICS = ("train/reward_mean", "train/kl")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.hparams.num_generations < 2:
            raise ValueError(
                f"model.num_generations={self.hparams.num_generations}: GRPO needs at least 2 samples per prompt"
            )

    def mixing_weight(self, step: int, mean_reward: float | None = None) -> float:
        return 0.0

    def loss(self, u: Update) -> Loss:
        mu = self.mixing_weight(u.step)
        u.metrics["mu"] = mu
        return (1.0 - mu) * u.grpo() + mu * u.sft()


class SFTThenGRPOModule(GRPOModule):
    """The classic recipe in one run: pure SFT for ``sft_steps`` policy updates, then pure GRPO.

    Args:
        sft_steps: number of imitation updates before switching to RL (same optimizer state).
    """

    HEADLINE_METRICS = ("train/mu", "train/reward_mean", "train/expert_nll")

    def __init__(self, *args, sft_steps: int = 1000, **kwargs):
        S.check(SFTThenGRPOModule.__init__, locals(), {"sft_steps": S.integer(0)})
        super().__init__(*args, **kwargs)
        self.sft_steps = sft_steps
        self.hparams["sft_steps"] = sft_steps

    def mixing_weight(self, step: int, mean_reward: float | None = None) -> float:
        return 1.0 if step < self.sft_steps else 0.0
