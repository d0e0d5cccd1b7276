"""The detectors' accuracy harness: labelled faults injected into realistic series.

Households are demandlib's BDEW H25 profile with minute noise and appliance
runs (``ingest.simulators.profiles.household_load_kw``), each home with its own
seed and annual consumption. After ``warmup_days`` of clean data (what a
detector has to learn from), faults are injected one at a time per home, at
random instants, each followed by at least half a day of clean data:

* ``spike``: 1-2 readings raised by 1.5, 2 or 3 times the home's range (median to
  99.9th percentile: a spike goes beyond anything the home does);
* ``drop``: 15 min to 3 h at 0 % or 10 % of the true value (a dropout, a failing CT clamp);
* ``level_shift``: 2-8 h offset by 3 or 5 standard deviations, as a step or as a
  drift that ramps up over its first hour;
* ``stuck``: 30 min to 6 h frozen at the value the window began with;
* ``vampire``: 1-4 days with an extra 0.05, 0.1 or 0.2 kW drawn all the time.

PV arrays (``solar_underperformance``) come from :mod:`pipeline.solar_eval`: pvlib
weather from the bundled TMY, a spec the detector is told that differs from the
simulated array, and sudden losses of 20 % and 50 %, soiling at 1 %/day and a
degradation-like step of 8 %, each on its own array and weather seed.

The sizes are in units of the home's own variability (or, for vampires, in
kW, against a standby of about 0.1-0.3 kW), so they mean the same in a big and a
small home; nothing here is derived from the detectors' thresholds. A vampire
load can only show in idle hours, so its delay is counted from the first idle
instant inside its window.

Everything is seeded: the same arguments give the same series, faults and scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from ingest.simulators.profiles import household_load_kw
from pipeline.schemas import Alert, AlertStatus
from pipeline.solar_eval import FaultKind, evaluation_run
from processors.anomaly import DetectionSettings
from processors.detection import SiteDetection
from processors.scoring import DetectedEvent, LabelledWindow, LabelScore, recall_by_size, score
from processors.vampire import VampireDetector

SITE = "harness"
HOUSEHOLD_TIMEZONE = "Europe/Berlin"
"""The zone of the H25 profile's hours: the homes' site settings use it."""
KINDS = ("spike", "drop", "level_shift", "stuck", "vampire")
SOLAR_FAULTS: tuple[tuple[FaultKind, float], ...] = (
    ("sudden", 0.2),
    ("sudden", 0.5),
    ("soiling", 0.01),
    ("degradation", 0.08),
)
"""PV faults (kind, loss or loss per day) of :mod:`pipeline.solar_eval`, each on its own
array and weather."""
LABELS = (*KINDS, "solar_underperformance")
SPIKE_RANGES = (1.5, 2.0, 3.0)
DROP_FACTORS = (0.0, 0.1)
SHIFT_STDS = (3.0, 5.0)
VAMPIRE_KW = (0.05, 0.1, 0.2)


@dataclass(frozen=True)
class HarnessConfig:
    homes: int = 6
    weeks: float = 6.0
    step_min: int = 5
    warmup_days: float = 14.0
    seed: int = 0
    pv_runs: int = 3
    """Weather seeds per PV fault kind."""
    start: datetime = datetime(2025, 1, 6, tzinfo=UTC)
    settings: DetectionSettings = field(
        default_factory=lambda: DetectionSettings(timezone=HOUSEHOLD_TIMEZONE)
    )


@dataclass
class DeviceSeries:
    device: str
    times: list[datetime]
    power_kw: np.ndarray
    windows: list[LabelledWindow]


@dataclass(frozen=True)
class HarnessResult:
    scores: dict[str, LabelScore]
    by_size: dict[tuple[str, str], tuple[int, int]]
    readings: int
    detect_s: float


def household_series(device: str, config: HarnessConfig, annual_kwh: float) -> DeviceSeries:
    n = int(config.weeks * 7 * 24 * 60 / config.step_min)
    step = timedelta(minutes=config.step_min)
    times = [config.start + k * step for k in range(n)]
    seed = config.seed * 1000 + int(device.rsplit("-", 1)[-1])
    values = np.array(
        [household_load_kw(device, t, annual_kwh=annual_kwh, seed=seed) for t in times]
    )
    return DeviceSeries(device, times, values, [])


def inject_faults(series: DeviceSeries, config: HarnessConfig, rng: np.random.Generator) -> None:
    """Put labelled faults into ``series`` in place (one at a time, in random kinds)."""
    step_s = config.step_min * 60.0
    per_hour = 3600.0 / step_s
    clean = series.power_kw.copy()
    std_kw = float(np.std(clean))
    # A home's own range: from its median to its 99.9th percentile (an oven with the
    # kettle on). A spike reaches beyond that; inside it, it is a home using power.
    range_kw = float(np.quantile(clean, 0.999) - np.median(clean))
    values = series.power_kw
    times = series.times
    idle = VampireDetector(SITE, series.device, "home", config.settings)
    k = int(config.warmup_days * 24 * per_hour)
    n = len(values)
    while True:
        k += int(rng.uniform(12, 36) * per_hour)
        kind = str(rng.choice(KINDS))
        size = ""
        if kind == "spike":
            length = int(rng.integers(1, 3))
            ranges = float(rng.choice(SPIKE_RANGES))
            size = f"+{ranges:g} range"
            end = k + length
            if end >= n:
                break
            values[k:end] = clean[k:end] + ranges * range_kw
        elif kind == "drop":
            length = max(1, int(rng.uniform(0.25, 3.0) * per_hour))
            factor = float(rng.choice(DROP_FACTORS))
            size = f"to {factor:.0%}"
            end = k + length
            if end >= n:
                break
            values[k:end] = clean[k:end] * factor
        elif kind == "level_shift":
            length = int(rng.uniform(2.0, 8.0) * per_hour)
            stds = float(rng.choice(SHIFT_STDS))
            drift = bool(rng.integers(0, 2))
            size = f"+{stds:g} std {'drift' if drift else 'step'}"
            end = k + length
            if end >= n:
                break
            ramp = np.minimum(1.0, (np.arange(length) + 1) / per_hour) if drift else 1.0
            values[k:end] = clean[k:end] + stds * std_kw * ramp
        elif kind == "stuck":
            length = max(3, int(rng.uniform(0.5, 6.0) * per_hour))
            size = "frozen"
            end = k + length
            if end >= n:
                break
            values[k:end] = clean[k]
        else:
            length = int(rng.uniform(1.0, 4.0) * 24 * per_hour)
            extra_kw = float(rng.choice(VAMPIRE_KW))
            size = f"+{extra_kw:g} kW"
            end = k + length
            if end >= n:
                break
            values[k:end] = clean[k:end] + extra_kw
        exposed_at = None
        if kind == "vampire":
            first_idle = next(
                (t for t in times[k:end] if idle.idle_period(t.timestamp()) is not None), None
            )
            if first_idle is None:
                values[k:end] = clean[k:end]
                k = end
                continue
            exposed_at = first_idle
        series.windows.append(
            LabelledWindow(series.device, kind, times[k], times[end - 1], size, exposed_at)
        )
        k = end
    np.clip(values, 0.0, None, out=values)


def run_detectors(
    series_list: list[DeviceSeries], settings: DetectionSettings
) -> list[DetectedEvent]:
    """Every firing alert of the detectors over the series, as detected events."""
    detection = SiteDetection(SITE, settings)
    events = []
    for series in series_list:
        for at, power_kw in zip(series.times, series.power_kw.tolist(), strict=True):
            for alert in detection.observe(series.device, "home", at, power_kw):
                if alert.status is AlertStatus.FIRING:
                    events.append(_event(alert))
    return events


def _event(alert: Alert) -> DetectedEvent:
    detected_at = datetime.fromisoformat(str(alert.details["detected_at"]))
    return DetectedEvent(alert.device or "", alert.alert_type, alert.start, detected_at)


def evaluate(
    config: HarnessConfig = HarnessConfig(),
    progress: Callable[[str], None] | None = None,
) -> HarnessResult:
    import time

    rng = np.random.default_rng([config.seed, 0xD37EC7])
    series_list = []
    for index in range(config.homes):
        device = f"home-{index + 1}"
        annual_kwh = float(rng.uniform(2_000, 6_000))
        if progress:
            progress(f"generating {device} ({annual_kwh:,.0f} kWh/year)")
        series = household_series(device, config, annual_kwh)
        inject_faults(series, config, rng)
        series_list.append(series)
    windows = [w for s in series_list for w in s.windows]
    if progress:
        progress(f"running the detectors over {sum(len(s.times) for s in series_list):,} readings")
    started = time.perf_counter()
    events = run_detectors(series_list, config.settings)
    detect_s = time.perf_counter() - started
    if progress:
        progress(f"PV arrays: {len(SOLAR_FAULTS)} fault kinds x {config.pv_runs} weather seeds")
    for index, (kind, size) in enumerate(SOLAR_FAULTS):
        for run in range(config.pv_runs):
            alerts, pv_windows = evaluation_run(
                config.seed * 1000 + run,
                kind,
                size,
                days=int(config.weeks * 7),
                step_min=config.step_min,
                device=f"pv-{index}-{run}",
            )
            events += [_event(a) for a in alerts if a.status is AlertStatus.FIRING]
            windows += pv_windows
    tolerance = timedelta(minutes=30)
    return HarnessResult(
        scores=score(events, windows, tolerance, labels=LABELS),
        by_size=recall_by_size(events, windows, tolerance),
        readings=sum(len(s.times) for s in series_list),
        detect_s=detect_s,
    )


def format_delay(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds / 60:.0f} min"
