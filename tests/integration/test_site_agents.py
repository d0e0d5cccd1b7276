"""The allocation, fleet and island agents on the real embedded broker.

One site with all three sections gets four hours of one-minute telemetry (battery,
solar, meter with voltage and frequency, two EVs) and hourly prices. What the agents
send must be exactly what the plain engines give for the same input, in order: the
agents are thin. On top, the scenario checks what each engine is for: balanced plans,
charger setpoints and an unreachable-target warning, and a grid failure (voltage 0 for
more than 2 s of event time) that islands the site, sheds loads and is resolved when
the grid is back.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline import codec, kafka, topics
from pipeline.app import agent_input_topics, create_app
from pipeline.local import EmbeddedBroker
from pipeline.schemas import (
    Alert,
    AlertStatus,
    AllocationPlan,
    BatteryReading,
    Command,
    EvReading,
    MeterReading,
    PriceTick,
    Reading,
    Severity,
    SolarReading,
    TelemetryBatch,
)
from pipeline.settings import Settings, SettingsError
from processors import allocation, fleet, island
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration

SITE = "depot"
START = datetime(2025, 4, 7, tzinfo=UTC)
HOURS = 4
PRICES = [0.05, 0.10, 0.30, 0.10]
OUTAGE = START + timedelta(hours=3, minutes=30)

SITE_CONFIG: dict[str, Any] = {
    "id": SITE,
    "market": "M",
    "batteries": [
        {
            "device": "bat",
            "capacity_kwh": 40.0,
            "max_charge_kw": 10.0,
            "max_discharge_kw": 10.0,
            "charge_below_price_per_kwh": 0.08,
            "discharge_above_price_per_kwh": 0.2,
        }
    ],
    "allocation": {
        "limits": {"max_grid_import_kw": 30.0, "max_export_kw": 10.0},
        "consumers": [
            {"name": "fleet", "kind": "fleet", "priority": 10},
            {"name": "facility", "kind": "facility", "priority": 20, "critical": True},
            {"name": "battery", "kind": "battery_charging", "priority": 30},
            {
                "name": "miner",
                "kind": "opportunistic",
                "priority": 40,
                "requested_kw": 2.0,
                "max_grid_price_per_kwh": 0.06,
            },
            {"name": "export", "kind": "export", "priority": 50, "grid_allowed": False},
        ],
        "tou_periods": [
            {"start": "00:00", "period": "super off-peak"},
            {"start": "02:00", "period": "peak"},
            {"start": "03:00", "period": "shoulder"},
        ],
        "export_price_per_kwh": 0.04,
    },
    "fleet": {
        "max_import_kw": 20.0,
        "step_minutes": 15,
        "vehicles": [
            {
                "vehicle_id": "van-1",
                "capacity_kwh": 60.0,
                "target_soc_pct": 80.0,
                "max_charge_kw": 11.0,
                "departure": "06:00",
            },
            # 48 kWh in 2 h at 3.7 kW cannot be done: a target_unreachable warning.
            {
                "vehicle_id": "van-2",
                "capacity_kwh": 60.0,
                "target_soc_pct": 100.0,
                "max_charge_kw": 3.7,
                "departure": "02:00",
            },
        ],
    },
    "island": {"return_stable_s": 120.0, "meter_device": "grid-meter"},
}


def readings() -> list[Reading]:
    out: list[Reading] = []
    for minute in range(HOURS * 60 + 1):  # up to 04:00 inclusive: it closes the last hour
        ts = START + timedelta(minutes=minute)
        hour = minute // 60
        voltage = 0.0 if OUTAGE <= ts < OUTAGE + timedelta(minutes=1) else 231.0
        out += [
            BatteryReading(device="bat", ts=ts, power_kw=-2.0, soc_pct=40 + minute / 10),
            SolarReading(device="pv", ts=ts, power_kw=max(0.0, 3.0 - hour)),
            MeterReading(
                device="grid-meter",
                ts=ts,
                power_kw=4.0 + hour,
                voltage_v=voltage,
                frequency_hz=50.0,
            ),
            EvReading(
                device="van-1", ts=ts, power_kw=7.0, soc_pct=20 + minute / 6, plugged_in=True
            ),
            EvReading(
                device="van-2",
                ts=ts,
                power_kw=3.7 if minute < 120 else 0.0,
                soc_pct=20 + minute / 40,
                plugged_in=minute < 120,
            ),
        ]
        if minute == 60:  # a one-second sag is not an outage
            out.append(MeterReading(device="grid-meter", ts=ts, power_kw=5.0, voltage_v=0.0))
            out.append(
                MeterReading(
                    device="grid-meter", ts=ts + timedelta(seconds=1), power_kw=5.0, voltage_v=231
                )
            )
        if ts == OUTAGE:  # per-second meter readings during the outage
            out += [
                MeterReading(
                    device="grid-meter", ts=ts + timedelta(seconds=s), power_kw=0.0, voltage_v=0.0
                )
                for s in range(1, 4)
            ]
    return sorted(out, key=lambda r: r.ts)


def batches(all_readings: list[Reading], size: int = 50) -> list[TelemetryBatch]:
    return [
        TelemetryBatch(
            batch_id=f"b{n}", site=SITE, source="test", readings=all_readings[i : i + size]
        )
        for n, i in enumerate(range(0, len(all_readings), size))
    ]


def ticks() -> list[PriceTick]:
    return [
        PriceTick(
            market="M",
            start=START + timedelta(hours=h),
            end=START + timedelta(hours=h + 1),
            price_per_kwh=price,
        )
        for h, price in enumerate(PRICES)
    ]


def expected(settings: Settings, sent: list[TelemetryBatch]) -> dict[str, list[Any]]:
    """What the plain engines give for the same input: prices first, then telemetry."""
    site = settings.sites[0]
    alloc_cfg = allocation.allocation_settings(site)
    fleet_cfg = fleet.fleet_settings(site)
    island_cfg = island.island_settings(site)
    assert alloc_cfg and fleet_cfg and island_cfg
    alloc, alloc_state = allocation.SiteAllocation(alloc_cfg), allocation.AllocationState()
    plans = []
    for tick in ticks():
        plans += alloc.on_price(alloc_state, tick.start, tick.end, tick.price_per_kwh)
    ev, ev_state = fleet.SiteFleet(fleet_cfg), fleet.FleetState()
    controller, island_data = island.IslandController(island_cfg), None
    out: list[Any] = []
    for batch in sent:
        plans += alloc.on_readings(alloc_state, batch.readings)
        out += ev.on_readings(ev_state, [r for r in batch.readings if isinstance(r, EvReading)])
        island_data, more = island.step_readings(controller, island_data, batch.readings)
        out += more
    return {
        "plans": [d.plan for d in plans],
        "commands": [c for c in out if isinstance(c, Command)],
        "alerts": [a for a in out if isinstance(a, Alert)],
    }


async def test_site_agents_plan_charge_and_island_like_the_plain_engines(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap, sites=[SITE_CONFIG], kafka={"one_record_per_batch": True}
    )
    sent = batches(readings())
    await kafka.ensure_topics(settings)
    app = create_app(settings)
    await app.start()
    try:
        producer = kafka.producer(settings)
        await producer.start()
        try:
            # Prices first, as the price fan-out delivers day-ahead prices before delivery.
            for tick in ticks():
                await producer.send_and_wait(
                    settings.topic(topics.SITE_PRICES), codec.encode(tick), key=SITE.encode()
                )
            for batch in sent:
                await producer.send_and_wait(
                    settings.topic(topics.TELEMETRY), codec.encode(batch), key=SITE.encode()
                )
        finally:
            await producer.stop()
        await kafka.wait_until_drained(
            settings,
            {settings.app_id: agent_input_topics(settings)},
            timeout_s=40,
            failed=lambda: app.crash_reason,
        )
    finally:
        await app.stop()

    want = expected(settings, sent)
    plans = [
        codec.decode(AllocationPlan, v)
        for _, v in await kafka.read_all(settings, topics.ALLOCATIONS)
    ]
    commands = [
        codec.decode(Command, v) for _, v in await kafka.read_all(settings, topics.COMMANDS)
    ]
    alerts = [codec.decode(Alert, v) for _, v in await kafka.read_all(settings, topics.ALERTS)]
    site_commands = [c for c in commands if c.device != "bat"]  # arbitrage commands the battery

    # Each agent sends what its engine gives, in order (agents interleave with each other).
    assert plans == want["plans"]
    for agent_of in (lambda m: m.device in ("van-1", "van-2"), lambda m: m.device is None):
        assert [a for a in alerts if agent_of(a)] == [a for a in want["alerts"] if agent_of(a)]
    for fleet_command in (True, False):
        got = [c for c in site_commands if (c.action == "set_power") == fleet_command]
        assert got == [c for c in want["commands"] if (c.action == "set_power") == fleet_command]
    assert len(alerts) == len(want["alerts"])

    # Allocation: one plan per hour, balanced, the battery discharging only at peak.
    assert [p.start for p in plans] == [START + timedelta(hours=h) for h in range(HOURS)]
    for plan in plans:
        supplied = sum(s.power_kw for s in plan.sources)
        allocated = sum(a.allocated_kw for a in plan.allocations)
        assert supplied == pytest.approx(allocated, abs=1e-9)
        assert plan.net_cost == pytest.approx(plan.grid_cost - plan.export_revenue)
        served = {a.consumer: a for a in plan.allocations}
        assert served["fleet"].requested_kw == pytest.approx(
            7.0 + (3.7 if plan.start.hour < 2 else 0)
        )
    discharge = [next(s.power_kw for s in p.sources if s.source == "battery") for p in plans]
    assert discharge[2] > 0 and discharge[0] == discharge[1] == discharge[3] == 0
    assert len({p.plan_id for p in plans}) == HOURS

    # Fleet: setpoints for the plugged-in vans at most once per 15 minutes, dry-run.
    setpoints = [c for c in site_commands if c.action == "set_power"]
    assert {c.device for c in setpoints} == {"van-1", "van-2"}
    assert all(
        c.dry_run and c.valid_until == c.issued_at + timedelta(minutes=15) for c in setpoints
    )
    plan_times = sorted({c.issued_at for c in setpoints})
    assert plan_times == [START + timedelta(minutes=15 * k) for k in range(HOURS * 4 + 1)]
    assert all(c.device == "van-1" for c in setpoints if c.issued_at >= START + timedelta(hours=2))
    unreachable = [a for a in alerts if a.alert_type == "ev_target_unreachable"]
    assert [(a.device, a.severity) for a in unreachable] == [("van-2", Severity.WARNING)]

    # Island: the 1 s sag at 01:00 is ignored; the outage at 03:30 islands the site once
    # it has lasted 2 s, sheds the non-critical loads, and resolves 120 s after return.
    grid = [a for a in alerts if a.alert_type == "grid_failure"]
    assert [(a.status, a.severity, a.start) for a in grid] == [
        (AlertStatus.FIRING, Severity.CRITICAL, OUTAGE),
        (AlertStatus.RESOLVED, Severity.CRITICAL, OUTAGE),
    ]
    assert grid[0].alert_id == grid[1].alert_id
    assert grid[1].end == OUTAGE + timedelta(minutes=3)  # back at 03:31, stable 120 s
    shed = [c for c in site_commands if c.action == "shed"]
    restore = [c for c in site_commands if c.action == "restore"]
    assert sorted(c.device for c in shed) == sorted(c.device for c in restore) == ["fleet", "miner"]
    assert {c.issued_at for c in shed} == {OUTAGE + timedelta(seconds=2)}
    assert {c.source_id for c in shed + restore} == {grid[0].alert_id}


@pytest.mark.parametrize(
    ("section", "bad", "named"),
    [
        (
            "allocation",
            {"consumers": [{"name": "fleet", "kind": "fleet", "priority": -1}]},
            "sites[depot].allocation.consumers[0].priority",
        ),
        ("fleet", {"step_minutes": 0}, "sites[depot].fleet.step_minutes"),
        ("island", {"failure_confirm_s": -1}, "sites[depot].island.failure_confirm_s"),
    ],
)
def test_a_bad_site_section_fails_at_start_up_naming_the_setting(
    make_settings: SettingsFactory, section: str, bad: dict[str, Any], named: str
) -> None:
    site = {**SITE_CONFIG, section: {**SITE_CONFIG[section], **bad}}
    settings = make_settings(broker="127.0.0.1:1", sites=[site])
    with pytest.raises(SettingsError, match=named.replace("[", r"\[").replace("]", r"\]")):
        create_app(settings)
