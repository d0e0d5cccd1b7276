"""The solar detector's accuracy harness: weeks of pvlib PV with labelled losses.

Moved out of ``processors/solar.py`` (a processor holds decision code, not its test
bench): :func:`simulate` builds realistic PV telemetry from pvlib's bundled TMY with
injected underperformance (sudden losses, soiling ramps, degradation-like steps),
:func:`evaluation_run` runs the detector as the stream would, and the result is
scored with :mod:`processors.scoring` like every other detector.
"""

from __future__ import annotations

import importlib.resources
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from pipeline.schemas import Alert
from processors.scoring import LabelledWindow
from processors.solar import LABEL, SAPM_PARAMS, PvArraySettings, SolarSettings, detect_frame

FaultKind = Literal["sudden", "soiling", "degradation"]
TMY_RESOURCE = "723170TYA.CSV"


@dataclass(frozen=True)
class Simulation:
    frame: pl.DataFrame
    """time, device, kind, power_kw, irradiance_w_m2, temp_air_c: like the telemetry."""
    windows: list[LabelledWindow]
    settings: SolarSettings
    """The spec the detector is told (the simulated array differs from it)."""


def _tmy_path() -> Path:
    import pvlib

    resource = importlib.resources.files("pvlib") / "data" / TMY_RESOURCE
    path = Path(str(resource))
    if not path.is_file():
        path = Path(pvlib.__file__).resolve().parent / "data" / TMY_RESOURCE
    return path


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    eps = rng.standard_normal(n) * math.sqrt(1.0 - phi * phi)
    out = np.empty(n)
    x = float(rng.standard_normal())
    for i in range(n):
        x = phi * x + eps[i]
        out[i] = x
    return out


def simulate(
    seed: int,
    *,
    kind: FaultKind | None = None,
    size: float = 0.3,
    days: int = 56,
    step_min: int = 5,
    clean_days: int = 7,
    device: str = "pv-1",
) -> Simulation:
    """Weeks of realistic PV telemetry from pvlib's bundled TMY, with labelled faults.

    Weather: the TMY3 of Greensboro NC (bundled with pvlib) from a seed-chosen date
    between March and September, interpolated to ``step_min`` as clear-sky indexes, with
    broken clouds as a sun/shade Markov chain (the sensor and the array see slightly
    different clouds), air temperature and wind. The array is not its spec: nameplate
    -10..+5 %, temperature coefficient and losses off, beam incidence-angle losses the
    spec ignores, wind the spec assumes; the POA sensor has a calibration error of
    +-3 % and 1 % noise, the meter 0.5 %; a few hours of missing irradiance.

    Faults (of ``kind`` and ``size``; none if ``kind`` is None) start after
    ``clean_days`` and are separated by at least 4 clean days: ``sudden`` a loss of
    ``size`` from a random daylight minute for 6 h to 3 days; ``degradation`` a loss of
    ``size`` from a random daylight minute for 7-14 days, then repaired; ``soiling`` a loss
    growing by ``size`` per day for 10-25 days, then washed off by rain at a random hour.
    A fault multiplies the DC power, so the inverter still clips a faulty array.
    """
    import pandas as pd
    import pvlib

    rng = np.random.default_rng(seed)
    data, meta = pvlib.iotools.read_tmy3(str(_tmy_path()), coerce_year=2025, map_variables=True)
    lat, lon, alt = float(meta["latitude"]), float(meta["longitude"]), float(meta["altitude"])
    first_day = int(rng.integers(60, 273 - days)) if days < 200 else 0
    start = pd.Timestamp("2025-01-01", tz="UTC") + pd.Timedelta(days=first_day)
    n = days * 24 * 60 // step_min
    times = pd.date_range(start, periods=n, freq=f"{step_min}min")
    hourly_times = pd.DatetimeIndex(data.index).tz_convert("UTC") - pd.Timedelta(minutes=30)
    location = pvlib.location.Location(lat, lon, altitude=alt)

    def to_steps(values: np.ndarray) -> np.ndarray:
        return np.interp(times.asi8.astype(float), hourly_times.asi8.astype(float), values)

    cs_hour = location.get_clearsky(hourly_times, model="ineichen")
    dni_cs, ghi_cs = cs_hour["dni"].to_numpy(), cs_hour["ghi"].to_numpy()
    dni_h, dhi_h = data["dni"].clip(lower=0).to_numpy(), data["dhi"].clip(lower=0).to_numpy()
    kb = np.where(dni_cs > 30, dni_h / np.maximum(dni_cs, 1.0), np.nan)
    kd = np.where(ghi_cs > 20, dhi_h / np.maximum(ghi_cs, 1.0), np.nan)
    indexes = pd.DataFrame(
        {"kb": np.clip(kb, 0, 1.0), "kd": np.clip(kd, 0, 1.2)}, index=hourly_times
    )
    indexes = indexes.groupby(indexes.index.floor("D")).transform(lambda s: s.ffill().bfill())
    indexes = indexes.fillna(0.0)  # fmt: skip
    solpos = location.get_solarposition(times)
    cs = location.get_clearsky(times, model="ineichen", solar_position=solpos)
    kb_t, kd_t = to_steps(indexes["kb"].to_numpy()), to_steps(indexes["kd"].to_numpy())
    # Broken clouds: the sun is out with probability s per step; the array and the sensor
    # a few metres apart share the state except at cloud edges (5 % of steps differ).
    s = np.clip(kb_t / 0.9, 0.0, 1.0)
    sun_array = np.empty(n)
    sunny = True
    u = rng.random(n)
    for i in range(n):
        switch = 0.35 * (s[i] * (1 - s[i])) * 4
        if u[i] < switch:
            sunny = rng.random() < s[i]
        sun_array[i] = 1.0 if s[i] >= 1.0 else (0.0 if s[i] <= 0.0 else float(sunny))
    edge = (rng.random(n) < 0.05) & (s > 0) & (s < 1)
    sun_sensor = np.where(edge, 1.0 - sun_array, sun_array)
    beam_level = np.where(s >= 1.0, kb_t, 0.9)
    dhi = np.clip(kd_t * cs["ghi"].to_numpy() * (1 + 0.03 * _ar1(rng, n, 0.9)), 0, None)
    zen, azi = solpos["apparent_zenith"].to_numpy(), solpos["azimuth"].to_numpy()
    cos_zen = np.clip(np.cos(np.radians(zen)), 0, None)
    tilt, azimuth = 25.0, 180.0
    dni_extra = pvlib.irradiance.get_extra_radiation(times).to_numpy()

    def poa(sun: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dni = beam_level * sun * cs["dni"].to_numpy()
        ghi = dni * cos_zen + dhi
        total = pvlib.irradiance.get_total_irradiance(
            tilt, azimuth, zen, azi, dni, ghi, dhi, dni_extra=dni_extra, model="haydavies"
        )
        return (
            np.nan_to_num(np.asarray(total["poa_global"], dtype=float)),
            np.nan_to_num(np.asarray(total["poa_direct"], dtype=float)),
        )

    poa_array, direct_array = poa(sun_array)
    poa_sensor, _ = poa(sun_sensor)
    aoi = pvlib.irradiance.aoi(tilt, azimuth, zen, azi)
    iam = np.nan_to_num(np.asarray(pvlib.iam.physical(aoi), dtype=float))
    effective = poa_array - direct_array * (1.0 - iam) - (poa_array - direct_array) * 0.05
    temp_air = to_steps(data["temp_air"].to_numpy()) + 0.2 * _ar1(rng, n, 0.98)
    wind = np.clip(to_steps(data["wind_speed"].to_numpy()) * (1 + 0.2 * _ar1(rng, n, 0.8)), 0, None)

    spec = PvArraySettings(
        device=device, kwp=10.0, tilt_deg=tilt, azimuth_deg=azimuth, inverter_kw=8.5
    )
    kwp_true = spec.kwp * rng.uniform(0.90, 1.05)
    gamma_true = spec.temp_coeff_pct_per_c / 100.0 + rng.uniform(-0.0005, 0.0005)
    losses_true = rng.uniform(0.08, 0.16)
    a, b, delta_t = SAPM_PARAMS[spec.mount]
    cell = pvlib.temperature.sapm_cell(poa_array, temp_air, wind, a, b, delta_t)

    factor = np.ones(n)
    windows: list[LabelledWindow] = []
    step = pd.Timedelta(minutes=step_min)
    t = start + pd.Timedelta(days=clean_days)
    end_of_series = times[-1]
    day_mask = np.asarray(solpos["apparent_elevation"] > 20.0)
    while kind is not None:
        if kind == "soiling":
            onset = t.floor("D") + pd.Timedelta(days=1)
            length = pd.Timedelta(days=float(rng.uniform(10, 25))).round(step)
        else:
            daylight = times[(times >= t) & day_mask]
            if len(daylight) == 0:
                break
            onset = daylight[min(len(daylight) - 1, int(rng.integers(0, 24 * 60 // step_min)))]
            hours = rng.uniform(6, 72) if kind == "sudden" else rng.uniform(7 * 24, 14 * 24)
            length = pd.Timedelta(hours=float(hours)).round(step)
        stop = onset + length
        if stop > end_of_series:
            break
        inside = np.asarray((times >= onset) & (times < stop))
        if kind == "soiling":
            elapsed_d = (times[inside] - onset) / pd.Timedelta(days=1)
            factor[inside] *= 1.0 - np.minimum(size * np.asarray(elapsed_d), 0.9)
        else:
            factor[inside] *= 1.0 - size
        windows.append(
            LabelledWindow(
                device, LABEL, onset.to_pydatetime(), stop.to_pydatetime(), f"{kind} {size:g}"
            )
        )
        t = stop + pd.Timedelta(days=float(rng.uniform(4, 8)))

    dc_w = pvlib.pvsystem.pvwatts_dc(effective, cell, kwp_true * 1000.0, gamma_true)
    dc_w = dc_w * (1.0 - losses_true) * factor
    assert spec.inverter_kw is not None
    eta = spec.inverter_efficiency_pct / 100.0
    with np.errstate(invalid="ignore", divide="ignore"):
        ac_w = pvlib.inverter.pvwatts(dc_w, spec.inverter_kw * 1000.0 / eta, eta_inv_nom=eta)
    power_kw = np.clip(np.nan_to_num(np.asarray(ac_w)) / 1000.0, 0.0, None)
    power_kw *= 1.0 + 0.005 * rng.standard_normal(n)
    calibration = rng.uniform(0.97, 1.03)
    sensor = poa_sensor * calibration * (1.0 + 0.01 * rng.standard_normal(n))
    irradiance: np.ndarray = np.clip(sensor, 0.0, None)
    for _ in range(3):  # sensor dropouts of 1-3 h
        at = int(rng.integers(0, n))
        irradiance[at : at + int(rng.integers(12, 36)) * 5 // step_min] = np.nan
    frame = pl.DataFrame(
        {
            "time": pl.from_epoch(
                pl.Series(times.as_unit("us").asi8), time_unit="us"
            ).dt.replace_time_zone("UTC"),
            "device": [device] * n,
            "kind": ["solar"] * n,
            "power_kw": np.round(np.clip(power_kw, 0.0, None), 3),
            "irradiance_w_m2": pl.Series(np.round(irradiance, 1), nan_to_null=True),
            "temp_air_c": np.round(temp_air, 2),
        }
    )
    settings = SolarSettings(arrays=[spec])
    return Simulation(frame=frame, windows=windows, settings=settings)


def evaluation_run(
    seed: int,
    kind: FaultKind | None = "sudden",
    size: float = 0.3,
    *,
    days: int = 56,
    step_min: int = 5,
    settings: SolarSettings | None = None,
    device: str = "pv-1",
) -> tuple[list[Alert], list[LabelledWindow]]:
    """Simulate (see :func:`simulate`), run the detector as the stream would, and return
    the alerts (firing and resolved) and the labelled windows, for the accuracy harness."""
    with warnings.catch_warnings():
        # pvlib 0.16 calls pandas APIs that pandas 3.1 deprecates (e.g. dayofyear).
        warnings.filterwarnings("ignore", module=r"pvlib\.")
        simulation = simulate(
            seed, kind=kind, size=size, days=days, step_min=step_min, device=device
        )
    alerts, _ = detect_frame(simulation.frame, "eval", settings or simulation.settings)
    return alerts, simulation.windows
