"""Reward functions for RL post-training.

A reward function scores a batch of ``(prompt, completion, reference answer)``
triples and returns a float32 tensor of shape ``(N,)``::

    reward = MathAnswerReward()
    reward(["What is 1/2?"], ["It is \\boxed{0.5}"], ["\\frac{1}{2}"])  # tensor([1.])

Reward functions are chosen by class path in LightningCLI YAML, e.g.::

    class_path: lit_align.rewards.MathAnswerReward
    init_args:
      timeout_s: 1.0

To write your own, subclass :class:`RewardFunction` (any batch scoring) or
:class:`BinaryReward` (implement ``is_correct`` for one item). The training loop
calls rewards through :func:`score_safely`, which turns exceptions, hangs,
wrong shapes and NaN/inf scores into a :class:`RewardError` or zero scores.

Security: completions are untrusted model output. Nothing here passes them to
``eval``/``exec``; :class:`MathAnswerReward` parses answers with Math-Verify's LaTeX
parser only, after refusing answers whose evaluation could explode (see
:mod:`lit_align.math_answers`), under a per-answer time limit.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from lit_align.math_answers import answers_equivalent, extract_boxed, extract_final_answer, reference_answer

__all__ = [
    "BinaryReward",
    "ExactAnswerReward",
    "MathAnswerReward",
    "RewardError",
    "RewardFunction",
    "answers_equivalent",
    "extract_boxed",
    "extract_final_answer",
    "score_safely",
]

T = TypeVar("T")

class RewardError(RuntimeError):
    """A reward function raised, hung, or returned invalid scores."""


def _check_lengths(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> None:
    if not len(prompts) == len(completions) == len(answers):
        raise ValueError(
            f"prompts, completions and answers must have equal lengths, "
            f"got {len(prompts)}, {len(completions)}, {len(answers)}"
        )


class RewardFunction:
    """Base class: ``fn(prompts, completions, answers)`` -> float32 tensor ``(N,)``.

    Subclasses implement ``__call__``. :meth:`correct` says which completions
    count as correct (for accuracy metrics); by default those scoring >= 1.
    """

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, prompts: list[str], completions: list[str], answers: list[str]) -> torch.Tensor:
        """Bool tensor ``(N,)``: which completions are correct (default: full reward, >= 1)."""
        return self.is_full_reward(self(prompts, completions, answers))

    @staticmethod
    def is_full_reward(rewards: torch.Tensor) -> torch.Tensor:
        """The default verdict from computed rewards; validation uses it to score once, not twice."""
        return rewards >= 1.0 - 1e-6


class BinaryReward(RewardFunction):
    """Scores ``correct_reward`` when :meth:`is_correct` holds, else ``wrong_reward``.

    Subclasses implement :meth:`is_correct` for a single item; :meth:`correct`
    uses it directly, so accuracy is right whatever the reward values are.
    """

    def __init__(self, correct_reward: float = 1.0, wrong_reward: float = 0.0) -> None:
        self.correct_reward = float(correct_reward)
        self.wrong_reward = float(wrong_reward)

    def is_correct(self, prompt: str, completion: str, answer: str) -> bool:
        """Whether one completion answers its prompt correctly."""
        raise NotImplementedError

    def judge(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[bool]:
        """``is_correct`` for every item."""
        _check_lengths(prompts, completions, answers)
        return [bool(self.is_correct(p, c, a)) for p, c, a in zip(prompts, completions, answers)]

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]) -> torch.Tensor:
        verdicts = self.judge(prompts, completions, answers)
        values = [self.correct_reward if ok else self.wrong_reward for ok in verdicts]
        return torch.tensor(values, dtype=torch.float32)

    def correct(self, prompts: list[str], completions: list[str], answers: list[str]) -> torch.Tensor:
        return torch.tensor(self.judge(prompts, completions, answers), dtype=torch.bool)


class ExactAnswerReward(BinaryReward):
    """Exact string match of the final answer against the reference.

    The final answer is the text after the last ``answer_prefix`` in the
    completion (the whole completion if ``answer_prefix`` is None or absent),
    whitespace-stripped. It is correct iff it equals the stripped reference.

    Examples: completion ``" 85\\n"`` vs answer ``"85"`` is correct; with
    ``answer_prefix="####"``, ``"40+32 #### 72"`` vs ``"72"`` is correct.

    Args:
        answer_prefix: marker preceding the final answer, e.g. ``"####"``.
        correct_reward: reward for a correct answer.
        wrong_reward: reward for any other answer.
    """

    def __init__(
        self, answer_prefix: str | None = None, correct_reward: float = 1.0, wrong_reward: float = 0.0
    ) -> None:
        super().__init__(correct_reward, wrong_reward)
        self.answer_prefix = answer_prefix or None

    def extract(self, completion: str) -> str:
        """The stripped final answer of ``completion``."""
        if self.answer_prefix is not None:
            _, found, tail = completion.rpartition(self.answer_prefix)
            if found:
                completion = tail
        return completion.strip()

    def is_correct(self, prompt: str, completion: str, answer: str) -> bool:
        return self.extract(completion) == answer.strip()


class MathAnswerReward(BinaryReward):
    """Math answer checking with Hugging Face's Math-Verify.

    The predicted answer is the content of the last complete ``\\boxed{...}`` in the completion,
    else the answer of its last explicit answer statement ("the answer is 72 because 3 < 4",
    "Final answer: (B)", "#### 1,234"), else its last number (see
    :func:`lit_align.math_answers.extract_final_answer`). The reference is the last ``\\boxed{}``
    of the answer column if it has one (MATH solutions), else the whole answer (GSM8K: set
    ``data.answer_pattern`` to take the number after ``####``). The two are compared by
    ``math_verify.verify``: ``\\$18.00`` = 18, ``1{,}000`` = ``1 000`` = 1000, ``5 \\text{ cm}`` = 5,
    ``28 percent`` = ``28\\%``, ``\\textbf{(B)}`` = B, ``\\frac{1}{2}`` = 0.5, intervals, sets.

    Model output is never evaluated (Math-Verify's LaTeX parser only, no ``parse_expr``), and
    answers whose sympy evaluation could explode (power towers, huge factorials, numbers over
    :data:`lit_align.math_answers.MAX_ANSWER_DIGITS` digits) score wrong without being parsed.
    Each item is checked in a worker thread and given ``timeout_s`` seconds, a limit that holds in
    any thread (Math-Verify's own signal-based limits are off); a timeout scores ``wrong_reward``
    and is counted in ``self.last_timeouts`` (reset on every call).

    Args:
        timeout_s: time limit per answer in seconds; ``<= 0`` checks inline with no limit.
        correct_reward: reward for a correct answer.
        wrong_reward: reward for a wrong, missing or timed-out answer.
        max_answer_chars: predicted answers (and references) longer than this are wrong.
    """

    def __init__(
        self,
        timeout_s: float = 1.0,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
        max_answer_chars: int = 200,
    ) -> None:
        super().__init__(correct_reward, wrong_reward)
        self.timeout_s = float(timeout_s)
        self.max_answer_chars = int(max_answer_chars)
        self.last_timeouts = 0

    def is_correct(self, prompt: str, completion: str, answer: str) -> bool:
        prediction = extract_final_answer(completion)
        if prediction is None or len(prediction) > self.max_answer_chars:
            return False
        return answers_equivalent(prediction, reference_answer(answer), self.max_answer_chars)

    def judge(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[bool]:
        self.last_timeouts = 0
        if self.timeout_s <= 0:
            return super().judge(prompts, completions, answers)
        _check_lengths(prompts, completions, answers)
        verdicts = []
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lit-align-reward")
        try:
            for item in zip(prompts, completions, answers):
                future = pool.submit(self.is_correct, *item)
                try:
                    verdicts.append(bool(future.result(timeout=self.timeout_s)))
                except cf.TimeoutError:
                    if not future.done():  # abandon the stuck worker, continue on a fresh one
                        self.last_timeouts += 1
                        verdicts.append(False)
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lit-align-reward")
                    else:
                        verdicts.append(bool(future.result()))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return verdicts


# ---------------------------------------------------------------- safe scoring


class _CallTimedOut(Exception):
    pass


def _run_with_timeout(func: Callable[[], T], timeout_s: float | None) -> T:
    """``func()``, in a worker thread when ``timeout_s`` is set (raises _CallTimedOut)."""
    if timeout_s is None:
        return func()
    pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lit-align-reward")
    try:
        future = pool.submit(func)
        try:
            return future.result(timeout=timeout_s)
        except cf.TimeoutError:
            if future.done():  # finished at the deadline, or func itself raised TimeoutError
                return future.result()
            raise _CallTimedOut from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _as_rewards(output: Any, n: int) -> torch.Tensor:
    """Validate a reward function's output as a CPU float32 tensor of shape ``(n,)``."""
    t = output.detach() if isinstance(output, torch.Tensor) else torch.as_tensor(output)
    if t.is_complex() or t.shape != (n,):
        raise ValueError(f"expected a real tensor of shape ({n},), got {t.dtype} of shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.float32)


def _score_items(
    fn: Callable[..., Any], prompts: list[str], completions: list[str], answers: list[str]
) -> tuple[torch.Tensor, list[Exception | None]]:
    """Score item by item: (rewards with NaN where failed, per-item exception or None)."""
    values: list[float] = []
    causes: list[Exception | None] = []
    for p, c, a in zip(prompts, completions, answers):
        try:
            values.append(float(_as_rewards(fn([p], [c], [a]), 1)[0]))
            causes.append(None)
        except Exception as exc:
            values.append(math.nan)
            causes.append(exc)
    return torch.tensor(values, dtype=torch.float32), causes


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text)} chars]"


def _short(text: str) -> str:
    return repr(_clip(text))


def score_safely(
    fn: Callable[[list[str], list[str], list[str]], Any],
    prompts: list[str],
    completions: list[str],
    answers: list[str],
    on_error: str = "raise",
    timeout_s: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Call a reward function defensively; returns ``(rewards, n_errors)``.

    ``rewards`` is a CPU float32 tensor ``(N,)``. Lists/arrays are converted.
    An error is: ``fn`` raising, taking longer than ``timeout_s`` for the whole
    batch, returning something that is not ``N`` real numbers, or a NaN/inf entry.

    If the batch call raises or returns a bad shape, ``fn`` is retried item by
    item (under a second ``timeout_s``) so only the bad items count as errors.
    A whole-batch timeout makes all ``N`` items errors.

    Args:
        on_error: ``"raise"`` raises :class:`RewardError` naming the offending
            prompt/completion (truncated) and the cause; ``"zero"`` scores
            failed items 0 and counts them in ``n_errors``.
        timeout_s: limit for the call in seconds (None: no limit). With a limit,
            ``fn`` runs in a worker thread (so thread-local state such as
            ``torch.no_grad`` does not carry over), and a hung call is abandoned,
            not killed.
    """
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
    _check_lengths(prompts, completions, answers)
    n = len(completions)
    if n == 0:
        return torch.zeros(0), 0
    name = getattr(fn, "__name__", type(fn).__name__)
    causes: list[Exception | None] = [None] * n
    batch_error: Exception | None = None
    try:
        rewards = _run_with_timeout(lambda: _as_rewards(fn(prompts, completions, answers), n), timeout_s)
    except _CallTimedOut:
        if on_error == "raise":
            raise RewardError(
                f"reward function {name} exceeded timeout_s={timeout_s} on a batch of {n}; "
                f"first item: prompt={_short(prompts[0])}, completion={_short(completions[0])}"
            ) from None
        return torch.zeros(n), n
    except Exception as exc:
        batch_error = exc
        try:
            retry = lambda: _score_items(fn, prompts, completions, answers)  # noqa: E731
            rewards, causes = _run_with_timeout(retry, timeout_s)
        except _CallTimedOut:
            rewards, causes = torch.full((n,), math.nan), [exc] * n

    bad = ~torch.isfinite(rewards)
    if on_error == "raise" and bad.any():
        i = int(bad.nonzero()[0])
        cause = causes[i]
        reason = _clip(repr(cause)) if cause is not None else f"non-finite reward {float(rewards[i])}"
        raise RewardError(
            f"reward function {name} failed on item {i} of {n}: {reason}; "
            f"prompt={_short(prompts[i])}, completion={_short(completions[i])}"
        ) from cause
    if on_error == "raise" and batch_error is not None:
        raise RewardError(
            f"reward function {name} failed on a batch of {n} (but on no single item): "
            f"{_clip(repr(batch_error))}; "
            f"first item: prompt={_short(prompts[0])}, completion={_short(completions[0])}"
        ) from batch_error
    if batch_error is not None and not bad.any():
        warnings.warn(
            f"reward function {name} failed on the batch ({_clip(repr(batch_error))}) but not item by item; "
            "using per-item rewards",
            RuntimeWarning,
            stacklevel=2,
        )
    return torch.where(bad, torch.zeros_like(rewards), rewards), int(bad.sum())
