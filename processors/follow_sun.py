"""Follow-the-sun demand response: start flexible heavy jobs when clean, cheap energy is
plentiful, and stop them when it passes.

A site lists its flexible jobs (a shredder, 3D printers, a batch of compute): each a
device, its power and how long a run must last once started. Every interval of the
grid (one carbon-intensity value and one price) is judged:

* **clean**: the zone's renewable share at least ``min_renewable_share_pct``, or its
  intensity at most ``max_co2_g_per_kwh`` (either says the same thing; feeds give one
  or the other);
* **cheap**: the price at most ``max_price_per_kwh``.

Both together open a **window**: a demand-response event (an ``Alert`` of type
``follow_the_sun``, info) and a ``start_job`` command per job. The window stays open
while the interval is still clean and cheap *with hysteresis* (the renewable share
may fall ``hysteresis_pct`` percentage points below the entry line, the intensity
and the price may rise that share above theirs), so a value hovering at a line does
not start and stop machines every interval. When it closes, each job gets
``stop_job``, but not before its ``min_run_min`` (a shredder cycle, a print): the stop
is then issued at the first interval after the run has lasted that long. The event
resolves when the window closes.

Decisions are made per interval in event time, from data only: ids are deterministic,
a replay sends the same events. Commands are dry-run unless the site says ``live``, and
only the actions the control connector knows (``start_job``, ``stop_job``) are used.

Plain Python (no Faust import).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.schemas import Alert, Command, Identifier, Severity, stable_id
from pipeline.settings import SiteConfig, validate_section
from processors.alerting import firing, resolved

PositiveFloat = Annotated[float, Field(gt=0)]
Pct = Annotated[float, Field(ge=0, le=100)]
ALERT_TYPE = "follow_the_sun"


class FlexibleJob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Identifier
    power_kw: PositiveFloat
    """What the job draws while it runs. [kW]"""
    min_run_min: Annotated[float, Field(ge=0)] = 30.0
    """A started run lasts at least this long (a cycle is not cut halfway). [min]"""


class FollowSunSettings(BaseModel):
    """``[sites.follow_sun]``: the flexible jobs and what counts as plentiful."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    jobs: list[FlexibleJob] = Field(min_length=1)
    min_renewable_share_pct: Pct = 60.0
    """Clean enough: at least this renewable share of the grid's supply. [%]"""
    max_co2_g_per_kwh: Annotated[float, Field(ge=0)] = 150.0
    """...or at most this average intensity (a third of the EU-27's ~250 in 2023). [g/kWh]"""
    max_price_per_kwh: float = 0.08
    """Cheap enough: at most this price. [currency/kWh]"""
    hysteresis_pct: Pct = 10.0
    """How far past the entry lines a window stays open (points for shares, percent of
    the line for intensity and price). [%]"""
    commands: Literal["off", "dry_run", "live"] = "dry_run"

    @model_validator(mode="after")
    def _unique_jobs(self) -> FollowSunSettings:
        devices = [job.device for job in self.jobs]
        duplicates = sorted({d for d in devices if devices.count(d) > 1})
        if duplicates:
            raise ValueError(f"duplicate job devices {duplicates}")
        return self


def follow_sun_settings(site: SiteConfig) -> FollowSunSettings | None:
    """The site's section, validated; None when the site has none."""
    if site.follow_sun is None:
        return None
    return validate_section(FollowSunSettings, f"sites[{site.id}].follow_sun", site.follow_sun)


@dataclass(frozen=True)
class GridInterval:
    """What the grid offers in one interval: its carbon intensity, share and price."""

    start: datetime
    end: datetime
    co2_g_per_kwh: float | None
    renewable_share_pct: float | None
    price_per_kwh: float


@dataclass
class FollowSunState:
    alert: Alert | None = None
    """The open demand-response event, if a window is open."""
    running_since: dict[str, datetime] = field(default_factory=dict)
    """Jobs started by the open (or a closed) window and not yet stopped."""
    last_start: datetime | None = None


def clean(settings: FollowSunSettings, interval: GridInterval, margin_pct: float = 0.0) -> bool:
    """Clean enough, ``margin_pct`` past the entry lines (the hysteresis once open)."""
    share = interval.renewable_share_pct
    if share is not None and share >= settings.min_renewable_share_pct - margin_pct:
        return True
    co2 = interval.co2_g_per_kwh
    return co2 is not None and co2 <= settings.max_co2_g_per_kwh * (1 + margin_pct / 100.0)


def cheap(settings: FollowSunSettings, interval: GridInterval, margin_pct: float = 0.0) -> bool:
    line = settings.max_price_per_kwh
    # A negative line has no "percent above": the margin is taken from its size.
    return interval.price_per_kwh <= line + abs(line) * margin_pct / 100.0


class FollowSun:
    """The follow-the-sun rule of one site; state is passed in."""

    def __init__(self, site: str, settings: FollowSunSettings) -> None:
        self.site = site
        self.settings = settings

    def on_interval(self, state: FollowSunState, interval: GridInterval) -> list[Alert | Command]:
        """Judge one grid interval (in time order); the events and commands it causes."""
        if state.last_start is not None and interval.start <= state.last_start:
            return []  # a replayed or late interval: decided already
        state.last_start = interval.start
        out: list[Alert | Command] = []
        margin = self.settings.hysteresis_pct
        if state.alert is None:
            out += self._stop_due(state, interval.start)
            if clean(self.settings, interval) and cheap(self.settings, interval):
                out += self._open(state, interval)
        elif not (
            clean(self.settings, interval, margin) and cheap(self.settings, interval, margin)
        ):
            out.append(resolved(state.alert, interval.start))
            state.alert = None
            out += self._stop_due(state, interval.start)
        return out

    def _open(self, state: FollowSunState, interval: GridInterval) -> list[Alert | Command]:
        jobs = ", ".join(job.device for job in self.settings.jobs)
        share = interval.renewable_share_pct
        alert = firing(
            site=self.site,
            device=None,
            alert_type=ALERT_TYPE,
            severity=Severity.INFO,
            subject="Clean, cheap energy: flexible jobs started",
            message=(
                f"{interval.co2_g_per_kwh if interval.co2_g_per_kwh is not None else '?'} "
                f"gCO2/kWh, {share if share is not None else '?'} % renewable, "
                f"{interval.price_per_kwh:g}/kWh: starting {jobs}"
            ),
            start=interval.start,
            observed=interval.price_per_kwh,
            expected=self.settings.max_price_per_kwh,
            details={"jobs": jobs},
        )
        state.alert = alert
        out: list[Alert | Command] = [alert]
        for job in self.settings.jobs:
            if job.device in state.running_since:
                continue  # still running from the last window (its minimum run)
            state.running_since[job.device] = interval.start
            out += self._command(job.device, "start_job", job.power_kw, interval.start, alert)
        return out

    def _stop_due(self, state: FollowSunState, now: datetime) -> list[Alert | Command]:
        """Stop the jobs whose minimum run is over (outside a window)."""
        out: list[Alert | Command] = []
        for job in self.settings.jobs:
            since = state.running_since.get(job.device)
            if since is None or now - since < timedelta(minutes=job.min_run_min):
                continue
            del state.running_since[job.device]
            out += self._command(job.device, "stop_job", 0.0, now, None)
        return out

    def _command(
        self, device: str, action: str, setpoint_kw: float, at: datetime, alert: Alert | None
    ) -> list[Alert | Command]:
        mode = self.settings.commands
        if mode == "off":
            return []
        reason = (
            "clean, cheap energy: follow the sun"
            if action == "start_job"
            else "the clean, cheap window has passed"
        )
        return [
            Command(
                command_id=stable_id("cmd", self.site, device, action, at.isoformat()),
                site=self.site,
                device=device,
                action=action,
                setpoint_kw=setpoint_kw,
                reason=reason,
                issued_at=at,
                dry_run=mode != "live",
                source_id=None if alert is None else alert.alert_id,
            )
        ]
