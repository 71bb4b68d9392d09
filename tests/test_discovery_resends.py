"""Home Assistant's ``online`` re-sends discovery configs scoped and debounced (issue 15):
only the sending user's batmons (where the broker knows the user), at most once per interval
per user (once at once, once at the interval's end), in batches that yield to the loop.
On an external broker the message names no user: one interval for everyone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace

from bridge.extensions.discovery import RESEND_BATCH, RESEND_INTERVAL_S, HomeAssistantDiscovery
from bridge.topics import Topics
from tests.support import Env
from tests.test_discovery import a_batmon

TOPICS = Topics(base="batmon", discovery_prefix="homeassistant")
ALICE, BOB = 1, 2


def glue_with(batmons: dict[int, int], interval_s: float = RESEND_INTERVAL_S,
              also_resend: Callable[[int | None], None] | None = None,
              ) -> tuple[HomeAssistantDiscovery, list[str]]:  # fmt: skip
    """Discovery over ``{batmon_id: owner}``; the topics it publishes, in order."""
    core = SimpleNamespace(batmons={i: a_batmon(id=i, user_id=owner) for i, owner in batmons.items()})
    sent: list[str] = []
    glue = HomeAssistantDiscovery(core, TOPICS, lambda topic, _payload: sent.append(topic),  # type: ignore[arg-type]
                                  resend_interval_s=interval_s, also_resend=also_resend)  # fmt: skip
    return glue, sent


def test_online_from_a_user_resends_only_that_users_configs() -> None:
    glue, sent = glue_with({1: ALICE, 2: BOB, 3: ALICE})
    glue.on_homeassistant_status(b"online", ALICE)
    assert sent == [TOPICS.discovery(1), TOPICS.discovery(3)]
    sent.clear()
    glue.on_homeassistant_status(b"online", BOB)  # another user: its own interval
    assert sent == [TOPICS.discovery(2)]


def test_a_flood_of_online_is_answered_at_once_and_once_more_when_the_interval_ends() -> None:
    async def flood() -> tuple[list[str], list[str]]:
        glue, sent = glue_with({1: ALICE, 2: BOB}, interval_s=0.3)
        for _ in range(1000):
            glue.on_homeassistant_status(b"online", ALICE)
        glue.on_homeassistant_status(b"offline", BOB)  # not a birth: nothing to answer
        during = list(sent)
        await asyncio.sleep(0.6)
        await glue.stop()
        return during, sent

    during, after = asyncio.run(flood())
    assert during == [TOPICS.discovery(1)]
    assert after == [TOPICS.discovery(1)] * 2  # the 999 others folded into one, at the end


def test_other_configs_banks_included_follow_the_same_rule() -> None:
    async def flood() -> list[int | None]:
        asked: list[int | None] = []
        glue, _ = glue_with({1: ALICE}, interval_s=0.3, also_resend=asked.append)
        for _ in range(100):
            glue.on_homeassistant_status(b"online", ALICE)
        await asyncio.sleep(0.6)
        await glue.stop()
        return asked

    assert asyncio.run(flood()) == [ALICE, ALICE]


def test_without_a_user_every_config_goes_out_once_per_interval() -> None:
    glue, sent = glue_with({1: ALICE, 2: BOB})
    for _ in range(50):
        glue.on_homeassistant_status(b"online")  # no loop here: nothing deferred
    assert sent == [TOPICS.discovery(1), TOPICS.discovery(2)]


def test_a_resend_of_many_configs_yields_to_the_loop_between_batches() -> None:
    async def resend() -> tuple[int, int, int]:
        glue, sent = glue_with({i: ALICE for i in range(1, 1001)})
        others: list[int] = []

        async def another_client() -> None:
            while len(sent) < 1000:
                others.append(len(sent))
                await asyncio.sleep(0)

        task = asyncio.create_task(another_client())
        glue.on_homeassistant_status(b"online", ALICE)
        at_once = len(sent)
        await task
        return at_once, len(sent), len(set(others))

    at_once, total, interleavings = asyncio.run(resend())
    assert at_once == RESEND_BATCH and total == 1000
    assert interleavings >= 1000 // RESEND_BATCH - 1  # the loop ran between the batches


def test_external_broker_a_flood_of_online_resends_each_config_once(env: Env) -> None:
    batmon = env.add_batmon()
    bridge = env.bridge()
    config = env.topics.discovery(batmon.id)
    watcher = env.probe(config)
    watcher.wait_count(config, 1)  # the retained one
    for _ in range(50):
        watcher.publish(env.topics.homeassistant_status, b"online")
    watcher.wait_count(config, 2)  # the re-send, at once

    def heard() -> int:
        stats = bridge.stats
        return sum(stats.get(f"homeassistant_online_{k}", 0) for k in ("answered", "deferred", "folded"))

    deadline = time.monotonic() + 5
    while heard() < 50 and time.monotonic() < deadline:  # bounded: the count below is the check
        time.sleep(0.05)
    time.sleep(0.5)  # anything published for them is on its way
    watcher.sync()
    live = [m for m in watcher.on(config) if not m.retain]
    assert len(live) == 1, f"{len(live)} re-sends of one config for 50 online"
    assert bridge.stats["homeassistant_online_deferred"] == 1  # one more at the interval's end
