"""Telemetry of a research tokamak shot: nominal runs and three labelled fault scenarios.

The physical story (a JET/ITER-class machine, simplified to what the
``FusionReading`` fields show):

* **Nominal shot** (fractions of the shot's duration):
  - 0-10 %: the superconducting toroidal field coils ramp to ``FIELD_FLAT_T``
    (5.3 T) before any plasma exists.
  - 10-25 %: plasma breakdown and heating: the core temperature rises from
    0.5 keV to ``TEMP_FLAT_KEV`` (15 keV) and the fusion gain Q with it; the
    confinement is a little less stable while the profiles settle.
  - 25-75 %: flat-top: constant field, temperature, Q ~ 0.6 (a research
    machine runs below breakeven) and stability ~ 0.93, with small seeded
    AR(1) noise (sawteeth and ELMs, smoothed).
  - 75-90 %: heating off, the plasma cools to 0.5 keV, Q falls to 0.
  - 90-100 %: with no plasma left, the coils ramp down.
* **quench**: a superconducting magnet quenches at the fault onset: the stored
  field is dumped with a time constant of 2 s. Without the field the plasma is
  no longer confined: stability follows the field down and the plasma cools
  (time constant 1.5 s). The hot plasma with a collapsing field is what
  crosses the bands (``field_low_with_plasma`` within ~0.3 s).
* **disruption**: an MHD instability grows: stability collapses linearly to
  0.05 within 0.5 s; a second after onset the thermal quench dumps the plasma
  energy (temperature time constant 0.3 s), Q drops to 0. The field stays.
* **runaway**: the heating control fails and the plasma heats itself: the
  temperature climbs exponentially (time constant 20 s), Q rises as T^2 (the
  D-T reactivity near 10-20 keV), and above 20 keV pressure-driven modes
  degrade stability; once it is below 0.3 the plasma disrupts as above.

Safe bands (``SAFE_BANDS``), what a SCRAM detector watches: temperature at
most 25 keV, stability at least 0.7, Q at most 1.5, and the field at least
4.5 T whenever the plasma is hotter than 2 keV. A nominal shot stays inside
them with margin at any seed; every fault leaves them within seconds of its
onset (``safety_violations`` names which).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NamedTuple

import numpy as np

from ingest.simulators.mqtt_publisher import Reading, ReadingSource
from pipeline.schemas import FusionReading

FIELD_FLAT_T = 5.3
"""Toroidal field at flat-top (JET 3.45 T, ITER 5.3 T). [T]"""
TEMP_FLAT_KEV = 15.0
"""Core ion temperature at flat-top, near the D-T reactivity optimum. [keV]"""
TEMP_COLD_KEV = 0.5
"""Just after breakdown, and after the ramp-down. [keV]"""
Q_FLAT = 0.6
"""Fusion gain at flat-top: JET reached 0.67, a research machine runs below 1. [-]"""
STABILITY_FLAT = 0.93
STABILITY_RAMP = 0.90
DEVICE = "tokamak-1"

# Noise at flat-top: standard deviations of the AR(1) noise, and its memory per second.
TEMP_NOISE_KEV = 0.25
Q_NOISE = 0.02
STABILITY_NOISE = 0.01
FIELD_NOISE_T = 0.005
NOISE_PHI_PER_S = 0.9

QUENCH_FIELD_TAU_S = 2.0
QUENCH_TEMP_TAU_S = 1.5
DISRUPTION_COLLAPSE_S = 0.5
DISRUPTION_THERMAL_QUENCH_DELAY_S = 1.0
THERMAL_QUENCH_TAU_S = 0.3
RUNAWAY_TAU_S = 20.0


@dataclass(frozen=True)
class SafeBands:
    temp_max_kev: float = 25.0
    stability_min: float = 0.7
    q_max: float = 1.5
    field_min_t: float = 4.5
    """Required while the plasma is hotter than ``plasma_present_kev``. [T]"""
    plasma_present_kev: float = 2.0


SAFE_BANDS = SafeBands()


class Scenario(StrEnum):
    NOMINAL = "nominal"
    QUENCH = "quench"
    DISRUPTION = "disruption"
    RUNAWAY = "runaway"


class FusionSeries(NamedTuple):
    readings: list[FusionReading]
    fault_onset: datetime | None
    """When the fault began (None for a nominal shot); the readings before it are nominal."""


def safety_violations(reading: FusionReading, bands: SafeBands = SAFE_BANDS) -> list[str]:
    """Which safe bands a reading is outside of (empty when safe)."""
    out = []
    if reading.plasma_temp_kev > bands.temp_max_kev:
        out.append("plasma_temp_high")
    if reading.confinement_stability < bands.stability_min:
        out.append("confinement_low")
    if reading.q_factor > bands.q_max:
        out.append("q_high")
    field_t = reading.magnetic_field_t
    if (
        field_t is not None
        and reading.plasma_temp_kev > bands.plasma_present_kev
        and field_t < bands.field_min_t
    ):
        out.append("field_low_with_plasma")
    return out


@dataclass(frozen=True)
class _State:
    temp_kev: float
    stability: float
    q: float
    field_t: float


def _ramp(x: float, x0: float, x1: float) -> float:
    """0 before x0, 1 after x1, smooth (cosine) in between."""
    if x <= x0:
        return 0.0
    if x >= x1:
        return 1.0
    return 0.5 - 0.5 * math.cos(math.pi * (x - x0) / (x1 - x0))


def nominal_state(t_s: float, duration_s: float) -> _State:
    """The noise-free nominal shot at ``t_s`` seconds into it."""
    x = t_s / duration_s
    field_t = FIELD_FLAT_T * (_ramp(x, 0.0, 0.10) - _ramp(x, 0.90, 1.0))
    heat = _ramp(x, 0.10, 0.25) - _ramp(x, 0.75, 0.90)
    temp_kev = TEMP_COLD_KEV + (TEMP_FLAT_KEV - TEMP_COLD_KEV) * heat
    flat = _ramp(x, 0.20, 0.25) - _ramp(x, 0.75, 0.80)
    stability = STABILITY_RAMP + (STABILITY_FLAT - STABILITY_RAMP) * flat
    q = Q_FLAT * heat**2  # fusion power grows as T^2 in this range
    return _State(temp_kev, stability, q, field_t)


def _thermal_quench(state: _State, since_s: float) -> _State:
    """The plasma's energy is lost: temperature decays to cold, no fusion."""
    decay = math.exp(-since_s / THERMAL_QUENCH_TAU_S)
    return _State(
        TEMP_COLD_KEV + (state.temp_kev - TEMP_COLD_KEV) * decay,
        state.stability,
        state.q * decay,
        state.field_t,
    )


def fault_state(scenario: Scenario, base: _State, at_onset: _State, since_s: float) -> _State:
    """The state ``since_s`` after a fault began; ``base`` is the nominal state then,
    ``at_onset`` the (noisy) state at the onset."""
    if scenario is Scenario.QUENCH:
        field_t = at_onset.field_t * math.exp(-since_s / QUENCH_FIELD_TAU_S)
        share = field_t / FIELD_FLAT_T
        temp_kev = TEMP_COLD_KEV + (at_onset.temp_kev - TEMP_COLD_KEV) * math.exp(
            -since_s / QUENCH_TEMP_TAU_S
        )
        q = at_onset.q * ((temp_kev - TEMP_COLD_KEV) / (at_onset.temp_kev - TEMP_COLD_KEV)) ** 2
        return _State(temp_kev, at_onset.stability * share, q, field_t)
    if scenario is Scenario.DISRUPTION:
        collapse = min(1.0, since_s / DISRUPTION_COLLAPSE_S)
        stability = at_onset.stability + (0.05 - at_onset.stability) * collapse
        state = _State(at_onset.temp_kev, stability, at_onset.q, base.field_t)
        if since_s >= DISRUPTION_THERMAL_QUENCH_DELAY_S:
            state = _thermal_quench(state, since_s - DISRUPTION_THERMAL_QUENCH_DELAY_S)
        return state
    if scenario is Scenario.RUNAWAY:
        # Self-heating: exponential growth until the resulting disruption (below).
        temp_kev = at_onset.temp_kev * math.exp(since_s / RUNAWAY_TAU_S)
        q = at_onset.q * (temp_kev / at_onset.temp_kev) ** 2
        stability = at_onset.stability - 0.04 * max(0.0, temp_kev - 20.0)
        if stability >= 0.3:
            return _State(temp_kev, stability, q, base.field_t)
        # Stability reaches 0.3 at T = 20 + (stability_onset - 0.3) / 0.04 keV.
        peak_kev = 20.0 + (at_onset.stability - 0.3) / 0.04
        peak_s = RUNAWAY_TAU_S * math.log(peak_kev / at_onset.temp_kev)
        peak = _State(peak_kev, 0.3, at_onset.q * (peak_kev / at_onset.temp_kev) ** 2, base.field_t)
        collapse = min(1.0, (since_s - peak_s) / DISRUPTION_COLLAPSE_S)
        collapsed = _State(peak.temp_kev, 0.3 + (0.05 - 0.3) * collapse, peak.q, peak.field_t)
        return _thermal_quench(collapsed, since_s - peak_s)
    return base


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """Stationary AR(1) noise with unit variance."""
    out = np.empty(n)
    x = rng.standard_normal()
    eps = rng.standard_normal(n) * math.sqrt(1.0 - phi * phi)
    for i in range(n):
        x = phi * x + eps[i]
        out[i] = x
    return out


def fusion_series(
    scenario: Scenario | str,
    start: datetime,
    duration_s: float = 600.0,
    step_s: float = 1.0,
    seed: int = 0,
    device: str = DEVICE,
) -> FusionSeries:
    """One shot of ``duration_s`` sampled every ``step_s``, and its fault onset.

    The onset is seeded, within 35-60 % of the shot (in flat-top), on a sample.
    Noise is scaled by how far into flat-top the shot is, so the quiet ramps stay quiet.
    """
    scenario = Scenario(scenario)
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    if duration_s < 60.0:
        raise ValueError(
            f"duration_s must be at least 60 s (a shot with a flat-top), got {duration_s}"
        )
    if not 0 < step_s <= duration_s / 20:
        raise ValueError(f"step_s must be positive and at most duration_s / 20, got {step_s}")
    n = math.floor(duration_s / step_s)
    rng = np.random.default_rng([seed, 0xF051])
    phi = NOISE_PHI_PER_S**step_s
    noise = {name: _ar1(rng, n, phi) for name in ("temp", "stability", "q", "field")}
    onset_step: int | None = None
    if scenario is not Scenario.NOMINAL:
        onset_step = int(rng.uniform(0.35, 0.60) * duration_s / step_s)
    readings: list[FusionReading] = []
    at_onset: _State | None = None
    for k in range(n):
        t_s = k * step_s
        base = nominal_state(t_s, duration_s)
        flat = _ramp(t_s / duration_s, 0.20, 0.25) - _ramp(t_s / duration_s, 0.75, 0.80)
        noisy = _State(
            base.temp_kev + TEMP_NOISE_KEV * flat * noise["temp"][k],
            min(0.99, base.stability + STABILITY_NOISE * flat * noise["stability"][k]),
            max(0.0, base.q + Q_NOISE * flat * noise["q"][k]),
            base.field_t + FIELD_NOISE_T * flat * noise["field"][k],
        )
        state = noisy
        if onset_step is not None and k >= onset_step:
            at_onset = at_onset or noisy
            state = fault_state(scenario, noisy, at_onset, (k - onset_step) * step_s)
        readings.append(
            FusionReading(
                device=device,
                ts=start + timedelta(seconds=t_s),
                plasma_temp_kev=round(max(0.0, state.temp_kev), 4),
                confinement_stability=round(min(1.0, max(0.0, state.stability)), 4),
                q_factor=round(max(0.0, state.q), 4),
                magnetic_field_t=round(max(0.0, state.field_t), 4),
            )
        )
    onset = start + timedelta(seconds=onset_step * step_s) if onset_step is not None else None
    return FusionSeries(readings, onset)


def fusion_source(series: FusionSeries) -> ReadingSource:
    """A reading source for :func:`ingest.simulators.mqtt_publisher.run_simulation`:
    the shot's reading at an instant (the latest one at or before it)."""
    readings = series.readings
    start = readings[0].ts
    step_s = (readings[1].ts - start).total_seconds() if len(readings) > 1 else 1.0

    def readings_at(at: datetime) -> list[Reading]:
        index = math.floor((at - start).total_seconds() / step_s + 1e-9)
        if not 0 <= index < len(readings):
            return []
        reading = readings[index]
        fields = reading.model_dump(exclude={"kind", "device", "ts"}, exclude_none=True)
        return [("fusion", reading.device, fields)]

    return readings_at
