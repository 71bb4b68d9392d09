"""A plain amqtt 0.12 broker in its own process: the embedded-broker anchor.

Configured like the product's broker.yaml (no loggers, no $SYS publisher) but with
amqtt's own anonymous authentication, so it measures amqtt's pass-through alone.

    python -m benchmarks.amqtt_anchor --port P
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from amqtt.broker import Broker


async def run(port: int) -> None:
    """Serve until SIGTERM/SIGINT."""
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 1000}},
        "timeout_disconnect_delay": 0,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(parser.parse_args().port))


if __name__ == "__main__":
    main()
