"""Verdicts and per-test outcomes: the typed results the feedback text and the reward are built from."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Verdict(enum.StrEnum):
    """What happened to a submission (or one of its tests). The value is the judge-style label.

    Every verdict but `HARNESS_ERROR` is the model's doing; `HARNESS_ERROR` (the sandbox failed to start,
    malformed test data) abstains: reward `None`, no feedback text.
    """

    ACCEPTED = "Accepted"
    WRONG_ANSWER = "Wrong Answer"
    TIME_LIMIT = "Time Limit Exceeded"
    RUNTIME_ERROR = "Runtime Error"
    SYNTAX_ERROR = "Syntax Error"
    MEMORY_LIMIT = "Memory Limit Exceeded"
    OUTPUT_LIMIT = "Output Limit Exceeded"
    NO_CODE = "No Code Found"
    TRUNCATED = "Truncated"
    NOT_RUN = "Not Run"
    HARNESS_ERROR = "Harness Error"


# When several tests fail differently, the feedback shows the most informative kind first.
FAILURE_PRIORITY = (
    Verdict.RUNTIME_ERROR,
    Verdict.MEMORY_LIMIT,
    Verdict.TIME_LIMIT,
    Verdict.OUTPUT_LIMIT,
    Verdict.WRONG_ANSWER,
)


@dataclass(frozen=True)
class TestOutcome:
    """The verdict of one test, with what the feedback may need to show.

    Args:
        index (`int`): position of the test in the task (public tests first, 0-based).
        verdict (`Verdict`): the test's verdict.
        hidden (`bool`): a private test; its input and outputs are not shown unless configured.
        input (`str`): the input as the feedback renders it (stdin text, one JSON argument per line, or the
            failing assertion of a HumanEval check).
        expected (`str` or `None`): the expected output, rendered.
        actual (`str` or `None`): what the program printed or returned.
        trace (`str` or `None`): the error message and the submitted code's last frames.
        debug (`str` or `None`): what the program wrote besides its answer (stdout of functional code,
            stderr of stdin programs).
        cpu_seconds (`float`) and wall_seconds (`float`): measured inside the sandbox.
    """

    __test__ = False  # not a pytest class

    index: int
    verdict: Verdict
    hidden: bool = False
    input: str = ""
    expected: str | None = None
    actual: str | None = None
    trace: str | None = None
    debug: str | None = None
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.ACCEPTED

    def summary(self) -> dict[str, Any]:
        """A compact, JSON-ready record for `Feedback.details` (no inputs or outputs)."""
        out: dict[str, Any] = {"index": self.index, "verdict": self.verdict.value, "hidden": self.hidden,
                               "cpu_seconds": round(self.cpu_seconds, 4), "wall_seconds": round(self.wall_seconds, 4)}
        if self.trace:
            out["error"] = self.trace.splitlines()[0][:200]
        return out


@dataclass(frozen=True)
class Judgement:
    """The verdict of a whole submission.

    Args:
        verdict (`Verdict`): `ACCEPTED` iff every test passed; otherwise the verdict of the shown failure
            (or `SYNTAX_ERROR`, `NO_CODE`, `TRUNCATED`, `HARNESS_ERROR` for the submission as a whole).
        tests (`tuple[TestOutcome, ...]`): per-test outcomes, in task order (empty when nothing ran).
        message (`str` or `None`): a whole-submission message (the syntax error, the harness fault).
        code (`str` or `None`): the code that was run.
        info (`dict`): backend, timings.
    """

    verdict: Verdict
    tests: tuple[TestOutcome, ...] = ()
    message: str | None = None
    code: str | None = None
    info: dict[str, Any] | None = None

    @property
    def passed(self) -> int:
        return sum(t.passed for t in self.tests)
