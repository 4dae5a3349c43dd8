"""Judging one submission: task + code -> sandbox request -> harness events -> per-test verdicts.

Why comparison happens here and not in the sandbox: expected outputs never enter the sandbox, so a program
cannot read them and print them back, and a program that corrupts the harness cannot forge a pass.

Attribution rule: anything that goes wrong before the harness says ``ready`` (the sandbox did not start,
the payload could not be sent) is a harness error and abstains; from ``ready`` on, the submitted program is
running, so a dead, silent or killed sandbox is the program's doing (a runtime error, a time or memory
limit), never an abstention it could use to dodge a zero.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Mapping
from typing import Any

from sdpo_code.compare import stdout_matches, value_matches
from sdpo_code.feedback import format_syntax_error, format_trace
from sdpo_code.limits import Limits
from sdpo_code.sandbox.base import ExecutionRequest, ExecutionResult, Sandbox
from sdpo_code.tasks import CodeTask
from sdpo_code.verdicts import FAILURE_PRIORITY, Judgement, TestOutcome, Verdict

logger = logging.getLogger(__name__)


_STATUS_VERDICT = {
    "timeout": Verdict.TIME_LIMIT,
    "wall_timeout": Verdict.TIME_LIMIT,
    "memory": Verdict.MEMORY_LIMIT,
    "output_limit": Verdict.OUTPUT_LIMIT,
}
_SIGNAL_VERDICT = {int(signal.SIGXCPU): Verdict.TIME_LIMIT, int(signal.SIGXFSZ): Verdict.OUTPUT_LIMIT}


def build_request(task: CodeTask, code: str, limits: Limits, *, stop_early: bool) -> ExecutionRequest:
    """The sandbox request for `code` on `task` (inputs only: expected outputs stay here)."""
    cpu = float(task.time_limit or limits.time_limit)
    wall = cpu * limits.wall_factor + limits.wall_slack
    n = len(task.tests)
    if task.kind == "functional":
        inputs: tuple[Any, ...] = tuple([json.loads(line) for line in t.input.split("\n")] for t in task.tests)
    elif task.kind == "humaneval":
        inputs = (None,) * n
    else:
        inputs = tuple(t.input for t in task.tests)
    prefix = None
    if task.kind == "humaneval":
        assert task.entry_point is not None
        if f"def {task.entry_point}" not in code and task.code_prefix:
            code = task.code_prefix + code  # a continuation of the prompt, HumanEval's native format
        else:
            prefix = task.code_prefix
    return ExecutionRequest(
        mode=task.kind,
        code=code,
        inputs=inputs,
        cpu_limits=(cpu,) * n,
        wall_limits=(wall,) * n,
        func_name=task.func_name,
        prefix=prefix,
        test_code=task.test_code,
        entry_point=task.entry_point,
        check_prefix=task.code_prefix if task.kind == "humaneval" else None,
        limits=limits,
        stop_on=("timeout", "wall_timeout", "memory") if stop_early else (),
    )


def _display_input(task: CodeTask, index: int) -> str:
    return task.tests[index].input


def _trace(exc: Mapping[str, Any]) -> str:
    return format_trace(str(exc.get("type", "Error")), str(exc.get("msg", "")), exc.get("frames") or [])


def _outcome_from_result(task: CodeTask, index: int, msg: Mapping[str, Any], *, float_tolerance: float | None,
                         setup: Mapping[str, Any] | None = None) -> TestOutcome:
    test = task.tests[index]
    status = msg.get("status")
    stdout, stderr = str(msg.get("stdout", "")), str(msg.get("stderr", ""))
    base: dict[str, Any] = {"index": index, "hidden": test.hidden, "input": _display_input(task, index),
                            "expected": test.output if task.kind != "humaneval" else None,
                            "cpu_seconds": float(msg.get("cpu", 0.0)), "wall_seconds": float(msg.get("wall", 0.0))}
    debug = stdout if task.kind != "stdin" else stderr
    if setup is not None:  # the module set-up failed: every test inherits its verdict
        msg = setup
        status = msg.get("status")
    if status in _STATUS_VERDICT:
        return TestOutcome(verdict=_STATUS_VERDICT[status], debug=debug, **base)
    if status == "exit":
        return TestOutcome(verdict=Verdict.RUNTIME_ERROR, trace=f"SystemExit: exit code {msg.get('exit_code')}",
                           debug=debug, **base)
    if status == "died":  # the judge saw the program's process end (or wreck its pipe) in the middle of the test
        return TestOutcome(verdict=Verdict.RUNTIME_ERROR, trace=str(msg.get("why", "the program died")),
                           debug=debug, **base)
    if status == "exception":
        exc = msg.get("exc") or {}
        if task.kind == "humaneval" and exc.get("in_test"):
            failing = str(exc.get("test_line") or "check(candidate)")
            got = f"{exc.get('type')}: {exc.get('msg')}" if exc.get("msg") else str(exc.get("type"))
            return TestOutcome(verdict=Verdict.WRONG_ANSWER, **{**base, "input": failing}, actual=got, debug=debug)
        return TestOutcome(verdict=Verdict.RUNTIME_ERROR, trace=_trace(exc), debug=debug, **base)
    if status != "ok":
        return TestOutcome(verdict=Verdict.RUNTIME_ERROR, trace=f"unexpected harness status {status!r}", **base)
    if task.kind == "humaneval":  # the judge ran check() to its end on plain values
        return TestOutcome(verdict=Verdict.ACCEPTED, debug=debug, **base)
    if task.kind == "functional":
        value = msg.get("value")
        actual = value if value is not None else str(msg.get("value_repr", "None"))
        ok = value_matches(value, test.output)
        return TestOutcome(verdict=Verdict.ACCEPTED if ok else Verdict.WRONG_ANSWER, actual=actual, debug=debug,
                           **base)
    ok = stdout_matches(stdout, test.output, float_tolerance=float_tolerance)
    return TestOutcome(verdict=Verdict.ACCEPTED if ok else Verdict.WRONG_ANSWER, actual=stdout, debug=debug, **base)


def _death_verdict(result: ExecutionResult, request: ExecutionRequest) -> tuple[Verdict, str]:
    """Why the sandbox stopped in the middle of a test (the program killed or exited it)."""
    if result.killed == "task_wall":
        return Verdict.TIME_LIMIT, ""
    if result.killed == "flood":
        return Verdict.OUTPUT_LIMIT, ""
    exit_info = result.exit or {}
    sig = exit_info.get("signal")
    if isinstance(sig, int):
        verdict = _SIGNAL_VERDICT.get(sig)
        if verdict is not None:
            return verdict, ""
        if sig == signal.SIGKILL and float(exit_info.get("cpu", 0.0)) >= request.cpu_hard - 1:
            return Verdict.TIME_LIMIT, ""  # RLIMIT_CPU's hard limit: the program ignored SIGXCPU
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return Verdict.RUNTIME_ERROR, f"the program was killed by {name}"
    code = exit_info.get("code")
    if code is not None:
        return Verdict.RUNTIME_ERROR, f"the program exited with code {code} in the middle of the test"
    return Verdict.RUNTIME_ERROR, "the program killed the test harness"


def judge_execution(task: CodeTask, request: ExecutionRequest, result: ExecutionResult, *,
                    float_tolerance: float | None = None) -> Judgement:
    """Per-test verdicts from the harness's events."""
    info = {"seconds": round(result.seconds, 4), "startup_seconds": round(result.startup_seconds, 4)}
    if result.harness_error is not None or not result.ready:
        return Judgement(Verdict.HARNESS_ERROR, message=result.harness_error or "sandbox not ready", code=request.code,
                         info=info)
    if result.compile_error is not None:
        ce = result.compile_error
        message = format_syntax_error(str(ce.get("type", "SyntaxError")), str(ce.get("msg", "")), ce.get("lineno"),
                                      ce.get("text"))
        return Judgement(Verdict.SYNTAX_ERROR, message=message, code=request.code, info=info)
    setup = result.results.get(-1)
    setup_failed = setup if setup is not None and setup.get("status") != "ok" else None
    outcomes: list[TestOutcome] = []
    interrupted = [i for i in result.started if i not in result.results]
    death = _death_verdict(result, request) if interrupted and not result.done else None
    for i, test in enumerate(task.tests):
        if setup_failed is not None:
            outcomes.append(_outcome_from_result(task, i, {}, float_tolerance=float_tolerance, setup=setup_failed))
        elif i in result.results:
            outcomes.append(_outcome_from_result(task, i, result.results[i], float_tolerance=float_tolerance))
        elif death is not None and (i == interrupted[-1] or (interrupted[-1] == -1)):
            verdict, why = death
            outcomes.append(TestOutcome(index=i, verdict=verdict, hidden=test.hidden, input=test.input,
                                        expected=test.output, trace=why or None))
        else:
            outcomes.append(TestOutcome(index=i, verdict=Verdict.NOT_RUN, hidden=test.hidden, input=test.input,
                                        expected=test.output))
    if all(t.passed for t in outcomes):
        verdict = Verdict.ACCEPTED
    else:
        verdict = next((v for v in FAILURE_PRIORITY if any(t.verdict is v for t in outcomes)), Verdict.NOT_RUN)
    return Judgement(verdict, tests=tuple(outcomes), code=request.code, info=info)


def run_submission(sandbox: Sandbox, task: CodeTask, code: str, limits: Limits, *, stop_early: bool,
                   float_tolerance: float | None = None) -> Judgement:
    """Run `code` on `task` in `sandbox` and judge it."""
    request = build_request(task, code, limits, stop_early=stop_early)
    try:
        result = sandbox.run(request)
    except Exception as exc:  # a backend bug or an engine that went away: not the model's fault
        logger.warning("sdpo-code: sandbox %s raised %s: %s", getattr(sandbox, "name", sandbox),
                       type(exc).__name__, exc)
        result = ExecutionResult(ready=False, harness_error=f"{type(exc).__name__}: {exc}")
    return judge_execution(task, request, result, float_tolerance=float_tolerance)
