"""Episodes on a Ray cluster: `make(name, executor="ray", ray_address=...)` or `RayExecutor(...)`.

A training node on many GPUs produces more completions to grade than its own CPUs can run, so the
episodes of one `evaluate` call go to Ray workers, each running the environment exactly as it would run
here (its own `score`, its own sandbox backend: bwrap inside the worker), and the feedback comes back in
order. What is shipped to the workers is the pickled environment (once per change, through Ray's object
store) and each episode's task row and completion text; the environment's class must therefore be
importable on every worker (its plugin installed there, or shipped with `runtime_env`).

Failure policy, as for the local engine (`sdpo_envs.executors`): an episode that raises or runs past its
timeout is a failed `Feedback`; a Ray worker that dies mid-episode is retried (`retries`, once by
default), then the episode is a failed `Feedback` naming why, and training goes on. Contract breaks
(`InvalidResultError`) and an environment the workers cannot load (`EnvironmentSetupError`) raise. A
cluster that does not answer raises `EnvironmentSetupError` naming the address, when the executor is
made, instead of hanging in Ray's own connection retries.

Ray is an optional dependency (`pip install "sdpo-gym[ray]"`); this module imports it only when an
executor is made.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sdpo_envs.executors import Scorer, run_in_threads
from sdpo_envs.types import EnvironmentSetupError, Feedback, InvalidResultError, Task

POLL_SECONDS = 0.5  # how often the in-flight episodes are checked against their deadlines


_LOADED: dict[str, Any] = {}
"""On a worker: the environments it has loaded, by content key. Kept across tasks, so that an environment's
sandboxes and pools stay warm from one episode to the next (Ray would unpickle a fresh copy per task)."""
_KEEP_LOADED = 4


def _load_on_worker(key: str, blob: bytes) -> Any:
    env = _LOADED.get(key)
    if env is None:
        try:
            env = pickle.loads(blob)
        except Exception as exc:
            raise EnvironmentSetupError(f"a Ray worker could not load the environment (is its plugin installed on "
                                        f"the workers?): {type(exc).__name__}: {exc}") from None
        while len(_LOADED) >= _KEEP_LOADED:
            old = _LOADED.pop(next(iter(_LOADED)))
            with contextlib.suppress(Exception):
                old.close()
        _LOADED[key] = env
    return env


def _score_on_worker(key: str, blob: bytes, task: Task, text: str, timeout: float | None) -> Feedback:
    """One episode on a Ray worker: the environment's own scoring and failure policy, timed from its start."""
    env: Scorer = _load_on_worker(key, blob)
    if timeout is None:
        return env._score_one(task, text)[0]
    return run_in_threads(env, [task], [text], 1, timeout)[0]


def split_address(address: str) -> tuple[str, int] | None:
    """`(host, port)` of a `host:port` or `ray://host:port` address; `None` for anything else."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float) -> None:
    """Raise `EnvironmentSetupError` naming `address` when nothing listens there (Ray itself retries for
    minutes before it gives up on an address that does not answer)."""
    where = split_address(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=timeout):
            pass
    except OSError as exc:
        raise EnvironmentSetupError(
            f"no Ray cluster answers at {address!r} ({exc.strerror or exc}); start one with `ray start --head` "
            f"and pass its address, or ray_address='local' to start a cluster on this machine") from None


def _resolve_auto() -> str | None:
    """The address `ray.init(address="auto")` would use (RAY_ADDRESS, else the latest cluster started on this
    machine), so that it can be checked first; `None` when Ray finds none (it then fails fast itself)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # a Ray without this helper: let ray.init report
        return None
    try:
        resolved: str | None = canonicalize_bootstrap_address("auto")
    except Exception:  # no cluster recorded: ray.init says so in its own words
        return None
    return resolved


class RayExecutor:
    """Runs an environment's episodes as Ray tasks, at most `max_in_flight` at a time.

    Args:
        address: a cluster address (`"host:port"`, `"ray://host:port"`), `"auto"` (the `RAY_ADDRESS`
            variable, else the cluster last started on this machine) or `"local"` (start a cluster in this
            process). If this process is already connected to Ray, that connection is used (an explicit
            address must still answer).
        max_in_flight: episodes submitted and not yet finished, at most (backpressure); `None`: the
            environment's `max_workers` if set, else the cluster's CPU count.
        retries: how many times an episode whose worker died is run again before it counts as failed.
        num_cpus: CPUs Ray reserves for each episode.
        runtime_env: Ray's `runtime_env` for the connection (e.g. `{"pip": [...]}` to install a plugin on the
            workers); only when this executor makes the connection.
        connect_timeout: seconds to wait for the cluster's address to answer.
        schedule_timeout: seconds an episode may wait for a worker before it counts as failed (a cluster
            without free CPUs must not hang training); the episode's own timeout starts on the worker.
    """

    def __init__(self, address: str = "auto", *, max_in_flight: int | None = None, retries: int = 1,
                 num_cpus: float = 1.0, runtime_env: Mapping[str, Any] | None = None,
                 connect_timeout: float = 10.0, schedule_timeout: float = 600.0) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"RayExecutor: max_in_flight must be at least 1, got {max_in_flight}")
        if retries < 0:
            raise ValueError(f"RayExecutor: retries must be 0 or more, got {retries}")
        self.address = address
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.num_cpus = num_cpus
        self.schedule_timeout = schedule_timeout
        self._env_key = ""
        self._env_ref: Any = None
        self._ray = self._connect(address, runtime_env, connect_timeout)
        self._remote = self._ray.remote(_score_on_worker)

    @staticmethod
    def _connect(address: str, runtime_env: Mapping[str, Any] | None, connect_timeout: float) -> Any:
        try:
            import ray
        except ImportError:
            raise EnvironmentSetupError('executor="ray" needs Ray: pip install "sdpo-gym[ray]"') from None
        target = None if address == "local" else address
        if address == "auto":
            resolved = _resolve_auto()
            if resolved is not None and not ray.is_initialized():
                check_reachable(resolved, connect_timeout)
        elif target is not None:
            check_reachable(target, connect_timeout)
        if ray.is_initialized():
            return ray
        try:
            ray.init(address=target, runtime_env=dict(runtime_env) if runtime_env else None,
                     logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise EnvironmentSetupError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
        return ray

    def cluster_cpus(self) -> int:
        """CPUs of the connected cluster (at least 1)."""
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def run(self, env: Scorer, tasks: Sequence[Task], texts: Sequence[str], workers: int | None,
            timeout: float | None) -> list[Feedback]:
        """Score every episode on the cluster, at most `max_in_flight` (else `workers`, else the cluster's
        CPUs) at a time, and return the feedback in order."""
        ray = self._ray
        key, blob_ref = self._put(env)
        cap = self.max_in_flight or workers or self.cluster_cpus()
        remote = self._remote.options(num_cpus=self.num_cpus, max_retries=self.retries, retry_exceptions=False)
        results: list[Feedback | None] = [None] * len(tasks)
        pending: dict[Any, tuple[int, float]] = {}  # object ref -> (episode index, submitted at)
        following = 0
        try:
            while following < len(tasks) or pending:
                while following < len(tasks) and len(pending) < cap:
                    ref = remote.remote(key, blob_ref, dict(tasks[following]), texts[following], timeout)
                    pending[ref] = (following, time.monotonic())
                    following += 1
                done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                for ref in done:
                    index, _ = pending.pop(ref)
                    results[index] = self._collect(env, ref)
                self._expire(env, pending, results, timeout)
        except BaseException:
            for ref in pending:  # nothing of this call may keep running on the cluster
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        return [r if r is not None else env.failed_feedback("episode was not run") for r in results]

    def close(self) -> None:
        """Forget the environment held in the object store (the connection stays: it is the process's)."""
        self._env_key, self._env_ref = "", None

    def _put(self, env: Scorer) -> tuple[str, Any]:
        """The environment's content key and its pickled bytes in the object store (put again only when it
        changed). Ray's cloudpickle: a class defined in a script's `__main__` travels by value."""
        try:
            blob = self._ray.cloudpickle.dumps(env, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise EnvironmentSetupError(
                f"{env.label}: an environment run on Ray must be picklable: {type(exc).__name__}: {exc}") from exc
        key = hashlib.sha256(blob).hexdigest()
        if key != self._env_key:
            self._env_key, self._env_ref = key, self._ray.put(blob)
        return key, self._env_ref

    def _collect(self, env: Scorer, ref: Any) -> Feedback:
        from ray.exceptions import RayError, RayTaskError

        try:
            feedback: Feedback = self._ray.get(ref)
        except (InvalidResultError, EnvironmentSetupError):
            raise
        except RayTaskError as exc:  # nothing else of the task raises (score is guarded): a bug of this module
            raise EnvironmentSetupError(f"{env.label}: the Ray task failed:\n{exc}") from None
        except RayError as exc:  # the worker or its node died, the task was cancelled, ...
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            runs = self.retries + 1
            return env.failed_feedback(f"the Ray worker scoring this episode died ({type(exc).__name__}; run "
                                       f"{runs} time{'s' if runs > 1 else ''}): {first_line}", crashed=True)
        if feedback.failed:  # counted on the worker's copy; count it here, where the trainer reads it
            env._note_failure()
        return feedback

    def _expire(self, env: Scorer, pending: dict[Any, tuple[int, float]], results: list[Feedback | None],
                timeout: float | None) -> None:
        limit = self.schedule_timeout + (timeout or 0.0)
        now = time.monotonic()
        for ref, (index, submitted) in list(pending.items()):
            if now - submitted > limit:
                del pending[ref]
                with contextlib.suppress(Exception):
                    self._ray.cancel(ref, force=True)
                results[index] = env.failed_feedback(
                    f"the episode did not finish on the Ray cluster within {limit:g} s of its submission (no free "
                    f"worker, or a worker that hung)", timed_out=True)
