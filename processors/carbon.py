"""Hourly Scope 2 of a site: energy by source, location- and market-based CO2, 24/7 share.

Method (GHG Protocol Scope 2 Guidance, 2015). Scope 2 is the emissions of
generating the electricity a company *purchases and consumes*. The Guidance
asks for two figures ("dual reporting"):

* **location-based**: consumption times the average emission factor of the
  grid it is drawn from, here the zone's hourly average intensity
  (``CarbonIntensity.co2_g_per_kwh``);
* **market-based**: consumption times the factor of the contractual
  instruments the company holds for it. Energy covered by retired energy
  attribute certificates (guarantees of origin, RECs) of renewable origin
  counts at 0 g; the rest at the **residual mix**, the grid's mix once all
  certificates sold to others are taken out (AIB's European Residual Mixes in
  Europe, Green-e in the US). Without a residual mix the Guidance's hierarchy
  ends at the grid average (Table 6.3), which is our default
  (``residual_mix_co2_g_per_kwh = None``), flagged in the docs as understating
  emissions where certificates are traded.

On-site solar consumed on site is not purchased: it is 0 g in both methods
(PV has no Scope 1 emissions either). Certificates match purchased energy only,
and only in their own hour (hourly matching): the caller passes the kWh claimed
for each hour (``add_certified``), e.g. from the ledger in
``processors/certificates.py``; kWh claimed above the hour's grid import cover
nothing (they are not carried to another hour).

Energy per hour. Readings are powers at irregular instants. **Step-hold**: a
reading's power holds from its ``ts`` until the device's next reading, because
the recorded data gives the *mean power over* ``[ts, ts + step)`` (see
data/sample/README.md); trapezoids would shift every step's energy by half a
step. A hold lasts at most ``max_hold_s``: beyond it the device is in a gap and
contributes nothing (no invented energy). Segments are cut at hour boundaries.
A device's reading at or before its previous one is a duplicate or a replay
overlap (Kafka keeps a site's order within its partition) and is ignored and
counted.

Per hour, gross flows are integrated per sign: grid import and export (meter),
solar generation, battery charge and discharge. Then, as the hour's flows are
sums, they are assigned to each other in this order, which never lets the
grid export and keeps the balance feasible:

1. export comes from solar, then from the battery (the grid cannot export);
2. battery charging comes from the remaining solar, then from the grid;
3. the load takes what is left: ``solar_to_load``, ``battery_to_load``,
   ``grid_to_load`` (these are the record's solar/battery/grid energies).

The load is ``import - export + solar + discharge - charge`` (data/sample:
``load = meter + solar + battery``); exports are not consumption.

Battery carbon pool. Energy keeps the intensity of what charged it: grid
charging adds the hour's grid g/kWh (location) and its market g/kWh
(certificates, residual mix), solar charging adds 0 g. The pool stores
*deliverable* kWh (charge x ``battery_round_trip_efficiency``) with all the
charging emissions, so losses are paid by the energy that comes out and no
emission is stranded in the pool. Discharged energy leaves with the pool's
weighted-average intensity. **Emissions are counted when energy is consumed**
(grid_to_load at once, battery_to_load when discharged), never when charged:
each gram enters the site's account exactly once, and battery energy exported
takes its grams back out with it (it is consumed by someone else, whose
Scope 2 counts it). Within one hour, charging enters the pool before
discharging leaves it. Discharge beyond the pool (energy stored before the
engine started, or an efficiency set too high) carries the hour's grid
intensity and residual factor: conservative, never 0 g by default.

Clean share (24/7, hourly matching). Per hour::

    clean_share = (solar_to_load + battery_to_load x pool clean fraction
                   + grid_to_load x renewable_share) / load

with the pool's clean kWh fed by solar charging and by grid charging times its
hour's renewable share. A zone without ``renewable_share_pct`` counts 0 % (no
claim without data). Certificates are *not* added: the grid's renewable share
already includes the energy whose certificates others bought, so adding them
would count it twice. An hour without consumption reports 0 % and weighs 0 in
:func:`daily_clean_share_pct`, the energy-weighted score per (local) day.

Emission. One :class:`EmissionsRecord` per site per hour, in hour order (the
pool makes hour h+1 depend on h), when the hour is complete (every device has
a reading at or after its end, or is past its hold), ``certificates_wait_s``
have passed after it in event time, and the zone's intensity covers the whole
hour (sub-hourly intervals are averaged over time). Readings and intensities
may come in either order. An intensity that never comes would stop the site:
after ``intensity_wait_s`` the hour uses the last intensity used (persistence,
the usual gap fill of intensity series), counted in ``estimated_hours``. Hours
without any reading are skipped.

Everything here is plain Python (no Faust import); the state is JSON.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline import topics
from pipeline.schemas import (
    BatteryReading,
    CarbonIntensity,
    CertificateEvent,
    EmissionsRecord,
    Identifier,
    MeterReading,
    Reading,
    SolarReading,
    TelemetryBatch,
    stable_id,
)
from pipeline.settings import (
    Settings,
    SettingsError,
    SiteConfig,
    repeated,
    time_zone,
    validate_section,
)
from processors.certificates import (
    CertificateLedger,
    CertificateSettings,
    certificate_settings,
    claimed_kwh,
    settle_hour,
)

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
# Flows below this are float noise of kW-scale sites, not energy. [kWh]
EPSILON_KWH = 1e-9

Role = Literal["meter", "solar", "battery"]


# --- settings -------------------------------------------------------------------------


class CarbonSettings(BaseModel):
    """``[sites.carbon]``: how a site's Scope 2 is accounted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    zone: Identifier
    """Carbon zone of the site's grid (the ``CarbonIntensity.zone`` key). Not the price
    ``market``: a bidding zone (IT-NORD) and an intensity zone (IT-NO, IT) differ."""
    residual_mix_co2_g_per_kwh: Annotated[float, Field(ge=0.0)] | None = None
    """Market-based factor of energy not covered by certificates: the residual mix of the
    site's country, e.g. from AIB's yearly European Residual Mixes (Europe) or Green-e's
    residual mix rates (US). None: the hour's grid average, the last step of the GHG
    Protocol's market-based hierarchy (Scope 2 Guidance, Table 6.3). [gCO2/kWh]"""
    meter_devices: list[Identifier] | None = None
    """Devices measuring the grid connection point; None: every ``meter`` reading."""
    solar_devices: list[Identifier] | None = None
    """None: every ``solar`` reading."""
    battery_devices: list[Identifier] | None = None
    """None: every ``battery`` reading."""
    battery_round_trip_efficiency: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    """AC to AC; 0.9 is the sample's batteries and typical of Li-ion systems."""
    max_hold_s: Annotated[float, Field(gt=0.0)] = 300.0
    """A reading's power holds this long at most: five 1-minute polls missed is a gap. [s]"""
    certificates_wait_s: Annotated[float, Field(ge=0.0)] = 0.0
    """Event time to wait after an hour before emitting it, for its certificate claims. [s]"""
    intensity_wait_s: Annotated[float, Field(gt=0.0)] = 86_400.0
    """After this, a missing intensity is filled with the last one used; a day covers
    late publication of actuals. [s]"""

    @model_validator(mode="after")
    def _distinct_roles(self) -> Self:
        lists = [self.meter_devices or [], self.solar_devices or [], self.battery_devices or []]
        seen = [d for devices in lists for d in devices]
        duplicates = repeated(seen)
        if duplicates:
            raise ValueError(f"devices listed under more than one role: {duplicates}")
        return self


def carbon_settings(site: SiteConfig) -> CarbonSettings | None:
    """Validate a site's ``carbon`` section (None without one); raises SettingsError."""
    if site.carbon is None:
        return None
    return validate_section(CarbonSettings, f"sites[{site.id}].carbon", site.carbon)


# --- hourly flows and their split ---------------------------------------------------------


@dataclass
class HourFlows:
    """Gross energies of one hour at the site. [kWh]"""

    import_kwh: float = 0.0
    export_kwh: float = 0.0
    solar_kwh: float = 0.0
    charge_kwh: float = 0.0
    discharge_kwh: float = 0.0
    solar_by_device_kwh: dict[str, float] = field(default_factory=dict)
    """``solar_kwh`` by generation device (certificates name their device)."""

    def to_json(self) -> list[Any]:
        return [
            self.import_kwh,
            self.export_kwh,
            self.solar_kwh,
            self.charge_kwh,
            self.discharge_kwh,
            self.solar_by_device_kwh,
        ]

    @classmethod
    def from_json(cls, data: list[Any]) -> HourFlows:
        import_kwh, export_kwh, solar_kwh, charge_kwh, discharge_kwh, by_device = data
        return cls(import_kwh, export_kwh, solar_kwh, charge_kwh, discharge_kwh, dict(by_device))


@dataclass(frozen=True)
class HourSplit:
    """Who fed what in one hour. [kWh]"""

    solar_to_load_kwh: float
    battery_to_load_kwh: float
    grid_to_load_kwh: float
    solar_to_battery_kwh: float
    grid_to_battery_kwh: float
    solar_export_kwh: float
    battery_export_kwh: float
    unexplained_kwh: float
    """Export or charging no source can explain (measurement gaps); > 0 flags bad data."""

    @property
    def load_kwh(self) -> float:
        return self.solar_to_load_kwh + self.battery_to_load_kwh + self.grid_to_load_kwh


def split_hour(flows: HourFlows) -> HourSplit:
    """Assign an hour's gross flows to each other (export, then charging, then load)."""
    solar_export = min(flows.export_kwh, flows.solar_kwh)
    battery_export = min(flows.export_kwh - solar_export, flows.discharge_kwh)
    solar_left = flows.solar_kwh - solar_export
    solar_to_battery = min(flows.charge_kwh, solar_left)
    grid_to_battery = min(flows.charge_kwh - solar_to_battery, flows.import_kwh)
    unexplained = (flows.export_kwh - solar_export - battery_export) + (
        flows.charge_kwh - solar_to_battery - grid_to_battery
    )
    return HourSplit(
        solar_to_load_kwh=solar_left - solar_to_battery,
        battery_to_load_kwh=flows.discharge_kwh - battery_export,
        grid_to_load_kwh=flows.import_kwh - grid_to_battery,
        solar_to_battery_kwh=solar_to_battery,
        grid_to_battery_kwh=grid_to_battery,
        solar_export_kwh=solar_export,
        battery_export_kwh=battery_export,
        unexplained_kwh=unexplained,
    )


# --- battery pool ---------------------------------------------------------------------------


@dataclass
class CarbonPool:
    """The energy in the battery and what it carries."""

    energy_kwh: float = 0.0
    """Deliverable energy (after round-trip losses). [kWh]"""
    location_g_co2: float = 0.0
    market_g_co2: float = 0.0
    clean_kwh: float = 0.0

    def charge(
        self,
        energy_kwh: float,
        efficiency: float,
        location_g_per_kwh: float,
        market_g_per_kwh: float,
        clean_fraction: float,
    ) -> None:
        """Add ``energy_kwh`` taken in at the AC side with the given intensities."""
        self.energy_kwh += energy_kwh * efficiency
        self.location_g_co2 += energy_kwh * location_g_per_kwh
        self.market_g_co2 += energy_kwh * market_g_per_kwh
        self.clean_kwh += energy_kwh * efficiency * clean_fraction

    def discharge(self, energy_kwh: float) -> tuple[float, float, float, float]:
        """Take ``energy_kwh`` out: (kWh from the pool, location g, market g, clean kWh).

        The kWh beyond the pool are the caller's to attribute.
        """
        if energy_kwh <= EPSILON_KWH or self.energy_kwh <= EPSILON_KWH:
            return 0.0, 0.0, 0.0, 0.0
        fraction = min(1.0, energy_kwh / self.energy_kwh)
        taken = (
            fraction * self.energy_kwh,
            fraction * self.location_g_co2,
            fraction * self.market_g_co2,
            fraction * self.clean_kwh,
        )
        self.energy_kwh -= taken[0]
        self.location_g_co2 -= taken[1]
        self.market_g_co2 -= taken[2]
        self.clean_kwh -= taken[3]
        return taken

    def to_json(self) -> list[float]:
        return [self.energy_kwh, self.location_g_co2, self.market_g_co2, self.clean_kwh]

    @classmethod
    def from_json(cls, data: list[float]) -> CarbonPool:
        return cls(*data)


Certify = Callable[[datetime, HourFlows, HourSplit], float]
"""(hour start, the hour's flows, their split) -> certified grid kWh of the hour."""


@dataclass(frozen=True)
class HourIntensity:
    co2_g_per_kwh: float
    renewable_share_pct: float | None


def account_hour(
    site: str,
    hour_start: datetime,
    flows: HourFlows,
    intensity: HourIntensity,
    certified_kwh: float,
    pool: CarbonPool,
    cfg: CarbonSettings,
) -> EmissionsRecord:
    """The record of one hour; updates ``pool``. Pure apart from the pool."""
    split = split_hour(flows)
    grid_g_per_kwh = intensity.co2_g_per_kwh
    residual_g_per_kwh = (
        grid_g_per_kwh if cfg.residual_mix_co2_g_per_kwh is None else cfg.residual_mix_co2_g_per_kwh
    )
    grid_clean_fraction = (intensity.renewable_share_pct or 0.0) / 100.0
    # Certificates cover purchased energy of this hour, to load and to battery alike.
    grid_kwh = split.grid_to_load_kwh + split.grid_to_battery_kwh
    covered_fraction = min(1.0, certified_kwh / grid_kwh) if grid_kwh > EPSILON_KWH else 0.0
    grid_market_g_per_kwh = (1.0 - covered_fraction) * residual_g_per_kwh

    efficiency = cfg.battery_round_trip_efficiency
    pool.charge(split.solar_to_battery_kwh, efficiency, 0.0, 0.0, 1.0)
    pool.charge(
        split.grid_to_battery_kwh,
        efficiency,
        grid_g_per_kwh,
        grid_market_g_per_kwh,
        grid_clean_fraction,
    )
    discharge_kwh = split.battery_to_load_kwh + split.battery_export_kwh
    from_pool_kwh, location_g, market_g, clean_kwh = pool.discharge(discharge_kwh)
    # Energy the pool cannot explain is treated as grid energy of this hour (conservative).
    unknown_kwh = discharge_kwh - from_pool_kwh
    location_g += unknown_kwh * grid_g_per_kwh
    market_g += unknown_kwh * residual_g_per_kwh
    clean_kwh += unknown_kwh * grid_clean_fraction
    # Only the share of discharge consumed on site stays in the site's account.
    to_load = split.battery_to_load_kwh / discharge_kwh if discharge_kwh > EPSILON_KWH else 0.0

    location_kg = (split.grid_to_load_kwh * grid_g_per_kwh + to_load * location_g) / 1000.0
    market_kg = (split.grid_to_load_kwh * grid_market_g_per_kwh + to_load * market_g) / 1000.0
    load_kwh = split.load_kwh
    clean_pct = (
        100.0
        * (
            split.solar_to_load_kwh
            + to_load * clean_kwh
            + split.grid_to_load_kwh * grid_clean_fraction
        )
        / load_kwh
        if load_kwh > EPSILON_KWH
        else 0.0
    )
    return EmissionsRecord(
        record_id=stable_id("emissions", site, hour_start.isoformat()),
        site=site,
        start=hour_start,
        end=hour_start + HOUR,
        grid_energy_kwh=max(0.0, split.grid_to_load_kwh),
        solar_energy_kwh=max(0.0, split.solar_to_load_kwh),
        battery_energy_kwh=max(0.0, split.battery_to_load_kwh),
        grid_co2_g_per_kwh=grid_g_per_kwh,
        location_based_kg_co2=max(0.0, location_kg),
        market_based_kg_co2=max(0.0, market_kg),
        clean_share_pct=min(100.0, max(0.0, clean_pct)),
    )


def daily_clean_share_pct(
    records: Iterable[EmissionsRecord], timezone: str = "UTC"
) -> dict[date, float]:
    """24/7 score per local day: the hours' clean shares weighted by their consumption. [%]

    Days with no consumption are left out (a share of nothing is undefined).
    """
    tz = time_zone(timezone)
    clean_kwh: dict[date, float] = {}
    load_kwh: dict[date, float] = {}
    for record in records:
        day = record.start.astimezone(tz).date()
        load = record.grid_energy_kwh + record.solar_energy_kwh + record.battery_energy_kwh
        load_kwh[day] = load_kwh.get(day, 0.0) + load
        clean_kwh[day] = clean_kwh.get(day, 0.0) + load * record.clean_share_pct / 100.0
    return {
        day: 100.0 * clean_kwh[day] / load for day, load in sorted(load_kwh.items()) if load > 0
    }


# --- the per-site engine -----------------------------------------------------------------------


def _hour_floor(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat()


def _utc(iso: str) -> datetime:
    return datetime.fromisoformat(iso).astimezone(UTC)


_US_PER_S = 1_000_000
_US_PER_HOUR = 3600 * _US_PER_S
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ROLE_OF_KIND: dict[str, Role] = {"meter": "meter", "solar": "solar", "battery": "battery"}


_ONE_US = timedelta(microseconds=1)
_Powered = MeterReading | SolarReading | BatteryReading
"""The kinds the engine integrates (:data:`_ROLE_OF_KIND`)."""


def _us(ts: datetime) -> int:
    """Microseconds since the epoch, exactly (a float of seconds would round them)."""
    return (ts - _EPOCH) // _ONE_US


def _reading_time(entry: tuple[_Powered, Role]) -> datetime:
    return entry[0].ts


def _device_set(devices: list[str] | None) -> frozenset[str] | None:
    return None if devices is None else frozenset(devices)


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


@functools.lru_cache(maxsize=4096)
def _hour_key(hour_us: int) -> str:
    """The state's key of an hour: its start as ISO 8601 UTC."""
    return _from_us(hour_us).isoformat()


@dataclass
class _Device:
    role: Role
    ts: datetime
    """The last reading's time (UTC)."""
    power_kw: float
    open: bool = True
    """The last reading's hold has not been integrated yet."""


@dataclass
class CarbonState:
    """What the carbon agent of one site remembers (a Faust table value)."""

    devices: dict[str, _Device] = field(default_factory=dict)
    clock: str | None = None
    """Latest reading time seen (event time)."""
    hours: dict[str, HourFlows] = field(default_factory=dict)
    """Hour start (ISO) -> flows, for hours not emitted yet."""
    intensities: dict[str, tuple[str, float, float | None]] = field(default_factory=dict)
    """Interval start (ISO) -> (end, gCO2/kWh, renewable %), for hours not emitted yet."""
    certified_kwh: dict[str, float] = field(default_factory=dict)
    pool: CarbonPool = field(default_factory=CarbonPool)
    emitted_until: str | None = None
    """End of the last emitted hour: later data for earlier hours is late."""
    last_intensity: tuple[float, float | None] | None = None
    intensities_until: str | None = None
    """End of the zone's latest intensity (ISO): its feed comes in time order, so an
    hour before it that is not covered has a gap that will not be filled."""
    ignored_readings: int = 0
    estimated_hours: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": {
                d: [v.role, v.ts.isoformat(), v.power_kw, v.open]
                for d, v in sorted(self.devices.items())
            },
            "clock": self.clock,
            "hours": {h: f.to_json() for h, f in self.hours.items()},
            "intensities": {s: list(v) for s, v in self.intensities.items()},
            "certified": self.certified_kwh,
            "pool": self.pool.to_json(),
            "emitted_until": self.emitted_until,
            "last_intensity": None if self.last_intensity is None else list(self.last_intensity),
            "intensities_until": self.intensities_until,
            "ignored": self.ignored_readings,
            "estimated": self.estimated_hours,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> CarbonState:
        if not data:
            return cls()
        last = data["last_intensity"]
        return cls(
            devices={
                d: _Device(v[0], datetime.fromisoformat(v[1]), v[2], v[3])
                for d, v in data["devices"].items()
            },
            clock=data["clock"],
            hours={h: HourFlows.from_json(f) for h, f in data["hours"].items()},
            intensities={s: (v[0], v[1], v[2]) for s, v in data["intensities"].items()},
            certified_kwh=dict(data["certified"]),
            pool=CarbonPool.from_json(data["pool"]),
            emitted_until=data["emitted_until"],
            last_intensity=None if last is None else (last[0], last[1]),
            intensities_until=data.get("intensities_until"),
            ignored_readings=data["ignored"],
            estimated_hours=data["estimated"],
        )


class CarbonEngine:
    """Scope 2 of one site: feed readings, intensities and certificates; get hourly records."""

    def __init__(
        self,
        site: str,
        cfg: CarbonSettings,
        state: CarbonState | None = None,
        certify: Certify | None = None,
    ) -> None:
        self.site = site
        self.cfg = cfg
        self.state = state if state is not None else CarbonState()
        self._configured: dict[Role, frozenset[str] | None] = {
            "meter": _device_set(cfg.meter_devices),
            "solar": _device_set(cfg.solar_devices),
            "battery": _device_set(cfg.battery_devices),
        }
        self._hold_us = round(cfg.max_hold_s * _US_PER_S)
        self.certify = certify
        """Called once per hour before it is accounted: the kWh of the hour's grid energy
        that the site's certificates cover (see :func:`processors.certificates.settle_hour`)."""

    # inputs

    def _role(self, reading: Reading) -> Role | None:
        role = _ROLE_OF_KIND.get(reading.kind)
        if role is None:
            return None
        devices = self._configured[role]
        return role if devices is None or reading.device in devices else None

    def add_readings(self, readings: Iterable[Reading]) -> list[EmissionsRecord]:
        """Integrate readings (any kinds; others are skipped); return the hours now ready.

        This is the engine's hot path (every meter, solar and battery reading), so it
        groups the batch by device (each device's holds depend on its own readings only)
        and integrates in integer microseconds of event time, not datetimes.
        """
        state = self.state
        emitted_until_us = None if state.emitted_until is None else _us(_utc(state.emitted_until))
        clock_us = None if state.clock is None else _us(_utc(state.clock))
        by_device: dict[str, list[tuple[_Powered, Role]]] = {}
        for reading in readings:
            role = self._role(reading)
            if role is not None:
                powered = cast(_Powered, reading)
                by_device.setdefault(reading.device, []).append((powered, role))
        for device_id, entries in by_device.items():
            entries.sort(key=_reading_time)
            device = state.devices.get(device_id)
            accepted = False
            # The device's last accepted reading: its hold is integrated up to the next one.
            if device is None:
                last_us, last_ts, role, power_kw, open_ = None, None, None, 0.0, False
            else:
                last_us, last_ts = _us(device.ts), device.ts
                role, power_kw, open_ = device.role, device.power_kw, device.open
            for reading, reading_role in entries:
                ts_us = _us(reading.ts)
                late = emitted_until_us is not None and ts_us < emitted_until_us
                if late or (last_us is not None and ts_us <= last_us):
                    state.ignored_readings += 1
                    continue
                if open_ and last_us is not None and role is not None:
                    self._integrate(device_id, role, last_us, ts_us, power_kw)
                last_us, last_ts, role = ts_us, reading.ts, reading_role
                power_kw, open_, accepted = float(reading.power_kw), True, True
            if accepted and last_ts is not None and role is not None and last_us is not None:
                state.devices[device_id] = _Device(role, last_ts, power_kw)
                if clock_us is None or last_us > clock_us:
                    clock_us = last_us
        if clock_us is not None:
            state.clock = _from_us(clock_us).isoformat()
        self._close_expired()
        return self._ready()

    def add_intensity(self, intensity: CarbonIntensity) -> list[EmissionsRecord]:
        """Record an intensity of the site's zone (others are skipped); return the hours ready."""
        if intensity.zone != self.cfg.zone:
            return []
        until = self.state.intensities_until
        if until is None or intensity.end > datetime.fromisoformat(until):
            self.state.intensities_until = _iso(intensity.end)
        done = self.state.emitted_until
        if done is not None and intensity.end <= datetime.fromisoformat(done):
            return []
        self.state.intensities[_iso(intensity.start)] = (
            _iso(intensity.end),
            intensity.co2_g_per_kwh,
            intensity.renewable_share_pct,
        )
        return self._ready()

    def add_certified(self, hour_start: datetime, certified_kwh: float) -> list[EmissionsRecord]:
        """Add certificate-claimed kWh for an hour; a claim for an emitted hour is ignored."""
        if certified_kwh < 0:
            raise ValueError(f"certified_kwh must be >= 0; got {certified_kwh!r}")
        hour = _hour_floor(hour_start)
        done = self.state.emitted_until
        if done is not None and hour < datetime.fromisoformat(done):
            log.warning("site=%s certificates for emitted hour %s ignored", self.site, hour)
            return []
        key = _iso(hour)
        self.state.certified_kwh[key] = self.state.certified_kwh.get(key, 0.0) + certified_kwh
        return self._ready()

    # integration

    def _integrate(
        self, device_id: str, role: Role, start_us: int, until_us: int, power_kw: float
    ) -> None:
        """Hold ``power_kw`` from ``start_us`` to ``until_us`` (capped by the hold)."""
        end_us = min(until_us, start_us + self._hold_us)
        hours = self.state.hours
        while start_us < end_us:
            hour_us = start_us - start_us % _US_PER_HOUR
            stop_us = min(end_us, hour_us + _US_PER_HOUR)
            energy_kwh = power_kw * ((stop_us - start_us) / _US_PER_S) / 3600.0
            key = _hour_key(hour_us)
            flows = hours.get(key)
            if flows is None:
                flows = hours[key] = HourFlows()
            if role == "meter":
                if energy_kwh >= 0:
                    flows.import_kwh += energy_kwh
                else:
                    flows.export_kwh -= energy_kwh
            elif role == "solar":
                solar_kwh = max(0.0, energy_kwh)
                flows.solar_kwh += solar_kwh
                by_device = flows.solar_by_device_kwh
                by_device[device_id] = by_device.get(device_id, 0.0) + solar_kwh
            elif energy_kwh >= 0:
                flows.discharge_kwh += energy_kwh
            else:
                flows.charge_kwh -= energy_kwh
            start_us = stop_us

    def _close_expired(self) -> None:
        if self.state.clock is None:
            return
        clock_us = _us(datetime.fromisoformat(self.state.clock))
        hold_us = self._hold_us
        for device_id, device in self.state.devices.items():
            start_us = _us(device.ts)
            if device.open and start_us + hold_us <= clock_us:
                self._integrate(device_id, device.role, start_us, clock_us, device.power_kw)
                device.open = False

    def _complete(self, hour_end: datetime) -> bool:
        state = self.state
        if state.clock is None:
            return False
        clock = datetime.fromisoformat(state.clock)
        if clock < hour_end + timedelta(seconds=self.cfg.certificates_wait_s):
            return False
        # A device still holding a power from before the hour's end may add energy to it.
        return all(not d.open or d.ts >= hour_end for d in state.devices.values())

    def _intensity(self, hour_start: datetime) -> HourIntensity | None:
        """Time-weighted mean of the intervals covering the hour; None if not fully covered."""
        hour_end = hour_start + HOUR
        pieces: list[tuple[datetime, datetime, float, float | None]] = []
        for start_iso, (end_iso, co2, renewable) in self.state.intensities.items():
            start = max(datetime.fromisoformat(start_iso), hour_start)
            end = min(datetime.fromisoformat(end_iso), hour_end)
            if start < end:
                pieces.append((start, end, co2, renewable))
        pieces.sort()
        covered_until = hour_start
        for start, end, _, _ in pieces:
            if start > covered_until:
                return None
            covered_until = max(covered_until, end)
        if covered_until < hour_end:
            return None
        total_s = sum((end - start).total_seconds() for start, end, _, _ in pieces)
        co2 = sum((e - s).total_seconds() * c for s, e, c, _ in pieces) / total_s
        renewables = [r for _, _, _, r in pieces]
        renewable = (
            None
            if any(r is None for r in renewables)
            else sum((e - s).total_seconds() * (r or 0.0) for s, e, _, r in pieces) / total_s
        )
        return HourIntensity(co2, renewable)

    def _ready(self) -> list[EmissionsRecord]:
        """Emit the complete hours in order, stopping at the first that must wait."""
        state = self.state
        out: list[EmissionsRecord] = []
        for key in sorted(state.hours):
            hour = datetime.fromisoformat(key)
            if not self._complete(hour + HOUR):
                break
            intensity = self._intensity(hour)
            if intensity is None:
                # Filled only when no more can come: the feed is past the hour (a gap), or
                # it has been silent for intensity_wait_s of the site's time. Not as soon
                # as the site's time is past the hour: a worker catching up reads readings
                # ahead of the intensities, and the hour must come out as it would live.
                clock = datetime.fromisoformat(state.clock or key)
                until = state.intensities_until
                feed_past = until is not None and datetime.fromisoformat(until) > hour + HOUR
                waited = clock >= hour + HOUR + timedelta(seconds=self.cfg.intensity_wait_s)
                if not (feed_past or waited) or state.last_intensity is None:
                    break
                intensity = HourIntensity(*state.last_intensity)
                state.estimated_hours += 1
                log.warning(
                    "site=%s zone=%s no intensity for %s (%s): last one used",
                    self.site,
                    self.cfg.zone,
                    key,
                    f"the feed is at {until}"
                    if feed_past
                    else f"{self.cfg.intensity_wait_s:.0f} s",
                )
            flows = state.hours.pop(key)
            certified = state.certified_kwh.pop(key, 0.0)
            if self.certify is not None:
                certified += self.certify(hour, flows, split_hour(flows))
            out.append(
                account_hour(self.site, hour, flows, intensity, certified, state.pool, self.cfg)
            )
            state.last_intensity = (intensity.co2_g_per_kwh, intensity.renewable_share_pct)
            state.emitted_until = _iso(hour + HOUR)
        if state.emitted_until is not None:
            self._prune(datetime.fromisoformat(state.emitted_until))
        return out

    def _prune(self, emitted_until: datetime) -> None:
        state = self.state
        state.intensities = {
            s: v
            for s, v in state.intensities.items()
            if datetime.fromisoformat(v[0]) > emitted_until
        }
        state.certified_kwh = {
            h: v
            for h, v in state.certified_kwh.items()
            if datetime.fromisoformat(h) >= emitted_until
        }


# --- certificates of the same hourly flows -------------------------------------------------


def certify_with_ledger(
    load_ledger: Callable[[], CertificateLedger],
    settings: CertificateSettings,
    site: str,
    events: list[CertificateEvent],
) -> Certify:
    """The :class:`CarbonEngine` hook that settles each hour in the site's own ledger.

    The site claims its own certificates for the hour's consumption: the solar it consumed
    directly, then the energy it bought (to load and to battery). Self-consumed solar comes
    first because it is the certificates' own energy: a site that keeps its certificates
    retires them for it (GHG Protocol Scope 2 Guidance, ch. 6.6: a site that sold them
    would have to count that energy at the residual mix), so only what is left covers
    purchased energy in the market-based figure. New ledger events are appended to
    ``events``. The ledger is loaded on the first hour settled (most batches settle none).
    """
    loaded: list[CertificateLedger] = []

    def certify(hour_start: datetime, flows: HourFlows, split: HourSplit) -> float:
        if not loaded:
            loaded.append(load_ledger())
        ledger = loaded[0]
        consumption_kwh = (
            split.solar_to_load_kwh + split.grid_to_load_kwh + split.grid_to_battery_kwh
        )
        events.extend(
            settle_hour(
                ledger,
                settings,
                hour_start,
                flows.solar_by_device_kwh,
                max(0.0, consumption_kwh),
                claimed_by=site,
            )
        )
        # From the ledger, not the new events: an hour settled before a restart (ledger
        # saved, carbon state not yet) is re-accounted with the certificates it claimed.
        return max(0.0, claimed_kwh(ledger, hour_start, site) - split.solar_to_load_kwh)

    return certify


# --- Kafka wiring ------------------------------------------------------------------------------


def sites_in_zone(zones: dict[str, str], zone: str) -> list[str]:
    """The sites (of ``site -> zone``) whose grid is ``zone``, in a stable order."""
    return sorted(site for site, site_zone in zones.items() if site_zone == zone)


def register(app: faust.App, settings: Settings) -> None:
    """Wire Scope 2 accounting and the certificate ledger to Kafka.

    Intensities are keyed by zone; a fan-out agent re-keys each to the sites of its zone
    on ``site-carbon`` (as prices are on ``site-prices``), so one worker sees a site's
    readings and its grid's intensity. The site step keeps two tables keyed by site: the
    engine's state (written with every message, so a restart resumes from the
    committed offset with nothing counted twice: a reading at or before a device's last
    one is ignored) and the certificate ledger (written when an hour is settled).
    """
    from pipeline.streams import TableState, fan_out_agent, site_agent, site_state

    configs = {site.id: cfg for site in settings.sites if (cfg := carbon_settings(site))}
    certificates = {}
    for site in settings.sites:
        cert_cfg = certificate_settings(site)
        if cert_cfg is None:
            continue
        if site.id not in configs:
            raise SettingsError(
                f"sites[{site.id}].certificates needs sites[{site.id}].carbon: certificates "
                "are minted and claimed from the hourly flows the carbon accounting meters"
            )
        certificates[site.id] = cert_cfg
    # Follow-the-sun sites need a carbon section too (checked by processors.follow_sun), so
    # these are every zone in use.
    zones = {site: cfg.zone for site, cfg in configs.items()}

    fan_out_agent(
        app,
        settings,
        f"{__name__}.fan_out",
        topics.CARBON,
        topics.SITE_CARBON,
        CarbonIntensity,
        lambda intensity: sites_in_zone(zones, intensity.zone),
    )

    if not configs:
        return
    states = site_state(
        app,
        settings,
        "carbon-state",
        "Per-site Scope 2 engine: open hours, devices' last readings, battery pool.",
        CarbonState.from_json,
        CarbonState.to_json,
    )
    ledgers: TableState[CertificateLedger | None] = site_state(
        app,
        settings,
        "certificate-ledger",
        "Per-site guarantee-of-origin ledger (its events and the minting memory).",
        _parse_ledger,
        _dump_ledger,
    )

    def run(
        site: str, feed: Callable[[CarbonEngine], list[EmissionsRecord]]
    ) -> list[CertificateEvent | EmissionsRecord]:
        state = states.get(site)
        events: list[CertificateEvent] = []
        loaded: list[CertificateLedger] = []

        def load_ledger() -> CertificateLedger:
            loaded.append(ledgers.get(site) or CertificateLedger(site))
            return loaded[0]

        cert_cfg = certificates.get(site)
        certify = (
            None if cert_cfg is None else certify_with_ledger(load_ledger, cert_cfg, site, events)
        )
        records = feed(CarbonEngine(site, configs[site], state, certify))
        states.put(site, state)
        if loaded:  # an hour was settled: its carry and claims changed, if no event did
            ledgers.put(site, loaded[0])
        return _in_hour_order(events, records)

    def on_telemetry(site: str, batch: TelemetryBatch) -> list[CertificateEvent | EmissionsRecord]:
        return run(site, lambda engine: engine.add_readings(batch.readings))

    def on_carbon(
        site: str, intensity: CarbonIntensity
    ) -> list[CertificateEvent | EmissionsRecord]:
        return run(site, lambda engine: engine.add_intensity(intensity))

    site_agent(
        app, settings, f"{__name__}.scope2", configs, telemetry=on_telemetry, carbon=on_carbon
    )


def _parse_ledger(saved: dict[str, Any] | None) -> CertificateLedger | None:
    return CertificateLedger.from_json(saved) if saved else None


def _dump_ledger(ledger: CertificateLedger | None) -> dict[str, Any] | None:
    return None if ledger is None else ledger.to_json()


def _in_hour_order(
    events: list[CertificateEvent], records: list[EmissionsRecord]
) -> list[CertificateEvent | EmissionsRecord]:
    """Each hour's ledger events, then its emissions record."""
    out: list[CertificateEvent | EmissionsRecord] = []
    pending = list(events)
    for record in records:
        out += [e for e in pending if e.hour_start < record.end]
        pending = [e for e in pending if e.hour_start >= record.end]
        out.append(record)
    return out + pending
