"""Several real `batmon serve` workers on one PostgreSQL database and one private Mosquitto,
as deploy/batmon@.service runs them: the scale-out tests' one harness (issue 16).

Every worker gets the same session key (a login made on one is honoured by the others, as
the unit arranges with LoadCredential=), its own data folder and its own free HTTP port.
A killed worker is restarted with the same arguments, as systemd's Restart=always would.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import ServeProcess
from tests.pg_support import fresh_database_url
from tests.support import PrivateMosquitto


class Workers:
    """N `batmon serve --mqtt-url ... --database-url ...` processes; ``extra(i)`` adds
    per-worker arguments (a client id, a share group)."""

    def __init__(self, root: Path, database_url: str, broker: PrivateMosquitto,
                 extra: Callable[[int], list[str]] = lambda i: []) -> None:  # fmt: skip
        self.root = root
        self.database_url = database_url
        self.broker = broker
        self.extra = extra
        self.procs: list[ServeProcess] = []
        self.admin_key: str | None = None

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.broker.port}"

    def _process(self, i: int) -> ServeProcess:
        data_dir = self.root / f"worker-{i}"
        if i > 0:  # the shared session key, as the unit hands one to every instance
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copy(self.root / "worker-0" / "session.key", data_dir / "session.key")
        args = ["--mqtt-url", self.mqtt_url, "--database-url", self.database_url, *self.extra(i)]
        return ServeProcess(data_dir, args=args)

    def start(self, n: int) -> list[ServeProcess]:
        """Start workers 0..n-1, the first alone (it makes the schema and the admin user)."""
        for i in range(len(self.procs), n):
            proc = self._process(i).start()
            if i == 0:
                self.admin_key = proc.admin_key
            self.procs.append(proc)
        return self.procs

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        self.procs[i].stop(sig)

    def restart(self, i: int) -> ServeProcess:
        """Worker i again, same folder and arguments (systemd's Restart=always)."""
        old = self.procs[i]
        if old.proc is not None and old.proc.poll() is None:
            old.stop()
        self.procs[i] = ServeProcess(old.data_dir, args=old.args).start()
        return self.procs[i]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.proc is not None:
                proc.stop(signal.SIGKILL)

    @property
    def auth(self) -> dict[str, str]:
        assert self.admin_key, "worker 0 printed no api_key: was the database not empty?"
        return {"X-API-Key": self.admin_key}


@contextmanager
def workers(tmp_path: Path, extra: Callable[[int], list[str]] = lambda i: []) -> Iterator[Workers]:
    """A fresh database, a private Mosquitto with persistence, and no worker yet."""
    (tmp_path / "mosquitto").mkdir(parents=True, exist_ok=True)
    broker = PrivateMosquitto(tmp_path / "mosquitto").start()
    group = Workers(tmp_path / "workers", fresh_database_url(), broker, extra)
    try:
        yield group
    finally:
        group.stop_all()
        broker.stop()
