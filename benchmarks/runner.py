"""What every row shares: the run's settings, A/B alternation, and a product to talk to."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.http_load import KeepAlive, build_request
from benchmarks.mqtt_load import Device, update_topic
from benchmarks.procs import BenchError, Serve


@dataclass
class Context:
    """Settings of this run and facts one row leaves for another."""

    folder: Path  # a temporary folder for this run's data
    quick: bool = False
    reps: int = 3
    max_mqtt_rate: float | None = None  # embedded broker, rows persisted/s (latency row)
    shared: dict[str, Any] = field(default_factory=dict)  # things rows share, e.g. the 5 M-row server
    cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # closed after the last row

    def seconds(self, full: float, quick: float) -> float:
        """A duration of the full run, or of the --quick smoke run."""
        return quick if self.quick else full

    def sized(self, full: int, quick: int) -> int:
        """A size of the full run, or of the --quick smoke run."""
        return quick if self.quick else full

    def folder_for(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def alternate(reps: int, a: Callable[[], float], b: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Run a and b ``reps`` times each as A B, B A, A B ...: drift in the machine's load
    then hits both sides alike."""
    got_a: list[float] = []
    got_b: list[float] = []
    for i in range(reps):
        order = ((a, got_a), (b, got_b)) if i % 2 == 0 else ((b, got_b), (a, got_a))
        for fn, into in order:
            into.append(fn())
    return got_a, got_b


def sized_to(rate: float, seconds: float, low: int, high: int) -> int:
    """How many messages take about ``seconds`` at ``rate``, within [low, high]."""
    return max(low, min(high, int(rate * seconds)))


class Product:
    """A running `batmon serve` and the batmons the benchmark made on it."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.batmons: list[tuple[int, str]] = []

    @property
    def http_port(self) -> int:
        return self.serve.http_port

    def add_batmons(self, n: int, update_period: int = 3600) -> list[tuple[int, str]]:
        """n batmons made through the HTTP API, as the admin user."""
        client = KeepAlive(self.http_port)
        try:
            for i in range(len(self.batmons), len(self.batmons) + n):
                body = json.dumps({"batmon_name": f"bench {i}", "update_period": update_period}).encode()
                status, answer = client.call(build_request("POST", "/interface/add/batmon", body,
                                                           {"X-API-Key": self.serve.admin_key}))  # fmt: skip
                if status != 200:
                    raise BenchError(f"add batmon: HTTP {status}: {answer[:200]!r}")
                made = json.loads(answer)["success"]
                self.batmons.append((made["batmon_id"], made["batmon_token"]))
        finally:
            client.close()
        return self.batmons[-n:]

    def devices(self, external: bool) -> list[Device]:
        """Each batmon as an MQTT publisher: on the embedded broker it logs in as itself."""
        return [Device(update_topic(i, t), None if external else str(i), None if external else t)
                for i, t in self.batmons]  # fmt: skip


@contextlib.contextmanager
def running_product(folder: Path, args: list[str] | None = None) -> Iterator[Product]:
    """`batmon serve` on a fresh data folder, stopped (SIGTERM) afterwards."""
    serve = Serve(folder / "data", list(args or []))
    try:
        serve.start()
        yield Product(serve)
    finally:
        serve.stop()
