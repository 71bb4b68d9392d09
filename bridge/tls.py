"""TLS contexts for the doors serve opens (the embedded broker's TLS listener, HTTPS), built
and checked at start, so a certificate that cannot be read or a key that does not match is one
clear line before anything listens, never a traceback from inside a library later.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsSetupError(ValueError):
    """A certificate, key or CA file that cannot be used; the message is one line."""


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server-side context with ``cert``/``key``; with ``client_ca``, clients must present a
    certificate signed by it (anything else fails the handshake)."""
    for path in (cert, key, *([client_ca] if client_ca else [])):
        _readable(path)  # OpenSSL's own errors do not say which file
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsSetupError(_ssl_problem(exc, cert, key)) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise TlsSetupError(f"TLS client CA {client_ca} holds no usable certificate:"
                                f" {exc.reason}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                   ) -> ssl.SSLContext:  # fmt: skip
    """A client-side context for an mqtts:// broker: its certificate checked against ``ca``
    (else the system's CAs) and its host name; ``cert``/``key`` when the broker asks for ours."""
    for path in (p for p in (ca, cert, key) if p is not None):
        _readable(path)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise TlsSetupError(f"TLS CA {ca} holds no usable certificate: {exc.reason}") from None
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise TlsSetupError(_ssl_problem(exc, cert, key)) from None
    return context


def _readable(path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsSetupError(f"cannot read TLS file {path}: {exc.strerror}") from None


def _ssl_problem(exc: ssl.SSLError, cert: Path, key: Path) -> str:
    reason = exc.reason or str(exc)
    if reason == "KEY_VALUES_MISMATCH":
        return f"TLS key {key} does not match certificate {cert}"
    return f"TLS certificate {cert} or key {key} is not usable (PEM expected): {reason}"
