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

import asyncio
import concurrent.futures as cf
import functools
import inspect
import math
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from lit_align.math_answers import answers_equivalent, extract_boxed, extract_final_answer, reference_answer, warm_up

__all__ = [
    "BinaryReward",
    "ExactAnswerReward",
    "MathAnswerReward",
    "RewardError",
    "RewardFunction",
    "RewardScores",
    "RewardSet",
    "SoftOverlongPunishment",
    "ThinkFormatReward",
    "answers_equivalent",
    "extract_boxed",
    "extract_final_answer",
    "is_async_reward",
    "reward_name",
    "score_safely",
    "takes_answers",
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
    ``28 percent`` = ``28\\%``, ``\\textbf{(B)}`` = B, ``\\frac{1}{2}`` = 0.5, intervals, sets; numbers it
    calls equal must also agree to a relative 5e-6 (its six decimal places let 1e-7 = 2e-7 match, Math-Verify
    issue 14; see :func:`lit_align.math_answers.numbers_close`), and ".5" reads as 0.5.

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
        warm_up()  # the library's import and first parse, outside the per-answer time limit
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


# ---------------------------------------------------------------- TRL-style built-ins


class ThinkFormatReward:
    """Format reward for reasoning tags, a TRL-style reward function: 1.0 when the completion is
    ``<think>`` reasoning ``</think>`` followed by a non-empty answer, else 0.0.

    Called as TRL calls reward functions (``f(completions=..., **kwargs)``), so it works in lit-align's
    ``model.reward`` list and in TRL's GRPOTrainer alike. The completion must start with the opening
    tag (after whitespace), hold exactly one opening and one closing tag, and have text after the
    closing tag. With ``answer_tag`` set (e.g. ``"answer"``), that text must be exactly one
    ``<answer>...</answer>`` block. Special tokens used as tags stay in the completion text only with
    ``model.skip_special_tokens: false``.

    Args:
        think_tag: name of the reasoning tag (``think`` -> ``<think>`` ... ``</think>``).
        answer_tag: name of an answer tag the answer must be wrapped in, or None (any text).
        reward: value for a well-formed completion (others score 0.0).

    Returns (per call): a list of N floats.
    """

    def __init__(self, think_tag: str = "think", answer_tag: str | None = None, reward: float = 1.0) -> None:
        for name, tag in (("think_tag", think_tag), ("answer_tag", answer_tag)):
            if tag is not None and (not isinstance(tag, str) or not tag.strip() or any(c in tag for c in "<>/")):
                raise ValueError(f"ThinkFormatReward.{name}={tag!r} must be a tag name such as 'think' (no <, >, /)")
        self.think_tag, self.answer_tag, self.reward = think_tag, answer_tag or None, float(reward)
        t = re.escape(think_tag)
        tail = (
            rf"(?=\S)(?:(?!</?{t}>).)+"
            if self.answer_tag is None
            else rf"<{re.escape(self.answer_tag)}>(?:(?!</?{re.escape(self.answer_tag)}>).)+</{re.escape(self.answer_tag)}>\s*"
        )
        self._pattern = re.compile(rf"\s*<{t}>(?:(?!</?{t}>).)*</{t}>\s*{tail}", re.DOTALL)

    def __call__(self, completions: list[str], **kwargs) -> list[float]:
        return [self.reward if self._pattern.fullmatch(_text(c)) else 0.0 for c in completions]


class SoftOverlongPunishment:
    """DAPO's soft overlong penalty (arXiv 2503.14476, Eq. 13), a TRL-style reward function of the
    completion's token count L (``completion_ids``, the end token included, as TRL counts it):
    0 for L <= max_new_tokens - buffer, then falling linearly to -penalty at L = max_new_tokens
    (``-penalty * (L - (max_new_tokens - buffer)) / buffer``), -penalty beyond.

    TRL's ``get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`` with a penalty factor.

    Args:
        max_new_tokens: L_max, the sampling limit (``model.max_new_tokens``), in tokens.
        buffer: L_cache, the length of the soft zone before L_max, in tokens (1 <= buffer <= max_new_tokens).
        penalty: the penalty at L_max (DAPO: 1.0).

    Returns (per call): a list of N floats in [-penalty, 0].
    """

    def __init__(self, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"SoftOverlongPunishment.max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        if not isinstance(buffer, int) or not 1 <= buffer <= max_new_tokens:
            raise ValueError(
                f"SoftOverlongPunishment.buffer={buffer!r} must be an integer in [1, max_new_tokens={max_new_tokens}]"
            )
        if not math.isfinite(penalty) or penalty < 0:
            raise ValueError(f"SoftOverlongPunishment.penalty={penalty!r} must be a finite number >= 0")
        self.max_new_tokens, self.buffer, self.penalty = max_new_tokens, buffer, float(penalty)

    def __call__(self, completion_ids: list[list[int]], **kwargs) -> list[float]:
        start = self.max_new_tokens - self.buffer
        return [-self.penalty * min(max(len(ids) - start, 0) / self.buffer, 1.0) for ids in completion_ids]


def _text(completion) -> str:
    """A completion's text: a string, or TRL's conversational form ``[{"content": ...}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


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


def _as_rewards(output: Any, n: int, allow_none: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A reward function's output as (CPU float32 tensor ``(n,)``, bool ``(n,)``: the entries that
    apply). With ``allow_none`` a None entry means "does not apply to this row" (TRL's convention)."""
    applies = torch.ones(n, dtype=torch.bool)
    if allow_none and isinstance(output, (list, tuple)) and any(v is None for v in output):
        applies = torch.tensor([v is not None for v in output], dtype=torch.bool)
        output = [0.0 if v is None else v for v in output]
    t = output.detach() if isinstance(output, torch.Tensor) else torch.as_tensor(output)
    if t.is_complex() or t.shape != (n,) or applies.shape != (n,):
        raise ValueError(f"expected a real tensor of shape ({n},), got {t.dtype} of shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.float32), applies


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text)} chars]"


def _short(text) -> str:
    return repr(_clip(_text(text)))


def is_async_reward(fn: Callable) -> bool:
    """Whether calling ``fn`` returns a coroutine: an ``async def`` function, a ``functools.partial`` of one, or an
    object whose ``__call__`` is ``async def`` (TRL's ``is_async_callable``). Such functions are awaited, all of a
    scoring's at once (:class:`RewardSet`)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or (callable(fn) and inspect.iscoroutinefunction(fn.__call__))


class _EventLoop:
    """An event loop running in a daemon thread, where async reward functions are awaited. It lasts from one
    scoring to the next (TRL keeps one loop for a run, too), so a client bound to a loop (``httpx.AsyncClient``,
    ``openai.AsyncOpenAI``) made on a first call keeps working; and it is not the caller's, so scoring works from a
    thread with no loop and from one whose loop is running (a notebook, an async server)."""

    _current: _EventLoop | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="lit-align-async-rewards", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.loop.run_forever()
        self.loop.close()

    @classmethod
    def get(cls) -> _EventLoop:
        with cls._lock:
            if cls._current is None or not cls._current.thread.is_alive():
                cls._current = _EventLoop()
            return cls._current

    @classmethod
    def replace(cls, stuck: _EventLoop) -> None:
        """Abandon a loop that a function blocks (``time.sleep`` in an ``async def``): it stops once it is free
        again; later scorings start on a fresh one."""
        with cls._lock:
            if cls._current is stuck:
                cls._current = None
        asyncio.run_coroutine_threadsafe(_wind_down(), stuck.loop)

    def submit(self, coroutine) -> cf.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)


async def _wind_down() -> None:
    """Cancel a loop's tasks, let them finish cancelling, then stop the loop (its thread closes it)."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.get_running_loop().stop()


_LOOP_GRACE_S = 1.0
"""Beyond the 2 x timeout_s an async function may take (its batch call, then item by item), the time its event loop
gets to answer before it is taken for blocked."""


class _Log:
    """What reward functions log through the ``log_metric`` and ``log_extra`` TRL passes them, during one scoring of
    N completions: metric values by name, and extra columns of the samples table (N values each). Each call logs
    into an :class:`_Attempt` of its own, kept only when the call returned valid rewards (a failed batch call is
    retried item by item: its values would count twice)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list] = {}
        self._lock = threading.Lock()

    def attempt(self, rows: list[int] | None) -> _Attempt:
        return _Attempt(rows, self.n if rows is None else len(rows))

    def keep(self, attempt: _Attempt) -> None:
        with self._lock:
            for name, values in attempt.metrics.items():
                self.metrics.setdefault(name, []).extend(values)
            rows = range(self.n) if attempt.rows is None else attempt.rows
            for column, values in attempt.extra.items():
                target = self.extra.setdefault(column, [None] * self.n)
                for i, value in zip(rows, values):
                    target[i] = value


class _Attempt:
    """One call's ``log_metric`` and ``log_extra`` (``rows``: the completions it scores, None: all ``size``)."""

    def __init__(self, rows: list[int] | None, size: int) -> None:
        self.rows, self.size = rows, size
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list] = {}

    def log_metric(self, name: str, value: float) -> None:
        """TRL's ``log_metric(name, value)``: one scalar; the values of an update are averaged (over ranks too)
        and logged as ``train/<name>`` (``val/<name>`` in validation)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"log_metric({name!r}, {value!r}): the name must be a non-empty string")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"log_metric({name!r}, {value!r}): the value must be a real number") from None
        self.metrics.setdefault(name, []).append(number)

    def log_extra(self, column: str, values: Sequence) -> None:
        """TRL's ``log_extra(column, values)``: a column of the samples table, one value per completion scored."""
        values = list(values)
        if not isinstance(column, str) or not column.strip():
            raise ValueError(f"log_extra({column!r}, ...): the column must be a non-empty string")
        if len(values) != self.size:
            raise ValueError(
                f"log_extra({column!r}, ...) got {len(values)} values for {self.size} completions: give one per "
                "completion"
            )
        self.extra[column] = values


@dataclass
class _Outcome:
    """One function's scores before the error policy: per row the reward, whether it applies and the cause of a
    failure; the batch call's error, if any; whether it ran past the time limit."""

    rewards: torch.Tensor
    applies: torch.Tensor
    causes: list
    batch_error: Exception | None = None
    timed_out: bool = False

    @classmethod
    def timeout(cls, n: int) -> _Outcome:
        return cls(torch.zeros(n), torch.ones(n, dtype=torch.bool), [None] * n, timed_out=True)


Call = Callable[[list[int] | None, _Attempt | None], Any]
"""``call(rows, attempt)``: a reward function called on ``rows`` (None: all), logging into ``attempt``."""


def _call_once(call: Call, rows, k: int, allow_none: bool, log: _Log | None):
    """One synchronous call on ``k`` rows, its logging kept if it returns valid rewards. A coroutine returned by a
    function not declared ``async`` is awaited on the reward event loop."""
    attempt = log.attempt(rows) if log is not None else None
    output = call(rows, attempt)
    if inspect.isawaitable(output):
        output = _EventLoop.get().submit(_awaited(output)).result()
    result = _as_rewards(output, k, allow_none)
    if attempt is not None:
        log.keep(attempt)
    return result


async def _awaited(awaitable):
    return await awaitable


def _collect(call: Call, n: int, allow_none: bool, timeout_s: float | None, log: _Log | None) -> _Outcome:
    """A synchronous function's scores: one call on all rows under ``timeout_s``; if it fails, row by row (under
    a second ``timeout_s``) so only the bad rows count as errors."""
    causes: list[Exception | None] = [None] * n
    try:
        rewards, applies = _run_with_timeout(lambda: _call_once(call, None, n, allow_none, log), timeout_s)
        return _Outcome(rewards, applies, causes)
    except _CallTimedOut:
        return _Outcome.timeout(n)
    except Exception as exc:
        batch_error = exc

    def one_by_one():
        values, applying = torch.full((n,), math.nan), torch.ones(n, dtype=torch.bool)
        for i in range(n):
            try:
                r, a = _call_once(call, [i], 1, allow_none, log)
                values[i], applying[i] = r[0], a[0]
            except Exception as e:
                causes[i] = e
        return values, applying

    try:
        rewards, applies = _run_with_timeout(one_by_one, timeout_s)
    except _CallTimedOut:
        rewards, applies, causes = torch.full((n,), math.nan), torch.ones(n, dtype=torch.bool), [batch_error] * n
    return _Outcome(rewards, applies, causes, batch_error)


async def _collect_async(call: Call, n: int, allow_none: bool, timeout_s: float | None, log: _Log) -> _Outcome:
    """:func:`_collect` for an async function, on the reward event loop: the batch call, then (if it fails) every
    row's call at once, each stage cancelled at ``timeout_s``."""

    async def once(rows, k: int):
        attempt = log.attempt(rows)
        output = call(rows, attempt)
        if inspect.isawaitable(output):
            output = await output
        result = _as_rewards(output, k, allow_none)
        log.keep(attempt)
        return result

    async def within(awaitable):
        # asyncio.wait, not wait_for: a TimeoutError the function raises itself is its own failure, not ours
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            task.cancel()
            raise _CallTimedOut
        return task.result()

    causes: list[Exception | None] = [None] * n
    try:
        rewards, applies = await within(once(None, n))
        return _Outcome(rewards, applies, causes)
    except _CallTimedOut:
        return _Outcome.timeout(n)
    except Exception as exc:
        batch_error = exc
    values, applying = torch.full((n,), math.nan), torch.ones(n, dtype=torch.bool)

    async def row(i: int):
        try:
            r, a = await once([i], 1)
            values[i], applying[i] = r[0], a[0]
        except Exception as e:
            causes[i] = e

    try:
        await within(asyncio.gather(*(row(i) for i in range(n))))
    except _CallTimedOut:
        return _Outcome(torch.full((n,), math.nan), torch.ones(n, dtype=torch.bool), [batch_error] * n, batch_error)
    return _Outcome(values, applying, causes, batch_error)


class _Pending:
    """Async functions being awaited together on the reward event loop (:meth:`start`); :meth:`outcomes` waits for
    them, at most 2 x ``timeout_s`` (+ a grace) from the start, after which the loop counts as blocked and each
    function as timed out."""

    def __init__(self, jobs: list[tuple[Call, bool]], n: int, timeout_s: float | None, log: _Log) -> None:
        async def all_of():
            return await asyncio.gather(*(_collect_async(call, n, none, timeout_s, log) for call, none in jobs))

        self.n, self.count = n, len(jobs)
        self.deadline = None if timeout_s is None else time.monotonic() + 2 * timeout_s + _LOOP_GRACE_S
        self.loop = _EventLoop.get()
        self.future = self.loop.submit(all_of())

    def outcomes(self) -> list[_Outcome]:
        left = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)
        try:
            return self.future.result(timeout=left)
        except cf.TimeoutError:
            if self.future.done():
                raise
            self.cancel()
            _EventLoop.replace(self.loop)
            return [_Outcome.timeout(self.n) for _ in range(self.count)]

    def cancel(self) -> None:
        self.future.cancel()


def _apply_policy(
    outcome: _Outcome, name: str, prompts: list, completions: list, on_error: str, timeout_s: float | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rewards, applies, n_errors) from a function's :class:`_Outcome`: failed rows score 0 (``on_error="zero"``)
    or raise :class:`RewardError` naming the first one's prompt, completion and cause."""
    n = len(outcome.rewards)
    if outcome.timed_out:
        if on_error == "raise":
            raise RewardError(
                f"reward function {name} exceeded timeout_s={timeout_s} on a batch of {n}; "
                f"first item: prompt={_short(prompts[0])}, completion={_short(completions[0])}"
            )
        return torch.zeros(n), torch.ones(n, dtype=torch.bool), n
    rewards, applies, causes, batch_error = outcome.rewards, outcome.applies, outcome.causes, outcome.batch_error
    bad = ~torch.isfinite(rewards) & applies
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
            stacklevel=4,
        )
    rewards = torch.where(bad | ~applies, torch.zeros_like(rewards), rewards)
    return rewards, applies, int(bad.sum())


def _check_policy(on_error: str) -> None:
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")


def score_safely(
    fn: Callable[[list[str], list[str], list[str]], Any],
    prompts: list[str],
    completions: list[str],
    answers: list[str],
    on_error: str = "raise",
    timeout_s: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Call a reward function ``fn(prompts, completions, answers)`` defensively; returns ``(rewards, n_errors)``.

    ``rewards`` is a CPU float32 tensor ``(N,)``. Lists/arrays are converted; a coroutine (an ``async def`` ``fn``)
    is awaited. An error is: ``fn`` raising, taking longer than ``timeout_s`` for the whole
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
    _check_policy(on_error)
    _check_lengths(prompts, completions, answers)
    if not completions:
        return torch.zeros(0), 0
    name = getattr(fn, "__name__", type(fn).__name__)
    outcome = _collect(_lit_call(fn, prompts, completions, answers), len(completions), False, timeout_s, None)
    rewards, _, n_errors = _apply_policy(outcome, name, prompts, completions, on_error, timeout_s)
    return rewards, n_errors


def _lit_call(fn: Callable, prompts: list, completions: list, answers: list) -> Call:
    """lit-align's interface: ``fn(prompts, completions, answers)`` on the chosen rows."""

    def call(rows, attempt=None):
        if rows is None:
            return fn(prompts, completions, answers)
        return fn(*([column[i] for i in rows] for column in (prompts, completions, answers)))

    return call


# ---------------------------------------------------------------- several weighted rewards, TRL's way


def takes_answers(fn: Callable) -> bool:
    """True for lit-align's interface, ``fn(prompts, completions, answers)``: a :class:`RewardFunction`, or
    a callable whose first three parameters are named so and that takes no ``**kwargs``. Any other
    callable is called as TRL calls reward functions (see :class:`RewardSet`)."""
    if isinstance(fn, RewardFunction):
        return True
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return False
    return [p.name for p in params[:3]] == ["prompts", "completions", "answers"]


def reward_name(fn: Callable) -> str:
    """The name a reward function is logged under, as TRL names it: a function's ``__name__``
    (``functools.partial`` unwrapped), else the class name of a callable object."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass
class RewardScores:
    """The scores of N completions by K reward functions.

    ``total`` (N,) float32: the weighted sum over the functions that apply to each row (0 where none
    does); ``per_function`` (N, K) float32, NaN where a function returned None (it does not apply);
    ``n_errors``: failed items over all functions (scored 0 under ``reward_errors: zero``);
    ``logged``: the values the functions gave TRL's ``log_metric``, by name, in call order; ``extra``: the
    columns they gave ``log_extra``, N values each (None for a row no call logged).
    """

    total: torch.Tensor
    per_function: torch.Tensor
    n_errors: int
    logged: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)


TRL_ARGUMENTS = ("trainer_state", "log_metric", "log_extra")
"""What TRL's GRPOTrainer passes every reward function besides the texts and the data set's columns."""


def _takes(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes the keyword argument ``name`` (named, or through ``**kwargs``); TRL passes its own
    arguments to every function, a function whose signature cannot be read gets them too."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or (p.name == name and p.kind in keyword) for p in params)


class RewardSet:
    """Several reward functions with weights, each called the way TRL's GRPOTrainer calls them.

    A function is either lit-align's interface (a :class:`RewardFunction`, or a callable taking
    ``(prompts, completions, answers)`` and no ``**kwargs``, see :func:`takes_answers`; called with the
    reference answers after ``data.answer_pattern``) or any other callable, called as TRL calls reward
    functions::

        fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns,
           trainer_state=..., log_metric=..., log_extra=...)

    ``prompts`` and ``completions`` are what TRL passes for the row's kind of data: for a row of text data the
    prompt text (before the chat template) and the sampled text; for a row of conversational data (TRL's
    ``messages`` / ``prompt`` columns of ``{"role", "content"}`` lists, given as ``prompt_messages``) the
    row's list of messages (system message and earlier turns included) and ``[{"role": "assistant",
    "content": text}]``, as TRL's GRPOTrainer builds them for conversational prompts (``_generate_and_score_
    completions``: the decoded text as the one assistant message, nothing prepended). ``completion_ids`` are
    each completion's token ids (end token included), and ``columns`` the data set's other columns for each
    row (``answer``, ``solution``, ...; one list entry per completion). Functions with lit-align's interface
    always get the texts (a conversation's prompt as the template renders it).
    ``trainer_state`` is transformers' ``TrainerState`` of the run (``global_step``: policy updates done,
    ``max_steps``, ``epoch``; TRL issue 3668), ``log_metric(name, value)`` logs a scalar and
    ``log_extra(column, values)`` a column of the samples table; each of the three is passed to a function
    that names it or takes ``**kwargs``. It returns one float or None per completion; None: this reward
    does not apply to that row (the weighted sum skips it; a row no function applies to totals 0). A TRL
    reward function works unchanged, ``async def`` ones too (TRL issue 4130): those are awaited all at
    once, on an event loop of their own (:func:`is_async_reward`), while the others run. Failures, time
    limits and NaN go through ``on_error`` (``model.reward_errors``), async functions' alike.

    Args:
        functions: the reward functions (a single one is taken as a list of one).
        weights: one weight per function (TRL's ``reward_weights``); None: all 1.0.

    ``names`` (TRL's: function name or class name; a repeated name gets ``_2``, ``_3``...) key the
    logged ``train/rewards/<name>/mean`` and ``/std``. :meth:`correct` is the verdict used for
    accuracy: that of the first function with lit-align's interface (its ``correct``, else its reward
    >= 1), else a weighted total >= 1.
    """

    def __init__(self, functions, weights: Sequence[float] | None = None) -> None:
        functions = list(functions) if isinstance(functions, (list, tuple)) else [functions]
        if not functions:
            raise ValueError("model.reward is an empty list: give at least one reward function")
        for fn in functions:
            if not callable(fn):
                raise ValueError(f"model.reward: {fn!r} is not callable; give a reward class path or a function path")
        if weights is None:
            weights = [1.0] * len(functions)
        weights = list(weights)
        if len(weights) != len(functions):
            raise ValueError(
                f"model.reward_weights has {len(weights)} entries but model.reward has {len(functions)} functions "
                f"({', '.join(reward_name(f) for f in functions)}): give one weight per function"
            )
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"model.reward_weights={weights!r}: every weight must be a finite number")
        self.functions, self.weights = functions, torch.tensor(weights, dtype=torch.float32)
        names: list[str] = []
        for fn in functions:
            base, k = reward_name(fn), 1
            name = base
            while name in names:
                k += 1
                name = f"{base}_{k}"
            names.append(name)
        self.names = names
        # per function: which of TRL's own arguments it takes (none for lit-align's interface)
        self._passes = [
            () if takes_answers(fn) else tuple(a for a in TRL_ARGUMENTS if _takes(fn, a)) for fn in functions
        ]
        self._warned_unscored = False

    def __len__(self) -> int:
        return len(self.functions)

    @property
    def judge(self) -> Callable | None:
        """The function whose verdict gives accuracy: the first one with lit-align's interface, or None."""
        return next((f for f in self.functions if takes_answers(f)), None)

    @property
    def may_log(self) -> bool:
        """Whether any function takes ``log_metric`` (the module then merges logged names over ranks)."""
        return any("log_metric" in passes for passes in self._passes)

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        answers: list[str],
        completion_ids: list[list[int]] | None = None,
        columns: dict[str, list] | None = None,
        on_error: str = "raise",
        timeout_s: float | None = None,
        trainer_state=None,
        prompt_messages: list[list[dict] | None] | None = None,
    ) -> RewardScores:
        """Score N completions with every function (each under ``timeout_s`` per call).

        ``completion_ids``: N lists of token ids (None: empty lists); ``columns``: name -> N values;
        ``trainer_state``: what TRL-style functions get as ``trainer_state`` (None: a fresh
        ``transformers.TrainerState``, step 0); ``prompt_messages``: per completion, its prompt's list of
        messages where the row came from conversational data, else None (None: every row is text).

        Raises:
            ValueError: a column or ``prompt_messages`` without one entry per completion.
        """
        _check_policy(on_error)
        _check_lengths(prompts, completions, answers)
        n = len(completions)
        trl_prompts, trl_completions = _trl_texts(prompts, completions, prompt_messages)
        ids = completion_ids if completion_ids is not None else [[] for _ in range(n)]
        columns = {k: list(v) for k, v in (columns or {}).items() if k not in _RESERVED}
        for key, values in columns.items():
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
        if trainer_state is None and any("trainer_state" in passes for passes in self._passes):
            from transformers import TrainerState

            trainer_state = TrainerState()
        per = torch.full((n, len(self)), math.nan)
        log, errors = _Log(n), 0
        calls = [
            (_lit_call(fn, prompts, completions, answers), False)
            if takes_answers(fn)
            else (self._trl_call(fn, passes, trl_prompts, trl_completions, ids, columns, trainer_state), True)
            for fn, passes in zip(self.functions, self._passes)
        ]
        is_async = [is_async_reward(fn) for fn in self.functions]
        waiting = [k for k in range(len(self)) if is_async[k]]
        # the async functions start first: they are awaited while the synchronous ones run
        pending = _Pending([calls[k] for k in waiting], n, timeout_s, log) if n and waiting else None
        try:
            for k, (call, allow_none) in enumerate(calls):
                if n and not is_async[k]:
                    outcome = _collect(call, n, allow_none, timeout_s, log)
                    errors += self._record(k, outcome, per, prompts, completions, on_error, timeout_s)
            if pending is not None:
                for k, outcome in zip(waiting, pending.outcomes()):
                    errors += self._record(k, outcome, per, prompts, completions, on_error, timeout_s)
        finally:
            if pending is not None:  # a function raised under reward_errors=raise: the others are not awaited
                pending.cancel()
        unscored = torch.isnan(per).all(1)
        if bool(unscored.any()) and not self._warned_unscored:
            self._warned_unscored = True
            i = int(unscored.nonzero()[0])
            warnings.warn(
                f"every reward function returned None for {int(unscored.sum())} of {n} completions (scored 0), e.g. "
                f"prompt={_short(prompts[i])}, completion={_short(completions[i])}; functions: {', '.join(self.names)}",
                RuntimeWarning,
                stacklevel=2,
            )
        total = (per * self.weights).nansum(1)
        return RewardScores(total, per, errors, log.metrics, log.extra)

    def _record(self, k: int, outcome: _Outcome, per, prompts, completions, on_error, timeout_s) -> int:
        """Function k's scores into column k of ``per`` (NaN where it does not apply); its failed items."""
        values, applies, n_err = _apply_policy(outcome, self.names[k], prompts, completions, on_error, timeout_s)
        per[:, k] = torch.where(applies, values, torch.full_like(values, math.nan))
        return n_err

    @staticmethod
    def _trl_call(fn, passes, prompts, completions, ids, columns, trainer_state) -> Call:
        """TRL's call of ``fn`` on the chosen rows: the texts, the token ids, the columns, and those of
        ``trainer_state``, ``log_metric`` and ``log_extra`` that it takes (``passes``)."""

        def call(rows, attempt):
            pick = (lambda xs: xs) if rows is None else (lambda xs: [xs[i] for i in rows])
            own = {"trainer_state": trainer_state}
            if attempt is not None:
                own.update(log_metric=attempt.log_metric, log_extra=attempt.log_extra)
            return fn(
                prompts=pick(prompts),
                completions=pick(completions),
                completion_ids=pick(ids),
                **{key: pick(v) for key, v in columns.items()},
                **{key: own[key] for key in passes if key in own},
            )

        return call

    def correct(
        self,
        prompts: list[str],
        completions: list[str],
        answers: list[str],
        scores: RewardScores | None = None,
        completion_ids: list[list[int]] | None = None,
        columns: dict[str, list] | None = None,
        on_error: str = "raise",
        timeout_s: float | None = None,
        trainer_state=None,
        prompt_messages: list[list[dict] | None] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Bool ``(N,)``: which completions are correct, and the failed checks. The judge's own
        ``correct`` (the first lit-align-interface function's) if it has one, else its reward >= 1
        (read from ``scores`` when given, so nothing is scored twice); without a RewardFunction, a
        weighted total >= 1 (``trainer_state``, ``prompt_messages``: as for :meth:`score`)."""
        judge = self.judge
        own = getattr(type(judge), "correct", None)
        if judge is not None and callable(own) and own is not RewardFunction.correct:
            verdicts, n_errors = score_safely(judge.correct, prompts, completions, answers, on_error, timeout_s)
            return verdicts.bool(), n_errors
        if scores is None:
            scores = self.score(
                prompts,
                completions,
                answers,
                completion_ids,
                columns,
                on_error,
                timeout_s,
                trainer_state,
                prompt_messages,
            )
        if judge is not None:
            column = scores.per_function[:, self.functions.index(judge)]
            return RewardFunction.is_full_reward(torch.nan_to_num(column, nan=0.0)), scores.n_errors
        return RewardFunction.is_full_reward(scores.total), scores.n_errors


def _trl_texts(prompts: list[str], completions: list[str], prompt_messages: list | None) -> tuple[list, list]:
    """``prompts`` and ``completions`` as TRL passes them to reward functions: a row whose ``prompt_messages``
    entry is a list of messages (conversational data) gets that list and ``[{"role": "assistant", "content":
    completion}]`` (TRL's GRPOTrainer, conversational prompts); a row whose entry is None keeps its texts.

    Raises:
        ValueError: ``prompt_messages`` without one entry per completion.
    """
    if prompt_messages is None:
        return prompts, completions
    if len(prompt_messages) != len(completions):
        raise ValueError(f"prompt_messages has {len(prompt_messages)} entries for {len(completions)} completions")
    return (
        [p if m is None else m for p, m in zip(prompts, prompt_messages)],
        [c if m is None else [{"role": "assistant", "content": c}] for c, m in zip(completions, prompt_messages)],
    )


_RESERVED = ("prompts", "completions", "completion_ids", "prompt", "completion", *TRL_ARGUMENTS)
"""Column names never passed as keyword arguments (they are the call's own arguments, as in TRL)."""
