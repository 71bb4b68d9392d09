"""VE.Direct text protocol: framing, checksum, resync and label mapping, on the shipped
recordings (Victron, "VE.Direct Protocol" 3.33: the byte sum of a block is 0 mod 256)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.agent.byte_sources import split_blocks
from bridge.agent.vedirect_agent import IntervalReading
from bridge.agent.vedirect_labels import reading_fields
from bridge.agent.vedirect_parser import VeDirectParser, encode_block
from bridge.models import Reading, check_well_known_details

RECORDINGS = Path(__file__).resolve().parent.parent / "bridge" / "agent" / "recordings"
BMV_SAMPLE = [("PID", "0x204"), ("V", "12065"), ("I", "-7625"), ("P", "-92"), ("SOC", "839"),
              ("TTG", "942")]  # fmt: skip


def recording(name: str) -> bytes:
    return (RECORDINGS / name).read_bytes()


def parse(data: bytes, step: int = 0) -> tuple[list[dict[str, str]], VeDirectParser]:
    """All blocks in ``data``, fed whole or ``step`` bytes at a time (as a serial port does)."""
    parser = VeDirectParser()
    if not step:
        return parser.feed(data), parser
    blocks = []
    for at in range(0, len(data), step):
        blocks += parser.feed(data[at : at + step])
    return blocks, parser


def test_a_block_whose_bytes_sum_to_zero_is_returned_with_its_labels() -> None:
    block = encode_block(BMV_SAMPLE)
    assert sum(block) % 256 == 0
    [parsed], parser = parse(block)
    assert parsed == dict(BMV_SAMPLE)
    assert parser.stats.blocks == 1 and parser.stats.bad_checksum == 0


def test_the_real_bmv702_sample_maps_to_volts_amps_watts_percent() -> None:
    [parsed], _ = parse(encode_block(BMV_SAMPLE))
    fields = reading_fields(parsed)
    assert fields["voltage"] == 12.065 and fields["current"] == -7.625
    assert fields["power"] == -92.0 and fields["soc"] == 83.9
    assert fields["details"]["time_to_go"] == 942
    assert fields["details"]["product"] == "BMV-702"


@pytest.mark.parametrize("step", [0, 1, 7, 64])
def test_every_block_of_the_clean_recordings_verifies_however_the_bytes_are_split(step: int) -> None:
    for name, count in (("bmv702.vedirect", 120), ("smartshunt.vedirect", 120),
                        ("mppt-75-15.vedirect", 60)):  # fmt: skip
        blocks, parser = parse(recording(name), step)
        assert len(blocks) == count, name
        stats = parser.stats
        assert (stats.bad_checksum, stats.malformed, stats.unsynced) == (0, 0, 0), name


def test_a_checksum_byte_that_looks_like_a_separator_is_still_the_checksum() -> None:
    # Find blocks whose checksum byte is ':' (HEX start), '\n', '\r' and TAB.
    wanted = {ord(":"), ord("\n"), ord("\r"), ord("\t")}
    found = {}
    for n in range(2000):
        block = encode_block([("V", "12000"), ("SER#", "A" * (n // 26) + chr(65 + n % 26))])
        if block[-1] in wanted and block[-1] not in found:
            found[block[-1]] = block
    assert set(found) == wanted
    stream = b"".join(found.values()) + encode_block(BMV_SAMPLE)
    blocks, parser = parse(stream, step=1)
    assert len(blocks) == 5 and blocks[-1] == dict(BMV_SAMPLE)
    assert parser.stats.bad_checksum == 0


def test_hex_frames_between_and_inside_blocks_are_skipped_without_breaking_them() -> None:
    first, second = encode_block(BMV_SAMPLE), encode_block([("H1", "-102345"), ("H2", "-45400")])
    cut = first.index(b"\r\nI\t")
    stream = b":154\n" + first[:cut] + b":A0102000543\n" + first[cut:] + b":154\n" + second
    blocks, parser = parse(stream, step=3)
    assert blocks == [dict(BMV_SAMPLE), {"H1": "-102345", "H2": "-45400"}]
    assert parser.stats.hex_frames == 3 and parser.stats.bad_checksum == 0


def test_a_bad_checksum_is_dropped_and_counted_and_the_next_block_parses() -> None:
    good = encode_block(BMV_SAMPLE)
    at = good.index(b"\r\nV\t") + 4
    flipped = good[:at] + b"9" + good[at + 1 :]
    blocks, parser = parse(good + flipped + good)
    assert blocks == [dict(BMV_SAMPLE), dict(BMV_SAMPLE)]
    assert parser.stats.bad_checksum == 1 and parser.stats.blocks == 2


def test_a_block_cut_in_half_is_dropped_and_the_block_after_it_survives() -> None:
    good = encode_block(BMV_SAMPLE)
    nxt = encode_block([("PID", "0x204"), ("V", "12070")])
    blocks, parser = parse(good + good[: len(good) // 2] + nxt + good, step=5)
    assert blocks == [dict(BMV_SAMPLE), {"PID": "0x204", "V": "12070"}, dict(BMV_SAMPLE)]
    assert parser.stats.bad_checksum == 1 and parser.stats.recovered == 1


def test_starting_mid_block_syncs_on_the_next_block_without_counting_an_error() -> None:
    good = encode_block(BMV_SAMPLE)
    blocks, parser = parse(good[len(good) // 3 :] + good)
    assert blocks == [dict(BMV_SAMPLE)]
    assert parser.stats.unsynced == 1 and parser.stats.bad_checksum == 0


def test_garbage_without_any_checksum_line_stays_bounded_and_parsing_recovers() -> None:
    noise = bytes(range(256)).replace(b":", b"").replace(b"\t", b"") * 40
    blocks, parser = parse(encode_block(BMV_SAMPLE) + noise + encode_block(BMV_SAMPLE), step=50)
    assert blocks == [dict(BMV_SAMPLE), dict(BMV_SAMPLE)]
    assert len(parser._raw) == 0
    assert parser.stats.malformed + parser.stats.bad_checksum >= 1


def test_the_hex_and_corruption_recording_gives_every_sound_block_and_counts_the_rest() -> None:
    data = recording("bmv702-hex-and-corruption.vedirect")
    blocks, parser = parse(data, step=1)
    s = parser.stats
    # 24 blocks written: 1 started mid-way (unsynced), 1 byte-flipped, 1 cut in half.
    assert (s.blocks, s.unsynced, s.bad_checksum, s.recovered, s.hex_frames) == (21, 1, 2, 1, 2)
    voltages = [b["V"] for b in blocks if "V" in b]
    assert "11020" in voltages  # the alarm block
    assert all(v.isdigit() and 11000 <= int(v) <= 12200 for v in voltages)
    # Replay chunks reassemble the same stream.
    assert b"".join(split_blocks(data)) == data


def test_unknown_labels_are_kept_in_details_as_sent() -> None:
    [block], _ = parse(encode_block([*BMV_SAMPLE, ("XYZ", "17"), ("NEWFIELD", "a b")]))
    details = reading_fields(block)["details"]
    assert details["XYZ"] == "17" and details["NEWFIELD"] == "a b"


def test_ttg_minus_one_is_infinite_time_to_go() -> None:
    fields = reading_fields({"V": "12800", "TTG": "-1"})
    assert fields["details"]["time_to_go"] is None


@pytest.mark.parametrize("mask,reasons", [
    ("0", []),
    ("1", ["low_voltage"]),
    ("5", ["low_voltage", "low_soc"]),
    ("24", ["low_starter_voltage", "high_starter_voltage"]),
    ("96", ["low_temperature", "high_temperature"]),
    ("128", ["midpoint_voltage"]),
    ("2", ["high_voltage"]),
    ("65536", ["bit_65536"]),
])  # fmt: skip
def test_ar_bits_decode_to_named_alarm_reasons(mask: str, reasons: list[str]) -> None:
    assert reading_fields({"AR": mask})["details"]["alarm_reasons"] == reasons


def test_alarm_block_of_the_recording_decodes_reasons_relay_and_infinite_ttg() -> None:
    blocks, _ = parse(recording("bmv702-hex-and-corruption.vedirect"))
    [alarm] = [b for b in blocks if b.get("V") == "11020"]
    details = reading_fields(alarm)["details"]
    assert details["alarm"] is True and details["relay_on"] is True
    assert details["alarm_reasons"] == ["low_voltage", "low_soc"]
    assert details["time_to_go"] is None and details["XYZ"] == "17"


def test_smartshunt_before_sync_keeps_soc_out_of_the_reading() -> None:
    blocks, _ = parse(recording("smartshunt.vedirect"))
    fields = reading_fields(blocks[0])
    assert "soc" not in fields and fields["details"]["SOC"] == "---"
    assert fields["details"]["midpoint_v"] > 13 and "midpoint_deviation_pct" in fields["details"]


def test_mppt_labels_land_in_details_with_units() -> None:
    [block, *_], _ = parse(recording("mppt-75-15.vedirect"))
    fields = reading_fields(block)
    d = fields["details"]
    assert fields["voltage"] == 13.42 and fields["current"] > 0
    assert d["panel_v"] > 18 and d["panel_w"] == int(block["PPV"])
    assert d["charge_state"] == "bulk" and d["mppt_mode"] == "active"
    assert d["charger_error"] == "no_error" and d["off_reasons"] == []
    assert d["yield_total_kwh"] == 12.34 and d["max_power_yesterday_w"] == 110
    assert d["load_on"] is True and d["load_a"] == 0.3


def test_an_interval_merges_the_bmv_two_blocks_into_one_valid_reading() -> None:
    blocks, _ = parse(recording("bmv702.vedirect"))
    interval = IntervalReading()
    for n, block in enumerate(blocks[:4]):
        interval.add(block, 1_700_000_000 + n / 2)
    reading = interval.take()
    assert reading is not None
    assert reading["ts"] == 1_700_000_001.5
    assert reading["voltage"] == int(blocks[2]["V"]) / 1000  # the latest main block
    assert reading["details"]["charge_cycles"] == 87  # from the history block
    Reading.model_validate(reading)  # the server will take it
    assert interval.take() is None  # nothing new, nothing sent


def test_average_mode_averages_values_over_the_interval() -> None:
    interval = IntervalReading(average=True)
    for n, volts in enumerate(("12000", "12100", "12200")):
        interval.add({"V": volts, "I": "-1000", "SOC": "---"}, 100.0 + n)
    reading = interval.take()
    assert reading is not None and reading["voltage"] == 12.1 and reading["current"] == -1.0
    assert reading["ts"] == 102.0


def test_t_ttg_ce_h17_h18_map_to_the_well_known_details_keys() -> None:
    details = reading_fields({"V": "12800", "T": "23", "TTG": "95", "CE": "-12500", "H17": "1234",
                              "H18": "1567"})["details"]  # fmt: skip
    assert details == {"temperature": 23, "time_to_go": 95, "consumed_ah": -12.5,
                       "energy_discharged_kwh": 12.34, "energy_charged_kwh": 15.67}  # 0.01 kWh units
    check_well_known_details(details)  # what the server accepts
