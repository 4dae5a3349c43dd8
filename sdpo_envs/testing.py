"""Helpers for testing environments and plugins (no pytest dependency).

- `FakeEnvironment`: a tiny, configurable environment (answer check, delays, failures, crashes) for
  tests of trainers, routers and hooks.
- `registered_plugin`: register a plugin object for the duration of a ``with`` block (the yield fixture
  the docs recommend), checked like an installed plugin.
- `check_environment`: the conformance checks every environment should pass, for plugin authors.
- `local_ray_cluster`: a real Ray cluster on this machine (a head and one worker node) for tests of
  `executor="ray"`.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from sdpo_envs.env import Environment
from sdpo_envs.plugins import load_plugins, pm
from sdpo_envs.types import Feedback, StepResult, Task


class FakeEnvironment(Environment):
    """Rewards a completion that contains the task's answer; configurable to be slow, fail or crash.

    Args:
        answer_column (`str`, *optional*, defaults to `"answer"`): the task field holding the answer.
        delay (`float`, *optional*, defaults to `0.0`): seconds each episode sleeps (a task's `delay`
            field overrides it).
        fail_on (`str`, *optional*, defaults to `"FAIL"`): completions containing it make `score` raise.
        crash_on (`str`, *optional*, defaults to `"CRASH"`): completions containing it kill the scoring
            process (`os._exit`) in process mode; in thread mode they raise like `fail_on`.
        concurrency (`str`, *optional*, defaults to `"thread"`): `"thread"` or `"process"`.
        max_workers (`int`, *optional*): the pool size.
        episode_timeout (`float`, *optional*): seconds per episode.
        error_reward (`float`, *optional*, defaults to `0.0`): reward of failed episodes.
    """

    description = "A fake environment for tests: rewards completions containing the answer."

    def __init__(self, answer_column: str = "answer", *, delay: float = 0.0, fail_on: str = "FAIL",
                 crash_on: str = "CRASH", concurrency: Literal["thread", "process"] = "thread",
                 max_workers: int | None = None, episode_timeout: float | None = None,
                 error_reward: float | None = 0.0) -> None:
        self.answer_column = answer_column
        self.delay = delay
        self.fail_on = fail_on
        self.crash_on = crash_on
        self.concurrency = concurrency
        self.max_workers = max_workers
        self.episode_timeout = episode_timeout
        self.error_reward = error_reward
        self.parent_pid = os.getpid()

    def score(self, task: Task, completion: str) -> Feedback:
        delay = float(task.get("delay", self.delay))
        if delay:
            time.sleep(delay)
        if self.crash_on and self.crash_on in completion:
            if os.getpid() != self.parent_pid:
                os._exit(3)
            raise RuntimeError("fake crash")
        if self.fail_on and self.fail_on in completion:
            raise RuntimeError("fake failure")
        answer = str(task.get(self.answer_column, ""))
        details = {"pid": os.getpid(), "answer": answer}
        if answer and answer in completion:
            return Feedback(reward=1.0, text="", success=True, details=details)
        return Feedback(reward=0.0, text=f"The completion does not contain the answer ({len(answer)} characters).",
                        success=False, details=details)


@contextlib.contextmanager
def registered_plugin(plugin: object, name: str | None = None) -> Iterator[str]:
    """Register `plugin` (a module, class or object with ``@hookimpl`` methods) inside the block.

    Installed plugins are loaded first (none under ``SDPO_LOAD_PLUGINS=""``), the plugin is checked
    with ``check_pending()`` like an installed one, and it is unregistered on exit. A plugin that is
    already registered (e.g. installed and loaded) is used as it is and left registered.
    """
    load_plugins()
    if pm.is_registered(plugin):
        yield pm.get_name(plugin) or ""
        return
    registered = pm.register(plugin, name=name)
    if registered is None:
        raise ValueError(f"plugin {name!r} is blocked")
    try:
        pm.check_pending()
        yield registered
    finally:
        pm.unregister(name=registered)


def _fail(env: Environment, message: str) -> None:
    raise AssertionError(f"{env.label}: {message}")


def check_environment(env: Environment, tasks: Sequence[Task] | None = None,
                      completions: Sequence[str] | None = None) -> list[Feedback]:
    """Check that `env` keeps the environment contract; raise `AssertionError` saying what broke.

    Checks the Gym interface (`reset`/`step`; one turn of a multi-turn episode, whose `respond` must work
    when the completion fails), batched `evaluate` (count, order, types), the TRL reward
    function interface (`__name__`, `list[float | None]`, `last_feedback`, `last_results`, conversational
    completions, extra dataset columns) and, for process environments, picklability. Returns the
    feedback of the batch.

    Args:
        env (`Environment`): the environment under test.
        tasks (`Sequence[Task]`, *optional*): tasks it can score; defaults to one ``{"prompt": ...}`` task.
        completions (`Sequence[str]`, *optional*): one completion per task; defaults to ``"42"`` each.
    """
    tasks = list(tasks) if tasks is not None else [{"prompt": "What is 6 times 7?", "answer": "42"}]
    completions = list(completions) if completions is not None else ["42"] * len(tasks)
    if not isinstance(env, Environment):
        raise AssertionError(f"{type(env).__name__} is not an sdpo_envs.Environment")
    if len(tasks) != len(completions) or not tasks:
        raise AssertionError("check_environment needs one completion per task, and at least one task")

    for task, completion in zip(tasks, completions, strict=True):
        prompt = env.reset(task)
        if not isinstance(prompt, (str, list)):
            _fail(env, f"reset() returned {type(prompt).__name__}, expected a str or a list of messages")
        step = env.step(completion)
        if not isinstance(step, StepResult) or not isinstance(step.feedback, Feedback):
            _fail(env, f"step() returned {type(step).__name__}, expected a StepResult with a Feedback")
        if env.max_turns == 1 and not step.done:
            _fail(env, "step() of a single-turn environment must end the episode (done=True)")
        if not step.done and not (isinstance(step.observation, str) and step.observation.strip()):
            _fail(env, "a step that does not end the episode must carry the next observation")
        if step.feedback.failed and env.multi_turn and env.max_turns > 1:
            _fail(env, f"the episode failed: {step.feedback.details['error']}")

    results = env.evaluate(tasks, completions)
    if len(results) != len(tasks) or not all(isinstance(r, Feedback) for r in results):
        _fail(env, "evaluate() must return one Feedback per task")
    for row, result in enumerate(results):
        if result.failed:
            _fail(env, f"row {row} could not be scored: {result.details['error']}")
        if result.reward is not None and not math.isfinite(result.reward):
            _fail(env, f"row {row}: reward {result.reward} is not finite")

    name = getattr(env, "__name__", None)
    if not isinstance(name, str) or not name:
        _fail(env, "__name__ must be a non-empty str (TRL names the reward column after it)")
    columns: dict[str, Any] = {}
    for key in {k for task in tasks for k in task if k != "prompt"}:
        columns[key] = [task.get(key) for task in tasks]
    prompts = [env.prompt(task) for task in tasks]
    for label, batch in (("text", completions),
                         ("conversational", [[{"role": "assistant", "content": c}] for c in completions])):
        rewards = env(prompts=prompts, completions=batch, completion_ids=[[0]] * len(tasks), **columns)
        if not isinstance(rewards, list) or len(rewards) != len(tasks):
            _fail(env, f"calling it as a reward function ({label} completions) must return one value per row")
        if any(r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))) for r in rewards):
            _fail(env, f"rewards must be floats or None, got {rewards!r}")
        feedback, structured = env.last_feedback, env.last_results
        if (not isinstance(feedback, list) or len(feedback) != len(tasks)
                or not all(isinstance(t, str) for t in feedback)):
            _fail(env, "last_feedback must be a fresh list with one str per row after a call")
        if not isinstance(structured, list) or [r.reward for r in structured] != rewards:
            _fail(env, "last_results must hold the Feedback behind each returned reward")

    if env.concurrency == "process":
        try:
            pickle.loads(pickle.dumps(env))
        except Exception as exc:
            _fail(env, f"a process environment must be picklable: {type(exc).__name__}: {exc}")
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def local_ray_cluster(worker_nodes: int = 1, cpus_per_node: int = 1, start_timeout: float = 180.0) -> Iterator[str]:
    """A Ray cluster of separate processes on this machine, as `ray start` makes one on many: a head node and
    `worker_nodes` worker nodes, `cpus_per_node` CPUs each, in a private temporary directory. Yields the
    head's address (for `RayExecutor(address)` or `make(..., executor="ray", ray_address=address)`); every
    node is stopped on exit. Needs Ray (`pip install "sdpo-gym[ray]"`)."""
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_cli is None:
        raise RuntimeError('local_ray_cluster needs Ray\'s `ray` command: pip install "sdpo-gym[ray]"')
    temp_dir = tempfile.mkdtemp(prefix="sdpo-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    address = f"127.0.0.1:{_free_port()}"
    common = [f"--num-cpus={cpus_per_node}", "--object-store-memory=100000000", "--disable-usage-stats", "--block"]
    nodes: list[subprocess.Popen[bytes]] = []
    log = open(os.path.join(temp_dir, "nodes.log"), "wb")  # noqa: SIM115 - open while the nodes run
    try:
        def start(*args: str) -> None:
            nodes.append(subprocess.Popen([ray_cli, "start", *args, *common], stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))

        start("--head", f"--port={address.rsplit(':', 1)[1]}", f"--temp-dir={temp_dir}", "--include-dashboard=false")
        _wait_for_nodes(ray_cli, address, 1, nodes, start_timeout, temp_dir)
        for _ in range(worker_nodes):
            start(f"--address={address}")
        _wait_for_nodes(ray_cli, address, 1 + worker_nodes, nodes, start_timeout, temp_dir)
        yield address
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(ray_cli: str, address: str, count: int, nodes: Sequence[subprocess.Popen[bytes]],
                    timeout: float, temp_dir: str) -> None:
    """Until `ray status` on `address` lists `count` live nodes; raise (naming the log) if a node exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(node.poll() is not None for node in nodes):
            raise RuntimeError(f"a Ray node exited at start (see {temp_dir}/nodes.log)")
        status = subprocess.run([ray_cli, "status", f"--address={address}"], capture_output=True, text=True,
                                check=False)
        active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in status.stdout else ""
        if status.returncode == 0 and active.count("node_") >= count:
            return
        time.sleep(1.0)
    raise RuntimeError(f"the Ray cluster at {address} did not have {count} nodes within {timeout:g} s "
                       f"(see {temp_dir}/nodes.log)")

