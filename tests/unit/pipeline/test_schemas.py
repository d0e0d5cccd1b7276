"""Messages: round trips, what is rejected, and the exported JSON Schemas."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline import codec, schemas
from pipeline.schemas import (
    BatteryReading,
    Decision,
    PriceTick,
    SolarReading,
    TelemetryBatch,
    stable_id,
)

T0 = datetime(2025, 4, 7, 12, tzinfo=UTC)


def batch(**overrides: object) -> TelemetryBatch:
    values: dict[str, object] = {
        "batch_id": "b-1",
        "site": "s1",
        "source": "test",
        "readings": [
            {"kind": "battery", "device": "bat", "ts": T0, "power_kw": -2.5, "soc_pct": 40.0},
            {"kind": "solar", "device": "pv", "ts": T0, "power_kw": 3.0, "irradiance_w_m2": 700.0},
        ],
    }
    values.update(overrides)
    return TelemetryBatch.model_validate(values)


def test_telemetry_round_trip_keeps_kinds() -> None:
    original = batch()
    decoded = codec.decode(TelemetryBatch, codec.encode(original))
    assert decoded == original
    assert isinstance(decoded.readings[0], BatteryReading)
    assert isinstance(decoded.readings[1], SolarReading)


def test_timestamps_are_normalised_to_utc() -> None:
    cest = timezone(timedelta(hours=2))
    reading = BatteryReading(
        device="b", ts=datetime(2025, 4, 7, 14, tzinfo=cest), power_kw=0, soc_pct=1
    )
    assert reading.ts == T0 and reading.ts.tzinfo == UTC


def test_naive_timestamps_are_rejected() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        BatteryReading(device="b", ts=datetime(2025, 4, 7), power_kw=0, soc_pct=1)  # noqa: DTZ001


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_rejected(value: float) -> None:
    with pytest.raises(ValidationError):
        BatteryReading(device="b", ts=T0, power_kw=value, soc_pct=50)


@pytest.mark.parametrize(
    ("field", "value"),
    [("soc_pct", 101.0), ("soc_pct", -1.0), ("device", ""), ("device", "has space")],
)
def test_out_of_range_reading_fields_are_rejected(field: str, value: object) -> None:
    data = {"device": "b", "ts": T0, "power_kw": 0.0, "soc_pct": 50.0, field: value}
    with pytest.raises(ValidationError, match=field):
        BatteryReading.model_validate(data)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValidationError, match="kind"):
        batch(readings=[{"kind": "toaster", "device": "t", "ts": T0, "power_kw": 1.0}])


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="colour"):
        batch(colour="blue")


def test_negative_prices_are_valid() -> None:
    tick = PriceTick(market="DE-LU", start=T0, end=T0 + timedelta(hours=1), price_per_kwh=-0.5)
    assert codec.decode(PriceTick, codec.encode(tick)).price_per_kwh == -0.5


def test_price_interval_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="must be after start"):
        PriceTick(market="M", start=T0, end=T0, price_per_kwh=0.1)


def test_stable_ids_depend_only_on_their_parts() -> None:
    assert stable_id("dec", "s", "b", T0) == stable_id("dec", "s", "b", T0)
    assert stable_id("dec", "s", "b", T0) != stable_id("dec", "s", "b2", T0)
    # Parts are separated, so ("ab", "c") and ("a", "bc") differ.
    assert stable_id("x", "ab", "c") != stable_id("x", "a", "bc")


def test_every_message_exports_a_json_schema() -> None:
    exported = schemas.json_schemas()
    assert set(exported) == {m.__name__ for m in schemas.ALL_MESSAGES}
    reading_kinds = json.dumps(exported["TelemetryBatch"])
    for kind in schemas.Kind:
        assert f'"{kind.value}"' in reading_kinds


def test_dead_letter_keeps_any_bytes() -> None:
    raw = b"\xff\xfe not utf-8 \x00"
    letter = schemas.dead_letter(
        raw=raw, reason="bad", error_type="X", component="test", source_topic="t"
    )
    again = codec.decode(schemas.DeadLetter, codec.encode(letter))
    assert again.raw.encode("utf-8", "backslashreplace") != b""
    assert "\\xff\\xfe" in again.raw


@given(
    power_kw=st.floats(-1e6, 1e6),
    soc_pct=st.floats(0, 100),
    seconds=st.integers(0, 10**9),
)
def test_decision_round_trip(power_kw: float, soc_pct: float, seconds: int) -> None:
    at = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    decision = Decision(
        decision_id="dec-1",
        site="s",
        device="b",
        strategy="threshold",
        action="HOLD",
        power_kw=power_kw,
        grid_energy_kwh=power_kw,
        price_per_kwh=0.1,
        expected_revenue=power_kw * 0.1,
        soc_pct=soc_pct,
        expected_soc_pct=soc_pct,
        decided_at=at,
        valid_from=at,
        valid_until=at + timedelta(hours=1),
        reason="r",
    )
    assert codec.decode(Decision, codec.encode(decision)) == decision


def test_a_zone_at_offset_zero_is_converted_to_utc() -> None:
    # London in winter has offset 0, but its arithmetic is wall-clock (DST): not kept.
    london = datetime(2025, 1, 7, 14, tzinfo=ZoneInfo("Europe/London"))
    reading = BatteryReading(device="b", ts=london, power_kw=0, soc_pct=1)
    assert reading.ts.tzinfo == UTC
    assert (reading.ts + timedelta(days=180)).utcoffset() == timedelta(0)
    parsed = BatteryReading.model_validate(
        {"device": "b", "ts": "2025-01-07T14:00:00Z", "power_kw": 0, "soc_pct": 1}
    )
    assert parsed.ts == london and parsed.ts.utcoffset() == timedelta(0)
