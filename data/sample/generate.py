"""Generate wattstream's bundled sample dataset (data/sample/).

Writes, next to this file:

* ``telemetry.parquet``: one week of 1-minute telemetry (battery, solar, meter) for
  three sites near Turin, long format, zstd-compressed.
* ``prices.csv``: hourly day-ahead prices for ``IT-NORD`` over the same week (modelled).

Inputs: the TMY3 for Greensboro NC (station 723170) that ships inside the installed
pvlib package (``pvlib/data/723170TYA.CSV``; its April 7-13, relabelled to Central
European time, stands in for the Turin-area weather), pvlib's models and data (Linke
turbidity), and demandlib's BDEW 2025 standard load profiles (H25, G25).

Everything random is drawn from generators seeded with ``SEED``, so running
``python data/sample/generate.py`` again writes byte-identical files (same library
versions assumed). See README.md beside this file for what is real and what is
modelled.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pvlib

SEED = 20250407
HERE = Path(__file__).resolve().parent
# Weather: a TMY3 file bundled in the pvlib wheel (read at run time, not stored here).
TMY_RESOURCE = "723170TYA.CSV"  # Greensboro Piedmont Triad Int'l, NC, USA
TMY_MONTH = 4  # the simulated week uses TMY April 7-13 (+ the night hour after)
# The TMY's local-standard-time clock (UTC-5) is relabelled as CET (UTC+1), see read_tmy.
TARGET_UTC_OFFSET_H = 1
# Turin-area reference point: the Linke turbidity of every site's clear sky and the
# GHI behind the price model's solar dip.
AREA_LATITUDE = 45.05
AREA_LONGITUDE = 7.68
AREA_ALTITUDE = 240.0

START = pd.Timestamp("2025-04-07T00:00:00Z")  # a Monday
DAYS = 7
MINUTES = DAYS * 24 * 60  # 10,080
LOCAL_TZ = "Europe/Rome"  # UTC+2 (CEST) for the whole week
MARKET = "IT-NORD"
# The day-ahead auction for delivery day D (a local Europe/Rome day, as in SDAC)
# is taken as published at 12:00 UTC on D-1.
PUBLISH_HOUR_UTC = 12

# Battery controller (same for every site).
SOC_MIN_PCT = 10.0
SOC_MAX_PCT = 95.0
SOC_START_PCT = 50.0
ROUND_TRIP_EFFICIENCY = 0.90
ETA_CHARGE = math.sqrt(ROUND_TRIP_EFFICIENCY)
ETA_DISCHARGE = math.sqrt(ROUND_TRIP_EFFICIENCY)
RESPONSE_S = 8.0  # inverter settling time after a step in the site imbalance

# Irradiance minute model.
BEAM_SUNNY_INDEX = 0.90  # beam clear-sky index while the sun is not behind a cloud
CLOUD_STEP_S = 10  # the sun/shade chain runs at 10 s and is averaged to 1 min
CLOUD_SWITCH_RATE = 1.0 / 24.0  # per 10 s step; gives cloud passages of a few minutes

# Output quantisation (like real meters): power to 1 W, irradiance 0.1 W/m2, 0.01 degC.
POWER_DECIMALS = 3


@dataclass(frozen=True)
class Array:
    """One PV array (a plane of modules) feeding the site's inverter."""

    kwp: float
    tilt: float
    azimuth: float  # degrees from north, clockwise (180 = south)


@dataclass(frozen=True)
class Site:
    name: str
    latitude: float
    longitude: float
    altitude: float
    annual_load_kwh: float
    arrays: tuple[Array, ...]
    inverter_kw: float
    mount: str  # key of pvlib's SAPM cell-temperature parameters
    battery_kwh: float
    battery_kw: float
    deadband_kw: float  # the controller ignores a smaller imbalance

    @property
    def kwp(self) -> float:
        return sum(a.kwp for a in self.arrays)


SITES: tuple[Site, ...] = (
    Site(
        name="turin-home",
        latitude=45.0703,
        longitude=7.6869,
        altitude=240.0,
        annual_load_kwh=3_500.0,
        arrays=(Array(kwp=6.0, tilt=30.0, azimuth=165.0),),
        inverter_kw=5.0,
        mount="close_mount_glass_glass",
        battery_kwh=10.0,
        battery_kw=5.0,
        deadband_kw=0.02,
    ),
    Site(
        name="turin-school",
        latitude=45.0580,
        longitude=7.6600,
        altitude=245.0,
        annual_load_kwh=60_000.0,
        arrays=(Array(kwp=40.0, tilt=10.0, azimuth=180.0),),
        inverter_kw=36.0,
        mount="open_rack_glass_polymer",
        battery_kwh=60.0,
        battery_kw=30.0,
        deadband_kw=0.1,
    ),
    Site(
        name="moncalieri-depot",
        latitude=45.0010,
        longitude=7.6850,
        altitude=235.0,
        annual_load_kwh=150_000.0,
        arrays=(
            Array(kwp=40.0, tilt=10.0, azimuth=90.0),
            Array(kwp=40.0, tilt=10.0, azimuth=270.0),
        ),
        inverter_kw=70.0,
        mount="open_rack_glass_polymer",
        battery_kwh=200.0,
        battery_kw=100.0,
        deadband_kw=0.3,
    ),
)

# PVWatts parameters.
GAMMA_PDC = -0.0037  # 1/degC, typical mono-Si PERC/TOPCon
INVERTER_ETA_NOM = 0.96
ALBEDO = 0.20
LOSSES_PCT = float(
    pvlib.pvsystem.pvwatts_losses(
        soiling=2.0,
        shading=1.0,
        snow=0.0,
        mismatch=2.0,
        wiring=2.0,
        connections=0.5,
        lid=1.5,
        nameplate_rating=1.0,
        age=0.0,
        availability=0.0,
    )
)


# --- helpers -------------------------------------------------------------------------------------


def rng_for(*keys: str) -> np.random.Generator:
    """An independent, reproducible random stream per named purpose."""
    return np.random.default_rng([SEED, *(zlib.crc32(k.encode()) for k in keys)])


def ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """Stationary AR(1) noise with unit variance."""
    eps = rng.standard_normal(n) * math.sqrt(1.0 - phi * phi)
    out = np.empty(n)
    x = rng.standard_normal()
    for i in range(n):
        x = phi * x + eps[i]
        out[i] = x
    return out


def minute_index() -> pd.DatetimeIndex:
    return pd.date_range(START, periods=MINUTES, freq="min")


def interp_to(
    times: pd.DatetimeIndex, src_times: pd.DatetimeIndex, values: np.ndarray
) -> np.ndarray:
    """Linear interpolation in time (both indexes tz-aware)."""
    x = times.asi8.astype(float)
    xp = src_times.asi8.astype(float)
    return np.interp(x, xp, values)


# --- weather -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tmy:
    station: str
    latitude: float
    longitude: float
    elevation: float
    utc_offset_h: float  # the TMY's clock (local standard time)
    source_year: int  # the real year the TMY's April comes from
    data: pd.DataFrame  # hourly, index = end of the hour, relabelled to 2025 CET (as UTC)
    source_times: pd.DatetimeIndex  # the same rows at their true instants at the station


def tmy_path() -> Path:
    """The TMY3 file inside the installed pvlib package (pvlib/data/)."""
    resource = importlib.resources.files("pvlib") / "data" / TMY_RESOURCE
    path = Path(str(resource))
    if not path.is_file():  # e.g. a zipped install; fall back to the package directory
        path = Path(pvlib.__file__).resolve().parent / "data" / TMY_RESOURCE
    return path


def read_tmy(path: Path) -> Tmy:
    """Read the TMY3 and relabel its April onto the sample week's clock.

    TMY3 rows are stamped at the end of the hour in local standard time (Greensboro:
    UTC-5), and irradiance is the mean over that hour. The calendar is kept (month, day,
    hour; year set to 2025) and the local-standard-time clock is relabelled as Central
    European standard time (UTC+1): the 12:00 LST TMY hour becomes 12:00 CET = 11:00 UTC.
    This keeps the daily shape in place: solar noon is about 12:20 LST at Greensboro
    (79.9 W, time-zone meridian 75 W) and about 12:30 LST at Turin (7.7 E, meridian 15 E).
    Day length and sun elevation do differ (36 N against 45 N), so the irradiance is carried
    over as clear-sky indexes (see sky_indexes) rather than as W/m2.
    """
    data, meta = pvlib.iotools.read_tmy3(str(path), coerce_year=START.year, map_variables=True)
    data = data[data.index.month == TMY_MONTH]
    utc_offset_h = float(meta["TZ"])
    years = data["Date (MM/DD/YYYY)"].str[-4:].astype(int)
    source_times = pd.DatetimeIndex(data.index).tz_convert("UTC")
    relabelled = pd.DatetimeIndex(data.index).tz_localize(None)
    relabelled = relabelled - pd.Timedelta(hours=TARGET_UTC_OFFSET_H)
    frame = data[["ghi", "dni", "dhi", "temp_air", "wind_speed"]].astype(float)
    frame.index = relabelled.tz_localize("UTC")
    frame[["ghi", "dni", "dhi"]] = frame[["ghi", "dni", "dhi"]].clip(lower=0.0)
    return Tmy(
        station=f"{meta['USAF']} {str(meta['Name']).strip(chr(34)).title()}, {meta['State']}",
        latitude=float(meta["latitude"]),
        longitude=float(meta["longitude"]),
        elevation=float(meta["altitude"]),
        utc_offset_h=utc_offset_h,
        source_year=int(years.mode().iloc[0]),
        data=frame,
        source_times=source_times,
    )


def clear_sky(
    times: pd.DatetimeIndex, latitude: float, longitude: float, altitude: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Solar position and Ineichen clear sky at a Turin-area place.

    The Linke turbidity comes from pvlib's climatology at the area's reference point for
    every site: the sites are only a few km apart, and a neighbouring turbidity cell would
    otherwise shift their irradiance by ~4 %.
    """
    loc = pvlib.location.Location(latitude, longitude, tz="UTC", altitude=altitude)
    solpos = loc.get_solarposition(times)
    linke = pvlib.clearsky.lookup_linke_turbidity(times, AREA_LATITUDE, AREA_LONGITUDE)
    cs = loc.get_clearsky(times, model="ineichen", solar_position=solpos, linke_turbidity=linke)
    return solpos, cs


@dataclass(frozen=True)
class SkyIndexes:
    """Hourly TMY irradiance expressed relative to clear sky, ready to interpolate."""

    times: pd.DatetimeIndex  # midpoints of the TMY hours (relabelled clock, UTC)
    beam_index: np.ndarray  # DNI / clear-sky DNI
    diffuse_index: np.ndarray  # DHI / clear-sky GHI


def sky_indexes(tmy: Tmy) -> SkyIndexes:
    """Clear-sky indexes of the TMY hours, computed at the station at its true times.

    Each hourly mean is divided by the mean Ineichen clear sky over the same hour at
    Greensboro (its own Linke turbidity), and the index is placed at the hour's midpoint on
    the relabelled clock. Multiplying by the Turin-area clear sky (site_weather) then keeps
    the TMY's cloudiness but uses Turin's sun elevation and day length; and since GHI is
    rebuilt as DNI * cos(zenith) + DHI there, the three components stay consistent. Using
    Greensboro's W/m2 directly would put its higher sun (36 N) onto Turin's geometry and give
    e.g. POA/GHI ratios far above 1.6 at low sun. The indexes are clipped to 0..1.1 (beam)
    and 0..1.5 (diffuse), and are only formed above 30 W/m2 clear DNI / 20 W/m2 clear GHI
    (hourly means); nearer sunrise/sunset, including where Turin's longer day has no
    Greensboro counterpart, the first/last daylight value of the day is held. The beam cap
    binds on the clear mornings of 10-11 April, where the TMY's DNI is up to ~30 % above
    the Ineichen clear sky (more in the sunrise/sunset hours, whose hourly means are small).
    With these clips the sites' minute POA/GHI stays below ~1.45 and nothing is negative.
    """
    data = tmy.data
    loc = pvlib.location.Location(tmy.latitude, tmy.longitude, tz="UTC", altitude=tmy.elevation)
    # Minute midpoints of each hour ending at the TMY stamp, at the station's true time.
    offsets = pd.to_timedelta((np.arange(60) - 59.5) * 60.0, unit="s")
    minutes = pd.DatetimeIndex([t + dt for t in tmy.source_times for dt in offsets])
    cs = loc.get_clearsky(minutes, model="ineichen")
    dni_cs = cs["dni"].to_numpy().reshape(-1, 60).mean(axis=1)
    ghi_cs = cs["ghi"].to_numpy().reshape(-1, 60).mean(axis=1)
    kb = np.where(dni_cs > 30.0, data["dni"].to_numpy() / np.maximum(dni_cs, 1e-9), np.nan)
    kd = np.where(ghi_cs > 20.0, data["dhi"].to_numpy() / np.maximum(ghi_cs, 1e-9), np.nan)
    times = pd.DatetimeIndex(data.index - pd.Timedelta(minutes=30))  # hour midpoints
    frame = pd.DataFrame({"kb": np.clip(kb, 0.0, 1.1), "kd": np.clip(kd, 0.0, 1.5)}, index=times)
    # Night hours have no index; within each UTC day (UTC midnight is night here) hold
    # the first/last daylight value so the interpolation around sunrise/sunset is sane.
    frame = frame.groupby(frame.index.floor("D")).transform(lambda s: s.ffill().bfill())
    frame = frame.fillna(0.0)
    return SkyIndexes(
        times=times,
        beam_index=frame["kb"].to_numpy(),
        diffuse_index=frame["kd"].to_numpy(),
    )


def cloud_fraction_sunny(beam_index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-minute fraction of time the sun is unobscured (two-state Markov chain at 10 s).

    The chain's stationary probability of "sun" is s = min(1, kb / BEAM_SUNNY_INDEX), so the
    expected beam equals the TMY's; it switches often when s is near 0.5 (broken clouds)
    and never when the hour is clear (s = 1) or overcast (s = 0).
    """
    steps_per_min = 60 // CLOUD_STEP_S
    s = np.repeat(np.clip(beam_index / BEAM_SUNNY_INDEX, 0.0, 1.0), steps_per_min)
    u = rng.random(s.size)
    state = np.empty(s.size)
    sunny = u[0] < s[0]
    for i in range(s.size):
        if sunny:
            if u[i] < (1.0 - s[i]) * CLOUD_SWITCH_RATE or s[i] <= 0.0:
                sunny = False
        elif u[i] < s[i] * CLOUD_SWITCH_RATE or s[i] >= 1.0:
            sunny = True
        state[i] = 1.0 if sunny else 0.0
    return state.reshape(-1, steps_per_min).mean(axis=1)


@dataclass(frozen=True)
class SiteWeather:
    solpos: pd.DataFrame
    dni: np.ndarray
    dhi: np.ndarray
    ghi: np.ndarray
    dni_extra: np.ndarray
    temp_air: np.ndarray
    wind_speed: np.ndarray


def site_weather(site: Site, tmy: Tmy, sky: SkyIndexes) -> SiteWeather:
    """Minute weather at a site: TMY hourly values with cloud-edge variability."""
    times = minute_index()
    mid = times + pd.Timedelta(seconds=30)  # power is the mean over [t, t+1min)
    solpos, cs = clear_sky(mid, site.latitude, site.longitude, site.altitude)
    kb = interp_to(mid, sky.times, sky.beam_index)
    kd = interp_to(mid, sky.times, sky.diffuse_index)
    rng = rng_for("weather", site.name)

    frac_sunny = cloud_fraction_sunny(kb, rng)
    s = np.clip(kb / BEAM_SUNNY_INDEX, 0.0, 1.0)
    broken = 4.0 * s * (1.0 - s)  # 0 for clear or overcast, 1 for half-covered sky
    beam_level = np.where(s >= 1.0, kb, BEAM_SUNNY_INDEX * frac_sunny)
    beam_level *= 1.0 + 0.005 * ar1(rng, MINUTES, 0.95)  # thin haze / aerosol flicker
    dni = np.clip(beam_level, 0.0, None) * cs["dni"].to_numpy()

    # Diffuse: smooth TMY level, brighter cloud edges while the sun is out in broken sky
    # (zero-mean in expectation), plus slow noise that is larger under broken clouds.
    edge = 1.0 + 0.3 * (1.0 - s) * (frac_sunny - s)
    wobble = 1.0 + (0.02 + 0.15 * broken) * ar1(rng, MINUTES, 0.9)
    dhi = np.clip(kd * cs["ghi"].to_numpy() * edge * wobble, 0.0, None)

    cos_zen = np.clip(np.cos(np.radians(solpos["apparent_zenith"].to_numpy())), 0.0, None)
    daylight = cs["ghi"].to_numpy() > 0.0
    dni = np.where(daylight, dni, 0.0)
    dhi = np.where(daylight, dhi, 0.0)
    ghi = dni * cos_zen + dhi

    hourly = tmy.data
    temp = interp_to(times, pd.DatetimeIndex(hourly.index), hourly["temp_air"].to_numpy())
    temp = temp + 0.12 * ar1(rng, MINUTES, 0.98)
    wind = interp_to(times, pd.DatetimeIndex(hourly.index), hourly["wind_speed"].to_numpy())
    wind = np.clip(wind * (1.0 + 0.25 * ar1(rng, MINUTES, 0.8)), 0.0, None)
    dni_extra = pvlib.irradiance.get_extra_radiation(mid).to_numpy()
    return SiteWeather(
        solpos=solpos,
        dni=dni,
        dhi=dhi,
        ghi=ghi,
        dni_extra=dni_extra,
        temp_air=temp,
        wind_speed=wind,
    )


# --- PV ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PvResult:
    ac_kw: np.ndarray
    poa_w_m2: np.ndarray  # capacity-weighted plane-of-array global irradiance


def pv_power(site: Site, wx: SiteWeather) -> PvResult:
    """PVWatts DC + losses + PVWatts inverter, Perez transposition, SAPM cell temperature."""
    zen = wx.solpos["apparent_zenith"]
    azi = wx.solpos["azimuth"]
    airmass = pvlib.atmosphere.get_relative_airmass(zen)
    temp_params = pvlib.temperature.TEMPERATURE_MODEL_PARAMETERS["sapm"][site.mount]
    dc_w = np.zeros(MINUTES)
    poa_weighted = np.zeros(MINUTES)
    for array in site.arrays:
        poa = pvlib.irradiance.get_total_irradiance(
            surface_tilt=array.tilt,
            surface_azimuth=array.azimuth,
            solar_zenith=zen,
            solar_azimuth=azi,
            dni=wx.dni,
            ghi=wx.ghi,
            dhi=wx.dhi,
            dni_extra=wx.dni_extra,
            airmass=airmass,
            albedo=ALBEDO,
            model="perez",
        )
        aoi = pvlib.irradiance.aoi(array.tilt, array.azimuth, zen, azi)
        iam_beam = pvlib.iam.physical(aoi).fillna(0.0).to_numpy()
        iam_diffuse = pvlib.iam.marion_diffuse("physical", array.tilt)
        poa_global = np.nan_to_num(poa["poa_global"].to_numpy())
        effective = (
            np.nan_to_num(poa["poa_direct"].to_numpy()) * iam_beam
            + np.nan_to_num(poa["poa_sky_diffuse"].to_numpy()) * float(iam_diffuse["sky"])
            + np.nan_to_num(poa["poa_ground_diffuse"].to_numpy()) * float(iam_diffuse["ground"])
        )
        t_cell = pvlib.temperature.sapm_cell(poa_global, wx.temp_air, wx.wind_speed, **temp_params)
        dc_w += np.asarray(
            pvlib.pvsystem.pvwatts_dc(effective, t_cell, array.kwp * 1000.0, GAMMA_PDC)
        )
        poa_weighted += poa_global * array.kwp / site.kwp
    dc_w *= 1.0 - LOSSES_PCT / 100.0
    ac_w = pvlib.inverter.pvwatts(
        dc_w, site.inverter_kw * 1000.0 / INVERTER_ETA_NOM, eta_inv_nom=INVERTER_ETA_NOM
    )
    ac_kw = np.clip(np.nan_to_num(np.asarray(ac_w)) / 1000.0, 0.0, None)
    return PvResult(ac_kw=ac_kw, poa_w_m2=np.clip(poa_weighted, 0.0, None))


# --- loads ---------------------------------------------------------------------------------------


def bdew_profile_kw(profile: str, annual_kwh: float) -> np.ndarray:
    """A BDEW 2025 standard load profile (demandlib) scaled to ``annual_kwh`` in 2025.

    demandlib gives 15-min mean power in local time; it is converted to UTC and
    interpolated linearly between interval mid-points to 1 minute (mean-preserving
    up to the interpolation's smoothing).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas deprecations inside demandlib
        from demandlib.bdew import G25, H25

        cls = {"H25": H25, "G25": G25}[profile]
        year = pd.date_range(
            "2025-01-01", "2026-01-01", freq="15min", tz=LOCAL_TZ, inclusive="left"
        )
        annual = float(cls(year).sum()) / 4.0  # kWh for the kW series; ~1e6
        week = pd.date_range(
            START - pd.Timedelta(days=1), periods=(DAYS + 2) * 96, freq="15min"
        ).tz_convert(LOCAL_TZ)
        values = cls(week).to_numpy(dtype=float) * annual_kwh / annual
    mids = week.tz_convert("UTC") + pd.Timedelta(minutes=7.5)
    times = minute_index() + pd.Timedelta(seconds=30)
    return interp_to(times, pd.DatetimeIndex(mids), values)


def local_hours(times: pd.DatetimeIndex) -> np.ndarray:
    local = times.tz_convert(LOCAL_TZ)
    return np.asarray(local.hour + local.minute / 60.0, dtype=float)


def local_weekday(times: pd.DatetimeIndex) -> np.ndarray:
    return np.asarray(times.tz_convert(LOCAL_TZ).day_of_week)


def add_block(load: np.ndarray, start: int, shape: np.ndarray) -> None:
    end = min(start + shape.size, load.size)
    if end > start:
        load[start:end] += shape[: end - start]


def thermostat(
    rng: np.random.Generator, minutes: int, on_kw: float, duty: float, period: int
) -> np.ndarray:
    """A heating element cycling on/off around a set point."""
    t = np.arange(minutes)
    phase = rng.integers(0, period)
    on = ((t + phase) % period) < max(1, round(duty * period))
    return np.where(on, on_kw, 0.05 * on_kw)


@dataclass(frozen=True)
class Appliance:
    name: str
    per_day: float  # expected uses per day
    window: tuple[tuple[float, float], ...]  # local hours when it is used
    weekend_factor: float


HOME_APPLIANCES: tuple[Appliance, ...] = (
    Appliance("kettle", 1.6, ((6.5, 9.5), (15.5, 17.5), (21.0, 23.0)), 1.2),
    Appliance("microwave", 1.3, ((7.0, 9.0), (12.0, 14.0), (19.0, 21.5)), 1.1),
    Appliance("hob", 1.3, ((11.5, 13.5), (18.5, 21.0)), 1.3),
    Appliance("oven", 0.35, ((11.0, 12.5), (18.0, 20.5)), 1.8),
    Appliance("washing_machine", 0.45, ((8.0, 20.0),), 2.0),
    Appliance("dishwasher", 0.7, ((13.5, 15.0), (20.5, 23.0)), 1.2),
    Appliance("hair_dryer", 0.5, ((6.5, 8.5), (19.0, 22.5)), 1.0),
    Appliance("vacuum", 0.2, ((9.0, 12.0), (15.0, 18.0)), 2.5),
)


def appliance_shape(name: str, rng: np.random.Generator) -> np.ndarray:
    """Minute power [kW] of one use of a household appliance."""
    if name == "kettle":
        return np.full(int(rng.integers(2, 5)), rng.uniform(1.9, 2.2))
    if name == "microwave":
        return np.full(int(rng.integers(1, 6)), rng.uniform(0.9, 1.2))
    if name == "hob":
        return thermostat(rng, int(rng.integers(8, 35)), rng.uniform(1.2, 2.3), 0.6, 3)
    if name == "oven":
        heat = np.full(int(rng.integers(10, 15)), 2.1)
        hold = thermostat(rng, int(rng.integers(25, 55)), 2.1, 0.45, 4)
        return np.concatenate([heat, hold])
    if name == "washing_machine":
        fill = np.full(3, 0.05)
        heat = np.full(int(rng.integers(12, 20)), rng.uniform(1.9, 2.1))
        wash = 0.15 + 0.15 * rng.random(int(rng.integers(45, 70)))
        spin = np.full(int(rng.integers(6, 10)), rng.uniform(0.4, 0.6))
        return np.concatenate([fill, heat, wash, spin])
    if name == "dishwasher":
        heat1 = np.full(int(rng.integers(15, 22)), rng.uniform(1.8, 2.0))
        wash = np.full(int(rng.integers(30, 45)), 0.12)
        heat2 = np.full(int(rng.integers(10, 16)), rng.uniform(1.8, 2.0))
        dry = np.full(int(rng.integers(15, 25)), 0.03)
        return np.concatenate([heat1, wash, heat2, dry])
    if name == "hair_dryer":
        return np.full(int(rng.integers(4, 9)), rng.uniform(1.4, 1.8))
    if name == "vacuum":
        return np.full(int(rng.integers(8, 20)), rng.uniform(0.7, 0.9))
    raise ValueError(name)


def scatter_events(
    rng: np.random.Generator,
    hours: np.ndarray,
    weekday: np.ndarray,
    per_day: float,
    window: tuple[tuple[float, float], ...],
    weekend_factor: float,
) -> np.ndarray:
    """Start minutes of a Poisson process that is active only inside ``window``."""
    active = np.zeros(hours.size, dtype=bool)
    for lo, hi in window:
        active |= (hours >= lo) & (hours < hi)
    minutes_per_day = sum(hi - lo for lo, hi in window) * 60.0
    rate = np.where(active, per_day / minutes_per_day, 0.0)
    rate = np.where(weekday >= 5, rate * weekend_factor, rate)
    return np.flatnonzero(rng.random(hours.size) < rate)


def fit_smooth(
    fixed_kw: np.ndarray, shape_kw: np.ndarray, target_kwh: float, what: str
) -> np.ndarray:
    """Add ``c * shape`` to the discrete loads so that the week's energy hits the target."""
    missing = target_kwh - fixed_kw.sum() / 60.0
    c = missing / (shape_kw.sum() / 60.0)
    if not 0.05 < c < 1.5:
        raise RuntimeError(f"{what}: smooth-load factor {c:.3f} out of range")
    return fixed_kw + c * shape_kw


def household_load(site: Site) -> np.ndarray:
    """H25 energy and daily shape; appliance switching on top of a smooth base."""
    times = minute_index()
    hours, weekday = local_hours(times), local_weekday(times)
    profile = bdew_profile_kw("H25", site.annual_load_kwh)
    rng = rng_for("load", site.name)

    fixed = np.full(MINUTES, 0.065)  # standby: router, boiler electronics, clocks
    # Fridge-freezer compressor: ~40 % duty, ~50 min cycle, start-up surge.
    t = np.arange(MINUTES)
    period = 48 + 6 * np.sin(2 * np.pi * t / 1440.0)
    phase = (np.cumsum(1.0 / period) + rng.random()) % 1.0
    compressor = np.where(phase < 0.4, 0.095, 0.0)
    surge = np.diff(compressor, prepend=0.0) > 0
    fixed += compressor + np.where(surge, 0.15, 0.0)
    for appliance in HOME_APPLIANCES:
        for start in scatter_events(
            rng, hours, weekday, appliance.per_day, appliance.window, appliance.weekend_factor
        ):
            add_block(fixed, int(start), appliance_shape(appliance.name, rng))

    # Lighting, TV, computers, small appliances: the H25 shape with slow wander.
    smooth = profile * (1.0 + 0.12 * ar1(rng, MINUTES, 0.97))
    smooth = np.clip(smooth, 0.0, None)
    load = fit_smooth(fixed, smooth, profile.sum() / 60.0, site.name)
    return np.clip(load, 0.02, None)


def school_load(site: Site) -> np.ndarray:
    """G25 energy and shape; ventilation units and a lunchtime kitchen on top."""
    times = minute_index()
    hours, weekday = local_hours(times), local_weekday(times)
    profile = bdew_profile_kw("G25", site.annual_load_kwh)
    rng = rng_for("load", site.name)
    school_day = (weekday < 5) & (hours >= 7.0) & (hours < 17.5)

    fixed = np.full(MINUTES, 1.2)  # servers, fridges, emergency lighting
    for unit in range(3):  # air-handling units: run while the school is open
        unit_rng = rng_for("ahu", site.name, str(unit))
        start_h = 6.75 + 0.25 * unit + unit_rng.uniform(0.0, 0.2)
        open_ = (weekday < 5) & (hours >= start_h) & (hours < 17.25 + 0.1 * unit)
        fan = 2.2 + 0.3 * ar1(unit_rng, MINUTES, 0.995)
        fixed += np.where(open_, fan, 0.0)
    for unit, period in enumerate((17, 23)):  # heat-pump compressors: cycle while open
        cycle = thermostat(rng_for("hp", site.name, str(unit)), MINUTES, 2.4, 0.5, period)
        fixed += np.where(school_day, cycle, 0.0)
    for day in range(DAYS):
        day_start = day * 1440
        if weekday[day_start + 720] >= 5:
            continue
        # Canteen from ~10:45 to ~14:00 local: extraction and warmers, ovens cycling.
        start = day_start + int((10.75 - 2.0) * 60) + int(rng.integers(-10, 10))
        minutes = int(rng.integers(180, 200))
        kitchen = 2.5 + thermostat(rng, minutes, 4.0, 0.5, 9)
        add_block(fixed, start, kitchen)
    smooth = profile * (1.0 + 0.04 * ar1(rng, MINUTES, 0.9))
    load = fit_smooth(fixed, np.clip(smooth, 0.0, None), profile.sum() / 60.0, site.name)
    load *= 1.0 + 0.01 * rng.standard_normal(MINUTES)
    return np.clip(load, 0.3, None)


def depot_load(site: Site) -> np.ndarray:
    """G25 energy (scaled to the depot); two-shift operations, forklifts, e-van charging."""
    times = minute_index()
    hours, weekday = local_hours(times), local_weekday(times)
    profile = bdew_profile_kw("G25", site.annual_load_kwh)
    rng = rng_for("load", site.name)

    fixed = np.full(MINUTES, 4.0)  # IT, ventilation, security lighting
    cold_room = thermostat(rng_for("cold", site.name), MINUTES, 3.0, 0.45, 30)
    fixed += cold_room
    weekday_ops = (weekday < 5) & (hours >= 6.0) & (hours < 22.0)
    saturday_ops = (weekday == 5) & (hours >= 6.0) & (hours < 14.0)
    ops = weekday_ops | saturday_ops
    shift_change = (np.abs(hours - 14.0) < 0.25) & ops
    # Conveyors, hall lighting, dock doors, compressors while operating.
    fixed += np.where(ops, 6.5 + 3.0 * rng.random(MINUTES), 0.0)
    fixed -= np.where(shift_change, 4.0, 0.0)
    for day in range(DAYS):
        day_start = day * 1440
        wd = weekday[day_start + 720]
        # Forklift chargers (2 x 4.5 kW) after each shift.
        shifts = (14.0, 22.0) if wd < 5 else ((14.0,) if wd == 5 else ())
        for end_h in shifts:
            for _ in range(2):
                start = day_start + int((end_h - 2.0) * 60) + int(rng.integers(0, 30))
                add_block(fixed, start, np.full(int(rng.integers(150, 280)), 4.5))
        # Electric vans (3 x 11 kW AC) return in the evening Monday to Friday.
        if wd < 5:
            for _ in range(3):
                arrive = day_start + int((18.0 - 2.0) * 60) + int(rng.integers(0, 150))
                need_kwh = rng.uniform(15.0, 30.0)
                add_block(fixed, arrive, np.full(int(need_kwh / 11.0 * 60.0), 11.0))
    smooth = profile * (1.0 + 0.05 * ar1(rng, MINUTES, 0.9))
    load = fit_smooth(fixed, np.clip(smooth, 0.0, None), profile.sum() / 60.0, site.name)
    load *= 1.0 + 0.01 * rng.standard_normal(MINUTES)
    return np.clip(load, 1.0, None)


LOAD_MODELS = {
    "turin-home": household_load,
    "turin-school": school_load,
    "moncalieri-depot": depot_load,
}


# --- battery -------------------------------------------------------------------------------------


def quantise_toward_zero(x: float) -> float:
    scale = 10**POWER_DECIMALS
    return math.trunc(x * scale) / scale


def soc_step(soc: float, power_kw: float, capacity_kwh: float) -> float:
    """SoC after one minute at ``power_kw`` (positive discharge), sqrt-split efficiency."""
    if power_kw >= 0.0:
        return soc - 100.0 * power_kw / ETA_DISCHARGE / 60.0 / capacity_kwh
    return soc - 100.0 * power_kw * ETA_CHARGE / 60.0 / capacity_kwh


def self_consumption(site: Site, net_kw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A plain self-consumption controller, as seen in 1-minute means.

    The inverter follows the site imbalance (load - PV) with a response time of
    ``RESPONSE_S`` seconds, so over a minute in which the imbalance stepped it delivers
    ``net[t] - (net[t] - net[t-1]) * RESPONSE_S / 60``; the setpoint never has the
    opposite sign of the imbalance (no charging from the grid, no export from the
    battery). It is limited by the power rating and by what keeps SoC within
    [SOC_MIN_PCT, SOC_MAX_PCT]. Returns (power_kw, soc_pct at the start of each minute).
    """
    power = np.zeros(MINUTES)
    soc = np.zeros(MINUTES)
    level = SOC_START_PCT
    cap = site.battery_kwh
    lag = RESPONSE_S / 60.0
    for i in range(MINUTES):
        soc[i] = level
        net = float(net_kw[i])
        previous = float(net_kw[i - 1]) if i > 0 else net
        target = net - (net - previous) * lag
        target = min(max(target, 0.0), net) if net >= 0.0 else max(min(target, 0.0), net)
        if abs(target) < site.deadband_kw:
            p = 0.0
        elif target > 0.0:
            room = (level - SOC_MIN_PCT) / 100.0 * cap * 60.0 * ETA_DISCHARGE
            p = min(target, site.battery_kw, max(room, 0.0))
        else:
            room = (SOC_MAX_PCT - level) / 100.0 * cap * 60.0 / ETA_CHARGE
            p = -min(-target, site.battery_kw, max(room, 0.0))
        p = quantise_toward_zero(p)
        power[i] = p
        level = soc_step(level, p, cap)
    return power, soc


# --- prices --------------------------------------------------------------------------------------

# Multipliers on the day's base level by local hour (EUR/MWh x factor).
WEEKDAY_SHAPE = np.array(
    [0.84, 0.80, 0.78, 0.77, 0.78, 0.85, 0.98, 1.12, 1.19, 1.12, 1.05, 1.01,
     0.99, 0.98, 1.00, 1.04, 1.10, 1.22, 1.42, 1.60, 1.55, 1.30, 1.08, 0.94]
)  # fmt: skip
WEEKEND_SHAPE = np.array(
    [0.88, 0.84, 0.81, 0.80, 0.80, 0.82, 0.88, 0.95, 1.01, 1.03, 1.01, 0.99,
     0.97, 0.96, 0.97, 1.00, 1.06, 1.18, 1.38, 1.52, 1.48, 1.25, 1.06, 0.94]
)  # fmt: skip
DAY_FACTOR = {5: 0.92, 6: 0.82}  # Saturday, Sunday (lower demand)
SOLAR_DIP_EUR_MWH = {5: 78.0, 6: 100.0}  # weekend dip depth at GHI_REF
SOLAR_DIP_WEEKDAY_EUR_MWH = 60.0
GHI_REF = 850.0
NEGATIVE_PASS_THROUGH = 0.35  # negative bids cluster just below zero


def area_ghi_hourly(sky: SkyIndexes) -> np.ndarray:
    """Hourly mean GHI at the area's reference point (noise-free minute interpolation of
    the TMY's clear-sky indexes). [W/m2]"""
    times = minute_index() + pd.Timedelta(seconds=30)
    solpos, cs = clear_sky(times, AREA_LATITUDE, AREA_LONGITUDE, AREA_ALTITUDE)
    cos_zen = np.clip(np.cos(np.radians(solpos["apparent_zenith"].to_numpy())), 0.0, None)
    kb = interp_to(times, sky.times, sky.beam_index)
    kd = interp_to(times, sky.times, sky.diffuse_index)
    ghi_min = kb * cs["dni"].to_numpy() * cos_zen + kd * cs["ghi"].to_numpy()
    return ghi_min.reshape(-1, 60).mean(axis=1)


def day_ahead_prices(sky: SkyIndexes) -> pd.DataFrame:
    """Modelled hourly day-ahead prices (EUR/kWh) for IT-NORD; see README.md."""
    hours = pd.date_range(START, periods=DAYS * 24, freq="h")
    rng = rng_for("prices")
    ghi_hour = area_ghi_hourly(sky)

    local = hours.tz_convert(LOCAL_TZ)
    local_day = local.normalize()
    days = local_day.unique()
    # Gas-like random walk drives the daily level (EUR/MWh), plus a daily residual.
    gas = 37.0 + np.cumsum(np.concatenate([[0.0], rng.normal(0.0, 1.2, days.size - 1)]))
    level_by_day = {
        day: (2.0 * g + 40.0) * (1.0 + rng.normal(0.0, 0.04))
        for day, g in zip(days, gas, strict=True)
    }
    evening_boost = {day: rng.uniform(1.0, 1.25) for day in days}
    noise = 3.0 * ar1(rng, hours.size, 0.6)

    prices = np.empty(hours.size)
    for i, (stamp, day) in enumerate(zip(local, local_day, strict=True)):
        wd = stamp.day_of_week
        shape = WEEKEND_SHAPE if wd >= 5 else WEEKDAY_SHAPE
        factor = shape[stamp.hour]
        if stamp.hour >= 18:
            factor = 1.0 + (factor - 1.0) * evening_boost[day]
        level = level_by_day[day] * DAY_FACTOR.get(wd, 1.0)
        dip = SOLAR_DIP_EUR_MWH.get(wd, SOLAR_DIP_WEEKDAY_EUR_MWH)
        p = level * factor - dip * (ghi_hour[i] / GHI_REF) ** 1.3 + noise[i]
        if p < 0.0:
            p *= NEGATIVE_PASS_THROUGH
        prices[i] = p / 1000.0

    published = (local_day - pd.Timedelta(days=1)).tz_localize(None).tz_localize("UTC")
    published = published + pd.Timedelta(hours=PUBLISH_HOUR_UTC)
    return pd.DataFrame(
        {
            "time": hours,
            "market": MARKET,
            "price_per_kwh": np.round(prices, 5) + 0.0,  # + 0.0 turns -0.0 into 0.0
            "published_at": published,
            "ghi_hour": ghi_hour,
        }
    )


def write_prices(prices: pd.DataFrame, path: Path) -> None:
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    lines = ["time,market,price_per_kwh,published_at"]
    for row in prices.itertuples(index=False):
        price = f"{row.price_per_kwh:.5f}"
        if price == "-0.00000":
            price = "0.00000"
        lines.append(
            f"{row.time.strftime(fmt)},{row.market},{price},{row.published_at.strftime(fmt)}"
        )
    path.write_text("\n".join(lines) + "\n", encoding="ascii", newline="\n")


# --- grid generation mix --------------------------------------------------------------------------

CARBON_ZONE = "IT-NO"  # the intensity zone of Northern Italy (not the price market)
DEMAND_BASE_MW = 16_000.0  # the zone's mean load is of this order in spring
SOLAR_CAPACITY_MW = 11_000.0  # PV in Northern Italy, order of magnitude (2024)
HYDRO_BASE_MW = 3_600.0  # April: snowmelt run-of-river
HYDRO_PEAK_MW = 2_400.0  # reservoir hydro, dispatched into the evening peak
IMPORT_NUCLEAR_MW = 3_000.0  # imports over the Alps, mostly French and Swiss nuclear
BIOMASS_MW = 1_100.0
OTHER_MW = 400.0
GAS_MIN_MW = 2_500.0  # must-run CCGTs and CHP


def generation_mix(sky: SkyIndexes) -> pd.DataFrame:
    """Modelled hourly generation mix of the zone (MW by fuel); see README.md."""
    hours = pd.date_range(START, periods=DAYS * 24, freq="h")
    rng = rng_for("carbon")
    ghi_hour = area_ghi_hourly(sky)
    local = hours.tz_convert(LOCAL_TZ)
    wind = 350.0 * np.exp(0.5 * ar1(rng, hours.size, 0.9))
    rows = []
    for i, stamp in enumerate(local):
        wd = stamp.day_of_week
        shape = WEEKEND_SHAPE if wd >= 5 else WEEKDAY_SHAPE
        demand = DEMAND_BASE_MW * DAY_FACTOR.get(wd, 1.0) * (0.55 + 0.45 * shape[stamp.hour])
        solar = SOLAR_CAPACITY_MW * 0.8 * ghi_hour[i] / 1000.0
        hydro = HYDRO_BASE_MW + HYDRO_PEAK_MW * max(0.0, shape[stamp.hour] - 1.0) / 0.6
        clean = solar + hydro + wind[i] + IMPORT_NUCLEAR_MW + BIOMASS_MW + OTHER_MW
        gas = max(GAS_MIN_MW, demand - clean)
        rows.append(
            {
                "time": hours[i],
                "zone": CARBON_ZONE,
                "solar": solar,
                "wind": wind[i],
                "hydro": hydro,
                "nuclear": IMPORT_NUCLEAR_MW,
                "biomass": BIOMASS_MW,
                "gas": gas,
                "other": OTHER_MW,
            }
        )
    return pd.DataFrame(rows)


def write_mix(mix: pd.DataFrame, path: Path) -> None:
    fuels = ["solar", "wind", "hydro", "nuclear", "biomass", "gas", "other"]
    lines = ["time,zone," + ",".join(fuels)]
    for row in mix.itertuples(index=False):
        values = ",".join(f"{getattr(row, fuel):.0f}" for fuel in fuels)
        lines.append(f"{row.time.strftime('%Y-%m-%dT%H:%M:%SZ')},{row.zone},{values}")
    path.write_text("\n".join(lines) + "\n", encoding="ascii", newline="\n")


# --- assembly ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSeries:
    site: Site
    load_kw: np.ndarray
    pv_kw: np.ndarray
    poa_w_m2: np.ndarray
    temp_air_c: np.ndarray
    battery_kw: np.ndarray
    soc_pct: np.ndarray
    meter_kw: np.ndarray


def simulate_site(site: Site, tmy: Tmy, sky: SkyIndexes) -> SiteSeries:
    wx = site_weather(site, tmy, sky)
    pv = pv_power(site, wx)
    pv_kw = np.round(pv.ac_kw, POWER_DECIMALS)
    load_kw = np.round(LOAD_MODELS[site.name](site), POWER_DECIMALS)
    battery_kw, soc = self_consumption(site, load_kw - pv_kw)
    meter_kw = np.round(load_kw - pv_kw - battery_kw, POWER_DECIMALS)
    return SiteSeries(
        site=site,
        load_kw=load_kw,
        pv_kw=pv_kw,
        poa_w_m2=np.round(pv.poa_w_m2, 1),
        temp_air_c=np.round(wx.temp_air, 2),
        battery_kw=battery_kw,
        soc_pct=soc,
        meter_kw=meter_kw,
    )


def telemetry_frame(series: list[SiteSeries]) -> pl.DataFrame:
    times = minute_index().tz_localize(None).to_numpy().astype("datetime64[us]")
    none = np.full(MINUTES, np.nan)
    parts = []
    for s in series:
        for device, kind, power, soc, irr, temp in (
            ("battery-1", "battery", s.battery_kw, s.soc_pct, none, none),
            ("pv-1", "solar", s.pv_kw, none, s.poa_w_m2, s.temp_air_c),
            ("meter-1", "meter", s.meter_kw, none, none, none),
        ):
            parts.append(
                pl.DataFrame(
                    {
                        "time": times,
                        "site": [s.site.name] * MINUTES,
                        "device": [device] * MINUTES,
                        "kind": [kind] * MINUTES,
                        "power_kw": power,
                        "soc_pct": soc,
                        "irradiance_w_m2": irr,
                        "temp_air_c": temp,
                    }
                )
            )
    frame = pl.concat(parts).with_columns(
        pl.col("time").dt.replace_time_zone("UTC"),
        pl.col(["soc_pct", "irradiance_w_m2", "temp_air_c"]).fill_nan(None),
    )
    return frame.sort(["time", "site", "device"])


# --- verification --------------------------------------------------------------------------------


def verify(frame: pl.DataFrame, series: list[SiteSeries], prices: pd.DataFrame) -> None:
    """Check the invariants the dataset promises and print summary statistics."""
    assert frame.height == MINUTES * 3 * len(SITES), frame.height
    assert frame.schema["time"] == pl.Datetime("us", "UTC")
    assert frame["time"].n_unique() == MINUTES
    for kind, required, absent in (
        ("battery", ["power_kw", "soc_pct"], ["irradiance_w_m2", "temp_air_c"]),
        ("solar", ["power_kw", "irradiance_w_m2", "temp_air_c"], ["soc_pct"]),
        ("meter", ["power_kw"], ["soc_pct", "irradiance_w_m2", "temp_air_c"]),
    ):
        rows = frame.filter(pl.col("kind") == kind)
        assert rows.height == MINUTES * len(SITES)
        for col in required:
            assert rows[col].null_count() == 0, (kind, col)
            assert rows[col].is_finite().all(), (kind, col)
        for col in absent:
            assert rows[col].null_count() == rows.height, (kind, col)
    solar = frame.filter(pl.col("kind") == "solar")
    assert (solar["power_kw"] >= 0.0).all() and (solar["irradiance_w_m2"] >= 0.0).all()

    print(f"rows: {frame.height:,} (= {MINUTES:,} x {frame.height // MINUTES})")
    day_labels = [str(d.date()) for d in pd.date_range(START, periods=DAYS, freq="D")]
    print("\nper site (daily kWh, UTC days " + ", ".join(d[5:] for d in day_labels) + ")")
    for s in series:
        site = s.site
        balance = np.abs(s.meter_kw - (s.load_kw - s.pv_kw - s.battery_kw)).max()
        assert balance < 1e-9, (site.name, balance)
        assert s.load_kw.min() >= 0.0
        soc_next = np.array(
            [soc_step(s.soc_pct[i], s.battery_kw[i], site.battery_kwh) for i in range(MINUTES)]
        )
        soc_error = np.abs(soc_next[:-1] - s.soc_pct[1:]).max()
        assert soc_error < 1e-9, soc_error
        assert soc_next.min() >= SOC_MIN_PCT - 1e-9, soc_next.min()
        assert soc_next.max() <= SOC_MAX_PCT + 1e-9, soc_next.max()
        daily = {
            "pv": s.pv_kw.reshape(DAYS, -1).sum(axis=1) / 60.0,
            "load": s.load_kw.reshape(DAYS, -1).sum(axis=1) / 60.0,
            "import": np.clip(s.meter_kw, 0, None).reshape(DAYS, -1).sum(axis=1) / 60.0,
            "export": np.clip(-s.meter_kw, 0, None).reshape(DAYS, -1).sum(axis=1) / 60.0,
        }
        discharged = np.clip(s.battery_kw, 0, None).sum() / 60.0
        charged = np.clip(-s.battery_kw, 0, None).sum() / 60.0
        self_sufficiency = 1.0 - daily["import"].sum() / daily["load"].sum()
        print(
            f"  {site.name}: {site.kwp:g} kWp, {site.battery_kwh:g} kWh / {site.battery_kw:g} kW,"
            f" load {site.annual_load_kwh:,.0f} kWh/yr"
        )
        for key, values in daily.items():
            print(
                f"    {key:>6}: "
                + " ".join(f"{v:7.1f}" for v in values)
                + f"  | {values.sum():.1f}"
            )
        print(
            f"    battery: charged {charged:.1f} kWh, discharged {discharged:.1f} kWh,"
            f" {discharged / site.battery_kwh:.2f} equivalent full cycles;"
            f" SoC {s.soc_pct.min():.2f}..{s.soc_pct.max():.2f} % (end {soc_next[-1]:.2f} %)"
        )
        print(
            f"    peaks: load {s.load_kw.max():.2f} kW, pv {s.pv_kw.max():.2f} kW,"
            f" import {s.meter_kw.max():.2f} kW, export {-s.meter_kw.min():.2f} kW;"
            f" self-sufficiency {100 * self_sufficiency:.1f} %;"
            f" max |meter - (load - pv - battery)| = {balance:.1e}; max SoC error = {soc_error:.1e}"
        )
        print(
            f"    POA max {s.poa_w_m2.max():.0f} W/m2, air {s.temp_air_c.min():.1f}"
            f"..{s.temp_air_c.max():.1f} degC"
        )

    p = prices["price_per_kwh"].to_numpy()
    assert len(prices) == DAYS * 24
    negative = prices[prices["price_per_kwh"] < 0]
    local = pd.DatetimeIndex(prices["time"]).tz_convert(LOCAL_TZ)
    print(
        f"\nprices ({MARKET}, modelled): min {p.min():.5f}, max {p.max():.5f},"
        f" mean {p.mean():.5f} EUR/kWh; negative hours: {len(negative)}"
    )
    for t, v in zip(negative["time"], negative["price_per_kwh"], strict=True):
        when = t.tz_convert(LOCAL_TZ).strftime("%a %H:%M")
        print(f"    negative: {t.isoformat()} ({when} local) {v:.5f}")
    by_day = pd.Series(p, index=local).groupby(local.normalize())
    for day, values in by_day:
        peak = values.idxmax().hour
        trough = values.idxmin().hour
        print(
            f"    {day.strftime('%a %m-%d')} local: mean {values.mean():.4f},"
            f" max {values.max():.4f} at {peak:02d}h, min {values.min():.4f} at {trough:02d}h"
        )
        if len(values) >= 20:  # every local day except the 2 h of Monday 14 April
            assert 19 <= peak <= 21, (day, peak)
    sunniest_weekend = max(
        (d for d in local.normalize().unique() if d.day_of_week >= 5),
        key=lambda d: prices["ghi_hour"][local.normalize() == d].sum(),
    )
    # Negative hours need a sunny weekend. The TMY's 12-13 April is overcast, so this week
    # has none; the invariant that remains is that any negatives fall on that day only.
    assert all(t.tz_convert(LOCAL_TZ).normalize() == sunniest_weekend for t in negative["time"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write (default: here)")
    args = parser.parse_args()
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    tmy = read_tmy(tmy_path())
    sky = sky_indexes(tmy)
    series = [simulate_site(site, tmy, sky) for site in SITES]
    frame = telemetry_frame(series)
    prices = day_ahead_prices(sky)
    mix = generation_mix(sky)

    telemetry_path = out / "telemetry.parquet"
    prices_path = out / "prices.csv"
    carbon_path = out / "carbon.csv"
    frame.write_parquet(telemetry_path, compression="zstd", compression_level=10, statistics=True)
    write_prices(prices, prices_path)
    write_mix(mix, carbon_path)

    verify(pl.read_parquet(telemetry_path), series, prices)
    print(
        f"\nTMY3: pvlib/data/{TMY_RESOURCE} ({tmy.station}, April = {tmy.source_year},"
        f" UTC{tmy.utc_offset_h:+g} relabelled as UTC{TARGET_UTC_OFFSET_H:+d}),"
        f" losses {LOSSES_PCT:.2f} %"
    )
    for path in (telemetry_path, prices_path, carbon_path):
        print(f"wrote {path} ({path.stat().st_size:,} bytes, sha256 {sha256(path)})")


if __name__ == "__main__":
    main()
