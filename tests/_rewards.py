"""Reward functions for tests only (importable by class path because tests/ is on sys.path)."""
import torch

from lit_align.rewards import RewardFunction


class LengthMatchReward(RewardFunction):
    """1 when the completion has as many characters as the reference answer: a signal that even
    a freshly initialised policy earns sometimes, so GRPO has non-zero advantages."""

    def __call__(self, prompts, completions, answers):
        return torch.tensor([float(len(c.strip()) == len(a)) for c, a in zip(completions, answers)])
