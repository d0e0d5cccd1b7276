"""The solar efficiency detector on synthetic clear-sky days (and pvlib as the reference).

The synthetic days are a sine of irradiance between 06:00 and 18:00 UTC (peak 900 W/m2),
20 degC air, one reading every 5 minutes; the "true" array is the spec's PVWatts model
times a factor (a spec error, a fault, soiling) plus seeded 1 % meter noise. That is
enough for the edges; the realistic weather and its accuracy figures are in
pipeline.solar_eval.simulate / evaluation_run (one short run here checks it end to end).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import pytest

from pipeline.schemas import Alert, AlertStatus, Severity, SolarReading
from pipeline.settings import SettingsError, SiteConfig
from pipeline.solar_eval import evaluation_run
from processors import solar
from processors.alerting import incident_id
from processors.scoring import DetectedEvent, score
from processors.solar import (
    ALERT_TYPE,
    ArrayDetector,
    PvArraySettings,
    SiteSolar,
    SolarSettings,
    expected_ac_kw,
    expected_ac_kw_one,
)

T0 = datetime(2025, 6, 2, tzinfo=UTC)  # a Monday, midnight UTC
STEP = timedelta(minutes=5)
SITE = "s1"
ARRAY: dict[str, Any] = {
    "device": "pv-1",
    "kwp": 10.0,
    "tilt_deg": 30.0,
    "azimuth_deg": 180.0,
    "inverter_kw": 9.5,
}


def settings(**array: Any) -> SolarSettings:
    return SolarSettings.model_validate({"arrays": [{**ARRAY, **array}]})


def irradiance_at(ts: datetime) -> float:
    """A clear day: a sine from 06:00 to 18:00 UTC, 900 W/m2 at noon. [W/m2]"""
    hours = ts.hour + ts.minute / 60.0
    return max(0.0, 900.0 * math.sin(math.pi * (hours - 6.0) / 12.0)) if 6 <= hours <= 18 else 0.0


Factor = Callable[[datetime], float]


def readings(
    days: float,
    factor: Factor = lambda _: 1.0,
    *,
    start: datetime = T0,
    array: PvArraySettings | None = None,
    seed: int = 0,
    with_irradiance: Callable[[datetime], bool] = lambda _: True,
) -> Iterator[SolarReading]:
    """The array's readings: spec model x factor x (1 + 1 % noise)."""
    array = array or settings().arrays[0]
    rng = np.random.default_rng(seed)
    for k in range(int(days * 24 * 12)):
        ts = start + k * STEP
        g = irradiance_at(ts)
        power_kw = expected_ac_kw_one(array, g, 20.0) * factor(ts) * (1 + 0.01 * rng.normal())
        yield SolarReading(
            device=array.device,
            ts=ts,
            power_kw=max(0.0, power_kw),
            irradiance_w_m2=g if with_irradiance(ts) else None,
            temp_air_c=20.0,
        )


def run(detector: ArrayDetector, items: Iterator[SolarReading] | list[SolarReading]) -> list[Alert]:
    out: list[Alert] = []
    for reading in items:
        out += detector.observe(reading)
    return out


def detector(**array: Any) -> ArrayDetector:
    cfg = settings(**array)
    return ArrayDetector(SITE, cfg.arrays[0], cfg)


def fired(alerts: list[Alert]) -> list[Alert]:
    return [a for a in alerts if a.status == AlertStatus.FIRING]


def detected_at(alert: Alert) -> datetime:
    return datetime.fromisoformat(str(alert.details["detected_at"]))


def step_loss(at: datetime, loss: float, until: datetime | None = None) -> Factor:
    return lambda ts: 1.0 - loss if ts >= at and (until is None or ts < until) else 1.0


# --- the expected output ---------------------------------------------------------------


def test_the_per_reading_model_equals_pvlibs_chain() -> None:
    import pvlib

    for mount, params in solar.SAPM_PARAMS.items():
        assert pvlib.temperature.TEMPERATURE_MODEL_PARAMETERS["sapm"][mount] == dict(
            zip(("a", "b", "deltaT"), params, strict=True)
        )
    grid_g = np.array([0.0, 1.0, 50.0, 200.0, 600.0, 1000.0, 1300.0])
    for array in (
        settings().arrays[0],
        settings(inverter_kw=None, mount="close_mount_glass_glass").arrays[0],
        settings(temp_coeff_pct_per_c=-0.29, losses_pct=3.0, wind_speed_m_s=4.0).arrays[0],
    ):
        for temp_air in (-10.0, 25.0, 40.0):
            for temp_module in (None, 55.0):
                vector = expected_ac_kw(
                    array,
                    grid_g,
                    np.full(grid_g.size, temp_air),
                    None if temp_module is None else np.full(grid_g.size, temp_module),
                )
                one = [expected_ac_kw_one(array, g, temp_air, temp_module) for g in grid_g]
                assert one == pytest.approx(list(vector), rel=1e-9, abs=1e-12)
    # Clipping: far above the inverter's limit the output is exactly the AC limit.
    assert expected_ac_kw_one(settings().arrays[0], 1300.0, -10.0) == pytest.approx(9.5)


def test_missing_temperatures_fall_back_to_the_assumed_air_temperature() -> None:
    array = settings(default_temp_air_c=20.0).arrays[0]
    assert expected_ac_kw_one(array, 800.0, None) == expected_ac_kw_one(array, 800.0, 20.0)
    vector = expected_ac_kw(array, np.array([800.0, np.nan]), np.array([np.nan, 20.0]))
    assert vector[0] == pytest.approx(expected_ac_kw_one(array, 800.0, 20.0))
    assert math.isnan(vector[1])  # no irradiance, no expected output


# --- learning, edges ------------------------------------------------------------------


def test_night_and_zero_irradiance_are_not_judged() -> None:
    d = detector()
    night = [
        SolarReading(device="pv-1", ts=T0 + k * STEP, power_kw=0.0, irradiance_w_m2=0.0)
        for k in range(60)
    ]
    assert run(d, night) == []
    assert d.counters["low_light_readings"] == 60
    assert d.counters["usable_readings"] == 0


def test_a_spec_ten_percent_off_is_learned_and_never_alerts() -> None:
    d = detector()
    alerts = run(d, readings(10, lambda _: 0.9))
    assert alerts == []
    assert d.ref == pytest.approx(0.9, abs=0.01)
    assert d.efficiency_pct == pytest.approx(90.0, abs=2.0)


def test_no_alert_while_learning_even_for_a_dead_array() -> None:
    d = detector()
    # Producing nothing from the start: there is no normal to fall from.
    assert run(d, readings(4, lambda _: 0.0)) == []
    assert d.ref is None


def test_clipped_readings_are_excluded() -> None:
    # An inverter limit at 60 % of the array's peak: the middle of every day is clipped.
    d = detector(inverter_kw=5.0)
    true_array = settings(inverter_kw=5.0).arrays[0]
    alerts = run(d, readings(6, array=true_array))
    assert alerts == []
    assert d.counters["clipped_readings"] > 100
    assert d.ref == pytest.approx(1.0, abs=0.02)


def test_readings_without_irradiance_are_counted_and_never_alert() -> None:
    d = detector()
    alerts = run(
        d,
        readings(
            6,
            step_loss(T0 + timedelta(days=4), 0.5),
            with_irradiance=lambda ts: ts < T0 + timedelta(days=4),
        ),
    )
    # The loss happens while the sensor is out: nothing can be said, nothing is said.
    assert alerts == []
    assert d.counters["readings_without_irradiance"] == 2 * 24 * 12


def test_stale_and_out_of_order_readings_are_ignored() -> None:
    d = detector()
    items = list(readings(3))
    alerts = run(d, items)
    before = d.to_json()
    again = run(d, [items[-10], items[5], items[-1]])  # a replay and a late reading
    assert alerts == again == []
    assert d.counters["stale_readings"] == 3
    after = d.to_json()
    assert {**after, "counters": None} == {**before, "counters": None}


# --- detection ----------------------------------------------------------------------


def test_a_thirty_percent_sudden_loss_is_detected_within_fifteen_minutes() -> None:
    onset = T0 + timedelta(days=4, hours=10)
    d = detector()
    alerts = run(d, readings(5, step_loss(onset, 0.3)))
    [alert] = alerts  # fires once and stays open
    assert alert.alert_type == ALERT_TYPE and alert.severity == Severity.WARNING
    assert alert.status == AlertStatus.FIRING
    assert alert.start == onset
    assert alert.alert_id == incident_id(SITE, "pv-1", ALERT_TYPE, onset)
    assert timedelta(0) < detected_at(alert) - onset <= timedelta(minutes=15)
    assert alert.details["cause"] == "sudden"
    assert alert.details["level"] == "15min"
    assert alert.details["performance_pct"] == pytest.approx(70.0, abs=3.0)
    assert alert.details["efficiency_pct"] == pytest.approx(70.0, abs=3.0)
    assert alert.expected is not None and alert.observed is not None
    assert alert.observed == pytest.approx(0.7 * alert.expected, rel=0.04)
    assert float(alert.details["lost_kwh"]) > 0


def test_recovery_resolves_the_incident_with_the_same_id() -> None:
    onset = T0 + timedelta(days=4, hours=9)
    repaired = onset + timedelta(hours=2)
    d = detector()
    alerts = run(d, readings(6, step_loss(onset, 0.4, until=repaired)))
    assert [a.status for a in alerts] == [AlertStatus.FIRING, AlertStatus.RESOLVED]
    first, last = alerts
    assert first.alert_id == last.alert_id
    assert last.end is not None and repaired <= last.end <= repaired + timedelta(minutes=30)
    # Resolved within a few hours of daylight: the 2-hour window must be back for 2 hours.
    assert datetime.fromisoformat(str(last.details["resolved_at"])) < repaired + timedelta(hours=4)
    # About 0.4 x 2 h of a 10 kWp array at high sun were lost.
    assert float(last.details["lost_kwh"]) == pytest.approx(0.4 * 2 * 7.0, rel=0.35)
    assert d.incident is None


def test_soiling_is_detected_as_soiling_and_cleaning_resolves_it() -> None:
    start = T0 + timedelta(days=4)
    cleaned = start + timedelta(days=16)

    def soiling(ts: datetime) -> float:
        if start <= ts < cleaned:
            return 1.0 - 0.008 * (ts - start) / timedelta(days=1)
        return 1.0

    d = detector()
    alerts = run(d, readings(22, soiling))
    assert [a.status for a in alerts] == [AlertStatus.FIRING, AlertStatus.RESOLVED]
    alert = alerts[0]
    assert alert.details["cause"] == "soiling"
    # 0.8 %/day crosses the 5 % day threshold after ~6-7 days.
    assert start + timedelta(days=5) <= detected_at(alert) <= start + timedelta(days=10)
    assert start <= alert.start <= detected_at(alert)
    resolved_at = datetime.fromisoformat(str(alerts[1].details["resolved_at"]))
    assert cleaned <= resolved_at <= cleaned + timedelta(days=2)


def test_a_small_persistent_step_is_caught_by_the_day_scale() -> None:
    onset = T0 + timedelta(days=5)  # midnight: the first faulty day is whole
    d = detector()
    alerts = run(d, readings(9, step_loss(onset, 0.06)))
    [alert] = alerts
    assert alert.details["level"] == "day"
    assert alert.details["cause"] == "degradation"
    assert onset <= alert.start < onset + timedelta(days=1)
    assert detected_at(alert) <= onset + timedelta(days=2)


def test_a_three_percent_loss_is_within_noise_and_not_alerted() -> None:
    d = detector()
    assert run(d, readings(12, step_loss(T0 + timedelta(days=4), 0.03))) == []


# --- state ---------------------------------------------------------------------------


def test_state_round_trip_anywhere_gives_the_same_alerts() -> None:
    onset = T0 + timedelta(days=3, hours=11)
    items = list(readings(5, step_loss(onset, 0.35, until=onset + timedelta(hours=3))))
    cfg = settings()
    straight = run(ArrayDetector(SITE, cfg.arrays[0], cfg), items)
    assert len(straight) == 2
    for cut in (1, 500, len(items) - 300, len(items) - 1):
        first = ArrayDetector(SITE, cfg.arrays[0], cfg)
        out = run(first, items[:cut])
        # Through JSON text, as a Faust table stores it.
        saved = json.loads(json.dumps(first.to_json()))
        second = ArrayDetector.from_json(SITE, cfg.arrays[0], cfg, saved)
        out += run(second, items[cut:])
        assert out == straight
        assert second.to_json() == json.loads(json.dumps(second.to_json()))
    assert len(json.dumps(first.to_json())) < 8_000  # a small table value


def test_site_solar_sorts_a_shuffled_batch_and_ignores_unknown_devices() -> None:
    onset = T0 + timedelta(days=4, hours=10)
    items = list(readings(5, step_loss(onset, 0.3)))
    stranger = SolarReading(device="pv-9", ts=T0, power_kw=1.0, irradiance_w_m2=500.0)
    engine = SiteSolar(SITE, settings())
    states: dict[str, Any] = {}
    out: list[Alert] = []
    rng = np.random.default_rng(1)
    for i in range(0, len(items), 100):
        batch = [*items[i : i + 100], stranger]
        rng.shuffle(batch)
        new, alerts = engine.step(states, batch)
        assert set(new) == {"pv-1"}
        states.update(new)
        out += alerts
    assert [(a.status, a.start) for a in out] == [(AlertStatus.FIRING, onset)]
    assert engine.key("pv-1") == "s1/pv-1"


# --- the file path, the report and the evaluation helper -------------------------------------


def frame_of(items: list[SolarReading]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "time": [r.ts for r in items],
            "device": [r.device for r in items],
            "kind": ["solar"] * len(items),
            "power_kw": [r.power_kw for r in items],
            "irradiance_w_m2": [r.irradiance_w_m2 for r in items],
            "temp_air_c": [r.temp_air_c for r in items],
        }
    )


def test_the_file_path_equals_the_stream_and_the_report_gives_daily_efficiency() -> None:
    onset = T0 + timedelta(days=4, hours=10)
    items = list(readings(6, step_loss(onset, 0.3)))
    cfg = settings()
    stream = run(ArrayDetector(SITE, cfg.arrays[0], cfg), items)
    alerts, detectors = solar.detect_frame(frame_of(items), SITE, cfg)
    assert alerts == stream and len(alerts) == 1
    assert detectors["pv-1"].counters["usable_readings"] > 0

    report = solar.efficiency_report(frame_of(items), cfg)
    days = report.filter(pl.col("day").is_not_null())
    assert days["day"].to_list() == [(T0 + timedelta(days=k)).date() for k in range(6)]
    efficiency = days["efficiency_pct"].to_list()
    assert efficiency[:4] == pytest.approx([100.0] * 4, abs=1.0)
    assert efficiency[5] == pytest.approx(70.0, abs=1.5)
    overall = report.filter(pl.col("day").is_null()).row(0, named=True)
    assert overall["readings"] == len(items)
    assert overall["readings_without_irradiance"] == 0
    assert overall["energy_kwh"] == pytest.approx(sum(days["energy_kwh"].to_list()))


def test_evaluation_run_finds_sudden_faults_without_false_alarms() -> None:
    alerts, windows = evaluation_run(3, "sudden", 0.3, days=21)
    assert windows and all(w.label == ALERT_TYPE and w.size.startswith("sudden") for w in windows)
    fired = [
        DetectedEvent(
            a.device or "",
            a.alert_type,
            a.start,
            datetime.fromisoformat(str(a.details["detected_at"])),
        )
        for a in alerts
        if a.status is AlertStatus.FIRING
    ]
    result = score(fired, windows, labels=[ALERT_TYPE])[ALERT_TYPE]
    assert result.precision == 1.0
    assert result.recall >= 0.5
    assert result.median_delay_s is not None and result.median_delay_s <= 30 * 60
    clean, no_windows = evaluation_run(3, None, days=21)
    assert clean == [] and no_windows == []


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"arrays": [{**ARRAY, "kwp": -1}]}, r"sites\[turin-home\]\.solar\.arrays\[0\]\.kwp"),
        (
            {"arrays": [{**ARRAY, "mount": "roof"}]},
            r"sites\[turin-home\]\.solar\.arrays\[0\]\.mount",
        ),
        ({"arrays": [ARRAY], "min_irradiance_w_m2": 0}, r"solar\.min_irradiance_w_m2"),
        ({"arrays": []}, r"sites\[turin-home\]\.solar\.arrays"),
        ({"arrays": [ARRAY, ARRAY]}, r"duplicate array devices \['pv-1'\]"),
    ],
)
def test_settings_errors_name_the_setting(section: dict[str, Any], named: str) -> None:
    site = SiteConfig(id="turin-home", market="IT-NORD", solar=section)
    with pytest.raises(SettingsError, match=named):
        solar.solar_settings(site)


def test_a_site_without_a_solar_section_gets_no_detector() -> None:
    assert solar.solar_settings(SiteConfig(id="x", market="m")) is None
