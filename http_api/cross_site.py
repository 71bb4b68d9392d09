"""Refuse changes that another origin's page makes with our session cookie.

The API takes the session cookie on POSTs (the dashboard's fetches use it). SameSite=Lax
keeps the cookie off other *sites'* POSTs, but another port on the same host is the same
site, and a form there could post to us with the cookie. Browsers say where a request
comes from (Fetch Metadata, Origin); clients that say nothing (curl, devices) are not
browsers being tricked. Our API answers no CORS, so no other origin has a legitimate use.

The other way round is a forgery too (login CSRF): another site's page posts *its own*
api_key, and the victim's browser is then logged in as the attacker, so what the victim
enters lands in the attacker's account. So a login from another origin is refused with or
without a cookie, and no cross-site request is ever answered with a session cookie.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from http_api.auth import COOKIE_NAME

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOGIN_PATH = "/interface/login"


def cross_site(request: Request) -> bool:
    """True when a browser says the request comes from another origin's page."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()


class CrossSiteGuard:
    """ASGI middleware: a change carrying the session cookie, or a login, from another
    origin is a 403."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            request = Request(scope)
            message = None
            if scope["path"] == LOGIN_PATH:
                message = ("This login came from another site's page; log in on this server's own"
                           " page.")  # fmt: skip
            elif COOKIE_NAME in request.cookies:
                message = ("This change came from another site's page; the session cookie is accepted"
                           " from this server's own pages only (clients send api_key instead).")  # fmt: skip
            if message is not None and cross_site(request):
                await JSONResponse({"error": message}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
