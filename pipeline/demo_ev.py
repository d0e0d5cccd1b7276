"""The demo's EV stage: the depot's vans charge overnight over OCPP.

After the replay, one simulated charge point per vehicle of the sites' ``[sites.fleet]``
(:mod:`ingest.simulators.ocpp`: real OCPP clients over WebSocket, the first half 1.6-J,
the rest 2.0.1, with HTTP Basic passwords made for the run) connects to the CSMS
(:mod:`ingest.ocpp`, on a free loopback port). Its cars plug in on the night after the
sample, and report power, energy and state of charge; the readings go to the telemetry
topic, where the fleet agent (:mod:`processors.fleet`) re-plans every step and produces
``set_power`` commands; the CSMS's control path (:mod:`ingest.ocpp_control`, enabled
here because the chargers are simulated) sends them as charging profiles, which the
cars follow from their next report. The summary is read back from Kafka (sessions,
commands, audit records) and from what the charge points reported.

Time is simulated ``SPEED`` times faster than the wall clock, so the control path judges
the commands' expiry by the same simulated clock as the charge points.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pipeline import codec, kafka, topics
from pipeline.schemas import ChargingSessionEvent, Command
from pipeline.settings import Settings

if TYPE_CHECKING:
    from ingest.ocpp import OcppConfig
    from ingest.simulators.ocpp import OcppSimulatorConfig, SimulatedChargePoint

SPEED = 600.0
"""Simulated seconds per wall-clock second: a fleet step of 15 min takes 1.5 s."""
REPORT_INTERVAL_S = 300.0
"""Simulated time between two meter value reports of a charge point. [s]"""
ARRIVAL_GAP_S = 600.0
"""Mean time after the stage's start before a van plugs in. [s]"""
DWELL_S = 2 * 3600.0
"""Mean time a van stays plugged in. [s]"""
ID_PREFIX = "DEMO-CP-"
FOLLOW_TOLERANCE_KW = 0.01
"""A report counts as following a limit when it draws at most this much above it. [kW]"""


@dataclass(frozen=True)
class Charger:
    """One simulated charge point and the fleet vehicle it charges."""

    charge_point_id: str
    site: str
    vehicle_id: str
    max_power_kw: float


def chargers_of(settings: Settings) -> list[Charger]:
    """One charge point per vehicle of every site's fleet, in config order."""
    from processors.fleet import fleet_settings

    vehicles = [
        (site.id, vehicle)
        for site in settings.sites
        if (fleet := fleet_settings(site)) is not None
        for vehicle in fleet.vehicles
    ]
    width = max(3, len(str(len(vehicles))))
    return [
        Charger(f"{ID_PREFIX}{i:0{width}d}", site, vehicle.vehicle_id, vehicle.max_charge_kw)
        for i, (site, vehicle) in enumerate(vehicles, start=1)
    ]


def stage_start(last_event_ms: int | None) -> datetime:
    """The first whole hour after the last replayed reading (now, without a replay)."""
    if last_event_ms is None:
        return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    last = datetime.fromtimestamp(last_event_ms / 1000, UTC)
    return last.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)


def configs(
    chargers: list[Charger], start: datetime, password: str
) -> tuple[OcppConfig, OcppSimulatorConfig]:
    """The CSMS's config (control enabled, a free port) and its simulated fleet's."""
    from ingest.ocpp import OcppConfig, OcppControlConfig
    from ingest.simulators.ocpp import OcppSimulatorConfig

    simulation = OcppSimulatorConfig(
        charge_points=len(chargers),
        id_prefix=ID_PREFIX,
        password=password,
        interval_s=REPORT_INTERVAL_S,
        speed=SPEED,
        start=start,
        vehicles=1,
        gap_s=ARRIVAL_GAP_S,
        dwell_s=DWELL_S,
        charger_max_kw=max(c.max_power_kw for c in chargers),
        connect_timeout_s=30.0,
    )
    assert simulation.charge_point_ids() == [c.charge_point_id for c in chargers]
    csms = OcppConfig(
        port=0,
        csms_id="wattstream-demo",
        charge_points={
            c.charge_point_id: {
                "site": c.site,
                "device": c.vehicle_id,
                "max_power_kw": c.max_power_kw,
                "password": password,
            }
            for c in chargers
        },
        # The simulated clock runs SPEED times faster: 10 s between two limits would be
        # over an hour of the fleet's 15-minute steps.
        control=OcppControlConfig(enabled=True, min_interval_s=0.0),
    )
    return csms, simulation


class SimulatedClock:
    """The simulation's time: ``start`` until :meth:`begin`, then ``speed`` x the wall."""

    def __init__(self, start: datetime, speed: float) -> None:
        self.start = start
        self.speed = speed
        self._wall_start: float | None = None

    def begin(self) -> None:
        self._wall_start = asyncio.get_running_loop().time()

    def __call__(self) -> datetime:
        if self._wall_start is None:
            return self.start
        elapsed_s = asyncio.get_running_loop().time() - self._wall_start
        return self.start + timedelta(seconds=elapsed_s * self.speed)


@dataclass
class ChargerSummary:
    charge_point_id: str
    protocol: str
    site: str
    vehicle_id: str
    sessions: int = 0
    energy_kwh: float = 0.0
    setpoints: int = 0
    """The fleet agent's ``set_power`` commands for this vehicle."""
    profiles_sent: int = 0
    """Charging profiles the charge point accepted (``sent`` audits)."""
    not_applied: int = 0
    """Commands audited otherwise (failed, skipped, rejected, dry-run)."""
    reports_under_limit: int = 0
    reports_checked: int = 0
    """Meter value reports taken while a sent limit was in force: the latest limit issued
    before the report (so not the report it was planned from), before its
    ``valid_until``."""
    mean_limit_kw: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "charge_point": self.charge_point_id,
            "protocol": self.protocol,
            "site": self.site,
            "vehicle": self.vehicle_id,
            "sessions": self.sessions,
            "energy_kwh": round(self.energy_kwh, 2),
            "setpoints": self.setpoints,
            "profiles_sent": self.profiles_sent,
            "not_applied": self.not_applied,
            "reports_checked": self.reports_checked,
            "reports_under_limit": self.reports_under_limit,
            "mean_limit_kw": None if self.mean_limit_kw is None else round(self.mean_limit_kw, 2),
        }


@dataclass
class EvChargingResult:
    start: datetime
    chargers: list[ChargerSummary] = field(default_factory=list)
    readings: int = 0
    """EV readings the CSMS produced to the telemetry topic."""
    session_events: int = 0
    peak_setpoints_kw: float = 0.0
    """The most the fleet's setpoints of one instant asked for together. [kW]"""
    audits_by_outcome: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def reports_checked(self) -> int:
        return sum(c.reports_checked for c in self.chargers)

    @property
    def reports_under_limit(self) -> int:
        return sum(c.reports_under_limit for c in self.chargers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "readings": self.readings,
            "session_events": self.session_events,
            "peak_setpoints_kw": round(self.peak_setpoints_kw, 3),
            "audits_by_outcome": dict(sorted(self.audits_by_outcome.items())),
            "reports_checked": self.reports_checked,
            "reports_under_limit": self.reports_under_limit,
            "elapsed_s": round(self.elapsed_s, 2),
            "chargers": [c.as_dict() for c in self.chargers],
        }


@dataclass(frozen=True)
class MeterReport:
    """What a charge point reported at one step: the cars' side of the story."""

    ts: datetime
    power_kw: float


def summarize_charging(
    chargers: list[Charger],
    protocols: dict[str, str],
    reports: dict[str, list[MeterReport]],
    session_events: Iterable[ChargingSessionEvent],
    commands: Iterable[Command],
    audits: Iterable[Command],
    start: datetime,
) -> EvChargingResult:
    """Per charge point: sessions and energy (session events), the fleet's setpoints
    (commands), what became a profile (audits), and whether the power reported while a
    profile was in force stayed within it (the charge point's reports)."""
    from ingest.control import Outcome, audit_outcome

    result = EvChargingResult(start=start)
    by_device = {(c.site, c.vehicle_id): c for c in chargers}
    summaries = {
        c.charge_point_id: ChargerSummary(
            c.charge_point_id, protocols.get(c.charge_point_id, "?"), c.site, c.vehicle_id
        )
        for c in chargers
    }

    def summary_of(site: str, device: str) -> ChargerSummary | None:
        charger = by_device.get((site, device))
        return None if charger is None else summaries[charger.charge_point_id]

    for event in session_events:
        result.session_events += 1
        summary = summary_of(event.site, event.device)
        if summary is not None and event.event_type == "stopped":
            summary.sessions += 1
            summary.energy_kwh += event.energy_kwh or 0.0
    at_once: dict[datetime, float] = {}
    for command in commands:
        summary = summary_of(command.site, command.device)
        if summary is not None and command.action == "set_power":
            summary.setpoints += 1
            at_once[command.issued_at] = at_once.get(command.issued_at, 0.0) + (
                command.setpoint_kw or 0.0
            )
    result.peak_setpoints_kw = max(at_once.values(), default=0.0)
    sent: dict[str, list[Command]] = {}
    for audit in audits:
        outcome = audit_outcome(audit)
        result.audits_by_outcome[outcome.value] = result.audits_by_outcome.get(outcome.value, 0) + 1
        summary = summary_of(audit.site, audit.device)
        if summary is None:
            continue
        if outcome is not Outcome.SENT or audit.setpoint_kw is None:
            summary.not_applied += 1
            continue
        summary.profiles_sent += 1
        sent.setdefault(summary.charge_point_id, []).append(audit)
    for charge_point_id, limits in sent.items():
        summary = summaries[charge_point_id]
        limits.sort(key=lambda audit: audit.issued_at)
        summary.mean_limit_kw = sum(a.setpoint_kw or 0.0 for a in limits) / len(limits)
        for report in reports.get(charge_point_id, []):
            # The limit in force: the latest one issued before the report, if still valid.
            latest = next((a for a in reversed(limits) if a.issued_at < report.ts), None)
            if latest is None or latest.setpoint_kw is None:
                continue
            until = latest.valid_until or latest.issued_at + timedelta(seconds=REPORT_INTERVAL_S)
            if report.ts < until:
                summary.reports_checked += 1
                if report.power_kw <= latest.setpoint_kw + FOLLOW_TOLERANCE_KW:
                    summary.reports_under_limit += 1
    result.chargers = list(summaries.values())
    return result


Stage = Callable[[str], None]


async def run_ev_charging(
    settings: Settings,
    start: datetime,
    *,
    group_id: str,
    failed: Callable[[], BaseException | None],
    on_stage: Stage = lambda _: None,
    drain_timeout_s: float = 300.0,
) -> EvChargingResult | None:
    """Run the stage against ``settings.broker`` while the agents (consumer group
    ``group_id``) run; None when no site has a fleet."""
    from ingest.ocpp import OcppConnector
    from ingest.simulators.ocpp import ChargePointFleet

    chargers = chargers_of(settings)
    if not chargers:
        return None
    loop = asyncio.get_running_loop()
    started = loop.time()
    # One password for the run, never shown: security profile 1 as a site would run it.
    csms_config, fleet_config = configs(chargers, start, secrets.token_urlsafe(24))
    clock = SimulatedClock(start, SPEED)
    csms = OcppConnector(settings, csms_config, control_clock=clock)
    await csms.start()
    csms_task = asyncio.create_task(csms.run(), name="demo-csms")
    try:
        fleet = ChargePointFleet(fleet_config.model_copy(update={"url": csms.url}))
        on_stage(f"charging {len(chargers)} EVs over OCPP (simulated night)")
        clock.begin()
        stats = await fleet.run()
        if stats.failed:
            raise RuntimeError(f"simulated charge points failed: {'; '.join(stats.failed)}")
        on_stage("waiting for the fleet's last setpoints")
        # The agents first: their last commands are produced once they have read the
        # last readings, and only then can the control path's lag say it is done.
        await kafka.wait_until_drained(
            settings,
            {group_id: [settings.topic(topics.TELEMETRY)]},
            timeout_s=drain_timeout_s,
            failed=failed,
        )
        assert csms.control is not None
        await kafka.wait_until_drained(
            settings,
            {csms.control.group_id: [settings.topic(topics.COMMANDS)]},
            timeout_s=drain_timeout_s,
            failed=lambda: failed() or task_error(csms_task),
        )
        audit_spec = csms.control.audit_spec
    finally:
        await csms.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await csms_task
    result = summarize_charging(
        chargers,
        {cp.id: cp.version for cp in fleet.charge_points},
        {cp.id: _meter_reports(cp) for cp in fleet.charge_points},
        [
            codec.decode(ChargingSessionEvent, value)
            for _, value in await kafka.read_all(settings, topics.EV_SESSIONS)
        ],
        [
            codec.decode(Command, value)
            for _, value in await kafka.read_all(settings, topics.COMMANDS)
        ],
        [codec.decode(Command, value) for _, value in await kafka.read_all(settings, audit_spec)],
        start,
    )
    result.readings = csms.stats.readings_produced
    result.elapsed_s = loop.time() - started
    return result


def _meter_reports(cp: SimulatedChargePoint) -> list[MeterReport]:
    return [MeterReport(r.ts, r.power_w / 1000) for r in cp.reports]


def task_error(task: asyncio.Task[None]) -> BaseException | None:
    """The error a finished task ended with; None while it runs, or if it ended well."""
    return task.exception() if task.done() and not task.cancelled() else None
