"""Tests for lit_align.rewards: answer extraction, equivalence, hostile input, safe scoring."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_align.math_answers import answers_equivalent, extract_boxed, extract_final_answer, too_costly
from lit_align.rewards import ExactAnswerReward, MathAnswerReward, RewardError, RewardFunction, score_safely

FAST_S = 1.0  # generous wall-clock bound for anything that must be "fast"


def math_reward(completion: str, answer: str, **kwargs) -> float:
    return float(MathAnswerReward(**kwargs)(["q"], [completion], [answer])[0])


# ------------------------------------------------------------------ ExactAnswerReward


def test_exact_embedded_addition_task():
    fn = ExactAnswerReward()
    r = fn(["37+48=", "37+48=", "37+48=", "37+48="], ["85", " 85\n", "86", "85 "], ["85"] * 4)
    assert r.dtype == torch.float32 and r.shape == (4,)
    assert r.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert fn.correct(["p"], ["8 5"], ["85"]).tolist() == [False]


def test_exact_prefix_handling():
    fn = ExactAnswerReward(answer_prefix="####")
    completions = [
        "40+32=72 #### 72",  # after prefix
        "#### 1 oops, redo #### 72",  # last prefix wins
        "72",  # prefix absent: whole completion
        "so 72",  # prefix absent, whole completion is not the answer
        "#### 73",
    ]
    assert fn(["p"] * 5, completions, ["72"] * 5).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_exact_custom_rewards_and_correct():
    fn = ExactAnswerReward(correct_reward=2.0, wrong_reward=-1.0)
    assert fn(["p", "p"], ["a", "b"], ["a", "a"]).tolist() == [2.0, -1.0]
    # correct() follows the match, not the reward value
    assert fn.correct(["p", "p"], ["a", "b"], ["a", "a"]).tolist() == [True, False]
    assert ExactAnswerReward(correct_reward=0.5).correct(["p"], ["a"], ["a"]).tolist() == [True]


def test_base_correct_threshold_and_empty_and_mismatch():
    class Const(RewardFunction):
        def __call__(self, prompts, completions, answers):
            return torch.tensor([1.0, 0.9999995, 0.999])

    assert Const().correct([], [], []).tolist() == [True, True, False]
    assert ExactAnswerReward()([], [], []).shape == (0,)
    with pytest.raises(ValueError):
        ExactAnswerReward()(["p"], ["a", "b"], ["a"])


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),  # nested braces kept
        (r"\boxed{1} no wait \boxed{2}", "2"),  # last box wins
        (r"\boxed{3} and \boxed{4", "3"),  # unclosed last box ignored
        (r"\boxed{\boxed{7}}", "7"),  # box opened last
        (r"\boxed {5}", "5"),
        (r"\boxed{}", ""),
        ("no box 42", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_depth_limit():
    assert extract_boxed("\\boxed{" + "{" * 100 + "}" * 100 + "}") is None
    assert extract_boxed("\\boxed{" + "{" * 10 + "8" + "}" * 10 + "}") == "{" * 10 + "8" + "}" * 10


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12 apples, so the answer is 42.", "42"),
        ("it costs 1,234 dollars", "1,234"),
        ("the result is -3", "-3"),
        ("5-3", "3"),
        ("half: 1/2", "1/2"),
        ("pi is 3.14", "3.14"),
        (r"\boxed{x} though 9 appears later", "x"),  # box beats numbers
        ("no digits here", None),
    ],
)
def test_extract_final_answer_last_number_fallback(text, expected):
    assert extract_final_answer(text) == expected


# ------------------------------------------------------------------ MathAnswerReward


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (r"\boxed{1/2}", "0.5", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        ("the total is 1,234", "1234", 1.0),
        (r"\boxed{1234}", "1,234", 1.0),
        (r"\boxed{-3}", "3", 0.0),
        (r"\boxed{3}", "-3", 0.0),
        (r"\boxed{-3}", "-3", 1.0),
        ("The answer is 42.", "42", 1.0),
        (r"\boxed{3.0}", "3", 1.0),
        (r"\boxed{50\%}", "50", 1.0),
        (r"\boxed{1/3}", "0.333", 0.0),  # exact, not approximate
        (r"\boxed{\pi}", r"\pi", 1.0),  # non-numeric: normalised string match
        (r"\boxed{\left( 1, 2 \right)}", "(1,2)", 1.0),
        (r"\boxed{2}", r"so \boxed{2}", 1.0),  # boxed reference
        ("I give up", "0", 0.0),
        (r"\boxed{}", "", 0.0),  # empty answers never match
    ],
)
def test_math_equivalence(completion, answer, expected):
    assert math_reward(completion, answer) == expected
    assert math_reward(completion, answer, timeout_s=0) == expected  # inline path agrees


# Answer classes that a hand-written normaliser got wrong (issue 15): each listed example, more of its
# kind, and near misses that must stay wrong. Every check runs under the per-answer time limit.
ANSWER_CLASSES = {
    "latex money": [
        (r"\boxed{\$18}", "18", 1.0),
        (r"\boxed{\$18.00}", "18", 1.0),
        (r"\boxed{\$1,250.50}", "1250.5", 1.0),
        (r"\boxed{\$0.75}", "0.75", 1.0),
        (r"The total is \$7.", "7", 1.0),
        (r"\boxed{\$19}", "18", 0.0),
    ],
    "latex thousands separators": [
        (r"\boxed{1{,}000}", "1000", 1.0),
        (r"\boxed{12{,}345{,}678}", "12345678", 1.0),
        (r"\boxed{2{,}500.5}", "2500.5", 1.0),
        (r"\boxed{1\,000}", "1000", 1.0),
        (r"\boxed{1{,}001}", "1000", 0.0),
    ],
    "unit and percent words": [
        (r"\boxed{5 \text{ cm}}", "5", 1.0),
        (r"\boxed{12\text{ dollars}}", "12", 1.0),
        (r"\boxed{28 percent}", r"28\%", 1.0),
        (r"\boxed{3\text{ hours}}", "3", 1.0),
        (r"\boxed{7 \mbox{ apples}}", "7", 1.0),
        (r"\boxed{45^\circ}", "45", 1.0),
        (r"\boxed{15\%}", "15 percent", 1.0),
        (r"\boxed{6 \text{ cm}}", "5", 0.0),
        (r"\boxed{40 percent}", r"45\%", 0.0),
    ],
    "multiple choice": [
        (r"\boxed{\textbf{(B)}}", "B", 1.0),
        (r"\boxed{B}", "(B)", 1.0),
        (r"\boxed{(C)}", "C", 1.0),
        (r"\boxed{\text{(E)}}", r"\textbf{(E)}", 1.0),
        ("The answer is (D).", "D", 1.0),
        (r"\boxed{A}", "(B)", 0.0),
        ("The answer is B", "C", 0.0),
    ],
    "answer statement, then more numbers; spaced thousands": [
        ("The answer is 72 because 3 < 4", "72", 1.0),
        ("1 000", "1000", 1.0),
        ("Final answer: 15. Check: 3 * 5 = 15, and 2 + 2 = 4", "15", 1.0),
        ("so the answer is $6$, since 12 / 2 = 6 and 7 > 1", "6", 1.0),
        ("#### 36\nI used 3 steps", "36", 1.0),
        ("The answer is 1 250 000", "1250000", 1.0),
        ("There were 2 500 people", "2500", 1.0),
        (r"\boxed{1 000}", "1000", 1.0),
        ("The answer is 71 because 3 < 4", "72", 0.0),
    ],
}


@pytest.mark.parametrize("kind", list(ANSWER_CLASSES))
def test_answer_classes(kind):
    cases = ANSWER_CLASSES[kind]
    fn = MathAnswerReward(timeout_s=1.0)
    completions, answers, expected = (list(x) for x in zip(*cases))
    got = fn(["q"] * len(cases), completions, answers).tolist()
    assert fn.last_timeouts == 0, "every check finished within the per-answer time limit"
    assert got == expected, [(c, a) for c, a, e, g in zip(completions, answers, expected, got) if e != g]


def test_math_custom_rewards_and_max_chars():
    fn = MathAnswerReward(correct_reward=2.0, wrong_reward=-0.5, max_answer_chars=3)
    r = fn(["q"] * 3, [r"\boxed{12}", r"\boxed{1234}", "7"], ["12", "1234", "8"])
    assert r.tolist() == [2.0, -0.5, -0.5]
    assert fn.correct(["q"] * 2, [r"\boxed{12}", "7"], ["12", "8"]).tolist() == [True, False]


def test_math_timeout_scores_wrong_and_is_counted():
    class Slow(MathAnswerReward):
        def is_correct(self, prompt, completion, answer):
            if completion == "slow":
                time.sleep(0.4)
            return super().is_correct(prompt, completion, answer)

    fn = Slow(timeout_s=0.05)
    start = time.perf_counter()
    r = fn(["q"] * 3, ["1", "slow", "2"], ["1", "slow", "2"])
    assert time.perf_counter() - start < 0.3
    assert r.tolist() == [1.0, 0.0, 1.0]
    assert fn.last_timeouts == 1
    fn(["q"], ["1"], ["1"])
    assert fn.last_timeouts == 0


HOSTILE = {
    "1MB text": "a" * 1_000_000,
    "1MB comma groups": "1,234" * 200_000,
    "1MB digits and dots": "1." * 500_000,
    "1MB of box openers": "\\boxed{" * 150_000,
    "1MB of braces": "{" * 500_000 + "}" * 500_000,
    "box then 1MB spaces": "\\boxed" + " " * 1_000_000,
    "10k-digit number": "9" * 10_000,
    "10k-digit boxed": "\\boxed{" + "9" * 10_000 + "}",
    "10k nested braces": "\\boxed{" + "{" * 10_000 + "7" + "}" * 10_000 + "}",
    "10k nested boxes": "\\boxed{" * 10_000 + "}" * 10_000,
    "power tower": "9**9**9",
    "boxed power tower": "\\boxed{9**9**9}",
    "exponent": "\\boxed{1e999999999}",
    "control chars": "\x00\x01\x1b[31m\\boxed{\x00}\x7f\ud800",
    "NUL in number": "\\boxed{4\x00}",
    "unbalanced open": "\\boxed{\\frac{1}{2",
    "unbalanced close": "}}}}\\boxed{}}}{{{",
    # sympy would evaluate these in C, holding the GIL (no thread time limit could stop it)
    "boxed tower of powers": "\\boxed{9^{9^{9}}}",
    "boxed big power": "\\boxed{((9^{99})^{99})^{99}}",
    "boxed huge factorial": "\\boxed{(10^{6})!}",
    "boxed big factorial": "\\boxed{99999999!}",
    "boxed product": "\\boxed{\\prod_{i=1}^{10000000} i}",
    "stated tower": "The answer is $10^{10^{10}}$",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_completion_is_fast_and_wrong(name):
    completion = HOSTILE[name]
    fn = MathAnswerReward(timeout_s=5.0)
    start = time.perf_counter()
    r = fn(["q"], [completion], ["12"])
    assert time.perf_counter() - start < FAST_S
    assert r.tolist() == [0.0]
    assert fn.last_timeouts == 0


def test_hostile_specifics():
    assert extract_boxed(HOSTILE["10k nested braces"]) is None  # depth limit
    assert too_costly("9" * 10_000) and not too_costly("9" * 100)  # digit cap
    # the NUL byte is not silently dropped: "4\x00" is not 4
    assert math_reward(HOSTILE["NUL in number"], "4") == 0.0
    # the power tower is never evaluated: 9**9 is not its value, 9 is just its last number
    assert math_reward("9**9", "387420489") == 0.0
    assert math_reward(HOSTILE["boxed power tower"], "9**9**9") == 0.0  # refused before parsing, even when equal
    # too long to trust even when equal
    assert math_reward("9" * 10_000, "9" * 10_000) == 0.0


# ------------------------------------------------------------------ property tests

TOKENS = ["\\boxed{", "\\boxed", "\\frac", "\\dfrac", "\\left", "\\text{", "{", "}", "-", "+", "."]
TOKENS += [",", "/", "%", "$", " ", "x=", "0", "1", "7", "99", "\x00", "é"]
structured = st.lists(st.sampled_from(TOKENS), max_size=60).map("".join)
any_text = st.one_of(st.text(max_size=300), structured)
plain = st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=50)


def _timed(func, *args):
    start = time.perf_counter()
    result = func(*args)
    assert time.perf_counter() - start < FAST_S
    return result


@settings(max_examples=300, deadline=None)
@given(any_text, any_text)
def test_parsers_never_raise(completion, answer):
    boxed = _timed(extract_boxed, completion)
    assert boxed is None or isinstance(boxed, str)
    final = _timed(extract_final_answer, completion)
    assert final is None or isinstance(final, str)
    assert isinstance(_timed(too_costly, completion), bool)
    assert isinstance(_timed(answers_equivalent, completion, answer), bool)
    r = _timed(MathAnswerReward(timeout_s=0), ["q"], [completion], [answer])
    assert r.shape == (1,) and r.item() in (0.0, 1.0)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**30), 10**30), plain, plain)
def test_boxed_integer_round_trips(n, prefix, suffix):
    completion = f"{prefix}\\boxed{{{n}}}{suffix}"
    assert extract_boxed(completion) == str(n)
    assert MathAnswerReward(timeout_s=0).is_correct("q", completion, str(n))
    assert MathAnswerReward(timeout_s=0).is_correct("q", f"\\boxed{{{n:,}}}", str(n))  # thousands commas
    assert not MathAnswerReward(timeout_s=0).is_correct("q", completion, str(n + 1))


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**30), 10**30), plain)
def test_last_number_round_trips(n, prefix):
    assert extract_final_answer(f"{prefix} so the answer is {n}") == str(n)


# ------------------------------------------------------------------ score_safely


def test_score_safely_ok_and_list_conversion():
    r, n_err = score_safely(ExactAnswerReward(), ["p", "p"], ["a", "b"], ["a", "a"])
    assert r.tolist() == [1.0, 0.0] and n_err == 0
    r, n_err = score_safely(lambda p, c, a: [1, 0.5], ["p", "p"], ["a", "b"], ["a", "a"])
    assert isinstance(r, torch.Tensor) and r.dtype == torch.float32 and r.tolist() == [1.0, 0.5]
    r, _ = score_safely(lambda p, c, a: (True, False), ["p", "p"], ["a", "b"], ["a", "a"])
    assert r.dtype == torch.float32 and r.tolist() == [1.0, 0.0]
    r, n_err = score_safely(lambda p, c, a: torch.tensor([3], dtype=torch.float64), ["p"], ["a"], ["a"])
    assert r.dtype == torch.float32 and r.tolist() == [3.0]
    assert score_safely(ExactAnswerReward(), [], [], []) == (pytest.approx(torch.zeros(0)), 0)


def test_score_safely_rejects_bad_arguments():
    with pytest.raises(ValueError):
        score_safely(ExactAnswerReward(), ["p"], ["a"], ["a"], on_error="ignore")
    with pytest.raises(ValueError):
        score_safely(ExactAnswerReward(), ["p"], ["a", "b"], ["a"])


def picky(prompts, completions, answers):
    """Raises if any completion contains 'bad', else scores 1."""
    for c in completions:
        if "bad" in c:
            raise KeyError(f"cannot score {c}")
    return torch.ones(len(completions))


def test_score_safely_raising_fn_raise_mode_names_item():
    with pytest.raises(RewardError) as info:
        score_safely(picky, ["p0", "p1", "p2"], ["good", "bad one", "good"], ["x"] * 3)
    msg = str(info.value)
    assert "item 1 of 3" in msg and "'p1'" in msg and "'bad one'" in msg and "KeyError" in msg
    assert isinstance(info.value.__cause__, KeyError)


def test_score_safely_raising_fn_zero_mode_only_bad_items():
    r, n_err = score_safely(picky, ["p"] * 4, ["good", "bad", "good", "bad"], ["x"] * 4, on_error="zero")
    assert r.tolist() == [1.0, 0.0, 1.0, 0.0] and n_err == 2

    def always(p, c, a):
        raise RuntimeError("boom")

    r, n_err = score_safely(always, ["p"] * 3, ["a"] * 3, ["x"] * 3, on_error="zero")
    assert r.tolist() == [0.0, 0.0, 0.0] and n_err == 3


def test_score_safely_truncates_long_text_in_message():
    with pytest.raises(RewardError) as info:
        score_safely(picky, ["p" * 5000], ["bad" + "c" * 5000], ["x"])
    msg = str(info.value)
    assert len(msg) < 1000 and "[5000 chars]" in msg and "[5003 chars]" in msg


def test_score_safely_non_finite_entries():
    def nan_fn(p, c, a):
        return torch.tensor([1.0, math.nan, math.inf, -math.inf, 0.5])

    args = (["p"] * 5, list("abcde"), ["x"] * 5)
    r, n_err = score_safely(nan_fn, *args, on_error="zero")
    assert r.tolist() == [1.0, 0.0, 0.0, 0.0, 0.5] and n_err == 3
    with pytest.raises(RewardError, match=r"item 1 of 5: non-finite reward nan.*completion='b'"):
        score_safely(nan_fn, *args)


@pytest.mark.parametrize(
    "output",
    [torch.ones(3, 1), torch.ones(4), torch.ones(2), torch.tensor(1.0), ["a", "b", "c"], [1, None, 2]],
    ids=["column", "too long", "too short", "scalar", "strings", "None entry"],
)
def test_score_safely_wrong_shape_or_type(output):
    fn = lambda p, c, a: output  # noqa: E731  (same output for the item-by-item retry)
    r, n_err = score_safely(fn, ["p"] * 3, ["a"] * 3, ["x"] * 3, on_error="zero")
    assert r.tolist() == [0.0, 0.0, 0.0] and n_err == 3
    with pytest.raises(RewardError):
        score_safely(fn, ["p"] * 3, ["a"] * 3, ["x"] * 3)


def test_score_safely_batch_only_failure():
    one = lambda p, c, a: torch.ones(1)  # noqa: E731  (right only for batches of 1)
    with pytest.warns(RuntimeWarning, match="not item by item"):
        r, n_err = score_safely(one, ["p"] * 3, ["a"] * 3, ["x"] * 3, on_error="zero")
    assert r.tolist() == [1.0, 1.0, 1.0] and n_err == 0
    with pytest.raises(RewardError, match="on no single item"):
        score_safely(one, ["p"] * 3, ["a"] * 3, ["x"] * 3)


def test_score_safely_timeout():
    def hang(p, c, a):
        time.sleep(0.5)
        return torch.ones(len(c))

    start = time.perf_counter()
    r, n_err = score_safely(hang, ["p"] * 2, ["a"] * 2, ["x"] * 2, on_error="zero", timeout_s=0.05)
    assert time.perf_counter() - start < 0.3
    assert r.tolist() == [0.0, 0.0] and n_err == 2
    with pytest.raises(RewardError, match="exceeded timeout_s=0.05"):
        score_safely(hang, ["p"], ["a"], ["x"], timeout_s=0.05)
    # within the limit: normal result
    r, n_err = score_safely(picky, ["p"], ["a"], ["x"], timeout_s=1.0)
    assert r.tolist() == [1.0] and n_err == 0


def test_score_safely_fn_own_timeout_error_is_not_a_hang():
    def own(p, c, a):
        raise TimeoutError("mine")

    with pytest.raises(RewardError, match="mine") as info:
        score_safely(own, ["p"], ["a"], ["x"], timeout_s=1.0)
    assert "exceeded" not in str(info.value)


def test_score_safely_with_math_reward():
    r, n_err = score_safely(
        MathAnswerReward(), ["q"] * 3, [r"\boxed{\frac{1}{2}}", HOSTILE["1MB text"], "7"], ["0.5", "1", "8"]
    )
    assert r.tolist() == [1.0, 0.0, 0.0] and n_err == 0


# ------------------------------------------------------------------ TRL-style reward functions, several with weights
# Written the way TRL's GRPOTrainer documentation shows reward functions: completions plus the data set's
# columns as keyword arguments, one float (or None: does not apply) per completion.


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def boxed_matches(completions, ground_truth, **kwargs):
    import re

    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def only_multiple_choice(completions, kind, **kwargs):
    """Applies to multiple-choice rows only (None elsewhere)."""
    return [float("(" in c) if k == "choice" else None for c, k in zip(completions, kind)]


def test_trl_style_function_is_called_as_trl_calls_it():
    from lit_align.rewards import RewardSet

    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        return [0.0] * len(completions)

    rewards = RewardSet([spy, boxed_matches, reward_len])
    out = rewards.score(
        ["p1", "p2"],
        [r"so \boxed{4}", r"\boxed{5}" + "x" * 30],
        ["4", "6"],
        completion_ids=[[1, 2], [3]],
        columns={"ground_truth": ["4", "6"], "source": ["a", "b"], "prompt": ["never", "passed"]},
    )
    own = {key: seen.pop(key) for key in ("trainer_state", "log_metric", "log_extra")}  # TRL passes them too
    assert own["trainer_state"].global_step == 0 and callable(own["log_metric"]) and callable(own["log_extra"])
    assert seen == {
        "prompts": ["p1", "p2"],
        "completions": [r"so \boxed{4}", r"\boxed{5}" + "x" * 30],
        "completion_ids": [[1, 2], [3]],
        "ground_truth": ["4", "6"],
        "source": ["a", "b"],
    }
    assert rewards.names == ["spy", "boxed_matches", "reward_len"]
    assert out.per_function[:, 1].tolist() == [1.0, 0.0]
    assert out.per_function[:, 2].tolist() == [-8.0, -19.0]
    assert out.total.tolist() == [-7.0, -19.0] and out.n_errors == 0


def test_two_weighted_rewards_and_a_none_give_the_right_total():
    from lit_align.rewards import RewardSet

    rewards = RewardSet([boxed_matches, only_multiple_choice], weights=[2.0, 0.5])
    completions = [r"\boxed{7}", r"\boxed{(B)}", r"\boxed{8}", "(C)"]
    out = rewards.score(
        ["q"] * 4,
        completions,
        [""] * 4,
        columns={"ground_truth": ["7", "(B)", "7", "(B)"], "kind": ["number", "choice", "number", "choice"]},
    )
    per = out.per_function
    assert per[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert torch.isnan(per[[0, 2], 1]).all() and per[[1, 3], 1].tolist() == [1.0, 1.0]  # None: not applicable
    assert out.total.tolist() == [2.0, 2.5, 0.0, 0.5]  # 2 * match + 0.5 * choice, the None skipped


def test_reward_set_errors_follow_the_reward_errors_policy():
    from lit_align.rewards import RewardSet

    def fails_on_bad(completions, **kwargs):
        if any("bad" in c for c in completions):
            raise KeyError("cannot score")
        return [1.0] * len(completions)

    def gives_nan(completions, **kwargs):
        return [float("nan") if c == "nan" else 0.5 for c in completions]

    rewards = RewardSet([fails_on_bad, gives_nan])
    out = rewards.score(["q"] * 3, ["ok", "bad", "nan"], [""] * 3, on_error="zero")
    assert out.per_function[:, 0].tolist() == [1.0, 0.0, 1.0]  # only the failing item, found item by item
    assert out.per_function[:, 1].tolist() == [0.5, 0.5, 0.0]
    assert out.n_errors == 2 and out.total.tolist() == [1.5, 0.5, 1.0]
    with pytest.raises(RewardError, match=r"fails_on_bad failed on item 1 of 3.*KeyError.*completion='bad'"):
        rewards.score(["q"] * 3, ["ok", "bad", "nan"], [""] * 3)
    with pytest.raises(RewardError, match=r"gives_nan failed on item 0 of 1: non-finite reward nan"):
        rewards.score(["q"], ["nan"], [""])


def test_reward_set_mixes_lit_align_rewards_and_checks_its_arguments():
    from lit_align.rewards import RewardSet

    rewards = RewardSet([MathAnswerReward(), reward_len, MathAnswerReward(correct_reward=2.0)], [1.0, 0.0, 1.0])
    assert rewards.names == ["MathAnswerReward", "reward_len", "MathAnswerReward_2"]
    out = rewards.score(["q"] * 2, [r"\boxed{\$18}", "19"], ["18", "18"])
    assert out.total.tolist() == [3.0, 0.0]
    correct, _ = rewards.correct(["q"] * 2, [r"\boxed{\$18}", "19"], ["18", "18"], out)
    assert correct.tolist() == [True, False]  # the first RewardFunction's verdict
    with pytest.raises(ValueError, match=r"model.reward_weights has 1 entries but model.reward has 3 functions"):
        RewardSet(rewards.functions, [1.0])
    with pytest.raises(ValueError, match=r"model.reward_weights=.*finite"):
        RewardSet([reward_len], [float("nan")])
    with pytest.raises(ValueError, match="not callable"):
        RewardSet([reward_len, "lit_align.rewards.MathAnswerReward"])


def test_think_format_reward():
    from lit_align.rewards import ThinkFormatReward

    fn = ThinkFormatReward()
    completions = [
        "<think>\n3 * 4 = 12\n</think>\nThe answer is \\boxed{12}",  # reasoning, then the answer
        " <think>ok</think>12",  # leading whitespace is fine
        "<think>no answer after it</think>  ",  # nothing after the reasoning
        "12 <think>late</think> 12",  # does not start with the reasoning
        "<think>a</think> 12 <think>again</think>",  # a second reasoning block
        "<think>unclosed 12",
    ]
    assert fn(completions=completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    tagged = ThinkFormatReward(think_tag="reasoning", answer_tag="answer", reward=0.5)
    assert tagged(
        completions=[
            "<reasoning>x</reasoning><answer>12</answer>",
            "<reasoning>x</reasoning>12",
            "<think>x</think><answer>12</answer>",
        ]
    ) == [0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="ThinkFormatReward.think_tag='<think>'"):
        ThinkFormatReward(think_tag="<think>")


def test_soft_overlong_punishment_follows_dapo():
    from lit_align.rewards import SoftOverlongPunishment

    fn = SoftOverlongPunishment(max_new_tokens=100, buffer=20, penalty=2.0)
    lengths = [10, 80, 90, 95, 100, 130]
    # 0 up to L_max - L_cache = 80, then linear to -penalty at L_max, -penalty beyond
    assert fn(completion_ids=[[1] * n for n in lengths]) == pytest.approx([0.0, 0.0, -1.0, -1.5, -2.0, -2.0])
    trl_rewards = pytest.importorskip("trl.rewards")
    theirs = trl_rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    ours = SoftOverlongPunishment(max_new_tokens=100, buffer=20)  # penalty 1: TRL's
    ids = [[1] * n for n in lengths]
    assert ours(completion_ids=ids) == pytest.approx(theirs(completion_ids=ids))
    with pytest.raises(ValueError, match=r"SoftOverlongPunishment.buffer=0"):
        SoftOverlongPunishment(max_new_tokens=100, buffer=0)


def test_plain_three_argument_callables_keep_lit_aligns_interface():
    from lit_align.rewards import RewardSet, takes_answers

    def lit(prompts, completions, answers):
        return [float(c == a) for c, a in zip(completions, answers)]

    def trl(prompts, completions, **kwargs):  # keyword arguments: called as TRL calls it
        return [2.0] * len(completions)

    assert takes_answers(lit) and takes_answers(ExactAnswerReward()) and not takes_answers(trl)
    assert not takes_answers(reward_len)
    assert not takes_answers(lambda prompts, completions, answers, **kwargs: None)  # TRL-style, with an answers column
    out = RewardSet([lit, trl]).score(["q", "q"], ["4", "5"], ["4", "4"])
    assert out.total.tolist() == [3.0, 2.0]
    assert RewardSet([trl, lit]).correct(["q", "q"], ["4", "5"], ["4", "4"])[0].tolist() == [True, False]


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        # without a box, a number inside the last math span is never taken alone (a fraction's denominator)
        (r"So $x = \frac{1}{4}$.", "4", 0.0),
        (r"So $x = \frac{1}{4}$.", "0.25", 1.0),
        (r"Therefore \[ x = \frac{3}{2} \]", "2", 0.0),
        (r"Therefore \[ x = \frac{3}{2} \]", "1.5", 1.0),
        (r"The final answer is \[ \frac{3}{2} \]", "3", 0.0),
        (r"The final answer is \[ x = \frac{3}{2} \]", "1.5", 1.0),
        (r"Thus $\frac{5}{8}$ of the pie", r"\frac58", 1.0),
        ("We get $12$ apples and 3 pears", "3", 1.0),  # the last number lies outside the span
        # a typeset minus sign (U+2212) is a minus
        ("It is \u22127 degrees.", "7", 0.0),
        ("It is \u22127 degrees.", "-7", 1.0),
        ("\\boxed{\u22123}", "-3", 1.0),
    ],
)
def test_unboxed_math_spans_and_the_unicode_minus(completion, answer, expected):
    assert math_reward(completion, answer) == expected


# Issue 22, item 10. Math-Verify rounds numbers to six decimal places before comparing them, so any two
# values below 5e-7 compared equal (Math-Verify issue 14); numbers that Math-Verify calls equal must also
# agree to a relative 5e-6 (six significant digits). Each listed example, more of its kind, and equal
# values that must stay equal.
@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (r"\boxed{\frac{1}{2^{99}}}", r"\frac{1}{2^{98}}", 0.0),  # Math-Verify 14
        (r"\boxed{0.0000001}", "0.0000002", 0.0),
        (r"\boxed{0.0000004}", "-0.0000004", 0.0),
        (r"\boxed{0.0000123}", "0.0000124", 0.0),  # more: small values that round alike
        (r"\boxed{0.0000003\%}", r"0.0000001\%", 0.0),  # a percentage
        (r"\boxed{x = 0.0000001}", "0.0000002", 0.0),  # an assignment's value
        (r"\boxed{(0.0000001, 1)}", "(0.0000002, 1)", 0.0),  # an interval's end
        (r"\boxed{\{0.0000001, 2\}}", r"\{0.0000002, 2\}", 0.0),  # a set's member
        # equal values stay equal at every size; six-place roundings of ordinary numbers stay right
        (r"\boxed{0.0000001}", r"\frac{1}{10^{7}}", 1.0),
        (r"\boxed{2^{-99}}", r"\frac{1}{2^{99}}", 1.0),
        (r"\boxed{1.5 \times 10^{-9}}", "0.0000000015", 1.0),
        (r"\boxed{x = 0.0000002}", "0.0000002", 1.0),
        (r"\boxed{(0.0000001, \infty)}", r"(10^{-7}, \infty)", 1.0),
        (r"\boxed{0.333333}", r"\frac{1}{3}", 1.0),  # relative difference 1e-6
        (r"\boxed{0.142857}", r"\frac{1}{7}", 1.0),
        (r"\boxed{1.414214}", r"\sqrt{2}", 1.0),
        (r"\boxed{0}", "0", 1.0),
        (r"\boxed{0.33333}", r"\frac{1}{3}", 0.0),  # still too coarse, as before
    ],
)
def test_tiny_numbers_are_compared_relatively(completion, answer, expected):
    assert math_reward(completion, answer) == expected


# Answers written without a leading zero (".5", "-.25", "$.75"): the last-number and answer-statement
# extraction read ".5" as 5, so "The probability is .5" scored 0 against 0.5 and 1 against 5.
@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("The probability is .5", "0.5", 1.0),
        ("The probability is .5", "5", 0.0),
        ("so x = -.25", "-0.25", 1.0),
        ("so x = -.25", "25", 0.0),
        ("It costs $.75 in all", "0.75", 1.0),
        ("The answer is .125 of the total", r"\frac{1}{8}", 1.0),
        (r"\boxed{.5\%}", "0.005", 1.0),
        (r"\boxed{-.25}", r"-\frac{1}{4}", 1.0),
        ("I think 0.5", ".5", 1.0),  # a reference without the leading zero
        # a sentence's full stop is not a decimal point
        ("So the answer is 5.", "5", 1.0),
        ("We have 12 apples. 3 are left.", "3", 1.0),
        ("It came to 7.", "0.7", 0.0),
        ("Version 2.5 gives 4", "4", 1.0),
    ],
)
def test_numbers_without_a_leading_zero(completion, answer, expected):
    assert math_reward(completion, answer) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("The probability is .5", ".5"), ("so x = -.25", "-.25"), ("It costs $.75", ".75"), ("It came to 7.", "7")],
)
def test_extraction_keeps_the_point_of_a_number_without_a_leading_zero(text, expected):
    assert extract_final_answer(text) == expected


# ------------------------------------------------------------------ what TRL passes and awaits (issue 22, item 9)


async def async_boxed_matches(completions, ground_truth, **kwargs):
    """An ``async def`` reward function (TRL issue 4130: an LLM judge awaited over HTTP)."""
    import asyncio

    await asyncio.sleep(0.01)
    return boxed_matches(completions, ground_truth)


class AsyncJudge:
    """A callable object whose ``__call__`` is async (TRL's is_async_callable covers it)."""

    async def __call__(self, completions, **kwargs):
        if any("bad" in c for c in completions):
            raise ConnectionError("judge unavailable")
        return [0.5] * len(completions)


def test_async_reward_functions_are_awaited_with_the_error_policy():
    import functools

    from lit_align.rewards import RewardSet

    columns = {"ground_truth": ["4", "6"]}
    rewards = RewardSet([async_boxed_matches, AsyncJudge(), functools.partial(async_boxed_matches), reward_len])
    out = rewards.score(["p1", "p2"], [r"so \boxed{4}", r"\boxed{5}"], ["4", "6"], columns=columns)
    assert out.per_function[:, 0].tolist() == [1.0, 0.0] and out.per_function[:, 2].tolist() == [1.0, 0.0]
    assert out.per_function[:, 1].tolist() == [0.5, 0.5] and out.n_errors == 0
    assert rewards.names == ["async_boxed_matches", "AsyncJudge", "async_boxed_matches_2", "reward_len"]
    # reward_errors zero: only the failing item scores 0 (found item by item), and it is counted
    out = RewardSet([AsyncJudge()]).score(["q"] * 3, ["ok", "bad", "ok"], [""] * 3, on_error="zero")
    assert out.per_function[:, 0].tolist() == [0.5, 0.0, 0.5] and out.n_errors == 1
    with pytest.raises(RewardError, match=r"AsyncJudge failed on item 1 of 3: ConnectionError"):
        RewardSet([AsyncJudge()]).score(["q"] * 3, ["ok", "bad", "ok"], [""] * 3)

    # lit-align's interface, async: awaited too
    async def lit(prompts, completions, answers):
        return [float(c == a) for c, a in zip(completions, answers)]

    assert RewardSet([lit]).score(["q"] * 2, ["4", "5"], ["4", "4"]).total.tolist() == [1.0, 0.0]


def test_async_reward_functions_run_concurrently_on_one_lasting_event_loop():
    """Two functions that each wait for the other finish only if they run at the same time; both see the same
    event loop on every call (a client bound to the loop, e.g. openai.AsyncOpenAI, keeps working)."""
    import asyncio

    from lit_align.rewards import RewardSet

    events: dict[str, asyncio.Event] = {}
    loops = []

    def waits_for(mine: str, theirs: str):
        async def fn(completions, **kwargs):
            loops.append(asyncio.get_running_loop())
            for name in (mine, theirs):
                events.setdefault(name, asyncio.Event())
            events[mine].set()
            await events[theirs].wait()
            return [1.0] * len(completions)

        fn.__name__ = f"waits_for_{theirs}"
        return fn

    for _ in range(2):
        events.clear()
        out = RewardSet([waits_for("a", "b"), waits_for("b", "a")]).score(["q"], ["x"], [""], timeout_s=5.0)
        assert out.total.tolist() == [2.0]
    assert len(loops) == 4 and all(loop is loops[0] for loop in loops)


@pytest.mark.parametrize("kind", ["awaits", "blocks"])
def test_async_reward_functions_keep_the_time_limit(kind):
    """An async function that awaits too long is cancelled at timeout_s; one that blocks its event loop (time.sleep
    in an ``async def``) is abandoned at 2 x timeout_s + 1 s, and the next call runs on a fresh loop."""
    import asyncio

    from lit_align.rewards import RewardSet

    async def slow(completions, **kwargs):
        if kind == "awaits":
            await asyncio.sleep(30)
        else:
            time.sleep(3)
        return [1.0] * len(completions)

    async def quick(completions, **kwargs):
        return [1.0] * len(completions)

    start = time.perf_counter()
    out = RewardSet([slow, quick]).score(["q"] * 2, ["x", "y"], [""] * 2, on_error="zero", timeout_s=0.3)
    assert time.perf_counter() - start < 2.5
    assert out.per_function[:, 0].tolist() == [0.0, 0.0]
    if kind == "awaits":  # the other function, on the same loop, still scored
        assert out.per_function[:, 1].tolist() == [1.0, 1.0] and out.n_errors == 2
    else:  # a blocked loop stalls every async function on it (as in TRL): all of them time out
        assert out.per_function[:, 1].tolist() == [0.0, 0.0] and out.n_errors == 4
    with pytest.raises(RewardError, match=r"slow exceeded timeout_s=0.3"):
        RewardSet([slow]).score(["q"], ["x"], [""], timeout_s=0.3)
    assert RewardSet([quick]).score(["q"], ["x"], [""], timeout_s=1.0).total.tolist() == [1.0]


def test_async_reward_functions_score_from_a_running_event_loop_and_from_a_thread():
    import asyncio
    import threading

    from lit_align.rewards import RewardSet

    rewards = RewardSet([async_boxed_matches])
    args = (["q"], [r"\boxed{4}"], ["4"])

    async def inside_a_loop():  # a notebook's or an async server's thread
        return rewards.score(*args, columns={"ground_truth": ["4"]}, timeout_s=5.0).total.tolist()

    assert asyncio.run(inside_a_loop()) == [1.0]
    got = []
    worker = threading.Thread(target=lambda: got.append(rewards.score(*args, columns={"ground_truth": ["4"]})))
    worker.start()
    worker.join(10)
    assert got[0].total.tolist() == [1.0]


def test_trl_functions_get_trainer_state_log_metric_and_log_extra():
    """TRL passes every reward function trainer_state (transformers' TrainerState), log_metric and log_extra (TRL
    issue 3668 / PR 3669: curricula by step); a function that names none of them and takes no **kwargs gets none."""
    from transformers import TrainerState

    from lit_align.rewards import RewardSet

    seen = {}

    def by_step(completions, trainer_state, log_metric, log_extra, **kwargs):
        seen.update(kwargs)
        log_metric("step_seen", trainer_state.global_step)
        log_metric("step_seen", trainer_state.global_step + 1)
        log_extra("chars", [len(c) for c in completions])
        return [min(trainer_state.global_step / max(trainer_state.max_steps, 1), 1.0)] * len(completions)

    def plain(prompts, completions, completion_ids):  # named arguments only: as before
        return [0.0] * len(completions)

    rewards = RewardSet([by_step, plain])
    state = TrainerState(global_step=5, max_steps=10, epoch=0.5)
    out = rewards.score(["q"] * 2, ["ab", "c"], [""] * 2, columns={"trainer_state": ["no", "no"]}, trainer_state=state)
    assert out.total.tolist() == [0.5, 0.5] and seen == {"prompts": ["q", "q"], "completion_ids": [[], []]}
    assert out.logged == {"step_seen": [5.0, 6.0]} and out.extra == {"chars": [2, 1]}
    # without a run (the set-up self-check, a module driven by hand): a fresh TrainerState, step 0
    assert RewardSet([by_step]).score(["q"], ["x"], [""]).logged == {"step_seen": [0.0, 1.0]}

    def bad_metric(completions, log_metric, **kwargs):
        log_metric("ratio", "high")
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"bad_metric failed .*log_metric\('ratio', 'high'\).*a real number"):
        RewardSet([bad_metric]).score(["q"], ["x"], [""])
