"""Throttle the *sources* that keep failing authentication, never a credential: one set
of rules for both doors (the HTTP API and the embedded broker's CONNECT).

Every credential presented is checked, and a correct one is accepted whatever wrong
guesses came before, from anywhere: counting failures per credential (as before issue
15) let anyone who knew a batmon_id keep that device's right token refused. Throttling
only changes how a *failing* attempt from a source over its limit is answered: 429 with
Retry-After over HTTP, a refusal held back a moment over MQTT.

The secrets carry 128 to 256 random bits, so no rate a server could answer makes
guessing one feasible (docs/CHOICES.md, "Credentials and health", has the figures);
the throttle tells a broken client to back off and bounds what a failing source costs.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

MAX_TRACKED = 100_000
"""Sources remembered at once; beyond, those that failed least recently are forgotten
(161 bytes each measured: 16 MB at most)."""


def address_key(host: str | None) -> str | None:
    """The source failures are counted under: an IPv6 client by its /64 (one host
    holds a whole /64), an IPv4-mapped one as IPv4."""
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureLimiter:
    """Failed authentications per source, as a leaky bucket of ``max_failures`` per ``window_s``.

    A source may fail ``max_failures`` times at once (default 30); the bucket then drains
    at ``max_failures / window_s`` (one every 2 s), and a source that stops failing is
    forgotten after ``window_s``. Each source costs one float: the time its bucket is
    empty again (the "theoretical arrival time" of GCRA).
    """

    def __init__(self, max_failures: int = 30, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._interval_s = window_s / max_failures
        self._empty_at: dict[str, float] = {}  # source -> when its bucket is empty

    def throttled(self, address: str | None) -> bool:
        """True while this source is over its limit: its failing attempts are throttled."""
        where = address_key(address)
        if where is None:
            return False
        empty_at = self._empty_at.get(where)
        return empty_at is not None and empty_at - self.clock() > self.window_s - self._interval_s / 2

    def record_failure(self, address: str | None) -> bool:
        """Count one failed authentication from ``address``; True if that source was
        already over its limit, so this failure is answered as throttled."""
        where = address_key(address)
        if where is None:
            return False
        now = self.clock()
        was_throttled = self.throttled(address)
        empty_at = self._empty_at.pop(where, now)  # re-inserted last: the dict is LRU-ordered
        if len(self._empty_at) >= MAX_TRACKED:
            self._forget(now)
        # Capped at a full bucket: a source that keeps failing is throttled until it pauses,
        # not for as long as it ever failed.
        self._empty_at[where] = min(max(empty_at, now) + self._interval_s, now + self.window_s)
        return was_throttled

    @property
    def tracked(self) -> int:
        """Sources remembered now (not ``__len__``: an empty limiter must stay truthy)."""
        return len(self._empty_at)

    def _forget(self, now: float) -> None:
        """Drop sources whose bucket is empty; if still too many, the least recent half."""
        for where in [w for w, empty_at in self._empty_at.items() if empty_at <= now]:
            del self._empty_at[where]
        if len(self._empty_at) >= MAX_TRACKED // 2:
            for where in list(self._empty_at)[: len(self._empty_at) // 2]:
                del self._empty_at[where]
