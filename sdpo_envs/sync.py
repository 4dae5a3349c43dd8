"""Resolving awaitables from synchronous code.

Hooks and reward functions are synchronous, but environments and reward callables may be `async`
(datasette's "value, callable or awaitable"). TRL itself calls reward functions from the main thread
and from a daemon thread that runs an event loop, so the helper must work with and without a loop
already running in the calling thread.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def run_sync(value: T | Awaitable[T]) -> T:
    """Return `value`, awaiting it first if it is awaitable.

    Without a running loop in this thread the awaitable runs on a fresh loop (`asyncio.run`). With
    one (e.g. inside TRL's async reward loop, or a notebook) blocking that loop's thread on the same
    loop would deadlock, so the awaitable runs on a fresh loop in a helper thread instead; it must
    therefore not depend on objects bound to the caller's loop.
    """
    if not inspect.isawaitable(value):
        return value
    coroutine: Coroutine[Any, Any, T] = _await(value)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdpo-run-sync") as pool:
        return pool.submit(asyncio.run, coroutine).result()
