"""Hourly Scope 2 accounting: a worked example by hand, then the edges."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.schemas import (
    BatteryReading,
    CarbonIntensity,
    EmissionsRecord,
    HomeReading,
    MeterReading,
    Reading,
    SolarReading,
)
from pipeline.settings import SettingsError, SiteConfig, validate_section
from processors.carbon import (
    CarbonEngine,
    CarbonSettings,
    CarbonState,
    HourFlows,
    carbon_settings,
    daily_clean_share_pct,
    split_hour,
)

T0 = datetime(2025, 4, 7, tzinfo=UTC)
H = timedelta(hours=1)
SITE = "turin-home"
ZONE = "IT-NO"


def cfg(**overrides: Any) -> CarbonSettings:
    # An 80 % round trip and hourly readings keep the hand arithmetic short.
    base: dict[str, Any] = {
        "zone": ZONE,
        "residual_mix_co2_g_per_kwh": 500.0,
        "battery_round_trip_efficiency": 0.8,
        "max_hold_s": 3600.0,
    }
    return CarbonSettings(**{**base, **overrides})


def site_readings(
    ts: datetime, meter_kw: float, solar_kw: float, battery_kw: float
) -> list[Reading]:
    return [
        MeterReading(device="meter-1", ts=ts, power_kw=meter_kw),
        SolarReading(device="pv-1", ts=ts, power_kw=solar_kw),
        BatteryReading(device="battery-1", ts=ts, power_kw=battery_kw, soc_pct=50.0),
    ]


def intensity(
    hour: int, co2: float, renewable: float | None, minutes: int = 60, offset_min: int = 0
) -> CarbonIntensity:
    start = T0 + hour * H + timedelta(minutes=offset_min)
    return CarbonIntensity(
        zone=ZONE,
        start=start,
        end=start + timedelta(minutes=minutes),
        co2_g_per_kwh=co2,
        renewable_share_pct=renewable,
    )


# Worked example (each hour's powers are constant; meter = load - solar - battery):
#
# hour 0: load 2, solar 6, battery -4 (charging), meter 0.   grid 300 g/kWh, 20 % renewable
#   battery charged 4 kWh from solar -> pool +4*0.8 = 3.2 kWh, 0 g, 3.2 clean kWh
#   load 2 kWh all solar: location 0, market 0, clean 2/2 = 100 %
# hour 1: load 1, solar 0, battery -2, meter 3.              grid 400 g/kWh, 25 %, 1 kWh certified
#   grid 3 kWh: 2 to the battery, 1 to the load; certificates cover 1/3 of it, so the
#   market factor of this hour's grid energy is 2/3 * 500 = 333.33 g/kWh
#   pool +2*0.8 = 1.6 kWh, +800 g location, +666.67 g market, +0.4 clean kWh
#     -> 4.8 kWh, 800 g, 666.67 g, 3.6 clean kWh
#   location 1*400 = 0.4 kg; market 1*333.33 = 0.3333 kg; clean 0.25*1/1 = 25 %
# hour 2: load 3, solar 0, battery +2.4 (discharging), meter 0.6.   grid 200 g/kWh, 50 %
#   2.4 kWh is half the pool: 400 g location, 333.33 g market, 1.8 clean kWh
#   location 0.6*200 + 400 = 520 g = 0.52 kg
#   market 0.6*500 (no certificates) + 333.33 = 633.33 g = 0.6333 kg
#   clean (1.8 + 0.6*0.5) / 3 = 70 %
# day: clean kWh 2 + 0.25 + 2.1 = 4.35 of 6 kWh consumed = 72.5 %
WORKED = [
    (0, 0.0, 6.0, -4.0),
    (1, 3.0, 0.0, -2.0),
    (2, 0.6, 0.0, 2.4),
    (3, 0.0, 0.0, 0.0),  # closes hour 2
]
WORKED_INTENSITIES = [
    intensity(0, 300.0, 20.0),
    intensity(1, 400.0, 25.0),
    intensity(2, 200.0, 50.0),
]


def run_worked(engine: CarbonEngine) -> list[EmissionsRecord]:
    out: list[EmissionsRecord] = []
    for item in WORKED_INTENSITIES:
        out += engine.add_intensity(item)
    out += engine.add_certified(T0 + H, 1.0)
    for hour, meter, solar, battery in WORKED:
        out += engine.add_readings(site_readings(T0 + hour * H, meter, solar, battery))
    return out


def test_worked_example_by_hand() -> None:
    engine = CarbonEngine(SITE, cfg())
    records = run_worked(engine)

    assert [r.start for r in records] == [T0, T0 + H, T0 + 2 * H]
    r0, r1, r2 = records
    assert (r0.solar_energy_kwh, r0.battery_energy_kwh, r0.grid_energy_kwh) == pytest.approx(
        (2.0, 0.0, 0.0)
    )
    assert r0.location_based_kg_co2 == 0.0
    assert r0.market_based_kg_co2 == 0.0
    assert r0.clean_share_pct == pytest.approx(100.0)
    assert r0.grid_co2_g_per_kwh == 300.0

    assert (r1.solar_energy_kwh, r1.battery_energy_kwh, r1.grid_energy_kwh) == pytest.approx(
        (0.0, 0.0, 1.0)
    )
    assert r1.location_based_kg_co2 == pytest.approx(0.4)
    assert r1.market_based_kg_co2 == pytest.approx(1.0 / 3.0)
    assert r1.clean_share_pct == pytest.approx(25.0)

    assert (r2.solar_energy_kwh, r2.battery_energy_kwh, r2.grid_energy_kwh) == pytest.approx(
        (0.0, 2.4, 0.6)
    )
    assert r2.location_based_kg_co2 == pytest.approx(0.52)
    assert r2.market_based_kg_co2 == pytest.approx(0.3 + 1.0 / 3.0)
    assert r2.clean_share_pct == pytest.approx(70.0)

    # What is left in the battery keeps its share of the charging emissions.
    assert engine.state.pool.energy_kwh == pytest.approx(2.4)
    assert engine.state.pool.location_g_co2 == pytest.approx(400.0)
    assert r0.record_id != r1.record_id

    assert daily_clean_share_pct(records) == {date(2025, 4, 7): pytest.approx(72.5)}


def test_record_ids_are_deterministic() -> None:
    first = run_worked(CarbonEngine(SITE, cfg()))
    second = run_worked(CarbonEngine(SITE, cfg()))
    assert [r.record_id for r in first] == [r.record_id for r in second]


def test_json_round_trip_mid_stream_gives_the_same_records() -> None:
    straight = run_worked(CarbonEngine(SITE, cfg()))

    engine = CarbonEngine(SITE, cfg())
    out: list[EmissionsRecord] = []
    out += engine.add_intensity(WORKED_INTENSITIES[0])
    out += engine.add_certified(T0 + H, 1.0)
    for hour, meter, solar, battery in WORKED[:2]:
        out += engine.add_readings(site_readings(T0 + hour * H, meter, solar, battery))
    # Through real JSON text, as a Faust table would store it.
    restored = CarbonState.from_json(json.loads(json.dumps(engine.state.to_json())))
    assert restored.to_json() == engine.state.to_json()
    engine = CarbonEngine(SITE, cfg(), restored)
    for item in WORKED_INTENSITIES[1:]:
        out += engine.add_intensity(item)
    for hour, meter, solar, battery in WORKED[2:]:
        out += engine.add_readings(site_readings(T0 + hour * H, meter, solar, battery))
    assert out == straight
    assert CarbonState.from_json(None).to_json() == CarbonState().to_json()


def test_readings_before_intensity_wait_and_late_intensity_releases_in_hour_order() -> None:
    engine = CarbonEngine(SITE, cfg())
    for hour, meter, solar, battery in WORKED:
        assert engine.add_readings(site_readings(T0 + hour * H, meter, solar, battery)) == []
    # Hour 1's intensity alone releases nothing: hour 0 must go first (the battery pool).
    assert engine.add_intensity(WORKED_INTENSITIES[1]) == []
    released = engine.add_intensity(WORKED_INTENSITIES[0])
    assert [r.start for r in released] == [T0, T0 + H]
    # Another zone's intensity is not this site's.
    other = intensity(2, 999.0, 0.0).model_copy(update={"zone": "FR"})
    assert engine.add_intensity(other) == []
    last = engine.add_intensity(WORKED_INTENSITIES[2])
    assert [r.start for r in last] == [T0 + 2 * H]
    assert last[0].grid_co2_g_per_kwh == 200.0


def test_hour_waits_until_every_device_has_passed_its_end() -> None:
    engine = CarbonEngine(SITE, cfg(max_hold_s=7200.0))
    engine.add_intensity(intensity(0, 300.0, 20.0))
    engine.add_readings(site_readings(T0, 1.0, 0.0, 0.0))
    # The meter has reached 01:00 but the solar inverter still holds a power from 00:00.
    assert engine.add_readings([MeterReading(device="meter-1", ts=T0 + H, power_kw=1.0)]) == []
    done = engine.add_readings(
        [
            SolarReading(device="pv-1", ts=T0 + H, power_kw=0.0),
            BatteryReading(device="battery-1", ts=T0 + H, power_kw=0.0, soc_pct=50.0),
        ]
    )
    assert len(done) == 1
    assert done[0].grid_energy_kwh == pytest.approx(1.0)


def test_export_hour_is_not_consumption() -> None:
    engine = CarbonEngine(SITE, cfg())
    engine.add_intensity(intensity(0, 300.0, 20.0))
    # load 1, solar 5, battery idle -> meter -4 (export)
    engine.add_readings(site_readings(T0, -4.0, 5.0, 0.0))
    (record,) = engine.add_readings(site_readings(T0 + H, 0.0, 0.0, 0.0))
    assert record.grid_energy_kwh == 0.0
    assert record.solar_energy_kwh == pytest.approx(1.0)
    assert record.location_based_kg_co2 == 0.0
    assert record.market_based_kg_co2 == 0.0
    assert record.clean_share_pct == pytest.approx(100.0)


def test_battery_energy_exported_takes_its_emissions_out() -> None:
    engine = CarbonEngine(SITE, cfg())
    engine.add_intensity(intensity(0, 300.0, 0.0))
    engine.add_intensity(intensity(1, 300.0, 0.0))
    # hour 0: charge 5 kWh from the grid (meter 5, load 0) -> pool 4 kWh, 1500 g
    records = engine.add_readings(site_readings(T0, 5.0, 0.0, -5.0))
    # hour 1: discharge 4 kWh, load 1, export 3 -> 1/4 of 1500 g stays with the site
    records += engine.add_readings(site_readings(T0 + H, -3.0, 0.0, 4.0))
    records += engine.add_readings(site_readings(T0 + 2 * H, 0.0, 0.0, 0.0))
    assert records[0].location_based_kg_co2 == 0.0  # counted when consumed, not when charged
    assert records[1].battery_energy_kwh == pytest.approx(1.0)
    assert records[1].location_based_kg_co2 == pytest.approx(0.375)
    assert engine.state.pool.energy_kwh == pytest.approx(0.0)


def test_no_consumption_hour_has_zero_share_and_no_weight() -> None:
    engine = CarbonEngine(SITE, cfg())
    engine.add_intensity(intensity(0, 300.0, 20.0))
    engine.add_intensity(intensity(1, 300.0, 20.0))
    records = engine.add_readings(site_readings(T0, 0.0, 0.0, 0.0))
    records += engine.add_readings(site_readings(T0 + H, 2.0, 0.0, 0.0))
    records += engine.add_readings(site_readings(T0 + 2 * H, 0.0, 0.0, 0.0))
    assert len(records) == 2
    assert records[0].clean_share_pct == 0.0
    assert records[0].location_based_kg_co2 == 0.0
    # The empty hour does not dilute the day: the day is the consuming hour's 20 %.
    assert daily_clean_share_pct(records) == {date(2025, 4, 7): pytest.approx(20.0)}


def test_reading_hold_is_cut_at_the_hour_boundary() -> None:
    engine = CarbonEngine(SITE, cfg(meter_devices=["meter-1"]))
    engine.add_intensity(intensity(0, 100.0, None))
    engine.add_intensity(intensity(1, 100.0, None))
    meter = [
        MeterReading(device="meter-1", ts=T0 + timedelta(minutes=30), power_kw=2.0),
        MeterReading(device="meter-1", ts=T0 + timedelta(minutes=90), power_kw=2.0),
        MeterReading(device="meter-1", ts=T0 + 2 * H, power_kw=0.0),
    ]
    records = engine.add_readings(meter)
    # 00:30-01:30 at 2 kW: 1 kWh in each hour; 01:30-02:00 adds 1 kWh to hour 1.
    assert [r.grid_energy_kwh for r in records] == pytest.approx([1.0, 2.0])
    # No renewable share published: no clean claim.
    assert records[0].clean_share_pct == 0.0


def test_gap_longer_than_the_hold_adds_no_energy() -> None:
    engine = CarbonEngine(SITE, cfg(max_hold_s=300.0, meter_devices=["meter-1"]))
    engine.add_intensity(intensity(0, 100.0, 0.0))
    records = engine.add_readings(
        [
            MeterReading(device="meter-1", ts=T0, power_kw=6.0),
            MeterReading(device="meter-1", ts=T0 + timedelta(minutes=58), power_kw=6.0),
            MeterReading(device="meter-1", ts=T0 + H, power_kw=6.0),
        ]
    )
    # 5 min held after 00:00 (then a gap) and 00:58-01:00: 7 min at 6 kW.
    assert records[0].grid_energy_kwh == pytest.approx(0.7)


def test_a_silent_device_does_not_block_the_hour_forever() -> None:
    engine = CarbonEngine(SITE, cfg(max_hold_s=300.0))
    engine.add_intensity(intensity(0, 100.0, 0.0))
    engine.add_readings(site_readings(T0, 1.0, 0.0, 0.0))
    # The inverter and the battery go silent; the meter keeps reporting.
    meter = [
        MeterReading(device="meter-1", ts=T0 + timedelta(minutes=m), power_kw=1.0)
        for m in range(5, 65, 5)
    ]
    records = engine.add_readings(meter)
    assert len(records) == 1
    assert records[0].grid_energy_kwh == pytest.approx(1.0)


def test_duplicate_and_out_of_order_readings_are_ignored_and_counted() -> None:
    engine = CarbonEngine(SITE, cfg())
    engine.add_intensity(intensity(0, 100.0, 0.0))
    engine.add_readings(
        [MeterReading(device="meter-1", ts=T0 + timedelta(minutes=30), power_kw=2.0)]
    )
    engine.add_readings(
        [
            MeterReading(
                device="meter-1", ts=T0 + timedelta(minutes=30), power_kw=9.0
            ),  # duplicate
            MeterReading(device="meter-1", ts=T0 + timedelta(minutes=10), power_kw=9.0),  # older
        ]
    )
    (record,) = engine.add_readings([MeterReading(device="meter-1", ts=T0 + H, power_kw=0.0)])
    assert record.grid_energy_kwh == pytest.approx(1.0)
    # A reading for an hour already emitted is late.
    engine.add_readings([MeterReading(device="meter-2", ts=T0, power_kw=5.0)])
    assert engine.state.ignored_readings == 3


def test_readings_of_other_kinds_and_devices_are_skipped() -> None:
    engine = CarbonEngine(SITE, cfg(meter_devices=["meter-1"], solar_devices=["pv-1"]))
    engine.add_readings(
        [
            HomeReading(device="home-1", ts=T0, power_kw=3.0),
            MeterReading(device="sub-meter", ts=T0, power_kw=3.0),
        ]
    )
    assert engine.state.devices == {}


def test_sub_hourly_intensities_are_averaged_and_need_full_cover() -> None:
    engine = CarbonEngine(SITE, cfg(meter_devices=["meter-1"]))
    engine.add_readings([MeterReading(device="meter-1", ts=T0, power_kw=2.0)])
    engine.add_readings([MeterReading(device="meter-1", ts=T0 + H, power_kw=0.0)])
    assert engine.add_intensity(intensity(0, 100.0, 10.0, minutes=30)) == []
    (record,) = engine.add_intensity(intensity(0, 300.0, 30.0, minutes=30, offset_min=30))
    assert record.grid_co2_g_per_kwh == pytest.approx(200.0)
    assert record.location_based_kg_co2 == pytest.approx(0.4)
    assert record.clean_share_pct == pytest.approx(20.0)


def test_missing_intensity_falls_back_to_the_last_one_after_the_wait() -> None:
    engine = CarbonEngine(SITE, cfg(meter_devices=["meter-1"], intensity_wait_s=7200.0))
    engine.add_intensity(intensity(0, 100.0, 0.0))
    out: list[EmissionsRecord] = []
    for hour in range(4):
        out += engine.add_readings([MeterReading(device="meter-1", ts=T0 + hour * H, power_kw=1.0)])
    # Clock 03:00: hour 1 (ended 02:00) has no intensity and has waited only one hour.
    assert [r.start for r in out] == [T0]
    later = engine.add_readings([MeterReading(device="meter-1", ts=T0 + 4 * H, power_kw=1.0)])
    assert [r.start for r in later] == [T0 + H]
    assert later[0].grid_co2_g_per_kwh == 100.0
    assert engine.state.estimated_hours == 1
    # A real intensity arriving in time is used, not the fallback.
    (hour2,) = engine.add_intensity(intensity(2, 400.0, 0.0))
    assert hour2.grid_co2_g_per_kwh == 400.0


def test_a_gap_in_the_feed_is_filled_once_a_later_intensity_has_come() -> None:
    # The feed comes in time order: an intensity for hour 2 says hour 1's will not come.
    engine = CarbonEngine(SITE, cfg(meter_devices=["meter-1"]))
    engine.add_intensity(intensity(0, 100.0, 0.0))
    out: list[EmissionsRecord] = []
    for hour in range(4):
        out += engine.add_readings([MeterReading(device="meter-1", ts=T0 + hour * H, power_kw=1.0)])
    assert [r.start for r in out] == [T0]  # hour 1 waits (a day by default)
    out = engine.add_intensity(intensity(2, 400.0, 0.0))
    assert [(r.start, r.grid_co2_g_per_kwh) for r in out] == [(T0 + H, 100.0), (T0 + 2 * H, 400.0)]
    assert engine.state.estimated_hours == 1
    restored = CarbonState.from_json(json.loads(json.dumps(engine.state.to_json())))
    assert restored.intensities_until == (T0 + 3 * H).isoformat()


def test_records_do_not_depend_on_whether_readings_or_intensities_came_first() -> None:
    """A worker catching up reads a site's readings ahead of its zone's intensities (they
    come through another agent): within the wait, the records are the same either way."""
    readings = [
        [MeterReading(device="meter-1", ts=T0 + minute * timedelta(minutes=1), power_kw=1.5)]
        for minute in range(0, 12 * 60, 15)
    ]
    intensities = [intensity(hour, 100.0 + 10 * hour, 30.0) for hour in range(12) if hour != 5]

    def records(first_readings: bool) -> list[str]:
        engine = CarbonEngine(SITE, cfg(meter_devices=["meter-1"]))
        out: list[EmissionsRecord] = []
        feeds: list[list[Any]] = (
            [readings, intensities] if first_readings else [intensities, readings]
        )
        for feed in feeds:
            for item in feed:
                out += (
                    engine.add_readings(item)
                    if isinstance(item, list)
                    else engine.add_intensity(item)
                )
        return [r.model_dump_json() for r in out]

    live = records(first_readings=False)
    assert len(live) == 11  # hour 5 from hour 4's intensity (a gap), hour 11 still open
    assert records(first_readings=True) == live


def test_residual_mix_defaults_to_the_grid_average() -> None:
    engine = CarbonEngine(SITE, cfg(residual_mix_co2_g_per_kwh=None, meter_devices=["meter-1"]))
    engine.add_intensity(intensity(0, 250.0, 0.0))
    engine.add_readings([MeterReading(device="meter-1", ts=T0, power_kw=2.0)])
    (record,) = engine.add_readings([MeterReading(device="meter-1", ts=T0 + H, power_kw=0.0)])
    assert record.market_based_kg_co2 == pytest.approx(record.location_based_kg_co2)
    assert record.market_based_kg_co2 == pytest.approx(0.5)


def test_certificates_above_the_grid_energy_cover_it_all_and_no_more() -> None:
    engine = CarbonEngine(SITE, cfg(meter_devices=["meter-1"]))
    engine.add_intensity(intensity(0, 250.0, 0.0))
    engine.add_certified(T0 + timedelta(minutes=20), 5.0)  # any instant of the hour
    engine.add_readings([MeterReading(device="meter-1", ts=T0, power_kw=2.0)])
    (record,) = engine.add_readings([MeterReading(device="meter-1", ts=T0 + H, power_kw=0.0)])
    assert record.market_based_kg_co2 == 0.0
    assert record.location_based_kg_co2 == pytest.approx(0.5)
    # A claim for an emitted hour cannot change it.
    assert engine.add_certified(T0, 1.0) == []
    assert engine.state.certified_kwh == {}
    with pytest.raises(ValueError, match="certified_kwh"):
        engine.add_certified(T0 + 5 * H, -1.0)


def test_certificates_wait_delays_emission() -> None:
    engine = CarbonEngine(SITE, cfg(meter_devices=["meter-1"], certificates_wait_s=1800.0))
    engine.add_intensity(intensity(0, 250.0, 0.0))
    engine.add_readings([MeterReading(device="meter-1", ts=T0, power_kw=2.0)])
    assert engine.add_readings([MeterReading(device="meter-1", ts=T0 + H, power_kw=2.0)]) == []
    engine.add_certified(T0, 1.0)  # in time thanks to the wait
    (record,) = engine.add_readings(
        [MeterReading(device="meter-1", ts=T0 + H + timedelta(minutes=30), power_kw=2.0)]
    )
    assert record.market_based_kg_co2 == pytest.approx(1.0 * 500.0 / 1000.0)


def test_discharge_beyond_the_pool_carries_the_grid_intensity() -> None:
    engine = CarbonEngine(SITE, cfg(battery_devices=["battery-1"], meter_devices=["meter-1"]))
    engine.add_intensity(intensity(0, 300.0, 40.0))
    # Energy stored before the engine started: unknown origin.
    engine.add_readings(site_readings(T0, 0.0, 0.0, 2.0))
    (record,) = engine.add_readings(site_readings(T0 + H, 0.0, 0.0, 0.0))
    assert record.battery_energy_kwh == pytest.approx(2.0)
    assert record.location_based_kg_co2 == pytest.approx(0.6)
    assert record.market_based_kg_co2 == pytest.approx(1.0)
    assert record.clean_share_pct == pytest.approx(40.0)


def test_split_hour_assigns_export_first_and_flags_unexplained_energy() -> None:
    # Half an hour of export at midday, half an hour of import: the load is 6 kWh, of
    # which only 1 kWh can be solar because 4 of the 5 solar kWh left the site.
    split = split_hour(HourFlows(import_kwh=5.0, export_kwh=4.0, solar_kwh=5.0))
    assert (split.solar_to_load_kwh, split.grid_to_load_kwh, split.solar_export_kwh) == (
        1.0,
        5.0,
        4.0,
    )
    assert split.unexplained_kwh == 0.0
    broken = split_hour(HourFlows(export_kwh=2.0, charge_kwh=1.0))
    assert broken.unexplained_kwh == pytest.approx(3.0)


def test_daily_score_uses_the_local_day() -> None:
    def record(start: datetime, grid_kwh: float, clean_pct: float) -> EmissionsRecord:
        return EmissionsRecord(
            record_id=f"r-{start:%H}",
            site=SITE,
            start=start,
            end=start + H,
            grid_energy_kwh=grid_kwh,
            solar_energy_kwh=0.0,
            battery_energy_kwh=0.0,
            grid_co2_g_per_kwh=0.0,
            location_based_kg_co2=0.0,
            market_based_kg_co2=0.0,
            clean_share_pct=clean_pct,
        )

    # 22:00 UTC on the 6th is 00:00 on the 7th in Rome (CEST, UTC+2).
    records = [record(T0 - 2 * H, 3.0, 100.0), record(T0, 1.0, 0.0)]
    assert daily_clean_share_pct(records) == {
        date(2025, 4, 6): pytest.approx(100.0),
        date(2025, 4, 7): pytest.approx(0.0),
    }
    assert daily_clean_share_pct(records, "Europe/Rome") == {date(2025, 4, 7): pytest.approx(75.0)}
    with pytest.raises(ValueError, match="unknown time zone"):
        daily_clean_share_pct(records, "Mars/Olympus")


def test_settings_validation() -> None:
    with pytest.raises(ValidationError, match="more than one role"):
        CarbonSettings(zone=ZONE, meter_devices=["x"], solar_devices=["x"])
    with pytest.raises(SettingsError, match=r"sites\[s\]\.carbon\.zone"):
        validate_section(CarbonSettings, "sites[s].carbon", {})
    assert CarbonSettings(zone=ZONE).residual_mix_co2_g_per_kwh is None
    # SiteConfig has no carbon section yet: no work for the agent.
    assert carbon_settings(SiteConfig(id="s", market="IT-NORD")) is None


# --- certificates claimed from the same hourly flows ---------------------------------------


def test_worked_example_with_the_sites_own_certificates() -> None:
    """By hand, 1 kWh certificates, grid 200 g/kWh (40 % renewable), residual mix 400 g/kWh.

    10:00-10:30 the site imports 2 kW with no sun; 10:30-11:00 the PV makes 6 kW and the
    site exports 4 kW. Hour 10: import 1 kWh, export 2 kWh, solar 3 kWh, so solar to
    load 1, solar exported 2, grid to load 1, load 2 kWh. Three certificates are minted;
    the site claims its 2 kWh of consumption: 2 are burned, the first covering the solar
    it consumed, the second its 1 kWh of grid energy. Market-based: 0 kg; location-based
    1 kWh x 200 g = 0.2 kg; clean share (1 + 1 x 40 %) / 2 = 70 %.
    Hour 11: 2 kW from the grid all hour, no sun, no certificate of that hour: location
    2 x 200 g = 0.4 kg, market-based at the residual mix 2 x 400 g = 0.8 kg.
    """
    from processors.carbon import certify_with_ledger
    from processors.certificates import (
        CertificateLedger,
        CertificateSettings,
        CertificateStatus,
        balance,
    )

    book = CertificateLedger(SITE)
    events: list[Any] = []
    settings = cfg(residual_mix_co2_g_per_kwh=400.0)
    engine = CarbonEngine(
        SITE,
        settings,
        certify=certify_with_ledger(lambda: book, CertificateSettings(unit_kwh=1.0), SITE, events),
    )
    ten, half_past, eleven, noon = T0 + 10 * H, T0 + 10.5 * H, T0 + 11 * H, T0 + 12 * H
    for hour in (10, 11):
        engine.add_intensity(intensity(hour, 200.0, 40.0))
    readings: list[Reading] = []
    for ts, meter_kw, solar_kw in ((ten, 2.0, 0.0), (half_past, -4.0, 6.0), (eleven, 2.0, 0.0)):
        readings += [
            MeterReading(device="meter-1", ts=ts, power_kw=meter_kw),
            SolarReading(device="pv-1", ts=ts, power_kw=solar_kw),
        ]
    (first,) = engine.add_readings(readings)  # hour 10 is complete at 11:00
    (second,) = engine.add_readings(
        [
            MeterReading(device="meter-1", ts=noon, power_kw=0.0),
            SolarReading(device="pv-1", ts=noon, power_kw=0.0),
        ]
    )

    assert (first.grid_energy_kwh, first.solar_energy_kwh) == pytest.approx((1.0, 1.0))
    assert first.location_based_kg_co2 == pytest.approx(0.2)
    assert first.market_based_kg_co2 == pytest.approx(0.0)
    assert first.clean_share_pct == pytest.approx(70.0)
    assert second.location_based_kg_co2 == pytest.approx(0.4)
    assert second.market_based_kg_co2 == pytest.approx(0.8)
    actions = [(e.action.value, e.hour_start) for e in events]
    assert actions == [("MINT", ten)] * 3 + [("BURN", ten)] * 2
    statuses = [status for status, _ in book.statuses().values()]
    assert statuses.count(CertificateStatus.BURNED) == 2
    assert balance(book) == pytest.approx(0.001)


def test_an_hour_settled_before_a_restart_keeps_its_certificates() -> None:
    """The ledger was saved after hour 10 was settled, the carbon state was not: the
    restarted engine accounts hour 10 again; no certificate is minted or burned twice and
    the record is the same."""
    from processors.carbon import certify_with_ledger
    from processors.certificates import CertificateLedger, CertificateSettings

    def run(book: CertificateLedger, events: list[Any]) -> list[EmissionsRecord]:
        engine = CarbonEngine(
            SITE,
            cfg(),
            certify=certify_with_ledger(
                lambda: book, CertificateSettings(unit_kwh=1.0), SITE, events
            ),
        )
        engine.add_intensity(intensity(10, 300.0, 20.0))
        engine.add_readings(site_readings(T0 + 10 * H, 4.0, 3.0, 0.0))
        return engine.add_readings(site_readings(T0 + 11 * H, 0.0, 0.0, 0.0))

    book = CertificateLedger(SITE)
    first_events: list[Any] = []
    (record,) = run(book, first_events)
    again_events: list[Any] = []
    (again,) = run(CertificateLedger.from_json(book.to_json()), again_events)
    # 3 kWh of solar mint 3; the 7 kWh consumed (3 solar, 4 grid) burn all 3.
    assert [e.action.value for e in first_events] == ["MINT"] * 3 + ["BURN"] * 3
    assert again_events == []
    assert again == record


# --- start-up checks of the wiring ------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "value", "named"),
    [
        ("certificates", {"unit_kwh": 1.0}, "sites[plant].certificates needs sites[plant].carbon"),
        (
            "follow_sun",
            {"jobs": [{"device": "kiln", "power_kw": 12.0}]},
            "sites[plant].follow_sun needs sites[plant].carbon.zone",
        ),
    ],
)
def test_a_section_that_needs_the_carbon_zone_fails_at_start_up(
    tmp_path: Any, section: str, value: dict[str, Any], named: str
) -> None:
    from pipeline.app import create_app
    from pipeline.settings import load_settings

    settings = load_settings(
        None,
        broker="127.0.0.1:9",  # never contacted: building the app only validates
        data_dir=tmp_path,
        sites=[{"id": "plant", "market": "M", section: value}],
    )
    with pytest.raises(SettingsError, match=re.escape(named)):
        create_app(settings)
