"""Cheap bounds on the size of a numeric LaTeX expression, so huge answers are judged without sympy.

Why: `\\boxed{10^{10^{10}}}` or `\\boxed{(10^9)!}` makes sympy build a number with billions of digits.
That work runs in C, cannot be interrupted, and ends only when the checker's timeout kills the worker:
the answer would abstain after seconds of work, every time the policy writes it. Here such an
expression is parsed with a small grammar and evaluated into *bounds on log10 of its absolute value*
instead of digits: `log10(a^b) = b * log10(a)`, `log10(n!)` from Stirling's bounds, sums from the
dominant term. When the bounds of the answer and the gold are far apart, they are different numbers,
whatever sympy would say.

The grammar: numbers, `+ - * / ^ !`, `\\times \\cdot \\div`, `\\frac{}{}`, `\\sqrt{}`, `\\sqrt[k]{}`,
`\\pi`, parentheses and braces (`\\left`/`\\right` ignored). Anything else (a letter, a function, a
comma, a double factorial) is not numeric here: `parse_numeric` returns `None` and math-verify decides.

Values stay exact (`Fraction`) while they are small (`EXACT_LOG10_LIMIT` digits); past that only
the bounds are kept, and `peak` records the largest size met on the way. Bounds are computed in floats and widened by
`_EPS` (relative) at every step, far more than float rounding can move them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

EXACT_LOG10_LIMIT = 4000
"""Values up to about 10**4000 are computed exactly (cheap in Python); larger ones only bounded."""
EXACT_FACTORIAL_LIMIT = 1500
"""n! is computed exactly up to this n (1500! has 4115 digits)."""
SYMPY_LOG10_LIMIT = 1_000_000
"""Numbers with more digits than this are not handed to sympy: building them costs seconds or more."""
_MAX_DEPTH = 64
_EPS = 1e-9
_LOG10_2 = math.log10(2)
_LN10 = math.log(10)


class NotNumeric(Exception):
    """The text is outside the numeric grammar (or undefined, like a division by zero)."""


@dataclass(frozen=True)
class Num:
    """A real number, known exactly or by bounds on `log10(|x|)`.

    Args:
        exact (`Fraction`, *optional*): the value, when it was small and rational.
        sign (`int` or `None`): `1`, `-1`, `0` (only for an exact zero), `None` when the sign is unknown.
        lo, hi (`float`): `lo <= log10(|x|) <= hi` for a nonzero value (`inf` means "beyond floats").
        known (`bool`): whether the bounds hold; `False` when nothing is known (`10^{99!} - 10^{99!}`).
        integer (`bool`): whether the value is certainly an integer.
        peak (`float`): the largest `|log10|` of any part of the expression, itself included (the
            size sympy would have to build: `\\frac{10^{10^{10}}}{10^{10^{10}}}` is 1 with a peak of 1e10).
        power_of (`tuple`, *optional*): `(r, k)` when the value is exactly `r ** k`, `r >= 2` not itself a
            perfect power (so the pair is unique): huge pure powers written two ways compare exactly.
    """

    exact: Fraction | None
    sign: int | None
    lo: float
    hi: float
    known: bool = True
    integer: bool = False
    peak: float = 0.0
    power_of: tuple[int, int] | None = None

    @property
    def huge(self) -> bool:
        """Whether some part was too large to compute exactly."""
        return self.peak > EXACT_LOG10_LIMIT

    @property
    def is_zero(self) -> bool:
        return self.exact is not None and self.exact == 0


def unknown(peak: float) -> Num:
    """A real value of which nothing is known (`10^{99!} - 10^{99!}` may be anything), its parts' `peak` kept."""
    return Num(None, None, -math.inf, math.inf, known=False, peak=peak)


def _widen(lo: float, hi: float) -> tuple[float, float]:
    if not math.isinf(lo):
        lo -= _EPS * (1 + abs(lo))
    if not math.isinf(hi):
        hi += _EPS * (1 + abs(hi))
    return lo, hi


def log10_abs(value: Fraction) -> float:
    """`log10(|value|)` of a nonzero fraction of any size (math.log10 takes big integers)."""
    return math.log10(abs(value.numerator)) - math.log10(value.denominator)


def exact(value: Fraction | int, *, peak: float = 0.0) -> Num:
    """A known value, with its bounds."""
    value = Fraction(value)
    if value == 0:
        return Num(value, 0, -math.inf, -math.inf, integer=True, peak=peak)
    lo, hi = _widen(*(2 * (log10_abs(value),)))
    return Num(value, 1 if value > 0 else -1, lo, hi, integer=value.denominator == 1, peak=max(peak, -lo, hi))


def bounded(sign: int | None, lo: float, hi: float, *, integer: bool = False, peak: float = 0.0,
            power_of: tuple[int, int] | None = None) -> Num:
    """A value known by bounds only (`peak`: of its parts); `unknown` if the bounds are not usable."""
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        return unknown(math.inf if math.isnan(lo) or math.isnan(hi) else max(peak, -lo, hi))
    lo, hi = _widen(lo, hi)
    return Num(None, sign, lo, hi, integer=integer, peak=max(peak, -lo, hi), power_of=power_of)


_PERFECT_POWER_BITS = 1024


def perfect_power(n: int) -> tuple[int, int]:
    """`(r, k)` with `n == r ** k` and the largest such `k`, for `2 <= n < 2**_PERFECT_POWER_BITS`."""
    if not 2 <= n < 1 << _PERFECT_POWER_BITS:
        raise ValueError(f"perfect_power needs 2 <= n < 2**{_PERFECT_POWER_BITS}")
    for k in range(n.bit_length(), 1, -1):  # the largest k first: then r is not a perfect power
        r = integer_root(n, k)
        if r >= 2 and r**k == n:
            return r, k
    return n, 1


def integer_root(n: int, k: int) -> int:
    """`floor(n ** (1/k))` for `n >= 0`, exactly (Newton's method on integers)."""
    if n < 2:
        return n
    x = 1 << -(-n.bit_length() // k)  # 2**ceil(bits/k) >= the root
    while True:
        y = ((k - 1) * x + n // x ** (k - 1)) // k
        if y >= x:
            return x
        x = y


def _power_form(x: Num) -> tuple[int, int] | None:
    """`x.power_of`, or that of a small exact integer."""
    if x.power_of is not None:
        return x.power_of
    if x.exact is not None and x.exact.denominator == 1 and 2 <= x.exact < 1 << _PERFECT_POWER_BITS:
        return perfect_power(int(x.exact))
    return None


def pow10(x: float) -> float:
    """`10**x`, `inf` past the float range."""
    try:
        return math.pow(10.0, x)
    except OverflowError:
        return math.inf


def _as_bounds(x: Num) -> Num:
    """The same value with its exact part dropped (for mixing with bounded values)."""
    return x if x.exact is None else Num(None, x.sign, x.lo, x.hi, integer=x.integer, peak=x.peak)


# ------------------------------------------------------------------------------------ arithmetic
def negate(x: Num) -> Num:
    if not x.known:
        return x
    if x.exact is not None:
        return exact(-x.exact, peak=x.peak)
    return Num(None, None if x.sign is None else -x.sign, x.lo, x.hi, integer=x.integer, peak=x.peak)


def add(a: Num, b: Num) -> Num:
    """`a + b`: exact when both are; else the dominant term's bounds, or the larger bound when signs agree."""
    peak = max(a.peak, b.peak)
    if not (a.known and b.known):
        return unknown(peak)
    if a.exact is not None and b.exact is not None:
        return exact(a.exact + b.exact, peak=peak)
    if a.is_zero or b.is_zero:
        return _as_bounds(b if a.is_zero else a)
    integer = a.integer and b.integer
    big, small = (a, b) if a.lo >= b.lo else (b, a)
    gap = small.hi - big.lo
    if gap < -1:  # |small| <= |big| / 10: |a + b| lies within |big| (1 -/+ 10**gap)
        ratio = pow10(gap)
        return bounded(big.sign, big.lo + math.log10(1 - ratio), big.hi + math.log10(1 + ratio), integer=integer,
                       peak=peak)
    if a.sign is not None and a.sign == b.sign:
        return bounded(a.sign, max(a.lo, b.lo), max(a.hi, b.hi) + _LOG10_2, integer=integer, peak=peak)
    return unknown(peak)  # comparable terms of opposite or unknown signs may cancel


def multiply(a: Num, b: Num) -> Num:
    """`a * b`: exact when both are and the product is small enough."""
    if a.is_zero or b.is_zero:
        return exact(0, peak=max(a.peak, b.peak))
    peak = max(a.peak, b.peak)
    if not (a.known and b.known):
        return unknown(peak)
    if a.exact is not None and b.exact is not None and a.hi + b.hi <= EXACT_LOG10_LIMIT:
        return exact(a.exact * b.exact, peak=peak)
    sign = None if a.sign is None or b.sign is None else a.sign * b.sign
    forms = _power_form(a), _power_form(b)
    power_of = None
    if forms[0] is not None and forms[1] is not None and forms[0][0] == forms[1][0]:
        power_of = (forms[0][0], forms[0][1] + forms[1][1])  # r^j * r^k = r^(j+k)
    return bounded(sign, a.lo + b.lo, a.hi + b.hi, integer=a.integer and b.integer, peak=peak, power_of=power_of)


def divide(a: Num, b: Num) -> Num:
    if b.is_zero:
        raise NotNumeric("division by zero")
    if a.is_zero:
        return exact(0, peak=max(a.peak, b.peak))
    peak = max(a.peak, b.peak)
    if not (a.known and b.known):
        return unknown(peak)
    if a.exact is not None and b.exact is not None and a.hi - b.lo <= EXACT_LOG10_LIMIT:
        return exact(a.exact / b.exact, peak=peak)
    sign = None if a.sign is None or b.sign is None else a.sign * b.sign
    return bounded(sign, a.lo - b.hi, a.hi - b.lo, peak=peak)


def _value_range(x: Num) -> tuple[float, float]:
    """Bounds on `|x|` itself (may be 0 or inf)."""
    return pow10(x.lo), pow10(x.hi)


def power(base: Num, exponent: Num) -> Num:
    """`base ** exponent` for a real result; `NotNumeric` where it is undefined or not real."""
    peak = max(base.peak, exponent.peak)
    if exponent.is_zero:
        if base.is_zero:
            raise NotNumeric("0^0")
        return exact(1, peak=peak)
    if base.exact == 1:
        return exact(1, peak=peak)
    if base.is_zero:
        if exponent.sign == 1:
            return exact(0, peak=peak)
        raise NotNumeric("0 to a power that is not positive")
    if not (base.known and exponent.known) or exponent.sign is None:
        return unknown(peak)
    if base.sign != 1 and not exponent.integer:
        raise NotNumeric("a negative base (or one of unknown sign) to a power that may not be an integer")
    small = exponent.hi < 10 and float(abs(exponent.exact or 0)) * max(abs(base.lo), abs(base.hi)) <= EXACT_LOG10_LIMIT
    if base.exact is not None and exponent.exact is not None and exponent.integer and small:
        return exact(base.exact ** int(exponent.exact), peak=peak)
    # log10|base**e| = e * log10|base|, with e and log10|base| both intervals.
    if base.lo <= 0 <= base.hi:
        return unknown(peak)  # |base| may be 1: the result's size is not known
    e_lo, e_hi = _value_range(exponent)
    log_lo, log_hi = (base.lo, base.hi) if base.lo > 0 else (-base.hi, -base.lo)  # |log10|base||
    lo, hi = e_lo * log_lo, e_hi * log_hi
    if (base.lo > 0) != (exponent.sign == 1):
        lo, hi = -hi, -lo
    if exponent.exact is not None and exponent.integer:
        sign = base.sign if exponent.exact.numerator % 2 else 1
    else:
        sign = 1 if base.sign == 1 else None  # a huge integer exponent's parity is not tracked
    integer = base.integer and exponent.integer and exponent.sign == 1
    form = _power_form(base)
    power_of = None
    if form is not None and exponent.exact is not None and exponent.integer and exponent.sign == 1:
        power_of = (form[0], form[1] * int(exponent.exact))
    return bounded(sign, lo, hi, integer=integer, peak=peak, power_of=power_of)


def log10_factorial_bounds(n: float) -> tuple[float, float]:
    """Bounds on `log10(n!)` for real `n >= 1`, from Stirling's series with Robbins' remainder bounds:
    `ln n! = n ln n - n + ln(2 pi n) / 2 + r` with `1 / (12n + 1) < r < 1 / (12n)`."""
    if math.isinf(n):
        return math.inf, math.inf
    ln_n = math.log(n)
    base = n * (ln_n - 1) + 0.5 * (math.log(2 * math.pi) + ln_n)
    return (base + 1 / (12 * n + 1)) / _LN10, (base + 1 / (12 * n)) / _LN10


def factorial(n: Num) -> Num:
    """`n!` for a non-negative integer `n`."""
    if n.is_zero:
        return exact(1, peak=n.peak)
    if not n.known:
        return unknown(n.peak)
    if not n.integer or n.sign != 1:
        raise NotNumeric("factorial of a number that is not a non-negative integer")
    if n.exact is not None and n.exact <= EXACT_FACTORIAL_LIMIT:
        return exact(math.factorial(int(n.exact)), peak=n.peak)
    if n.exact is not None and n.hi < 300:
        lo, hi = log10_factorial_bounds(float(n.exact))
    else:
        n_lo, n_hi = _value_range(n)
        lo, hi = log10_factorial_bounds(max(1.0, n_lo))[0], log10_factorial_bounds(max(1.0, n_hi))[1]
    return bounded(1, lo, hi, integer=True, peak=n.peak)


def _pi() -> Num:
    value = math.log10(math.pi)
    return bounded(1, value, value)


# --------------------------------------------------------------------------------------- parsing
_TOKEN_RE = re.compile(
    r"\s+|\\[,;:! ]|~|\\left|\\right"  # spacing and sizing: dropped
    r"|(?P<number>\d+(?:\.\d+)?|\.\d+)"
    r"|(?P<command>\\[a-zA-Z]+)"
    r"|(?P<op>[-+*/^!(){}\[\]])"
)
_COMMANDS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "\\frac": "frac", "\\dfrac": "frac", "\\tfrac": "frac",
             "\\sqrt": "sqrt", "\\pi": "pi"}
_CLOSING = {"(": ")", "{": "}", "[": "]"}


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise NotNumeric(f"unexpected {text[pos]!r}")
        pos = m.end()
        if m.group("number") is not None:
            if tokens and _is_number(tokens[-1]):
                raise NotNumeric("two numbers in a row")  # "2 3" is not 23
            tokens.append(m.group("number"))
        elif m.group("command") is not None:
            if m.group("command") not in _COMMANDS:
                raise NotNumeric(f"{m.group('command')} is not numeric")
            tokens.append(_COMMANDS[m.group("command")])
        elif m.group("op") is not None:
            tokens.append(m.group("op"))
    return tokens


def _is_number(token: str) -> bool:
    return token[0].isdigit() or token[0] == "."


class _Parser:
    """Recursive descent over the grammar in the module docstring."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise NotNumeric(f"expected {expected or 'more'}, found {token!r}")
        self.pos += 1
        return token

    def parse(self) -> Num:
        value = self.expression()
        if self.peek() is not None:
            raise NotNumeric(f"unexpected {self.peek()!r}")
        return value

    def expression(self) -> Num:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise NotNumeric("nested too deeply")
        value = self.term()
        while self.peek() in ("+", "-"):
            right = self.term() if self.take() == "+" else negate(self.term())
            value = add(value, right)
        self.depth -= 1
        return value

    def term(self) -> Num:
        value = self.signed()
        while True:
            token = self.peek()
            if token in ("*", "/"):
                self.take()
                right = self.signed()
                value = multiply(value, right) if token == "*" else divide(value, right)
            elif token in ("frac", "sqrt", "pi"):  # implicit product: 2\pi, 3\sqrt{2} (not 2(3): math-verify differs)
                value = multiply(value, self.powered())
            else:
                return value

    def signed(self) -> Num:
        negative = False
        while self.peek() in ("+", "-"):
            negative ^= self.take() == "-"
        value = self.powered()
        return negate(value) if negative else value

    def powered(self) -> Num:
        base = self.postfix()
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.group() if self.peek() == "{" else self.postfix()  # 10^10 is 10**10, as math-verify reads it
        if self.peek() in ("^", "!"):
            raise NotNumeric("a power followed by ^ or ! is ambiguous")
        return power(base, exponent)

    def postfix(self) -> Num:
        value = self.primary()
        if self.peek() == "!":
            self.take()
            if self.peek() == "!":
                raise NotNumeric("double factorial")
            value = factorial(value)
        return value

    def group(self) -> Num:
        opening = self.take()
        if opening not in _CLOSING:
            raise NotNumeric(f"expected a group, found {opening!r}")
        value = self.expression()
        self.take(_CLOSING[opening])
        return value

    def primary(self) -> Num:
        token = self.peek()
        if token is None:
            raise NotNumeric("the expression ends early")
        if _is_number(token):
            try:
                return exact(Fraction(self.take()))
            except ValueError as exc:  # more digits than Python converts
                raise NotNumeric(str(exc)) from exc
        if token in _CLOSING:
            return self.group()
        self.take()
        if token == "pi":
            return _pi()
        if token == "frac":
            return divide(self.braced(), self.braced())
        if token == "sqrt":
            index = exact(2)
            if self.peek() == "[":
                index = self.group()
            return power(self.braced(), divide(exact(1), index))
        raise NotNumeric(f"unexpected {token!r}")

    def braced(self) -> Num:
        if self.peek() != "{":
            raise NotNumeric("expected {")
        return self.group()


def parse_numeric(text: str) -> Num | None:
    """The value (or bounds) of a numeric LaTeX expression; `None` if it is outside the grammar."""
    try:
        tokens = _tokens(text)
        if not tokens:
            return None
        return _Parser(tokens).parse()
    except NotNumeric:
        return None


# ----------------------------------------------------------------------- parts of other answers
_PAIRS = {"(": ")", "{": "}", "[": "]"}
_NUMBER_BEFORE_RE = re.compile(r"\d+(?:\.\d+)?$")
_NUMBER_AFTER_RE = re.compile(r"\d+(?:\.\d+)?")
_SCAN_CHARS = 20_000
"""Characters of candidate parts `largest_part` parses at most (a bound on its work for any text)."""


def _matching_brackets(text: str) -> dict[int, int]:
    """Index of each bracket to the index of its partner, both ways (unbalanced ones are left out)."""
    partners: dict[int, int] = {}
    stack: list[int] = []
    for i, char in enumerate(text):
        if char in _PAIRS:
            stack.append(i)
        elif char in _PAIRS.values():
            if stack and _PAIRS[text[stack[-1]]] == char:
                opening = stack.pop()
                partners[opening], partners[i] = i, opening
            else:
                stack.clear()  # a stray closing bracket: nothing before it pairs across it
    return partners


def largest_part(text: str) -> float:
    """The largest `peak` of the numeric powers and factorials inside any text (`x + 10^{10^{10}}`, `\\sin(9!)`).

    For answers outside the grammar: sympy would still build these numbers while parsing. The base is
    the number or bracketed group just before `^` or `!`, the exponent the number or braced group just
    after `^`. Linear in the text, and at most `_SCAN_CHARS` characters of candidates are parsed.
    """
    partners = _matching_brackets(text)
    largest, scanned = 0.0, 0
    for m in re.finditer(r"[\^!]", text):
        i = m.start()
        if i == 0:
            continue
        if text[i - 1] in _PAIRS.values():
            begin: int | None = partners.get(i - 1)
        else:
            number = _NUMBER_BEFORE_RE.search(text, max(0, i - 64), i)
            begin = None if number is None else number.start()
        if begin is None:
            continue
        end: int | None = i + 1
        if text[i] == "^":
            after = _NUMBER_AFTER_RE.match(text, i + 1)
            end = partners[i + 1] + 1 if i + 1 in partners and text[i + 1] == "{" else after and after.end()
        if end is None:
            continue
        scanned += end - begin
        if scanned > _SCAN_CHARS:
            break
        value = parse_numeric(text[begin:end])
        if value is not None:
            largest = max(largest, value.peak)
    return largest


# -------------------------------------------------------------------------------------- verdicts
MagnitudeVerdict = Literal["equal", "different", "too_large"]


def magnitude_verdict(gold: Num | None, answer: Num | None) -> MagnitudeVerdict | None:
    """Decide by size alone when one side is too large to compute exactly.

    `"equal"` / `"different"`: both are exact powers `r ** k` (`power_of`) and the pairs are equal or not.
    `"different"`: the two values are certainly different, by a factor of at least 2 and by at least
    1/2 in absolute terms (so no rounding tolerance can make them equal), or by sign.
    `"too_large"`: undecided here, and one side is too large for sympy to build (abstain).
    `None`: nothing huge, or sympy can still settle it (math-verify decides).
    """
    if gold is None and answer is None:
        return None
    sides = [x for x in (gold, answer) if x is not None]
    if not any(x.huge for x in sides):
        return None
    if gold is not None and answer is not None:
        forms = _power_form(gold), _power_form(answer)
        if forms[0] is not None and forms[1] is not None:
            return "equal" if forms[0] == forms[1] else "different"
        if _certainly_apart(gold, answer):
            return "different"
    if any(x.peak > SYMPY_LOG10_LIMIT for x in sides):
        return "too_large"
    return None


def _certainly_apart(a: Num, b: Num) -> bool:
    if not (a.known and b.known):
        return False
    if a.is_zero or b.is_zero:
        other = b if a.is_zero else a
        return other.lo >= 0  # |other| >= 1
    if max(a.lo, b.lo) < 0:
        return False  # both may be below 1: leave tolerance questions to math-verify
    if a.sign is not None and b.sign is not None and a.sign != b.sign:
        return True
    return a.lo - b.hi >= _LOG10_2 or b.lo - a.hi >= _LOG10_2
