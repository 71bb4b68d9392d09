"""Several `batmon serve` workers on one PostgreSQL database (issue 16), as real processes:
the embedded broker refused to a second worker, updates shared out through `$share`."""

from __future__ import annotations

import signal
from pathlib import Path

from tests import pg_support
from tests.conftest import ServeProcess
from tests.support import batmon


def test_a_second_worker_with_the_embedded_broker_on_one_database_is_refused(tmp_path: Path) -> None:
    url = pg_support.fresh_database_url()
    first = ServeProcess(tmp_path / "first", args=["--database-url", url]).start()
    try:
        second = batmon("serve", "--data-dir", str(tmp_path / "second"), "--database-url", url,
                        "--http-port", "0", "--mqtt-port", "0")  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().count("\n") == 0 and "Traceback" not in second.stderr
        assert "--mqtt-url" in second.stderr and "embedded broker" in second.stderr
        assert "batmon_test_" in second.stderr  # names the database (never a password)
    finally:
        first.stop(signal.SIGKILL)  # the lock goes with its session, however serve ended
    again = ServeProcess(tmp_path / "second", args=["--database-url", url]).start()
    assert again.stop() == 0
