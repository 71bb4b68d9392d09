"""VE.Direct text-protocol framing: bytes in, checksum-verified blocks out.

A block is ``\\r\\n<label>\\t<value>`` lines ending with ``Checksum\\t<byte>``; the byte
sum of the whole block is 0 modulo 256 (Victron, "VE.Direct Protocol" 3.33). HEX
frames (``:`` up to ``\\n``) may arrive between or inside blocks: they are skipped and
left out of the sum, so the block around them still verifies. A block whose sum is
wrong is dropped and counted; parsing resynchronises on the next block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CHECKSUM_LABEL = b"Checksum"
LINE_START = b"\r\n"
HEX_START = ord(":")
HEX_END = ord("\n")
# Victron: at most 22 fields of a 9-byte label and a 33-byte value; twice that bounds
# the memory a stream of garbage can take before it is dropped as one bad block.
MAX_BLOCK_BYTES = 2 * 22 * (2 + 9 + 1 + 33)
MAX_HEX_BYTES = 256
# Every device starts its (first) block with PID; more start labels are learned from
# good blocks (a BMV sends a second block starting with H1).
DEFAULT_START_LABELS = frozenset({"PID"})

Block = dict[str, str]


@dataclass
class ParserStats:
    """What the parser saw: kept as counters so the agent can log and expose them."""

    blocks: int = 0  # verified blocks returned
    bad_checksum: int = 0  # blocks dropped for a wrong sum (after the first good block)
    malformed: int = 0  # blocks dropped for a line without a tab or an oversized block
    recovered: int = 0  # good blocks found after a cut-off one in the same run of bytes
    hex_frames: int = 0  # HEX-protocol frames skipped
    unsynced: int = 0  # partial blocks dropped before the first good one (start-up)


@dataclass
class VeDirectParser:
    """Feed it bytes as they come; it returns each block whose checksum holds."""

    stats: ParserStats = field(default_factory=ParserStats)
    start_labels: set[str] = field(default_factory=lambda: set(DEFAULT_START_LABELS))
    _raw: bytearray = field(default_factory=bytearray)
    _in_hex: bool = False
    _hex_len: int = 0
    _awaiting_checksum_byte: bool = False

    def feed(self, data: bytes) -> list[Block]:
        """Consume ``data``; return the blocks completed by it, oldest first."""
        blocks: list[Block] = []
        raw = self._raw
        for byte in data:
            if self._awaiting_checksum_byte:
                # The checksum byte may be any value, ':' and '\n' included.
                raw.append(byte)
                self._awaiting_checksum_byte = False
                block = self._finish()
                if block is not None:
                    blocks.append(block)
                continue
            if self._in_hex:
                self._hex_len += 1
                if byte == HEX_END or self._hex_len > MAX_HEX_BYTES:
                    self._in_hex = False
                continue
            if byte == HEX_START:
                self._in_hex, self._hex_len = True, 0
                self.stats.hex_frames += 1
                continue
            raw.append(byte)
            if byte == 0x09 and raw.endswith(LINE_START + CHECKSUM_LABEL + b"\t"):
                self._awaiting_checksum_byte = True
            elif len(raw) > MAX_BLOCK_BYTES:
                self._drop(malformed=True)
        return blocks

    def _finish(self) -> Block | None:
        """A whole block is in ``_raw``: verify it, or find the good block it ends with."""
        raw = bytes(self._raw)
        self._raw.clear()
        if sum(raw) % 256 == 0:
            block = parse_lines(raw)
            if block is None:
                self._count_bad(malformed=True)
            else:
                self._accept(block, raw)
            return block
        # A block cut off (device reset, cable pulled, agent started mid-block) runs into
        # the next one: that next block is still whole at the end of ``raw``.
        for start in self._block_starts(raw):
            tail = raw[start:]
            if sum(tail) % 256 == 0 and (block := parse_lines(tail)) is not None:
                self._count_bad(malformed=False)
                self.stats.recovered += 1
                self._accept(block, tail)
                return block
        self._count_bad(malformed=False)
        return None

    def _block_starts(self, raw: bytes) -> list[int]:
        """Offsets after 0 where a line with a known block-start label begins."""
        starts = []
        for label in self.start_labels:
            needle = LINE_START + label.encode() + b"\t"
            at = raw.find(needle, 1)
            while at != -1:
                starts.append(at)
                at = raw.find(needle, at + 1)
        return sorted(starts)

    def _accept(self, block: Block, raw: bytes) -> None:
        self.stats.blocks += 1
        self.start_labels.add(first_label(raw))

    def _count_bad(self, *, malformed: bool) -> None:
        if self.stats.blocks == 0:
            self.stats.unsynced += 1
        elif malformed:
            self.stats.malformed += 1
        else:
            self.stats.bad_checksum += 1

    def _drop(self, *, malformed: bool) -> None:
        self._raw.clear()
        self._awaiting_checksum_byte = False
        self._count_bad(malformed=malformed)


def parse_lines(raw: bytes) -> Block | None:
    """Split a verified block into {label: value}; None if a line is not label<TAB>value."""
    if not raw.startswith(LINE_START):
        return None
    block: Block = {}
    lines = raw[len(LINE_START) :].split(LINE_START)
    for line in lines[:-1]:  # the last line is Checksum<TAB><byte>
        label, tab, value = line.partition(b"\t")
        if not tab or not label or not label.isascii() or b"\t" in value:
            return None
        block[label.decode("ascii")] = value.decode("ascii", errors="replace")
    if not lines[-1].startswith(CHECKSUM_LABEL + b"\t"):
        return None
    return block


def first_label(raw: bytes) -> str:
    """The label of a block's first line (raw starts with CR LF)."""
    return raw[len(LINE_START) :].split(b"\t", 1)[0].decode("ascii", errors="replace")


def checksum_byte(body: bytes) -> int:
    """The byte that makes ``body`` + it sum to 0 mod 256 (for recordings and tests)."""
    return (256 - sum(body) % 256) % 256


def encode_block(fields: list[tuple[str, str]]) -> bytes:
    """A well-formed text block with its checksum: what a device sends."""
    body = b"".join(LINE_START + f"{k}\t{v}".encode("ascii") for k, v in fields)
    body += LINE_START + CHECKSUM_LABEL + b"\t"
    return body + bytes([checksum_byte(body)])
