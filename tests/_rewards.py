"""Reward functions for tests only (importable by class path because tests/ is on sys.path)."""

import torch

from lit_align.rewards import RewardFunction


class LengthMatchReward(RewardFunction):
    """1 when the completion has as many characters as the reference answer: a signal that even
    a freshly initialised policy earns sometimes, so GRPO has non-zero advantages."""

    def __call__(self, prompts, completions, answers):
        return torch.tensor([float(len(c.strip()) == len(a)) for c, a in zip(completions, answers)])


class CharCodeReward(RewardFunction):
    """Sum of the completion's character codes / 1000: two samples score alike only if they hold the
    same characters, so nearly every prompt group has non-zero advantages, whatever the random stream."""

    def __call__(self, prompts, completions, answers):
        return torch.tensor([sum(map(ord, c)) / 1000 for c in completions])


class FlakyReward(RewardFunction):
    """Length match, except on rows whose reference answer is ``"raise"`` (the call raises) or
    ``"nan"`` (it scores NaN): a reward that fails on a fixed, known share of the items."""

    def __call__(self, prompts, completions, answers):
        if "raise" in answers:
            raise RuntimeError("reward service unavailable")
        return torch.tensor(
            [float("nan") if a == "nan" else float(len(c.strip()) == len(a)) for c, a in zip(completions, answers)]
        )


class ExplodingReward(RewardFunction):
    """Finite but absurd rewards (+-3e38, alternating) on the calls numbered in ``explode_on``
    (0-based; ``from_call`` explodes on every call from that one on), length match otherwise.
    Without advantage normalisation they overflow the loss or its gradient."""

    def __init__(self, explode_on: list[int] | None = None, from_call: int | None = None):
        self.explode_on = set(explode_on or [])
        self.from_call = from_call
        self.calls = 0

    def __call__(self, prompts, completions, answers):
        call, self.calls = self.calls, self.calls + 1
        if call in self.explode_on or (self.from_call is not None and call >= self.from_call):
            return torch.tensor([3e38 if i % 2 else -3e38 for i in range(len(completions))])
        return torch.tensor([float(len(c.strip()) == len(a)) for c, a in zip(completions, answers)])


class CountingReward(RewardFunction):
    """1 for the exact answer, 0.5 for one of the right length, else 0; keeps every call's rewards
    (it does not override ``correct``, so accuracy follows the default verdict, reward >= 1)."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, prompts, completions, answers):
        r = torch.tensor(
            [1.0 if c.strip() == a else 0.5 * (len(c.strip()) == len(a)) for c, a in zip(completions, answers)]
        )
        self.calls.append(r)
        return r


def char_count_reward(completions, **kwargs):
    """A TRL-style reward function (completions and the data set's columns as keyword arguments)."""
    return [len(c) / 10 for c in completions]


SEEN_STATES: list[tuple[int, int, float]] = []
"""(global_step, max_steps, epoch) of every trainer_state that curriculum_reward was called with."""


def curriculum_reward(completions, trainer_state, log_metric, log_extra, **kwargs):
    """A TRL-style reward that reads the run's position (TRL issue 3668: a curriculum by step) and logs a scalar and
    a column of the samples table through the log_metric and log_extra that TRL passes."""
    SEEN_STATES.append((trainer_state.global_step, trainer_state.max_steps, trainer_state.epoch))
    log_metric("curriculum_step", float(trainer_state.global_step))
    log_extra("characters", [len(c) for c in completions])
    return [len(c) / 10 for c in completions]


async def async_char_count_reward(completions, **kwargs):
    """An ``async def`` reward function (TRL issue 4130), e.g. one that awaits a judge over HTTP."""
    import asyncio

    await asyncio.sleep(0.01)
    return [len(c) / 10 for c in completions]


class ParityReward(RewardFunction):
    """Correct (reward >= 1) when the completion text has an even number of characters, which about half of a
    fresh policy's samples have; plus sum of character codes / 1e6, so that a group's samples rarely tie and
    GRPO has advantages whatever the random stream. Keeps every call's (prompts, completions)."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[str]]] = []

    def __call__(self, prompts, completions, answers):
        self.calls.append((list(prompts), list(completions)))
        return torch.tensor([float(len(c) % 2 == 0) + sum(map(ord, c)) / 1e6 for c in completions])


class AnswerParityReward(RewardFunction):
    """``even`` for every completion of a prompt whose reference answer is an even number (its group's
    rewards all equal: no signal), the completion's character codes / 1000 for an odd one (spread over
    nearly every group): which groups dynamic sampling must drop is known from the prompts."""

    def __init__(self, even: float = 1.0):
        self.even = float(even)

    def __call__(self, prompts, completions, answers):
        return torch.tensor(
            [self.even if int(a) % 2 == 0 else sum(map(ord, c)) / 1000 for c, a in zip(completions, answers)]
        )


def contains_four_reward(completions, **kwargs):
    """A TRL reward function for conversational data, as TRL's docs write them: each completion is
    ``[{"role": "assistant", "content": text}]``."""
    return [float("4" in c[0]["content"]) for c in completions]


SEEN_CALLS: list[tuple[list, list]] = []
"""(prompts, completions) of every call of last_turn_reward."""


def last_turn_reward(prompts, completions, **kwargs):
    """A TRL reward function that reads each prompt's last message (the question) and the completion's
    assistant message; keeps what it was called with."""
    SEEN_CALLS.append((prompts, completions))
    return [float(prompts[i][-1]["content"][:1] in completions[i][0]["content"]) for i in range(len(prompts))]


def any_text_reward(prompts, completions, **kwargs):
    """A TRL reward function that takes whatever it is given (texts or messages) and keeps it."""
    SEEN_CALLS.append((prompts, completions))
    return [0.5 for _ in completions]
