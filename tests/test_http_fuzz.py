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

# What the document's "apprise-url" format stands for: URLs Apprise loads (json://,
# mailto://), or "" to remove a target. Which URLs a scheme's plugin accepts is
# Apprise's to say, so the generator is told here.
_HOST = st.from_regex(r"[a-z]([a-z0-9-]{0,13}[a-z0-9])?(\.[a-z]{2,6})?", fullmatch=True)
APPRISE_URLS = st.one_of(
    st.just(""),
    st.builds("json://{}:{}/{}".format, _HOST, st.integers(1, 65535),
              st.from_regex(r"[a-z0-9]{0,12}", fullmatch=True)),
    st.builds("mailto://{}:{}@{}.org".format, st.from_regex(r"[a-z]{1,12}", fullmatch=True),
              st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True), _HOST),
)  # fmt: skip
schemathesis.openapi.format("apprise-url", APPRISE_URLS)


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


# Hundreds of generated requests each: on a loaded 2-core machine more than the default 120 s.
pytestmark = pytest.mark.timeout(360)


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


# Refusals a request valid by the schema may still get: they depend on state (which ids
# exist, whose they are, which credentials are right), not on the shape of the fields.
STATE_REFUSALS = {401, 403, 404}


def _state_refusal(path: str, status: int, text: str) -> bool:
    """A 400 that depends on stored state, not on the request: a test notice before any
    target is set (a 409 would say so more plainly)."""
    return (path == "/interface/user/notifications/test" and status == 400
            and "No notification target is set" in text)  # fmt: skip


def test_no_request_valid_by_the_schema_is_refused_as_invalid(
    target: tuple[schemathesis.BaseSchema, str],
) -> None:
    # The document is generated from the models that validate: whatever it allows must
    # not come back as a 400 (or 413, 422...). Seen before: token pattern, alarm_metric,
    # min <= max, names of spaces only.
    schema, api_key = target
    operations = [result.ok() for result in schema.get_all_operations()]
    strategies = [op.as_strategy(generation_mode=GenerationMode.POSITIVE) for op in operations
                  if op.path not in PLAIN_PATHS | {"/interface/logout"}]  # fmt: skip

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(strategies))
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers={"X-API-Key": api_key})
        if _state_refusal(case.operation.path, response.status_code, response.text):
            return
        assert response.status_code < 300 or response.status_code in STATE_REFUSALS, (
            f"{case.operation.label} refused a request its schema allows:"
            f" {response.status_code} {response.text}\n{case.as_curl_command()}"
        )

    check()
