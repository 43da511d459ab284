"""The one validation style of lit-align's settings.

Every constructor checks its own arguments where they are parsed (its ``__init__``), before anything is
loaded, with :func:`check`: the choices of a ``Literal[...]`` argument come from its annotation (each
option list is written once, in the signature), ranges from a table of :class:`Rule` (``{name: rule}``).
A bad value is a ValueError naming the flag (``model.<name>`` / ``data.<name>``), its value and what is
allowed::

    model.epsilon_low=1.5 is out of range: it must be in [0, 1)
    model.reward_errors='ignore': choose one of ['raise', 'zero']
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass


def is_finite_number(v) -> bool:
    """A real number (not a bool) that is finite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_integer(v) -> bool:
    """An int (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Rule:
    """``holds(value)`` and the words for what is allowed."""

    holds: Callable[[object], bool]
    allowed: str


def integer(low: int = 0, optional: str | None = None, unit: str = "") -> Rule:
    """An integer >= ``low``; with ``optional``, also None (its meaning, e.g. "the whole batch")."""
    words = f"an integer >= {low}{unit}"
    if optional is None:
        return Rule(lambda v: is_integer(v) and v >= low, words)
    return Rule(lambda v: v is None or (is_integer(v) and v >= low), f"null ({optional}) or {words}")


def number(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    words: str | None = None,
) -> Rule:
    """A finite number within [low, high] (open ends as given)."""

    def holds(v) -> bool:
        if not is_finite_number(v):
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return not (high is not None and (v >= high if high_open else v > high))

    if words is None:
        if low is not None and high is not None:
            words = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            words = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            words = "a finite number"
    return Rule(holds, words)


def one_of(*choices) -> Rule:
    """One of ``choices`` (for arguments whose type is not a Literal, e.g. a dtype name)."""
    return Rule(lambda v: v in choices, f"one of {list(choices)}")


def literal_choices(fn: Callable) -> dict[str, tuple]:
    """{argument: its Literal's values} for the arguments of ``fn`` annotated ``Literal[...]``."""
    hints = typing.get_type_hints(fn)
    out = {}
    for name, hint in hints.items():
        if typing.get_origin(hint) is typing.Literal:
            out[name] = typing.get_args(hint)
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):  # Literal[...] | None
            args = typing.get_args(hint)
            literals = [a for a in args if typing.get_origin(a) is typing.Literal]
            if literals and all(a is type(None) or a in literals for a in args):
                out[name] = tuple(v for a in literals for v in typing.get_args(a)) + (None,)
    return out


def check(fn: Callable, args: dict, rules: dict[str, Rule] | None = None, prefix: str = "model") -> None:
    """Check ``args`` (``fn``'s arguments by name, e.g. ``locals()``) against the choices of ``fn``'s
    Literal annotations and the ``rules`` table.

    Raises:
        ValueError: ``<prefix>.<name>=<value>: choose one of [...]`` for a value outside its Literal;
            ``<prefix>.<name>=<value> is out of range: it must be <allowed>`` for a rule that fails
            (``prefix`` empty: the bare name, for a function's own arguments).
    """
    flag = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)  # noqa: E731
    for name, choices in literal_choices(fn).items():
        if name in args and args[name] not in choices:
            raise ValueError(f"{flag(name)}={args[name]!r}: choose one of {list(choices)}")
    for name, rule in (rules or {}).items():
        if name in args and not rule.holds(args[name]):
            if rule.allowed.startswith("one of "):
                raise ValueError(f"{flag(name)}={args[name]!r}: choose {rule.allowed}")
            raise ValueError(f"{flag(name)}={args[name]!r} is out of range: it must be {rule.allowed}")
