"""The statistical detectors on their edges: clean data, each fault kind, warm-up, order."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest

from pipeline.schemas import Alert, AlertStatus
from pipeline.settings import SettingsError, SiteConfig
from processors.anomaly import (
    LOCAL_READINGS,
    SHIFT_READINGS,
    DetectionSettings,
    SignalDetector,
)
from processors.baselines import LocalClock
from processors.detection import SiteDetection, detection_settings
from processors.vampire import NEW_STANDBY_PERIODS, VampireDetector

START = datetime(2025, 3, 3, tzinfo=UTC)  # a Monday
STEP = timedelta(minutes=5)
PER_DAY = 288


def series(days: float, seed: int = 1, level_kw: float = 1.0) -> list[float]:
    """A load with a daily shape and 5 % noise, at 5-minute steps."""
    rng = np.random.default_rng(seed)
    n = int(days * PER_DAY)
    hours = np.arange(n) * 5 / 60
    shape = level_kw * (1.0 + 0.3 * np.sin(2 * math.pi * hours / 24))
    return list(shape * (1.0 + 0.05 * rng.standard_normal(n)))


def run(values: list[float], kind: str = "home", **settings: object) -> list[Alert]:
    detector = SignalDetector("s", "d", kind, DetectionSettings(**settings))
    out: list[Alert] = []
    for k, value in enumerate(values):
        out.extend(detector.observe(START + k * STEP, value))
    return out


def firing(alerts: list[Alert], label: str) -> list[Alert]:
    return [a for a in alerts if a.alert_type == label and a.status is AlertStatus.FIRING]


def test_clean_series_raises_nothing() -> None:
    assert run(series(6)) == []


def test_a_spike_is_raised_when_it_returns_with_its_start_and_end() -> None:
    values = series(5)
    at = 4 * PER_DAY + 100  # after the 1000 residuals the tails need
    values[at] += 10.0
    alerts = run(values)
    spikes = [a for a in alerts if a.alert_type == "spike"]
    assert [a.status for a in spikes] == [AlertStatus.FIRING, AlertStatus.RESOLVED]
    assert spikes[0].start == START + at * STEP
    assert spikes[0].details["detected_at"] == (START + (at + 1) * STEP).isoformat()
    assert spikes[1].end == START + (at + 1) * STEP
    assert spikes[0].observed == pytest.approx(values[at])
    assert spikes[0].alert_id == spikes[1].alert_id
    assert [a.alert_type for a in alerts] == ["spike", "spike"]


def test_no_alert_during_warm_up() -> None:
    values = series(2)
    values[50] += 10.0  # within the first 24 h
    values[60] = 0.0
    assert run(values) == []


def test_a_rise_that_stays_is_not_a_spike() -> None:
    values = series(5)
    start = 4 * PER_DAY
    for k in range(start, start + 24):
        values[k] += 10.0
    assert firing(run(values), "spike") == []


def test_a_stuck_value_starts_at_its_first_repeat_and_resolves_when_it_moves() -> None:
    values = series(4)
    at = 3 * PER_DAY
    for k in range(at + 1, at + 20):
        values[k] = values[at]
    alerts = [a for a in run(values) if a.alert_type == "stuck"]
    assert [a.status for a in alerts] == [AlertStatus.FIRING, AlertStatus.RESOLVED]
    assert alerts[0].start == START + (at + 1) * STEP
    assert alerts[1].end == START + (at + 20) * STEP


def test_zero_is_not_stuck_and_two_repeats_are_not_enough() -> None:
    values = series(4)
    at = 3 * PER_DAY
    values[at + 1] = values[at]  # one repeat: a quantised meter does that
    assert firing(run(values), "stuck") == []
    pv = [0.0] * PER_DAY * 2 + series(2)  # nights of zeros
    assert firing(run(pv, kind="solar"), "stuck") == []


def test_a_drop_to_zero_fires_at_once_and_resolves() -> None:
    values = series(5)
    at = 4 * PER_DAY + 30
    for k in range(at, at + 12):
        values[k] = 0.0
    alerts = [a for a in run(values) if a.alert_type == "drop"]
    assert [a.status for a in alerts] == [AlertStatus.FIRING, AlertStatus.RESOLVED]
    assert alerts[0].start == START + at * STEP
    assert alerts[0].details["detected_at"] == alerts[0].start.isoformat()
    assert alerts[1].end == START + (at + 12) * STEP


def test_a_level_shift_is_found_against_the_time_of_day_profile() -> None:
    values = series(6)
    at = 5 * PER_DAY + 100
    for k in range(at, at + 36):
        values[k] += 1.5
    alerts = [a for a in run(values) if a.alert_type == "level_shift"]
    assert [a.status for a in alerts] == [AlertStatus.FIRING, AlertStatus.RESOLVED]
    assert START + at * STEP <= alerts[0].start <= START + (at + 3) * STEP
    assert alerts[0].details["direction"] == "up"
    assert alerts[0].expected is not None and alerts[0].observed is not None
    assert alerts[0].observed - alerts[0].expected == pytest.approx(1.5, rel=0.2)


def test_a_new_evening_level_every_day_is_the_new_normal_after_two_days() -> None:
    values = series(14)
    # From day 7 on, every evening (18:00-22:00) draws 1.5 kW more: a season's heating.
    for day in range(7, 14):
        for k in range(day * PER_DAY + 18 * 12, day * PER_DAY + 22 * 12):
            values[k] += 1.5
    shift_days = sorted({a.start.date() for a in firing(run(values), "level_shift")})
    first = (START + timedelta(days=7)).date()
    # The first two evenings are a shift; once two of the last three were at the new
    # level it is what the device does then, weeks before the 28-day median moves.
    assert shift_days == [first, first + timedelta(days=1)]


def test_one_long_natural_repeat_does_not_raise_the_stuck_bar_for_good() -> None:
    values = series(12)
    for j in range(150):  # a quantised meter: pairs of equal readings, now and then
        k = 40 + 20 * j
        values[k + 1] = values[k]
    for k in range(101, 111):  # and once, in its first day, ten equal readings
        values[k] = values[100]
    later = 11 * PER_DAY
    for k in range(later + 1, later + 8):  # an 8-reading freeze is still one
        values[k] = values[later]
    stuck = firing(run(values), "stuck")
    assert [a.start for a in stuck] == [START + (later + 1) * STEP]


def test_pv_flat_at_its_peak_is_clipping_for_hours_but_stuck_after_that() -> None:
    day = [max(0.0, math.sin(math.pi * (k / PER_DAY * 24 - 6) / 12)) * 5.0 for k in range(PER_DAY)]
    values = [v * (1.0 + 0.01 * math.sin(k)) for k, v in enumerate(day * 5)]
    clipped = [min(v, 4.0) for v in values]  # an inverter limited to 4 kW, every noon
    assert firing(run(clipped, kind="solar"), "stuck") == []
    frozen = list(clipped)
    at = 4 * PER_DAY + 12 * 12  # noon of day 4: the value holds through the night
    for k in range(at, at + 12 * 12):
        frozen[k] = 4.0
    stuck = firing(run(frozen, kind="solar"), "stuck")
    assert len(stuck) == 1
    detected = datetime.fromisoformat(str(stuck[0].details["detected_at"]))
    assert detected >= START + at * STEP + timedelta(hours=8)


def test_readings_flickering_about_the_floor_are_one_drop() -> None:
    values = series(5)
    at = 4 * PER_DAY
    # Six hours of an empty home: near zero, with a reading back up every 20 minutes.
    for k in range(at, at + 73):  # (at + 72 is a zero)
        values[k] = 1.0 if k % 4 == 3 else 0.0
    drops = [a for a in run(values) if a.alert_type == "drop"]
    assert [a.status for a in drops] == [AlertStatus.FIRING, AlertStatus.RESOLVED]
    assert drops[0].start == START + at * STEP
    # It ends where the readings came back for good, not an hour later.
    assert drops[1].end == START + (at + 73) * STEP


def test_rare_spikes_leave_the_line_where_it_is_and_frequent_ones_move_it() -> None:
    # Half-hourly readings: 2,000 residuals are six weeks, so six faults four days
    # apart all sit in the sample at once. Each is found, and the line stays put.
    step, per_day = timedelta(minutes=30), 48
    rng = np.random.default_rng(1)
    hours = np.arange(44 * per_day) * 0.5
    values = list(
        (1.0 + 0.3 * np.sin(2 * math.pi * hours / 24))
        * (1 + 0.05 * rng.standard_normal(len(hours)))
    )
    detector = SignalDetector("s", "d", "home")
    alerts: list[Alert] = []
    line_kw = 0.0
    for k, value in enumerate(values):
        if k == 22 * per_day:  # after the 1,000 residuals the tails need
            line_kw = detector.residual_bounds()[1]
        if k >= 22 * per_day and (k - 22 * per_day) % (4 * per_day) == 20:
            value += 1.5 * line_kw
        alerts.extend(detector.observe(START + k * step, value))
    assert len(firing(alerts, "spike")) == 6
    assert detector.residual_bounds()[1] < 1.15 * line_kw

    frequent = series(9)
    at = 5 * PER_DAY
    for k in range(at, len(frequent), 24):  # every two hours, for four days
        frequent[k] += 1.0
    spikes = firing(run(frequent), "spike")
    first_day = [a for a in spikes if a.start < START + timedelta(days=6)]
    last_day = [a for a in spikes if a.start >= START + timedelta(days=8)]
    assert len(first_day) >= 3 and last_day == []  # what it does every day is its normal


def test_late_and_duplicate_readings_are_ignored() -> None:
    detector = SignalDetector("s", "d", "home")
    assert detector.observe(START, 1.0) == []
    assert detector.observe(START, 50.0) == []
    assert detector.observe(START - STEP, 50.0) == []
    assert detector.last_s == START.timestamp()
    assert list(detector.recent) == [1.0]


def test_solar_gets_no_profile_rules() -> None:
    values = series(5)
    at = 4 * PER_DAY
    for k in range(at, at + 36):
        values[k] = 0.1 * values[k]  # a cloudy afternoon
    alerts = run(values, kind="solar")
    assert firing(alerts, "drop") == [] and firing(alerts, "level_shift") == []


def test_high_consumption_over_an_hour() -> None:
    values = series(6)
    at = 5 * PER_DAY + 100
    for k in range(at, at + 24):
        values[k] *= 4.0
    alerts = firing(run(values), "high_consumption")
    assert len(alerts) == 1
    assert alerts[0].start >= START + at * STEP


def test_ids_are_deterministic() -> None:
    values = series(5)
    values[4 * PER_DAY + 10] += 10.0
    assert [a.alert_id for a in run(values)] == [a.alert_id for a in run(values)]


def test_site_detection_watches_only_the_configured_kinds() -> None:
    detection = SiteDetection("s", DetectionSettings(kinds=["solar"]))
    for k, value in enumerate(series(3)):
        detection.observe("m", "meter", START + k * STEP, value)
    assert detection.signals == {} and detection.vampires == {}


def test_bad_settings_name_the_setting() -> None:
    site = SiteConfig(
        id="home", market="M", detection={"timezone": "Mars/Olympus", "tail_factor": 0}
    )
    with pytest.raises(SettingsError) as error:
        detection_settings(site)
    assert "sites[home].detection.timezone" in str(error.value)
    assert "sites[home].detection.tail_factor" in str(error.value)


def test_local_clock_follows_daylight_saving_time() -> None:
    clock = LocalClock("Europe/Rome")
    before = datetime(2025, 3, 30, 0, 30, tzinfo=UTC).timestamp()  # 01:30 CET
    after = datetime(2025, 3, 30, 1, 30, tzinfo=UTC).timestamp()  # 03:30 CEST
    assert clock.hour(before) == 1 and clock.hour(after) == 3
    assert clock.minute_of_day(after + 600) == pytest.approx(3 * 60 + 40)
    assert clock.day(after) == date(2025, 3, 30) and clock.weekday(after) == 6


# --- vampire loads ---------------------------------------------------------------


def nights(days: int, extra_kw: dict[int, float], seed: int = 3) -> list[tuple[datetime, float]]:
    """A home at 0.2 kW standby (5 % noise) at night and 1 kW by day; ``extra_kw`` per day."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(days * PER_DAY):
        at = START + k * STEP
        base_kw = 0.2 if at.hour < 6 else 1.0
        value = base_kw * (1 + 0.05 * rng.standard_normal()) + extra_kw.get(k // PER_DAY, 0.0)
        out.append((at, value))
    return out


def run_vampire(readings: list[tuple[datetime, float]], **settings: object) -> list[Alert]:
    detector = VampireDetector("s", "d", "home", DetectionSettings(**settings))
    out: list[Alert] = []
    for at, value in readings:
        out.extend(detector.observe(at, value))
    return out


def test_no_vampire_on_clean_nights() -> None:
    assert run_vampire(nights(10, {})) == []


def test_a_vampire_load_is_found_in_idle_hours_with_its_cost() -> None:
    alerts = run_vampire(nights(8, {6: 0.3}), price_per_kwh=0.5)
    vampires = [a for a in alerts if a.alert_type == "vampire"]
    assert [a.status for a in vampires] == [AlertStatus.FIRING, AlertStatus.RESOLVED]
    fired, ended = vampires
    day6 = START + timedelta(days=6)
    assert day6 + timedelta(hours=1) <= fired.start < day6 + timedelta(hours=2)
    assert fired.expected == pytest.approx(0.2, rel=0.1)
    assert fired.details["excess_kw"] == pytest.approx(0.3, rel=0.2)
    # Resolved when the idle window ends (05:00): about 0.3 kW over most of 4 hours.
    assert ended.end == day6 + timedelta(hours=5)
    assert 0.8 < float(ended.details["wasted_kwh"]) < 1.3
    assert ended.details["wasted_cost"] == pytest.approx(0.5 * float(ended.details["wasted_kwh"]))


def test_a_vampire_night_does_not_teach_the_baseline_until_a_week_makes_it_the_standby() -> None:
    load_nights = range(5, 20)
    alerts = run_vampire(nights(20, {d: 0.3 for d in load_nights}))
    firing_days = sorted({a.start.date() for a in alerts if a.status is AlertStatus.FIRING})
    # Every night of the load for a week, not just the first few...
    first = (START + timedelta(days=5)).date()
    assert firing_days == [first + timedelta(days=k) for k in range(NEW_STANDBY_PERIODS)]
    # ...then it is the standby: the baseline learns it again, and no night alerts.


def test_idle_windows_over_midnight_and_idle_days() -> None:
    settings = DetectionSettings(
        idle=[{"start": "22:00", "end": "06:00", "days": ["fri"]}],
        idle_days=["sun"],
        holidays=[date(2025, 3, 5)],
    )
    detector = VampireDetector("s", "d", "home", settings)
    friday_night = datetime(2025, 3, 7, 23, tzinfo=UTC)
    saturday_early = datetime(2025, 3, 8, 3, tzinfo=UTC)
    saturday_night = datetime(2025, 3, 8, 23, tzinfo=UTC)
    sunday_noon = datetime(2025, 3, 9, 12, tzinfo=UTC)
    holiday_noon = datetime(2025, 3, 5, 12, tzinfo=UTC)
    assert detector.idle_period(friday_night.timestamp()) is not None
    assert detector.idle_period(saturday_early.timestamp()) is not None
    assert detector.idle_period(saturday_night.timestamp()) is None
    assert detector.idle_period(sunday_noon.timestamp()) is not None
    assert detector.idle_period(holiday_noon.timestamp()) is not None


def test_a_level_shift_is_found_at_quarter_hour_steps() -> None:
    """At 15-minute steps half an hour holds two readings: the window takes four."""
    rng = np.random.default_rng(2)
    step = timedelta(minutes=15)
    n = 8 * 96
    hours = np.arange(n) / 4
    values = list(
        (1.0 + 0.3 * np.sin(2 * math.pi * hours / 24)) * (1 + 0.05 * rng.standard_normal(n))
    )
    at = 7 * 96 + 20
    for k in range(at, at + 16):
        values[k] += 1.5
    detector = SignalDetector("s", "d", "home")
    alerts: list[Alert] = []
    for k, value in enumerate(values):
        alerts.extend(detector.observe(START + k * step, value))
    shifts = firing(alerts, "level_shift")
    assert len(shifts) == 1
    assert START + at * step <= shifts[0].start
    detected_at = datetime.fromisoformat(str(shifts[0].details["detected_at"]))
    assert START + (at + 2) * step <= detected_at <= START + (at + 3) * step


def test_a_spike_on_a_raised_level_is_still_a_spike() -> None:
    """A level that moved up (hours of extra load) is learned; a spike on top of it counts."""
    values = series(6)
    shift_at = 5 * PER_DAY
    for k in range(shift_at, shift_at + 60):
        values[k] += 2.0
    values[shift_at + 40] += 12.0
    spikes = firing(run(values), "spike")
    assert [a.start for a in spikes] == [START + (shift_at + 40) * STEP]


def test_short_histories_keep_their_length_also_from_a_longer_checkpoint() -> None:
    settings = DetectionSettings(profile_days=2, min_history_days=1)
    detector = SignalDetector("s", "d", "home", settings)
    for k, value in enumerate(series(7)):  # 5 weekdays: more than 2 per weekday slot
        detector.observe(START + k * STEP, value)
    state = json.loads(json.dumps(detector.to_state()))
    assert len(state["recent"]) == LOCAL_READINGS and len(state["window"]) == SHIFT_READINGS
    assert max(len(days) for _, _, days in state["profile"]) == 2
    # A checkpoint with more values than fit keeps the newest, as a bounded deque did.
    state["recent"] = [float(n) for n in range(3 * LOCAL_READINGS)]
    restored = SignalDetector("s", "d", "home")
    restored.restore(state)
    assert restored.to_state()["recent"] == state["recent"][-LOCAL_READINGS:]


def test_a_checkpoint_carries_what_was_learned() -> None:
    """Half the readings, a JSON round trip into a new detector, the other half: the same
    incidents as without the break (values may differ in the last digits: a sample's
    quantiles are refreshed at the restore)."""
    values = series(7)
    values[5 * PER_DAY + 10] += 10.0
    for k in range(6 * PER_DAY, 6 * PER_DAY + 12):
        values[k] = 0.0
    whole = SiteDetection("s")
    broken = SiteDetection("s")
    half = 5 * PER_DAY
    expected: list[Alert] = []
    got: list[Alert] = []
    for k, value in enumerate(values[:half]):
        expected += whole.observe("d", "home", START + k * STEP, value)
        got += broken.observe("d", "home", START + k * STEP, value)
    restored = SiteDetection("s")
    restored.restore("d", json.loads(json.dumps(broken.to_state("d"))))
    for k, value in enumerate(values[half:], start=half):
        expected += whole.observe("d", "home", START + k * STEP, value)
        got += restored.observe("d", "home", START + k * STEP, value)
    assert {"spike", "drop"} <= {a.alert_type for a in expected}
    assert [(a.alert_id, a.status) for a in got] == [(a.alert_id, a.status) for a in expected]
