"""The one retry loop: call again with backoff on chosen errors, until a deadline.

Joining a coordinator that is starting, rejoining a job that is rolling back,
and reaching a peer that restarts all wait the same way: the call is made at
once, then again after `delay` (0.1 s unless given), twice that, ... (at most
`max_delay`), while
it raises one of `errors` and `seconds` have not passed since the first call;
then the last error is raised. Other errors are raised at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def retry(call: Callable[[], T], *, seconds: float, errors: tuple[type[BaseException], ...],
          delay: float = 0.1, max_delay: float = 2.0,
          on_retry: Callable[[BaseException], None] | None = None) -> T:
    """`call()`'s result; see the module's doc. `on_retry(error)` runs before each wait."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except errors as e:
            if time.monotonic() >= deadline:
                raise
            if on_retry is not None:
                on_retry(e)
        time.sleep(delay)
        delay = min(max_delay, delay * 2)
