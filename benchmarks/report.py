"""Figures, the table of medians and ratios, and benchmarks/RESULTS.md with the machine,
the versions and the date, so a figure always travels with what it was measured on."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import sqlite3
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import MOSQUITTO, ROOT

FORMATS = {
    "/s": lambda v: f"{v:,.0f}/s",
    "ms": lambda v: f"{v:,.1f} ms" if v < 100 else f"{v:,.0f} ms",
    "s": lambda v: f"{v:,.2f} s",
    "MB": lambda v: f"{v:,.0f} MB",
    "µs": lambda v: f"{v:,.1f} µs" if v < 100 else f"{v:,.0f} µs",
    "cores": lambda v: f"{v:,.2f} cores",
}


def p99(values: list[float]) -> float:
    """The 99th percentile (the maximum below 100 samples); NaN for no samples."""
    values = sorted(values)
    if not values:
        return math.nan
    return values[min(len(values) - 1, int(len(values) * 0.99))]


@dataclass
class Figure:
    """One measured quantity: every repetition's value, reported as their median."""

    label: str  # what was measured, e.g. "batmon serve, 100 batmons"
    unit: str  # a key of FORMATS
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """The median of the repetitions that produced a value (NaN: none seen)."""
        seen = [v for v in self.samples if not math.isnan(v)]
        return statistics.median(seen) if seen else math.nan

    def text(self, value: float | None = None) -> str:
        value = self.median if value is None else value
        return "n/a" if math.isnan(value) else FORMATS[self.unit](value)


@dataclass
class Line:
    """One line of the table: a product figure against an anchor measured in the same run."""

    row: str  # the --only name of the row that produced it
    what: str
    product: Figure | None = None
    anchor: Figure | None = None
    goal: str = ""
    error: str = ""
    compare: bool = True  # False where product / anchor means nothing (a baseline near zero)

    @property
    def ratio(self) -> float | None:
        if not self.compare or self.product is None or self.anchor is None:
            return None
        ratio = self.product.median / self.anchor.median if self.anchor.median else math.nan
        return None if math.isnan(ratio) else ratio


def table(lines: list[Line]) -> str:
    """The Markdown table of medians and ratios (product / anchor), every anchor shown."""
    out = ["| row | what | product | anchor | anchor figure | ratio | goal |",
           "| --- | --- | ---: | --- | ---: | ---: | --- |"]  # fmt: skip
    for line in lines:
        if line.error:
            out.append(f"| {line.row} | {line.what} | **failed**: {line.error} | | | | {line.goal} |")
            continue
        product = line.product.text() if line.product else ""
        anchor = line.anchor.label if line.anchor else ""
        anchor_value = line.anchor.text() if line.anchor else ""
        ratio = f"{line.ratio:.2f}" if line.ratio is not None else ""
        cells = (line.row, line.what, product, anchor, anchor_value, ratio, line.goal)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def samples_text(lines: list[Line]) -> str:
    """Every repetition of every figure, for judging the noise behind a median."""
    out = []
    for line in lines:
        for fig in (line.product, line.anchor):
            if fig is not None and fig.samples:
                values = ", ".join(fig.text(v) for v in fig.samples)
                entry = f"- {line.what} / {fig.label}: {values}"
                if entry not in out:
                    out.append(entry)
    return "\n".join(out)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _mosquitto_version() -> str:
    try:
        first = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=10).stdout
        return first.splitlines()[0].removeprefix("mosquitto version ").strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "not found"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> list[tuple[str, str]]:
    """What the figures were measured on."""
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("commit", _commit()),
        ("nproc", str(os.cpu_count())),
        ("CPU", _cpu_model()),
        ("memory", _memory()),
        ("load average (1/5/15 min) at the end", load),
        ("python", platform.python_version()),
        ("amqtt", _version("amqtt")),
        ("mosquitto", _mosquitto_version()),
        ("sqlite", sqlite3.sqlite_version),
        ("paho-mqtt / uvicorn / starlette / sqlite-utils / orjson",
         " / ".join(_version(d) for d in ("paho-mqtt", "uvicorn", "starlette", "sqlite-utils", "orjson"))),
    ]  # fmt: skip


def results_markdown(lines: list[Line], notes: list[str], command: str, elapsed: float) -> str:
    """The whole RESULTS.md."""
    facts = "\n".join(f"| {k} | {v} |" for k, v in machine())
    how = "\n".join(f"- {n}" for n in notes)
    return (
        "# Benchmark results\n\n"
        f"Written by `{command}` in {elapsed:.0f} s. Each figure is the median of its repetitions,"
        " product and anchor alternated (A B, B A, A B ...) in the same run; ratio = product / anchor.\n\n"
        f"| machine | |\n| --- | --- |\n{facts}\n\n"
        f"{table(lines)}\n\n"
        f"## How each row is measured\n\n{how}\n\n"
        f"## Every repetition\n\n{samples_text(lines)}\n"
    )
