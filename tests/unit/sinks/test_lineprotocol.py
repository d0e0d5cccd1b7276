"""Messages to line protocol: exact lines, float-ness, string escaping, omitted Nones.

In line protocol a number without a suffix is a float (``5`` is 5.0) and an
integer needs ``i`` (``5i``). A field written once as ``5i`` and once as
``5.5`` is a type conflict InfluxDB rejects, so no number may carry ``i``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pipeline.schemas import Decision, PriceTick, TelemetryBatch
from sinks.lineprotocol import decision_lines, epoch_ms, price_lines, telemetry_lines

T0 = datetime(2025, 4, 7, 12, tzinfo=UTC)
T0_MS = 1744027200000


def test_readings_become_points_of_their_kind_with_floats_kept_floats() -> None:
    batch = TelemetryBatch.model_validate(
        {
            "batch_id": "b",
            # Ids are limited to [A-Za-z0-9_.:-] by the schema, so tags never need escaping.
            "site": "turin-home",
            "source": "t",
            "readings": [
                {"kind": "battery", "device": "bat-1", "ts": T0, "power_kw": 5, "soc_pct": 40},
                {"kind": "generator", "device": "g", "ts": T0, "power_kw": 0.5, "running": True},
            ],
        }
    )
    battery, generator = telemetry_lines(batch)
    assert battery == (
        b"battery,device=bat-1,site=turin-home power_kw=5,soc_pct=40 " + str(T0_MS).encode()
    )
    # None fields (voltage_v, temperature_c, fuel_pct) are left out; bools stay bools.
    assert (
        generator
        == b"generator,device=g,site=turin-home power_kw=0.5,running=true " + str(T0_MS).encode()
    )


def test_decision_point_carries_tags_fields_and_interval_start() -> None:
    decision = Decision(
        decision_id="dec-1",
        site="s",
        device="b",
        strategy="threshold",
        action="CHARGE",
        power_kw=-5,
        grid_energy_kwh=-5,
        price_per_kwh=0.04,
        expected_revenue=-0.2,
        soc_pct=40,
        expected_soc_pct=85,
        decided_at=T0,
        valid_from=T0,
        valid_until=T0 + timedelta(hours=1),
        reason='cheap "now"',
    )
    (line,) = decision_lines(decision)
    assert line.startswith(b"decision,action=CHARGE,device=b,site=s,strategy=threshold ")
    assert b"power_kw=-5," in line and b"soc_pct=40 " in line  # floats: no "i" suffix
    assert b'decision_id="dec-1"' in line and b'reason="cheap \\"now\\""' in line
    assert line.endswith(str(T0_MS).encode())


def test_price_point() -> None:
    tick = PriceTick(market="IT-NORD", start=T0, end=T0 + timedelta(hours=1), price_per_kwh=-0.01)
    assert price_lines(tick) == [
        b"price,currency=EUR,market=IT-NORD,price_kind=day_ahead price_per_kwh=-0.01 "
        + str(T0_MS).encode()
    ]


def test_timestamps_are_exact_to_the_millisecond() -> None:
    # influxdb-client's float conversion writes this instant as ...689.
    ts = datetime(2025, 7, 21, 4, 57, 39, 690000, tzinfo=UTC)
    tick = PriceTick(market="M", start=ts, end=ts + timedelta(hours=1), price_per_kwh=0.1)
    assert price_lines(tick)[0].endswith(b" 1753073859690")


def test_every_millisecond_of_a_day_round_trips() -> None:
    start = datetime(2025, 3, 30, tzinfo=UTC)
    for ms in range(0, 86_400_000, 86_400_000 // 20_000):
        ts = start + timedelta(milliseconds=ms)
        assert epoch_ms(ts) == int(start.timestamp()) * 1000 + ms
