"""Size bounds of numeric expressions: checked against exact arithmetic (brute force) on small values."""

from __future__ import annotations

import math
import random
import time
from fractions import Fraction

import pytest
from sdpo_math import magnitude
from sdpo_math.magnitude import (
    EXACT_LOG10_LIMIT,
    SYMPY_LOG10_LIMIT,
    Num,
    integer_root,
    largest_part,
    log10_factorial_bounds,
    magnitude_verdict,
    parse_numeric,
    perfect_power,
)


def contains(value: Num, truth: Fraction | float) -> bool:
    """Whether `value` (exact or bounds) is consistent with the true value."""
    if value.exact is not None:
        return value.exact == truth
    if truth == 0:
        return False  # bounds are only ever given for nonzero values
    if value.sign is not None and value.sign != (1 if truth > 0 else -1):
        return False
    log = math.log10(abs(truth.numerator)) - math.log10(truth.denominator) if isinstance(truth, Fraction) \
        else math.log10(abs(truth))
    return value.lo <= log <= value.hi


# ------------------------------------------------------------------------------ Stirling bounds
@pytest.mark.parametrize("n", [*range(1, 200), 500, 1000, 2500, 10**5, 10**7])
def test_factorial_bounds_contain_the_exact_value(n: int) -> None:
    lo, hi = log10_factorial_bounds(float(n))
    truth = math.log10(math.factorial(n)) if n <= 2500 else math.lgamma(n + 1) / math.log(10)
    assert lo <= truth + 1e-9 * truth
    assert truth - 1e-9 * truth <= hi
    assert hi - lo < 0.04  # tight: Robbins' remainder is below 1/(12n)


def test_factorial_bounds_past_floats() -> None:
    assert log10_factorial_bounds(math.inf) == (math.inf, math.inf)
    lo, _ = log10_factorial_bounds(1e300)
    assert lo > 1e302


# ------------------------------------------------------------------------------ exact powers
def test_integer_root_against_brute_force() -> None:
    for n in range(2000):
        for k in range(1, 12):
            r = integer_root(n, k)
            assert r**k <= n < (r + 1) ** k, (n, k)
    assert integer_root(10**600 + 1, 3) == 10**200
    assert integer_root(10**600 - 1, 3) == 10**200 - 1


def test_perfect_power_against_brute_force() -> None:
    best = {}
    for r in range(2, 200):
        k = 1
        while r**k < 40000:
            best[r**k] = max(best.get(r**k, (0, 0)), (k, r))
            k += 1
    for n in range(2, 40000):
        k, r = best.get(n, (1, n))
        assert perfect_power(n) == (r, k), n
    assert perfect_power(3**500) == (3, 500)
    assert perfect_power(12**40 * 1) == (12, 40)
    assert perfect_power(2**1023) == (2, 1023)
    with pytest.raises(ValueError, match="perfect_power"):
        perfect_power(1)


def test_huge_powers_keep_their_exact_form() -> None:
    assert parse_numeric("100^{5 \\cdot 10^{9}}").power_of == (10, 10**10)
    assert parse_numeric("8^{10^{3000}}").power_of == (2, 3 * 10**3000)
    assert parse_numeric("8^{10^{5000}}").power_of is None  # only exponents small enough to hold exactly
    assert parse_numeric("-10^{10^{10}}").power_of is None  # negative: not a power r^k with r >= 2
    assert parse_numeric("(10^{10})!").power_of is None


# ------------------------------------------------------------------------ brute force, small values
def random_expression(rng: random.Random, depth: int) -> tuple[str, Fraction | None]:
    """A random LaTeX expression and its exact value (`None` when undefined), small enough to compute."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(0, 12)
        return str(n), Fraction(n)
    kind = rng.choice(["+", "-", "*", "/", "^", "!", "frac", "neg"])
    left, a = random_expression(rng, depth - 1)
    if kind == "!":
        n = rng.randint(0, 9)
        return f"{n}!", Fraction(math.factorial(n))
    if kind == "neg":
        return f"-({left})", None if a is None else -a
    if kind == "^":
        e = rng.randint(-3, 4)
        text = f"({left})^{{{e}}}"
        if a is None or (a == 0 and e <= 0):
            return text, None
        return text, a**e
    right, b = random_expression(rng, depth - 1)
    if kind == "frac":
        text = f"\\frac{{{left}}}{{{right}}}"
        return text, None if a is None or b is None or b == 0 else a / b
    op = {"+": "+", "-": "-", "*": "\\cdot", "/": "/"}[kind]
    text = f"({left}) {op} ({right})"
    if a is None or b is None or (kind == "/" and b == 0):
        return text, None
    return text, {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[kind]


@pytest.mark.parametrize("limit", [EXACT_LOG10_LIMIT, 0])
def test_random_expressions_against_exact_arithmetic(limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default limit the values are exact; with limit 0 every part goes through the bounds."""
    monkeypatch.setattr(magnitude, "EXACT_LOG10_LIMIT", limit)
    monkeypatch.setattr(magnitude, "EXACT_FACTORIAL_LIMIT", 1 if limit == 0 else magnitude.EXACT_FACTORIAL_LIMIT)
    rng = random.Random(19)
    bounded = 0
    for _ in range(3000):
        text, truth = random_expression(rng, 4)
        value = parse_numeric(text)
        if truth is None:
            continue  # undefined: either not numeric (None) or bounds we cannot check
        assert value is not None, text
        if not value.known:
            continue  # cancellation of comparable terms: nothing claimed
        assert contains(value, truth), (text, truth, value)
        bounded += value.exact is None
    if limit == 0:
        assert bounded > 1000  # the bounds path was really exercised


@pytest.mark.parametrize(("text", "truth"), [
    ("\\sqrt{2}", math.sqrt(2)),
    ("\\sqrt[3]{27}", 3.0),
    ("2\\pi", 2 * math.pi),
    ("\\pi^{2}", math.pi**2),
    ("3\\sqrt{2}", 3 * math.sqrt(2)),
    ("\\left(\\frac{1}{2}\\right)^{10}", 2.0**-10),
    ("2 \\times 3 \\div 4", 1.5),
    ("10^10", 1e10),
    ("-2^{2}", -4.0),
    ("\\dfrac{3}{4}", 0.75),
])
def test_irrational_and_latex_forms(text: str, truth: float) -> None:
    value = parse_numeric(text)
    assert value is not None
    assert value.known
    if value.exact is not None:
        assert float(value.exact) == pytest.approx(truth, rel=1e-12)
    else:
        assert contains(value, truth)
        assert value.hi - value.lo < 1e-6


# ----------------------------------------------------------------------------------- huge values
@pytest.mark.parametrize(("text", "log10"), [
    ("10^{10^{10}}", 1e10),
    ("1000000!", math.lgamma(1e6 + 1) / math.log(10)),
    ("(10^{9})!", math.lgamma(1e9 + 1) / math.log(10)),
    ("2^{2^{2^{2^{2}}}}", 65536 * math.log10(2)),
    ("9^{9^{9}}", 9**9 * math.log10(9)),
    ("(10^{10})^{10^{10}}", 1e11),
    ("\\frac{1}{10^{10^{10}}}", -1e10),
    ("10^{10^{10}} + 7", 1e10),
    ("\\sqrt{10^{10^{10}}}", 5e9),
])
def test_huge_values_are_bounded_without_computing_them(text: str, log10: float) -> None:
    started = time.perf_counter()
    value = parse_numeric(text)
    assert time.perf_counter() - started < 0.5
    assert value is not None
    assert value.known
    assert value.exact is None
    assert value.huge
    assert value.lo <= log10 <= value.hi
    assert value.hi - value.lo <= 1e-6 * abs(log10)


def test_towers_beyond_floats_and_cancellations() -> None:
    tower = parse_numeric("10^{10^{10^{10}}}")
    assert tower is not None
    assert tower.lo == math.inf
    assert tower.sign == 1
    cancelled = parse_numeric("10^{10^{10}} - 10^{10^{10}}")
    assert cancelled is not None
    assert not cancelled.known
    one = parse_numeric("\\frac{10^{10^{10}}}{10^{10^{10}}}")
    assert one is not None
    assert one.peak >= 1e10
    assert one.lo <= 0 <= one.hi
    zero = parse_numeric("0 \\cdot 10^{10^{10}}")
    assert zero is not None
    assert zero.is_zero
    assert zero.huge
    assert parse_numeric("(-2)^{10^{10}}").sign == 1  # an exact exponent's parity gives the sign
    assert parse_numeric("(-2)^{10^{10}+1}").sign == -1
    assert parse_numeric("(-2)^{10^{5000}}").sign is None  # a bounded exponent's parity is not tracked


@pytest.mark.parametrize("text", [
    "x", "2x", "\\sin(2)", "1,000", "1\\,000", "2 3", "10!!", "2^{3}^{4}", "2^{3}!", "", "()", "\\frac{1}{0}",
    "0^{0}", "(-8)^{\\frac{1}{3}}", "(\\frac{1}{2})!", "(-3)!", "2(3)", "10**2", "\\{1\\}", "1.2.3",
])
def test_outside_the_grammar(text: str) -> None:
    assert parse_numeric(text) is None


def test_deep_nesting_is_refused_quickly() -> None:
    started = time.perf_counter()
    assert parse_numeric("(" * 5000 + "1" + ")" * 5000) is None
    assert parse_numeric("-" * 4000 + "10^{10^{10}}") is not None  # signs are a loop, not recursion
    assert parse_numeric("2^{" * 500 + "2" + "}" * 500) is None
    assert time.perf_counter() - started < 2


# --------------------------------------------------------------------- parts of non-numeric text
@pytest.mark.parametrize(("text", "at_least"), [
    ("x + 10^{10^{10}}", 1e10),
    ("\\sin(10^{10^{10}})", 1e10),
    ("x^{10^{10^{10}}}", 1e10),  # the exponent alone is huge
    ("(10^{9})! y", 8.5e9),
    ("\\{1, 10^{10^{10}}\\}", 1e10),
    ("\\left(10^{10}\\right)! z", 9.5e10),
    ("a_{10^{10^{10}}}", 1e10),
])
def test_largest_part_finds_huge_numbers_inside_other_text(text: str, at_least: float) -> None:
    assert parse_numeric(text) is None
    assert largest_part(text) >= at_least


@pytest.mark.parametrize("text", ["x^2 + 1", "f(x)!", "2^{x}", "\\frac{a}{b}", "e^{i\\pi}", "(x+1)^{3000}"])
def test_largest_part_of_ordinary_text_is_small(text: str) -> None:
    assert largest_part(text) < 10


@pytest.mark.parametrize("text", [")^1" * 1300, "2^{" * 1300 + "}" * 1300, "(" * 2000 + ")^1" * 600, "9!" * 2000,
                                  "10^{10^{10}}" * 300])
def test_largest_part_is_fast_on_any_text(text: str) -> None:
    started = time.perf_counter()
    largest_part(text)
    assert time.perf_counter() - started < 2  # about 0.1 s on an idle core; the point is: no blow-up


# -------------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize(("gold", "answer", "expected"), [
    ("7", "10^{10^{10}}", "different"),
    ("7", "-10^{10^{10}}", "different"),
    ("-7", "10^{5000}", "different"),
    ("0", "10^{10^{10}}", "different"),
    ("7", "10^{10^{10^{10}}}", "different"),
    ("7", "10^{10^{10}} - 10^{10^{10}}", "too_large"),  # a real cancellation; sympy would hang on it
    ("7", "\\frac{10^{10^{10}}}{10^{10^{10}-1}}", "too_large"),  # 10, but the bounds cannot tell
    ("10^{10^{10}}", "10^{10000000000}", "equal"),  # both exact powers: compared as powers
    ("10^{10^{10}}", "100^{5 \\cdot 10^{9}}", "equal"),
    ("10^{10^{10}}", "10 \\cdot 10^{10^{10}-1}", "equal"),
    ("10^{10^{10}}", "10^{10^{10}+1}", "different"),
    ("2^{20000}", "3^{10000}", "different"),
    ("10^{10^{10}}", "2 \\cdot 5^{10^{10}} \\cdot 2^{10^{10}-1}", "too_large"),  # equal, but not as one power
    ("0", "10^{-10^{10}}", "too_large"),  # tiny: a rounding tolerance might call it 0
    ("2^{5000}", "4^{2500}", None),  # large but computable: math-verify decides (equal)
    ("2^{20000}", "4^{10000}", "equal"),
    ("7", "2^{1000}", None),  # small: math-verify decides as before
    ("1000000", "10^{6}", None),
    ("3628800", "10!", None),
    ("x + 1", "2", None),
    ("0.41421356", "\\sqrt{2} - 1", None),  # small terms that nearly cancel: math-verify decides
    ("0.14159", "\\pi - 3", None),
    ("0", "2\\sqrt{2} - \\sqrt{8}", None),
    ("1", "(-1)^{10^{10}}", None),
])
def test_magnitude_verdict(gold: str, answer: str, expected: str | None) -> None:
    assert magnitude_verdict(parse_numeric(gold), parse_numeric(answer)) == expected


def test_a_huge_answer_against_a_gold_outside_the_grammar_abstains() -> None:
    assert magnitude_verdict(None, parse_numeric("10^{10^{10}}")) == "too_large"
    assert magnitude_verdict(None, parse_numeric(f"10^{{{SYMPY_LOG10_LIMIT // 2}}}")) is None  # sympy can build it
