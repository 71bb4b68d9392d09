"""The names and payloads of the NOTIFYs several workers on one database exchange
(bridge/store/pg_notify.py listens; the store's writer announces readings with these)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

CONFIG_CHANNEL = "batmon_config"
READINGS_CHANNEL = "batmon_readings"
WORKER_TAG = secrets.token_hex(4)
"""This process's mark on its readings notices (a worker skips its own)."""
MAX_PAYLOAD = 7900  # NOTIFY's payload limit is 8000 bytes


def readings_notices(batmon_ids: Sequence[int]) -> list[str]:
    """The payloads announcing new latest values of these batmons (each under NOTIFY's limit)."""
    payloads: list[str] = []
    head = WORKER_TAG + ":"
    text = head
    for batmon_id in sorted(set(batmon_ids)):
        part = str(batmon_id)
        if len(text) + len(part) + 1 > MAX_PAYLOAD:
            payloads.append(text.rstrip(","))
            text = head
        text += part + ","
    if text != head:
        payloads.append(text.rstrip(","))
    return payloads


def parse_readings_notice(payload: str) -> list[int]:
    """The batmon ids of another worker's notice; [] for this worker's own or a bad one."""
    tag, _, ids = payload.partition(":")
    if tag == WORKER_TAG:
        return []
    try:
        return [int(part) for part in ids.split(",") if part]
    except ValueError:
        return []
