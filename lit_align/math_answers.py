"""Math answers: finding the final answer in a completion, and checking it with Math-Verify.

Extraction is lit-align's own and bounded (linear-time regular expressions, one brace scan):

1. the content of the last complete ``\\boxed{...}``;
2. else the answer after the last explicit answer statement ("the answer is 72 because 3 < 4",
   "Final answer: (B)", GSM8K's "#### 1,234");
3. else the last number in the text.

Digit groups separated by a space, a thin space, ``\\,`` or ``{,}`` ("1 000", "1\\,000") are one
number. Equivalence is Hugging Face's Math-Verify (``math_verify.parse`` with LaTeX extraction only,
``math_verify.verify``): LaTeX and plain answers, sympy equivalence, sets, intervals, percentages,
units and ``\\text{}`` words, multiple-choice letters; numbers it calls equal must also agree to a
relative :data:`REL_TOL` (:func:`numbers_close`: its six decimal places let any two values under 5e-7
match). A number may start at its decimal point (".5", "-.25", "$.75").

Security: completions are untrusted model output. They are never passed to ``eval``: Math-Verify's
expression extractor (sympy's ``parse_expr``, which evaluates Python) is never used, only its LaTeX
parser. Sympy evaluates integer powers and factorials in C without releasing the GIL, which no
thread time limit can interrupt, so :func:`too_costly` refuses answers whose evaluation could
explode (towers of powers, big exponents or factorials, sums and products) before Math-Verify
sees them. Math-Verify's own time limits use ``signal.alarm`` (main thread only) and are switched
off; :class:`lit_align.rewards.MathAnswerReward` puts a per-answer time limit around each check
that works in any thread.
"""

from __future__ import annotations

import functools
import logging
import re

__all__ = [
    "MAX_ANSWER_DIGITS",
    "MAX_BRACE_DEPTH",
    "REL_TOL",
    "ZERO_TOL",
    "answers_equivalent",
    "extract_answer_statement",
    "extract_boxed",
    "extract_final_answer",
    "numbers_close",
    "too_costly",
]

MAX_BRACE_DEPTH = 64
"""Brace nesting deeper than this makes :func:`extract_boxed` give up."""
MAX_ANSWER_DIGITS = 100
"""An answer holding a number with more digits than this is never checked (it scores wrong)."""
REL_TOL = 5e-6
"""Numbers Math-Verify calls equal must also agree to this relative difference, ``|a - b| <= REL_TOL *
max(|a|, |b|)``: six significant digits (a six-decimal rounding of a number in [0.1, 1) is within it, as
0.333333 of 1/3 at 1e-6), where Math-Verify's six decimal places alone let any two values under 5e-7 match."""
ZERO_TOL = 1e-12
"""Where one number is exactly zero a relative tolerance cannot hold: the other must be within this of it."""
MAX_RESULT_DIGITS = 100_000
"""Bound on the digits a power in an answer may produce: (digits in the answer) x (product of exponents)."""

_BOXED_TOKEN_RE = re.compile(r"\\boxed\s*\{|[{}]")
# a number: optional minus (not after a word char / closing bracket, so "5-3" ends in "3"), digits in
# groups of three separated by a comma, a space, a thin space, "\," or "{,}", or plain digits; decimals; "/b"
_GROUP_SEP = r"(?:\{,\}|\\,|\\ |[ \u2009\u202f])"
_SEP = rf"(?:,|{_GROUP_SEP})"
# a number may start at its decimal point (".5", "-.25", "$.75"), where no digit, letter or point precedes it
_NUMBER_RE = re.compile(
    rf"(?:(?<![\w)\]}}])-)?"
    rf"(?:(?:[0-9]{{1,3}}(?:{_SEP}[0-9]{{3}})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?|(?<![\w.])\.[0-9]+)(?:/[0-9]+)?"
)
# the decimal point of a number written without its leading zero: ".5" -> "0.5", "-.25" -> "-0.25", "\$.75"
_LEADING_POINT_RE = re.compile(r"(?<![\w.)\]}])\.(?=[0-9])")
_GROUP_SEP_RE = re.compile(rf"(?<=[0-9]){_GROUP_SEP}(?=[0-9]{{3}}(?![0-9]))")
# "answer is", "final answer:", "answer =", GSM8K's "####"
_STATEMENT_RE = re.compile(r"(?i:\banswer\b\s*(?:is\b|was\b|:|=)\s*:?)|####")
_CHOICE_RE = re.compile(r"\(?([A-J])\)?(?![\w])")
# a math span: $...$, \(...\) or \[...\] (at most 200 characters inside)
_INLINE_MATH_RE = re.compile(
    r"\$([^$\n]{1,200})\$|\\\(((?:(?!\\\)).){1,200})\\\)|\\\[((?:(?!\\\]).){1,200}?)\\\]", re.DOTALL
)
_HEAVY_RE = re.compile(r"\\(?:sum|prod|coprod|int|iint|iiint|oint|lim|bigcup|bigcap)(?![a-zA-Z])")
_BINOM_RE = re.compile(r"\\[dt]?binom|\\choose")
_DIGITS_RE = re.compile(r"[0-9]+")


def extract_boxed(text: str, max_depth: int = MAX_BRACE_DEPTH) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in ``text``, or None.

    Braces are matched in one linear scan, so nested braces are kept
    (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``). "Last" is the box opened
    last; unclosed boxes are ignored; nesting deeper than ``max_depth`` -> None.
    """
    stack: list[int] = []  # per open brace: content start if it opens a box, else -1
    best: tuple[int, int] | None = None
    for m in _BOXED_TOKEN_RE.finditer(text):
        token = m.group()
        if token == "}":
            if stack:
                start = stack.pop()
                if start >= 0 and (best is None or start > best[0]):
                    best = (start, m.start())
        elif len(stack) >= max_depth:
            return None
        else:
            stack.append(-1 if token == "{" else m.end())
    return None if best is None else text[best[0] : best[1]]


def _span_answer(span: re.Match) -> str:
    """A math span's content, right of its last "=" (``x = \\frac{3}{2}`` -> ``\\frac{3}{2}``)."""
    content = next(g for g in span.groups() if g is not None)
    return content.rsplit("=", 1)[-1].strip()


def _last_number(text: str) -> str | None:
    """The last number in ``text``; where it lies inside the last math span (``$x = \\frac{1}{4}$``,
    ``\\[ \\frac{3}{2} \\]``), that span's answer instead, so a fraction's denominator is never the answer."""
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    if last is None:
        return None
    span = None
    for span in _INLINE_MATH_RE.finditer(text):
        pass
    if span is not None and span.start() <= last.start() < span.end():
        return _span_answer(span) or last.group()
    return last.group()


def extract_answer_statement(text: str, window: int = 100) -> str | None:
    """The answer after the last explicit answer statement ("answer is", "answer:", "answer =",
    "####"), or None: what follows it on the same line (at most ``window`` characters) is read as an
    inline math span (``$...$``, ``\\(...\\)``), else a multiple-choice letter (``B``, ``(B)``),
    else its first number. "The answer is 72 because 3 < 4" -> ``"72"``."""
    last = None
    for last in _STATEMENT_RE.finditer(text):
        pass
    if last is None:
        return None
    segment = text[last.end() : last.end() + window].split("\n", 1)[0].strip().lstrip("*").strip()
    math_span = _INLINE_MATH_RE.match(segment)
    if math_span is not None:
        return _span_answer(math_span)
    choice = _CHOICE_RE.match(segment)
    if choice is not None:
        return choice.group(1)
    number = _NUMBER_RE.search(segment)
    return None if number is None else number.group()


def extract_final_answer(text: str) -> str | None:
    """The last ``\\boxed{...}`` content, else the answer of the last answer statement
    (:func:`extract_answer_statement`), else the last number in ``text``, else None."""
    text = text.replace("\u2212", "-")  # a typeset minus sign (U+2212) is a minus
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    stated = extract_answer_statement(text)
    return stated if stated is not None else _last_number(text)


def _join_digit_groups(answer: str) -> str:
    """``"1 000"``, ``"1\\,000"`` -> ``"1000"`` (separators between groups of three digits)."""
    return _GROUP_SEP_RE.sub("", answer)


def _exponent(text: str, start: int) -> str:
    """The exponent that begins at ``text[start]``: a brace group (bounded scan) or one token."""
    if start >= len(text):
        return ""
    if text[start] == "{":
        depth = 0
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start + 1 : i]
        return text[start + 1 :]
    m = re.compile(r"\s*(?:-?[0-9]+(?:\.[0-9]+)?|\\[a-zA-Z]+|.)").match(text, start)
    return m.group() if m else ""


def too_costly(answer: str) -> bool:
    """True when evaluating ``answer`` could take unbounded time or memory in sympy code that holds
    the GIL (big-integer powers and factorials): a number of more than :data:`MAX_ANSWER_DIGITS`
    digits; a power inside an exponent, or powers whose result could exceed
    :data:`MAX_RESULT_DIGITS` digits; a factorial of anything but a number below 1000; a binomial
    with an argument of five digits or more; sums, products, integrals, limits. Linear in
    ``len(answer)``; such answers score wrong."""
    digit_runs = [m.group() for m in _DIGITS_RE.finditer(answer)]
    if any(len(d) > MAX_ANSWER_DIGITS for d in digit_runs):
        return True
    if _HEAVY_RE.search(answer):
        return True
    if _BINOM_RE.search(answer) and any(len(d) > 4 for d in digit_runs):
        return True
    for m in re.finditer(r"(?<!\\)!(?!=)", answer):
        if not re.search(r"(?<![0-9.])[0-9]{1,3}\s*$", answer[: m.start()]):
            return True
    budget = 1
    for m in re.finditer(r"\^|\*\*", answer):
        exponent = _exponent(answer, m.end())
        if "^" in exponent or "**" in exponent or "!" in exponent or "\\exp" in exponent:
            return True
        rest = answer[m.end() + len(exponent) + (answer[m.end() : m.end() + 1] == "{") * 2 :].lstrip()
        if rest.startswith(("^", "**")):  # a**b**c, 9^9^9: a tower, right-associative
            return True
        for d in _DIGITS_RE.findall(exponent):
            budget *= max(int(d), 2)
            if budget > MAX_RESULT_DIGITS:
                return True
    total_digits = max(sum(map(len, digit_runs)), 1)
    return budget > 1 and total_digits * budget > MAX_RESULT_DIGITS


# ---------------------------------------------------------------- Math-Verify


class _DropTimeoutNotice(logging.Filter):
    """Math-Verify warns once that its signal-based timeouts are off: they are, on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutNotice())
    config = [math_verify.LatexExtractionConfig(boxed_match_priority=0)]
    return math_verify, config


def _parse(answer: str) -> list:
    """Math-Verify's parse of one answer (LaTeX extraction only: no ``parse_expr``, so no ``eval``),
    with the answer's string kept as a fallback for a plain string comparison."""
    math_verify, config = _math_verify()
    return math_verify.parse("\\boxed{" + answer + "}", config, fallback_mode="first_match", parsing_timeout=None)


@functools.lru_cache(maxsize=1)
def warm_up() -> None:
    """Import Math-Verify and run its LaTeX parser once (about a second, once per process), so that no
    per-answer time limit pays for it."""
    math_verify, _ = _math_verify()
    math_verify.verify(_parse("1"), _parse("1"), timeout_seconds=None)


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str) -> list:
    return _parse(reference)


def reference_answer(reference: str) -> str:
    """The answer a reference states: its last ``\\boxed{}`` content (MATH-style solutions), else
    the whole stripped reference (with GSM8K's worked solutions, set ``data.answer_pattern``)."""
    boxed = extract_boxed(reference) if "\\boxed" in reference else None
    return (reference if boxed is None else boxed).strip()


def _normalise(answer: str) -> str:
    """Digit groups joined ("1 000" -> "1000") and a leading zero put before a bare decimal point
    (".5" -> "0.5", "-.25" -> "-0.25"); a full stop after a number ("5.") is left alone."""
    return _LEADING_POINT_RE.sub("0.", _join_digit_groups(answer.strip()))


def _stated_numbers(expr) -> list | None:
    """The numbers a parsed answer states, in order: a number (a percentage included), an assignment's
    value (``x = 0.5``), an interval's ends, a tuple's or a set's members (a set's sorted by value). None
    for anything else (an expression with symbols, an equation, a matrix): no numeric check then."""
    import sympy

    if isinstance(expr, sympy.Eq) and isinstance(expr.lhs, sympy.Symbol):
        return _stated_numbers(expr.rhs)
    if isinstance(expr, sympy.Interval):
        parts = [expr.start, expr.end]
    elif isinstance(expr, (sympy.Tuple, sympy.FiniteSet)):
        parts = list(expr.args)
    elif isinstance(expr, sympy.Basic) and expr.is_number:
        return [expr]
    else:
        return None
    numbers = []
    for part in parts:
        found = _stated_numbers(part)
        if found is None:
            return None
        numbers += found
    if isinstance(expr, sympy.FiniteSet):
        try:
            numbers.sort(key=lambda x: complex(_value(x)).real)
        except (TypeError, ValueError, OverflowError):
            return None
    return numbers


def _value(x):
    """A number's value to 30 significant digits (a percentage's ``UnevaluatedExpr(1/100)`` evaluated)."""
    return x.doit().evalf(30)


def _close(a, b) -> bool:
    """Whether two numbers that Math-Verify calls equal are also within :data:`REL_TOL` of each other,
    relatively (within :data:`ZERO_TOL` where one is exactly zero). A percentage may stand for its number
    or its value (Math-Verify's ``50\\% = 50`` and ``50\\% = 0.5``). Anything that does not evaluate to two
    finite numbers passes (Math-Verify's verdict stands)."""
    from math_verify.grader import get_pct_val

    if a == b:
        return True
    for x in (a, get_pct_val(a)):
        for y in (b, get_pct_val(b)):
            if x is None or y is None:
                continue
            try:
                u, v = _value(x), _value(y)
                if not (u.is_finite and v.is_finite):
                    return True
                diff, small, large = abs(u - v), min(abs(u), abs(v)), max(abs(u), abs(v))
                if bool(diff <= (ZERO_TOL if small == 0 else REL_TOL * large)):
                    return True
            except (TypeError, ValueError, ArithmeticError):
                return True
    return False


def numbers_close(gold, pred) -> bool:
    """False where two parsed answers state numbers (:func:`_stated_numbers`) of which some pair differs by
    more than the relative tolerance (:func:`_close`); True otherwise, Math-Verify's verdict then standing.

    Math-Verify compares numbers rounded to six decimal places (``float_rounding=6``) or by a difference
    that sympy chops to zero below its precision, so any two values under 5e-7 compare equal:
    1/2^99 = 1/2^98, 0.0000001 = 0.0000002, 0.0000004 = -0.0000004 (Math-Verify issue 14). A relative
    tolerance holds at every size."""
    import sympy

    if not (isinstance(gold, sympy.Basic) and isinstance(pred, sympy.Basic)):
        return True
    if isinstance(pred, sympy.Eq) and not isinstance(gold, sympy.Eq):  # Math-Verify reads "x = 5" as 5 then
        pred = pred.rhs
    ours, theirs = _stated_numbers(gold), _stated_numbers(pred)
    if ours is None or theirs is None or len(ours) != len(theirs):
        return True
    return all(_close(a, b) for a, b in zip(ours, theirs))


def answers_equivalent(prediction: str, reference: str, max_chars: int = 200) -> bool:
    """Whether ``prediction`` (an extracted answer) equals ``reference`` by Math-Verify, numbers agreeing
    to a relative :data:`REL_TOL` besides (:func:`numbers_close`).

    Both sides are normalised first (digit groups joined, "1 000" -> "1000"; a bare decimal point given
    its zero, ".5" -> "0.5"); either side longer than ``max_chars`` characters, empty, or
    :func:`too_costly` is never equivalent. No time limit of its own: run it under one
    (``MathAnswerReward`` does).
    """
    prediction, reference = _normalise(prediction), _normalise(reference)
    for side in (prediction, reference):
        if not side or len(side) > max_chars or too_costly(side):
            return False
    math_verify, _ = _math_verify()
    gold, pred = _parse_reference(reference), _parse(prediction)
    if not gold or not pred:
        return False
    return bool(math_verify.verify(gold, pred, timeout_seconds=None)) and numbers_close(gold[0], pred[0])
