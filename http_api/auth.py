"""Who is calling: an api_key (query, body, X-API-Key, Bearer) or the signed
session cookie set on any response to an api_key request.
"""

from __future__ import annotations

from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from bridge.core import Core, User
from bridge.errors import NotAuthenticated
from bridge.security import key_fingerprint, same_secret

COOKIE_NAME = "batmon_session"
COOKIE_MAX_AGE_S = 30 * 24 * 3600


class Sessions:
    """Signs and reads the session cookie; the secret lives in the data folder."""

    def __init__(self, secret: bytes) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="batmon-session")

    def user(self, core: Core, request: Request) -> User | None:
        """The user a valid, unexpired cookie names, while it still has the api key the
        cookie was made with (`batmon user reset-key` ends every login made with the old)."""
        cookie = request.cookies.get(COOKIE_NAME)
        if not cookie:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=COOKIE_MAX_AGE_S)
        except BadSignature:
            return None
        uid = data.get("uid") if isinstance(data, dict) else None
        key = data.get("key") if isinstance(data, dict) else None
        if not isinstance(uid, int) or not isinstance(key, str):
            return None
        user = core.user_by_id(uid)
        if user is None or not same_secret(key, key_fingerprint(user.api_key_hash)):
            return None
        return user

    def set_cookie(self, response: Response, user: User, secure: bool) -> None:
        """Remember the user on this client (signed, HttpOnly, SameSite=Lax)."""
        response.set_cookie(
            COOKIE_NAME,
            self._serializer.dumps({"uid": user.id, "key": key_fingerprint(user.api_key_hash)}),
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="lax",
            secure=secure,
        )

    @staticmethod
    def clear_cookie(response: Response) -> None:
        """Forget the session on this client."""
        response.delete_cookie(COOKIE_NAME, httponly=True, samesite="lax")


def api_key_of(request: Request, fields: dict[str, Any]) -> str | None:
    """The api_key from X-API-Key, Authorization: Bearer, or the fields, if any."""
    header = request.headers.get("x-api-key")
    if header:
        return header.strip()
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    value = fields.get("api_key")
    if value in (None, ""):
        return None
    # A number or list is not a key; let it fail as one (401), not crash.
    return value if isinstance(value, str) else repr(value)


async def authenticate(core: Core, sessions: Sessions, request: Request, fields: dict[str, Any]
                       ) -> tuple[User | None, bool]:  # fmt: skip
    """(user or None, whether an api_key did it); a wrong api_key is a 401.

    A key not in memory may be one another process made a moment ago (`batmon user add`):
    the core re-reads the credentials off the loop if they changed, and the key is asked again.
    """
    api_key = api_key_of(request, fields)
    if api_key is not None:
        user = core.user_for_api_key(api_key)
        if user is None and await core.refresh_credentials():
            user = core.user_for_api_key(api_key)
        if user is None:
            raise NotAuthenticated("api_key is not valid.")
        return user, True
    return sessions.user(core, request), False
