"""One checker pool for the whole session: each new worker process imports sympy, which is slow on a busy machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sdpo_math.checker import CheckerPool


@pytest.fixture(scope="session")
def pool() -> Iterator[CheckerPool]:
    pool = CheckerPool(max_workers=2)
    pool.warm_up()
    yield pool
    pool.close()
