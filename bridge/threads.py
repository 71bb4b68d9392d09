"""Blocking work off the event loop, on a thread that ends with it.

The rule (docs/DESIGN.md, "Threads"): the event loop's thread owns all state; a
thread of our own owns only what it was given and hands its result back to the
loop. asyncio's default executor would keep its threads for the life of the loop,
so a service started and stopped in one process would leave them behind; a thread
per call costs ~0.1 ms and is used only where calls are rare (a stop, a retention
pass). Frequent work has a pool its owner closes (history reads, the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_on_own_thread(fn: Callable[[], T], *, name: str) -> T:
    """Run ``fn`` on a new thread and await its result without blocking the loop.

    Cancelling the awaiting coroutine does not stop ``fn``; its thread ends when it returns.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(result)  # type: ignore[arg-type]
        else:
            done.set_exception(error)

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done
