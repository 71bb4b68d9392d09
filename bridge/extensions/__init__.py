"""Extensions: each reacts to events on the bus, with async start() and stop(), built,
started and stopped by the composition root (batmon/service.py) in one declared order.
"""

from __future__ import annotations

from typing import Protocol


class Extension(Protocol):
    """What the composition root starts and stops.

    The constructor only stores references: no subscription, task, thread or I/O
    before ``start``. ``stop`` undoes all of ``start``, is safe on a half-started
    extension, and returns within the service's stop bound (it is cancelled after it).
    The doors and the HTTP server take the same shape, so the order is one list.
    """

    async def start(self) -> None:
        """Subscribe, start tasks, open what is needed."""
        ...

    async def stop(self) -> None:
        """Unsubscribe, end tasks, close what start opened."""
        ...
