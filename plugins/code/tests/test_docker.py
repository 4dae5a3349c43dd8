"""The docker backend on a real engine (the session's private dockerd, see conftest): its image is built
from this machine's Python, and its verdicts equal bwrap's."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import zlib

from sdpo_code import CodeEnvironment, load_bundled

_PRIVATE = [{"input": "5 7\n", "output": "12\n", "testtype": "stdin"}]
LCB_STDIN = {  # a LiveCodeBench row as the dataset ships it: JSON strings, private tests encoded
    "question_content": "Print the sum of two integers.",
    "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
    "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(json.dumps(_PRIVATE)))).decode(),
    "metadata": "{}",
}

ATTEMPTS = ("{ok}", "{ok}\nimport sys\nsys.exit(1)", "while True:\n    pass", "raise ValueError('no')",
            "x = [0] * (1 << 40)", "print('x' * (9 << 20))", "def broken(:\n    pass")


def _cases(solutions: dict[str, str]) -> tuple[list[dict], list[str]]:
    """Every bundled problem with its right program; the first one and the LiveCodeBench row also with every
    way to fail."""
    bundled = load_bundled()
    rows = [*bundled, LCB_STDIN]
    programs = [solutions[r["task_id"]] for r in bundled] + [solutions["sdpo-001"]]
    for row in (bundled[0], LCB_STDIN):
        for attempt in ATTEMPTS[1:]:
            rows.append(row)
            programs.append(attempt.format(ok=solutions["sdpo-001"]))
    return rows, [f"```python\n{p}\n```" for p in programs]


def test_docker_verdicts_equal_bwraps(backend_by_name, reference_solutions):
    """The bundled problems and a LiveCodeBench row, with right programs and six ways to fail (exit,
    time, exception, memory, output, syntax): the same verdict, reward and text on both backends."""
    docker, bwrap = backend_by_name("docker"), backend_by_name("bwrap")
    rows, completions = _cases(reference_solutions)

    def judge(sandbox):
        feedback = CodeEnvironment(backend=sandbox, memory_mb=256).evaluate(rows, completions)
        return [(fb.details["verdict"], fb.reward, fb.text) for fb in feedback]

    on_docker, on_bwrap = judge(docker), judge(bwrap)
    assert on_docker == on_bwrap
    assert {v for v, _, _ in on_bwrap} >= {"Accepted", "Runtime Error", "Time Limit Exceeded", "Memory Limit Exceeded",
                                          "Output Limit Exceeded", "Syntax Error"}


def test_build_image_and_doctor_through_the_cli(backend_by_name):
    backend_by_name("docker")  # the private engine is up, or this skips
    env = {**os.environ, "SDPO_LOAD_PLUGINS": "sdpo-code", "DOCKER_HOST": os.environ["SDPO_TEST_DOCKER_HOST"]}
    cli = [sys.executable, "-m", "sdpo_core.app.cli"]
    built = subprocess.run([*cli, "sandbox", "build-image", "docker", "--tag", "sdpo-code-test:cli"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("built sdpo-code-test:cli (sha256:")
    doctor = subprocess.run([*cli, "sandbox", "doctor", "--json"], env=env, capture_output=True, text=True,
                            timeout=300)
    reports = {r["name"]: r for r in json.loads(doctor.stdout)}
    assert reports["docker"]["works"] is True, reports["docker"]["detail"]
    assert "the engine's kernel (shared with its other containers)" in reports["docker"]["not_isolated"]
