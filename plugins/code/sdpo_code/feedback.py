"""The feedback text the teacher reads, in the SDPO reference's LeetCode style (lasgroup/SDPO
``verl/utils/reward_score/feedback/code.py:604-745``), with the reference's defects fixed.

Which failure is shown (only failures; a full pass renders ``""``):

1. a whole-submission problem, alone: truncated completion, no code, syntax error;
2. else the failing tests of the most informative kind (runtime error, memory limit, time limit, output
   limit, then wrong answer): one case for the first four kinds, at most `max_cases` wrong answers.
   Within a kind, hidden tests are shown only when no visible one failed, and shorter cases come first
   (``len(input) + len(output)``, as the reference sorts wrong answers).

Blocks (one item per line, cases separated by a blank line)::

    Runtime Error / Memory Limit Exceeded / Time Limit Exceeded / Output Limit Exceeded
    <trace, runtime errors only>
    <blank>
    Last Executed Input
    <input>
    [<blank> Debug Output <lines>]

    Test Case {n}: Wrong Answer
    <blank>
    Input
    <input>
    <blank>
    Output
    <actual>
    <blank>
    Expected                       (only with show_expected_output)
    <expected>
    [<blank> Debug Output <lines>]

A hidden test shows its verdict and trace but says ``(hidden test case)`` instead of its data, unless
`show_hidden_tests`. Limits: input ≤ 8 lines of ≤ 250 chars then ``... (N more lines)``; outputs ≤ 250
chars then ``...``; debug ≤ 10 lines of ≤ 300 chars; the whole text right-stripped and cut to `max_chars`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sdpo_code.verdicts import FAILURE_PRIORITY, Judgement, TestOutcome, Verdict

TRUNCATED_TEXT = (
    "Truncated Attempt: Your previous response was too long and truncated because it reached the maximum "
    "response length. Try again with a shorter response."
)
NO_CODE_TEXT = "Incorrect Format: Put your code inside a ```python ... ``` block."
NO_INFO_TEXT = "No test execution information available."
HIDDEN_TEXT = "(hidden test case)"

INPUT_LINES, INPUT_LINE_CHARS, OUTPUT_CHARS, DEBUG_LINES, DEBUG_LINE_CHARS = 8, 250, 250, 10, 300


@dataclass(frozen=True)
class FeedbackOptions:
    """How much the feedback may reveal and how long it may be."""

    show_hidden_tests: bool = False
    show_expected_output: bool = True
    max_chars: int = 2000
    max_cases: int = 2


def clip_input(text: str) -> str:
    """≤ 8 lines of ≤ 250 characters, then how many lines were left out."""
    lines = text.rstrip("\n").split("\n")
    shown = [line if len(line) <= INPUT_LINE_CHARS else line[:INPUT_LINE_CHARS] + "..."
             for line in lines[:INPUT_LINES]]
    if len(lines) > INPUT_LINES:
        shown.append(f"... ({len(lines) - INPUT_LINES} more lines)")
    return "\n".join(shown)


def clip_output(text: str) -> str:
    """≤ 250 characters, then ``...``."""
    text = text.rstrip("\n")
    return text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS] + "..."


def clip_debug(text: str) -> str:
    """≤ 10 lines of ≤ 300 characters."""
    lines = text.rstrip("\n").split("\n")[:DEBUG_LINES]
    return "\n".join(line if len(line) <= DEBUG_LINE_CHARS else line[:DEBUG_LINE_CHARS] + "..." for line in lines)


def _debug(case: TestOutcome) -> list[str]:
    return ["", "Debug Output", clip_debug(case.debug)] if case.debug and case.debug.strip() else []


def _limit_block(case: TestOutcome, opts: FeedbackOptions) -> list[str]:
    lines = [case.verdict.value]
    if case.verdict is Verdict.RUNTIME_ERROR and case.trace:
        lines.append(case.trace)
    lines += ["", "Last Executed Input"]
    lines.append(HIDDEN_TEXT if case.hidden and not opts.show_hidden_tests else clip_input(case.input))
    return lines + _debug(case)


def _wrong_answer_block(case: TestOutcome, opts: FeedbackOptions) -> list[str]:
    lines = [f"Test Case {case.index + 1}: Wrong Answer", ""]
    if case.hidden and not opts.show_hidden_tests:
        return [*lines, HIDDEN_TEXT]
    lines += ["Input", clip_input(case.input), "", "Output", clip_output(case.actual or "")]
    if opts.show_expected_output and case.expected is not None:
        lines += ["", "Expected", clip_output(case.expected)]
    return lines + _debug(case)


def _sort_key(case: TestOutcome) -> tuple[bool, int, int]:
    return (case.hidden, len(case.input) + len(case.actual or ""), case.index)


def select_cases(tests: Sequence[TestOutcome], max_cases: int = 2) -> list[TestOutcome]:
    """The failing tests the feedback shows (see the module docstring)."""
    for verdict in FAILURE_PRIORITY:
        cases = sorted((t for t in tests if t.verdict is verdict), key=_sort_key)
        if any(not c.hidden for c in cases):
            cases = [c for c in cases if not c.hidden]  # a visible case teaches more than a hidden one
        if cases:
            return cases[: max_cases if verdict is Verdict.WRONG_ANSWER else 1]
    return []


def render(judgement: Judgement, opts: FeedbackOptions | None = None) -> str:
    """The feedback text for a judged submission; ``""`` when every test passed."""
    opts = opts or FeedbackOptions()
    verdict = judgement.verdict
    if verdict in (Verdict.ACCEPTED, Verdict.HARNESS_ERROR):
        return ""
    if verdict is Verdict.TRUNCATED:
        text = TRUNCATED_TEXT
    elif verdict is Verdict.NO_CODE:
        text = NO_CODE_TEXT
    elif verdict is Verdict.SYNTAX_ERROR:
        text = f"{Verdict.SYNTAX_ERROR.value}\n{judgement.message or ''}"
    else:
        cases = select_cases(judgement.tests, opts.max_cases)
        if not cases:
            text = NO_INFO_TEXT
        else:
            blocks = [_wrong_answer_block(c, opts) if c.verdict is Verdict.WRONG_ANSWER else _limit_block(c, opts)
                      for c in cases]
            text = "\n\n".join("\n".join(block) for block in blocks)
    return text.rstrip()[: opts.max_chars]


def format_trace(exc_type: str, message: str, frames: Sequence[Sequence[object]]) -> str:
    """``ExcType: message`` then the submitted code's last ≤ 3 frames, each as its source line and
    ``Line N in <func> (Solution.py)``."""
    head = f"{exc_type}: {message}" if message else exc_type
    lines = [head]
    for lineno, func, source in list(frames)[-3:]:
        if source:
            lines.append(f"  {source}")
        lines.append(f"Line {lineno} in {func} (Solution.py)")
    return "\n".join(lines)


def format_syntax_error(exc_type: str, message: str, lineno: int | None, text: str | None) -> str:
    """``SyntaxError: message``, the offending line, and ``Line N (Solution.py)``."""
    lines = [f"{exc_type}: {message}"]
    if text and text.strip():
        lines.append(f"  {text.strip()}")
    if lineno:
        lines.append(f"Line {lineno} (Solution.py)")
    return "\n".join(lines)
