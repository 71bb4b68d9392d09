"""Throttle whoever keeps failing authentication, and only them: one set of rules for
both doors (the HTTP API and the embedded broker's CONNECT).

Failures are counted per *presented credential* (a batmon_id, an email, the first
characters of an api key), so a misconfigured device behind a shared address (NAT,
proxy) throttles itself and not the household. An address also has a much higher
ceiling: past it, each credential that already failed from that address is refused
unchecked until the window passes, so spraying guesses across many credentials from
one address gets one try per credential. A credential that has not failed from that
address is still checked, so valid credentials are never refused for their
neighbours' failures.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable

from bridge.models import parse_batmon_id

API_KEY_PREFIX_CHARS = 8
"""An api key is counted by its first characters: enough to tell keys apart, and no
whole secret is kept in memory."""
MAX_TRACKED = 100_000
"""Credentials plus addresses remembered at once; beyond, the oldest are forgotten."""


def device_credential(batmon_id: int) -> str:
    """How a device's batmon_id is counted."""
    return f"batmon:{batmon_id}"


def user_credential(email: str) -> str:
    """How a user logging in by email (MQTT username) is counted."""
    return f"email:{email.strip().lower()}"


def api_key_credential(api_key: str) -> str:
    """How an api key is counted: by its prefix (a wrong key leaves only that behind)."""
    return f"key:{api_key[:API_KEY_PREFIX_CHARS]}"


def login_credential(username: str) -> str:
    """The credential an MQTT CONNECT presents: a batmon_id, else an email."""
    batmon_id = parse_batmon_id(username)
    return device_credential(batmon_id) if batmon_id is not None else user_credential(username)


def address_key(host: str | None) -> str | None:
    """The address failures are counted under: an IPv6 client by its /64 (one host
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
    """Counts failed authentications per credential and per address within a window.

    ``max_failures`` per credential (default 30 a minute); ``max_failures_per_address``
    defaults to ten times that.
    """

    def __init__(self, max_failures: int = 30, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 max_failures_per_address: int | None = None) -> None:  # fmt: skip
        self.max_failures = max_failures
        self.max_failures_per_address = max_failures_per_address or 10 * max_failures
        self.window_s = window_s
        self.clock = clock
        # Only the newest max_failures entries matter: if the oldest of them is still
        # inside the window, the limit is reached.
        self._by_credential: dict[str, deque[tuple[float, str | None]]] = {}
        self._by_address: dict[str, deque[float]] = {}

    def blocked(self, address: str | None, credential: str | None) -> bool:
        """True if this credential must be refused without checking it.

        A request presenting no credential is never blocked: there is nothing to guess
        and its cookie, if any, may be valid.
        """
        if credential is None:
            return False
        horizon = self.clock() - self.window_s
        failures = self._by_credential.get(credential)
        if not failures:
            return False
        if len(failures) >= self.max_failures and failures[0][0] >= horizon:
            return True
        where = address_key(address)
        if where is None or not self._address_over_ceiling(where, horizon):
            return False
        return any(at >= horizon and addr == where for at, addr in failures)

    def record_failure(self, address: str | None, credential: str | None) -> None:
        """Count one failed authentication of ``credential`` (None: none was given)."""
        now = self.clock()
        where = address_key(address)
        if len(self._by_credential) + len(self._by_address) > MAX_TRACKED:
            self._forget(now - self.window_s)
        if credential is not None:
            failures = self._by_credential.get(credential)
            if failures is None:
                failures = self._by_credential[credential] = deque(maxlen=self.max_failures)
            failures.append((now, where))
        if where is not None:
            times = self._by_address.get(where)
            if times is None:
                times = self._by_address[where] = deque(maxlen=self.max_failures_per_address)
            times.append(now)

    def _address_over_ceiling(self, where: str, horizon: float) -> bool:
        times = self._by_address.get(where)
        return (
            times is not None
            and len(times) >= self.max_failures_per_address
            and times[0] >= horizon
        )

    def _forget(self, horizon: float) -> None:
        """Drop what has left the window; if still too much, the oldest half."""
        for table in (self._by_credential, self._by_address):
            stale = [k for k, v in table.items() if not v or _newest(v) < horizon]
            for key in stale:
                del table[key]
            if len(table) > MAX_TRACKED // 2:
                for key in list(table)[: len(table) // 2]:
                    del table[key]


def _newest(entries: deque[tuple[float, str | None]] | deque[float]) -> float:
    last = entries[-1]
    return last[0] if isinstance(last, tuple) else last
