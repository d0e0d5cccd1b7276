"""Simulator profiles (household load, PV, EV sessions), the fleet's readings, and
the fusion reactor's scenarios: pure, seeded functions, no broker."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
from pydantic import ValidationError

from ingest.simulators.fusion import Scenario, fusion_series, fusion_source, safety_violations
from ingest.simulators.mqtt_publisher import FleetConfig, HomeFleet, PublisherConfig
from ingest.simulators.profiles import (
    HOME_MAX_KW,
    EvConfig,
    EvSession,
    PvArray,
    ev_session,
    ev_state,
    household_base_kw,
    household_load_kw,
    pv_power_kw,
    session_state,
)
from pipeline.schemas import READING_ADAPTER

SUMMER_NOON = datetime(2026, 6, 21, 17, tzinfo=UTC)  # about solar noon at Greensboro (79.9 W)


def minutes(start: datetime, count: int, step_min: int = 1) -> list[datetime]:
    return [start + timedelta(minutes=step_min * m) for m in range(count)]


# --- household load -----------------------------------------------------------------------


def test_household_load_is_deterministic_per_seed_and_device() -> None:
    at = datetime(2026, 3, 2, 19, 7, tzinfo=UTC)
    assert household_load_kw("h1", at, seed=1) == household_load_kw("h1", at, seed=1)
    series = [household_load_kw("h1", t, seed=1) for t in minutes(at, 30)]
    assert series != [household_load_kw("h1", t, seed=2) for t in minutes(at, 30)]
    assert series != [household_load_kw("h2", t, seed=1) for t in minutes(at, 30)]


def test_a_year_of_household_load_sums_to_its_annual_energy() -> None:
    # Every 37 minutes over a year: 14,000 samples of the minute noise and appliances.
    times = minutes(datetime(2026, 1, 1, tzinfo=UTC), 365 * 24 * 60 // 37, 37)
    values = np.array([household_load_kw("h1", t, annual_kwh=4_000.0) for t in times])
    assert values.mean() * 8760 == pytest.approx(4_000.0, rel=0.03)
    assert values.min() >= 0.0 and values.max() <= HOME_MAX_KW


def test_household_profile_has_an_evening_peak_above_the_night() -> None:
    night = household_base_kw(datetime(2026, 3, 4, 2, tzinfo=UTC), 3_500.0)
    evening = household_base_kw(datetime(2026, 3, 4, 18, tzinfo=UTC), 3_500.0)
    assert evening > 2 * night > 0


def test_household_load_edges() -> None:
    assert household_load_kw("h1", SUMMER_NOON, annual_kwh=0.0) == 0.0
    with pytest.raises(ValueError, match="naive"):
        household_load_kw("h1", datetime(2026, 1, 1))  # noqa: DTZ001 - the case under test
    with pytest.raises(ValueError, match="negative"):
        household_base_kw(SUMMER_NOON, -1.0)
    # DST change in Europe/Berlin (2026-03-29 01:00 UTC) and New Year's Eve in local time.
    around_dst = minutes(datetime(2026, 3, 29, 0, 30, tzinfo=UTC), 60)
    for at in (*around_dst, datetime(2026, 12, 31, 23, 30, tzinfo=UTC)):
        assert 0.0 <= household_load_kw("h1", at) <= HOME_MAX_KW


# --- PV -----------------------------------------------------------------------------------


def test_pv_is_zero_at_night_and_within_the_inverter_limit_by_day() -> None:
    array = PvArray(kwp=5.0, inverter_kw=4.6)
    assert pv_power_kw(datetime(2026, 6, 21, 6, tzinfo=UTC), array) == 0.0  # 02:00 local
    day = [pv_power_kw(t, array) for t in minutes(datetime(2026, 6, 21, 10, tzinfo=UTC), 60, 10)]
    assert max(day) > 1.0
    assert all(0.0 <= p <= 4.6 for p in day)


def test_pv_yields_more_in_june_than_in_december() -> None:
    def daily_kwh(day: datetime) -> float:
        return sum(pv_power_kw(t) for t in minutes(day, 24 * 4, 15)) / 4

    june = sum(daily_kwh(datetime(2026, 6, d, tzinfo=UTC)) for d in range(1, 11))
    december = sum(daily_kwh(datetime(2026, 12, d, tzinfo=UTC)) for d in range(1, 11))
    assert june > 1.3 * december > 0


# --- EV sessions --------------------------------------------------------------------------


def session(**overrides: object) -> EvSession:
    values: dict[str, object] = {
        "arrival": datetime(2026, 5, 4, 17, tzinfo=UTC),
        "departure": datetime(2026, 5, 5, 6, tzinfo=UTC),
        "arrival_soc_pct": 30.0,
        "target_soc_pct": 80.0,
        "charger_kw": 11.0,
        "capacity_kwh": 55.0,
        "charge_efficiency": 1.0,
    }
    return EvSession(**{**values, **overrides})  # type: ignore[arg-type]


def test_a_session_charges_at_the_limit_until_the_target_then_idles() -> None:
    s = session()
    # 50 % of 55 kWh = 27.5 kWh at 11 kW: 2.5 h.
    assert s.charged_at == s.arrival + timedelta(hours=2.5)
    before = session_state(s, s.arrival - timedelta(minutes=1))
    assert (before.plugged_in, before.power_kw) == (False, 0.0)
    hour_in = session_state(s, s.arrival + timedelta(hours=1))
    assert hour_in.plugged_in and hour_in.power_kw == 11.0
    assert hour_in.soc_pct == pytest.approx(30.0 + 11.0 / 55.0 * 100)
    full = session_state(s, s.arrival + timedelta(hours=3))
    assert (full.power_kw, full.soc_pct, full.plugged_in) == (0.0, 80.0, True)
    assert full.energy_kwh == pytest.approx(27.5)
    gone = session_state(s, s.departure)
    assert not gone.plugged_in and gone.power_kw == 0.0


def test_a_short_stay_leaves_below_target_and_a_full_car_draws_nothing() -> None:
    short = session(departure=datetime(2026, 5, 4, 18, tzinfo=UTC))
    left = session_state(short, short.departure)
    assert left.soc_pct == pytest.approx(50.0) and not left.plugged_in
    full = session(arrival_soc_pct=90.0)
    state = session_state(full, full.arrival + timedelta(minutes=5))
    assert (state.power_kw, state.soc_pct, state.plugged_in) == (0.0, 90.0, True)


def test_daily_sessions_arrive_in_the_evening_and_leave_next_morning() -> None:
    config = EvConfig()
    for day in range(1, 29):
        s = ev_session("ev-1", date(2026, 2, day), seed=3, config=config)
        assert 14 <= s.arrival.hour <= 22  # 15:00-23:00 local (UTC+1)
        assert timedelta(hours=6) < s.departure - s.arrival < timedelta(hours=19)
        assert 15.0 <= s.arrival_soc_pct <= 60.0


def test_ev_state_over_a_week_is_plausible_and_plugs_in_every_night() -> None:
    states = [
        ev_state("ev-1", t, seed=7)
        for t in minutes(datetime(2026, 3, 23, tzinfo=UTC), 7 * 24 * 6, 10)  # DST on the 29th
    ]
    assert all(0.0 <= s.soc_pct <= 100.0 for s in states)
    assert all(s.power_kw in (0.0, 11.0) for s in states)
    assert all(s.plugged_in for s in states if s.power_kw > 0)
    nights = [states[i * 144 + 22 * 6] for i in range(7)]  # 22:00 UTC each day
    assert all(s.plugged_in for s in nights)
    assert ev_state("ev-1", SUMMER_NOON, seed=7) == ev_state("ev-1", SUMMER_NOON, seed=7)


# --- the fleet and its settings -----------------------------------------------------------


def test_fleet_readings_validate_as_pipeline_readings() -> None:
    fleet = HomeFleet(FleetConfig(homes=2, evs=2, pv_kwp=4.0), seed=1)
    readings = fleet.readings_at(SUMMER_NOON)
    assert [(kind, device) for kind, device, _ in readings] == [
        ("home", "home-1"),
        ("solar", "pv-1"),
        ("home", "home-2"),
        ("solar", "pv-2"),
        ("ev", "ev-1"),
        ("ev", "ev-2"),
    ]
    for kind, device, fields in readings:
        READING_ADAPTER.validate_python(
            {"kind": kind, "device": device, "ts": SUMMER_NOON, **fields}
        )


def test_a_fleet_without_pv_publishes_no_solar() -> None:
    fleet = HomeFleet(FleetConfig(homes=1, evs=0, pv_kwp=0.0))
    assert [kind for kind, _, _ in fleet.readings_at(SUMMER_NOON)] == ["home"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"homes": 0, "evs": 0}, "nothing to simulate"),
        ({"homes": -1}, "greater than or equal"),
    ],
)
def test_bad_fleet_settings(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FleetConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://x"}, "mqtt://"),
        ({"url": "mqtt://:1883"}, "no host"),
        ({"topic": "sites/{site}/{device}"}, "{kind}"),
        ({"speed": 0}, "greater than 0"),
        ({"start": datetime(2026, 1, 1)}, "timezone"),  # noqa: DTZ001 - the case under test
    ],
)
def test_bad_publisher_settings_fail_without_network(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        PublisherConfig(**kwargs)


# --- fusion reactor -----------------------------------------------------------------------

SHOT_START = datetime(2026, 1, 15, 9, tzinfo=UTC)


@pytest.mark.parametrize("seed", range(20))
def test_a_nominal_shot_stays_inside_the_safe_bands(seed: int) -> None:
    series = fusion_series("nominal", SHOT_START, duration_s=600, step_s=1.0, seed=seed)
    assert series.fault_onset is None and len(series.readings) == 600
    assert [r for r in series.readings if safety_violations(r)] == []


def test_a_nominal_shot_ramps_up_holds_a_flat_top_and_ramps_down() -> None:
    readings = fusion_series("nominal", SHOT_START, duration_s=600, step_s=1.0).readings
    first, flat, last = readings[0], readings[300], readings[-1]
    assert first.plasma_temp_kev == pytest.approx(0.5) and first.magnetic_field_t == 0.0
    assert flat.plasma_temp_kev == pytest.approx(15.0, abs=1.5)
    assert flat.magnetic_field_t == pytest.approx(5.3, abs=0.05)
    assert 0.4 < flat.q_factor < 1.0 and flat.confinement_stability > 0.85
    assert last.q_factor < 0.01 and last.magnetic_field_t is not None
    assert last.magnetic_field_t < 0.1
    # The field is up before the plasma is hot, and the plasma is cold before it ramps down.
    for r in readings:
        if r.plasma_temp_kev > 2.0:
            assert r.magnetic_field_t is not None and r.magnetic_field_t > 5.0


def test_a_shot_is_deterministic_per_seed() -> None:
    a = fusion_series("quench", SHOT_START, seed=4)
    assert a == fusion_series("quench", SHOT_START, seed=4)
    assert a.readings != fusion_series("quench", SHOT_START, seed=5).readings


@pytest.mark.parametrize(
    ("scenario", "violation", "within_s"),
    [
        (Scenario.QUENCH, "field_low_with_plasma", 2.0),
        (Scenario.DISRUPTION, "confinement_low", 2.0),
        (Scenario.RUNAWAY, "q_high", 15.0),
        (Scenario.RUNAWAY, "plasma_temp_high", 15.0),
        (Scenario.RUNAWAY, "confinement_low", 25.0),
    ],
)
@pytest.mark.parametrize("seed", range(5))
def test_each_fault_crosses_the_bands_after_its_onset_and_not_before(
    scenario: Scenario, violation: str, within_s: float, seed: int
) -> None:
    series = fusion_series(scenario, SHOT_START, duration_s=600, step_s=1.0, seed=seed)
    onset = series.fault_onset
    assert onset is not None
    # Within flat-top (35-60 % of the shot).
    assert SHOT_START + timedelta(seconds=210) <= onset <= SHOT_START + timedelta(seconds=360)
    before = [r for r in series.readings if r.ts < onset]
    assert [r for r in before if safety_violations(r)] == []
    crossed = [r.ts for r in series.readings if violation in safety_violations(r)]
    assert crossed and onset < crossed[0] <= onset + timedelta(seconds=within_s)


def test_a_quench_dumps_the_field_and_a_disruption_crashes_the_temperature() -> None:
    quench = fusion_series("quench", SHOT_START, seed=1)
    assert quench.fault_onset is not None
    after = [r for r in quench.readings if r.ts >= quench.fault_onset + timedelta(seconds=10)]
    assert all(r.magnetic_field_t is not None and r.magnetic_field_t < 0.05 for r in after)
    disruption = fusion_series("disruption", SHOT_START, seed=1)
    assert disruption.fault_onset is not None
    later = [
        r for r in disruption.readings if r.ts >= disruption.fault_onset + timedelta(seconds=5)
    ]
    assert all(r.plasma_temp_kev < 0.6 and r.q_factor < 0.01 for r in later)
    # The field is not what failed in a disruption.
    assert all(r.magnetic_field_t is not None and r.magnetic_field_t > 5.0 for r in later[:10])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scenario": "meltdown"}, "meltdown"),
        ({"duration_s": 30.0}, "at least 60"),
        ({"step_s": 0.0}, "step_s"),
        ({"step_s": 100.0}, "step_s"),
        ({"start": datetime(2026, 1, 1)}, "timezone"),  # noqa: DTZ001 - the case under test
    ],
)
def test_bad_fusion_arguments(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"scenario": "nominal", "start": SHOT_START, **kwargs}
    with pytest.raises(ValueError, match=message):
        fusion_series(**arguments)  # type: ignore[arg-type]


def test_the_fusion_source_gives_the_reading_of_each_instant() -> None:
    series = fusion_series("nominal", SHOT_START, duration_s=120, step_s=2.0)
    source = fusion_source(series)
    ((kind, device, fields),) = source(SHOT_START + timedelta(seconds=61))
    reading = series.readings[30]
    assert (kind, device) == ("fusion", "tokamak-1")
    assert fields["plasma_temp_kev"] == reading.plasma_temp_kev
    assert set(fields) == {
        "plasma_temp_kev",
        "confinement_stability",
        "q_factor",
        "magnetic_field_t",
    }
    assert source(SHOT_START + timedelta(seconds=120)) == []
    assert source(SHOT_START - timedelta(seconds=1)) == []
