"""Realistic, seeded device profiles: household load, rooftop PV and EV charging sessions.

Every public function is pure: given the same arguments (including ``seed``)
it returns the same value for an instant, whatever was asked before, so a
simulator can be restarted, run at any speed or asked out of order.

* Household load: demandlib's BDEW 2025 standard load profile H25 (15-min mean
  power, local time), scaled so that a year sums to ``annual_kwh``,
  interpolated between interval mid-points, times seeded minute-scale noise
  (a log-normal factor per minute) plus seeded appliance runs (kettle, oven,
  washing machine: 1-3 kW for a 10-minute slot, likelier when the profile is
  high, i.e. when people are at home and awake).
* PV: the TMY3 of Greensboro NC (station 723170, bundled with pvlib as
  ``pvlib/data/723170TYA.CSV``, the weather data/sample/generate.py uses too)
  at its own location and true times, through pvlib's PVWatts chain:
  isotropic plane-of-array irradiance, SAPM cell temperature, ``pvwatts_dc``
  with system losses, ``inverter.pvwatts``. Hourly means are interpolated
  between hour mid-points; the TMY's calendar is reused for every year.
* EV sessions: one per vehicle per local day, arriving in the evening with a
  drained battery, charging at the charger limit until the target state of
  charge, then idle until departure the next morning.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import warnings
import zlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pvlib

HOME_MAX_KW = 15.0
"""A household's main fuse at about 3 x 25 A: consumption never exceeds it. [kW]"""
LOAD_NOISE_SIGMA = 0.25
"""Spread of the per-minute log-normal factor: a minute's load often differs by a
quarter from the 15-min profile (fridges, lights, electronics switching). [-]"""
APPLIANCE_SLOT_S = 600
"""Appliance runs last one 10-minute slot: a kettle boils in 3-5 min, an oven
heats in cycles of ~10 min. [s]"""
TMY_RESOURCE = "723170TYA.CSV"
PV_GAMMA_PDC = -0.0037
"""Power temperature coefficient of mono-Si PERC/TOPCon modules. [1/degC]"""
PV_LOSSES_PCT = 14.0
"""PVWatts' default system losses (soiling, wiring, mismatch, ...). [%]"""
INVERTER_ETA_NOM = 0.96
APPLIANCE_SHARE = 0.1
"""Energy share of the discrete appliance runs in a 3,500 kWh home. [-]"""


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """An independent stream per (seed, purpose, instant): pure, order-independent."""
    return np.random.default_rng([seed, *(zlib.crc32(str(k).encode()) for k in keys)])


def _epoch_s(at: datetime) -> float:
    if at.tzinfo is None:
        raise ValueError(f"{at!r} is naive: profiles take timezone-aware instants")
    return at.timestamp()


# --- household load ---------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _h25_year_kw(year: int, timezone: str) -> tuple[np.ndarray, np.ndarray]:
    """(epoch seconds of 15-min interval mid-points, H25 power scaled to 1 kWh a year)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas deprecations inside demandlib
        from demandlib.bdew import H25

        # A day either side, so interpolation works across New Year in any time zone.
        index = pd.date_range(
            f"{year - 1}-12-31", f"{year + 1}-01-02", freq="15min", tz=timezone, inclusive="left"
        )
        values = H25(index).to_numpy(dtype=float)
        year_only = np.asarray(index.year == year)
        annual_kwh = float(values[year_only].sum()) / 4.0  # kW over 15 min -> kWh
    mids_s = np.asarray(index.tz_convert("UTC").as_unit("s").asi8, dtype=float) + 450.0
    return mids_s, values / annual_kwh


def household_base_kw(at: datetime, annual_kwh: float, timezone: str = "Europe/Berlin") -> float:
    """The H25 standard profile's power at ``at``, for a home using ``annual_kwh`` a year. [kW]"""
    if annual_kwh < 0:
        raise ValueError(f"annual_kwh must not be negative, got {annual_kwh}")
    t_s = _epoch_s(at)
    year = at.astimezone(ZoneInfo(timezone)).year
    mids_s, per_kwh = _h25_year_kw(year, timezone)
    return float(np.interp(t_s, mids_s, per_kwh)) * annual_kwh


def household_load_kw(
    device: str,
    at: datetime,
    *,
    annual_kwh: float = 3_500.0,
    seed: int = 0,
    timezone: str = "Europe/Berlin",
) -> float:
    """A home's consumption at ``at``: H25 shape, minute noise and appliance runs. [kW]

    The noise factor has mean 1 and the appliance runs replace a share of the
    base, so a year still sums to about ``annual_kwh``. Always within 0..HOME_MAX_KW.
    """
    base_kw = household_base_kw(at, annual_kwh, timezone)
    # Appliance runs take this share of the energy (less in a big home, whose base load
    # is mostly heating and cooking already in the profile); the rest stays smooth.
    share = APPLIANCE_SHARE * min(1.0, 3_500.0 / max(annual_kwh, 1.0))
    t_s = _epoch_s(at)
    minute = math.floor(t_s / 60)
    z = _rng(seed, "load", device, minute).standard_normal()
    noisy_kw = base_kw * (1.0 - share) * math.exp(LOAD_NOISE_SIGMA * z - LOAD_NOISE_SIGMA**2 / 2)
    slot = math.floor(t_s / APPLIANCE_SLOT_S)
    appliance = _rng(seed, "appliance", device, slot)
    # Runs are likelier when the profile is high (people home and awake); with a mean
    # run of 2 kW, this probability makes the runs' expected energy ``share`` of the base.
    if appliance.random() < min(0.5, share * base_kw / 2.0):
        noisy_kw += appliance.uniform(1.0, 3.0)
    return float(min(max(noisy_kw, 0.0), HOME_MAX_KW))


# --- PV -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PvArray:
    """A rooftop array with its inverter."""

    kwp: float = 5.0
    """DC nameplate. [kWp]"""
    tilt_deg: float = 30.0
    azimuth_deg: float = 180.0
    """Degrees from north, clockwise (180 = south)."""
    inverter_kw: float = 4.6
    """AC limit. [kW]"""


def tmy_path() -> Path:
    """The TMY3 file inside the installed pvlib package (pvlib/data/)."""
    resource = importlib.resources.files("pvlib") / "data" / TMY_RESOURCE
    path = Path(str(resource))
    if not path.is_file():  # e.g. a zipped install; fall back to the package directory
        path = Path(pvlib.__file__).resolve().parent / "data" / TMY_RESOURCE
    return path


@functools.lru_cache(maxsize=16)
def _pv_year_kw(year: int, array: PvArray) -> tuple[np.ndarray, np.ndarray]:
    """(epoch seconds of hour mid-points, AC power) of ``array`` over the TMY relabelled
    to ``year``. [s], [kW]"""
    data, meta = pvlib.iotools.read_tmy3(str(tmy_path()), coerce_year=year, map_variables=True)
    location = pvlib.location.Location(
        float(meta["latitude"]), float(meta["longitude"]), altitude=float(meta["altitude"])
    )
    # TMY rows are stamped at the end of the hour and hold the hour's mean.
    mids = pd.DatetimeIndex(data.index) - pd.Timedelta(minutes=30)
    solpos = location.get_solarposition(mids)
    poa = pvlib.irradiance.get_total_irradiance(
        array.tilt_deg,
        array.azimuth_deg,
        solpos["apparent_zenith"].to_numpy(),
        solpos["azimuth"].to_numpy(),
        data["dni"].clip(lower=0).to_numpy(),
        data["ghi"].clip(lower=0).to_numpy(),
        data["dhi"].clip(lower=0).to_numpy(),
    )
    poa_w_m2 = np.nan_to_num(np.asarray(poa["poa_global"], dtype=float))
    params = pvlib.temperature.TEMPERATURE_MODEL_PARAMETERS["sapm"]["close_mount_glass_glass"]
    t_cell_c = pvlib.temperature.sapm_cell(
        poa_w_m2, data["temp_air"].to_numpy(), data["wind_speed"].to_numpy(), **params
    )
    dc_w = np.asarray(
        pvlib.pvsystem.pvwatts_dc(poa_w_m2, t_cell_c, array.kwp * 1000.0, PV_GAMMA_PDC)
    ) * (1.0 - PV_LOSSES_PCT / 100.0)
    ac_w = pvlib.inverter.pvwatts(
        dc_w, array.inverter_kw * 1000.0 / INVERTER_ETA_NOM, eta_inv_nom=INVERTER_ETA_NOM
    )
    ac_kw = np.clip(np.nan_to_num(np.asarray(ac_w, dtype=float)) / 1000.0, 0.0, None)
    mids_s = np.asarray(mids.tz_convert("UTC").as_unit("s").asi8, dtype=float)
    return mids_s, ac_kw


def pv_power_kw(at: datetime, array: PvArray = PvArray()) -> float:
    """AC output of ``array`` at ``at`` under the TMY weather. [kW]"""
    t_s = _epoch_s(at)
    mids_s, ac_kw = _pv_year_kw(at.astimezone(UTC).year, array)
    return float(np.interp(t_s, mids_s, ac_kw))


# --- EV sessions --------------------------------------------------------------------------


@dataclass(frozen=True)
class EvConfig:
    capacity_kwh: float = 60.0
    """Usable battery capacity. [kWh]"""
    charger_kw: float = 11.0
    """Wallbox limit (3-phase 16 A). [kW]"""
    charge_efficiency: float = 0.92
    """Grid to battery. [-]"""
    target_soc_pct: float = 80.0
    """Where charging stops: most drivers cap daily charging at 80 % for battery life. [%]"""
    timezone: str = "Europe/Berlin"


@dataclass(frozen=True)
class EvSession:
    """One plug-in: arrival, energy to add at the charger limit, departure."""

    arrival: datetime
    departure: datetime
    arrival_soc_pct: float
    target_soc_pct: float
    charger_kw: float
    capacity_kwh: float
    charge_efficiency: float

    @property
    def needed_kwh(self) -> float:
        """Energy the battery must take to reach the target. [kWh]"""
        return max(0.0, (self.target_soc_pct - self.arrival_soc_pct) / 100.0 * self.capacity_kwh)

    @property
    def charged_at(self) -> datetime:
        """When the target is reached at the charger limit (may be after departure)."""
        hours = self.needed_kwh / (self.charger_kw * self.charge_efficiency)
        return self.arrival + timedelta(hours=hours)


@dataclass(frozen=True)
class EvState:
    power_kw: float
    """Drawn from the grid; 0 when idle or away. [kW]"""
    soc_pct: float
    plugged_in: bool
    energy_kwh: float
    """Delivered to the car in the current (or last) session, from the grid. [kWh]"""


def ev_session(
    device: str, day: date, *, seed: int = 0, config: EvConfig = EvConfig()
) -> EvSession:
    """The session of ``device`` that arrives on local ``day``.

    Arrival around 18:30 local (sd 1 h, within 15:00-23:00), departure the next
    morning around 07:30 (sd 45 min, within 05:30-09:30), arriving with 15-60 %.
    """
    zone = ZoneInfo(config.timezone)
    rng = _rng(seed, "ev", device, day.isoformat())
    arrival_h = float(np.clip(rng.normal(18.5, 1.0), 15.0, 23.0))
    departure_h = float(np.clip(rng.normal(7.5, 0.75), 5.5, 9.5))
    midnight = datetime.combine(day, time(0), tzinfo=zone)
    next_midnight = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)
    return EvSession(
        arrival=(midnight + timedelta(hours=arrival_h)).astimezone(UTC),
        departure=(next_midnight + timedelta(hours=departure_h)).astimezone(UTC),
        arrival_soc_pct=float(rng.uniform(15.0, 60.0)),
        target_soc_pct=config.target_soc_pct,
        charger_kw=config.charger_kw,
        capacity_kwh=config.capacity_kwh,
        charge_efficiency=config.charge_efficiency,
    )


def session_state(session: EvSession, at: datetime) -> EvState:
    """The state during a session's day: away before arrival, charging, full, gone."""
    if at < session.arrival:
        return EvState(0.0, session.arrival_soc_pct, False, 0.0)
    end = min(at, session.departure, session.charged_at)
    charging_h = (end - session.arrival).total_seconds() / 3600.0
    grid_kwh = charging_h * session.charger_kw
    soc_pct = min(
        session.target_soc_pct,
        session.arrival_soc_pct
        + grid_kwh * session.charge_efficiency / session.capacity_kwh * 100.0,
    )
    soc_pct = max(soc_pct, session.arrival_soc_pct)  # arriving above target: no charge
    plugged_in = at < session.departure
    charging = plugged_in and at < session.charged_at
    return EvState(session.charger_kw if charging else 0.0, soc_pct, plugged_in, grid_kwh)


def ev_state(device: str, at: datetime, *, seed: int = 0, config: EvConfig = EvConfig()) -> EvState:
    """The state of ``device`` at ``at``: last night's session until it departs, then
    tonight's. Between sessions the car is away, with the state of charge it left with
    (the next arrival's lower one shows what the day's driving used)."""
    local_day = at.astimezone(ZoneInfo(config.timezone)).date()
    last_night = ev_session(device, local_day - timedelta(days=1), seed=seed, config=config)
    if at < last_night.departure:
        return session_state(last_night, at)
    tonight = ev_session(device, local_day, seed=seed, config=config)
    if at >= tonight.arrival:
        return session_state(tonight, at)
    gone = session_state(last_night, last_night.departure)
    return EvState(0.0, gone.soc_pct, False, gone.energy_kwh)
