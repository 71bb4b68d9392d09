"""Property test: schemathesis generates requests from our /openapi.json, both
schema-valid and schema-violating, against the real app on a real SQLite file.
No input may cause a 5xx, and every answer is ``{"success": ...}`` or ``{"error": ...}``
(or CSV with its header, where history was asked for CSV).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from bridge.core import Core
from bridge.events import EventBus
from bridge.models import AddBatmon
from bridge.ratelimit import FailureLimiter
from bridge.store.db import Store
from http_api.app import create_app

PLAIN_PATHS = {"/healthz", "/openapi.json"}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[schemathesis.BaseSchema, str]]:
    path: Path = tmp_path_factory.mktemp("fuzz") / "batmon.sqlite3"
    store = Store.open(path)
    core = Core(store, EventBus()).load()
    user, api_key = core.create_user("fuzz@example.org")
    core.add_batmon(user, AddBatmon(batmon_name="fuzzed", batmon_token="fuzz-token"))
    app = create_app(core, session_secret=b"f" * 32,
                     limiter=FailureLimiter(max_failures=10**9))  # fmt: skip
    yield schemathesis.openapi.from_asgi("/openapi.json", app), api_key
    store.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_causes_a_server_error(
    target: tuple[schemathesis.BaseSchema, str], mode: GenerationMode
) -> None:
    schema, api_key = target
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    strategies = [op.as_strategy(generation_mode=mode) for op in operations
                  if op.path != "/interface/logout"]  # fmt: skip

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(strategies))
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers={"X-API-Key": api_key})
        assert response.status_code < 500, f"{case.operation.label}: {response.text}"
        content_type = " ".join(response.headers.get("content-type") or [])  # a list per header
        if content_type.startswith("text/csv"):  # history, format=csv
            lines = list(csv.reader(io.StringIO(response.text)))
            assert response.status_code == 200 and lines[0][0] == "batmon_id", response.text
        elif case.operation.path not in PLAIN_PATHS:
            body = response.json()
            assert isinstance(body, dict) and set(body) in ({"success"}, {"error"}), body

    check()
