"""Throttle clients that keep failing authentication (guessing keys or tokens)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class FailureLimiter:
    """Refuse a client (429) after too many auth failures within a window."""

    def __init__(self, max_failures: int = 30, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, client: str) -> bool:
        """True while ``client`` has used up its failures for the window."""
        times = self._failures.get(client)
        if not times:
            return False
        horizon = self.clock() - self.window_s
        while times and times[0] < horizon:
            times.popleft()
        if not times:
            del self._failures[client]
            return False
        return len(times) >= self.max_failures

    def record_failure(self, client: str) -> None:
        """Count one failed authentication for ``client``."""
        if len(self._failures) > 100_000:  # bound memory under a spray of addresses
            self._failures.clear()
        self._failures.setdefault(client, deque()).append(self.clock())
