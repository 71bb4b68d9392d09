"""The Starlette application: wraps each route-table handler with parsing,
authentication, validation and the one mapping of errors to ``{"error": ...}``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bridge.core import Core, User
from bridge.errors import BatmonError, NotAuthenticated, StorageFailed, Unavailable, WrongToken
from bridge.events import HttpRejected
from bridge.history_answers import Streamed
from bridge.models import Login, describe_error
from bridge.ratelimit import FailureLimiter
from http_api.auth import Sessions, api_key_of, authenticate
from http_api.cross_site import cross_site
from http_api.handlers import Call
from http_api.live import LiveFeed
from http_api.metrics_access import REJECTION_REASONS, MetricsExposure
from http_api.openapi import build_openapi
from http_api.pages import install_dashboard
from http_api.params import request_fields
from http_api.routes import ENDPOINTS, Endpoint

log = logging.getLogger(__name__)

HealthProbe = Callable[[], dict[str, Any]]
Work = Callable[[dict[str, Any], User | None], Any]


def error_response(status: int, message: str) -> JSONResponse:
    """The one error shape: ``{"error": "<sentence>"}``."""
    return JSONResponse({"error": message}, status_code=status)


class Api:
    """Holds what every request needs: the core, the session signer, the limiter."""

    def __init__(self, core: Core, sessions: Sessions, limiter: FailureLimiter,
                 health: HealthProbe | None, metrics: MetricsExposure | None = None) -> None:  # fmt: skip
        self.core = core
        self.sessions = sessions
        self.limiter = limiter
        self.health = health
        self.metrics = metrics

    async def run(self, request: Request, work: Work) -> Response:
        """Parse, authenticate, run ``work``, and map any refusal to its error."""
        client = request.client.host if request.client else None
        key_user: User | None = None
        api_key_given = False
        try:
            fields = await request_fields(request)
            api_key_given = api_key_of(request, fields) is not None
            # Every credential is checked: a correct one is served whatever failed before
            # (bridge/ratelimit.py, the broker's rules too).
            user, by_key = await authenticate(self.core, self.sessions, request, fields)
            key_user = user if by_key else None
            # A change is answered only once it is committed (off the loop, in order).
            async with self.core.durable_writes():
                result = await work(fields, user)
            response = (
                _streaming(result) if isinstance(result, Streamed) else JSONResponse({"success": result})
            )
        except ValidationError as exc:
            response = error_response(400, describe_error(exc))
        except BatmonError as exc:
            response = error_response(exc.status, exc.message)
            # A wrong api_key or batmon_token: count its source; a source over its limit is
            # told to back off. A request without a key guessed nothing.
            guessed = isinstance(exc, WrongToken) or (isinstance(exc, NotAuthenticated) and api_key_given)
            if guessed and self.limiter.record_failure(client):
                response = self.throttled()
            if isinstance(exc, Unavailable):
                response.headers["Retry-After"] = str(exc.retry_after)
        # Never to another site's page: that would log its visitor in as the key's owner.
        if key_user is not None and not cross_site(request):
            self.sessions.set_cookie(response, key_user, secure=request.url.scheme == "https")
        if response.status_code >= 400:
            self.rejected(REJECTION_REASONS.get(response.status_code, "other"))
        return response

    def throttled(self) -> JSONResponse:
        """The answer to a failing attempt from a source over its limit (429, Retry-After)."""
        response = error_response(429, "Too many failed authentications from your address;"
                                       " try again in a minute.")  # fmt: skip
        response.headers["Retry-After"] = str(int(self.limiter.window_s))
        return response

    def refuse(self, status: int, message: str, reason: str | None = None) -> JSONResponse:
        """An error response, told on the bus as a rejection (metrics count it)."""
        self.rejected(reason or REJECTION_REASONS.get(status, "other"))
        return error_response(status, message)

    def rejected(self, reason: str) -> None:
        """Tell the bus a request was refused; handlers run on this, the loop's, thread."""
        self.core.bus.emit(HttpRejected(reason))

    def route(self, endpoint: Endpoint) -> Route:
        """A Starlette route for one entry of the route table."""
        # An endpoint with a `format` field (history) also honours Accept: text/csv.
        negotiates = "format" in endpoint.model.model_fields

        async def handle(request: Request) -> Response:
            async def work(fields: dict[str, Any], user: User | None) -> Any:
                call = Call(self.core, user)
                if not endpoint.device_access:
                    call.owner()  # 401 before any validation detail reaches a stranger
                if negotiates and "format" not in fields:
                    fields["format"] = format_from_accept(request.headers.get("accept", ""))
                data = endpoint.model.model_validate(fields)
                if self.core.peers is not None:  # other workers: what they committed first
                    # The database away: answered from memory (a change fails at its commit).
                    with contextlib.suppress(StorageFailed):
                        await self.core.peers.catch_up(_batmons_shown(endpoint, data, call))
                return await endpoint.handler(call, data)

            return await self.run(request, work)

        return Route(endpoint.path, handle, methods=list(endpoint.methods),
                     name=endpoint.handler.__name__)  # fmt: skip

    async def login(self, request: Request) -> Response:
        async def work(fields: dict[str, Any], user: User | None) -> str:
            if api_key_of(request, fields) is None:
                Login.model_validate(fields)  # names api_key when none was given
            if user is None:
                raise NotAuthenticated("api_key is not valid.")
            return "success"

        return await self.run(request, work)

    async def logout(self, request: Request) -> Response:
        response = JSONResponse({"success": "success"})
        Sessions.clear_cookie(response)
        return response

    async def healthz(self, request: Request) -> Response:
        database = "ok" if await self.core.ping() else "error"
        writer = self.core.writer_health()
        extra = self.health() if self.health else {}
        # A database that answers SELECT 1 but cannot store a reading is not healthy.
        healthy = database == "ok" and writer["state"] == "ok"
        body = {"status": "ok" if healthy else "error", "database": database, "writer": writer,
                **extra}
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(build_openapi())

    async def prometheus(self, request: Request) -> Response:
        """Prometheus metrics, to loopback clients or a bearer-token holder as configured."""
        assert self.metrics is not None
        client = request.client.host if request.client else None
        refusal = self.metrics.refusal(request)
        if refusal is not None:
            status, message = refusal
            if status == 401 and self.limiter.record_failure(client):
                response = self.throttled()
                self.rejected(REJECTION_REASONS[429])
                return response
            response = self.refuse(status, message, "forbidden" if status == 403 else None)
            if status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
        if self.metrics.prepare is not None:
            await self.metrics.prepare()
        body, content_type = self.metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)


def format_from_accept(accept: str) -> str:
    """"csv" when Accept names text/csv before application/json, else "json"."""
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    for media_type in types:
        if media_type in ("text/csv", "application/json"):
            return "csv" if media_type == "text/csv" else "json"
    return "json"


def _streaming(result: Streamed) -> Response:
    headers = {}
    if result.filename:
        headers["Content-Disposition"] = f'attachment; filename="{result.filename}"'
    return StreamingResponse(result.chunks, media_type=result.media_type, headers=headers)


def _batmons_shown(endpoint: Endpoint, data: Any, call: Call) -> list[int]:
    """The batmons whose latest values a read answers with (fetched afresh from the store when
    other workers share it); a change needs none, only the check for their changes."""
    if "GET" not in endpoint.methods:
        return []
    batmon_id = getattr(data, "batmon_id", None)
    if batmon_id is not None:
        return [batmon_id]
    return [b.id for b in call.core.batmons_of(call.user)] if call.user is not None else []


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: f"No endpoint at {request.url.path}.",
                405: f"{request.method} is not allowed on {request.url.path}."}  # fmt: skip
    response = error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _server_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to our log, never to the client.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "Internal error; it has been logged.")


def create_app(core: Core, *, session_secret: bytes, health: HealthProbe | None = None,
               limiter: FailureLimiter | None = None, metrics: MetricsExposure | None = None,
               live: LiveFeed | None = None) -> Starlette:  # fmt: skip
    """The HTTP facade over ``core``; it never touches SQL or MQTT itself.

    Everything with a lifecycle (``live``) is built and started by the composition
    root; the app only holds references.
    """
    api = Api(core, Sessions(session_secret), limiter or FailureLimiter(), health, metrics)
    routes = [api.route(e) for e in ENDPOINTS]
    routes += [
        Route("/interface/login", api.login, methods=["POST"]),
        Route("/interface/logout", api.logout, methods=["POST"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
    ]
    if metrics is not None and metrics.served:
        routes.append(Route("/metrics", api.prometheus, methods=["GET"]))
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.api = api
    install_dashboard(app, core, api.sessions, live)
    return app
