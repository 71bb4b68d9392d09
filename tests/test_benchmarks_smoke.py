"""`python -m benchmarks` keeps working: one cheap row end to end on real processes
(a `batmon serve` and the minimal Starlette anchor on free ports), at --quick sizes.

No figure is asserted to be fast or slow (speed is the benchmark's business); only that
every figure was measured and the table and RESULTS file carry what they promise.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

RATE = re.compile(r"[\d,]+/s")


def run_benchmarks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=90)  # fmt: skip


def cells_of(text: str, prefix: str) -> list[str]:
    line = next((line for line in text.splitlines() if line.startswith(prefix)), None)
    assert line is not None, f"no table line starting {prefix!r} in:\n{text}"
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_quick_status_row_measures_product_and_anchor_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    result = run_benchmarks("--quick", "--only", "http-status", "--reps", "2", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    for clients in (1, 8):
        _, _, product, anchor, anchor_figure, ratio, goal = cells_of(
            text, f"| http-status | HTTP status GET, {clients} keep-alive"
        )
        assert RATE.fullmatch(product) and RATE.fullmatch(anchor_figure), (product, anchor_figure)
        assert "Starlette" in anchor
        expected = int(product[:-2].replace(",", "")) / int(anchor_figure[:-2].replace(",", ""))
        assert abs(float(ratio) - expected) < 0.02 + 0.01 * expected
        assert goal == "≥ 0.9"
    assert "mqtt-embedded" not in text  # --only ran one row
    for fact in ("date", "nproc", "CPU", "memory", "python", "amqtt", "mosquitto", "sqlite"):
        assert re.search(rf"^\| {fact} \| \S", text, re.M), f"{fact} missing from RESULTS"
    # Every repetition is listed: two per figure, as --reps 2 asked.
    for clients in (1, 8):
        entry = rf"^- HTTP status GET, {clients} keep-alive client\(s\) / batmon serve: (.+)$"
        listed = re.search(entry, text, re.M)
        assert listed and len(RATE.findall(listed.group(1))) == 2, text
    # The table was printed as well as written.
    assert cells_of(result.stdout, "| http-status | HTTP status GET, 1 keep-alive")[2] == cells_of(
        text, "| http-status | HTTP status GET, 1 keep-alive"
    )[2]


def test_unknown_row_is_a_one_line_usage_error() -> None:
    result = run_benchmarks("--only", "no-such-row")
    assert result.returncode == 2
    assert "unknown row(s) no-such-row" in result.stderr
    assert "Traceback" not in result.stderr


def test_quick_delete_row_measures_the_polls_during_the_delete_and_before_it(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    result = run_benchmarks("--quick", "--only", "delete", "--reps", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    for what in ("/healthz p99 while a batmon", "another batmon's status p99 while a batmon"):
        _, _, product, anchor, anchor_figure, _, goal = cells_of(text, f"| delete | {what}")
        assert re.fullmatch(r"[\d.,]+ ms", product) and re.fullmatch(r"[\d.,]+ ms", anchor_figure)
        assert anchor == "p99 before the delete, same run" and goal == "≤ 50 ms"
    _, _, answered, _, gone, _, goal = cells_of(text, "| delete | the delete request answered")
    assert re.fullmatch(r"[\d.,]+ ms", answered) and re.fullmatch(r"[\d.,]+ s", gone) and goal == "≤ 1 s"
