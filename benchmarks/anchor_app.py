"""The minimal Starlette peer of the HTTP rows: one-row INSERT and read-by-PK
endpoints over SQLite (WAL, synchronous=NORMAL, commit per update, as the product),
served by uvicorn exactly as `batmon serve` serves its app.

    python -m benchmarks.anchor_app --port P --db FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sqlite3
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ROWS = 1000  # batmons the read endpoint can find by primary key


def open_db(path: Path) -> sqlite3.Connection:
    """A database with a readings table and ROWS batmons to read back."""
    conn = sqlite3.connect(str(path), check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY, batmon_id INTEGER,"
                 " ts REAL, voltage REAL, current REAL, power REAL, soc REAL)")  # fmt: skip
    conn.execute("CREATE TABLE IF NOT EXISTS batmons (id INTEGER PRIMARY KEY, name TEXT, token TEXT,"
                 " voltage REAL, soc REAL, last_modified REAL)")  # fmt: skip
    conn.executemany("INSERT OR IGNORE INTO batmons VALUES (?, ?, ?, 12.5, 80, 0)",
                     [(i, f"batmon {i}", f"token-{i}") for i in range(1, ROWS + 1)])  # fmt: skip
    conn.commit()
    return conn


def create_app(conn: sqlite3.Connection) -> Starlette:
    """POST /update inserts one row and commits; GET /status reads one row by id."""

    async def update(request: Request) -> Response:
        body = json.loads(await request.body())
        conn.execute(
            "INSERT INTO readings (batmon_id, ts, voltage, current, power, soc)"
            " VALUES (?, strftime('%s'), ?, ?, ?, ?)",
            (int(body["batmon_id"]), body.get("voltage"), body.get("current"), body.get("power"),
             body.get("soc")),
        )  # fmt: skip
        conn.commit()
        return JSONResponse({"success": "success"})

    async def status(request: Request) -> Response:
        row = conn.execute("SELECT id, name, token, voltage, soc, last_modified FROM batmons WHERE id = ?",
                           (int(request.query_params["batmon_id"]),)).fetchone()  # fmt: skip
        if row is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        keys = ("batmon_id", "batmon_name", "batmon_token", "batmon_voltage", "batmon_soc", "last_modified")
        return JSONResponse(dict(zip(keys, row, strict=True)))

    return Starlette(routes=[Route("/update", update, methods=["POST"]),
                             Route("/status", status, methods=["GET"])])  # fmt: skip


async def serve(port: int, db: Path) -> None:
    """Bind as batmon/service.py does (IPPROTO_TCP, so asyncio sets TCP_NODELAY), then serve."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    config = uvicorn.Config(create_app(open_db(db)), log_level="warning", lifespan="off", access_log=False)
    await uvicorn.Server(config).serve(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.db))


if __name__ == "__main__":
    main()
