"""The plain-Python adapters that turn a site's telemetry into the engines' inputs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest

from pipeline.schemas import (
    Alert,
    BatteryReading,
    Command,
    EvReading,
    HomeReading,
    MeterReading,
    Reading,
    SolarReading,
)
from pipeline.settings import SettingsError, SiteConfig
from processors import allocation, fleet, island
from processors.allocation import DispatchPeriod

T0 = datetime(2025, 4, 7, tzinfo=UTC)
BATTERY = {
    "device": "bat",
    "capacity_kwh": 20.0,
    "max_charge_kw": 5.0,
    "max_discharge_kw": 5.0,
    "charge_below_price_per_kwh": 0.1,
    "discharge_above_price_per_kwh": 0.2,
}
ALLOCATION: dict[str, Any] = {
    "limits": {"max_grid_import_kw": 20.0, "max_export_kw": 5.0},
    "tou_periods": [
        {"start": "07:00", "period": "peak"},
        {"start": "22:00", "period": "Super off-peak"},
    ],
}


def site(**sections: Any) -> SiteConfig:
    return SiteConfig.model_validate({"id": "s", "market": "M", "batteries": [BATTERY], **sections})


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


# --- allocation ---------------------------------------------------------------------------


def alloc_cfg(**overrides: Any) -> allocation.AllocationSettings:
    cfg = allocation.allocation_settings(site(allocation={**ALLOCATION, **overrides}))
    assert cfg is not None
    return cfg


def test_a_site_without_the_section_gets_no_settings() -> None:
    assert allocation.allocation_settings(site()) is None
    assert fleet.fleet_settings(site()) is None
    assert island.island_settings(site()) is None


def test_the_battery_defaults_to_the_sites_only_battery() -> None:
    cfg = alloc_cfg()
    assert cfg.battery is not None and cfg.battery.capacity_kwh == 20.0
    two = SiteConfig.model_validate(
        {
            "id": "s",
            "market": "M",
            "batteries": [BATTERY, {**BATTERY, "device": "bat2"}],
            "allocation": ALLOCATION,
        }
    )
    with pytest.raises(SettingsError, match=r"sites\[s\]\.allocation\.battery"):
        allocation.allocation_settings(two)


def test_bad_settings_are_named() -> None:
    with pytest.raises(SettingsError, match=r"sites\[s\]\.allocation\.timezone"):
        alloc_cfg(timezone="Mars/Olympus")
    with pytest.raises(SettingsError, match=r"sites\[s\]\.allocation\.tou_periods\[0\]\.period"):
        alloc_cfg(tou_periods=[{"start": "00:00", "period": "happy hour"}])


@pytest.mark.parametrize(
    ("utc", "zone", "period"),
    [
        (datetime(2025, 4, 7, 3, tzinfo=UTC), "UTC", DispatchPeriod.SUPER_OFF_PEAK),  # wraps
        (datetime(2025, 4, 7, 7, tzinfo=UTC), "UTC", DispatchPeriod.PEAK),
        (datetime(2025, 4, 7, 22, tzinfo=UTC), "UTC", DispatchPeriod.SUPER_OFF_PEAK),
        # 05:00 UTC is 07:00 in Rome in summer (CEST) but 06:00 in winter (CET).
        (datetime(2025, 4, 7, 5, tzinfo=UTC), "Europe/Rome", DispatchPeriod.PEAK),
        (datetime(2025, 1, 7, 5, tzinfo=UTC), "Europe/Rome", DispatchPeriod.SUPER_OFF_PEAK),
    ],
)
def test_tou_period_follows_local_time_of_day(
    utc: datetime, zone: str, period: DispatchPeriod
) -> None:
    assert alloc_cfg(timezone=zone).tou_period_at(utc) == period


def one_hour(extra: Sequence[Reading] | None = None) -> list[Reading]:
    out: list[Reading] = []
    for minute in range(60):
        out += [
            SolarReading(device="pv1", ts=at(minute), power_kw=2.0 if minute < 30 else 4.0),
            SolarReading(device="pv2", ts=at(minute), power_kw=1.0),
            MeterReading(device="m", ts=at(minute), power_kw=3.0),
            BatteryReading(device="bat", ts=at(minute), power_kw=-1.0, soc_pct=50 + minute / 10),
            EvReading(device="ev", ts=at(minute), power_kw=2.0, soc_pct=30, plugged_in=True),
        ]
    return out + list(extra or [])


def inputs_of(readings: list[Reading], **overrides: Any) -> allocation.IntervalInputs:
    bucket = allocation.Bucket()
    for reading in readings:
        bucket.add(reading, int(reading.ts.timestamp() * 1000))
    bucket = allocation.Bucket.from_json(bucket.to_json())  # survives the table round trip
    return allocation.interval_inputs([bucket], T0, 1.0, 0.2, alloc_cfg(**overrides))


def test_interval_inputs_from_one_hour_of_readings() -> None:
    inputs = inputs_of(one_hour())
    assert inputs.solar_kw == pytest.approx(3.0 + 1.0)  # per-device means, summed
    assert inputs.battery_soc_pct == 50.0  # the first reading: the state at the start
    assert inputs.fleet_soc_pct == 30.0
    assert inputs.tou_period is DispatchPeriod.SUPER_OFF_PEAK
    assert inputs.price_per_kwh == 0.2 and inputs.export_price_per_kwh == 0.0
    # Site load = meter + solar + battery - ev = 3 + 4 - 1 - 2.
    assert inputs.requests_kw == {"fleet": 2.0, "facility": pytest.approx(4.0)}


def test_facility_load_from_home_readings() -> None:
    home = [HomeReading(device="h", ts=at(m), power_kw=1.5) for m in range(60)]
    inputs = inputs_of(one_hour(home), load_from="home")
    assert inputs.requests_kw["facility"] == pytest.approx(1.5)


def test_unplugged_vehicles_do_not_count_for_the_fleet_soc() -> None:
    late = [EvReading(device="ev", ts=at(59.5), power_kw=0.0, soc_pct=35, plugged_in=False)]
    assert inputs_of(one_hour(late)).fleet_soc_pct is None


def test_intervals_are_planned_once_over_whatever_order_prices_arrive_in() -> None:
    engine = allocation.SiteAllocation(alloc_cfg())
    readings = [
        r
        for h in range(3)
        for r in one_hour()
        for r in [r.model_copy(update={"ts": r.ts + timedelta(hours=h)})]
    ]
    prices = [
        (T0 + timedelta(hours=h), T0 + timedelta(hours=h + 1), 0.1 * (h + 1)) for h in range(3)
    ]

    first = allocation.AllocationState()
    plans = [d for p in prices for d in engine.on_price(first, *p)]
    assert plans == []
    plans += engine.on_readings(first, readings)
    # The third hour is not over: no reading at or after 03:00 yet.
    assert [d.plan.start for d in plans] == [T0, T0 + timedelta(hours=1)]
    closing: list[Reading] = [MeterReading(device="m", ts=T0 + timedelta(hours=3), power_kw=1.0)]
    plans += engine.on_readings(first, closing)
    assert len(plans) == 3

    # Prices after the readings, through a JSON round trip of the state each time.
    second = allocation.AllocationState()
    later = engine.on_readings(second, readings + closing)
    assert later == []
    for p in reversed(prices):
        second = allocation.AllocationState.from_json(second.to_json())
        later += engine.on_price(second, *p)
    assert sorted((d.plan for d in later), key=lambda p: p.start) == [d.plan for d in plans]

    # A reading of a planned interval is late: counted, ignored, no second plan.
    assert engine.on_readings(second, readings[:5]) == []
    assert second.late == 5


def test_readings_replayed_over_a_state_that_counted_them_change_no_plan() -> None:
    """A worker restarted after writing its state but before committing its input reads
    part of the input again: the interval's means must not count those readings twice."""
    engine = allocation.SiteAllocation(alloc_cfg())
    readings = one_hour()
    closing: list[Reading] = [MeterReading(device="m", ts=T0 + timedelta(hours=1), power_kw=1.0)]

    once = allocation.AllocationState()
    engine.on_price(once, T0, T0 + timedelta(hours=1), 0.1)
    (want,) = engine.on_readings(once, readings + closing)

    replayed = allocation.AllocationState()
    engine.on_price(replayed, T0, T0 + timedelta(hours=1), 0.1)
    half = len(readings) * 2 // 3
    assert engine.on_readings(replayed, readings[:half]) == []
    replayed = allocation.AllocationState.from_json(replayed.to_json())  # the table
    (got,) = engine.on_readings(replayed, readings + closing)  # from the committed start
    assert got.plan == want.plan


def test_an_interval_with_no_battery_soc_uses_the_last_one_seen() -> None:
    engine = allocation.SiteAllocation(alloc_cfg())
    state = allocation.AllocationState()
    engine.on_readings(state, [BatteryReading(device="bat", ts=at(-1), power_kw=0, soc_pct=42)])
    engine.on_price(state, T0, at(60), 0.1)
    plans = engine.on_readings(
        state, [MeterReading(device="m", ts=at(m), power_kw=1.0) for m in (0, 30, 60)]
    )
    assert len(plans) == 1 and plans[0].battery_soc_end_pct is not None
    assert state.unplanned == 0


# --- island -------------------------------------------------------------------------------


def island_cfg(**overrides: Any) -> island.IslandSettings:
    cfg = island.island_settings(site(island=overrides))
    assert cfg is not None
    return cfg


def test_island_settings_default_from_the_site() -> None:
    cfg = island_cfg()
    assert cfg.battery_capacity_kwh == 20.0 and cfg.battery_max_discharge_kw == 5.0
    assert {c.name for c in cfg.consumers} >= {"fleet", "facility"}
    with pytest.raises(SettingsError, match=r"sites\[s\]\.island\.nominal_voltage_v"):
        island_cfg(nominal_voltage_v=0)


def test_observations_group_by_timestamp_and_keep_the_energy_picture() -> None:
    cfg = island_cfg(meter_device="grid")
    latest: dict[str, list[Any]] = {}
    readings: list[Reading] = [
        MeterReading(device="grid", ts=at(0), power_kw=2.0, voltage_v=230, frequency_hz=50),
        MeterReading(device="sub", ts=at(0), power_kw=1.0, voltage_v=0),  # not the grid side
        SolarReading(device="pv", ts=at(0), power_kw=3.0),
        BatteryReading(device="bat", ts=at(1), power_kw=1.0, soc_pct=60),
    ]
    obs = island.observations(reversed(readings), latest, cfg)
    assert [o.ts for o in obs] == [at(0), at(1)]
    assert (obs[0].grid_voltage_v, obs[0].grid_frequency_hz) == (230, 50)
    assert obs[1].grid_voltage_v is None  # nothing said about the grid at 00:01
    assert obs[1].solar_kw == 3.0 and obs[1].battery_soc_pct == 60
    assert obs[1].critical_load_kw == pytest.approx(2 + 1 + 3 + 1)  # whole site
    only_home = island_cfg(critical_load_devices=["h"])
    home = [HomeReading(device="h", ts=at(2), power_kw=0.7)]
    assert island.observations(home, latest, only_home)[0].critical_load_kw == 0.7


def test_a_grid_failure_islands_after_two_seconds_of_event_time() -> None:
    controller = island.IslandController(island_cfg(return_stable_s=10))
    down = [
        MeterReading(device="m", ts=T0 + timedelta(seconds=s), power_kw=0, voltage_v=0)
        for s in range(4)
    ]
    data, out = island.step_readings(controller, None, down[:2])
    assert out == []  # 1 s: a sag so far
    data, out = island.step_readings(controller, data, down[2:])
    assert isinstance(out[0], Alert) and out[0].severity == "critical"
    assert {o.device for o in out[1:]} == {"fleet", "opportunistic"}
    up = [
        MeterReading(device="m", ts=T0 + timedelta(seconds=s), power_kw=1, voltage_v=230)
        for s in range(5, 20)
    ]
    data, out = island.step_readings(controller, data, up)
    assert [getattr(o, "status", None) for o in out if not hasattr(o, "command_id")] == ["resolved"]


# --- fleet --------------------------------------------------------------------------------

FLEET: dict[str, Any] = {
    "max_import_kw": 20.0,
    "step_minutes": 15,
    "vehicles": [
        {
            "vehicle_id": "van",
            "capacity_kwh": 50.0,
            "target_soc_pct": 80.0,
            "max_charge_kw": 7.0,
            "departure": "07:00",
        }
    ],
}


def fleet_cfg(**overrides: Any) -> fleet.FleetSettings:
    cfg = fleet.fleet_settings(site(fleet={**FLEET, **overrides}))
    assert cfg is not None
    return cfg


def test_fleet_settings_are_validated_and_named() -> None:
    with pytest.raises(SettingsError, match=r"sites\[s\]\.fleet\.vehicles\[0\]\.departure"):
        fleet_cfg(vehicles=[{**FLEET["vehicles"][0], "departure": "25:00"}])
    with pytest.raises(SettingsError, match=r"sites\[s\]\.fleet: .*duplicate vehicle_id"):
        fleet_cfg(vehicles=FLEET["vehicles"] * 2)


@pytest.mark.parametrize(
    ("now", "zone", "departure"),
    [
        (datetime(2025, 4, 7, 6, 59, tzinfo=UTC), "UTC", datetime(2025, 4, 7, 7, tzinfo=UTC)),
        (datetime(2025, 4, 7, 7, tzinfo=UTC), "UTC", datetime(2025, 4, 8, 7, tzinfo=UTC)),
        # 07:00 in Rome: 05:00 UTC in summer; the night of the spring-forward change.
        (
            datetime(2025, 3, 29, 20, tzinfo=UTC),
            "Europe/Rome",
            datetime(2025, 3, 30, 5, tzinfo=UTC),
        ),
    ],
)
def test_next_departure_is_the_next_local_time_of_day(
    now: datetime, zone: str, departure: datetime
) -> None:
    assert fleet.next_departure(now, time(7), zone) == departure


def ev(minute: float, soc: float | None, plugged: bool = True) -> EvReading:
    return EvReading(device="van", ts=at(minute), power_kw=0, soc_pct=soc, plugged_in=plugged)


def test_sessions_follow_plug_in_and_the_latest_soc() -> None:
    cfg = fleet_cfg()
    engine = fleet.SiteFleet(cfg)
    state = fleet.FleetState()
    engine.on_readings(state, [ev(0, 30), ev(1, None), ev(2, 31)])
    (session,) = fleet.sessions_at(cfg, state, at(2))
    assert session.plugged_in_at == at(0) and session.soc_pct == 31
    assert session.departure == datetime(2025, 4, 7, 7, tzinfo=UTC)
    engine.on_readings(state, [ev(3, 31, plugged=False)])
    assert fleet.sessions_at(cfg, state, at(3)) == []
    engine.on_readings(state, [ev(4, 31)])
    assert fleet.sessions_at(cfg, state, at(4))[0].plugged_in_at == at(4)  # a new session


def test_the_fleet_replans_at_most_once_per_step_and_warns_once_per_session() -> None:
    engine = fleet.SiteFleet(fleet_cfg(vehicles=[{**FLEET["vehicles"][0], "max_charge_kw": 3}]))
    state = fleet.FleetState()
    out = engine.on_readings(state, [ev(m, 10) for m in range(0, 40)])
    commands = [o for o in out if isinstance(o, Command)]
    assert [c.issued_at for c in commands] == [at(0), at(15), at(30)]
    assert all(c.dry_run and c.device == "van" for c in commands)
    # 10 % -> 80 % of 50 kWh at 3 kW does not fit before 07:00: one warning only.
    alerts = [o for o in out if isinstance(o, Alert)]
    assert len(alerts) == 1 and alerts[0].alert_type == "ev_target_unreachable"
    again = fleet.FleetState.from_json(state.to_json())
    assert engine.on_readings(again, [ev(44, 10)]) == []  # within the step of 00:30
    assert [
        o.issued_at for o in engine.on_readings(again, [ev(45, 11)]) if isinstance(o, Command)
    ] == [at(45)]
