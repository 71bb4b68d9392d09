"""Memory of `batmon agent vedirect` over a long replay: it must stay flat.

Replays the BMV-702 recording in a loop at 10 blocks/s into a private Mosquitto (on a
free port, anonymous) for ``--minutes`` (10 by default), with the broker stopped for
the middle fifth so the durable queue fills and drains. Samples the agent's resident
memory (VmRSS) every 10 s and prints it with the agent's own counters.

    python benchmarks/bench_agent_memory.py [--minutes 10] [--interval 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDING = ROOT / "bridge" / "agent" / "recordings" / "bmv702.vedirect"
MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_mosquitto(folder: Path, port: int) -> subprocess.Popen[bytes]:
    config = folder / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=10.0, help="blocks per second")
    args = parser.parse_args()
    total_s = args.minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        port = free_port()
        broker = start_mosquitto(folder, port)
        log = (folder / "agent.log").open("w")
        agent = subprocess.Popen(
            [sys.executable, "-m", "batmon.cli", "agent", "vedirect", "--replay", str(RECORDING),
             "--replay-rate", str(args.rate), "--replay-loop", "--batmon-id", "1",
             "--token", "benchmark", "--mqtt-url", f"mqtt://u:p@127.0.0.1:{port}",
             "--data-dir", str(folder / "agent"), "--interval", str(args.interval)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
        assert agent.stdout is not None
        agent.stdout.readline()
        started = time.monotonic()
        down_from, down_to = total_s * 0.4, total_s * 0.6
        samples: list[tuple[float, int]] = []
        broker_up, outage_done = True, False
        try:
            while (elapsed := time.monotonic() - started) < total_s:
                if broker_up and not outage_done and elapsed >= down_from:
                    broker.send_signal(signal.SIGTERM)
                    broker.wait(5)
                    broker_up = False
                elif not broker_up and elapsed >= down_to:
                    broker = start_mosquitto(folder, port)
                    broker_up = outage_done = True
                samples.append((elapsed, rss_kib(agent.pid)))
                print(f"{elapsed:6.0f} s  rss {samples[-1][1] / 1024:6.1f} MiB"
                      f"  broker {'up' if broker_up else 'DOWN'}", flush=True)  # fmt: skip
                time.sleep(10)
            time.sleep(8)  # let the queue drain after the outage
        finally:
            agent.send_signal(signal.SIGTERM)
            out, _ = agent.communicate(timeout=30)
            broker.send_signal(signal.SIGTERM)
            broker.wait(5)
        minute = [r for t, r in samples if t <= 70]
        last = [r for t, r in samples if t >= total_s - 70]
        print(f"agent: {out.strip()}")
        print(f"rss first minute {min(minute) / 1024:.1f}-{max(minute) / 1024:.1f} MiB,"
              f" last minute {min(last) / 1024:.1f}-{max(last) / 1024:.1f} MiB,"
              f" peak {max(r for _, r in samples) / 1024:.1f} MiB over {len(samples)} samples")
        print(f"queue file: {os.path.getsize(folder / 'agent' / 'agent-queue.sqlite3') / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
