"""Messages to line protocol: exact lines, float-ness, string escaping, omitted Nones.

In line protocol a number without a suffix is a float (``5`` is 5.0) and an
integer needs ``i`` (``5i``). A field written once as ``5i`` and once as
``5.5`` is a type conflict InfluxDB rejects, so no number may carry ``i``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pipeline.schemas import (
    Alert,
    AllocationPlan,
    ChargingSessionEvent,
    Decision,
    PriceTick,
    TelemetryBatch,
)
from sinks.lineprotocol import (
    alert_lines,
    allocation_lines,
    decision_lines,
    epoch_ns,
    price_lines,
    session_lines,
    telemetry_lines,
)

T0 = datetime(2025, 4, 7, 12, tzinfo=UTC)
T0_NS = 1744027200000000000


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
        b"battery,device=bat-1,site=turin-home power_kw=5,soc_pct=40 " + str(T0_NS).encode()
    )
    # None fields (voltage_v, temperature_c, fuel_pct) are left out; bools stay bools.
    assert (
        generator
        == b"generator,device=g,site=turin-home power_kw=0.5,running=true " + str(T0_NS).encode()
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
    assert line.endswith(str(T0_NS).encode())


def test_price_point() -> None:
    tick = PriceTick(market="IT-NORD", start=T0, end=T0 + timedelta(hours=1), price_per_kwh=-0.01)
    assert price_lines(tick) == [
        b"price,currency=EUR,market=IT-NORD,price_kind=day_ahead price_per_kwh=-0.01 "
        + str(T0_NS).encode()
    ]


def test_timestamps_are_exact() -> None:
    # influxdb-client's float conversion writes this instant as ...689 ms.
    ts = datetime(2025, 7, 21, 4, 57, 39, 690000, tzinfo=UTC)
    tick = PriceTick(market="M", start=ts, end=ts + timedelta(hours=1), price_per_kwh=0.1)
    assert price_lines(tick)[0].endswith(b" 1753073859690000000")


def test_every_microsecond_step_of_a_day_round_trips() -> None:
    start = datetime(2025, 3, 30, tzinfo=UTC)
    for us in range(0, 86_400_000_000, 86_400_000_000 // 20_000 + 7):
        ts = start + timedelta(microseconds=us)
        assert epoch_ns(ts) == int(start.timestamp()) * 10**9 + us * 1000


def _alert(alert_id: str, status: str = "firing", **extra: object) -> Alert:
    return Alert.model_validate(
        {
            "alert_id": alert_id,
            "site": "s",
            "device": "reactor-1",
            "alert_type": "scram",
            "severity": "critical",
            "status": status,
            "subject": "SCRAM",
            "message": "q fell",
            "start": T0,
            "end": T0 + timedelta(minutes=5) if status == "resolved" else None,
            "observed": 0.4,
            **extra,
        }
    )


def test_events_at_the_same_instant_are_distinct_points_and_rewrites_the_same_point() -> None:
    first, second = _alert("a-1"), _alert("a-2")
    (line_1,), (line_2,) = alert_lines(first), alert_lines(second)
    time_1, time_2 = int(line_1.rsplit(b" ", 1)[1]), int(line_2.rsplit(b" ", 1)[1])
    assert time_1 != time_2
    # The offset stays below a millisecond: the point is still at the alert's time.
    assert all(0 <= t - T0_NS < 1_000_000 for t in (time_1, time_2))
    assert alert_lines(first) == [line_1]


def test_alert_point_tags_fields_and_resolution_time() -> None:
    (line,) = alert_lines(_alert("a-1", details={"q_factor": 0.4, "note": "x"}))
    assert line.startswith(
        b"alert,alert_type=scram,device=reactor-1,severity=critical,site=s,status=firing "
    )
    assert b"detail_q_factor=0.4" in line and b"note" not in line  # only numeric details
    (resolved,) = alert_lines(_alert("a-1", status="resolved"))
    resolved_ns = int(resolved.rsplit(b" ", 1)[1])
    assert 0 <= resolved_ns - epoch_ns(T0 + timedelta(minutes=5)) < 1_000_000


def test_allocation_plan_gives_a_plan_point_and_one_point_per_consumer() -> None:
    plan = AllocationPlan.model_validate(
        {
            "plan_id": "p",
            "site": "s",
            "start": T0,
            "end": T0 + timedelta(minutes=15),
            "sources": [{"source": "solar", "power_kw": 3}, {"source": "grid", "power_kw": 2}],
            "allocations": [
                {
                    "consumer": "hvac",
                    "priority": 1,
                    "requested_kw": 4,
                    "allocated_kw": 3,
                    "sources": [{"source": "solar", "power_kw": 3}],
                }
            ],
            "grid_cost": 0.5,
            "export_revenue": 0,
            "net_cost": 0.5,
            "baseline_net_cost": 0.9,
            "saving": 0.4,
        }
    )
    plan_line, hvac = allocation_lines(plan)
    assert plan_line.startswith(b"allocation_plan,currency=EUR,site=s ")
    assert b"solar_kw=3" in plan_line and b"grid_kw=2" in plan_line and b"saving=0.4" in plan_line
    assert hvac.startswith(b"allocation,consumer=hvac,priority=1,site=s ")
    assert b"unserved_kw=1" in hvac and b"solar_kw=3" in hvac


def test_a_session_event_is_a_point_with_its_energy_and_the_tokens_pseudonym() -> None:
    event = ChargingSessionEvent(
        event_id="evs-1",
        site="s",
        device="wallbox-1",
        charge_point_id="CP-001",
        connector_id=1,
        transaction_id="17",
        event_type="stopped",
        ocpp_version="2.0.1",
        id_token_hash="0123456789abcdef",
        energy_kwh=12.0,
        stop_reason="EVDisconnected",
        ts=T0,
    )
    (line,) = session_lines(event)
    assert line.startswith(
        b"ev_session,charge_point_id=CP-001,device=wallbox-1,event_type=stopped,site=s "
    )
    assert b" energy_kwh=12," in line and b'stop_reason="EVDisconnected"' in line  # a float
    assert b'id_token_hash="0123456789abcdef"' in line
    assert b"import_energy_kwh" not in line  # None is omitted
    assert 0 <= int(line.rsplit(b" ", 1)[1]) - T0_NS < 1_000_000


def test_every_output_topic_has_a_mapping() -> None:
    from pipeline import topics
    from sinks.lineprotocol import LINES_BY_SCHEMA

    public = [spec for spec in topics.ALL_TOPICS if not spec.internal]
    unmapped = [
        spec.name
        for spec in public
        if spec.value_schema not in LINES_BY_SCHEMA and spec is not topics.DEAD_LETTERS
    ]
    assert unmapped == []
