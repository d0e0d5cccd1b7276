"""Solar efficiency: PV output against pvlib's expected output, per array; underperformance alerts.

**Expected output.** For every reading with plane-of-array (POA) irradiance,
the array's specification gives an expected AC power through pvlib's PVWatts
chain: SAPM cell temperature (from the module temperature if measured, else
from air temperature, irradiance and an assumed wind speed), ``pvwatts_dc``
(nameplate, temperature coefficient, system losses) and ``inverter.pvwatts``
(part-load efficiency curve and the AC limit). :func:`expected_ac_kw` is that
chain on arrays, calling pvlib; the per-reading path uses
:func:`expected_ac_kw_one`, the same formulas in ``math`` (about 1 µs instead
of ~50 µs for pvlib on one value; the file path pushes ~1M readings) and a unit
test holds the two equal to 1e-9. The POA is measured, so tilt and azimuth do
not enter the expected output (they are recorded for reports and the
evaluation helper); a plane-of-array sensor that is itself soiled or
misaligned shows up as a changed normal, which the learned baseline absorbs.

**Performance index (PI).** Measured energy over expected energy, only over
*usable* readings: irradiance at least ``min_irradiance_w_m2`` (200 W/m2 by
default: below it the PVWatts efficiency curve, the sensor's cosine response
and the inverter's start-up make the ratio noise; IEC 61724-1 PR filters use
the same order); not clipped (expected or measured AC within
``clip_margin_pct`` of the inverter limit: clipping hides a loss); steady (the
irradiance changed by at most ``max_irradiance_change_pct`` over each of the
last two steps: at a cloud edge the sensor and the array are not in the same
light, and a shadow on the array but not on the sensor looks exactly like a
fault); and a known interval since the previous reading (energy is power times
that interval, capped at ``max_interval_min``). Readings without irradiance
have no expected output: they are counted (``readings_without_irradiance``, also
on every alert), only advance the clock, and never alert; a loss while the
sensor is out is not seen until it is back.

**The learned normal.** A PI of 0.9 is not a fault if the array always did 0.9
(spec 10 % off, shading, a pyranometer instead of a reference cell). Everything
is learned from the array's own past only (streaming: the file run equals the
stream run):

* ``ref``, the normal PI: the energy-weighted PI of the first ``learn_days``
  days with usable light (no alert before). Then, at each day's end and only if
  the day had no incident, it follows the day's PI asymmetrically: up quickly
  (weight 0.1: a cleaning, or a commissioning done dirty, is the new normal
  within days), down slowly (weight 0.02, ~50 days: a soiling ramp of 0.1-1
  %/day outruns it and is seen, while seasonal model biases of a few % and real
  ageing of ~0.5 %/year are absorbed rather than alerted; long-term
  degradation is what :func:`efficiency_report` shows, not an incident).
* ``shape``, the PI of each half hour of the UTC day relative to its day's
  (interpolated between half hours): incidence-angle losses that a pyranometer
  does not see, a chimney shading every morning, a sensor tilted unlike the
  array. Relative to the day, so a loss of the whole array never moves it.

Performance is ``PI / (ref * shape)``: 1 is normal.

**Detection, three time scales.** Each compares performance with a threshold
``max(min_drop, k * sigma)``. ``sigma`` is that scale's noise, learned online
from successive non-overlapping windows without an incident: from their
*differences*, not their deviations from normal, so a soiling ramp (a little
lower every day) cannot raise the threshold as fast as it approaches it; one
odd window is clipped. The floor is the smallest loss worth an alert on any
data; ``k * sigma`` keeps a noisy site from alerting on its noise.

* ``15min`` (``fast_window_min``, floor 15 %, k = 4): a string or inverter
  fault, a new shade. The median of one-minute blocks (at least three), and the
  last three blocks each clearly low: one block of cloud-edge mismatch neither
  fires nor hides a fault. With 5-minute data a loss is seen at its third
  reading (10 min), with 1-minute data after ~8 min.
* ``2h`` (``mid_window_min``, floor 8 %, k = 4, blocks of 8 min): a loss too
  small for the fast window but clear within hours.
* ``day`` (the daylight period, closed at dusk: the first dark reading an hour
  after the last usable one; floor 5 %, k = 3): soiling and degradation-like
  steps of 5-15 %. A deficit under twice the threshold needs the previous day
  to lean low too, so one odd day (snow, an unusual sky) is not an incident.
  Losses under ~5 % are within the day-to-day scatter of real PI (sensor
  calibration, spectrum, temperature model) and are not alerted.

One incident per device at a time (``solar_underperformance``, warning). It
resolves when the loss is gone, judged by the less noisy scales: the 2-hour
window back above ``1 - min(threshold / 2, loss / 4)`` for a whole window of
usable time, or a whole day after the onset back above the same with the day's
threshold. ``loss / 4``: a loss caught just above a threshold must be mostly
gone, not merely a little smaller, or it flaps into many incidents. A repaired
fault resolves within about three hours of daylight. On resolution the rolling
windows restart, so minutes of the fault still in them cannot re-fire it; a day
that held an incident neither fires the day scale nor teaches ``ref``/``shape``.

``start`` is the estimated onset: the first of the trailing run of blocks that
are each below the threshold (one minute for the fast window, 8 minutes for
the 2-hour one, a day for the day scale, where it is the first usable reading
of the first low day). The instant of detection is ``details["detected_at"]``.
``cause`` is a guess: ``soiling`` if the days before the loss were already
declining (steeper than 0.1 %/day, worth a third of the loss and twice the day
noise), else ``sudden`` for the rolling scales and ``degradation`` (a
persistent step: cell cracks, a bypass diode, PID) for the day scale.
``lost_kwh`` is the energy lost since onset against the learned normal.

Readings at or before the device's last reading are ignored and counted
(``stale_readings``): a replay after a restart sends them again, and alert ids
are deterministic anyway.

**Measured** with :func:`pipeline.solar_eval.evaluation_run` (8 weeks of 5-min data, 10 seeds, 3-5
faults a run; an alert matches if its ``start`` lies in a labelled window;
delay = ``detected_at`` - window start): no alert at all on fault-free runs;
sudden losses of 20-100 % F1 0.98 (the misses start at dusk and end in the
night), median delay 10 min (7 min on 1-minute data); 10 % F1 0.92, ~80 min
(the 2-hour window); degradation-like steps of 12 / 8 / 5 % F1 1.0 / 0.97 /
0.93 with median delays of 1 h / 6 h / 2 days; soiling of 1 / 0.5 %/day F1
1.0 / 0.86 after 6 / 9 days (when the loss reaches ~5 %); 0.2 %/day ramps of
2-3 weeks stay under 5 % and are not found.

**Reports.** :func:`efficiency_report` gives efficiency (PI against the spec,
%) per array per day and overall, from a telemetry frame, for ``wattstream
detect``; firing and resolved alerts carry the current efficiency. The
evaluation helper :mod:`pipeline.solar_eval` simulates weeks of 5-minute PV data
from pvlib's bundled TMY with labelled faults and runs the detector;
:mod:`processors.scoring` computes precision, recall, F1 and delays, as for every
detector (``wattstream evaluate-detectors``).

Plain Python (pvlib, numpy and polars only where arrays pay); Faust is imported
only for wiring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.schemas import Alert, Identifier, Severity, SolarReading, TelemetryBatch
from pipeline.settings import Settings, SiteConfig, repeated, validate_section
from processors.alerting import DetailValue, firing, resolved

if TYPE_CHECKING:
    import faust

ALERT_TYPE = "solar_underperformance"
LABEL = ALERT_TYPE

PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]

Mount = Literal[
    "open_rack_glass_glass",
    "close_mount_glass_glass",
    "open_rack_glass_polymer",
    "insulated_back_glass_polymer",
]
# pvlib.temperature.TEMPERATURE_MODEL_PARAMETERS["sapm"], copied so the per-reading
# path needs no pvlib import; a unit test checks they are pvlib's.
SAPM_PARAMS: dict[str, tuple[float, float, float]] = {
    "open_rack_glass_glass": (-3.47, -0.0594, 3.0),
    "close_mount_glass_glass": (-2.98, -0.0471, 1.0),
    "open_rack_glass_polymer": (-3.56, -0.075, 3.0),
    "insulated_back_glass_polymer": (-2.81, -0.0455, 0.0),
}
ETA_INV_REF = 0.9637
"""pvlib.inverter.pvwatts' reference efficiency (its default). [-]"""

# Days of history kept per array: the soiling slope is fitted over the last week.
HISTORY_DAYS = 14
# Initial noise (mean absolute deviation of performance) per scale, before any is learned:
# values typical of a pyranometer next to a rooftop array; learning replaces them in a day.
PRIOR_MAD = {"15min": 0.03, "2h": 0.02, "day": 0.012}
# Weight of one new non-overlapping window in the learned noise: ~50 windows (15min: half
# a sunny week), ~20 (2h), ~10 days.
MAD_WEIGHT = {"15min": 0.02, "2h": 0.05, "day": 0.1}
REF_UP_WEIGHT = 0.1
REF_DOWN_WEIGHT = 0.02
DARK_IRRADIANCE_W_M2 = 10.0
"""Below this it is night (or dawn/dusk): the day's PI is complete. [W/m2]"""
DUSK_AFTER_S = 3600.0
"""A dark reading closes the day only this long after its last usable reading, so a
passing thunderstorm does not split a day. [s]"""
NIGHT_GAP_S = 5 * 3600.0
"""Without dark readings (irradiance missing at night), a usable reading this long after
the last one starts a new day: nights are longer than 5 h wherever PV is usable. [s]"""
SOILING_SLOPE_PER_DAY = 0.001
"""A decline of day performances steeper than 0.1 %/day over the last week is soiling. [1/d]"""
MIN_REF = 0.05
SHAPE_BIN_S = 1800.0
SHAPE_BINS = 48
# Weight of one day in a half hour's shape: ~5 days, fast enough to follow the sun's
# path through the seasons.
SHAPE_WEIGHT = 0.2
MIN_BIN_HOURS = 0.25
# The trailing run of clearly low blocks a rolling window needs to fire: a cloud's shadow
# on the array but not on the sensor (or the reverse) lasts a reading or two.
MIN_RUN_BLOCKS = 3
# A rolling window's median needs this many blocks: with fewer, one odd block decides it.
MIN_BLOCKS = 3
SQRT_PI_2 = math.sqrt(math.pi / 2.0)  # sigma of a normal = this x its mean absolute deviation


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class PvArraySettings(_Model):
    """One PV array with its inverter, as metered by one ``solar`` device."""

    device: Identifier
    kwp: PositiveFloat
    """DC nameplate at STC (1000 W/m2, 25 degC). [kWp]"""
    tilt_deg: Annotated[float, Field(ge=0.0, le=90.0)] | None = None
    """Recorded for reports; the expected output uses the measured POA irradiance. [deg]"""
    azimuth_deg: Annotated[float, Field(ge=0.0, lt=360.0)] | None = None
    """Degrees from north, clockwise (180 = south); recorded like tilt_deg. [deg]"""
    temp_coeff_pct_per_c: Annotated[float, Field(ge=-2.0, le=0.0)] = -0.37
    """Power temperature coefficient from the datasheet; -0.37 %/degC is mono-Si PERC/TOPCon,
    pvlib's example value. [%/degC]"""
    losses_pct: Annotated[float, Field(ge=0.0, lt=100.0)] = 14.0
    """DC system losses (wiring, mismatch, soiling at commissioning, LID...): PVWatts'
    default. Its error is absorbed by the learned normal. [%]"""
    inverter_kw: PositiveFloat | None = None
    """AC limit of the inverter; None: no clipping is modelled and the part-load curve is
    sized at kwp. [kW]"""
    inverter_efficiency_pct: Annotated[float, Field(gt=0.0, le=100.0)] = 96.0
    """Nominal inverter efficiency (pvlib's default). [%]"""
    mount: Mount = "open_rack_glass_polymer"
    """SAPM cell-temperature parameters: ``close_mount_*`` for roof-parallel rooftop arrays,
    ``open_rack_*`` for racks with air behind the modules."""
    wind_speed_m_s: NonNegativeFloat = 1.0
    """Wind assumed for the cell temperature (telemetry has none): 1 m/s is a calm
    rooftop; 1 m/s too low reads ~1-2 degC, i.e. < 1 % of power. [m/s]"""
    default_temp_air_c: float = 20.0
    """Air temperature assumed when a reading has neither air nor module temperature. [degC]"""


class SolarSettings(_Model):
    """``[sites.solar]``: the site's arrays and the detector's thresholds."""

    arrays: list[PvArraySettings] = Field(min_length=1)
    min_irradiance_w_m2: PositiveFloat = 200.0
    """Readings below this are not used for the PI (see the module docstring). [W/m2]"""
    clip_margin_pct: Annotated[float, Field(ge=0.0, lt=50.0)] = 3.0
    """A reading whose expected or measured AC is within this of the inverter limit is
    clipped and not used. [%]"""
    max_irradiance_change_pct: Annotated[float, Field(gt=0.0, le=100.0)] = 20.0
    """A reading whose irradiance differs from the previous one by more than this (of the
    larger) is at a cloud edge, where the sensor and the array are not in the same light;
    it is not used. Clear-sky irradiance above 200 W/m2 changes by under ~10 % in 5 min. [%]"""
    max_interval_min: PositiveFloat = 15.0
    """A reading's energy is its power times the time since the previous reading, at most
    this (a longer gap is missing data, not a long reading). [min]"""
    learn_days: Annotated[int, Field(ge=1, le=60)] = 2
    """Days with usable light before the normal PI is set and alerts can fire: two days
    average over two skies; more delays the first alert by as many days."""
    fast_window_min: Annotated[float, Field(ge=1.0, le=240.0)] = 15.0
    """The fast rolling window. [min]"""
    fast_min_drop_pct: Annotated[float, Field(gt=0.0, lt=100.0)] = 15.0
    """Smallest loss the fast window alerts on: 15-min PIs scatter by several % under
    broken clouds even with a good sensor. [%]"""
    mid_window_min: Annotated[float, Field(ge=5.0, le=720.0)] = 120.0
    """The slower rolling window. [min]"""
    mid_min_drop_pct: Annotated[float, Field(gt=0.0, lt=100.0)] = 8.0
    """Smallest loss the 2-hour window alerts on. [%]"""
    day_min_drop_pct: Annotated[float, Field(gt=0.0, lt=100.0)] = 5.0
    """Smallest daily loss alerted: below ~5 % is within real day-to-day PI scatter. [%]"""
    noise_k: Annotated[float, Field(ge=1.0, le=20.0)] = 4.0
    """Rolling thresholds are at least this many learned standard deviations: rolling
    windows are tested at every reading, so the margin must hold over thousands of tests."""
    day_noise_k: Annotated[float, Field(ge=1.0, le=20.0)] = 3.0
    """Day threshold in learned standard deviations (one test a day, plus confirmation)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        devices = [a.device for a in self.arrays]
        duplicates = repeated(devices)
        if duplicates:
            raise ValueError(f"duplicate array devices {duplicates}")
        if not self.fast_window_min < self.mid_window_min:
            raise ValueError(
                f"fast_window_min ({self.fast_window_min}) must be below "
                f"mid_window_min ({self.mid_window_min})"
            )
        return self

    def array(self, device: str) -> PvArraySettings | None:
        return next((a for a in self.arrays if a.device == device), None)


def solar_settings(site: SiteConfig) -> SolarSettings | None:
    """Validate a site's ``solar`` section (None without one); raises SettingsError."""
    if site.solar is None:
        return None
    return validate_section(SolarSettings, f"sites[{site.id}].solar", site.solar)


# --- expected output ------------------------------------------------------------------------


def expected_ac_kw(
    array: PvArraySettings,
    irradiance_w_m2: np.ndarray,
    temp_air_c: np.ndarray | None = None,
    temp_module_c: np.ndarray | None = None,
) -> np.ndarray:
    """Expected AC power through pvlib's PVWatts chain; NaN irradiance gives NaN. [kW]

    ``temp_*`` may hold NaN where a reading has none: module temperature is used where
    known, else air temperature, else ``array.default_temp_air_c``.
    """
    import pvlib

    g = np.asarray(irradiance_w_m2, dtype=float)
    a, b, delta_t = SAPM_PARAMS[array.mount]
    air = np.full_like(g, array.default_temp_air_c)
    if temp_air_c is not None:
        air = np.where(np.isnan(temp_air_c), air, temp_air_c)
    cell = pvlib.temperature.sapm_cell(g, air, array.wind_speed_m_s, a, b, delta_t)
    if temp_module_c is not None:
        from_module = pvlib.temperature.sapm_cell_from_module(temp_module_c, g, delta_t)
        cell = np.where(np.isnan(temp_module_c), cell, from_module)
    dc_w = pvlib.pvsystem.pvwatts_dc(
        g, cell, array.kwp * 1000.0, array.temp_coeff_pct_per_c / 100.0
    ) * (1.0 - array.losses_pct / 100.0)
    eta = array.inverter_efficiency_pct / 100.0
    pdc0_w = (array.inverter_kw / eta if array.inverter_kw is not None else array.kwp) * 1000.0
    with np.errstate(invalid="ignore", divide="ignore"):
        ac_w = pvlib.inverter.pvwatts(dc_w, pdc0_w, eta_inv_nom=eta, eta_inv_ref=ETA_INV_REF)
    return np.where(np.isnan(g), np.nan, np.asarray(ac_w, dtype=float) / 1000.0)


@dataclass(frozen=True)
class _Model1:
    """An array's PVWatts constants, precomputed for the per-reading path."""

    sapm_a: float
    sapm_b: float
    delta_t_c: float
    wind_factor: float
    dc_kw_per_w_m2: float
    gamma_per_c: float
    pdc0_kw: float
    pac0_kw: float
    eta_scale: float
    default_temp_air_c: float

    @classmethod
    def of(cls, array: PvArraySettings) -> _Model1:
        a, b, delta_t = SAPM_PARAMS[array.mount]
        eta = array.inverter_efficiency_pct / 100.0
        pdc0_kw = array.inverter_kw / eta if array.inverter_kw is not None else array.kwp
        return cls(
            sapm_a=a,
            sapm_b=b,
            delta_t_c=delta_t,
            wind_factor=math.exp(a + b * array.wind_speed_m_s),
            dc_kw_per_w_m2=array.kwp / 1000.0 * (1.0 - array.losses_pct / 100.0),
            gamma_per_c=array.temp_coeff_pct_per_c / 100.0,
            pdc0_kw=pdc0_kw,
            pac0_kw=eta * pdc0_kw,
            eta_scale=eta / ETA_INV_REF,
            default_temp_air_c=array.default_temp_air_c,
        )

    def ac_kw(
        self, irradiance_w_m2: float, temp_air_c: float | None, temp_module_c: float | None
    ) -> float:
        g = irradiance_w_m2
        if temp_module_c is not None:
            cell = temp_module_c + g / 1000.0 * self.delta_t_c
        else:
            air = self.default_temp_air_c if temp_air_c is None else temp_air_c
            cell = g * self.wind_factor + air + g / 1000.0 * self.delta_t_c
        dc_kw = g * self.dc_kw_per_w_m2 * (1.0 + self.gamma_per_c * (cell - 25.0))
        if dc_kw == 0.0:
            return 0.0
        zeta = dc_kw / self.pdc0_kw
        ac = self.eta_scale * (-0.0162 * zeta - 0.0059 / zeta + 0.9858) * dc_kw
        return max(0.0, min(self.pac0_kw, ac))


def expected_ac_kw_one(
    array: PvArraySettings,
    irradiance_w_m2: float,
    temp_air_c: float | None = None,
    temp_module_c: float | None = None,
) -> float:
    """:func:`expected_ac_kw` for one reading, without pvlib (same formulas). [kW]"""
    return _Model1.of(array).ac_kw(irradiance_w_m2, temp_air_c, temp_module_c)


# --- the detector ---------------------------------------------------------------------------


def _iso(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, UTC).isoformat()


def _dt(ts_s: float) -> datetime:
    return datetime.fromtimestamp(ts_s, UTC)


def _fold_noise(mad: float, difference: float, scale: str) -> float:
    """Fold the difference between two successive samples of a scale into its noise.

    Successive differences, not deviations from the normal: a soiling ramp moves each
    sample away from the normal but barely from the previous one, so it cannot inflate
    the noise (and with it the threshold) faster than it grows. |difference| / sqrt(2)
    has the mean absolute deviation of one sample. Clipped, so one sample with a snow
    slide or an undetected fault cannot double the noise; a genuinely noisier site still
    grows it by about twice the weight a sample.
    """
    deviation = min(abs(difference) / math.sqrt(2.0), 3.0 * mad + 0.01)
    return mad + MAD_WEIGHT[scale] * (deviation - mad)


@dataclass
class _Rolling:
    """A rolling window of usable energy in blocks, and its learned noise.

    The window's performance is the median of its blocks' (measured / expected): one
    block where a cloud edge shaded the array but not the sensor (or the reverse) moves
    a ratio of sums by tens of % over a 15-min window, the median not at all; a real loss
    moves every block, so the median crosses the threshold once half the window is
    faulty, as a ratio of sums would.
    """

    name: str
    window_s: float
    block_s: float
    blocks: list[list[float]] = field(default_factory=list)
    """[first reading ts, usable hours, measured kWh, expected kWh] per block."""
    since_noise_h: float = 0.0
    """Usable hours since the window's noise was last sampled (one sample per window)."""
    mad: float = 0.0
    last_sample: float | None = None
    """Performance at the previous noise sample."""

    def add(self, ts_s: float, dt_h: float, meas_kwh: float, exp_kwh: float) -> None:
        last = self.blocks[-1] if self.blocks else None
        if last is not None and math.floor(last[0] / self.block_s) == math.floor(
            ts_s / self.block_s
        ):
            last[1] += dt_h
            last[2] += meas_kwh
            last[3] += exp_kwh
        else:
            self.blocks.append([ts_s, dt_h, meas_kwh, exp_kwh])
        horizon = ts_s - self.window_s
        while self.blocks and self.blocks[0][0] <= horizon:
            self.blocks.pop(0)
        self.since_noise_h += dt_h

    def reset(self) -> None:
        self.blocks = []
        self.since_noise_h = 0.0

    def sums(self) -> tuple[float, float, float]:
        """(usable hours, measured kWh, expected kWh) in the window."""
        hours = meas = exp = 0.0
        for block in self.blocks:
            hours += block[1]
            meas += block[2]
            exp += block[3]
        return hours, meas, exp

    def performance(self, ref: float) -> float | None:
        """Median block PI over ``ref``; None unless two thirds of the window are usable."""
        if sum(b[1] for b in self.blocks) * 3600.0 < self.window_s * 2.0 / 3.0:
            return None
        ratios = sorted(b[2] / b[3] for b in self.blocks if b[3] > 0.0)
        if len(ratios) < MIN_BLOCKS:
            return None
        mid = len(ratios) // 2
        median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2.0
        return median / ref

    def learn_noise(self, ref: float | None) -> None:
        """Once per window of usable time, fold the window's deviation into the noise."""
        if self.since_noise_h * 3600.0 < self.window_s or ref is None:
            return
        performance = self.performance(ref)
        if performance is None:
            return
        self.since_noise_h = 0.0
        if self.last_sample is not None:
            self.mad = _fold_noise(self.mad, performance - self.last_sample, self.name)
        self.last_sample = performance

    def to_json(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "since": self.since_noise_h,
            "mad": self.mad,
            "sample": self.last_sample,
        }

    def load(self, data: dict[str, Any]) -> None:
        self.blocks = [list(b) for b in data["blocks"]]
        self.since_noise_h = float(data["since"])
        self.mad = float(data["mad"])
        self.last_sample = data["sample"]


@dataclass
class _Day:
    """The daylight period being accumulated."""

    first_s: float
    last_usable_s: float
    hours: float = 0.0
    meas_kwh: float = 0.0
    exp_kwh: float = 0.0
    """Expected with the learned daily shape (see ArrayDetector.shape). [kWh]"""
    incident: bool = False
    """An incident was open at some time of the day: it neither fires nor teaches."""
    bins: dict[str, list[float]] = field(default_factory=dict)
    """Half hour of the day -> [usable hours, measured kWh, expected kWh without shape]."""


Counter = Literal[
    "readings", "readings_without_irradiance", "low_light_readings", "clipped_readings",
    "unstable_readings", "usable_readings", "stale_readings",
]  # fmt: skip


class ArrayDetector:
    """Underperformance of one PV array: feed its readings in time order with :meth:`observe`.

    Plain Python; the whole state is :meth:`to_json` (a few kB), restored by
    :meth:`from_json`, so a Faust table can keep it per site and device.
    """

    def __init__(self, site: str, array: PvArraySettings, settings: SolarSettings) -> None:
        self.site = site
        self.array = array
        self.settings = settings
        self._model = _Model1.of(array)
        fast_s = settings.fast_window_min * 60.0
        mid_s = settings.mid_window_min * 60.0
        # 15 blocks a window: onset to a fifteenth of the window; 1-minute blocks at least.
        self.rolling = (
            _Rolling("15min", fast_s, max(60.0, fast_s / 15.0), mad=PRIOR_MAD["15min"]),
            _Rolling("2h", mid_s, max(60.0, mid_s / 15.0), mad=PRIOR_MAD["2h"]),
        )
        self.min_drop = {
            "15min": settings.fast_min_drop_pct / 100.0,
            "2h": settings.mid_min_drop_pct / 100.0,
            "day": settings.day_min_drop_pct / 100.0,
        }
        self.clip_kw = (
            None
            if array.inverter_kw is None
            else array.inverter_kw * (1.0 - settings.clip_margin_pct / 100.0)
        )
        self.max_interval_s = settings.max_interval_min * 60.0
        self.max_change = settings.max_irradiance_change_pct / 100.0
        self.last_s: float | None = None
        self.last_irradiance_w_m2: float | None = None
        self.last_step_steady = False
        """Whether the irradiance changed little from the reading before the last."""
        self.ref: float | None = None
        self.learn = [0.0, 0.0, 0]  # measured kWh, expected kWh, days
        self.day: _Day | None = None
        self.day_mad = PRIOR_MAD["day"]
        self.shape = [1.0] * SHAPE_BINS
        """Learned PI of each half hour of the (UTC) day relative to the day's: incidence-angle
        losses of a pyranometer-measured array, a chimney's shade every morning, a sensor
        tilted differently. Relative, so a loss of the whole array never moves it."""
        self.days: list[list[float]] = []
        """[first ts, measured kWh, expected kWh, performance] of the last complete days."""
        self.incident: dict[str, Any] | None = None
        self.counters: dict[str, int] = dict.fromkeys(Counter.__args__, 0)  # type: ignore[attr-defined]
        self.efficiency_pct: float | None = None
        """Latest fast-window PI against the spec. [%]"""

    # -- state ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        day = self.day
        return {
            "v": 1,
            "last": self.last_s,
            "last_g": self.last_irradiance_w_m2,
            "steady": self.last_step_steady,
            "ref": self.ref,
            "learn": self.learn,
            "rolling": [r.to_json() for r in self.rolling],
            "day": None
            if day is None
            else [day.first_s, day.last_usable_s, day.hours, day.meas_kwh, day.exp_kwh,
                  day.incident, day.bins],
            "shape": self.shape,
            "day_mad": self.day_mad,
            "days": self.days,
            "incident": self.incident,
            "counters": self.counters,
            "eff": self.efficiency_pct,
        }  # fmt: skip

    @classmethod
    def from_json(
        cls,
        site: str,
        array: PvArraySettings,
        settings: SolarSettings,
        data: Mapping[str, Any] | None,
    ) -> ArrayDetector:
        detector = cls(site, array, settings)
        if not data:
            return detector
        detector.last_s = data["last"]
        detector.last_irradiance_w_m2 = data["last_g"]
        detector.last_step_steady = bool(data["steady"])
        detector.ref = data["ref"]
        detector.learn = list(data["learn"])
        for rolling, saved in zip(detector.rolling, data["rolling"], strict=True):
            rolling.load(saved)
        day = data["day"]
        detector.day = (
            None
            if day is None
            else _Day(day[0], day[1], day[2], day[3], day[4], incident=bool(day[5]), bins=day[6])
        )
        detector.shape = [float(f) for f in data["shape"]]
        detector.day_mad = float(data["day_mad"])
        detector.days = [list(d) for d in data["days"]]
        detector.incident = None if data["incident"] is None else dict(data["incident"])
        detector.counters.update(data["counters"])
        detector.efficiency_pct = data["eff"]
        return detector

    # -- per reading ------------------------------------------------------------------------

    def observe(self, reading: SolarReading) -> list[Alert]:
        """Feed one reading; the alerts it fires or resolves."""
        return self.observe_values(
            reading.ts.timestamp(),
            reading.power_kw,
            reading.irradiance_w_m2,
            reading.temp_air_c,
            reading.temp_module_c,
        )

    def observe_values(
        self,
        ts_s: float,
        power_kw: float,
        irradiance_w_m2: float | None,
        temp_air_c: float | None = None,
        temp_module_c: float | None = None,
    ) -> list[Alert]:
        """:meth:`observe` on plain values (the file path: no pydantic object per row)."""
        counters = self.counters
        if self.last_s is not None and ts_s <= self.last_s:
            counters["stale_readings"] += 1
            return []
        counters["readings"] += 1
        previous_s, self.last_s = self.last_s, ts_s
        dt_s = 0.0 if previous_s is None else min(ts_s - previous_s, self.max_interval_s)
        previous_g, self.last_irradiance_w_m2 = self.last_irradiance_w_m2, irradiance_w_m2
        steady_before = self.last_step_steady
        self.last_step_steady = steady = (
            irradiance_w_m2 is not None
            and previous_g is not None
            and abs(irradiance_w_m2 - previous_g)
            <= self.max_change * max(irradiance_w_m2, previous_g)
        )
        out: list[Alert] = []
        if irradiance_w_m2 is None:
            counters["readings_without_irradiance"] += 1
            return out
        if self.day is not None:
            gap_s = ts_s - self.day.last_usable_s
            dark = irradiance_w_m2 < DARK_IRRADIANCE_W_M2 and gap_s >= DUSK_AFTER_S
            if dark or (
                irradiance_w_m2 >= self.settings.min_irradiance_w_m2 and gap_s >= NIGHT_GAP_S
            ):
                out += self._close_day(ts_s)  # fmt: skip
            elif ts_s - self.day.first_s > 86400.0:  # polar summer: no night to close it
                out += self._close_day(ts_s)
        expected_kw = self._model.ac_kw(irradiance_w_m2, temp_air_c, temp_module_c)
        dt_h = dt_s / 3600.0
        incident = self.incident
        half_hour = int(ts_s % 86400.0 // SHAPE_BIN_S)
        # Linear between half-hour centres: near dusk the shape falls fast, and a step at
        # every bin edge would show up as a sudden change of performance.
        position = (ts_s % 86400.0) / SHAPE_BIN_S - 0.5
        below = math.floor(position)
        weight = position - below
        shape = (1.0 - weight) * self.shape[below % SHAPE_BINS] + weight * self.shape[
            (below + 1) % SHAPE_BINS
        ]
        if incident is not None and self.ref is not None:
            incident["lost_kwh"] += (expected_kw * shape * self.ref - power_kw) * dt_h
        if irradiance_w_m2 < self.settings.min_irradiance_w_m2 or expected_kw <= 0.0:
            counters["low_light_readings"] += 1
            return out
        if self.clip_kw is not None and (expected_kw >= self.clip_kw or power_kw >= self.clip_kw):
            counters["clipped_readings"] += 1
            return out
        if dt_h <= 0.0:
            return out  # the first reading: no interval, so no energy
        if not (steady and steady_before):
            # Two steady steps in a row: a cloud edge can leave the sensor in other light
            # than the array for a reading or two after the jump.
            counters["unstable_readings"] += 1
            return out
        counters["usable_readings"] += 1
        meas_kwh, exp_kwh = power_kw * dt_h, expected_kw * shape * dt_h
        day = self.day
        if day is None:
            day = self.day = _Day(first_s=ts_s, last_usable_s=ts_s)
        day.last_usable_s = ts_s
        day.hours += dt_h
        day.meas_kwh += meas_kwh
        day.exp_kwh += exp_kwh
        in_bin = day.bins.setdefault(str(half_hour), [0.0, 0.0, 0.0])
        in_bin[0] += dt_h
        in_bin[1] += meas_kwh
        in_bin[2] += expected_kw * dt_h
        day.incident = day.incident or self.incident is not None
        ref = self.ref
        teacher = ref
        if ref is None:  # learning: the provisional normal teaches the noise already
            self.learn[0] += meas_kwh
            self.learn[1] += exp_kwh
            teacher = self.learn[0] / self.learn[1] if self.learn[0] > 0 else None
        for rolling in self.rolling:
            rolling.add(ts_s, dt_h, meas_kwh, exp_kwh)
            if self.incident is None:
                rolling.learn_noise(teacher)
        efficiency = self.rolling[0].performance(1.0)
        if efficiency is not None:
            self.efficiency_pct = 100.0 * efficiency
        if ref is None:
            return out
        if self.incident is None:
            for rolling in self.rolling:
                alert = self._check_rolling(rolling, ts_s, ref)
                if alert is not None:
                    out.append(alert)
                    break
        elif self.incident["level"] != "day":
            out += self._check_rolling_recovery(self.rolling[1], ts_s, dt_h, ref)
        return out

    # -- rolling scales ---------------------------------------------------------------------

    def _threshold(self, level: str, mad: float) -> float:
        k = self.settings.day_noise_k if level == "day" else self.settings.noise_k
        return max(self.min_drop[level], k * SQRT_PI_2 * mad)

    def _check_rolling(self, rolling: _Rolling, ts_s: float, ref: float) -> Alert | None:
        performance = rolling.performance(ref)
        if performance is None:
            return None
        hours, meas, exp = rolling.sums()
        threshold = self._threshold(rolling.name, rolling.mad)
        if performance >= 1.0 - threshold:
            return None
        # Onset: the trailing run of blocks that are clearly low on their own.
        run = []
        for block in reversed(rolling.blocks):
            if block[3] <= 0.0 or block[2] / block[3] / ref >= 1.0 - threshold:
                break
            run.append(block)
        if len(run) < MIN_RUN_BLOCKS:
            return None
        onset_s = run[-1][0]
        lost = sum(b[3] * ref - b[2] for b in run)
        return self._fire(
            level=rolling.name,
            onset_s=onset_s,
            ts_s=ts_s,
            threshold=threshold,
            performance=performance,
            efficiency_pct=100.0 * performance * ref,
            expected_kw=exp * ref / hours,
            observed_kw=meas / hours,
            lost_kwh=lost,
            cause=self._cause("sudden", 1.0 - performance),
        )

    def _back(self, threshold: float) -> float:
        """The performance above which the open incident's loss counts as gone.

        Half the resolving scale's threshold, or a quarter of the loss that fired it if
        that is less: a loss caught just above a threshold (a soiling ramp passing
        through, a noisy excursion) must be mostly gone, not merely a little smaller.
        """
        incident = self.incident
        assert incident is not None
        return 1.0 - min(threshold / 2.0, incident["loss"] / 4.0)

    def _check_rolling_recovery(
        self, rolling: _Rolling, ts_s: float, dt_h: float, ref: float
    ) -> list[Alert]:
        """Resolve once the 2-hour window has been back for a whole window of usable time.

        The slower window, whichever fired: it is the less noisy, and a loss just under a
        firing threshold crosses the resolving one now and then; back for one evaluation
        of the fast window would flap one stretch into many incidents. A repaired fault
        therefore resolves about three hours of daylight after the repair.
        """
        incident = self.incident
        assert incident is not None
        performance = rolling.performance(ref)
        if performance is None:
            return []
        back = self._back(self._threshold(rolling.name, rolling.mad))
        if performance < back:
            incident["recovering"] = None
            return []
        if incident.get("recovering") is None:
            # Recovery began with the trailing run of blocks that are fine on their own.
            since_s, hours = ts_s, 0.0
            for block in reversed(rolling.blocks):
                if block[3] <= 0.0 or block[2] / block[3] / ref < back:
                    break
                since_s, hours = block[0], hours + block[1]
            incident["recovering"] = [since_s, hours]
        else:
            incident["recovering"][1] += dt_h
        since_s, hours = incident["recovering"]
        if hours * 3600.0 < rolling.window_s:
            return []
        end_s = max(since_s, incident["start"])
        return [self._resolve(ts_s, end_s, 100.0 * performance * ref, performance)]

    # -- the day scale ----------------------------------------------------------------------

    def _close_day(self, ts_s: float) -> list[Alert]:
        day, self.day = self.day, None
        assert day is not None
        if day.hours < 1.0 or day.exp_kwh <= 0.0:
            return []  # an overcast day or a sensor gap: too little light to judge
        pi = day.meas_kwh / day.exp_kwh
        if self.ref is None:
            self._learn_shape(day, pi)
            self.learn[2] += 1
            learned = self.learn[0] / self.learn[1] if self.learn[1] > 0 else 0.0
            # Under 5 % of the spec is a dead array or a wrong device, not a normal to
            # learn: learning goes on until the array produces.
            if self.learn[2] >= self.settings.learn_days and learned >= MIN_REF:
                self.ref = learned
            return []
        ref = self.ref
        performance = pi / ref
        previous = self.days[-1][3] if self.days else None
        self.days = [*self.days, [day.first_s, day.meas_kwh, day.exp_kwh, performance]][
            -HISTORY_DAYS:
        ]
        threshold = self._threshold("day", self.day_mad)
        out: list[Alert] = []
        incident = self.incident
        if incident is not None:
            # A whole day after the onset back to normal resolves any incident (the day
            # of the onset itself is partly normal, so it cannot).
            back = self._back(threshold)
            if incident["start"] < day.first_s and performance >= back:
                out.append(self._resolve(ts_s, day.first_s, 100.0 * pi, performance))
            return out
        if day.incident:
            return out
        low = performance < 1.0 - threshold
        confirmed = performance < 1.0 - 2.0 * threshold or (
            previous is not None and previous < 1.0 - threshold / 2.0
        )
        if low and confirmed:
            run = []
            for first_s, meas, exp, perf in reversed(self.days):
                if perf >= 1.0 - threshold:
                    break
                run.append((first_s, meas, exp))
            onset_s = run[-1][0]
            out.append(
                self._fire(
                    level="day",
                    onset_s=onset_s,
                    ts_s=ts_s,
                    threshold=threshold,
                    performance=performance,
                    efficiency_pct=100.0 * pi,
                    expected_kw=day.exp_kwh * ref / day.hours,
                    observed_kw=day.meas_kwh / day.hours,
                    lost_kwh=sum(exp * ref - meas for _, meas, exp in run),
                    cause=self._cause("degradation", 1.0 - performance, len(run)),
                )
            )
            return out
        if previous is not None:
            self.day_mad = _fold_noise(self.day_mad, performance - previous, "day")
        weight = REF_UP_WEIGHT if pi > ref else REF_DOWN_WEIGHT
        # A day far above normal is more likely a shaded or soiled sensor than a
        # cleaner array: it moves the normal by at most 10 %.
        self.ref = ref + weight * (min(pi, 1.1 * ref) - ref)
        self._learn_shape(day, pi)
        return out

    def _learn_shape(self, day: _Day, pi: float) -> None:
        """Move each half hour's shape towards its PI relative to the day's (with shape)."""
        if day.incident or pi <= 0.0:
            return
        for key, (hours, meas, exp) in day.bins.items():
            if hours >= MIN_BIN_HOURS and exp > 0.0:
                relative = min(max(meas / exp / pi, 0.3), 1.5)
                index = int(key)
                self.shape[index] += SHAPE_WEIGHT * (relative - self.shape[index])

    def _cause(self, default: str, loss: float, run_days: int = 0) -> str:
        """Soiling if the days before the loss (not those in it) were already declining.

        A decline steeper than 0.1 %/day over up to a week, worth at least a third of
        the loss and twice the day noise (a flat week's fitted slope scatters by about
        0.2 %/day), is dirt building up; otherwise ``default``: ``sudden`` for a loss
        the rolling windows caught, ``degradation`` for a step seen only over days.
        """
        before = self.days[: len(self.days) - run_days][-7:]
        if len(before) < 3:
            return default
        x = np.array([d[0] for d in before]) / 86400.0
        slope = float(np.polyfit(x, np.array([d[3] for d in before]), 1)[0])
        decline = -slope * float(x[-1] - x[0])
        noise = 2.0 * SQRT_PI_2 * self.day_mad
        if slope < -SOILING_SLOPE_PER_DAY and decline >= max(loss / 3.0, noise):
            return "soiling"
        return default

    # -- incidents --------------------------------------------------------------------------

    def _details(
        self, performance: float, efficiency_pct: float, threshold: float
    ) -> dict[str, DetailValue]:
        ref = self.ref or 1.0
        return {
            "efficiency_pct": round(efficiency_pct, 2),
            "normal_efficiency_pct": round(100.0 * ref, 2),
            "performance_pct": round(100.0 * performance, 2),
            "loss_pct": round(100.0 * (1.0 - performance), 2),
            "threshold_pct": round(100.0 * threshold, 2),
            "readings_without_irradiance": float(self.counters["readings_without_irradiance"]),
        }

    def _fire(
        self,
        *,
        level: str,
        onset_s: float,
        ts_s: float,
        threshold: float,
        performance: float,
        efficiency_pct: float,
        expected_kw: float,
        observed_kw: float,
        lost_kwh: float,
        cause: str,
    ) -> Alert:
        onset_s = min(onset_s, ts_s)
        details = self._details(performance, efficiency_pct, threshold)
        details.update(
            cause=cause,
            level=level,
            detected_at=_iso(ts_s),
            lost_kwh=round(max(0.0, lost_kwh), 3),
        )
        device = self.array.device
        what = {"15min": "the last 15 min", "2h": "the last 2 h", "day": "the day"}[level]
        alert = firing(
            site=self.site,
            device=device,
            alert_type=ALERT_TYPE,
            severity=Severity.WARNING,
            subject=f"PV array {device} underperforming ({cause})",
            message=(
                f"{device} produced {100.0 * performance:.0f} % of its normal output over "
                f"{what} ({efficiency_pct:.0f} % of its specification); likely {cause}"
            ),
            start=_dt(onset_s),
            observed=round(observed_kw, 4),
            expected=round(expected_kw, 4),
            details=details,
        )
        self.incident = {
            "level": level,
            "start": onset_s,
            "threshold": threshold,
            "loss": 1.0 - performance,
            "lost_kwh": max(0.0, lost_kwh),
            "alert": alert.model_dump(mode="json"),
        }
        if self.day is not None:
            self.day.incident = True
        return alert

    def _resolve(
        self, ts_s: float, end_s: float, efficiency_pct: float, performance: float
    ) -> Alert:
        incident = self.incident
        assert incident is not None
        self.incident = None
        alert = Alert.model_validate(incident["alert"])
        # The windows still hold the faulty minutes: they restart, so they cannot re-fire
        # the incident that just closed.
        for rolling in self.rolling:
            rolling.reset()
        return resolved(
            alert,
            _dt(max(end_s, incident["start"])),
            {
                "resolved_at": _iso(ts_s),
                "efficiency_pct": round(efficiency_pct, 2),
                "performance_pct": round(100.0 * performance, 2),
                "lost_kwh": round(max(0.0, incident["lost_kwh"]), 3),
            },
        )


class SiteSolar:
    """The detectors of one site's arrays, with their state as JSON per device."""

    def __init__(self, site: str, settings: SolarSettings) -> None:
        self.site = site
        self.settings = settings

    def key(self, device: str) -> str:
        """The table key of a device's state: site and device."""
        return f"{self.site}/{device}"

    def detector(self, device: str, data: Mapping[str, Any] | None) -> ArrayDetector | None:
        array = self.settings.array(device)
        if array is None:
            return None
        return ArrayDetector.from_json(self.site, array, self.settings, data)

    def step(
        self, states: Mapping[str, Mapping[str, Any] | None], readings: Iterable[SolarReading]
    ) -> tuple[dict[str, dict[str, Any]], list[Alert]]:
        """Feed a batch: ``states`` by device in, the new states by device and the alerts out.

        Readings are taken per device in time order (stable for equal times), so a batch
        that interleaves devices or arrives slightly shuffled gives the same result.
        """
        by_device: dict[str, list[SolarReading]] = {}
        for reading in readings:
            by_device.setdefault(reading.device, []).append(reading)
        new: dict[str, dict[str, Any]] = {}
        out: list[Alert] = []
        for device in sorted(by_device):
            detector = self.detector(device, states.get(device))
            if detector is None:
                continue
            for reading in sorted(by_device[device], key=lambda r: r.ts):
                out += detector.observe(reading)
            new[device] = detector.to_json()
        return new, out


# --- the file path and the report -----------------------------------------------------------


def _column(frame: pl.DataFrame, name: str) -> list[float | None]:
    return frame[name].to_list() if name in frame.columns else [None] * frame.height


def detect_frame(
    frame: pl.DataFrame, site: str, settings: SolarSettings
) -> tuple[list[Alert], dict[str, ArrayDetector]]:
    """Run the detectors over a telemetry frame of one site (``wattstream detect``).

    Columns: ``time`` (tz-aware), ``device``, ``power_kw``, and where present
    ``irradiance_w_m2``, ``temp_air_c``, ``temp_module_c``; rows of devices without an
    array are skipped (filter ``kind == "solar"`` first). Alerts come in time order per
    device, exactly as the stream gives them; the detectors are returned for their
    counters and state.
    """
    detectors: dict[str, ArrayDetector] = {}
    alerts: list[Alert] = []
    for array in settings.arrays:
        rows = frame.filter(pl.col("device") == array.device).sort("time", maintain_order=True)
        if rows.height == 0:
            continue
        detector = detectors[array.device] = ArrayDetector(site, array, settings)
        times = rows["time"].dt.epoch("us").to_list()
        columns = zip(
            times,
            rows["power_kw"].to_list(),
            _column(rows, "irradiance_w_m2"),
            _column(rows, "temp_air_c"),
            _column(rows, "temp_module_c"),
            strict=True,
        )
        for ts_us, power_kw, irradiance, temp_air, temp_module in columns:
            if power_kw is None or not math.isfinite(power_kw):
                continue  # the schema rejects such a reading on the wire too
            alerts += detector.observe_values(
                ts_us / 1e6, power_kw, _finite(irradiance), _finite(temp_air), _finite(temp_module)
            )
    return alerts, detectors


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _floats(frame: pl.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(frame.height, np.nan)
    return frame[name].cast(pl.Float64).fill_null(np.nan).to_numpy()


def efficiency_report(
    frame: pl.DataFrame, settings: SolarSettings, timezone: str = "UTC"
) -> pl.DataFrame:
    """Efficiency per array per day, and overall (``day`` null), from a telemetry frame.

    Columns in: as :func:`detect_frame`. Columns out: ``device``, ``day`` (local date in
    ``timezone``), ``energy_kwh`` (all readings), ``usable_h``, ``measured_kwh`` and
    ``expected_kwh`` (usable readings only, as the detector filters them),
    ``efficiency_pct`` (measured over expected against the specification, null without
    usable light), ``readings`` and ``readings_without_irradiance``. The spec's
    efficiency, not the learned normal: a long decline of it is the array's degradation.
    """
    parts: list[pl.DataFrame] = []
    max_interval_s = settings.max_interval_min * 60.0
    for array in settings.arrays:
        rows = frame.filter(pl.col("device") == array.device).sort("time")
        if rows.height == 0:
            continue
        g = _floats(rows, "irradiance_w_m2")
        power = _floats(rows, "power_kw")
        expected = expected_ac_kw(
            array, g, _floats(rows, "temp_air_c"), _floats(rows, "temp_module_c")
        )
        t_s = rows["time"].dt.epoch("us").to_numpy() / 1e6
        dt_h = np.minimum(np.diff(t_s, prepend=t_s[0]), max_interval_s) / 3600.0
        usable = (g >= settings.min_irradiance_w_m2) & (expected > 0.0) & (dt_h > 0.0)
        previous_g = np.concatenate(([np.nan], g[:-1]))
        with np.errstate(invalid="ignore"):
            steady = np.abs(g - previous_g) <= settings.max_irradiance_change_pct / 100.0 * (
                np.fmax(g, previous_g)
            )
        usable &= steady & np.concatenate(([False], steady[:-1]))
        if array.inverter_kw is not None:
            clip_kw = array.inverter_kw * (1.0 - settings.clip_margin_pct / 100.0)
            usable &= (expected < clip_kw) & (power < clip_kw)
        usable &= np.isfinite(power)
        data = pl.DataFrame(
            {
                "day": rows["time"].dt.convert_time_zone(timezone).dt.date(),
                "energy_kwh": np.nan_to_num(power) * dt_h,
                "usable_h": np.where(usable, dt_h, 0.0),
                "measured_kwh": np.where(usable, power * dt_h, 0.0),
                "expected_kwh": np.where(usable, expected * dt_h, 0.0),
                "no_irradiance": np.isnan(g),
            }
        )
        sums = [
            pl.col("energy_kwh").sum(),
            pl.col("usable_h").sum(),
            pl.col("measured_kwh").sum(),
            pl.col("expected_kwh").sum(),
            pl.len().alias("readings"),
            pl.col("no_irradiance").sum().alias("readings_without_irradiance"),
        ]
        daily = data.group_by("day").agg(sums).sort("day")
        overall = data.select(sums).with_columns(pl.lit(None, dtype=pl.Date).alias("day"))
        both = pl.concat([daily, overall.select(daily.columns)])
        parts.append(both.with_columns(pl.lit(array.device).alias("device")))
    schema = {
        "device": pl.String,
        "day": pl.Date,
        "energy_kwh": pl.Float64,
        "usable_h": pl.Float64,
        "measured_kwh": pl.Float64,
        "expected_kwh": pl.Float64,
        "efficiency_pct": pl.Float64,
        "readings": pl.Int64,
        "readings_without_irradiance": pl.Int64,
    }
    if not parts:
        return pl.DataFrame(schema=schema)
    out = pl.concat(parts).with_columns(
        pl.when(pl.col("expected_kwh") > 0)
        .then(100.0 * pl.col("measured_kwh") / pl.col("expected_kwh"))
        .otherwise(None)
        .alias("efficiency_pct"),
    )
    return out.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])


# --- wiring ---------------------------------------------------------------------------------


def register(app: faust.App, settings: Settings) -> None:
    """Wire the solar efficiency detector: telemetry in, underperformance alerts out.

    Only sites with a ``solar`` section get work; sections are validated here, at
    start-up. State is one table entry per site and array (``site/device``): the
    telemetry topic is keyed by site, so every entry of a site is written from that
    site's partition. Undecodable telemetry is dead-lettered once,
    by the shared site agent (:func:`pipeline.streams.site_agent`).
    """
    from pipeline.streams import site_table, site_telemetry_agent

    sites = {
        site.id: SiteSolar(site.id, cfg)
        for site in settings.sites
        if (cfg := solar_settings(site)) is not None
    }
    table = site_table(
        app,
        settings,
        "solar-state",
        "Per-array solar detector state: learned normal, windows, open incident.",
    )

    def step(site: str, batch: TelemetryBatch) -> list[Alert]:
        readings = [r for r in batch.readings if isinstance(r, SolarReading)]
        if not readings:
            return []
        engine = sites[site]
        states = {device: table.get(engine.key(device)) for device in {r.device for r in readings}}
        new, out = engine.step(states, readings)
        for device, state in new.items():
            table[engine.key(device)] = state
        return out

    site_telemetry_agent(app, settings, f"{__name__}.solar", sites, step)
