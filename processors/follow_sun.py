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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.schemas import (
    Alert,
    CarbonIntensity,
    Command,
    Identifier,
    PriceTick,
    Severity,
    TelemetryBatch,
    stable_id,
)
from pipeline.settings import Settings, SettingsError, SiteConfig, repeated, validate_section
from processors.alerting import firing, resolved

if TYPE_CHECKING:
    import faust

PositiveFloat = Annotated[float, Field(gt=0)]
Pct = Annotated[float, Field(ge=0, le=100)]
ALERT_TYPE = "follow_the_sun"

log = logging.getLogger(__name__)


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
        duplicates = repeated(devices)
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

    def to_json(self) -> dict[str, Any]:
        return {
            "alert": None if self.alert is None else self.alert.model_dump(mode="json"),
            "running_since": {d: t.isoformat() for d, t in self.running_since.items()},
            "last_start": None if self.last_start is None else self.last_start.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FollowSunState:
        alert, last = data["alert"], data["last_start"]
        return cls(
            alert=None if alert is None else Alert.model_validate(alert),
            running_since={d: datetime.fromisoformat(t) for d, t in data["running_since"].items()},
            last_start=None if last is None else datetime.fromisoformat(last),
        )


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


# --- the grid intervals of a site, as its event time reaches them ---------------------------


@dataclass
class GridFeedState:
    """What the follow-the-sun agent of one site remembers (a Faust table value)."""

    rule: FollowSunState = field(default_factory=FollowSunState)
    prices: dict[datetime, tuple[datetime, float]] = field(default_factory=dict)
    """Interval start -> (end, price), intervals not judged yet."""
    intensities: dict[datetime, tuple[datetime, float, float | None]] = field(default_factory=dict)
    """Interval start -> (end, gCO2/kWh, renewable %)."""
    clock: datetime | None = None
    """The site's event time: its latest reading."""
    intensities_until: datetime | None = None
    """The end of the latest intensity of the zone: its feed comes in time order, so a gap
    before it will not be filled."""

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule.to_json(),
            "prices": {s.isoformat(): [e.isoformat(), p] for s, (e, p) in self.prices.items()},
            "intensities": {
                s.isoformat(): [e.isoformat(), c, r] for s, (e, c, r) in self.intensities.items()
            },
            "clock": _iso_or_none(self.clock),
            "intensities_until": _iso_or_none(self.intensities_until),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> GridFeedState:
        if not data:
            return cls()
        return cls(
            rule=FollowSunState.from_json(data["rule"]),
            prices={
                datetime.fromisoformat(s): (datetime.fromisoformat(e), p)
                for s, (e, p) in data["prices"].items()
            },
            intensities={
                datetime.fromisoformat(s): (datetime.fromisoformat(e), c, r)
                for s, (e, c, r) in data["intensities"].items()
            },
            clock=_datetime_or_none(data["clock"]),
            intensities_until=_datetime_or_none(data.get("intensities_until")),
        )


def _iso_or_none(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _datetime_or_none(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class GridFeed:
    """Joins a site's price ticks with its zone's intensities into :class:`GridInterval`s
    and judges each with :class:`FollowSun` when the site's event time reaches its start.

    Prices come a day ahead and intensities may come late: an interval is judged once
    the site's latest reading is at or past its start, with the latest price of the
    interval and the time-weighted intensity over it. If the intensity does not cover
    the interval yet, judging waits until no more of it can come: the zone's feed (in
    time order) has gone past the interval, or the site's event time is ``intensity_wait``
    past its end (a silent feed, as in :class:`processors.carbon.CarbonEngine`); then it
    goes on with what is known (no intensity: not clean), so one missing value never
    stalls the site. What is judged depends on the data only, not on whether a reading
    or an intensity reached the worker first (a worker catching up reads its topics at
    their own pace), so a replay or a restart judges every interval the same way. A
    replayed or late value for a judged interval changes nothing.
    """

    def __init__(
        self, site: str, settings: FollowSunSettings, intensity_wait: timedelta = timedelta(days=1)
    ) -> None:
        self.rule = FollowSun(site, settings)
        self.intensity_wait = intensity_wait

    def add_price(self, state: GridFeedState, tick: PriceTick) -> list[Alert | Command]:
        if not self._judged(state, tick.start):
            state.prices[tick.start] = (tick.end, tick.price_per_kwh)
        return self._judge(state)

    def add_intensity(
        self, state: GridFeedState, intensity: CarbonIntensity
    ) -> list[Alert | Command]:
        if not self._judged(state, intensity.end - timedelta(microseconds=1)):
            state.intensities[intensity.start] = (
                intensity.end,
                intensity.co2_g_per_kwh,
                intensity.renewable_share_pct,
            )
        if state.intensities_until is None or intensity.end > state.intensities_until:
            state.intensities_until = intensity.end
        return self._judge(state)

    def advance(self, state: GridFeedState, now: datetime) -> list[Alert | Command]:
        """The site's event time moved to ``now`` (a reading's time)."""
        if state.clock is None or now > state.clock:
            state.clock = now
        return self._judge(state)

    @staticmethod
    def _judged(state: GridFeedState, start: datetime) -> bool:
        last = state.rule.last_start
        return last is not None and start <= last

    def _judge(self, state: GridFeedState) -> list[Alert | Command]:
        out: list[Alert | Command] = []
        clock = state.clock
        for start in sorted(state.prices):
            if clock is None or clock < start:
                break
            end, price = state.prices[start]
            co2, share, covered = self._intensity(state, start, end)
            if not covered:
                if not self._no_more_intensity(state, clock, end):
                    break  # the intensity may still come
                log.warning(
                    "site=%s no intensity covers %s-%s (the feed is at %s, the site at %s): "
                    "judged on what is known",
                    self.rule.site,
                    start.isoformat(),
                    end.isoformat(),
                    _iso_or_none(state.intensities_until),
                    clock.isoformat(),
                )
            del state.prices[start]
            out += self.rule.on_interval(state.rule, GridInterval(start, end, co2, share, price))
        last = state.rule.last_start
        if last is not None:
            state.intensities = {s: v for s, v in state.intensities.items() if v[0] > last}
        return out

    def _no_more_intensity(self, state: GridFeedState, clock: datetime, end: datetime) -> bool:
        """Whether an interval ending at ``end`` can still get intensity values."""
        feed_past = state.intensities_until is not None and state.intensities_until > end
        return feed_past or clock >= end + self.intensity_wait

    @staticmethod
    def _intensity(
        state: GridFeedState, start: datetime, end: datetime
    ) -> tuple[float | None, float | None, bool]:
        """Time-weighted intensity and share over ``[start, end)``, and whether it is covered."""
        pieces = []
        for piece_start, (piece_end, co2, share) in state.intensities.items():
            lo, hi = max(start, piece_start), min(end, piece_end)
            if lo < hi:
                pieces.append(((hi - lo).total_seconds(), co2, share))
        if not pieces:
            return None, None, False
        known_s = sum(seconds for seconds, _, _ in pieces)
        co2 = sum(seconds * c for seconds, c, _ in pieces) / known_s
        shares = [(seconds, r) for seconds, _, r in pieces if r is not None]
        share = (
            sum(seconds * r for seconds, r in shares) / sum(seconds for seconds, _ in shares)
            if shares
            else None
        )
        return co2, share, known_s >= (end - start).total_seconds() - 1e-6


def register(app: faust.App, settings: Settings) -> None:
    """Wire follow-the-sun to Kafka: the site's readings (its event time), prices
    (``site-prices``) and its carbon zone's intensities (``site-carbon``, fanned out by
    :mod:`processors.carbon` to the sites of each ``[sites.carbon]`` zone, which a
    follow-the-sun site must have) in; demand-response alerts and job commands out.
    """
    from pipeline.streams import site_agent, site_state
    from processors.carbon import carbon_settings

    feeds = {}
    for site in settings.sites:
        cfg = follow_sun_settings(site)
        if cfg is None:
            continue
        carbon = carbon_settings(site)
        if carbon is None:
            raise SettingsError(
                f"sites[{site.id}].follow_sun needs sites[{site.id}].carbon.zone: the zone "
                "whose carbon intensity it follows"
            )
        # A silent feed is waited for as long as Scope 2 waits for it.
        feeds[site.id] = GridFeed(site.id, cfg, timedelta(seconds=carbon.intensity_wait_s))
    if not feeds:
        return
    states = site_state(
        app,
        settings,
        "follow-sun-state",
        "Per-site follow-the-sun: the open window, running jobs, intervals to judge.",
        GridFeedState.from_json,
        GridFeedState.to_json,
    )

    def step(
        site: str, update: Callable[[GridFeed, GridFeedState], list[Alert | Command]]
    ) -> list[Alert | Command]:
        state = states.get(site)
        out = update(feeds[site], state)
        states.put(site, state)
        return out

    def on_telemetry(site: str, batch: TelemetryBatch) -> list[Alert | Command]:
        if not batch.readings:
            return []
        latest = max(reading.ts for reading in batch.readings)
        return step(site, lambda feed, state: feed.advance(state, latest))

    def on_carbon(site: str, intensity: CarbonIntensity) -> list[Alert | Command]:
        return step(site, lambda feed, state: feed.add_intensity(state, intensity))

    def on_price(site: str, tick: PriceTick) -> list[Alert | Command]:
        return step(site, lambda feed, state: feed.add_price(state, tick))

    site_agent(
        app,
        settings,
        f"{__name__}.follow_sun",
        feeds,
        telemetry=on_telemetry,
        carbon=on_carbon,
        prices=on_price,
    )
