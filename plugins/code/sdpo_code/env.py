"""The ``code`` environment: run a completion's program against a task's tests in a sandbox.

Differences from the SDPO reference's harness (lasgroup/SDPO ``feedback/code.py``), each a defect there
(docs/sandbox.md §8): CPU time, not wall time from the batch start, is what is limited, so contention alone does
not turn correct programs into timeouts (a badly overloaded machine still can, through the wall backstop); the
tests of one solution run sequentially in one sandboxed process; syntax errors are their own verdict; line
numbers are the submitted code's; sandbox faults abstain (reward `None`, no text) instead of being blamed on
the model; the memory limit is always applied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from sdpo_code.extract import Strategy, extract_code
from sdpo_code.feedback import NO_INFO_TEXT, FeedbackOptions, render
from sdpo_code.limits import Limits
from sdpo_code.runner import run_submission
from sdpo_code.sandbox import Sandbox, get_sandbox
from sdpo_code.sandbox._system import cpu_count
from sdpo_code.tasks import TaskFormatError, build_prompt, load_bundled, parse_task
from sdpo_code.verdicts import Judgement, Verdict
from sdpo_envs import Environment, Feedback, Task, Turn

logger = logging.getLogger(__name__)

RewardMode = Literal["all", "fraction"]
RETRY_TEXT = "Fix the program and reply with the whole corrected program in a ```python block."


class CodeEnvironment(Environment):
    """Scores Python programs against LiveCodeBench-style (stdin and functional) or HumanEval tests.

    Tasks: LiveCodeBench rows, ``{"prompt", "tests": [...]}`` rows, or HumanEval rows (see
    `sdpo_code.tasks`). A ``truncated`` column (the completion hit the length limit) turns a missing code
    block into the reference's "Truncated Attempt" feedback.

    Args:
        backend (`str` or `Sandbox`, *optional*, defaults to `"auto"`): ``"bwrap"``, ``"process"``,
            ``"docker"``, any backend a plugin registers, ``"auto"`` (bwrap, or an error saying how to opt in
            to ``"process"``, which does not isolate enough for untrusted code), or a ready sandbox object.
            A backend that cannot work here raises.
        sandbox_options (`dict`, *optional*): keyword arguments for the backend (e.g. ``{"image": ...}`` for
            docker, ``{"python": "/usr/bin/python3"}``).
        reward (`str`, *optional*, defaults to `"all"`): ``"all"`` gives 1 only when every test passes (as
            the reference); ``"fraction"`` gives the fraction of tests passed.
        extract (`str`, *optional*, defaults to `"last"`): which fenced block is the program: ``"last"``,
            ``"longest"`` (the reference) or ``"first"``.
        allow_unfenced (`bool`, *optional*, defaults to `False`): take a completion without any code fence
            as the program.
        limits (`Limits` or `dict`, *optional*): every resource limit at once (`sdpo_code.limits.Limits`, or a
            dict of its fields as ``--env-kwargs`` JSON gives); its defaults are the only defaults. The named
            limits below override single fields of it.
        time_limit (`float`, *optional*, defaults to 1.0): CPU seconds per test, unless the task has a
            ``time_limit``.
        wall_factor (`float`, *optional*, defaults to 3.0): per-test wall-clock backstop, as a multiple of the
            time limit (plus one second).
        task_time_limit (`float`, *optional*): wall seconds for all tests of one submission; by default the
            sum of the per-test backstops.
        memory_mb (`int`, *optional*, defaults to 1024): address-space limit per submission.
        output_limit_bytes (`int`, *optional*, defaults to 8 MiB): output per test before Output Limit
            Exceeded.
        nproc (`int`, *optional*, defaults to 64): processes and threads a program may have.
        nofile (`int`, *optional*, defaults to 64): open file descriptors per process.
        float_tolerance (`float`, *optional*): also accept float tokens within this relative/absolute error
            (default: exact `Decimal` equality, as LiveCodeBench).
        show_hidden_tests (`bool`, *optional*, defaults to `False`): show private tests' inputs and outputs in
            the feedback.
        show_expected_output (`bool`, *optional*, defaults to `True`): show the expected output of a failed
            visible test.
        max_feedback_chars (`int`, *optional*, defaults to 2000): cap on the feedback text.
        max_workers (`int`, *optional*): submissions scored at once; defaults to the number of CPUs.
    """

    description: ClassVar[str] = "Python programs run against LiveCodeBench-style or HumanEval tests in a sandbox"
    concurrency: Literal["thread", "process"] = "thread"  # each episode is a subprocess already
    error_reward: float | None = None  # a sandbox fault abstains

    def __init__(
        self,
        *,
        backend: str | Sandbox = "auto",
        sandbox_options: Mapping[str, Any] | None = None,
        reward: RewardMode = "all",
        extract: Strategy = "last",
        allow_unfenced: bool = False,
        limits: Limits | Mapping[str, Any] | None = None,
        time_limit: float | None = None,
        wall_factor: float | None = None,
        task_time_limit: float | None = None,
        memory_mb: int | None = None,
        output_limit_bytes: int | None = None,
        nproc: int | None = None,
        nofile: int | None = None,
        float_tolerance: float | None = None,
        show_hidden_tests: bool = False,
        show_expected_output: bool = True,
        max_feedback_chars: int = 2000,
        max_workers: int | None = None,
    ) -> None:
        if reward not in ("all", "fraction"):
            raise ValueError(f"reward must be 'all' or 'fraction', got {reward!r}")
        if extract not in ("last", "longest", "first"):
            raise ValueError(f"extract must be 'last', 'longest' or 'first', got {extract!r}")
        if max_feedback_chars <= 0:
            raise ValueError(f"max_feedback_chars must be positive, got {max_feedback_chars!r}")
        named = {"time_limit": time_limit, "wall_factor": wall_factor, "task_time_limit": task_time_limit,
                 "memory_mb": memory_mb, "output_bytes": output_limit_bytes, "nproc": nproc, "nofile": nofile}
        self.limits = Limits.coerce(limits).replace(**{k: v for k, v in named.items() if v is not None})
        self.sandbox = get_sandbox(backend, **dict(sandbox_options or {}))
        self._owns_sandbox = isinstance(backend, str)
        self.reward_mode: RewardMode = reward
        self.extract = extract
        self.allow_unfenced = allow_unfenced
        self.float_tolerance = float_tolerance
        self.feedback_options = FeedbackOptions(show_hidden_tests=show_hidden_tests,
                                                show_expected_output=show_expected_output,
                                                max_chars=max_feedback_chars)
        self.max_workers = max_workers or cpu_count()
        logger.info("sdpo-code: sandbox backend %r: %s", self.sandbox.name, self.sandbox.isolation)

    def __repr__(self) -> str:
        return f"CodeEnvironment(backend={self.sandbox.name!r}, reward={self.reward_mode!r})"

    def close(self) -> None:
        """Also stop the sandboxes this environment started (a sandbox passed in is the caller's to close)."""
        super().close()
        close = getattr(self.sandbox, "close", None)
        if self._owns_sandbox and callable(close):
            close()

    # -------------------------------------------------------------------------------------- Environment
    def prompt(self, task: Task) -> Any:
        """The task's ``prompt`` (text or chat messages), or one built from LiveCodeBench's ``question_content``."""
        if isinstance(task.get("prompt"), list):
            return task["prompt"]
        return build_prompt(task)

    def dataset(self, *, as_dataset: bool = True, chat: bool = True) -> Any:
        """The bundled LiveCodeBench-style problems (`load_bundled`); prompts as chat messages unless `chat=False`.

        Returns a `datasets.Dataset`, or a list of rows with `as_dataset=False`.
        """
        rows = [{**row, "prompt": [{"role": "user", "content": row["prompt"]}] if chat else row["prompt"]}
                for row in load_bundled()]
        if not as_dataset:
            return rows
        from datasets import Dataset

        return Dataset.from_list(rows)

    def score(self, task: Task, completion: str) -> Feedback:
        try:
            parsed = parse_task(task)
        except TaskFormatError as exc:  # bad test data is never the model's fault
            return self._abstain(f"bad task: {exc}", task)
        code = extract_code(completion, self.extract, allow_unfenced=self.allow_unfenced)
        if code is None:
            verdict = Verdict.TRUNCATED if _truthy(task.get("truncated")) else Verdict.NO_CODE
            judgement = Judgement(verdict)
        else:
            judgement = run_submission(self.sandbox, parsed, code, self.limits, stop_early=self.reward_mode == "all",
                                       float_tolerance=self.float_tolerance)
        if judgement.verdict is Verdict.HARNESS_ERROR:
            return self._abstain(judgement.message or "sandbox failure", task)
        return self.feedback(judgement)

    def respond(self, task: Task, history: Sequence[Turn]) -> str:
        """The next turn's observation: the last program's feedback (the failing test with its input, expected
        and actual output, or the error and traceback), and what to send back."""
        text = history[-1].feedback.text or NO_INFO_TEXT
        return f"{text}\n\n{RETRY_TEXT}"

    # ------------------------------------------------------------------------------------------ helpers
    def feedback(self, judgement: Judgement) -> Feedback:
        """Reward, text and details for a judged submission."""
        n = len(judgement.tests)
        passed = judgement.passed
        accepted = judgement.verdict is Verdict.ACCEPTED
        reward = (passed / n if n else 0.0) if self.reward_mode == "fraction" else float(accepted)
        details: dict[str, Any] = {
            "verdict": judgement.verdict.value,
            "passed": passed,
            "total": n,
            "tests": [t.summary() for t in judgement.tests],
            "backend": self.sandbox.name,
            **(judgement.info or {}),
        }
        if judgement.message:
            details["message"] = judgement.message
        return Feedback(reward=reward, text=render(judgement, self.feedback_options), success=accepted,
                        details=details)

    def _abstain(self, reason: str, task: Task) -> Feedback:
        task_id = task.get("task_id", task.get("question_id")) if isinstance(task, Mapping) else None
        logger.warning("sdpo-code: abstaining on task %s: %s", task_id, reason)
        return self.failed_feedback(reason, verdict=Verdict.HARNESS_ERROR.value, backend=self.sandbox.name)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)
