"""Who may read ``/metrics``, and the names under which refused requests are counted.

The facade knows nothing of Prometheus: it is handed a ``render`` callable, as it is
handed ``health``, and decides only whether the caller may see what it returns.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from bridge.security import same_secret

MetricsAccess = Literal["off", "local", "token"]
# Renders the exposition for an Accept header: (body, content type).
MetricsRender = Callable[[str], tuple[bytes, str]]

# Why a request was refused, by the status of its error: the `reason` label.
REJECTION_REASONS = {400: "invalid", 401: "unauthenticated", 403: "wrong_token", 404: "not_found",
                     409: "conflict", 413: "too_large", 429: "rate_limited",
                     503: "unavailable"}  # fmt: skip
LOCAL_ONLY = "/metrics is served to loopback clients only (--metrics local)."
TOKEN_NEEDED = "/metrics needs the metrics token as Authorization: Bearer."


@dataclass(frozen=True)
class MetricsExposure:
    """What the app needs for /metrics and for counting refused requests."""

    render: MetricsRender
    access: MetricsAccess = "local"
    token: str | None = None
    # Awaited before each render: figures the store keeps are read off the event loop.
    prepare: Callable[[], Awaitable[None]] | None = None

    @property
    def served(self) -> bool:
        """False in ``off`` mode: the route does not exist at all (404)."""
        return self.access != "off"

    def refusal(self, request: Request) -> tuple[int, str] | None:
        """(status, message) when the caller may not read the metrics, else None."""
        if self.access == "local":
            client = request.client.host if request.client else ""
            return None if is_loopback(client) else (403, LOCAL_ONLY)
        if self.access == "token":
            given = bearer_token(request)
            if given is None or self.token is None or not same_secret(given, self.token):
                return 401, TOKEN_NEEDED
        return None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (and IPv4-mapped loopback); False for anything else."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def bearer_token(request: Request) -> str | None:
    """The credentials of ``Authorization: Bearer <token>``, if that is what was sent."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    credentials = credentials.strip()
    return credentials if scheme.lower() == "bearer" and credentials else None
