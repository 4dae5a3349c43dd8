"""Pulling the final answer out of a completion, and the reference answer out of a dataset label.

Pure string work, no sympy: it runs in the trainer's process on every completion, so it must be
cheap and never hang. Equivalence is the checker's job (`sdpo_math.checker`).

Order of preference for the completion's answer:

1. the last `\\boxed{...}` / `\\fbox{...}` (braces may nest; `\\{` and `\\}` do not count);
2. the last line matching `answer_pattern` ("Answer: 42", "The final answer is 42"); first, when
   the prompt asked for an answer line (`prefer="answer_line"`);
3. the last number in the text (`\\frac{1}{8}` counts as one), unless `fallback_last_number=False`.

A box that is opened but never closed is reported as truncated, never silently used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Source = Literal["boxed", "answer_line", "last_number"]

BOX_COMMANDS = ("\\boxed", "\\fbox")
DEFAULT_ANSWER_PATTERN = r"(?i)\b(?:final\s+answer|answer)\s*(?:is\s*:?|:|=)\s*(?P<answer>[^\n]+)"
"""Default answer-line pattern: "Answer: X", "The final answer is X", "**Answer:** X". Group `answer`
(or group 1) is the answer."""

# A number as people write it: optional sign, thousands separators, decimals, a simple fraction, or a
# LaTeX fraction of integers (without it, "it is \frac{1}{8}" would end in the number 8).
_NUMBER_RE = re.compile(
    r"[-−]?\\[dt]?frac(?:\{[-−]?\d+\}\{\d+\}|\d\d)"
    r"|(?<![\w.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\w])"
)
_GSM8K_MARK = "####"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")


@dataclass(frozen=True)
class Extraction:
    """The answer found in one completion.

    Args:
        answer (`str` or `None`): the answer text, `None` when nothing was found.
        source (`str` or `None`): `"boxed"`, `"answer_line"` or `"last_number"`.
        n_boxed (`int`): how many complete boxes the completion has (the last one is used).
        truncated (`bool`): the last box is opened but never closed; `answer` then holds what was
            written before the text ended.
        unbalanced_braces (`bool`): the completion has more `{` than `}`, a sign it was cut off.
    """

    answer: str | None
    source: Source | None
    n_boxed: int = 0
    truncated: bool = False
    unbalanced_braces: bool = False


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _match_brace(text: str, open_at: int) -> int | None:
    """Index of the `}` closing the `{` at `open_at`, or `None` if the text ends first."""
    depth = 0
    i = open_at
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces in LaTeX; skip the escaped character
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def find_boxed(text: str) -> tuple[list[str], str | None]:
    """All complete `\\boxed{}`/`\\fbox{}` contents in order, and the content of a trailing unclosed box.

    `\\boxed 5` (no braces, TeX's single-token argument) counts as a box holding `5`.
    """
    boxes: list[str] = []
    unclosed: str | None = None
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            break
        i = _skip_space(text, m.end())
        if i < len(text) and text[i] == "{":
            close = _match_brace(text, i)
            if close is None:
                unclosed = text[i + 1 :]
                break
            boxes.append(text[i + 1 : close])
            pos = close + 1
        elif i >= len(text):  # the text ends right after "\boxed"
            unclosed = ""
            break
        elif i > m.end():  # "\boxed 5": one token after whitespace
            token = re.match(r"[^\s$.,;]+", text[i:])
            if token:
                boxes.append(token.group(0))
            pos = i + (token.end() if token else 1)
        else:
            pos = m.end()
    return boxes, unclosed


def _braces_unbalanced(text: str) -> bool:
    depth = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        i += 1
    return depth > 0


def clean_answer(answer: str) -> str:
    """Strip what surrounds an answer but is not part of it: `$…$`, `\\(…\\)`, markdown bold, a final period."""
    s = answer.strip()
    for _ in range(3):
        before = s
        s = s.strip().strip("*").strip()
        if s.startswith("$") and s.endswith("$") and len(s) >= 2:
            s = s.strip("$")
        if s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2]
        if s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2]
        if s.endswith(".") and not s.endswith("..."):
            s = s[:-1]
        if s == before:
            break
    return s.strip()


def _answer_line(text: str, pattern: re.Pattern[str]) -> str | None:
    last = None
    for m in pattern.finditer(text):
        last = m
    if last is None:
        return None
    if "answer" in pattern.groupindex:
        group = last.group("answer")
    else:
        group = last.group(1) if pattern.groups else last.group(0)
    if group is None:
        return None
    # Only the value: "7. Great job!" -> "7", and inline math with trailing prose -> the math.
    value = clean_answer(group)
    math = re.fullmatch(r"\$([^$]+)\$.*", value) or re.fullmatch(r"\\\((.+?)\\\).*", value)
    if math:
        value = math.group(1).strip()
    return value or None


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators, decimals, `a/b` and `\\frac{a}{b}` kept)."""
    last = None
    for m in _NUMBER_RE.finditer(text):
        last = m
    return last.group(0).replace("−", "-") if last else None


def extract_answer(
    completion: str,
    *,
    answer_pattern: str | re.Pattern[str] | None = DEFAULT_ANSWER_PATTERN,
    fallback_last_number: bool = True,
    prefer: Literal["boxed", "answer_line"] = "boxed",
) -> Extraction:
    """Find the final answer of `completion` (see the module docstring for the order).

    `prefer="answer_line"` looks for an answer line before boxes, for prompts that ask for one.
    """
    unbalanced = _braces_unbalanced(completion)
    line: str | None = None
    if answer_pattern is not None:
        pattern = re.compile(answer_pattern) if isinstance(answer_pattern, str) else answer_pattern
        line = _answer_line(completion, pattern)
    if prefer == "answer_line" and line:
        return Extraction(answer=line, source="answer_line", unbalanced_braces=unbalanced)
    boxes, unclosed = find_boxed(completion)
    if unclosed is not None:
        return Extraction(
            answer=unclosed.strip(), source="boxed", n_boxed=len(boxes), truncated=True, unbalanced_braces=True
        )
    if boxes:
        return Extraction(answer=boxes[-1].strip(), source="boxed", n_boxed=len(boxes), unbalanced_braces=unbalanced)
    if line:
        return Extraction(answer=line, source="answer_line", unbalanced_braces=unbalanced)
    if fallback_last_number:
        number = last_number(completion)
        if number is not None:
            return Extraction(answer=number, source="last_number", unbalanced_braces=unbalanced)
    return Extraction(answer=None, source=None, unbalanced_braces=unbalanced)


def gold_answer(label: object) -> str:
    """The reference answer of a dataset label.

    Accepts GSM8K's "reasoning … #### 42" (the text after the last `####`), a MATH solution (the
    content of its last `\\boxed{}`), or a plain answer (`42`, `\\frac{1}{2}`, an int or float).
    """
    if isinstance(label, bool):
        raise TypeError("a bool is not a math answer")
    if isinstance(label, (int, float)):
        return str(label)
    if not isinstance(label, str):
        raise TypeError(f"expected a str or number, got {type(label).__name__}")
    if _GSM8K_MARK in label:
        return clean_answer(label.rsplit(_GSM8K_MARK, 1)[1])
    boxes, unclosed = find_boxed(label)
    if boxes:
        return clean_answer(boxes[-1])
    if unclosed is not None:
        raise ValueError(f"the label opens a \\boxed{{ that never closes: {label[-80:]!r}")
    return clean_answer(label)
