"""The columnar telemetry encoder against the per-record path it must agree with.

The per-record path (pydantic + influxdb-client's Point) is the authority: for
every record the columnar path takes, pydantic must accept the whole batch and
the lines must mean the same points; every other record must be handed back.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from line_protocol_parser import parse_line

from pipeline import codec
from sinks.columnar import encode_telemetry
from sinks.lineprotocol import telemetry_lines

T0 = datetime(2025, 4, 7, 12, tzinfo=UTC)

Point = tuple[str, tuple[tuple[str, str], ...], tuple[tuple[str, Any], ...], int]


def parsed(line: str | bytes) -> Point:
    point = parse_line(line if isinstance(line, str) else line.decode())
    return (
        point["measurement"],
        tuple(sorted(point["tags"].items())),
        tuple(sorted(point["fields"].items())),
        point["time"],
    )


def reference(value: bytes) -> list[Point] | None:
    """The per-record path's points, or None if it rejects any part of the record."""
    batch, rejected = codec.decode_telemetry(value)
    if batch is None or rejected:
        return None
    return [parsed(line) for line in telemetry_lines(batch)]


def check_agrees(values: list[bytes]) -> tuple[list[int], list[int]]:
    """Assert the columnar path agrees with the reference; return (taken, slow)."""
    encoded = encode_telemetry(values)
    taken = sorted(set(range(len(values))) - set(encoded.slow))
    by_record: dict[int, list[Point]] = {}
    for record, line in zip(encoded.records.to_list(), encoded.lines.to_list(), strict=True):
        by_record.setdefault(record, []).append(parsed(line))
    assert set(by_record) <= set(taken)
    for index in taken:
        expected = reference(values[index])
        assert expected is not None, f"record {index} taken but pydantic rejects it"
        assert sorted(by_record.get(index, [])) == sorted(expected)
    return taken, encoded.slow


def reading(kind: str = "battery", **values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"kind": kind, "device": "bat-1", "ts": "2025-04-07T12:00:00Z"}
    if kind == "battery":
        base.update(power_kw=-2.5, soc_pct=40.0)
    return {**base, **values}


def record(*readings: dict[str, Any], **envelope: Any) -> bytes:
    body = {"batch_id": "b-1", "site": "turin-home", "source": "test", **envelope}
    return orjson.dumps({**body, "readings": list(readings)})


def test_valid_records_of_every_kind_are_taken_with_the_same_points() -> None:
    values = [
        record(reading(), reading(power_kw=3, soc_pct=100, voltage_v=48.1)),
        record(reading("solar", power_kw=1.25, irradiance_w_m2=800, temp_air_c=-3.5)),
        record(reading("meter", power_kw=-0.5, import_energy_kwh=1e-7, frequency_hz=50.01)),
        record(reading("home", power_kw=0)),
        record(reading("generator", power_kw=0.0, running=False, fuel_pct=12.5)),
        record(reading("ev", power_kw=7.4, soc_pct=55, plugged_in=True, energy_kwh=1e22)),
        record(
            reading(
                "fusion",
                plasma_temp_kev=12.5,
                confinement_stability=0.93,
                q_factor=1.1,
                ts="2025-04-07T13:00:00.123456+01:00",
            )
        ),
    ]
    taken, slow = check_agrees(values)
    assert taken == list(range(len(values))) and slow == []


def test_records_pydantic_rejects_in_part_go_to_the_per_record_path() -> None:
    values = [
        record(reading()),  # 0 good
        record(reading(soc_pct=130)),  # 1 out of bounds
        record(reading(ts="2025-04-07T12:00:00")),  # 2 naive time
        record(reading(device="bad device")),  # 3 not an identifier
        record(reading("ev", power_kw=1)),  # 4 required plugged_in missing
        record(reading("battery", power_kw=1, soc_pct=5, plugged_in=True)),  # 5 other kind's field
        record(reading(), schema_version=2),  # 6 unknown schema version
        record(reading("unicorn", power_kw=1)),  # 7 unknown kind
        record(),  # 8 no readings
        record(reading(), site=""),  # 9 empty site
        record(reading(ts="2025-02-30T12:00:00Z")),  # 10 a date that does not exist
        orjson.dumps(
            {"batch_id": "b", "site": "s", "source": "t", "readings": [reading()]},
            option=orjson.OPT_INDENT_2,
        ),  # 11 spans lines
        b"",  # 12 empty
    ]
    taken, slow = check_agrees(values)
    assert taken == [0]
    assert slow == list(range(1, len(values)))


def test_a_record_that_is_not_json_takes_the_per_record_path_alone() -> None:
    values = [record(reading()), b"{not json", record(reading())]
    assert check_agrees(values) == ([0, 2], [1])


def test_a_value_of_the_wrong_json_type_sends_every_record_to_the_per_record_path() -> None:
    # polars fails the whole read and cannot say which record it was.
    values = [record(reading()), record(reading(power_kw="fast")), record(reading())]
    assert check_agrees(values) == ([], [0, 1, 2])


# No subnormals: both paths print them alike (2.2e-309), but the test's parser refuses them.
finite = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def battery_readings(draw: st.DrawFn) -> dict[str, Any]:
    offset_s = draw(st.integers(min_value=0, max_value=10**8))
    micro = draw(st.integers(min_value=0, max_value=999_999))
    ts = T0 + timedelta(seconds=offset_s, microseconds=micro)
    zone = draw(st.sampled_from(["Z", "+00:00", "+05:30", "-03:00"]))
    text = ts.strftime("%Y-%m-%dT%H:%M:%S.%f") + zone
    if zone != "Z":  # the same instant written in another zone
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        sign = 1 if zone[0] == "+" else -1
        shifted = ts + sign * timedelta(hours=hours, minutes=minutes)
        text = shifted.strftime("%Y-%m-%dT%H:%M:%S.%f") + zone
    return reading(
        device=draw(st.from_regex(r"[A-Za-z0-9_.:\-]{1,12}", fullmatch=True)),
        ts=text,
        power_kw=draw(finite),
        soc_pct=draw(st.floats(min_value=-5, max_value=105, allow_subnormal=False)),
        voltage_v=draw(st.none() | finite),
        temperature_c=draw(st.none() | st.integers(min_value=-40, max_value=80)),
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(battery_readings(), min_size=1, max_size=4), min_size=1, max_size=6))
def test_agrees_with_pydantic_and_influxdb_client_on_generated_batches(
    batches: list[list[dict[str, Any]]],
) -> None:
    values = [record(*readings, batch_id=f"b-{i}") for i, readings in enumerate(batches)]
    taken, _slow = check_agrees(values)
    # Every record pydantic accepts whole is taken: the fast path is not just refusing work.
    # But a device id that starts with a colon (`"device":":x"`) reads as one more key to
    # the count of `":`, which then cannot rule out a duplicate key: that record goes slow.
    accepted = [
        i
        for i, value in enumerate(values)
        if reference(value) is not None and not any(r["device"].startswith(":") for r in batches[i])
    ]
    assert taken == accepted


def test_a_number_where_text_belongs_takes_the_per_record_path() -> None:
    # polars reads 5 into a text column as "5"; pydantic refuses a number for a string.
    good = record(reading())
    for bad in (
        good.replace(b'"device":"bat-1"', b'"device":5'),
        orjson.dumps({**orjson.loads(good), "batch_id": 5}),
        orjson.dumps({**orjson.loads(good), "site": True}),
    ):
        assert bad != good
        assert check_agrees([good, bad, good]) == ([0, 2], [1])


def test_a_record_that_is_not_utf8_takes_the_per_record_path_alone() -> None:
    good = record(reading())
    assert check_agrees([good, good.replace(b"bat-1", b"bat-\xff"), good]) == ([0, 2], [1])


def test_a_key_written_twice_with_a_space_before_its_colon_takes_the_per_record_path() -> None:
    # `"site" :` is one key the count of `":` does not see: with it a duplicate key would
    # hide (orjson keeps the last "site", polars the first).
    good = record(reading())
    twice = good.replace(b'"site":"turin-home"', b'"site":"turin-home","site" :"other"')
    assert twice.count(b'"site"') == 2
    assert check_agrees([good, twice]) == ([0], [1])
