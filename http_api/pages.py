"""The web dashboard and the API docs page: server-rendered pages, the live-update
stream, and the vendored static files.

Pages render what the JSON API's own handlers return, and every action in them is a
same-origin fetch to that API: there is no second set of rules here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from bridge.core import Core, User
from bridge.errors import BatmonError
from bridge.models import BANK_ALARM_METRICS, BankRef, DeviceRef, NoFields, ShowTargets
from http_api import handlers as h
from http_api.auth import Sessions
from http_api.cross_site import CrossSiteGuard
from http_api.live import METRICS, LiveFeed, batmon_snapshot

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")

# Everything the pages load comes from here; nothing inline, nothing from elsewhere.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")  # fmt: skip
# Swagger UI sets style attributes in its markup and shows inline SVG images.
_DOCS_CSP = _CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Dashboard:
    """The pages of one app: who is logged in (the session cookie), and the core."""

    def __init__(self, core: Core, sessions: Sessions, live: LiveFeed | None = None) -> None:
        """``live``: the feed the composition root built and starts; None serves no /events."""
        self.core = core
        self.sessions = sessions
        self.live = live

    def user(self, request: Request) -> User | None:
        """The user the session cookie names, if any (pages take no api_key)."""
        return self.sessions.user(self.core, request)

    def page(self, request: Request, name: str, context: dict[str, Any], status: int = 200,
             csp: str = _CSP) -> Response:  # fmt: skip
        response = templates.TemplateResponse(request, name, context, status_code=status)
        response.headers.update({**PAGE_HEADERS, "Content-Security-Policy": csp})
        return response

    async def snapshots(self, batmon_ids: list[int]) -> list[dict[str, Any]]:
        """What the pages show of these batmons, as the live stream sends it."""
        batmons = [self.core.batmons[i] for i in batmon_ids]
        now = self.core.clock()
        if self.live is None:  # an app without a live feed: no report times to show
            return [batmon_snapshot(b, now) for b in batmons]
        await self.live.learn_reported(batmons)
        return [self.live.snapshot(b, now) for b in batmons]

    async def home(self, request: Request) -> Response:
        """The batmon list, or the login form when nobody is logged in."""
        user = self.user(request)
        if user is None:
            return self.page(request, "login.html", {"title": "Log in"})
        call = h.Call(self.core, user)
        batmons = await h.list_batmons(call, NoFields())
        snapshots = await self.snapshots([b["batmon_id"] for b in batmons])
        now = self.core.clock()
        names = {b["batmon_id"]: b["batmon_name"] for b in batmons}
        banks = [{**b, "member_names": [names[i] for i in b["batmon_ids"] if i in names]}
                 for b in await h.list_banks(call, NoFields())]  # fmt: skip
        return self.page(request, "list.html", {
            "title": "Batmons", "user": user, "batmons": snapshots, "banks": banks, "now": int(now),
        })  # fmt: skip

    async def batmon(self, request: Request) -> Response:
        """One batmon: charts, alarms, settings, notification log."""
        user = self.user(request)
        if user is None:
            return RedirectResponse("/", status_code=303)
        batmon_id = request.path_params["batmon_id"]
        try:
            data = await h.batmon_status(h.Call(self.core, user), DeviceRef(batmon_id=batmon_id))
        except (BatmonError, ValueError):
            return self.not_found(request, user)
        batmon = self.core.batmons[data["batmon_id"]]
        [snapshot] = await self.snapshots([batmon.id])
        return self.page(request, "batmon.html", {
            "title": snapshot["batmon_name"], "user": user, "batmon": snapshot,
            "metrics": METRICS, "now": int(self.core.clock()), "capacity_setting": batmon.capacity_ah,
        })  # fmt: skip

    async def bank(self, request: Request) -> Response:
        """One bank: its values, its members (Offline ones marked as left out), its settings."""
        user = self.user(request)
        if user is None:
            return RedirectResponse("/", status_code=303)
        call = h.Call(self.core, user)
        try:
            bank = await h.bank_status(call, BankRef(bank_id=request.path_params["bank_id"]))
        except (BatmonError, ValueError):
            return self.not_found(request, user)
        batmons = await self.snapshots([b["batmon_id"] for b in await h.list_batmons(call, NoFields())])
        now = self.core.clock()
        by_id = {b["batmon_id"]: b for b in batmons}
        return self.page(request, "bank.html", {
            "title": bank["bank_name"], "user": user, "bank": bank, "batmons": batmons,
            "members": [by_id[i] for i in bank["batmon_ids"] if i in by_id], "now": int(now),
            "alarm_metrics": BANK_ALARM_METRICS,
        })  # fmt: skip

    async def account(self, request: Request) -> Response:
        """Notification targets (masked) and the test-notice button."""
        user = self.user(request)
        if user is None:
            return RedirectResponse("/", status_code=303)
        targets = await h.show_user_notifications(h.Call(self.core, user), ShowTargets())
        return self.page(request, "account.html", {
            "title": "Account", "user": user, "targets": targets,
        })  # fmt: skip

    def not_found(self, request: Request, user: User | None) -> Response:
        return self.page(request, "not_found.html", {"title": "Not found", "user": user}, 404)

    async def docs(self, request: Request) -> Response:
        """Swagger UI over /openapi.json, from vendored files."""
        return self.page(request, "docs.html", {"title": "API docs", "user": self.user(request)},
                         csp=_DOCS_CSP)  # fmt: skip

    async def events(self, request: Request) -> Response:
        """Server-Sent Events: live changes of the logged-in user's batmons."""
        user = self.user(request)
        if user is None:
            return JSONResponse({"error": "Log in first: live updates need the session cookie."},
                                status_code=401)  # fmt: skip
        if self.live is None or not self.live.started:
            return JSONResponse({"error": "Live updates are not running; reload the page later."},
                                status_code=503)  # fmt: skip
        try:
            stream = self.live.open(user.id)
        except BatmonError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return StreamingResponse(self.live.serve(stream), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def routes(self) -> list[BaseRoute]:
        """The dashboard's routes, to add to the app's."""
        return [
            Route("/", self.home, methods=["GET"]),
            Route("/batmon/{batmon_id:int}", self.batmon, methods=["GET"]),
            Route("/bank/{bank_id:int}", self.bank, methods=["GET"]),
            Route("/account", self.account, methods=["GET"]),
            Route("/docs", self.docs, methods=["GET"]),
            Route("/events", self.events, methods=["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]


def install_dashboard(app: Starlette, core: Core, sessions: Sessions,
                      live: LiveFeed | None = None) -> Dashboard:  # fmt: skip
    """Add the pages, the live stream and the static files to ``app``, and refuse
    changes that other origins' pages make with the session cookie.

    ``live`` is built, started and stopped by the composition root (batmon/service.py).
    """
    dashboard = Dashboard(core, sessions, live)
    app.router.routes.extend(dashboard.routes())
    app.add_middleware(CrossSiteGuard)
    return dashboard
