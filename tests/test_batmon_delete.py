"""Deleting a batmon: gone from every endpoint at once, its readings purged off the loop
afterwards (resuming after a restart), its id never handed out again. No timing asserted
here: how long the service stays responsive meanwhile is the benchmark row ``delete``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.core import Core
from bridge.events import EventBus
from bridge.models import AddBatmon
from bridge.store.db import SqliteStore
from tests.conftest import Api
from tests.support import wait_until

T0 = 1_700_000_000


def fill(api: Api, batmon_id: int, count: int) -> None:
    """History for a batmon, written through the store's own sink (as the writer would)."""
    rows = [(batmon_id, T0 + k, 12.0, 1.0, 10.0, 50.0, None) for k in range(count)]
    api.core.store.write(rows, [])


def test_a_deleted_batmon_is_gone_from_every_endpoint_at_once(api: Api) -> None:
    c, auth = api.client, api.auth
    gone, gone_token = api.add_batmon(batmon_name="gone")
    kept, kept_token = api.add_batmon(batmon_name="kept")
    for batmon_id, token in ((gone, gone_token), (kept, kept_token)):
        assert c.post("/interface/update/batmon", json={"batmon_id": batmon_id, "batmon_token": token,
                                                        "soc": 50}).status_code == 200  # fmt: skip
    fill(api, gone, 2_000)
    api.core.writer.purge_chunk_rows = 150  # several chunks, so the purge is seen under way

    answer = c.post("/interface/delete/batmon", headers=auth, json={"batmon_id": gone})
    assert answer.json() == {"success": "success"}

    # Right away, whatever the purge has done so far: every door says it does not exist.
    missing = f"batmon_id {gone} does not exist."
    by_owner = {"batmon_id": gone}
    by_device = {"batmon_id": gone, "batmon_token": gone_token}
    for response in (
        c.get("/interface/batmon/status", headers=auth, params=by_owner),
        c.get("/interface/batmon/status", params=by_device),
        c.get("/interface/batmon/history", headers=auth, params={**by_owner, "min_epoch_tm_sec": 0}),
        c.get("/interface/batmon/history", params={**by_device, "min_epoch_tm_sec": 0}),
        c.post("/interface/update/batmon", json={**by_device, "soc": 10}),
        c.post("/interface/edit/batmon", headers=auth, json={**by_owner, "batmon_name": "back"}),
        c.post("/interface/delete/batmon", headers=auth, json=by_owner),
        c.post("/interface/batmon/alarm/add", headers=auth, json={
            **by_owner, "alarm_name": "a", "alarm_metric": "soc", "alarm_condition": "<",
            "alarm_threshold_value": 1}),
    ):
        assert (response.status_code, response.json()) == (404, {"error": missing}), response.request.url
    listed = c.get("/interface/batmon/list", headers=auth).json()["success"]
    assert [b["batmon_id"] for b in listed] == [kept]
    assert c.get("/interface/batmon/count", headers=auth).json()["success"] == {"batmons": 1}
    everything = c.get("/interface/batmon/history", headers=auth, params={"min_epoch_tm_sec": 0})
    assert [h["batmon_id"] for h in everything.json()["success"]] == [kept]
    assert c.get("/interface/batmon/status", params={"batmon_id": kept, "batmon_token": kept_token}
                 ).json()["success"]["batmon_soc"] == 50  # fmt: skip

    # Its readings go, a chunk at a time, and its neighbour keeps its own.
    wait_until(lambda: api.core.store.reading_count(gone) == 0, 10, "the deleted batmon's readings purged")
    assert api.core.store.deleted_with_data() == []
    assert api.core.store.reading_count(kept) == 1


def test_a_deleted_batmons_id_is_never_handed_out_again(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    gone, _ = api.add_batmon(batmon_name="gone")
    assert api.client.post("/interface/delete/batmon", headers=api.auth,
                           json={"batmon_id": gone}).status_code == 200  # fmt: skip
    # The id source proposes the deleted id first: the core must pass it by.
    proposals = iter([gone - 1, gone - 1, 41])
    monkeypatch.setattr("bridge.core.secrets.randbelow", lambda _: next(proposals))
    new, _ = api.add_batmon(batmon_name="new")
    assert new == 42
    # And after a restart, from the store's memory of retired ids.
    restarted = Core(api.core.store, EventBus()).load()
    proposals = iter([gone - 1, 42 - 1, 6])
    user = restarted.user_by_id(api.user.id)
    assert user is not None
    assert restarted.add_batmon(user, AddBatmon(batmon_name="again")).id == 7


def test_a_purge_cut_short_by_a_stop_resumes_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "batmon.sqlite3"
    store = SqliteStore.open(path)
    core = Core(store, EventBus()).load()
    user, _ = core.create_user("owner@example.org")
    batmon = core.add_batmon(user, AddBatmon(batmon_name="gone"))
    store.write([(batmon.id, T0 + k, 1.0, None, None, None, None) for k in range(1_000)], [])
    # The process stopped right after the delete committed, before any chunk was purged.
    store.delete_batmon(batmon.id)
    store.close()

    store = SqliteStore.open(path)
    assert store.deleted_with_data() == [batmon.id] and store.reading_count(batmon.id) == 1_000
    restarted = Core(store, EventBus())
    restarted.writer.purge_chunk_rows = 100
    restarted.load()
    try:
        assert batmon.id not in restarted.batmons
        wait_until(lambda: store.reading_count(batmon.id) == 0, 10, "the purge resumed and finished")
        assert store.deleted_with_data() == []
    finally:
        asyncio.run(restarted.writer.drain())
        store.close()
