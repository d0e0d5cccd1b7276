"""Vampire loads: consumption in a site's idle hours above what it learned to draw then.

A site is idle at configured times (``[sites.detection] idle`` windows such as
01:00-05:00, ``idle_days`` such as the weekend of an office, ``holidays``).
What a device draws then is its standby: fridge, router, alarm, heat pump
circulation.

Inside an idle period the detector follows the **floor** (lower quartile) of
the readings of the last 30 minutes and of the last 2 hours (``WINDOWS_MIN``):
a load left on lifts every reading, the quietest too, while appliance runs and
late cooking lift only some. Each window's floor is compared with a **line**
learned from the same statistic in earlier idle periods without an incident:
its median plus ``TAIL_FACTOR`` times its median-to-99.5th-percentile span, and
at least ``vampire_margin_kw`` and ``vampire_margin_pct`` of the idle baseline
above that median. The short window finds a big load in about half an hour,
the long one a small load that only stands out of the noise over hours.

A window's floor above its line for ``vampire_min_duration_min`` (the window
itself counting for three quarters of its length: its floor above the line
means most of it was) raises a ``vampire`` alert, one per idle period. It
starts when the floor crossed the line (later than the load, never before it
on noise) and resolves when every floor is back under the midpoint between the
usual and the line, or when the idle period ends. The firing event carries the
excess kW and its cost per idle hour; the resolved one the wasted energy (the
excess over the idle baseline integrated over the incident) and its cost at
``price_per_kwh``.

A period with an incident does not teach the baseline, so a load left on stays
an alert every night, for ``NEW_STANDBY_PERIODS`` nights in a row: then it is
the new standby (winter heating, a new fridge), and the baseline starts again
from that night. A period whose excess another incident explains (a level
shift, a drop, a stuck value: the caller says so) neither fires nor teaches.

Plain Python (no Faust import).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from pipeline.schemas import Alert, Severity
from processors.alerting import firing, resolved
from processors.anomaly import WEEKDAYS, DetectionSettings
from processors.baselines import (
    QUARTER_HOUR_S,
    LocalClock,
    LocalTime,
    RollingSample,
    quantile_of_sorted,
)

MIN_BASELINE_PERIODS = 3
NEW_STANDBY_PERIODS = 7
"""Idle periods in a row with a vampire load after which it is the new standby: a
week of nights, longer than a load left on by mistake goes unnoticed. [-]"""
MIN_PERIOD_READINGS = 3
"""An idle period with fewer readings than this does not teach the baseline. [-]"""
IDLE_SAMPLE = 2000
"""Idle readings and window floors remembered: two weeks of 4-hour nights at 5-minute
steps. [-]"""
WINDOWS_MIN = (30.0, 120.0)
"""The windows whose floor is watched: a big vampire load shows in half an hour, a small
one needs two hours of readings to stand out of the noise. [min]"""
FLOOR_QUANTILE = 0.25
"""The statistic of a window is its lower quartile: a load left on lifts every reading,
the quietest too, while appliance runs and late cooking lift only some. [-]"""
TAIL_FACTOR = 1.5
"""Lines sit at the median of the learned window floors plus this many times their
median-to-99.5 % span: beyond the highest the device reached in normal idle hours. [-]"""


@dataclass
class _Period:
    """The idle period being read: its readings and whether it had an incident."""

    key: tuple[date, int]
    first_s: float
    times_s: list[float] = field(default_factory=list)
    values_kw: list[float] = field(default_factory=list)
    stats: list[tuple[float | None, ...]] = field(default_factory=list)
    above_since: list[float | None] = field(default_factory=lambda: [None] * len(WINDOWS_MIN))
    """Per window: since when its floor has been above its line (the incident's start)."""
    had_incident: bool = False
    load_seen: bool = False
    """A vampire load was above its line long enough (its alert fired)."""


@dataclass
class _Stretch:
    start_s: float
    detected_s: float
    baseline_kw: float
    resolve_kw: list[float]
    """Below these window floors the excess is over."""
    excess_kwh: float = 0.0
    peak_kw: float = 0.0
    alert: Alert | None = None


class VampireDetector:
    """Vampire loads of one consumption device. Feed readings in time order."""

    def __init__(
        self, site: str, device: str, kind: str, settings: DetectionSettings | None = None
    ) -> None:
        self.site = site
        self.device = device
        self.kind = kind
        self.settings = settings or DetectionSettings()
        self.clock = LocalClock(self.settings.timezone)
        self._idle_days = {WEEKDAYS.index(d) for d in self.settings.idle_days}
        self._holidays = set(self.settings.holidays)
        self._idle_of: tuple[LocalTime | None, tuple[date, int] | None, bool] = (None, None, False)
        """The last quarter hour asked about, its idle period, and whether that holds
        for the whole quarter hour."""
        self._lines_of: tuple[tuple[int, ...], float, list[float]] = ((), 0.0, [])
        self._busy_until_s = -math.inf
        """Readings before this instant are outside every idle window. [s]"""
        self._quarter_windows = all(
            w.start.minute % 15 == 0 and w.end.minute % 15 == 0 for w in self.settings.idle
        )
        self.idle_readings = RollingSample(IDLE_SAMPLE)
        self.learned_stats = [RollingSample(IDLE_SAMPLE) for _ in WINDOWS_MIN]
        self.periods_learned = 0
        self.loaded_periods = 0
        """Idle periods in a row with a vampire load."""
        self.period: _Period | None = None
        self.stretch: _Stretch | None = None
        self.last_s: float | None = None

    def to_state(self) -> dict[str, Any]:
        """What the detector has learned, as plain JSON (a Faust table checkpoint)."""
        period = self.period
        stretch = self.stretch
        return {
            "idle_readings": self.idle_readings.to_state(),
            "learned_stats": [learned.to_state() for learned in self.learned_stats],
            "periods_learned": self.periods_learned,
            "loaded_periods": self.loaded_periods,
            "last_s": self.last_s,
            "period": None
            if period is None
            else {
                "key": [period.key[0].isoformat(), period.key[1]],
                "first_s": period.first_s,
                "times_s": period.times_s,
                "values_kw": period.values_kw,
                "stats": [list(stats) for stats in period.stats],
                "above_since": period.above_since,
                "had_incident": period.had_incident,
                "load_seen": period.load_seen,
            },
            "stretch": None
            if stretch is None
            else {
                "start_s": stretch.start_s,
                "detected_s": stretch.detected_s,
                "baseline_kw": stretch.baseline_kw,
                "resolve_kw": stretch.resolve_kw,
                "excess_kwh": stretch.excess_kwh,
                "peak_kw": stretch.peak_kw,
                "alert": None if stretch.alert is None else stretch.alert.model_dump(mode="json"),
            },
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take up a checkpoint of :meth:`to_state`."""
        self.idle_readings.restore(state["idle_readings"])
        for learned, values in zip(self.learned_stats, state["learned_stats"], strict=True):
            learned.restore(values)
        self.periods_learned = state["periods_learned"]
        self.loaded_periods = state.get("loaded_periods", 0)
        self.last_s = state["last_s"]
        period = state["period"]
        if period is not None:
            self.period = _Period(
                (date.fromisoformat(period["key"][0]), period["key"][1]),
                period["first_s"],
                period["times_s"],
                period["values_kw"],
                [tuple(stats) for stats in period["stats"]],
                period["above_since"],
                period["had_incident"],
                period.get("load_seen", False),
            )
        stretch = state["stretch"]
        if stretch is not None:
            alert = stretch.pop("alert")
            self.stretch = _Stretch(
                **stretch, alert=None if alert is None else Alert.model_validate(alert)
            )

    def idle_period(self, ts_s: float) -> tuple[date, int] | None:
        """Which idle period ``ts_s`` is in, as (local date it began, window index), if any."""
        local = self.clock.at(ts_s)
        cached, key, whole_quarter = self._idle_of
        if cached is local and whole_quarter:
            return key
        day = local.day
        weekday = local.weekday
        if day in self._holidays or weekday in self._idle_days:
            self._idle_of = (local, (day, -1), True)
            return (day, -1)
        minute = local.minute_of_day(ts_s)
        found = None
        for index, window in enumerate(self.settings.idle):
            if window.contains(minute, weekday):
                found = (day, index)
                break
        # Windows on whole quarter hours (01:00-05:00) hold for the rest of the quarter.
        whole_quarter = self._quarter_windows and local.base_minute % 15 == 0
        self._idle_of = (local, found, whole_quarter)
        return found

    def _next_idle_quarter_s(self, ts_s: float) -> float:
        """The start of the first quarter hour after ``ts_s``'s that may be idle (at most a
        day ahead): readings before it need no look at the calendar."""
        quarter_s = math.floor(ts_s / QUARTER_HOUR_S) * QUARTER_HOUR_S + QUARTER_HOUR_S
        for _ in range(96):
            if self.idle_period(quarter_s) is not None or not self._idle_of[2]:
                break
            quarter_s += QUARTER_HOUR_S
        return quarter_s

    def observe(
        self,
        at: datetime,
        power_kw: float,
        explained: bool = False,
        ts_s: float | None = None,
    ) -> list[Alert]:
        """Take one reading; ``explained`` when another incident on the device explains it
        (a level shift): then it neither fires a vampire alert nor teaches the baseline.
        ``ts_s`` is ``at`` in seconds since the epoch, if the caller has it."""
        if ts_s is None:
            ts_s = at.timestamp()
        if (
            self.period is None
            and self.last_s is not None
            and self.last_s < ts_s < self._busy_until_s
        ):
            # Still in the quarter hour last found outside every idle window.
            self.last_s = ts_s
            return []
        if self.last_s is not None and ts_s <= self.last_s:
            return []
        step_h = 0.0 if self.last_s is None else (ts_s - self.last_s) / 3600.0
        self.last_s = ts_s
        out: list[Alert] = []
        period_key = self.idle_period(ts_s)
        if self.period is not None and (period_key is None or not self._same_period(period_key)):
            self._end_period(at, out)
        if period_key is None:
            if self._idle_of[2]:
                self._busy_until_s = self._next_idle_quarter_s(ts_s)
            return out
        if self.period is None:
            self.period = _Period(period_key, ts_s)
        period = self.period
        if explained:
            period.had_incident = True
        period.times_s.append(ts_s)
        period.values_kw.append(power_kw)
        stats = self._window_floors(period)
        period.stats.append(stats)
        stretch = self.stretch
        if stretch is not None:
            stretch.excess_kwh += max(0.0, power_kw - stretch.baseline_kw) * step_h
            stretch.peak_kw = max(stretch.peak_kw, power_kw)
            if all(s is None or s < t for s, t in zip(stats, stretch.resolve_kw, strict=True)):
                self._end_stretch(at, out)
            return out
        # One incident per idle period: a load that comes and goes in a night is one finding.
        if self.periods_learned < MIN_BASELINE_PERIODS or period.had_incident:
            return out
        baseline_kw, lines = self._lines()
        duration_s = self.settings.vampire_min_duration_min * 60.0
        for index, (window_min, stat, line) in enumerate(
            zip(WINDOWS_MIN, stats, lines, strict=True)
        ):
            if stat is None or stat <= line:
                period.above_since[index] = None
                continue
            if period.above_since[index] is None:
                # The incident starts when the window's floor crossed the line: later than
                # the load itself (by up to the window), never before it on noise.
                period.above_since[index] = ts_s
            start_s = period.above_since[index]
            assert start_s is not None
            # The window's floor above the line means most of the window was: that counts
            # towards the duration a vampire load must last (late cooking does not).
            if ts_s - start_s + 0.75 * window_min * 60.0 < duration_s:
                continue
            resolve_kw = [0.5 * (b + ln) for b, ln in zip(self._usual_floors(), lines, strict=True)]
            self.stretch = _Stretch(start_s, ts_s, baseline_kw, resolve_kw)
            # The incident began at start_s: its waste counts from there, not from now.
            first = bisect.bisect_left(period.times_s, start_s)
            for k in range(max(first, 1), len(period.times_s)):
                step_in_h = (period.times_s[k] - period.times_s[k - 1]) / 3600.0
                excess_kw = max(0.0, period.values_kw[k] - baseline_kw)
                self.stretch.excess_kwh += excess_kw * step_in_h
            self.stretch.peak_kw = max(period.values_kw[first:])
            self._fire(at, stat, baseline_kw, window_min, self.stretch, out)
            break
        return out

    def _window_floors(self, period: _Period) -> tuple[float | None, ...]:
        """The floor of each window's readings, once the period has lasted that long."""
        now_s = period.times_s[-1]
        out: list[float | None] = []
        for window_min in WINDOWS_MIN:
            first_s = now_s - window_min * 60.0
            if period.times_s[0] > first_s + 6.0 * window_min:  # 10 % of the window
                out.append(None)  # the period has not covered this window yet
                continue
            index = bisect.bisect_right(period.times_s, first_s)
            out.append(quantile_of_sorted(sorted(period.values_kw[index:]), FLOOR_QUANTILE))
        return tuple(out)

    def _lines(self) -> tuple[float, list[float]]:
        """The idle baseline and each window's line; cached until the samples refresh."""
        key = (self.idle_readings.version, *(learned.version for learned in self.learned_stats))
        if self._lines_of[0] != key:
            baseline_kw = self.idle_readings.quantile(0.5)
            margin_kw = self._min_excess_kw(baseline_kw)
            lines = [
                center + max(TAIL_FACTOR * (learned.quantile(0.995) - center), margin_kw)
                for learned in self.learned_stats
                for center in (learned.quantile(0.5),)
            ]
            self._lines_of = (key, baseline_kw, lines)
        return self._lines_of[1], self._lines_of[2]

    def _usual_floors(self) -> list[float]:
        return [learned.quantile(0.5) for learned in self.learned_stats]

    def _min_excess_kw(self, baseline_kw: float) -> float:
        return max(
            self.settings.vampire_margin_kw,
            self.settings.vampire_margin_pct / 100.0 * abs(baseline_kw),
        )

    def _same_period(self, key: tuple[date, int]) -> bool:
        assert self.period is not None
        if key == self.period.key:
            return True
        # The same window after midnight: its date moved by one day.
        return key[1] == self.period.key[1] >= 0 and (key[0] - self.period.key[0]).days == 1

    def _fire(
        self,
        at: datetime,
        stat_kw: float,
        baseline_kw: float,
        window_min: float,
        stretch: _Stretch,
        out: list[Alert],
    ) -> None:
        excess_kw = stat_kw - baseline_kw
        settings = self.settings
        alert = firing(
            site=self.site,
            device=self.device,
            alert_type="vampire",
            severity=Severity.WARNING,
            subject=f"{self.device}: vampire load in idle hours",
            message=(
                f"{self.device} draws {stat_kw:.3f} kW (floor of {window_min:g} min) in idle "
                f"hours where its standby is {baseline_kw:.3f} kW: {excess_kw:.3f} kW wasted, "
                f"{excess_kw * settings.price_per_kwh:.3f} {settings.currency} per idle hour"
            ),
            start=datetime.fromtimestamp(stretch.start_s, UTC),
            observed=round(stat_kw, 6),
            expected=round(baseline_kw, 6),
            details={
                "detected_at": at.isoformat(),
                "kind": self.kind,
                "excess_kw": round(excess_kw, 6),
                "window_min": window_min,
                "cost_per_idle_hour": round(excess_kw * settings.price_per_kwh, 6),
                "currency": settings.currency,
            },
        )
        stretch.alert = alert
        assert self.period is not None
        self.period.had_incident = True
        self.period.load_seen = True
        out.append(alert)

    def _end_stretch(self, at: datetime, out: list[Alert]) -> None:
        stretch = self.stretch
        self.stretch = None
        if stretch is None or stretch.alert is None:
            return
        settings = self.settings
        out.append(
            resolved(
                stretch.alert,
                at,
                {
                    "wasted_kwh": round(stretch.excess_kwh, 6),
                    "wasted_cost": round(stretch.excess_kwh * settings.price_per_kwh, 6),
                    "peak_kw": round(stretch.peak_kw, 6),
                },
            )
        )

    def _end_period(self, at: datetime, out: list[Alert]) -> None:
        period = self.period
        assert period is not None
        self._end_stretch(at, out)
        self.period = None
        if len(period.values_kw) < MIN_PERIOD_READINGS:
            return
        self.loaded_periods = self.loaded_periods + 1 if period.load_seen else 0
        if self.loaded_periods >= NEW_STANDBY_PERIODS:
            # A load on for this many idle periods in a row is the new standby (winter
            # heating, a new fridge): the baseline starts again from this period.
            self.idle_readings = RollingSample(IDLE_SAMPLE)
            self.learned_stats = [RollingSample(IDLE_SAMPLE) for _ in WINDOWS_MIN]
            self.periods_learned = 0
            self.loaded_periods = 0
        elif period.had_incident:
            return
        for value in period.values_kw:
            self.idle_readings.add(value)
        for stats in period.stats:
            for learned, stat in zip(self.learned_stats, stats, strict=True):
                if stat is not None:
                    learned.add(stat)
        self.periods_learned += 1
