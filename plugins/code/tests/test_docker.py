"""The docker backend on a real engine (the session's private dockerd, see conftest): its image is built
from this machine's Python, and its verdicts equal bwrap's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sdpo_code import CodeEnvironment


def test_docker_verdicts_equal_bwraps(backend_by_name, verdict_cases):
    """The bundled problems and a LiveCodeBench row, with right programs and six ways to fail (exit,
    time, exception, memory, output, syntax): the same verdict, reward and text on both backends."""
    docker, bwrap = backend_by_name("docker"), backend_by_name("bwrap")
    rows, completions = verdict_cases

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
