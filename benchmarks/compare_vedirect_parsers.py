"""Feed the shipped VE.Direct recordings to the PyPI parsers and to ours, through a real
pseudo-terminal, and print what each one makes of them (docs/VEDIRECT.md has the verdict).

The PyPI packages are not dependencies of the project; install them beside it first:

    pip install vedirect-m8==1.3.4 vedirect==1.1.0
    python benchmarks/compare_vedirect_parsers.py
"""

from __future__ import annotations

import os
import threading
import time
import tty
from pathlib import Path
from typing import Any

from bridge.agent.byte_sources import split_blocks
from bridge.agent.vedirect_parser import VeDirectParser

RECORDINGS = Path(__file__).resolve().parent.parent / "bridge" / "agent" / "recordings"
FILES = ("bmv702-hex-and-corruption.vedirect", "mppt-75-15.vedirect")


def pty_pair() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)
    return master, os.ttyname(slave)


def writer(master: int, data: bytes, delay: float) -> None:
    for chunk in split_blocks(data):
        os.write(master, chunk)
        time.sleep(delay)


def with_vedirect_m8(data: bytes) -> tuple[list[Any], str]:
    """Its byte state machine (Vedirect.input_read), fed the recording byte by byte.

    Its constructor cannot open a port with ve-utils 2.5.3, the only release its pin
    allows (UType.is_serial_port_name_pattern is gone), so the parser is driven directly,
    set up the way its __init__ would, and reset after each packet as read_global_packet does.
    """
    from vedirect_m8.vedirect import Vedirect

    opened = "opened"
    _master, slave = pty_pair()
    try:
        Vedirect(serial_conf={"serial_port": slave}, auto_start=False)
    except Exception as exc:
        opened = f"constructor raised {type(exc).__name__}: {str(exc)[:120]}"
    ve = Vedirect.__new__(Vedirect)
    ve._delimiters = {"header1": ord("\r"), "header2": ord("\n"), "hexmarker": ord(":"),
                      "delimiter": ord("\t")}  # fmt: skip
    ve.max_blocks = 18
    ve.init_data_read()
    got: list[Any] = []
    for byte in data:
        try:
            packet = ve.input_read(bytes([byte]))
        except Exception as exc:
            got.append(f"raised {type(exc).__name__}")
            ve.init_data_read()
            continue
        if packet is not None:
            got.append(dict(packet))
            ve.init_data_read()
    return got, opened


def with_vedirect(data: bytes, blocks: int) -> list[Any]:
    from vedirect import VEDirect

    master, slave = pty_pair()
    threading.Thread(target=writer, args=(master, data * 2, 0.01), daemon=True).start()
    got: list[Any] = []
    try:
        ve = VEDirect(device=slave)
        for _ in range(blocks):
            got.append(dict(ve._data))
            ve.refresh()
    except Exception as exc:
        got.append(f"raised {type(exc).__name__}: {exc}")
    return got


def with_ours(data: bytes) -> tuple[list[Any], Any]:
    parser = VeDirectParser()
    return parser.feed(data), parser.stats


def main() -> None:
    for name in FILES:
        data = (RECORDINGS / name).read_bytes()
        ours, stats = with_ours(data)
        print(f"== {name}: {len(split_blocks(data))} chunks")
        print(f"ours: {len(ours)} blocks, {stats}")
        print(f"  V of each: {[b.get('V') for b in ours]}")
        m8, opened = with_vedirect_m8(data)
        print(f"vedirect-m8: {opened}; {len(m8)} packets")
        print(f"  V of each: {[p.get('V') if isinstance(p, dict) else p for p in m8]}")
        print(f"  labels of each: {[len(p) if isinstance(p, dict) else p for p in m8]}")
        plain = with_vedirect(data, 4)
        print(f"vedirect: {plain[-1] if plain else plain}")


if __name__ == "__main__":
    main()
