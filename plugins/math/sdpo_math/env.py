"""The `math` environment: extract the final answer, check it, and say what went wrong.

Reward and verdict (`Feedback.details["verdict"]`):

| verdict | reward | meaning |
|---|---|---|
| `correct` | 1 | equivalent to the reference, in the requested format |
| `format` | `unformatted_scale` | equivalent, but found only outside the requested format |
| `wrong_answer` | 0 | an answer was given and it is not equivalent |
| `unparsable` | 0 | the answer is not a readable math expression (malformed LaTeX, prose) |
| `no_answer` | 0 | no answer at all (empty completion, empty box, no number) |
| `truncated` | 0 | the answer box was opened but the text ended first |
| `checker_timeout` / `checker_error` | `None` | the checker failed or ran out of time: abstain |

Time bounds: one check takes at most `timeout` seconds; a batch's checks share one budget,
`batch_timeout`: a check that math-verify would have to decide and that cannot start (or finish)
before it ends abstains as `checker_timeout`, with the reason in `details["error"]`. Numeric answers
too large to compute (`10^{10^{10}}`, `(10^9)!`) are judged by their size without sympy
(`sdpo_math.magnitude`): wrong at once when the size differs from the reference's.

The feedback text is written for the SDPO teacher. It never contains the reference answer unless
`reveal_answer=True` (that leaks the label; docs/algorithm.md §5). A correct answer has empty text.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from sdpo_envs import Completion, Environment, Feedback, Task, Turn, completion_text
from sdpo_math.checker import CheckerPool, CheckResult, MathChecker
from sdpo_math.data import SYSTEM_PROMPTS, AnswerFormat, generate_problems, make_prompt
from sdpo_math.extract import DEFAULT_ANSWER_PATTERN, Extraction, extract_answer, gold_answer

if TYPE_CHECKING:
    import datasets

Verdict = Literal["correct", "format", "wrong_answer", "unparsable", "no_answer", "truncated", "checker_timeout",
                  "checker_error"]
_SHOWN_CHARS = 120


def show(text: str, limit: int = _SHOWN_CHARS) -> str:
    """`text` for the feedback: a long answer (a 400-digit number) is cut with its length noted."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


_HOW = {
    "boxed": "put the final answer in \\boxed{}",
    "answer_line": 'end with a line "Answer: <the final answer>"',
}


class MathEnvironment(Environment):
    """Math problems with a reference answer (`task["answer"]`), checked with math-verify.

    Args:
        answer_format (`str`, *optional*, defaults to `"boxed"`): what the prompt asks for, `"boxed"`
            (`\\boxed{}`) or `"answer_line"` ("Answer: 42").
        answer_pattern (`str`, *optional*, defaults to `DEFAULT_ANSWER_PATTERN`): regex of an answer
            line; group `answer` (or group 1) is the answer. `None` disables answer lines.
        fallback_last_number (`bool`, *optional*, defaults to `True`): with no box or answer line, take
            the last number in the text.
        unformatted_scale (`float`, *optional*, defaults to `0.5`): reward of a right answer found only
            outside the requested format (1.0: the format does not matter; 0.0: it is required).
        reveal_answer (`bool`, *optional*, defaults to `False`): name the reference answer in the feedback
            (it leaks the label to the teacher).
        answer_field (`str`, *optional*, defaults to `"answer"`): the task column with the reference: plain,
            GSM8K's `#### 42`, or a MATH solution with `\\boxed{}`.
        question_field (`str`, *optional*, defaults to `"question"`): the column `prompt(task)` builds a
            prompt from when the task has no `prompt`.
        system_prompt (`str`, *optional*): the instruction; defaults to `SYSTEM_PROMPTS[answer_format]`.
        chat (`bool`, *optional*, defaults to `True`): prompts as chat messages, else plain text.
        timeout (`float`, *optional*, defaults to `5.0`): seconds one math-verify check may take; past it
            the episode abstains (`checker_timeout`).
        batch_timeout (`float`, *optional*, defaults to `30.0`): seconds all the checks of one batch
            (`evaluate`, one trainer call) may take together; rows still undecided then abstain
            (`checker_timeout`). `None`: no batch budget (a batch of N slow answers may cost N x
            `timeout` / workers). Worker start-up is not counted.
        checker (`str`, *optional*, defaults to `"process"`): `"process"` (worker pool, bounded from any
            thread), `"inline"` (the calling thread; bounded only in a main thread), or a `MathChecker`.
        checker_workers (`int`, *optional*): size of a private worker pool; default: the shared pool.
        size (`int`, *optional*, defaults to `1000`): rows of `dataset()`.
        difficulty (`int`, *optional*, defaults to `0`): difficulty of `dataset()` (0: one-digit addition).
        seed (`int`, *optional*, defaults to `0`): seed of `dataset()`.
        kind (`str`, *optional*, defaults to `"arithmetic"`): `dataset()` problems: `"arithmetic"`,
            `"word"` or `"mixed"`.
    """

    name = "math"
    description: ClassVar[str] = "Math answers checked with math-verify; feedback on format, truncation, wrong answers"
    # concurrency stays "thread": math-verify already runs in the checker's processes.
    error_reward: float | None = None  # a crash in scoring is ours, not the model's

    def __init__(
        self,
        *,
        answer_format: AnswerFormat = "boxed",
        answer_pattern: str | None = DEFAULT_ANSWER_PATTERN,
        fallback_last_number: bool = True,
        unformatted_scale: float = 0.5,
        reveal_answer: bool = False,
        answer_field: str = "answer",
        question_field: str = "question",
        system_prompt: str | None = None,
        chat: bool = True,
        timeout: float = 5.0,
        batch_timeout: float | None = 30.0,
        checker: Literal["process", "inline"] | MathChecker = "process",
        checker_workers: int | None = None,
        size: int = 1000,
        difficulty: int = 0,
        seed: int = 0,
        kind: Literal["arithmetic", "word", "mixed"] = "arithmetic",
    ) -> None:
        if answer_format not in SYSTEM_PROMPTS:
            raise ValueError(f"answer_format must be one of {sorted(SYSTEM_PROMPTS)}, got {answer_format!r}")
        if not 0.0 <= unformatted_scale <= 1.0:
            raise ValueError(f"unformatted_scale must be in [0, 1], got {unformatted_scale!r}")
        if batch_timeout is not None and not batch_timeout > 0:
            raise ValueError(f"batch_timeout must be a positive number of seconds or None, got {batch_timeout!r}")
        if answer_pattern is not None:
            re.compile(answer_pattern)  # fail at construction, not on the first completion
        self.answer_format: AnswerFormat = answer_format
        self.answer_pattern = answer_pattern
        self.fallback_last_number = fallback_last_number
        self.unformatted_scale = float(unformatted_scale)
        self.reveal_answer = reveal_answer
        self.answer_field = answer_field
        self.question_field = question_field
        self.system_prompt = system_prompt
        self.chat = chat
        self.batch_timeout = batch_timeout
        if isinstance(checker, MathChecker):
            self.checker = checker
        else:
            pool = CheckerPool(max_workers=checker_workers) if checker_workers else None
            self.checker = MathChecker(timeout=timeout, mode=checker, pool=pool)
        self.dataset_options: dict[str, Any] = {"n": size, "difficulty": difficulty, "seed": seed, "kind": kind}

    # ----------------------------------------------------------------------------------- prompts
    def prompt(self, task: Task) -> str | list[dict[str, Any]]:
        """The task's `prompt` column, or one built from its question with this environment's instruction."""
        if "prompt" in task:
            return task["prompt"]
        if self.question_field not in task:
            raise KeyError(f"math: task has neither 'prompt' nor {self.question_field!r} (fields: {sorted(task)})")
        return make_prompt(
            task[self.question_field],
            answer_format=self.answer_format,
            chat=self.chat,
            system_prompt=self.system_prompt,
        )

    def dataset(self, *, as_dataset: bool = True) -> datasets.Dataset | list[dict[str, Any]]:
        """The procedural problem set this environment was made with (`size`, `difficulty`, `seed`, `kind`)."""
        return generate_problems(
            **self.dataset_options, answer_format=self.answer_format, chat=self.chat,
            system_prompt=self.system_prompt, as_dataset=as_dataset,
        )

    # ----------------------------------------------------------------------------------- scoring
    def score(self, task: Task, completion: str) -> Feedback:
        return self._score(task, completion, None)

    def score_batch(
        self,
        tasks: Sequence[Task],
        completions: Sequence[Completion],
        *,
        extra: Mapping[str, Any],
        max_workers: int | None,
        timeout: float | None,
    ) -> list[Feedback]:
        """Score a batch under one time budget (`batch_timeout`), concurrently unless the checker is inline
        (then in this thread, where its timeout can be enforced). `timeout` is not used: checks are bounded."""
        deadline = None if self.batch_timeout is None else time.monotonic() + self.batch_timeout
        texts = [completion_text(c) for c in completions]

        def one(row: int) -> Feedback:
            try:
                return self._score(tasks[row], texts[row], deadline)
            except Exception as exc:  # a malformed task must not stop the batch
                return self.failed_feedback(f"{type(exc).__name__}: {exc}")

        workers = min(len(tasks), max_workers or self.max_workers or 16)
        if self.checker.mode == "inline" or workers <= 1:
            return [one(row) for row in range(len(tasks))]
        with ThreadPoolExecutor(workers, thread_name_prefix=f"sdpo-{self.label}") as executor:
            return list(executor.map(one, range(len(tasks))))

    def _score(self, task: Task, completion: str, deadline: float | None) -> Feedback:
        if self.answer_field not in task:
            raise KeyError(f"math: task has no {self.answer_field!r} field (fields: {sorted(task)})")
        expected = gold_answer(task[self.answer_field])
        found = extract_answer(
            completion, answer_pattern=self.answer_pattern, fallback_last_number=self.fallback_last_number,
            prefer=self.answer_format,
        )
        details: dict[str, Any] = {
            "source": found.source,
            "answer": found.answer,
            "expected": expected,
            "n_boxed": found.n_boxed,
            "truncated": found.truncated,
            "in_format": found.source == self.answer_format,
        }
        if not completion.strip():
            return self._fail("no_answer", f"The response is empty. Solve the problem and {self._how}.", details)
        if found.truncated:
            cut = f" after `{show(found.answer)}`" if found.answer else ""
            return self._fail(
                "truncated",
                f"The response was cut off{cut}: the \\boxed{{ of the final answer is never closed. "
                "Keep the reasoning shorter and close the box.",
                details,
            )
        if not found.answer:
            return self._fail("no_answer", self._no_answer_text(found), details)
        check = self.checker.check(expected, found.answer, deadline=deadline)
        details.update(check.details, checked_by=check.by, check_seconds=round(check.seconds, 6))
        return self._judge(found, check, details)

    @property
    def _how(self) -> str:
        return _HOW[self.answer_format]

    def _fail(self, verdict: Verdict, text: str, details: dict[str, Any], reward: float | None = 0.0) -> Feedback:
        if self.reveal_answer and verdict not in ("checker_timeout", "checker_error"):
            text += f" The correct answer is {show(details['expected'])}."
        return Feedback(reward=reward, text=text, success=False, details={**details, "verdict": verdict})

    def _no_answer_text(self, found: Extraction) -> str:
        if found.n_boxed:
            return f"The \\boxed{{}} is empty: {self._how}, with the value inside."
        if found.unbalanced_braces:
            return (f"No final answer was found; the response seems cut off (a brace is never closed). "
                    f"Keep it shorter and {self._how}.")
        return f"No final answer was found: {self._how}."

    def _judge(self, found: Extraction, check: CheckResult, details: dict[str, Any]) -> Feedback:
        answer = show(found.answer or "")
        if check.outcome == "timeout":
            return self._fail("checker_timeout", "", {**details, "error": check.details.get("error")}, reward=None)
        if check.outcome == "error":
            return self._fail("checker_error", "", {**details, "error": check.details.get("error")}, reward=None)
        if check.outcome == "equal":
            if details["in_format"]:
                return Feedback(reward=1.0, text="", success=True, details={**details, "verdict": "correct"})
            what = "The last number you wrote" if found.source == "last_number" else "Your answer"
            return Feedback(
                reward=self.unformatted_scale,
                text=f"{what}, `{answer}`, is right, but it is not in the requested format: {self._how}.",
                success=False,
                details={**details, "verdict": "format"},
            )
        notes = []
        if found.n_boxed > 1:
            notes.append(f"You gave {found.n_boxed} boxed answers; only the last one counts.")
        if check.outcome == "unparsable":
            text = (f"Your final answer `{answer}` could not be read as a math expression "
                    f"(malformed LaTeX or words?). Write only the value.")
            return self._fail("unparsable", " ".join([text, *notes, self._format_note(found)]).strip(), details)
        if found.source == "last_number":
            text = f"No final answer was found ({self._how}); the last number you wrote, `{answer}`, is not correct."
        else:
            text = f"Your final answer `{answer}` is not correct."
        symbols = check.details.get("answer_symbols") or []
        unknowns = sorted(set(symbols) - set(check.details.get("gold_symbols") or []))
        if unknowns and check.details.get("answer_parsed"):
            notes.append(f"It was read as `{show(check.details['answer_parsed'])}`, with unknowns "
                         f"{', '.join(unknowns)}: give only the value, without words or units.")
        return self._fail("wrong_answer", " ".join([text, *notes, self._format_note(found)]).strip(), details)

    def _format_note(self, found: Extraction) -> str:
        if found.source in (None, "last_number") or found.source == self.answer_format:
            return ""
        return f"Also, {self._how}."

    def respond(self, task: Task, history: Sequence[Turn]) -> str:
        """The next turn's observation: what was wrong with the last answer, and "try again".

        The text is the attempt's feedback, so it names the model's answer and never the reference unless
        `reveal_answer=True`.
        """
        text = history[-1].feedback.text or "Your final answer is not correct."
        return f"{text} Try again."

    def close(self) -> None:
        """Stop this environment's private checker pool, if it has one (the shared pool stops at exit)."""
        self.checker.close()
        super().close()
