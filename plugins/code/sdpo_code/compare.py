"""Output comparison, as LiveCodeBench judges (``lcb_runner/evaluation/testing_util.py``).

stdin tests: both outputs are stripped and split into lines, each line stripped; the line counts must match;
a line matches when equal, or when both lines are whitespace-separated numbers that are equal as
`Decimal` (so ``1.0`` == ``1.00``, exactly as LCB). We are slightly more tolerant than LCB in one way: lines
whose tokens are equal but separated by different runs of whitespace match. An optional absolute/relative
float tolerance applies to tokens that are floats on the expected side.

functional tests: the returned value (encoded by the harness as plain JSON, tuples as lists, at most the
output limit in size and 500 levels deep) must ``==`` the expected JSON value. Both sides are built-in
objects decoded here, so no method of the program's runs; a value that does not decode is a wrong answer.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal, InvalidOperation
from typing import Any


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimal(token: str) -> Decimal | None:
    try:
        return Decimal(token)
    except (InvalidOperation, ValueError):
        return None


def _float_close(got: str, expected: str, tolerance: float) -> bool:
    if not any(c in expected for c in ".eE"):
        return False
    try:
        a, b = float(got), float(expected)
    except ValueError:
        return False
    if math.isnan(a) or math.isnan(b):
        return False
    return abs(a - b) <= tolerance * max(1.0, abs(b))


def _line_matches(got: str, expected: str, tolerance: float | None) -> bool:
    if got == expected:
        return True
    got_tokens, exp_tokens = got.split(), expected.split()
    if got_tokens == exp_tokens:
        return True
    if len(got_tokens) != len(exp_tokens):
        return False
    for g, e in zip(got_tokens, exp_tokens, strict=True):
        if g == e:
            continue
        dg, de = _decimal(g), _decimal(e)
        if dg is not None and de is not None and dg.is_finite() and de.is_finite() and dg == de:
            continue
        if tolerance is not None and _float_close(g, e, tolerance):
            continue
        return False
    return True


def stdout_matches(got: str, expected: str, *, float_tolerance: float | None = None) -> bool:
    """Whether a program's stdout matches the expected output (see the module docstring)."""
    got_lines, exp_lines = _lines(got), _lines(expected)
    if len(got_lines) != len(exp_lines):
        return False
    return all(_line_matches(g, e, float_tolerance) for g, e in zip(got_lines, exp_lines, strict=True))


def value_matches(got_json: str | None, expected_json: str) -> bool:
    """Whether a functional test's JSON-encoded return value equals the expected JSON value."""
    if got_json is None:
        return False
    expected = json.loads(expected_json)
    try:
        got: Any = json.loads(got_json)
        return bool(got == expected)
    except (ValueError, RecursionError):  # not JSON, or nested past the recursion limit
        return False
