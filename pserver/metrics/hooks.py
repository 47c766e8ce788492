"""What a pserver's shard, its saves and the coordinator report, with metrics off.

A `Shard` and a `Coordinator` hold a `metrics` object (`NULL` until a
`pserver.metrics.server_metrics.ServerMetrics` takes them over) and call its
methods as things happen; with metrics off every call does nothing, so the hot
path pays one method call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class NullServerMetrics:
    """Metrics off: every hook does nothing (`ServerMetrics` has the same methods)."""

    port = None

    def timed(self, method: str, handler: Callable) -> Callable:
        return handler

    def _nothing(self, *_args: Any) -> None:
        return None

    pulled = pushed = dense_pulled = dense_pushed = pulled_batch = pushed_batch = _nothing
    shard_written = stalled = save_failed = watch_coordinator = checkpoint_outcome = _nothing
    set_generation = recovered = start = stop = use_shard = _nothing


NULL = NullServerMetrics()
