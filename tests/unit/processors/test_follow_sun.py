"""Follow-the-sun: windows of clean, cheap energy start flexible jobs and their end stops them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pipeline.schemas import Alert, AlertStatus, Command
from pipeline.settings import SettingsError, SiteConfig
from processors.follow_sun import (
    FollowSun,
    FollowSunSettings,
    FollowSunState,
    GridInterval,
    follow_sun_settings,
)

T0 = datetime(2025, 6, 2, tzinfo=UTC)
HOUR = timedelta(hours=1)
SETTINGS = FollowSunSettings.model_validate(
    {
        "jobs": [
            {"device": "shredder", "power_kw": 15.0, "min_run_min": 90},
            {"device": "printers", "power_kw": 3.0, "min_run_min": 30},
        ],
        "min_renewable_share_pct": 60.0,
        "max_co2_g_per_kwh": 150.0,
        "max_price_per_kwh": 0.08,
        "hysteresis_pct": 10.0,
    }
)


def interval(
    hour: int, share: float | None, price: float, co2: float | None = None
) -> GridInterval:
    start = T0 + hour * HOUR
    return GridInterval(start, start + HOUR, co2, share, price)


def run(
    intervals: list[GridInterval], settings: FollowSunSettings = SETTINGS
) -> list[Alert | Command]:
    engine, state = FollowSun("plant", settings), FollowSunState()
    out: list[Alert | Command] = []
    for item in intervals:
        out += engine.on_interval(state, item)
    return out


def commands(out: list[Alert | Command]) -> list[tuple[str, str, datetime]]:
    return [(c.device, c.action, c.issued_at) for c in out if isinstance(c, Command)]


def test_a_clean_cheap_window_starts_the_jobs_and_its_end_stops_them() -> None:
    out = run(
        [
            interval(0, 40, 0.12),
            interval(1, 75, 0.05),
            interval(2, 80, 0.04),
            interval(3, 30, 0.15),
            interval(4, 30, 0.15),
        ]
    )
    alerts = [a for a in out if isinstance(a, Alert)]
    assert [(a.status, a.start, a.end) for a in alerts] == [
        (AlertStatus.FIRING, T0 + HOUR, None),
        (AlertStatus.RESOLVED, T0 + HOUR, T0 + 3 * HOUR),
    ]
    assert alerts[0].alert_id == alerts[1].alert_id
    assert commands(out) == [
        ("shredder", "start_job", T0 + HOUR),
        ("printers", "start_job", T0 + HOUR),
        ("shredder", "stop_job", T0 + 3 * HOUR),
        ("printers", "stop_job", T0 + 3 * HOUR),
    ]
    starts = [c for c in out if isinstance(c, Command) and c.action == "start_job"]
    assert all(c.dry_run and c.source_id == alerts[0].alert_id for c in starts)
    assert {c.setpoint_kw for c in starts} == {15.0, 3.0}


def test_clean_but_dear_or_cheap_but_dirty_starts_nothing() -> None:
    assert run([interval(0, 90, 0.20), interval(1, 20, 0.01, co2=400)]) == []


def test_low_intensity_counts_as_clean_without_a_renewable_share() -> None:
    out = run([interval(0, None, 0.05, co2=120)])
    assert [c[1] for c in commands(out)] == ["start_job", "start_job"]


def test_hysteresis_keeps_a_window_open_near_its_lines() -> None:
    # 55 % is under the 60 % entry but within the 10-point margin; 0.085 within 10 % of 0.08.
    out = run([interval(0, 65, 0.07), interval(1, 55, 0.085), interval(2, 49, 0.07)])
    fired = [a for a in out if isinstance(a, Alert)]
    assert [a.status for a in fired] == [AlertStatus.FIRING, AlertStatus.RESOLVED]
    assert fired[1].end == T0 + 2 * HOUR
    # Entering needs the real line: 55 % alone does not open a window.
    assert run([interval(0, 55, 0.05)]) == []


def test_a_job_runs_at_least_its_minimum_before_it_is_stopped() -> None:
    short = [interval(0, 70, 0.05), interval(1, 20, 0.20)]  # a one-hour window
    out = run([*short, interval(2, 20, 0.20)])
    assert commands(out) == [
        ("shredder", "start_job", T0),
        ("printers", "start_job", T0),
        ("printers", "stop_job", T0 + HOUR),  # 30 min minimum: done
        ("shredder", "stop_job", T0 + 2 * HOUR),  # 90 min: stopped at the next interval
    ]


def test_a_replayed_interval_changes_nothing_and_ids_are_deterministic() -> None:
    items = [interval(0, 70, 0.05), interval(1, 70, 0.05)]
    engine, state = FollowSun("plant", SETTINGS), FollowSunState()
    first = [x for item in items for x in engine.on_interval(state, item)]
    assert engine.on_interval(state, items[0]) == []  # replayed: already decided
    assert [getattr(x, "alert_id", None) or x.command_id for x in first] == [  # type: ignore[union-attr]
        getattr(x, "alert_id", None) or x.command_id
        for x in run(items)  # type: ignore[union-attr]
    ]


def test_commands_off_sends_only_the_event() -> None:
    settings = SETTINGS.model_copy(update={"commands": "off"})
    out = run([interval(0, 70, 0.05)], settings)
    assert [type(x) for x in out] == [Alert]


def test_settings_errors_name_the_setting() -> None:
    site = SiteConfig(
        id="plant",
        market="M",
        follow_sun={"jobs": [{"device": "a", "power_kw": -1}], "max_co2_g_per_kwh": -5},
    )
    with pytest.raises(SettingsError) as error:
        follow_sun_settings(site)
    assert "sites[plant].follow_sun.jobs[0].power_kw" in str(error.value)
    assert "sites[plant].follow_sun.max_co2_g_per_kwh" in str(error.value)
    assert follow_sun_settings(SiteConfig(id="x", market="M")) is None
