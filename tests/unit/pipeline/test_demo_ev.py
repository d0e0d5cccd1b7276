"""The demo's EV stage, without servers: who charges where, its configs, its summary."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.control import Outcome, audit_record
from pipeline.demo_ev import (
    Charger,
    MeterReport,
    SimulatedClock,
    chargers_of,
    configs,
    stage_start,
    summarize_charging,
)
from pipeline.schemas import ChargingSessionEvent, Command, SessionEventType
from pipeline.settings import load_settings

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample" / "wattstream.toml"
START = datetime(2025, 4, 14, tzinfo=UTC)
CHARGERS = [
    Charger("DEMO-CP-001", "depot", "van-1", 22.0),
    Charger("DEMO-CP-002", "depot", "van-2", 11.0),
]


def test_the_sample_gets_one_charge_point_per_fleet_vehicle() -> None:
    chargers = chargers_of(load_settings(SAMPLE))
    assert chargers == [
        Charger("DEMO-CP-001", "moncalieri-depot", "van-1", 22.0),
        Charger("DEMO-CP-002", "moncalieri-depot", "van-2", 22.0),
    ]


def test_the_stage_starts_at_the_first_whole_hour_after_the_sample() -> None:
    last = datetime(2025, 4, 13, 23, 59, tzinfo=UTC)
    assert stage_start(int(last.timestamp() * 1000)) == START
    on_the_hour = datetime(2025, 4, 13, 23, tzinfo=UTC)
    assert stage_start(int(on_the_hour.timestamp() * 1000)) == START
    without_replay = stage_start(None)
    assert without_replay > datetime.now(UTC) and without_replay.minute == 0


def test_configs_agree_on_ids_and_password_and_enable_control_for_the_simulation() -> None:
    csms, fleet = configs(CHARGERS, START, "a-password-of-the-run-only")
    assert fleet.charge_point_ids() == ["DEMO-CP-001", "DEMO-CP-002"]
    assert [fleet.version_of(i) for i in range(2)] == ["1.6", "2.0.1"]
    assert fleet.start == START and fleet.charger_max_kw == 22.0
    assert set(csms.charge_points) == set(fleet.charge_point_ids())
    second = csms.charge_points["DEMO-CP-002"]
    assert (second.site, second.device, second.max_power_kw) == ("depot", "van-2", 11.0)
    for cp in csms.charge_points.values():
        assert cp.password is not None
        assert cp.password.get_secret_value() == "a-password-of-the-run-only"
    assert fleet.password is not None
    assert fleet.password.get_secret_value() == "a-password-of-the-run-only"
    assert "a-password-of-the-run-only" not in repr(csms) + repr(fleet)
    assert csms.port == 0  # a free port, whatever runs on 9000
    assert csms.control is not None and csms.control.enabled
    assert csms.control.min_interval_s == 0.0


async def test_the_simulated_clock_runs_speed_times_the_wall_once_begun() -> None:
    clock = SimulatedClock(START, 600.0)
    assert clock() == START
    clock.begin()
    await asyncio.sleep(0.05)
    elapsed = clock() - START
    assert timedelta(seconds=0.05 * 600) <= elapsed < timedelta(seconds=5 * 600)


def _event(
    device: str, kind: SessionEventType, at: datetime, kwh: float | None
) -> ChargingSessionEvent:
    return ChargingSessionEvent(
        event_id=f"ev-{device}-{kind}",
        site="depot",
        device=device,
        charge_point_id="x",
        connector_id=1,
        event_type=kind,
        ocpp_version="1.6",
        energy_kwh=kwh,
        ts=at,
    )


def _command(device: str, at: datetime, setpoint_kw: float) -> Command:
    return Command(
        command_id=f"cmd-{device}-{at:%H%M}",
        site="depot",
        device=device,
        action="set_power",
        setpoint_kw=setpoint_kw,
        reason="charge",
        issued_at=at,
        valid_until=at + timedelta(minutes=15),
        dry_run=False,
    )


def test_the_summary_checks_reported_power_against_each_sent_limit() -> None:
    t0 = START
    five = timedelta(minutes=5)
    commands = [
        _command("van-1", t0, 22.0),
        _command("van-2", t0, 8.0),
        _command("van-2", t0 + 3 * five, 0.0),
        _command("van-1", t0 + 2 * five, 6.0),  # supersedes the 22 kW one
        _command("elsewhere", t0, 50.0),  # not one of the stage's vehicles
    ]
    audits = [
        audit_record(commands[0], Outcome.SENT, "Accepted", setpoint_kw=22.0, sent=True),
        audit_record(commands[1], Outcome.SENT, "Accepted", setpoint_kw=8.0, sent=True),
        audit_record(commands[2], Outcome.FAILED, "no open transaction"),
        audit_record(commands[3], Outcome.SENT, "Accepted", setpoint_kw=6.0, sent=True),
    ]
    reports = {
        # The report a command came from is not judged: +5 and +10 min against 22 kW,
        # +15 min against 6 kW (the newer limit).
        "DEMO-CP-001": [MeterReport(t0 + i * five, 11.0 if i < 3 else 6.0) for i in range(4)],
        # Within 8 kW at +5 min, above it at +10 min; +15 min is past valid_until.
        "DEMO-CP-002": [
            MeterReport(t0, 11.0),
            MeterReport(t0 + five, 8.0),
            MeterReport(t0 + 2 * five, 9.0),
            MeterReport(t0 + 3 * five, 11.0),
        ],
    }
    events = [
        _event("van-1", SessionEventType.STARTED, t0, 0.0),
        _event("van-1", SessionEventType.STOPPED, t0 + 4 * five, 4.5),
        _event("van-2", SessionEventType.PLUGGED_IN, t0, None),
    ]
    result = summarize_charging(
        CHARGERS,
        {"DEMO-CP-001": "1.6", "DEMO-CP-002": "2.0.1"},
        reports,
        events,
        commands,
        audits,
        START,
    )
    van1, van2 = result.chargers
    assert (van1.sessions, van1.energy_kwh, van2.sessions) == (1, 4.5, 0)
    assert (van1.setpoints, van1.profiles_sent, van1.not_applied) == (2, 2, 0)
    assert (van2.setpoints, van2.profiles_sent, van2.not_applied) == (2, 1, 1)
    assert (van1.reports_checked, van1.reports_under_limit) == (3, 3)
    assert (van2.reports_checked, van2.reports_under_limit) == (2, 1)
    assert (result.reports_checked, result.reports_under_limit) == (5, 4)
    assert van1.mean_limit_kw == 14.0 and van2.mean_limit_kw == 8.0
    assert result.peak_setpoints_kw == pytest.approx(30.0)  # the other site's is not ours
    assert result.audits_by_outcome == {"sent": 3, "failed": 1}
    assert result.session_events == 3
    assert result.as_dict()["chargers"][1]["protocol"] == "2.0.1"
