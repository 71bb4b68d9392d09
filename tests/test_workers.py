"""The scale-out harness itself (tests/workers.py): two workers on one database and broker."""

from __future__ import annotations

from pathlib import Path

import httpx2 as httpx

from tests.workers import workers


def test_two_workers_share_one_database_and_one_login(tmp_path: Path) -> None:
    with workers(tmp_path) as group:
        a, b = group.start(2)
        for proc in (a, b):  # worker 0 made the admin; worker 1 knows its key from the database
            assert httpx.get(f"{proc.http_url}/healthz").status_code == 200
            r = httpx.get(f"{proc.http_url}/interface/batmon/count", headers=group.auth)
            assert r.status_code == 200, r.text
        assert httpx.get(f"{b.http_url}/interface/batmon/count", headers={"X-API-Key": "x" * 32}
                         ).status_code in (401, 403)  # fmt: skip
