"""Where VE.Direct bytes come from: a serial port (pyserial, 19200 8N1), or a recording
played back at the device's pace for demos and tests.

Both answer ``read(timeout)`` with whatever bytes are there (possibly none), so the
agent's single loop can read, publish and retry without threads of its own.
"""

from __future__ import annotations

import contextlib
import errno
import time
from pathlib import Path

import serial

from bridge.agent.vedirect_parser import CHECKSUM_LABEL, LINE_START

BAUD_RATE = 19200


class SourceUnusable(Exception):
    """The port or file cannot be used at all (wrong name, no permission, not a tty)."""


class SourceLost(Exception):
    """The port went away while in use (cable unplugged): worth retrying."""


class SerialSource:
    """A VE.Direct serial port, opened 19200 8N1."""

    def __init__(self, port: str) -> None:
        self.port = port
        self.serial: serial.Serial | None = None

    def open(self) -> None:
        """Open the port; SourceUnusable says why in one line."""
        try:
            self.serial = serial.Serial(self.port, BAUD_RATE, bytesize=8, parity="N", stopbits=1,
                                        timeout=0.1, exclusive=True)  # fmt: skip
        except serial.SerialException as exc:
            raise SourceUnusable(describe_open_error(self.port, exc)) from None

    def read(self, timeout: float) -> bytes:
        """The bytes that arrive within about ``timeout`` seconds (b"" if none)."""
        assert self.serial is not None
        if self.serial.timeout != timeout:  # each change is a tcsetattr: only when needed
            self.serial.timeout = timeout
        try:
            first = self.serial.read(1)
            if not first:
                return b""
            return first + self.serial.read(self.serial.in_waiting)
        except (serial.SerialException, OSError) as exc:
            self.close()
            raise SourceLost(str(exc) or type(exc).__name__) from None

    def close(self) -> None:
        if self.serial is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                self.serial.close()
            self.serial = None


def describe_open_error(port: str, exc: serial.SerialException) -> str:
    """pyserial's open error as one line a user can act on."""
    code = exc.errno
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return f"--port {port}: no such serial device (is the VE.Direct cable plugged in?)"
    if code in (errno.EACCES, errno.EPERM):
        return (f"--port {port}: permission denied (add this user to the 'dialout' group,"
                " then log in again)")  # fmt: skip
    if code == errno.EBUSY:
        return f"--port {port}: busy (another program has it open)"
    if code == errno.ENOTTY or "ioctl" in str(exc).lower():
        return f"--port {port}: not a serial port"
    if code == errno.EISDIR:
        return f"--port {port}: is a folder, not a serial port"
    return f"--port {port}: cannot open: {exc.strerror or exc}"


class ReplaySource:
    """A recorded byte stream, released one block at a time at ``rate`` blocks/s.

    Recordings are raw captures (``cat /dev/ttyUSB0 > file``): a block ends after the
    byte that follows ``Checksum<TAB>``; bytes between blocks (HEX frames, noise)
    travel with the block after them.
    """

    def __init__(self, path: Path, rate: float, loop: bool) -> None:
        self.path, self.rate, self.loop = path, rate, loop
        self.chunks: list[bytes] = []
        self.next_chunk = 0
        self.due = 0.0
        self.finished = False

    def open(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise SourceUnusable(f"--replay {self.path}: {exc.strerror}") from None
        self.chunks = split_blocks(data)
        if not self.chunks:
            raise SourceUnusable(f"--replay {self.path}: the file is empty")
        self.due = time.monotonic()

    def read(self, timeout: float) -> bytes:
        """The next block once it is due; b"" while waiting or after the end."""
        if self.next_chunk >= len(self.chunks):
            if not self.loop:
                self.finished = True
                time.sleep(timeout)
                return b""
            self.next_chunk = 0
        wait = self.due - time.monotonic()
        if wait > timeout:
            time.sleep(timeout)
            return b""
        if wait > 0:
            time.sleep(wait)
        chunk = self.chunks[self.next_chunk]
        self.next_chunk += 1
        # Keep the pace over a long replay: the next block is due one period after this
        # one was, not after we got round to it.
        self.due = max(self.due + 1 / self.rate, time.monotonic() - 1)
        return chunk

    def close(self) -> None:
        pass


def split_blocks(data: bytes) -> list[bytes]:
    """Cut a capture after each checksum byte; a tail without one is the last chunk."""
    marker = LINE_START + CHECKSUM_LABEL + b"\t"
    chunks, start = [], 0
    at = data.find(marker)
    while at != -1 and at + len(marker) < len(data):
        end = at + len(marker) + 1
        chunks.append(data[start:end])
        start = end
        at = data.find(marker, end)
    if start < len(data):
        chunks.append(data[start:])
    return chunks
