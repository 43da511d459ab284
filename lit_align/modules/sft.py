"""SFTModule: imitation only, L = L_SFT (no rollouts are sampled)."""

from __future__ import annotations

from lit_align.core.terms import Loss
from lit_align.core.update import Update
from lit_align.modules.policy import PolicyModule


class SFTModule(PolicyModule):
    """Supervised fine-tuning on the expert demonstrations: L = L_SFT.

    Takes the shared PolicyModule arguments; the RL ones are unused. Validation still decodes
    greedy answers, so val/accuracy is comparable with every other method.
    """

    HEADLINE_METRICS = ("train/expert_nll",)

    def mixing_weight(self, step: int, mean_reward: float | None = None) -> float:
        return 1.0

    def loss(self, u: Update) -> Loss:
        u.metrics["mu"] = 1.0
        return u.sft()
