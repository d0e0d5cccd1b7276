"""Generation/demand mismatch and curtailment, per home and per distribution transformer.

**What is watched.** A site is a street or a small community behind one or more
distribution transformers. Each *home* has a net power at its connection point
(positive import, negative export): read from its ``meter`` (a ``meter`` reading),
or, when it has no meter or the meter went silent, computed from its parts:
consumption (``home`` / ``ev`` readings of the ``consumption`` devices) minus solar
minus battery discharge. A *transformer*'s flow is read from its own ``meter`` if it
has one, else it is the sum of its homes' net powers (positive: power flows from the
grid into the street; negative: reverse power flow).

**Mismatch.** Each of these *scopes* has up to two limits, and each limit is a
*condition* watched on its own:

=============== ===================================== =========================
scope           condition (direction)                 ``alert_type``
=============== ===================================== =========================
home            export above ``max_export_kw``        ``home_export_limit``
                (surplus)
home            import above ``max_import_kw``        ``home_import_limit``
                (deficit)
transformer     reverse flow above ``max_reverse_kw`` ``reverse_power_flow``
                (surplus)
transformer     forward flow above ``rating_kw``      ``transformer_overload``
                (deficit)
=============== ===================================== =========================

The *excess* is how far the flow is beyond the limit. A condition is *over* when the
excess is strictly more than the scope's ``tolerance_kw`` (exactly at the tolerance
is not over), and it *fires* once it has been over on every observation for
``persist_s`` of event time: one noisy reading does not curtail anybody.

**Plan.** When a condition fires, the plan covers the whole excess (it brings the
flow back to the limit, not to the edge of the tolerance), adjusting the scope's
assets category by category in ``order`` - by default loads, then solar, then
batteries, as issue 6 asks - and device by device in configuration order (homes in
order, then each home's devices in order), each within its limits, and stops as soon
as the excess is covered:

=========== =================================== ====================================
category    surplus (too much export)           deficit (too much import)
=========== =================================== ====================================
loads       start / raise shiftable loads up to shed sheddable loads down to
            ``max_kw``                          ``min_kw``
solar       curtail: cap the inverter at a      only release a curtailment that
            lower output, down to ``min_kw``    another incident put in place
batteries   charge (or stop discharging), up to discharge (or stop charging), up
            ``max_charge_kw``; none at          to ``max_discharge_kw``; none at
            ``soc_max_pct``                     ``soc_min_pct``
=========== =================================== ====================================

A device with no recent reading (``stale_s``) is not adjusted: its current power is
unknown, so a setpoint could make things worse (a load may declare ``assumed_kw``
for when it has no reading of its own). What the plan cannot cover is the
*shortfall*: the alert says it remains and is critical. The alert's ``message`` gives
the reason and the plan; ``details`` hold the numbers (``observed_kw``, ``limit_kw``,
``excess_kw``, ``covered_kw``, ``shortfall_kw``) and one ``step_N`` per action.

**Commands.** Each step becomes a :class:`~pipeline.schemas.Command` with
``source_id`` = the alert id and ``valid_until`` = ``issued_at`` + ``command_valid_s``
(a curtailment applied later than that would act on a picture that is gone). The
actions are the control connector's vocabulary (``ingest/control.py`` rejects any
other): ``shed`` (a load down to its ``min_kw``), ``set_power`` (a load's new draw, a
PV inverter's output cap, a battery's power, positive discharging), and ``restore``
on release (hand the device back: a load and a battery get their power from before
the curtailment as the setpoint, a PV inverter its ``rated_kw``: the cap lifted).
``commands`` = ``off`` (alerts only), ``dry_run`` (default: marked dry-run, audited,
never applied) or ``live``, like :class:`pipeline.settings.BatteryConfig`.

**Bookkeeping across incidents.** A device's commanded power is its *baseline* (its
measured power when first adjusted) plus the change each open incident asked for, so
a home incident and its transformer's incident can share a battery without undoing
each other, and each releases only its own share. The *projected* flow of a scope is
what it would be with every open plan applied: with ``live`` commands it is the
measurement (which already shows them), otherwise the measurement plus the planned
changes, so a dry-run plan is not planned again and again. Homes are evaluated
before transformers at each instant, so a transformer plans only what its homes'
plans leave uncovered. While an incident is open and its condition is still over for
another ``persist_s`` (the sun rose further, a device did not follow), the plan is
extended with more steps and the firing alert is sent again (same ``alert_id``,
``details.revision`` + 1).

**Resolution, with hysteresis.** An incident resolves once its scope's flow *without
this incident's own relief* has been at least ``hysteresis_kw`` inside the limit for
``resolve_s``: releasing it then does not immediately fire it again. The release
sends ``restore`` (or, for a device another incident still holds, ``set_power`` to
what that incident needs) and the resolved alert (same ``alert_id``, with ``end``).
With ``live`` commands the relief still in effect is estimated from the plan; a PV
cap whose inverter produces clearly less than the cap is withholding nothing (the
sun, not the cap, limits it) and counts as no relief, so an export curtailment
resolves at dusk.

**Time and data.** Readings are taken in event-time order, grouped by timestamp;
each group is one observation of the whole site (sample-and-hold of every device's
latest reading). A reading older than its device's latest is ignored (late); a late
group still updates devices it is newest for, but time never goes back: it is not
evaluated. A scope whose flow is unknown at an instant (a meter silent for more than
``stale_s`` with no complete set of parts to replace it, or a transformer with a
silent home and no meter of its own) resets its clocks: no action and no release is
taken without data. Every alert and command id derives from the site, the scope,
the incident's start and the event time, never from the wall clock.

Plain Python, no Faust import (except in :func:`register`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.schemas import (
    Alert,
    BatteryReading,
    Command,
    Identifier,
    Reading,
    Severity,
    TelemetryBatch,
    stable_id,
)
from pipeline.settings import Settings, SiteConfig, check_soc_range, repeated, validate_section
from processors.alerting import DetailValue, firing, resolved

if TYPE_CHECKING:
    import faust

PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Pct = Annotated[float, Field(ge=0.0, le=100.0)]

Category = Literal["loads", "solar", "batteries"]
Direction = Literal["surplus", "deficit"]
ScopeKind = Literal["home", "transformer"]
CommandMode = Literal["off", "dry_run", "live"]

DEFAULT_ORDER: tuple[Category, ...] = ("loads", "solar", "batteries")
DIRECTIONS: tuple[Direction, ...] = ("surplus", "deficit")
# Below 1 W a relief or a setpoint change is float rounding, not an action.
EPS_KW = 1e-3
# Limit comparisons forgive float rounding (3.2 - 3.0 is 0.2000000000000002), so a flow
# exactly at the tolerance is not over it; far below any meter's resolution.
ROUNDING_KW = 1e-9
# How a device's own power change moves its home's net power (import positive):
# a load drawing more imports more; more PV output or battery discharge imports less.
NET_SIGN: dict[Category, float] = {"loads": 1.0, "solar": -1.0, "batteries": -1.0}
# A PV inverter producing more than 2 % of its rating below its cap is not limited by
# the cap (inverters track an active-power setpoint to about 1 % of rating).
CAP_BINDING_FRACTION = 0.02

ALERT_TYPES: dict[tuple[ScopeKind, Direction], str] = {
    ("home", "surplus"): "home_export_limit",
    ("home", "deficit"): "home_import_limit",
    ("transformer", "surplus"): "reverse_power_flow",
    ("transformer", "deficit"): "transformer_overload",
}


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# --- settings -----------------------------------------------------------------------------


class LoadConfig(_Config):
    """A flexible load of a home: a heat pump, a water heater, a charger, a pool pump.

    Its power is read from readings of ``device`` (``home`` or ``ev`` kind). It is part
    of the consumption its home reports: to count a separately metered load in a home
    without a meter, list its device in the home's ``consumption`` too.
    """

    device: Identifier
    max_kw: PositiveFloat
    """Most it may draw when started or raised on a surplus. [kW]"""
    min_kw: NonNegativeFloat = 0.0
    """Least it draws when shed (0: off). [kW]"""
    sheddable: bool = True
    """May be reduced on a deficit."""
    shiftable: bool = True
    """May be started or raised on a surplus (its work moves to now)."""
    assumed_kw: NonNegativeFloat | None = None
    """Its power when it has no recent reading of its own; None: not adjusted then. [kW]"""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_kw > self.max_kw:
            raise ValueError(
                f"load {self.device}: min_kw ({self.min_kw}) must not exceed max_kw ({self.max_kw})"
            )
        return self


class SolarConfig(_Config):
    """A PV inverter whose output can be capped."""

    device: Identifier
    rated_kw: PositiveFloat
    """AC rating: the cap set again when a curtailment is released. [kW]"""
    min_kw: NonNegativeFloat = 0.0
    """Lowest output cap the inverter accepts. [kW]"""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_kw > self.rated_kw:
            raise ValueError(
                f"solar {self.device}: min_kw ({self.min_kw}) must not exceed "
                f"rated_kw ({self.rated_kw})"
            )
        return self


class HomeBattery(_Config):
    """A battery of a home. The limits default to the site's battery of the same device."""

    device: Identifier
    max_charge_kw: PositiveFloat
    max_discharge_kw: PositiveFloat
    soc_min_pct: Pct = 20.0
    """Not discharged below this; defaults to the site battery's ``reserve_pct``, so a
    curtailment does not spend the backup reserve. [%]"""
    soc_max_pct: Pct = 95.0
    """Not charged above this. [%]"""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check_soc_range(self.device, self.soc_min_pct, self.soc_max_pct)
        return self


class HomeConfig(_Config):
    """One home (a connection point) and the assets the plan may adjust."""

    id: Identifier
    transformer: Identifier | None = None
    """The distribution transformer it hangs off (one of ``transformers``)."""
    meter: Identifier | None = None
    """Meter at the connection point: positive import. Preferred over the parts."""
    consumption: list[Identifier] = Field(default_factory=list)
    """Devices whose readings sum to the home's consumption (``home``, ``ev`` kinds);
    with ``solar`` and ``batteries`` they give the net power when there is no meter or
    it went silent."""
    solar: list[SolarConfig] = Field(default_factory=list)
    batteries: list[HomeBattery] = Field(default_factory=list)
    loads: list[LoadConfig] = Field(default_factory=list)
    max_import_kw: PositiveFloat | None = None
    """Connection (fuse) limit; None: import is not watched. [kW]"""
    max_export_kw: NonNegativeFloat | None = None
    """Export limit (0: zero-export connection); None: export is not watched. [kW]"""
    tolerance_kw: NonNegativeFloat = 0.2
    """Excess up to this is not a mismatch: meter noise and second-scale swings of a
    home are about 0.1-0.2 kW. [kW]"""
    hysteresis_kw: NonNegativeFloat = 0.5
    """Resolve only once the flow without the relief is this far inside the limit:
    about one appliance cycling, so a release does not immediately re-fire. [kW]"""

    @model_validator(mode="after")
    def _measurable(self) -> Self:
        if self.meter is None and not self.consumption:
            raise ValueError(
                f"home {self.id}: needs a meter or consumption devices to measure its net power"
            )
        return self


class TransformerConfig(_Config):
    """One distribution transformer."""

    id: Identifier
    rating_kw: PositiveFloat
    """Forward (grid to street) limit. [kW]"""
    max_reverse_kw: NonNegativeFloat | None = None
    """Reverse flow limit (protection and voltage rise); None: the rating. [kW]"""
    meter: Identifier | None = None
    """A meter on the transformer (positive: into the street); None: sum of its homes."""
    tolerance_kw: NonNegativeFloat = 1.0
    """Excess up to this is not a mismatch: the sum of many homes' meter errors. [kW]"""
    hysteresis_kw: NonNegativeFloat = 2.0
    """Resolve only once the flow without the relief is this far inside the limit. [kW]"""


class CurtailmentSettings(_Config):
    """``[sites.curtailment]``; ``site`` is the site's id."""

    site: Identifier
    homes: list[HomeConfig] = Field(min_length=1)
    transformers: list[TransformerConfig] = Field(default_factory=list)
    order: list[Category] = Field(default_factory=lambda: list(DEFAULT_ORDER), min_length=1)
    """Categories in the order the plan adjusts them; a category left out is never
    adjusted. Issue 6 asks for loads, then solar, then batteries."""
    persist_s: NonNegativeFloat = 60.0
    """A mismatch must last this long before anything is done: longer than a cloud
    edge or a kettle, short enough for a transformer's thermal time constant. [s]"""
    resolve_s: NonNegativeFloat = 300.0
    """The flow without the relief must stay inside the limit (by the hysteresis)
    this long before the curtailment is released: five minutes of clear sky. [s]"""
    stale_s: PositiveFloat = 300.0
    """A reading older than this is no longer the device's power (five polls of a
    one-minute meter). [s]"""
    commands: CommandMode = "dry_run"
    """``off``: alerts only; ``dry_run``: commands marked dry-run; ``live``: commands the
    control connector applies, if it is enabled too (two keys)."""
    command_valid_s: PositiveFloat = 300.0
    """A command not applied within this is skipped by the control connector. [s]"""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        where = f"curtailment {self.site}"
        duplicates = repeated(self.order)
        if duplicates:
            raise ValueError(f"{where}: order names {duplicates} more than once")
        homes = [h.id for h in self.homes]
        if dup := repeated(homes):
            raise ValueError(f"{where}: duplicate homes {dup}")
        names = [t.id for t in self.transformers]
        if dup := repeated(names):
            raise ValueError(f"{where}: duplicate transformers {dup}")
        for home in self.homes:
            if home.transformer is not None and home.transformer not in names:
                raise ValueError(
                    f"{where}: home {home.id} names transformer {home.transformer!r}, "
                    f"which is not in transformers {names}"
                )
        for transformer in self.transformers:
            if not any(h.transformer == transformer.id for h in self.homes):
                raise ValueError(f"{where}: no home has transformer = {transformer.id!r}")
        # Each device has one role: it is a meter, a PV inverter, a battery or a load of
        # one home. Only a load may also be a consumption device of its own home.
        roles: dict[str, str] = {}
        for owner, device in _device_roles(self):
            if device in roles:
                raise ValueError(f"{where}: device {device!r} is both {roles[device]} and {owner}")
            roles[device] = owner
        return self


def _device_roles(cfg: CurtailmentSettings) -> Iterable[tuple[str, str]]:
    for transformer in cfg.transformers:
        if transformer.meter is not None:
            yield f"the meter of transformer {transformer.id}", transformer.meter
    for home in cfg.homes:
        loads = {load.device for load in home.loads}
        if home.meter is not None:
            yield f"the meter of home {home.id}", home.meter
        for device in home.consumption:
            if device not in loads:
                yield f"consumption of home {home.id}", device
        for solar in home.solar:
            yield f"solar of home {home.id}", solar.device
        for battery in home.batteries:
            yield f"a battery of home {home.id}", battery.device
        for load in home.loads:
            yield f"a load of home {home.id}", load.device


def curtailment_settings(site: SiteConfig) -> CurtailmentSettings | None:
    """Validate a site's ``curtailment`` section (None without one); raises SettingsError.

    A home battery that names one of the site's batteries takes its limits from it
    unless the section gives them.
    """
    if site.curtailment is None:
        return None
    data = {**site.curtailment, "site": site.id}
    site_batteries = {b.device: b for b in site.batteries}
    homes = data.get("homes")
    if isinstance(homes, list):
        filled: list[Any] = []
        for home in homes:
            batteries = home.get("batteries") if isinstance(home, dict) else None
            if isinstance(batteries, list):
                home = {
                    **home,
                    "batteries": [_with_site_limits(b, site_batteries) for b in batteries],
                }
            filled.append(home)
        data["homes"] = filled
    return validate_section(CurtailmentSettings, f"sites[{site.id}].curtailment", data)


def _with_site_limits(battery: Any, site_batteries: dict[str, Any]) -> Any:
    if not isinstance(battery, dict) or battery.get("device") not in site_batteries:
        return battery
    known = site_batteries[battery["device"]]
    return {
        "max_charge_kw": known.max_charge_kw,
        "max_discharge_kw": known.max_discharge_kw,
        "soc_min_pct": known.reserve_pct,
        "soc_max_pct": known.soc_max_pct,
        **battery,
    }


# --- the engine's view of the configuration -----------------------------------------------


@dataclass(frozen=True)
class Asset:
    """An adjustable device of a home."""

    device: str
    category: Category
    home: str
    config: LoadConfig | SolarConfig | HomeBattery


@dataclass(frozen=True)
class Scope:
    """A home or a transformer: where a flow is measured against its limits."""

    kind: ScopeKind
    id: str
    meter: str | None
    homes: tuple[HomeConfig, ...]
    """The home itself, or the transformer's homes."""
    max_import_kw: float | None
    max_export_kw: float | None
    tolerance_kw: float
    hysteresis_kw: float
    assets: tuple[Asset, ...]

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"

    def limit_kw(self, direction: Direction) -> float | None:
        return self.max_export_kw if direction == "surplus" else self.max_import_kw

    def excess_kw(self, direction: Direction, net_kw: float) -> float:
        """How far ``net_kw`` (import positive) is beyond the limit of ``direction``. [kW]"""
        limit = self.limit_kw(direction)
        assert limit is not None
        return -net_kw - limit if direction == "surplus" else net_kw - limit


def _assets(home: HomeConfig) -> list[Asset]:
    return (
        [Asset(x.device, "loads", home.id, x) for x in home.loads]
        + [Asset(x.device, "solar", home.id, x) for x in home.solar]
        + [Asset(x.device, "batteries", home.id, x) for x in home.batteries]
    )


def build_scopes(cfg: CurtailmentSettings) -> list[Scope]:
    """Homes first, then transformers: a transformer plans what its homes leave uncovered."""
    scopes = [
        Scope(
            kind="home",
            id=h.id,
            meter=h.meter,
            homes=(h,),
            max_import_kw=h.max_import_kw,
            max_export_kw=h.max_export_kw,
            tolerance_kw=h.tolerance_kw,
            hysteresis_kw=h.hysteresis_kw,
            assets=tuple(_assets(h)),
        )
        for h in cfg.homes
    ]
    for t in cfg.transformers:
        homes = tuple(h for h in cfg.homes if h.transformer == t.id)
        scopes.append(
            Scope(
                kind="transformer",
                id=t.id,
                meter=t.meter,
                homes=homes,
                max_import_kw=t.rating_kw,
                max_export_kw=t.rating_kw if t.max_reverse_kw is None else t.max_reverse_kw,
                tolerance_kw=t.tolerance_kw,
                hysteresis_kw=t.hysteresis_kw,
                assets=tuple(a for h in homes for a in _assets(h)),
            )
        )
    return scopes


# --- state --------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass
class Sample:
    """A device's latest reading."""

    ts: datetime
    power_kw: float
    soc_pct: float | None = None


@dataclass
class Adjustment:
    """What the open incidents asked of one device."""

    baseline_kw: float
    """Its measured power when first adjusted. [kW]"""
    deltas_kw: dict[str, float] = field(default_factory=dict)
    """Condition key -> change of the device's own power that incident asked for. [kW]"""

    @property
    def commanded_kw(self) -> float:
        return self.baseline_kw + sum(self.deltas_kw.values())


@dataclass
class Condition:
    """One limit of one scope (``home:h1:surplus``)."""

    over_since: datetime | None = None
    within_since: datetime | None = None
    alert: Alert | None = None
    """The last firing alert of the open incident; None: no incident."""
    steps: list[str] = field(default_factory=list)
    """Every step of the open incident's plan, in order."""


@dataclass
class CurtailmentState:
    """What one site's engine remembers (a Faust table value)."""

    clock: datetime | None = None
    """Event time of the latest observation evaluated."""
    latest: dict[str, Sample] = field(default_factory=dict)
    conditions: dict[str, Condition] = field(default_factory=dict)
    adjustments: dict[str, Adjustment] = field(default_factory=dict)
    late_readings: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "clock": _iso(self.clock),
            "latest": {
                d: [s.ts.isoformat(), s.power_kw, s.soc_pct] for d, s in self.latest.items()
            },
            "conditions": {
                key: {
                    "over_since": _iso(c.over_since),
                    "within_since": _iso(c.within_since),
                    "alert": None if c.alert is None else c.alert.model_dump(mode="json"),
                    "steps": list(c.steps),
                }
                for key, c in self.conditions.items()
            },
            "adjustments": {
                d: {"baseline_kw": a.baseline_kw, "deltas_kw": dict(a.deltas_kw)}
                for d, a in self.adjustments.items()
            },
            "late_readings": self.late_readings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> CurtailmentState:
        if not data:
            return cls()
        return cls(
            clock=_dt(data["clock"]),
            latest={
                d: Sample(datetime.fromisoformat(ts), float(p), soc)
                for d, (ts, p, soc) in data["latest"].items()
            },
            conditions={
                key: Condition(
                    over_since=_dt(c["over_since"]),
                    within_since=_dt(c["within_since"]),
                    alert=None if c["alert"] is None else Alert.model_validate(c["alert"]),
                    steps=list(c["steps"]),
                )
                for key, c in data["conditions"].items()
            },
            adjustments={
                d: Adjustment(float(a["baseline_kw"]), dict(a["deltas_kw"]))
                for d, a in data["adjustments"].items()
            },
            late_readings=int(data["late_readings"]),
        )


# --- planning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One action of a plan."""

    asset: Asset
    direction: Direction
    before_kw: float
    """The device's power (or, for PV, output cap) before the step. [kW]"""
    after_kw: float
    relief_kw: float
    """How much the step moves the scope's flow towards its limit. [kW]"""

    @property
    def action(self) -> str:
        """The control connector's action for the step."""
        if self.asset.category == "loads" and self.direction == "deficit":
            assert isinstance(self.asset.config, LoadConfig)
            if self.after_kw <= self.asset.config.min_kw + EPS_KW:
                return "shed"
        return "set_power"

    def describe(self) -> str:
        verb = {
            ("loads", "surplus"): "start",
            ("loads", "deficit"): "shed",
            ("solar", "surplus"): "curtail",
            ("solar", "deficit"): "release curtailment of",
            ("batteries", "surplus"): "charge",
            ("batteries", "deficit"): "discharge",
        }[self.asset.category, self.direction]
        return (
            f"{self.asset.category}: {verb} {self.asset.device} "
            f"{self.before_kw:.2f} -> {self.after_kw:.2f} kW (relief {self.relief_kw:.2f} kW)"
        )


@dataclass(frozen=True)
class Plan:
    needed_kw: float
    steps: list[Step]
    skipped: list[str]
    """Devices of the scope that could not be adjusted, with why."""

    @property
    def covered_kw(self) -> float:
        return sum(s.relief_kw for s in self.steps)

    @property
    def shortfall_kw(self) -> float:
        return max(0.0, self.needed_kw - self.covered_kw)


# --- the engine ---------------------------------------------------------------------------


class CurtailmentEngine:
    """Mismatch detection and curtailment planning for one site. Pure: time comes from
    the readings."""

    def __init__(self, config: CurtailmentSettings) -> None:
        self.config = config
        self.scopes = build_scopes(config)
        self.watched: frozenset[str] = frozenset(
            device for _, device in _device_roles(config)
        ) | frozenset(device for h in config.homes for device in h.consumption)

    # --- readings -----------------------------------------------------------------------

    def on_readings(
        self, state: CurtailmentState, readings: Iterable[Reading]
    ) -> list[Alert | Command]:
        """Take a batch of the site's readings; return the alerts and commands to send."""
        by_ts: dict[datetime, list[tuple[Reading, float]]] = {}
        for reading in readings:
            power_kw = getattr(reading, "power_kw", None)  # every kind but fusion has it
            if reading.device in self.watched and power_kw is not None:
                by_ts.setdefault(reading.ts, []).append((reading, float(power_kw)))
        out: list[Alert | Command] = []
        for ts in sorted(by_ts):
            for reading, power_kw in by_ts[ts]:
                last = state.latest.get(reading.device)
                if last is not None and reading.ts < last.ts:
                    state.late_readings += 1
                    continue
                soc = reading.soc_pct if isinstance(reading, BatteryReading) else None
                state.latest[reading.device] = Sample(reading.ts, power_kw, soc)
            if state.clock is not None and ts < state.clock:
                continue  # a late group: devices updated, time does not go back
            state.clock = ts
            out += self.evaluate(state, ts)
        return out

    def _fresh(self, state: CurtailmentState, device: str, ts: datetime) -> Sample | None:
        sample = state.latest.get(device)
        if sample is None or (ts - sample.ts).total_seconds() > self.config.stale_s:
            return None
        return sample

    def home_net_kw(self, state: CurtailmentState, home: HomeConfig, ts: datetime) -> float | None:
        """Measured net power of a home (import positive); None if unknown. [kW]"""
        if home.meter is not None and (meter := self._fresh(state, home.meter, ts)) is not None:
            return meter.power_kw
        if not home.consumption:
            return None
        parts = [
            *((1.0, d) for d in home.consumption),
            *((-1.0, s.device) for s in home.solar),
            *((-1.0, b.device) for b in home.batteries),
        ]
        total_kw = 0.0
        for sign, device in parts:
            sample = self._fresh(state, device, ts)
            if sample is None:
                return None
            total_kw += sign * sample.power_kw
        return total_kw

    def measured_kw(self, state: CurtailmentState, scope: Scope, ts: datetime) -> float | None:
        """Measured flow of a scope (import positive); None if unknown. [kW]"""
        if scope.kind == "home":
            return self.home_net_kw(state, scope.homes[0], ts)
        if scope.meter is not None and (meter := self._fresh(state, scope.meter, ts)) is not None:
            return meter.power_kw
        total_kw = 0.0
        for home in scope.homes:
            net_kw = self.home_net_kw(state, home, ts)
            if net_kw is None:
                return None
            total_kw += net_kw
        return total_kw

    # --- relief bookkeeping -------------------------------------------------------------

    def _in_effect_kw(
        self, state: CurtailmentState, asset: Asset, delta_kw: float, ts: datetime
    ) -> float:
        """Net-power change that a device change is assumed to make right now. [kW]"""
        if self.config.commands == "live" and asset.category == "solar" and delta_kw < 0:
            sample = self._fresh(state, asset.device, ts)
            adjustment = state.adjustments[asset.device]
            assert isinstance(asset.config, SolarConfig)
            slack_kw = CAP_BINDING_FRACTION * asset.config.rated_kw
            if sample is not None and sample.power_kw < adjustment.commanded_kw - slack_kw:
                return 0.0  # the sun, not the cap, limits it: the cap withholds nothing
        return NET_SIGN[asset.category] * delta_kw

    def _planned_kw(
        self, state: CurtailmentState, scope: Scope, ts: datetime, only: str | None = None
    ) -> float:
        """Net-power change of the scope's flow by the open plans (or by one condition's). [kW]"""
        total_kw = 0.0
        for asset in scope.assets:
            adjustment = state.adjustments.get(asset.device)
            if adjustment is None:
                continue
            for key, delta_kw in adjustment.deltas_kw.items():
                if only is None or key == only:
                    total_kw += self._in_effect_kw(state, asset, delta_kw, ts)
        return total_kw

    def projected_kw(
        self, state: CurtailmentState, scope: Scope, measured_kw: float, ts: datetime
    ) -> float:
        """The flow with every open plan applied. [kW]"""
        if self.config.commands == "live":
            return measured_kw  # the measurement already shows the applied commands
        return measured_kw + self._planned_kw(state, scope, ts)

    # --- evaluation ---------------------------------------------------------------------

    def evaluate(self, state: CurtailmentState, ts: datetime) -> list[Alert | Command]:
        out: list[Alert | Command] = []
        for scope in self.scopes:
            measured_kw = self.measured_kw(state, scope, ts)
            for direction in DIRECTIONS:
                if scope.limit_kw(direction) is not None:
                    out += self._step(state, scope, direction, measured_kw, ts)
        return out

    def _step(
        self,
        state: CurtailmentState,
        scope: Scope,
        direction: Direction,
        measured_kw: float | None,
        ts: datetime,
    ) -> list[Alert | Command]:
        key = f"{scope.key}:{direction}"
        cond = state.conditions.setdefault(key, Condition())
        if measured_kw is None:
            # No action and no release without data.
            cond.over_since = cond.within_since = None
            return []
        out: list[Alert | Command] = []
        if cond.alert is not None:
            projected_kw = self.projected_kw(state, scope, measured_kw, ts)
            without_kw = projected_kw - self._planned_kw(state, scope, ts, only=key)
            if scope.excess_kw(direction, without_kw) <= -scope.hysteresis_kw + ROUNDING_KW:
                cond.within_since = cond.within_since or ts
                if (ts - cond.within_since).total_seconds() >= self.config.resolve_s:
                    out += self._release(state, scope, direction, key, cond, measured_kw, ts)
            else:
                cond.within_since = None
        excess_kw = scope.excess_kw(direction, self.projected_kw(state, scope, measured_kw, ts))
        if excess_kw > scope.tolerance_kw + ROUNDING_KW:
            cond.over_since = cond.over_since or ts
            if (ts - cond.over_since).total_seconds() >= self.config.persist_s:
                out += self._act(state, scope, direction, key, cond, measured_kw, excess_kw, ts)
                # Another extension needs another persist_s over: time for devices to follow.
                cond.over_since = None
        else:
            cond.over_since = None
        return out

    def plan(
        self,
        state: CurtailmentState,
        scope: Scope,
        direction: Direction,
        needed_kw: float,
        ts: datetime,
    ) -> Plan:
        """Cover ``needed_kw`` of relief with the scope's assets, category by category in
        ``order``; nothing in ``state`` changes."""
        steps: list[Step] = []
        skipped: list[str] = []
        remaining_kw = needed_kw
        for category in self.config.order:
            for asset in scope.assets:
                if asset.category != category or remaining_kw <= EPS_KW:
                    continue
                current_kw, room_kw, why_not = self._room(state, asset, direction, ts)
                if current_kw is None:
                    skipped.append(f"{asset.device}: {why_not}")
                    continue
                take_kw = min(room_kw, remaining_kw)
                if take_kw <= EPS_KW:
                    continue
                net_change_kw = take_kw if direction == "surplus" else -take_kw
                delta_kw = net_change_kw * NET_SIGN[category]
                steps.append(Step(asset, direction, current_kw, current_kw + delta_kw, take_kw))
                remaining_kw -= take_kw
        return Plan(needed_kw=needed_kw, steps=steps, skipped=skipped)

    def _room(
        self, state: CurtailmentState, asset: Asset, direction: Direction, ts: datetime
    ) -> tuple[float | None, float, str]:
        """(current power, relief it can still give, why not if current is unknown). [kW]"""
        sample = self._fresh(state, asset.device, ts)
        adjustment = state.adjustments.get(asset.device)
        current_kw: float | None
        if adjustment is not None:
            current_kw = adjustment.commanded_kw
        else:
            current_kw = None if sample is None else sample.power_kw
        cfg = asset.config
        if isinstance(cfg, LoadConfig):
            if current_kw is None:
                current_kw = cfg.assumed_kw
            if current_kw is None:
                return None, 0.0, f"no reading within {self.config.stale_s:g} s"
            if direction == "surplus":
                room_kw = cfg.max_kw - current_kw if cfg.shiftable else 0.0
            else:
                room_kw = current_kw - cfg.min_kw if cfg.sheddable else 0.0
        elif isinstance(cfg, SolarConfig):
            if current_kw is None:
                return None, 0.0, f"no reading within {self.config.stale_s:g} s"
            if direction == "surplus":
                room_kw = current_kw - cfg.min_kw
            else:
                # PV cannot cover a deficit; it can only give back what a cap withholds.
                withheld_kw = 0.0 if adjustment is None else -sum(adjustment.deltas_kw.values())
                room_kw = min(withheld_kw, cfg.rated_kw - current_kw)
        else:
            if sample is None or sample.soc_pct is None or current_kw is None:
                return None, 0.0, f"no reading within {self.config.stale_s:g} s"
            if direction == "surplus":
                # At its maximum SoC a battery cannot charge; it can still stop discharging.
                floor_kw = -cfg.max_charge_kw if sample.soc_pct < cfg.soc_max_pct else 0.0
                room_kw = current_kw - min(floor_kw, current_kw)
            else:
                ceiling_kw = cfg.max_discharge_kw if sample.soc_pct > cfg.soc_min_pct else 0.0
                room_kw = max(ceiling_kw, current_kw) - current_kw
        return current_kw, max(0.0, room_kw), ""

    # --- incidents ----------------------------------------------------------------------

    def _act(
        self,
        state: CurtailmentState,
        scope: Scope,
        direction: Direction,
        key: str,
        cond: Condition,
        measured_kw: float,
        excess_kw: float,
        ts: datetime,
    ) -> list[Alert | Command]:
        plan = self.plan(state, scope, direction, excess_kw, ts)
        previous = cond.alert
        if previous is not None and not plan.steps:
            return []  # nothing more to adjust; the open alert already says so
        if previous is None:
            start, revision = cond.over_since or ts, 0.0
        else:
            start, revision = previous.start, float(previous.details.get("revision", 0.0)) + 1.0
        for step in plan.steps:
            adjustment = state.adjustments.setdefault(step.asset.device, Adjustment(step.before_kw))
            delta_kw = step.after_kw - step.before_kw
            adjustment.deltas_kw[key] = adjustment.deltas_kw.get(key, 0.0) + delta_kw
        cond.steps += [s.describe() for s in plan.steps]
        alert = self._alert(scope, direction, cond, plan, measured_kw, start, ts, revision)
        cond.alert = alert
        cond.within_since = None
        out: list[Alert | Command] = [alert]
        for step in plan.steps:
            out += self._command(
                step.asset.device, step.action, step.after_kw, alert, ts, step.describe()
            )
        return out

    def _alert(
        self,
        scope: Scope,
        direction: Direction,
        cond: Condition,
        plan: Plan,
        measured_kw: float,
        start: datetime,
        ts: datetime,
        revision: float,
    ) -> Alert:
        limit_kw = scope.limit_kw(direction)
        assert limit_kw is not None
        alert_type = ALERT_TYPES[scope.kind, direction]
        observed_kw = -measured_kw if direction == "surplus" else measured_kw
        flow = {
            ("home", "surplus"): f"home {scope.id} exports {observed_kw:.2f} kW, above its "
            f"export limit of {limit_kw:.2f} kW",
            ("home", "deficit"): f"home {scope.id} imports {observed_kw:.2f} kW, above its "
            f"import limit of {limit_kw:.2f} kW",
            ("transformer", "surplus"): f"transformer {scope.id} carries {observed_kw:.2f} kW "
            f"of reverse power flow, above its limit of {limit_kw:.2f} kW",
            ("transformer", "deficit"): f"transformer {scope.id} carries {observed_kw:.2f} kW, "
            f"above its rating of {limit_kw:.2f} kW",
        }[scope.kind, direction]
        lasted_s = (ts - start).total_seconds()
        reason = (
            f"{flow} (tolerance {scope.tolerance_kw:.2f} kW) for {lasted_s:.0f} s; "
            f"{plan.needed_kw:.2f} kW to cover"
        )
        # The whole plan of the incident so far: an extension adds to the earlier steps.
        planned = "plan: " + ("; ".join(cond.steps) or "nothing left to adjust")
        if plan.shortfall_kw > EPS_KW:
            planned += f"; shortfall {plan.shortfall_kw:.2f} kW remains: nothing left to adjust"
        if plan.skipped:
            planned += "; not adjusted: " + ", ".join(plan.skipped)
        details: dict[str, DetailValue] = {
            "scope": scope.kind,
            "direction": direction,
            "observed_kw": observed_kw,
            "limit_kw": limit_kw,
            "tolerance_kw": scope.tolerance_kw,
            "excess_kw": plan.needed_kw,
            "covered_kw": plan.covered_kw,
            "shortfall_kw": plan.shortfall_kw,
            "commands": self.config.commands,
            "order": ",".join(self.config.order),
            "revision": revision,
        }
        for n, text in enumerate(cond.steps, start=1):
            details[f"step_{n}"] = text
        if plan.skipped:
            details["not_adjusted"] = ", ".join(plan.skipped)
        severity = (
            Severity.CRITICAL
            if scope.kind == "transformer" or plan.shortfall_kw > EPS_KW
            else Severity.WARNING
        )
        return firing(
            site=self.config.site,
            device=scope.id,
            alert_type=alert_type,
            severity=severity,
            subject=f"{alert_type.replace('_', ' ')}: {scope.kind} {scope.id}",
            message=f"{reason}. {planned}",
            start=start,
            observed=observed_kw,
            expected=limit_kw,
            details=details,
        )

    def _command(
        self,
        device: str,
        action: str,
        setpoint_kw: float,
        alert: Alert,
        ts: datetime,
        reason: str,
    ) -> list[Alert | Command]:
        if self.config.commands == "off":
            return []
        return [
            Command(
                command_id=stable_id("cmd", alert.alert_id, device, action, ts.isoformat()),
                site=self.config.site,
                device=device,
                action=action,
                setpoint_kw=round(setpoint_kw, 6),
                reason=f"{alert.alert_type} {alert.device}: {reason}",
                issued_at=ts,
                valid_until=ts + timedelta(seconds=self.config.command_valid_s),
                dry_run=self.config.commands != "live",
                source_id=alert.alert_id,
            )
        ]

    def _release(
        self,
        state: CurtailmentState,
        scope: Scope,
        direction: Direction,
        key: str,
        cond: Condition,
        measured_kw: float,
        ts: datetime,
    ) -> list[Alert | Command]:
        alert = cond.alert
        assert alert is not None
        commands: list[Alert | Command] = []
        released: list[str] = []
        for asset in scope.assets:
            adjustment = state.adjustments.get(asset.device)
            if adjustment is None or key not in adjustment.deltas_kw:
                continue
            del adjustment.deltas_kw[key]
            released.append(asset.device)
            if adjustment.deltas_kw:
                # Another open incident still holds this device: keep its share.
                action, setpoint_kw = "set_power", adjustment.commanded_kw
                why = f"release: keep {setpoint_kw:.2f} kW for another open incident"
            else:
                del state.adjustments[asset.device]
                action = "restore"
                cfg = asset.config
                setpoint_kw = (
                    cfg.rated_kw if isinstance(cfg, SolarConfig) else adjustment.baseline_kw
                )
                why = f"release: back to {setpoint_kw:.2f} kW"
            commands += self._command(asset.device, action, setpoint_kw, alert, ts, why)
        observed_kw = -measured_kw if direction == "surplus" else measured_kw
        done = resolved(
            alert,
            ts,
            details={
                "released": ", ".join(released) or "nothing",
                "observed_at_end_kw": observed_kw,
            },
        )
        cond.alert = None
        cond.steps = []
        cond.within_since = None
        return [done, *commands]


# --- wiring -------------------------------------------------------------------------------


def register(app: faust.App, settings: Settings) -> None:
    """Wire curtailment to Kafka: telemetry in, alerts and commands out.

    Only sites with a ``curtailment`` section get work; sections are validated here, at
    start-up. Undecodable telemetry is dead-lettered once, by the shared site agent
    (:func:`pipeline.streams.site_agent`).
    """
    from pipeline.streams import site_state, site_telemetry_agent

    engines = {
        site.id: CurtailmentEngine(cfg)
        for site in settings.sites
        if (cfg := curtailment_settings(site)) is not None
    }
    states = site_state(
        app,
        settings,
        "curtailment-state",
        "Per-site curtailment state: latest powers, open incidents, device adjustments.",
        CurtailmentState.from_json,
        CurtailmentState.to_json,
    )

    def step(site: str, batch: TelemetryBatch) -> list[Alert | Command]:
        state = states.get(site)
        out = engines[site].on_readings(state, batch.readings)
        states.put(site, state)
        return out

    site_telemetry_agent(app, settings, f"{__name__}.curtailment", engines, step)
