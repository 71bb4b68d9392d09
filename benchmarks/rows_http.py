"""Rows over HTTP: update POSTs and status GETs from keep-alive clients, against the
minimal Starlette endpoints served by uvicorn the same way."""

from __future__ import annotations

import json
from collections.abc import Callable

from benchmarks.http_load import build_request, closed_loop
from benchmarks.procs import PythonServer
from benchmarks.report import Figure, Line
from benchmarks.runner import Context, Product, alternate, running_product

ANCHOR = "minimal Starlette endpoint, uvicorn, one SQLite connection"


def _compare(ctx: Context, product: Product, anchor: PythonServer, clients: int,
             product_request: Callable[[int, str], bytes], anchor_request: Callable[[int], bytes]
             ) -> tuple[list[float], list[float]]:  # fmt: skip
    """Requests/s of ``clients`` keep-alive clients on each side, alternated."""
    batmons = product.batmons
    mine = [product_request(*batmons[i % len(batmons)]) for i in range(clients)]
    theirs = [anchor_request(i % len(batmons) + 1) for i in range(clients)]
    duration = ctx.seconds(2.0, 0.4)
    closed_loop(product.http_port, mine, 0.3)  # warm both up
    closed_loop(anchor.port, theirs, 0.3)
    return alternate(ctx.reps, lambda: closed_loop(product.http_port, mine, duration),
                     lambda: closed_loop(anchor.port, theirs, duration))  # fmt: skip


def _reading(i: int) -> dict[str, float]:
    return {"voltage": 12.6, "current": -3.2, "power": -40.3, "soc": 80 + i % 20}


def http_update(ctx: Context) -> list[Line]:
    """POST /interface/update/batmon (answered after its commit) vs a one-row INSERT endpoint."""
    folder = ctx.folder_for("http-update")
    anchor = PythonServer("benchmarks.anchor_app", ["--db", str(folder / "anchor.sqlite3")], folder)
    lines = []
    with running_product(folder) as product:
        try:
            anchor.start()
            product.add_batmons(8)

            def product_request(batmon_id: int, token: str) -> bytes:
                body = {"batmon_id": batmon_id, "batmon_token": token, **_reading(batmon_id)}
                return build_request("POST", "/interface/update/batmon", json.dumps(body).encode())

            def anchor_request(batmon_id: int) -> bytes:
                body = {"batmon_id": batmon_id, **_reading(batmon_id)}
                return build_request("POST", "/update", json.dumps(body).encode())

            for clients in (1, 8):
                got_p, got_a = _compare(ctx, product, anchor, clients, product_request, anchor_request)
                anchor_fig = Figure(ANCHOR + ", INSERT + commit", "/s", got_a)
                lines.append(Line("http-update", f"HTTP update POST, {clients} keep-alive client(s)",
                                  Figure("batmon serve", "/s", got_p), anchor_fig, goal="≥ 0.8"))
        finally:
            anchor.stop()
    return lines


def http_status(ctx: Context) -> list[Line]:
    """GET /interface/batmon/status (device token) vs a read-by-primary-key endpoint."""
    folder = ctx.folder_for("http-status")
    anchor = PythonServer("benchmarks.anchor_app", ["--db", str(folder / "anchor.sqlite3")], folder)
    lines = []
    with running_product(folder) as product:
        try:
            anchor.start()
            product.add_batmons(ctx.sized(50, 8))

            def product_request(batmon_id: int, token: str) -> bytes:
                query = f"batmon_id={batmon_id}&batmon_token={token}"
                return build_request("GET", f"/interface/batmon/status?{query}")

            def anchor_request(batmon_id: int) -> bytes:
                return build_request("GET", f"/status?batmon_id={batmon_id}")

            for clients in (1, 8, 50) if not ctx.quick else (1, 8):
                got_p, got_a = _compare(ctx, product, anchor, clients, product_request, anchor_request)
                lines.append(Line("http-status", f"HTTP status GET, {clients} keep-alive client(s)",
                                  Figure("batmon serve", "/s", got_p),
                                  Figure(ANCHOR + ", SELECT by id", "/s", got_a), goal="≥ 0.9"))  # fmt: skip
        finally:
            anchor.stop()
    return lines
