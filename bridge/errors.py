"""Domain errors the core raises; each door maps them to its own wire form.

The HTTP facade turns them into ``{"error": message}`` with ``status``; the MQTT
door publishes the message on the device's error topic.
"""

from __future__ import annotations


class BatmonError(Exception):
    """A request the core refuses; ``message`` is safe to show the client."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(BatmonError):
    """Malformed or invalid input (400)."""


class NotAuthenticated(BatmonError):
    """No valid api_key, cookie or device token (401)."""

    status = 401


class WrongToken(BatmonError):
    """A batmon_token that does not match the batmon (403)."""

    status = 403


class NotFound(BatmonError):
    """Unknown, or not the caller's, batmon or alarm (404)."""

    status = 404


class Conflict(BatmonError):
    """The thing to create exists already (409); the store raises it for a taken email or id."""

    status = 409


class PayloadTooLarge(BatmonError):
    """A body or payload over its size limit (413)."""

    status = 413


class Unavailable(BatmonError):
    """Cannot take it now (503): nothing was stored; ``retry_after`` says when to try again."""

    status = 503

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageFailed(Unavailable):
    """The store could not write or read (disk full, read-only file, I/O error): nothing changed.

    The store raises it in place of its driver's errors, so no caller needs to know
    which database sits behind the interface (bridge/store/interface.py).
    """
