"""Write the shipped VE.Direct recordings (``python -m bridge.agent.recordings.generate``).

They are synthesised, not captured: the labels, their order and the block split follow
Victron's protocol document and the devices' manuals, the values start from a real
BMV-702 sample (V 12065, I -7625, P -92, SOC 839, TTG 942) and drift plausibly. Each
file is the raw byte stream a device sends, one block after another (a BMV sends its
history H1..H18 in a second block). Seeded, so regenerating gives the same bytes.
"""

from __future__ import annotations

import random
from pathlib import Path

from bridge.agent.vedirect_parser import encode_block

HERE = Path(__file__).resolve().parent
SECONDS = 60


def bmv702(rng: random.Random, seconds: int = SECONDS) -> list[bytes]:
    """A BMV-702 on a discharging 12 V house bank, starter battery on the aux input."""
    blocks = []
    current, consumed, soc = -7625, -45400, 839
    for second in range(seconds):
        current = max(-20000, min(-500, current + rng.randint(-300, 300)))
        voltage = 12065 + (current + 7625) // 40 + rng.randint(-3, 3)
        consumed += current // 3600 or -1
        soc = max(0, soc - (1 if second % 20 == 19 else 0))
        ttg = round(-((soc / 1000) * 200_000) / current * 60) if current < 0 else -1
        blocks.append(encode_block([
            ("PID", "0x204"), ("V", str(voltage)), ("VS", str(12640 + rng.randint(-2, 2))),
            ("I", str(current)), ("P", str(round(voltage * current / 1e6))),
            ("CE", str(consumed)), ("SOC", str(soc)), ("TTG", str(ttg)),
            ("Alarm", "OFF"), ("Relay", "OFF"), ("AR", "0"), ("BMV", "702"), ("FW", "0308"),
        ]))  # fmt: skip
        blocks.append(encode_block([
            ("H1", "-102345"), ("H2", str(consumed)), ("H3", "-30120"), ("H4", "87"),
            ("H5", "0"), ("H6", "-8760345"), ("H7", "10894"), ("H8", "14712"),
            ("H9", str(86400 + second)), ("H10", "42"), ("H11", "0"), ("H12", "0"),
            ("H13", "0"), ("H14", "0"), ("H15", "11802"), ("H16", "14550"),
            ("H17", "10450"), ("H18", "12690"),
        ]))  # fmt: skip
    return blocks


def smartshunt(rng: random.Random, seconds: int = SECONDS) -> list[bytes]:
    """A SmartShunt 500A on a 24 V bank being charged, mid-point wired, not yet synchronised
    at first (SOC ---, TTG -1)."""
    blocks = []
    current = 15230
    for second in range(seconds):
        current = max(1000, current + rng.randint(-400, 400))
        voltage = 26910 + rng.randint(-5, 5) + second
        midpoint = voltage // 2 + rng.randint(-8, 8)
        deviation = round((midpoint - voltage / 2) / (voltage / 2) * 1000)
        synced = second >= 5
        blocks.append(encode_block([
            ("PID", "0xA389"), ("V", str(voltage)), ("VM", str(midpoint)),
            ("DM", str(deviation)), ("I", str(current)), ("P", str(round(voltage * current / 1e6))),
            ("CE", str(-12500 + second * 4)), ("SOC", str(873 + second // 30) if synced else "---"),
            ("TTG", "-1"), ("Alarm", "OFF"), ("AR", "0"), ("MON", "0"),
            ("BMV", "SmartShunt 500A/50mV"), ("FW", "0410"),
        ]))  # fmt: skip
        blocks.append(encode_block([
            ("H1", "-210040"), ("H2", "-12500"), ("H3", "-64210"), ("H4", "312"),
            ("H5", "2"), ("H6", "-20431120"), ("H7", "21044"), ("H8", "29310"),
            ("H9", str(3600 + second)), ("H10", "118"), ("H11", "3"), ("H12", "0"),
            ("H15", "0"), ("H16", "0"), ("H17", "48210"), ("H18", "55102"),
        ]))  # fmt: skip
    return blocks


def mppt(rng: random.Random, seconds: int = SECONDS) -> list[bytes]:
    """A SmartSolar MPPT 75/15 in bulk on a 12 V battery, load output on."""
    blocks = []
    panel_w = 58
    for second in range(seconds):
        panel_w = max(0, min(220, panel_w + rng.randint(-4, 5)))
        battery_mv = 13420 + second * 2
        current = round(panel_w * 0.96 / battery_mv * 1e6)
        blocks.append(encode_block([
            ("PID", "0xA053"), ("FW", "159"), ("SER#", "HQ2132QY2KR"), ("V", str(battery_mv)),
            ("I", str(current)), ("VPV", str(18650 + rng.randint(-60, 60))), ("PPV", str(panel_w)),
            ("CS", "3"), ("MPPT", "2"), ("OR", "0x00000000"), ("ERR", "0"), ("LOAD", "ON"),
            ("IL", "300"), ("H19", "1234"), ("H20", str(12 + second // 30)), ("H21", "85"),
            ("H22", "34"), ("H23", "110"), ("HSDS", "212"),
        ]))  # fmt: skip
    return blocks


def hex_and_corruption(rng: random.Random) -> list[bytes]:
    """A BMV-702 stream with what a real line brings: HEX frames between and inside
    blocks, a block cut in half, a flipped byte, a label we do not know, an alarm."""
    blocks = bmv702(rng, 12)
    ping = b":154\n"  # a HEX-protocol ping answer
    async_frame = b":A0102000543\n"
    # 0: starts mid-block, as when the agent opens the port mid-stream.
    blocks[0] = blocks[0][len(blocks[0]) // 2 :]
    # 2: a HEX frame between two lines of a block.
    cut = blocks[2].index(b"\r\nI\t")
    blocks[2] = blocks[2][:cut] + async_frame + blocks[2][cut:]
    # 3: a HEX frame between blocks.
    blocks[3] = ping + blocks[3]
    # 4: one byte flipped in the voltage: bad checksum, dropped.
    at = blocks[4].index(b"\r\nV\t") + 4
    blocks[4] = blocks[4][:at] + b"9" + blocks[4][at + 1 :]
    # 6: cut in half (the device reset): the rest of it never comes.
    blocks[6] = blocks[6][: len(blocks[6]) // 2]
    # 8: an alarm: low voltage + low SOC, TTG infinite, and a label we do not know.
    blocks[8] = encode_block([
        ("PID", "0x204"), ("V", "11020"), ("VS", "12600"), ("I", "0"), ("P", "0"),
        ("CE", "-90200"), ("SOC", "481"), ("TTG", "-1"), ("Alarm", "ON"), ("Relay", "ON"),
        ("AR", "5"), ("XYZ", "17"), ("BMV", "702"), ("FW", "0308"),
    ])  # fmt: skip
    return blocks


def main() -> None:
    rng = random.Random(702)
    files = {
        "bmv702.vedirect": bmv702(rng),
        "smartshunt.vedirect": smartshunt(rng),
        "mppt-75-15.vedirect": mppt(rng),
        "bmv702-hex-and-corruption.vedirect": hex_and_corruption(rng),
    }
    for name, blocks in files.items():
        (HERE / name).write_bytes(b"".join(blocks))
        print(f"{name}: {len(blocks)} blocks")


if __name__ == "__main__":
    main()
