"""Swagger UI groups operations by tag: every operation has exactly one, named for its area,
so /docs does not pile all paths under "default" (issue 18)."""

from __future__ import annotations

from http_api.openapi import TAGS, build_openapi


def test_every_operation_has_one_declared_tag_and_each_area_is_used() -> None:
    document = build_openapi()
    declared = [t["name"] for t in document["tags"]]
    assert declared == [name for name, _ in TAGS if name in declared]  # in the reader's order
    used: dict[str, list[str]] = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            tags = operation.get("tags")
            assert tags and len(tags) == 1 and tags[0] in declared, (path, method, tags)
            used.setdefault(tags[0], []).append(path)
    assert set(used) == set(declared), set(declared) - set(used)


def test_areas_hold_the_paths_a_reader_expects() -> None:
    document = build_openapi()

    def tag(path: str, method: str = "post") -> str:
        return document["paths"][path][method]["tags"][0]

    assert tag("/interface/update/batmon") == tag("/interface/batmon/history") == "Readings"
    assert tag("/interface/add/batmon") == tag("/interface/batmon/status") == "Batmons"
    assert tag("/interface/batmon/alarm/add") == "Alarms"
    assert tag("/interface/user/notifications") == tag("/interface/batmon/notifications") == "Notices"
    assert tag("/interface/login") == "Account"
    assert tag("/healthz", "get") == tag("/openapi.json", "get") == "Service"
