"""Statistical anomalies in a device's power: spikes, drops, level shifts, stuck sensors,
and high consumption.

One :class:`SignalDetector` per device reads its power readings in time order
and learns, from the past only, three robust baselines:

* **Local level**: the median of the last ``LOCAL_READINGS`` normal readings,
  and the distribution of each reading's residual from it (a rolling sample of
  ``RESIDUAL_SAMPLE`` residuals). Its upper and lower bounds are
  *tail-scaled*: ``q50 + tail_factor * (q99.9 - q50)`` and
  ``q50 - tail_factor * (q50 - q0.1)``, used once ``TAIL_SAMPLES`` residuals
  say what a 0.1 % tail is. The 99.9th percentile is the largest jump the
  device makes in normal use (a household's oven with the kettle on), and the
  factor (1.25) a margin beyond it: the bound adapts to each device's own
  behaviour, no number in kW is tuned to a dataset. A reading past the upper
  bound within ``SPIKE_REPEAT_S`` (3 days) of the last one adds the bound itself
  to the sample, so an event the device makes often soon raises the bound above
  itself, while a rare fault leaves it.
* **Time-of-week profile**: the hourly mean power per local hour and day type
  (weekday or weekend/holiday: the time of week that matters for energy use,
  learnable in days rather than the months 168 hour-of-week slots need), over
  the last ``profile_days`` days of that type. The expected value is the
  median of those hourly means, the spread their MAD (scaled to sigma), never
  below a floor set by the reading noise.
* **Run lengths**: how long the device's value naturally stays exactly the
  same (quantised meters repeat values at night), so a stuck sensor is one
  that repeats for clearly longer than this device ever does.

Rules (``label`` is the alert type, and the label `wattstream detect` scores):

* ``spike``: a reading above the local level by more than the upper bound
  that returns below half of it within ``spike_max_readings``. Raised when it
  returns (one reading late) with start and end; a rise that does not return
  is not a spike (the profile rule judges it). For PV with its irradiance, a
  jump the irradiance shows too (a gap in the clouds) is not a spike.
* ``drop``: a short dip below the lower bound of the local level (and below
  half the profile's expectation: coming back down to the usual is no drop), or below
  half the device's lowest normal level (its 0.5 % quantile, for devices that
  never go negative), or below a quarter of the profile's expectation and out
  of its band. Raised at once; resolved once readings have been back for
  ``DROP_BACK_S`` and ``DROP_BACK_READINGS`` (an empty home flickers about its
  floor: one drop, not a hundred).
* ``level_shift``: the readings of the last ``shift_window_min`` (at least
  ``SHIFT_MIN_READINGS``) have all moved more than ``shift_spreads`` profile
  spreads from the expectation: their lower quartile above it, or their upper
  quartile below it (a step, or a drift once it has moved that far). A cooking
  hour lifts some readings of a window, a shift lifts them all. Measured from
  what is usual, which is more than the profile's median: a shift up must also
  rise above what the device draws at that hour on nine days in ten (household
  use is skewed: most evenings quiet, some busy), and beyond what the last
  ``RECENT_DAYS`` days did at that hour (once two of three were at the new level,
  a season's heating or a move-in is the new normal, weeks before the median has
  caught up). Resolved when the window's median is back within half.
* ``stuck``: the same non-zero value for at least ``max(stuck_min_readings, 2 +
  the natural run length)`` readings, that length being the 99th percentile of
  the runs of repeated values seen outside incidents (a high quantile, not the
  longest: one freeze too short to be caught must not raise the bar for good).
  Zero is not "stuck": PV at night and an idle load are legitimately zero, and a
  fall to zero is a drop. PV at its peak (99th percentile of its levels) is
  clipping, excused for up to ``CLIP_MAX_S`` and never learned as a natural run.
  Starts at the first repeated reading.
* ``high_consumption`` (consumption devices only): the mean of the last hour
  above the profile's expectation by ``high_consumption_spreads`` spreads and
  by half of it at least.

PV (``solar``) gets the spike and stuck rules only: its output follows the weather,
so a time-of-day profile and a local level say nothing about a fault; its drops
and lasting losses are judged against irradiance by ``processors/solar.py``.

Readings that are part of a spike, drop or stuck incident do not teach the
baselines (a fault must not become the normal); level shifts do teach the
profile, so a lasting change becomes the new normal after days, as it should.
Detection starts once a device has ``warmup_h`` hours of history; the profile
rules also need ``min_history_days`` days of that day type (or of any type).

Plain Python (no Faust import): the stream and ``wattstream detect`` run this.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import astuple, dataclass, field
from datetime import UTC, date, datetime, time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.schemas import Alert, Severity
from pipeline.settings import time_zone
from processors.alerting import firing, resolved
from processors.baselines import (
    LocalClock,
    LocalTime,
    RollingSample,
    mad_spread,
    median,
    median_of_sorted,
    quantile_of_sorted,
)

Label = Literal["spike", "drop", "level_shift", "stuck", "high_consumption", "vampire"]
LABELS: tuple[str, ...] = (
    "spike",
    "drop",
    "level_shift",
    "stuck",
    "vampire",
    "solar_underperformance",
    "high_consumption",
)
"""Every label a detector raises as an alert type (and `wattstream detect` scores)."""

CONSUMPTION_KINDS = frozenset({"home", "meter"})
LOCAL_READINGS = 12
"""Readings in the local level's median: long enough to ignore a 3-reading spike. [-]"""
RESIDUAL_SAMPLE = 2000
TAIL_SAMPLES = 1000
"""Residuals needed before the 0.1 %-tail bounds are used (spikes, dips). [-]"""
"""Residuals kept per device: a week at 5-minute steps, a day and a half at 1 minute. [-]"""
LEVEL_SAMPLE = 2000
SHIFT_READINGS = 5
SLOT_HIGH_QUANTILE = 0.9
"""A shift up must also rise above what the device draws at that hour on nine days in
ten: household use is skewed (most evenings quiet, some busy), so the median and its
spread alone call every busy evening a shift. [-]"""
RECENT_DAYS = 3
"""A level shift is a move away from what the last days did at that hour too: once two
of the last three days were at the new level (a season's heating, a move-in), it is
the new normal, weeks before the profile's median has caught up. [days]"""
SHIFT_MIN_READINGS = 4
SPIKE_REPEAT_S = 72 * 3600.0
"""A crossing of the spike line within this time of the last one teaches the sample that
the device does this: in time, not readings, so the line moves alike at every step
(2,000 residuals are a week at 5 minutes but six weeks at half an hour). [s]"""
SUNLIT_W_M2 = 50.0
"""Irradiance above which PV output per irradiance is meaningful. [W/m2]"""
SPIKE_RATIO = 1.5
"""A PV spike's output per irradiance is at least this multiple of the recent one. [-]"""
RUN_SAMPLE = 200
NATURAL_RUN_QUANTILE = 0.99
"""The natural run length a stuck value must clearly exceed (twice, plus one). [-]"""
PEAK_QUANTILE = 0.99
"""PV at or above this quantile of its levels is at its peak (clipping): robust to the
odd outlier learned before the spike rule was armed. [-]"""
DROP_BACK_S = 3600.0
DROP_BACK_READINGS = 2
"""A drop ends once readings have been back this long and this many times. [s], [-]"""
CLIP_MAX_S = 8 * 3600.0
"""Longest plateau a clipping inverter holds: the sun's strong hours. [s]"""
"""Completed natural runs of repeated values remembered per device. [-]"""
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
PositiveFloat = Annotated[float, Field(gt=0)]


class IdleWindow(BaseModel):
    """A daily stretch of local time when a site should draw only its standby load."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: time
    end: time
    """May be before ``start``: the window runs over midnight (22:00 to 06:00)."""
    days: list[Weekday] = Field(default_factory=lambda: list(WEEKDAYS))  # type: ignore[arg-type]
    """The days the window starts on."""

    def contains(self, minute_of_day: float, weekday: int) -> bool:
        start_min = self.start.hour * 60 + self.start.minute
        end_min = self.end.hour * 60 + self.end.minute
        if start_min <= end_min:
            return WEEKDAYS[weekday] in self.days and start_min <= minute_of_day < end_min
        if minute_of_day >= start_min:
            return WEEKDAYS[weekday] in self.days
        # After midnight: the window started on the day before.
        return minute_of_day < end_min and WEEKDAYS[(weekday - 1) % 7] in self.days


class DetectionSettings(BaseModel):
    """``[sites.detection]``: anomaly, vampire-load and high-consumption detection.

    Runs on every site with these defaults; the section only changes them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    timezone: str = "UTC"
    """IANA zone of the profile's hours, the idle windows and the holidays."""
    kinds: list[Literal["home", "meter", "solar"]] = Field(
        default_factory=lambda: ["home", "meter", "solar"]  # type: ignore[arg-type]
    )
    """Device kinds watched for anomalies. Batteries, EVs and generators follow commands,
    so a constant or sudden power is their normal."""
    tail_factor: PositiveFloat = 1.25
    """Spike/drop thresholds: this many times the residuals' 0.1 %-99.9 % tail beyond the
    median (the largest jumps the device makes in normal use, with a margin)."""
    shift_spreads: PositiveFloat = 4.0
    """Level shift: the recent readings this many profile spreads from the expectation."""
    shift_window_min: PositiveFloat = 30.0
    """Level shift: the readings of this window must all have moved (their lower quartile
    up, or upper quartile down): longer than a cooking hour's bursts, short enough to
    find a shift in half an hour. [min]"""
    high_consumption_spreads: PositiveFloat = 6.0
    spike_max_readings: Annotated[int, Field(ge=1, le=20)] = 3
    stuck_min_readings: Annotated[int, Field(ge=2, le=10_000)] = 3
    warmup_h: Annotated[float, Field(ge=0)] = 24.0
    """No alert before a device has this much history. [h]"""
    min_history_days: Annotated[int, Field(ge=1, le=60)] = 3
    profile_days: Annotated[int, Field(ge=1, le=366)] = 28
    """Days of history per hour slot of the time-of-week profile."""
    idle: list[IdleWindow] = Field(default_factory=lambda: [IdleWindow(start=time(1), end=time(5))])
    """When the site should be idle (nights, weekends): where vampire loads show."""
    idle_days: list[Weekday] = Field(default_factory=list)
    """Whole days that are idle (``["sat", "sun"]`` for an office)."""
    holidays: list[date] = Field(default_factory=list)
    """Whole idle days (local dates), also treated as weekend days by the profile."""
    vampire_min_duration_min: PositiveFloat = 30.0
    """A vampire load must last this long inside an idle window (late-night activity
    comes and goes within it, a load left on does not). [min]"""
    vampire_margin_kw: Annotated[float, Field(ge=0)] = 0.02
    """Smallest excess over the idle baseline that counts, whatever the spread. [kW]"""
    vampire_margin_pct: Annotated[float, Field(ge=0)] = 20.0
    """...and at least this share of the idle baseline. [%]"""
    price_per_kwh: Annotated[float, Field(ge=0)] = 0.25
    """What wasted energy costs, for the vampire alert's estimate. [currency/kWh]"""
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        time_zone(value)
        return value


@dataclass
class _Incident:
    alert: Alert
    """The firing event."""
    extreme: float
    """The reading furthest from normal so far. [kW]"""


@dataclass
class _PendingSpike:
    start_s: float
    peak_kw: float
    level_kw: float
    readings: int


@dataclass
class _HourAccumulator:
    key: tuple[date, int] | None = None
    sum_kw: float = 0.0
    count: int = 0
    day_type: int = 0


@dataclass
class _Profile:
    """Hourly means per (day type, local hour), and their median and spread (computed
    when first asked after a change: the all-days fallback is rarely needed)."""

    days: int
    slots: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    stats: dict[tuple[int, int], tuple[float, float, float]] = field(default_factory=dict)
    """(median, spread, upper quantile ``SLOT_HIGH_QUANTILE``) per slot."""
    latest: dict[int, list[float]] = field(default_factory=dict)
    """Per local hour, its means of the last ``RECENT_DAYS`` days (any day type)."""
    version: int = 0
    """Counts the additions: what is derived from the stats can be cached per version."""

    def add(self, day_type: int, hour: int, mean_kw: float) -> None:
        self.version += 1
        key = (day_type, hour)
        _push(self.slots.setdefault(key, []), mean_kw, self.days)
        _push(self.latest.setdefault(hour, []), mean_kw, RECENT_DAYS)
        self.stats.pop(key, None)
        self.stats.pop((2, hour), None)

    def _values(self, key: tuple[int, int]) -> list[float]:
        if key[0] != 2:
            return self.slots.get(key, [])
        hour = key[1]
        return [*self.slots.get((0, hour), ()), *self.slots.get((1, hour), ())]

    def recent(self, hour: int) -> float | None:
        """The median of the hour's means over the last ``RECENT_DAYS`` days, once known."""
        latest = self.latest.get(hour)
        return median(latest) if latest is not None and len(latest) == RECENT_DAYS else None

    def expected(self, day_type: int, hour: int, min_days: int) -> tuple[float, float] | None:
        """(median, spread) of the slot, falling back to the hour over all days."""
        stats = self._stats(day_type, hour, min_days)
        return None if stats is None else (stats[0], stats[1])

    def usual_high(self, day_type: int, hour: int, min_days: int) -> float | None:
        """The slot's ``SLOT_HIGH_QUANTILE`` quantile of hourly means (same fallback)."""
        stats = self._stats(day_type, hour, min_days)
        return None if stats is None else stats[2]

    def _stats(self, day_type: int, hour: int, min_days: int) -> tuple[float, float, float] | None:
        for key in ((day_type, hour), (2, hour)):
            stats = self.stats.get(key)
            if stats is None:
                values = self._values(key)
                if len(values) < min_days:
                    continue
                ordered = sorted(values)
                stats = self.stats[key] = (
                    median_of_sorted(ordered),
                    mad_spread(ordered),
                    quantile_of_sorted(ordered, SLOT_HIGH_QUANTILE),
                )
            return stats
        return None


def _push(history: list[float], value: float, limit: int) -> None:
    """Append ``value``, keeping the last ``limit`` values (a short deque's ``maxlen``)."""
    history.append(value)
    if len(history) > limit:
        del history[0]


def _ts(at: datetime) -> str:
    return at.isoformat()


class SignalDetector:
    """Anomalies of one device's power. Feed readings in time order with :meth:`observe`."""

    def __init__(
        self, site: str, device: str, kind: str, settings: DetectionSettings | None = None
    ) -> None:
        self.site = site
        self.device = device
        self.kind = kind
        self.settings = settings or DetectionSettings()
        self.clock = LocalClock(self.settings.timezone)
        self._holidays = set(self.settings.holidays)
        self.first_s: float | None = None
        self.last_s: float | None = None
        # Short histories are lists trimmed by _push, not deques: an empty deque holds a
        # block of 64 slots (~760 bytes), and a worker holds a detector per device.
        self.recent: list[float] = []
        self.residuals = RollingSample(RESIDUAL_SAMPLE)
        self.levels = RollingSample(LEVEL_SAMPLE)
        self.diffs = RollingSample(RESIDUAL_SAMPLE)
        self.profile = _Profile(self.settings.profile_days)
        self.hour = _HourAccumulator()
        self.window: list[float] = []
        # The level-shift window as two deques (times, values): its values are sorted at
        # every reading.
        self.shift_times: deque[float] = deque()
        self.shift_values: deque[float] = deque()
        self.hour_window: deque[tuple[float, float]] = deque()
        self.hour_sum_kw = 0.0
        self.pending: _PendingSpike | None = None
        self.last_crossing_s = -math.inf
        """When a reading last crossed the spike line. [s]"""
        self.dip: _PendingSpike | None = None
        self.run_value: float | None = None
        self.run_length = 0
        self.run_start_s = 0.0
        self.drop_back_since_s: float | None = None
        """Since when readings have been back from an open drop. [s]"""
        self.drop_back_readings = 0
        self.run_at_peak = False
        """The current run was excused as a clipping inverter's plateau at some point."""
        self.natural_runs = RollingSample(RUN_SAMPLE, refresh=1)
        self.open: dict[str, _Incident] = {}
        self.sun_ratios: list[float] = []
        """PV output per irradiance of the last sunlit readings. [kW/(W/m2)]"""
        self._noise: tuple[int, float] = (-1, 0.0)
        self._bounds: tuple[tuple[int, int], tuple[float, float]] = ((-1, -1), (0.0, 0.0))
        self._lowest: tuple[int, float] = (-1, 0.0)
        self._run_bar: tuple[int, float] = (-1, 1.0)
        # Per-reading caches (a reading costs microseconds, and most of what it asks
        # changes once a quarter hour or once a refresh of a sample).
        self._ready = False
        self._tails_known = False
        self._typed: tuple[LocalTime | None, int] = (None, 0)
        self._expected: tuple[tuple[int, date, int, int] | None, tuple[float, float] | None] = (
            None,
            None,
        )

    # --- checkpoints ------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """What the detector has learned, as plain JSON (a Faust table checkpoint)."""
        return {
            "first_s": self.first_s,
            "last_s": self.last_s,
            "recent": list(self.recent),
            "residuals": self.residuals.to_state(),
            "levels": self.levels.to_state(),
            "diffs": self.diffs.to_state(),
            "profile": [[d, h, list(v)] for (d, h), v in self.profile.slots.items()],
            "profile_recent": [[h, list(v)] for h, v in self.profile.latest.items()],
            "hour": [
                None if self.hour.key is None else self.hour.key[0].isoformat(),
                None if self.hour.key is None else self.hour.key[1],
                self.hour.sum_kw,
                self.hour.count,
                self.hour.day_type,
            ],
            "window": list(self.window),
            "shift_window": [
                [t, v] for t, v in zip(self.shift_times, self.shift_values, strict=True)
            ],
            "hour_window": [list(p) for p in self.hour_window],
            "pending": None if self.pending is None else astuple(self.pending),
            "dip": None if self.dip is None else astuple(self.dip),
            "run": [self.run_value, self.run_length, self.run_start_s, self.run_at_peak],
            "drop_back": [self.drop_back_since_s, self.drop_back_readings],
            "last_crossing_s": None if math.isinf(self.last_crossing_s) else self.last_crossing_s,
            "natural_runs": self.natural_runs.to_state(),
            "open": {
                label: [i.alert.model_dump(mode="json"), i.extreme]
                for label, i in self.open.items()
            },
            "sun_ratios": list(self.sun_ratios),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take up a checkpoint of :meth:`to_state`."""
        self.first_s, self.last_s = state["first_s"], state["last_s"]
        self.recent = list(state["recent"])[-LOCAL_READINGS:]
        self.residuals.restore(state["residuals"])
        self.levels.restore(state["levels"])
        self.diffs.restore(state["diffs"])
        for day_type, hour, values in state["profile"]:
            for value in values:
                self.profile.add(day_type, hour, value)
        # (Replaying the slots above filled the latest days out of order.)
        self.profile.latest = {h: list(v) for h, v in state.get("profile_recent", [])}
        day, hour, sum_kw, count, day_type = state["hour"]
        key = None if day is None else (date.fromisoformat(day), hour)
        self.hour = _HourAccumulator(key, sum_kw, count, day_type)
        self.window = list(state["window"])[-SHIFT_READINGS:]
        for t, v in state["shift_window"]:
            self.shift_times.append(t)
            self.shift_values.append(v)
        self.hour_window.extend((t, v) for t, v in state["hour_window"])
        self.hour_sum_kw = sum(v for _, v in self.hour_window)
        self.pending = None if state["pending"] is None else _PendingSpike(*state["pending"])
        self.dip = None if state["dip"] is None else _PendingSpike(*state["dip"])
        self.run_value, self.run_length, self.run_start_s = state["run"][:3]
        self.run_at_peak = bool(state["run"][3]) if len(state["run"]) > 3 else False
        self.drop_back_since_s, self.drop_back_readings = state.get("drop_back", [None, 0])
        crossed = state.get("last_crossing_s")
        self.last_crossing_s = -math.inf if crossed is None else crossed
        self.natural_runs.restore(state["natural_runs"])
        self.open = {
            label: _Incident(Alert.model_validate(alert), extreme)
            for label, (alert, extreme) in state["open"].items()
        }
        self.sun_ratios = list(state["sun_ratios"])[-LOCAL_READINGS:]

    # --- thresholds -----------------------------------------------------------------

    def tails_known(self) -> bool:
        """Whether enough residuals say what a 0.1 % tail is (once true, true for good)."""
        if not self._tails_known:
            self._tails_known = len(self.residuals) >= TAIL_SAMPLES
        return self._tails_known

    def warmed_up(self, ts_s: float) -> bool:
        # Once true, true for good: readings only move forward and samples only grow.
        if not self._ready:
            self._ready = (
                self.first_s is not None
                and ts_s - self.first_s >= self.settings.warmup_h * 3600.0
                and len(self.residuals) >= 50
            )
        return self._ready

    def noise_kw(self) -> float:
        """Typical change between consecutive normal readings. [kW]"""
        if self._noise[0] != self.diffs.version:
            self._noise = (self.diffs.version, self.diffs.quantile(0.5) if len(self.diffs) else 0.0)
        return self._noise[1]

    def residual_bounds(self) -> tuple[float, float]:
        """(lower, upper) bounds of a normal residual; cached until the samples refresh."""
        key = (self.residuals.version, self.diffs.version)
        if self._bounds[0] != key:
            self._bounds = (key, self._residual_bounds())
        return self._bounds[1]

    def _residual_bounds(self) -> tuple[float, float]:
        tail = self.settings.tail_factor
        q_low, q50, q_high = (self.residuals.quantile(q) for q in (0.001, 0.5, 0.999))
        # A floor of a few reading-noise steps: a device that never moved would otherwise
        # flag its first quantisation step.
        floor = max(4.0 * self.noise_kw(), 1e-3)
        return q50 - max(tail * (q50 - q_low), floor), q50 + max(tail * (q_high - q50), floor)

    def day_type(self, ts_s: float) -> int:
        return self._day_type(self.clock.at(ts_s))

    def _day_type(self, local: LocalTime) -> int:
        """1 on weekends and holidays, 0 on working days."""
        if self._typed[0] is not local:
            holiday = local.day in self._holidays
            self._typed = (local, 1 if local.weekday >= 5 or holiday else 0)
        return self._typed[1]

    def expectation(self, ts_s: float) -> tuple[float, float] | None:
        """The profile's (expected power, spread) at ``ts_s``, if learned. [kW]"""
        return self._expectation(self.clock.at(ts_s))

    def _expectation(self, local: LocalTime) -> tuple[float, float] | None:
        # The answer changes only with the hour, the profile and the noise.
        key = (local.hour, local.day, self.profile.version, self.diffs.version)
        if self._expected[0] != key:
            self._expected = (key, self._expectation_now(local))
        return self._expected[1]

    def _expectation_now(self, local: LocalTime) -> tuple[float, float] | None:
        found = self.profile.expected(
            self._day_type(local), local.hour, self.settings.min_history_days
        )
        if found is None:
            return None
        expected_kw, spread_kw = found
        floor_kw = max(0.05 * abs(expected_kw), 2.0 * self.noise_kw(), 1e-3)
        return expected_kw, max(spread_kw, floor_kw)

    # --- the stream -------------------------------------------------------------------

    def observe(
        self,
        at: datetime,
        power_kw: float,
        irradiance_w_m2: float | None = None,
        ts_s: float | None = None,
    ) -> list[Alert]:
        """Take one reading; the alerts it starts or ends. PV passes its irradiance;
        ``ts_s`` is ``at`` in seconds since the epoch, if the caller has it."""
        if ts_s is None:
            ts_s = at.timestamp()
        if self.last_s is not None and ts_s <= self.last_s:
            return []  # a duplicate or late reading: the baselines only move forward
        if self.first_s is None:
            self.first_s = ts_s
        self.last_s = ts_s
        out: list[Alert] = []
        ready = self._ready or self.warmed_up(ts_s)
        level_kw = median(self.recent) if self.recent else power_kw
        residual_kw = power_kw - level_kw
        local = self.clock.at(ts_s)
        expectation = self._expectation(local) if ready else None

        window = self.window
        window.append(power_kw)
        if len(window) > SHIFT_READINGS:
            del window[0]
        faulty = self._stuck(at, ts_s, power_kw, ready, out)
        faulty = (
            self._spike(at, ts_s, power_kw, irradiance_w_m2, level_kw, residual_kw, ready, out)
            or faulty
        )
        if irradiance_w_m2 is not None and irradiance_w_m2 >= SUNLIT_W_M2:
            _push(self.sun_ratios, power_kw / irradiance_w_m2, LOCAL_READINGS)
        # PV follows the weather: a cloudy day is far below a time-of-day profile, and a
        # passing cloud is a dip. Its drops and lasting losses are judged against
        # irradiance by the solar detector (processors/solar.py), not here.
        if self.kind != "solar":
            dropped = self._drop(at, ts_s, power_kw, level_kw, residual_kw, expectation, ready, out)
            faulty = dropped or faulty
            self._level_shift(at, ts_s, power_kw, expectation, out)
        if self.kind in CONSUMPTION_KINDS:
            # A spike or a dropout is not consumption: the hour counts the level instead.
            consumed_kw = level_kw if faulty else power_kw
            self._high_consumption(at, ts_s, consumed_kw, expectation, out)

        if not faulty:
            self._learn(local, power_kw, residual_kw)
        return out

    def _learn(self, local: LocalTime, power_kw: float, residual_kw: float) -> None:
        if self.recent:
            self.diffs.add(abs(power_kw - self.recent[-1]))
        _push(self.recent, power_kw, LOCAL_READINGS)
        self.residuals.add(residual_kw)
        self.levels.add(power_kw)
        hour = self.hour
        if hour.key is None or local.hour != hour.key[1] or local.day != hour.key[0]:
            if hour.key is not None and hour.count:
                self.profile.add(hour.day_type, hour.key[1], hour.sum_kw / hour.count)
            self.hour = _HourAccumulator((local.day, local.hour), 0.0, 0, self._day_type(local))
        self.hour.sum_kw += power_kw
        self.hour.count += 1

    # --- rules ------------------------------------------------------------------------

    def _fire(
        self,
        label: str,
        start: datetime,
        detected: datetime,
        observed: float,
        expected: float | None,
        message: str,
        out: list[Alert],
        **details: float | str | bool,
    ) -> Alert:
        alert = firing(
            site=self.site,
            device=self.device,
            alert_type=label,
            severity=Severity.WARNING,
            subject=f"{self.device}: {label.replace('_', ' ')}",
            message=message,
            start=start,
            observed=round(observed, 6),
            expected=None if expected is None else round(expected, 6),
            details={"detected_at": _ts(detected), "kind": self.kind, **details},
        )
        out.append(alert)
        return alert

    def _resolve(self, label: str, end: datetime, out: list[Alert]) -> None:
        incident = self.open.pop(label, None)
        if incident is not None:
            out.append(resolved(incident.alert, end, {"extreme_kw": round(incident.extreme, 6)}))

    def _stuck(
        self, at: datetime, ts_s: float, power_kw: float, ready: bool, out: list[Alert]
    ) -> bool:
        value = self.run_value
        same = value is not None and abs(power_kw - value) <= 1e-9 + 1e-7 * abs(value)
        if same:
            self.run_length += 1
            if self.run_length == 2:
                self.run_start_s = ts_s
        else:
            if "stuck" in self.open:
                self._resolve("stuck", at, out)
            elif self.run_length >= 2 and value != 0.0 and not self.open and not self.run_at_peak:
                # Zeros are never stuck, a run inside another incident (a dropout) is not
                # how this device naturally repeats, and a clipping inverter's plateau is
                # excused on its own: none may raise the bar.
                self.natural_runs.add(float(self.run_length))
            self.run_value = power_kw
            self.run_length = 1
            self.run_at_peak = False
            return False
        if "stuck" in self.open:
            return True
        # A high quantile, not the longest: one freeze too short to be caught must not
        # raise the bar for good.
        longest = self._natural_run()
        needed = max(self.settings.stuck_min_readings, int(longest) + 2)
        # At the device's peak (an inverter clipping at its limit) a flat value is normal,
        # for as long as the sun can hold an inverter at its limit.
        at_peak = (
            self.kind == "solar"
            and len(self.levels) > 0
            and power_kw >= self.levels.quantile(PEAK_QUANTILE)
            and ts_s - self.run_start_s < CLIP_MAX_S
        )
        self.run_at_peak = self.run_at_peak or at_peak
        if not ready or power_kw == 0.0 or at_peak or self.run_length < needed:
            return False
        start = datetime.fromtimestamp(self.run_start_s, UTC)
        alert = self._fire(
            "stuck",
            start,
            at,
            power_kw,
            None,
            f"{self.device} has reported exactly {power_kw:g} kW for {self.run_length} readings "
            f"(its natural repeats reach {longest:g})",
            out,
            readings=self.run_length,
        )
        self.open["stuck"] = _Incident(alert, power_kw)
        return True

    def _natural_run(self) -> float:
        """The natural run length (readings); cached until a run is learned."""
        runs = self.natural_runs
        if self._run_bar[0] != runs.version:
            self._run_bar = (
                runs.version,
                runs.quantile(NATURAL_RUN_QUANTILE) if len(runs) else 1.0,
            )
        return self._run_bar[1]

    def _sunlit_jump(self, power_kw: float, irradiance_w_m2: float | None) -> bool:
        """Whether the sun explains a PV jump: output per irradiance stayed where it was.

        A gap in the clouds lifts a PV array's output several-fold for a minute; with the
        irradiance measured, that is not a spike.
        """
        if irradiance_w_m2 is None or irradiance_w_m2 < SUNLIT_W_M2 or not self.sun_ratios:
            return False
        return power_kw / irradiance_w_m2 <= SPIKE_RATIO * median(self.sun_ratios)

    def _spike(
        self,
        at: datetime,
        ts_s: float,
        power_kw: float,
        irradiance_w_m2: float | None,
        level_kw: float,
        residual_kw: float,
        ready: bool,
        out: list[Alert],
    ) -> bool:
        # The bounds come from the 0.1 % tails: they mean something from 1000 residuals on.
        if not ready or not self.tails_known():
            return False
        _, upper_kw = self.residual_bounds()
        pending = self.pending
        if pending is not None and pending.readings > self.settings.spike_max_readings:
            # Too long for a spike: the level moved (the profile rules judge that) and the
            # local level has been learning it. Once it has caught up, spikes count again.
            if residual_kw >= 0.5 * upper_kw:
                pending.readings += 1
                return False
            self.pending = pending = None
        if pending is not None:
            if power_kw - pending.level_kw < 0.5 * upper_kw:
                # Back to normal within the allowed length: it was a spike.
                self.pending = None
                start = datetime.fromtimestamp(pending.start_s, UTC)
                alert = self._fire(
                    "spike",
                    start,
                    at,
                    pending.peak_kw,
                    pending.level_kw,
                    f"{self.device} jumped to {pending.peak_kw:.3f} kW for {pending.readings} "
                    f"reading(s) from a level of {pending.level_kw:.3f} kW",
                    out,
                    readings=pending.readings,
                    threshold_kw=round(pending.level_kw + upper_kw, 6),
                )
                out.append(resolved(alert, at))
                return False
            pending.readings += 1
            pending.peak_kw = max(pending.peak_kw, power_kw)
            return pending.readings <= self.settings.spike_max_readings
        if residual_kw > upper_kw and not self._sunlit_jump(power_kw, irradiance_w_m2):
            self.pending = _PendingSpike(ts_s, power_kw, level_kw, 1)
            # The sample learns that something reached the line (not how far beyond) when
            # it happens again within SPIKE_REPEAT_S: an event the device makes often (a
            # home's daily oven) soon moves the line above itself, while a rare fault
            # leaves it where it is, at 5-minute steps as at half-hourly ones.
            if ts_s - self.last_crossing_s < SPIKE_REPEAT_S:
                self.residuals.add(upper_kw)
            self.last_crossing_s = ts_s
            return True
        return False

    def _drop(
        self,
        at: datetime,
        ts_s: float,
        power_kw: float,
        level_kw: float,
        residual_kw: float,
        expectation: tuple[float, float] | None,
        ready: bool,
        out: list[Alert],
    ) -> bool:
        if not ready:
            return False
        lower_kw, _ = self.residual_bounds()
        if self._lowest[0] != self.levels.version:
            self._lowest = (self.levels.version, self.levels.quantile(0.005))
        lowest_kw = self._lowest[1]
        reasons = []
        if lowest_kw > 0 and power_kw < 0.5 * lowest_kw:
            reasons.append("below_normal_floor")
        # (A reading at a quarter of the expectation or above rules the median out.)
        if (
            expectation is not None
            and power_kw < 0.25 * expectation[0]
            and len(self.window) == SHIFT_READINGS
        ):
            expected_kw, spread_kw = expectation
            recent_kw = median(self.window)
            if (
                expected_kw > 0
                and max(recent_kw, power_kw) < 0.25 * expected_kw
                and expected_kw - recent_kw > self.settings.shift_spreads * spread_kw
            ):
                reasons.append("below_profile")
        # A dip below the local level counts only while it is short: a level that stays
        # down is a change of use, and the floor and profile rules judge it.
        # Back down to what is usual at this time of week is not a drop.
        usual_kw = expectation[0] if expectation is not None else math.inf
        if self.tails_known() and residual_kw < lower_kw and power_kw < 0.5 * usual_kw:
            dip = self.dip
            if dip is None:
                dip = self.dip = _PendingSpike(ts_s, power_kw, level_kw, 0)
            dip.readings += 1
            if dip.readings <= self.settings.spike_max_readings:
                reasons.append("below_local_level")
        else:
            self.dip = None
        incident = self.open.get("drop")
        if not reasons:
            if incident is not None:
                # Back for a while, not for a reading: a home left empty flickers about
                # its floor, and that is one drop, not a hundred.
                if self.drop_back_since_s is None:
                    self.drop_back_since_s = ts_s
                    self.drop_back_readings = 0
                self.drop_back_readings += 1
                if (
                    ts_s - self.drop_back_since_s >= DROP_BACK_S
                    and self.drop_back_readings >= DROP_BACK_READINGS
                ):
                    self._resolve("drop", datetime.fromtimestamp(self.drop_back_since_s, UTC), out)
                    self.drop_back_since_s = None
            return False
        self.drop_back_since_s = None
        if incident is not None:
            incident.extreme = min(incident.extreme, power_kw)
            return True
        expected_kw = expectation[0] if expectation is not None else level_kw
        alert = self._fire(
            "drop",
            at,
            at,
            power_kw,
            level_kw,
            f"{self.device} fell to {power_kw:.3f} kW from a level of {level_kw:.3f} kW",
            out,
            rules=",".join(reasons),
            profile_kw=round(expected_kw, 6),
        )
        self.open["drop"] = _Incident(alert, power_kw)
        return True

    def _level_shift(
        self,
        at: datetime,
        ts_s: float,
        power_kw: float,
        expectation: tuple[float, float] | None,
        out: list[Alert],
    ) -> None:
        times, values = self.shift_times, self.shift_values
        times.append(ts_s)
        values.append(power_kw)
        window_s = self.settings.shift_window_min * 60.0
        # At least four readings, whatever the step: at 15-minute steps two or three are
        # one cooking hour, not "the whole window".
        while len(times) > SHIFT_MIN_READINGS and times[0] <= ts_s - window_s:
            times.popleft()
            values.popleft()
        incident = self.open.get("level_shift")
        if (
            expectation is None
            or len(times) < SHIFT_MIN_READINGS
            or ts_s - times[0] < 0.75 * window_s
        ):
            return
        expected_kw, spread_kw = expectation
        ordered = sorted(values)
        recent_kw = median_of_sorted(ordered)
        z = (recent_kw - expected_kw) / spread_kw
        limit = self.settings.shift_spreads
        if incident is not None:
            incident.extreme = (
                recent_kw
                if abs(recent_kw - expected_kw) > abs(incident.extreme - expected_kw)
                else incident.extreme
            )
            up = incident.alert.details.get("direction") == "up"
            moved = sorted(self._moved_kw(expected_kw, up))
            back_z = median_of_sorted(moved) / spread_kw
            if (back_z < 0.5 * limit) if up else (back_z > -0.5 * limit):
                self._resolve("level_shift", at, out)
            return
        # The lower quartile is never above the median, nor the upper one below it: a
        # median within the limit (by a margin for rounding) rules both out.
        if abs(z) < limit - 1e-6:
            return
        # A drop or a stuck value explains a deviation better than a shift does.
        if "drop" in self.open or "stuck" in self.open:
            return
        up = z > 0
        # Each reading against what is usual at its own hour (a window may span two).
        moved_kw = self._moved_kw(expected_kw, up)
        moved = sorted(moved_kw)
        # The whole window must have moved: its lower quartile up, or its upper one down.
        # A cooking hour or an appliance run lifts a few readings, a shift lifts them all.
        if up and quantile_of_sorted(moved, 0.25) / spread_kw > limit:
            z = max(median_of_sorted(moved) / spread_kw, limit)
        elif not up and quantile_of_sorted(moved, 0.75) / spread_kw < -limit:
            z = min(median_of_sorted(moved) / spread_kw, -limit)
        else:
            return
        # The shift began at the earliest of the trailing readings that are beyond the limit.
        start_s = ts_s
        for value_ts, value_kw in zip(reversed(times), reversed(moved_kw), strict=True):
            if value_kw / spread_kw * math.copysign(1.0, z) <= limit:
                break
            start_s = value_ts
        reference_kw = power_kw - moved_kw[-1]  # what is usual now
        direction = "up" if up else "down"
        alert = self._fire(
            "level_shift",
            datetime.fromtimestamp(start_s, UTC),
            at,
            recent_kw,
            reference_kw,
            f"{self.device} moved {direction} to {recent_kw:.3f} kW where {reference_kw:.3f} kW "
            f"is usual at this time of week ({z:+.1f} spreads)",
            out,
            direction=direction,
            spreads=round(z, 3),
        )
        self.open["level_shift"] = _Incident(alert, recent_kw)

    def _moved_kw(self, expected_kw: float, up: bool) -> list[float]:
        """How far each reading of the shift window is from what is usual at its hour."""
        references: dict[int, float] = {}
        moved = []
        for ts_s, value_kw in zip(self.shift_times, self.shift_values, strict=True):
            local = self.clock.at(ts_s)
            reference_kw = references.get(local.hour)
            if reference_kw is None:
                reference_kw = references[local.hour] = self._shift_reference_kw(
                    local, expected_kw, up
                )
            moved.append(value_kw - reference_kw)
        return moved

    def _shift_reference_kw(self, local: LocalTime, expected_kw: float, up: bool) -> float:
        """What a shift up (or down) at ``local`` is measured from: the profile's
        expectation at that hour (``expected_kw``, the current hour's, until it has one),
        or, if further in the shift's direction, what the device draws at that hour on
        nine days in ten (up) and what the last days did then."""
        day_type = self._day_type(local)
        found = self.profile.expected(day_type, local.hour, self.settings.min_history_days)
        known = [expected_kw if found is None else found[0]]
        recent_kw = self.profile.recent(local.hour)
        if recent_kw is not None:
            known.append(recent_kw)
        if up:
            high_kw = self.profile.usual_high(day_type, local.hour, self.settings.min_history_days)
            if high_kw is not None:
                known.append(high_kw)
        return max(known) if up else min(known)

    def _high_consumption(
        self,
        at: datetime,
        ts_s: float,
        power_kw: float,
        expectation: tuple[float, float] | None,
        out: list[Alert],
    ) -> None:
        window = self.hour_window
        window.append((ts_s, power_kw))
        self.hour_sum_kw += power_kw
        while window and window[0][0] <= ts_s - 3600.0:
            self.hour_sum_kw -= window.popleft()[1]
        if expectation is None or ts_s - window[0][0] < 3600.0 * 0.75:
            return
        hour_mean_kw = self.hour_sum_kw / len(window)
        expected_kw, spread_kw = expectation
        incident = self.open.get("high_consumption")
        excess_kw = hour_mean_kw - expected_kw
        if incident is not None:
            incident.extreme = max(incident.extreme, hour_mean_kw)
            if excess_kw < 0.5 * self.settings.high_consumption_spreads * spread_kw:
                self._resolve("high_consumption", at, out)
            return
        if (
            excess_kw <= self.settings.high_consumption_spreads * spread_kw
            or excess_kw <= 0.5 * abs(expected_kw)
        ):
            return
        # The hour's mean says little about when the excess began: start at detection.
        alert = self._fire(
            "high_consumption",
            at,
            at,
            hour_mean_kw,
            expected_kw,
            f"{self.device} drew {hour_mean_kw:.3f} kW over the last hour where "
            f"{expected_kw:.3f} kW is usual at this time of week",
            out,
            excess_kw=round(excess_kw, 6),
        )
        self.open["high_consumption"] = _Incident(alert, hour_mean_kw)
