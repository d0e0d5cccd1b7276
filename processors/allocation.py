"""Energy allocation: who gets solar, battery and grid energy in one interval, and at what cost.

Every interval (typically the price interval, 15 or 60 minutes) the site's
consumers are served in priority order. The default order, from the issue, is

    fleet charging > facility operations > battery charging > opportunistic loads > grid export

Each consumer is served from the cheapest source it may use, in **merit order**:

1. **solar** - already produced, costs nothing, and every kWh not used on site is
   sold at the export price at best (usually well below the import price), so
   using it on site first is always at least as good as buying from the grid;
2. **battery** - only in a discharge period of the time-of-use tariff (``peak``)
   and only above the reserve: stored energy was paid for (grid charge or
   forgone export) and the reserve is kept for backup power, so it is spent
   where it displaces the dearest grid energy;
3. **grid** - within ``max_grid_import_kw`` (the connection's contracted or
   breaker limit), and for a consumer with a price limit only while the import
   price is at or below it.

What each kind of consumer may draw from:

=================  =====  =======================  ===========================================
kind               solar  battery                  grid
=================  =====  =======================  ===========================================
fleet, facility    yes    in discharge periods     yes (a price limit, if set, is lifted for
                                                   the fleet below its minimum state of charge)
battery_charging   yes    never (no self-charge)   in grid-charge periods, up to the target
opportunistic      yes    never                    only at or below ``max_grid_price_per_kwh``
export             yes    at peak, if profitable   never
=================  =====  =======================  ===========================================

Opportunistic loads (crypto mining, batch inference) are flexible by nature: they
run on surplus solar, or on grid energy when it is cheap enough, never on stored
energy that is worth more serving the site at peak.

Time-of-use dispatch of the battery (one :class:`DispatchPeriod` per interval):

* ``super_off_peak`` / ``off_peak`` - charge from the grid up to a per-period target
  (cheap energy for the evening peak), and from solar up to ``soc_max_pct``;
* ``shoulder`` - hold: no discharge, top up from surplus solar only;
* ``peak`` - discharge to serve loads (and export when the export price is high
  enough to be profitable) down to the reserve.

The battery never charges and discharges in the same interval. Solar that no one
can take (battery full, export limit reached, negative export price) is
curtailed and reported as such, never silently lost from the balance.

Hard limits (``max_grid_import_kw``, ``max_export_kw``, battery power, state of
charge window and reserve) are never exceeded. Demand that cannot be served
within them is explicit: the consumer's ``allocated_kw`` is below its
``requested_kw`` and :attr:`Dispatch.unserved_kw` says how much. The fleet's
minimum state of charge is met by priority, not by breaking a hard limit: a fleet
below it jumps the queue (served at priority -1) and ignores its price limit.

Energy balance of every plan, in kW over the interval::

    solar_used + battery_discharge + grid_import == sum(allocated_kw)

where the allocations include battery charging and export, and
``solar_used = solar_kw - curtailed_kw``.

Everything here is plain Python (no Faust import), so the same code serves the
stream, a backtest and the unit tests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.schemas import (
    Allocation,
    AllocationPlan,
    BatteryReading,
    EvReading,
    Identifier,
    PriceTick,
    Reading,
    SourceFlow,
    TelemetryBatch,
    stable_id,
)
from pipeline.settings import (
    BatteryConfig,
    Settings,
    SettingsError,
    SiteConfig,
    repeated,
    time_zone,
    validate_section,
)

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

Pct = Annotated[float, Field(ge=0.0, le=100.0)]
NonNegativeKw = Annotated[float, Field(ge=0.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]

# Flows below this are rounding noise (a kW-scale site, float arithmetic), not energy.
EPSILON_KW = 1e-9


class ConsumerKind(StrEnum):
    FLEET = "fleet"
    FACILITY = "facility"
    BATTERY_CHARGING = "battery_charging"
    OPPORTUNISTIC = "opportunistic"
    EXPORT = "export"


class DispatchPeriod(StrEnum):
    """The time-of-use period of an interval, as far as battery dispatch is concerned."""

    SUPER_OFF_PEAK = "super_off_peak"
    OFF_PEAK = "off_peak"
    SHOULDER = "shoulder"
    PEAK = "peak"


# Tariffs name their periods freely; these are the spellings we map to a dispatch period.
_PERIOD_ALIASES: dict[str, DispatchPeriod] = {
    "super_off_peak": DispatchPeriod.SUPER_OFF_PEAK,
    "superoffpeak": DispatchPeriod.SUPER_OFF_PEAK,
    "off_peak": DispatchPeriod.OFF_PEAK,
    "offpeak": DispatchPeriod.OFF_PEAK,
    "shoulder": DispatchPeriod.SHOULDER,
    "mid_peak": DispatchPeriod.SHOULDER,
    "partial_peak": DispatchPeriod.SHOULDER,
    "standard": DispatchPeriod.SHOULDER,
    "hold": DispatchPeriod.SHOULDER,
    "peak": DispatchPeriod.PEAK,
    "on_peak": DispatchPeriod.PEAK,
}


def period_from_name(name: str) -> DispatchPeriod:
    """The dispatch period of a tariff period name (``TouPeriod.name``), e.g. ``Super off-peak``.

    Raises ValueError for a name it does not know, rather than guessing a dispatch.
    """
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    try:
        return _PERIOD_ALIASES[key]
    except KeyError:
        raise ValueError(
            f"tariff period {name!r} has no dispatch period; use one of "
            f"{sorted({p.value for p in DispatchPeriod})} or an alias {sorted(_PERIOD_ALIASES)}"
        ) from None


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConsumerConfig(_Config):
    """One consumer of energy at a site."""

    name: Identifier
    """Also the device id that island mode sheds and restores."""
    kind: ConsumerKind
    priority: Annotated[int, Field(ge=0)]
    """Lower is served first; ties are broken by name, so the order is deterministic."""
    requested_kw: NonNegativeKw = 0.0
    """Demand when an interval gives none for this consumer. Ignored for battery_charging
    (the battery's headroom decides) and export (the export limit decides). [kW]"""
    critical: bool = False
    """Kept powered in island mode; non-critical consumers are shed when the grid fails."""
    grid_allowed: bool = True
    """May draw grid energy at all (battery_charging: may charge from the grid)."""
    max_grid_price_per_kwh: float | None = None
    """Draw grid energy only while the import price is at or below this; None: any price.
    Required for opportunistic consumers that may use the grid. [currency/kWh]"""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (
            self.kind is ConsumerKind.OPPORTUNISTIC
            and self.grid_allowed
            and self.max_grid_price_per_kwh is None
        ):
            raise ValueError(
                f"consumer {self.name}: opportunistic consumers run on surplus solar or cheap "
                "grid energy; set max_grid_price_per_kwh or grid_allowed=false"
            )
        if self.kind is ConsumerKind.EXPORT and self.grid_allowed:
            # Exporting grid energy back to the grid is meaningless; make the config say so.
            raise ValueError(f"consumer {self.name}: export consumers need grid_allowed=false")
        return self


def default_consumers() -> list[ConsumerConfig]:
    """The issue's default priority order: fleet, facility, battery, opportunistic, export."""
    return [
        ConsumerConfig(name="fleet", kind=ConsumerKind.FLEET, priority=10),
        ConsumerConfig(name="facility", kind=ConsumerKind.FACILITY, priority=20, critical=True),
        ConsumerConfig(name="battery", kind=ConsumerKind.BATTERY_CHARGING, priority=30),
        ConsumerConfig(
            name="opportunistic",
            kind=ConsumerKind.OPPORTUNISTIC,
            priority=40,
            grid_allowed=False,
        ),
        ConsumerConfig(name="export", kind=ConsumerKind.EXPORT, priority=50, grid_allowed=False),
    ]


class StorageConfig(_Config):
    """The site battery as allocation sees it (one aggregate battery per site)."""

    capacity_kwh: PositiveFloat
    max_charge_kw: PositiveFloat
    max_discharge_kw: PositiveFloat
    round_trip_efficiency: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    """AC to AC; split evenly (square root) between charge and discharge, as in arbitrage."""
    soc_min_pct: Pct = 10.0
    soc_max_pct: Pct = 95.0
    reserve_pct: Pct = 20.0
    """Kept for backup power: allocation never discharges below it (island mode may)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.soc_min_pct < self.soc_max_pct:
            raise ValueError(
                f"battery: soc_min_pct ({self.soc_min_pct}) must be below "
                f"soc_max_pct ({self.soc_max_pct})"
            )
        if not self.reserve_pct <= self.soc_max_pct:
            raise ValueError(
                f"battery: reserve_pct ({self.reserve_pct}) must not exceed "
                f"soc_max_pct ({self.soc_max_pct})"
            )
        return self

    @property
    def floor_pct(self) -> float:
        """Lowest state of charge allocation discharges to: the reserve or soc_min. [%]"""
        return max(self.soc_min_pct, self.reserve_pct)

    @property
    def one_way_efficiency(self) -> float:
        return math.sqrt(self.round_trip_efficiency)

    @classmethod
    def from_battery(cls, battery: BatteryConfig) -> StorageConfig:
        """The storage limits of a configured battery (``[[sites.batteries]]``)."""
        return cls(
            capacity_kwh=battery.capacity_kwh,
            max_charge_kw=battery.max_charge_kw,
            max_discharge_kw=battery.max_discharge_kw,
            round_trip_efficiency=battery.round_trip_efficiency,
            soc_min_pct=battery.soc_min_pct,
            soc_max_pct=battery.soc_max_pct,
            reserve_pct=battery.reserve_pct,
        )


class SiteLimits(_Config):
    """Limits of the grid connection and the fleet."""

    max_grid_import_kw: NonNegativeKw
    """Contracted capacity or main breaker: never exceeded. [kW]"""
    max_export_kw: NonNegativeKw
    """Export limit of the connection agreement (0 for a zero-export site). [kW]"""
    fleet_min_soc_pct: Pct = 0.0
    """Below this fleet state of charge, fleet charging jumps the queue and ignores its
    price limit: vehicles must be able to leave. 0 disables it. [%]"""


class TouDispatchConfig(_Config):
    """How time-of-use periods drive the battery."""

    grid_charge_targets_pct: dict[DispatchPeriod, Pct] = Field(
        default_factory=lambda: {
            DispatchPeriod.SUPER_OFF_PEAK: 90.0,
            # Off-peak is dearer and often sunny: top up only partly, leaving room for solar.
            DispatchPeriod.OFF_PEAK: 60.0,
        }
    )
    """Periods in which the battery charges from the grid, and up to which state of charge."""
    discharge_periods: frozenset[DispatchPeriod] = frozenset({DispatchPeriod.PEAK})
    """Periods in which the battery discharges to serve loads (down to the reserve)."""
    battery_export_min_price_per_kwh: float | None = None
    """In a discharge period the battery also exports, once the site's loads are served,
    when the export price is at least this. Set it above the charge price divided by the
    round-trip efficiency so that an export is a profit. None: never export stored
    energy. [currency/kWh]"""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        both = sorted(set(self.grid_charge_targets_pct) & self.discharge_periods)
        if both:
            raise ValueError(
                f"dispatch: periods {both} are in both grid_charge_targets_pct and "
                "discharge_periods; a period either charges or discharges"
            )
        return self


class AllocationConfig(_Config):
    """Everything allocation needs to know about one site."""

    site: Identifier
    limits: SiteLimits
    battery: StorageConfig | None = None
    consumers: list[ConsumerConfig] = Field(default_factory=default_consumers)
    dispatch: TouDispatchConfig = TouDispatchConfig()
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [c.name for c in self.consumers]
        duplicates = repeated(names)
        if duplicates:
            raise ValueError(f"site {self.site}: duplicate consumers {duplicates}")
        for kind in (ConsumerKind.BATTERY_CHARGING, ConsumerKind.EXPORT):
            found = [c.name for c in self.consumers if c.kind is kind]
            if len(found) > 1:
                # One battery and one grid connection per site: two would split one flow.
                raise ValueError(f"site {self.site}: more than one {kind.value} consumer {found}")
        if self.battery is not None:
            for period, target in self.dispatch.grid_charge_targets_pct.items():
                if target > self.battery.soc_max_pct:
                    raise ValueError(
                        f"site {self.site}: dispatch.grid_charge_targets_pct[{period.value}] "
                        f"({target}) exceeds battery.soc_max_pct ({self.battery.soc_max_pct})"
                    )
        return self


# --- one interval ------------------------------------------------------------------------


@dataclass(frozen=True)
class IntervalInputs:
    """What is known at the start of one interval."""

    start: datetime
    duration_h: float
    """Length of the interval. [h]"""
    solar_kw: float
    """Expected (or measured) solar generation, averaged over the interval. [kW]"""
    price_per_kwh: float
    """Import price. [currency/kWh]"""
    export_price_per_kwh: float
    """Feed-in price; negative means exporting costs money. [currency/kWh]"""
    tou_period: DispatchPeriod
    battery_soc_pct: float | None = None
    """State of charge at the start of the interval; None with no battery. [%]"""
    fleet_soc_pct: float | None = None
    """Fleet state of charge (e.g. the lowest plugged-in vehicle); None: unknown. [%]"""
    requests_kw: Mapping[str, float] = field(default_factory=dict)
    """Demand per consumer name; a consumer not listed requests its configured
    ``requested_kw``. [kW]"""


@dataclass(frozen=True)
class Dispatch:
    """An allocation plan and what the plan alone does not say."""

    plan: AllocationPlan
    battery_charge_kw: float
    """From solar and grid, AC side. [kW]"""
    battery_discharge_kw: float
    """To loads and export, AC side. [kW]"""
    battery_soc_end_pct: float | None
    """State of charge at the end of the interval if the plan is followed. [%]"""
    grid_import_kw: float
    export_kw: float
    curtailed_kw: float
    """Solar nobody could take. [kW]"""
    unserved_kw: dict[str, float]
    """Demand of loads (fleet, facility, opportunistic) that was not met, by consumer. [kW]"""
    binding: tuple[str, ...]
    """Limits that constrained the plan, e.g. ``max_grid_import_kw``, ``reserve_pct``."""


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _validate(interval: IntervalInputs, config: AllocationConfig) -> None:
    if not (_finite("duration_h", interval.duration_h) > 0):
        raise ValueError(f"duration_h must be positive, got {interval.duration_h}")
    if _finite("solar_kw", interval.solar_kw) < 0:
        raise ValueError(f"solar_kw must be >= 0, got {interval.solar_kw}")
    _finite("price_per_kwh", interval.price_per_kwh)
    _finite("export_price_per_kwh", interval.export_price_per_kwh)
    if config.battery is not None and interval.battery_soc_pct is None:
        raise ValueError(f"site {config.site} has a battery: battery_soc_pct is required")
    for name, soc in (
        ("battery_soc_pct", interval.battery_soc_pct),
        ("fleet_soc_pct", interval.fleet_soc_pct),
    ):
        if soc is not None and not 0.0 <= _finite(name, soc) <= 100.0:
            raise ValueError(f"{name} must be in [0, 100], got {soc}")
    known = {c.name for c in config.consumers}
    for name, kw in interval.requests_kw.items():
        if name not in known:
            raise ValueError(f"requests_kw: unknown consumer {name!r}; configured: {sorted(known)}")
        if _finite(f"requests_kw[{name}]", kw) < 0:
            raise ValueError(f"requests_kw[{name}] must be >= 0, got {kw}")


@dataclass
class _Pools:
    """What is left of each source while consumers are served, in priority order. [kW]"""

    solar_kw: float
    battery_kw: float
    """Discharge still available (0 outside discharge periods or at the reserve)."""
    grid_kw: float
    grid_charge_kw: float
    """Grid charging still allowed by the period's target."""
    charge_kw: float
    """Charging still allowed by soc_max and max_charge_kw."""
    charged_kw: float = 0.0
    discharged_kw: float = 0.0
    imported_kw: float = 0.0
    battery_short: bool = False
    """A consumer allowed to use the battery still wanted energy once it was used up."""


def dispatch(interval: IntervalInputs, config: AllocationConfig) -> Dispatch:
    """Allocate one interval: serve consumers in priority order, each in merit order.

    See the module docstring for the merit order and the rules per consumer kind.
    Pure: the same inputs always give the same plan (and the same ``plan_id``).
    """
    _validate(interval, config)
    limits = config.limits
    battery = config.battery
    dt_h = interval.duration_h
    binding: set[str] = set()

    discharge_cap_kw = charge_cap_kw = grid_charge_cap_kw = 0.0
    soc_pct = interval.battery_soc_pct
    if battery is not None and soc_pct is not None:
        eta = battery.one_way_efficiency
        above_floor_kwh = max(0.0, soc_pct - battery.floor_pct) / 100.0 * battery.capacity_kwh
        headroom_kwh = max(0.0, battery.soc_max_pct - soc_pct) / 100.0 * battery.capacity_kwh
        if interval.tou_period in config.dispatch.discharge_periods:
            discharge_cap_kw = min(battery.max_discharge_kw, above_floor_kwh * eta / dt_h)
        charge_cap_kw = min(battery.max_charge_kw, headroom_kwh / (eta * dt_h))
        target = config.dispatch.grid_charge_targets_pct.get(interval.tou_period)
        if target is not None:
            to_target_kwh = max(0.0, target - soc_pct) / 100.0 * battery.capacity_kwh
            grid_charge_cap_kw = min(charge_cap_kw, to_target_kwh / (eta * dt_h))

    pools = _Pools(
        solar_kw=interval.solar_kw,
        battery_kw=discharge_cap_kw,
        grid_kw=limits.max_grid_import_kw,
        grid_charge_kw=grid_charge_cap_kw,
        charge_kw=charge_cap_kw,
    )
    fleet_short = (
        interval.fleet_soc_pct is not None and interval.fleet_soc_pct < limits.fleet_min_soc_pct
    )

    def served_priority(consumer: ConsumerConfig) -> int:
        return -1 if fleet_short and consumer.kind is ConsumerKind.FLEET else consumer.priority

    order = sorted(config.consumers, key=lambda c: (served_priority(c), c.name))
    allocations: list[Allocation] = []
    unserved: dict[str, float] = {}
    export_kw = 0.0
    for consumer in order:
        requested_kw, flows = _serve(consumer, interval, config, pools, fleet_short, binding)
        allocated_kw = sum(flows.values())
        allocations.append(
            Allocation(
                consumer=consumer.name,
                priority=served_priority(consumer),
                requested_kw=requested_kw,
                allocated_kw=allocated_kw,
                sources=[SourceFlow(source=s, power_kw=kw) for s, kw in flows.items()],
            )
        )
        if consumer.kind is ConsumerKind.EXPORT:
            export_kw += allocated_kw
        elif consumer.kind is not ConsumerKind.BATTERY_CHARGING:
            short_kw = requested_kw - allocated_kw
            if short_kw > EPSILON_KW:
                unserved[consumer.name] = short_kw
    if fleet_short:
        binding.add("fleet_min_soc_pct")
    battery_exhausted = (
        battery is not None
        and interval.tou_period in config.dispatch.discharge_periods
        and pools.battery_short
    )
    if battery is not None and battery_exhausted:
        # The battery gave all it could while someone still needed energy: say why.
        if discharge_cap_kw == battery.max_discharge_kw:
            binding.add("max_discharge_kw")
        else:
            binding.add(
                "reserve_pct" if battery.reserve_pct >= battery.soc_min_pct else "soc_min_pct"
            )

    solar_used_kw = interval.solar_kw - pools.solar_kw
    curtailed_kw = pools.solar_kw
    grid_cost = pools.imported_kw * dt_h * interval.price_per_kwh
    export_revenue = export_kw * dt_h * interval.export_price_per_kwh
    net_cost = grid_cost - export_revenue
    baseline = baseline_net_cost(interval, config, allocations)

    soc_end_pct: float | None = None
    if battery is not None and soc_pct is not None:
        eta = battery.one_way_efficiency
        delta_kwh = (pools.charged_kw * eta - pools.discharged_kw / eta) * dt_h
        soc_end_pct = min(100.0, max(0.0, soc_pct + delta_kwh / battery.capacity_kwh * 100.0))

    end = interval.start + timedelta(hours=dt_h)
    plan = AllocationPlan(
        plan_id=stable_id("alloc", config.site, interval.start.isoformat()),
        site=config.site,
        start=interval.start,
        end=end,
        sources=[
            SourceFlow(source="solar", power_kw=solar_used_kw),
            SourceFlow(source="battery", power_kw=pools.discharged_kw),
            SourceFlow(source="grid", power_kw=pools.imported_kw),
        ],
        allocations=allocations,
        currency=config.currency,
        grid_cost=grid_cost,
        export_revenue=export_revenue,
        net_cost=net_cost,
        baseline_net_cost=baseline,
        saving=baseline - net_cost,
    )
    return Dispatch(
        plan=plan,
        battery_charge_kw=pools.charged_kw,
        battery_discharge_kw=pools.discharged_kw,
        battery_soc_end_pct=soc_end_pct,
        grid_import_kw=pools.imported_kw,
        export_kw=export_kw,
        curtailed_kw=curtailed_kw,
        unserved_kw=unserved,
        binding=tuple(sorted(binding)),
    )


def allocate(interval: IntervalInputs, config: AllocationConfig) -> AllocationPlan:
    """The :class:`AllocationPlan` of one interval (see :func:`dispatch` for the details)."""
    return dispatch(interval, config).plan


def _serve(
    consumer: ConsumerConfig,
    interval: IntervalInputs,
    config: AllocationConfig,
    pools: _Pools,
    fleet_short: bool,
    binding: set[str],
) -> tuple[float, dict[str, float]]:
    """Serve one consumer from the pools in merit order; return (requested_kw, flows by source)."""
    kind = consumer.kind
    flows: dict[str, float] = {}

    def take(source: str, available_kw: float, wanted_kw: float) -> float:
        kw = max(0.0, min(available_kw, wanted_kw))
        if kw > EPSILON_KW:
            flows[source] = flows.get(source, 0.0) + kw
            return kw
        return 0.0

    if kind is ConsumerKind.BATTERY_CHARGING:
        # No simultaneous charge and discharge: a battery that already discharged this
        # interval (an earlier consumer at peak) wants nothing.
        requested_kw = 0.0 if pools.discharged_kw > 0 else pools.charge_kw
        remaining = requested_kw
        kw = take("solar", pools.solar_kw, remaining)
        pools.solar_kw -= kw
        remaining -= kw
        if consumer.grid_allowed:
            # The target caps the stored total: solar charged this interval counts toward it.
            grid_room_kw = max(0.0, pools.grid_charge_kw - flows.get("solar", 0.0))
            kw = take("grid", min(pools.grid_kw, grid_room_kw), remaining)
            if kw < min(grid_room_kw, remaining) - EPSILON_KW:
                binding.add("max_grid_import_kw")
            pools.grid_kw -= kw
            pools.imported_kw += kw
            pools.grid_charge_kw -= kw
        pools.charged_kw += sum(flows.values())
        pools.charge_kw -= sum(flows.values())
        if config.battery is not None and requested_kw >= config.battery.max_charge_kw:
            binding.add("max_charge_kw")
        return requested_kw, flows

    if kind is ConsumerKind.EXPORT:
        # A negative export price means paying to export: curtail instead.
        limit_kw = config.limits.max_export_kw if interval.export_price_per_kwh >= 0 else 0.0
        requested_kw = limit_kw
        kw = take("solar", pools.solar_kw, limit_kw)
        pools.solar_kw -= kw
        remaining = limit_kw - kw
        min_price = config.dispatch.battery_export_min_price_per_kwh
        if (
            min_price is not None
            and interval.export_price_per_kwh >= min_price
            and pools.charged_kw == 0
            # Never export stored energy while importing: that is buying to sell.
            and pools.imported_kw == 0
        ):
            kw = take("battery", pools.battery_kw, remaining)
            pools.battery_kw -= kw
            pools.discharged_kw += kw
            remaining -= kw
            pools.battery_short |= remaining > EPSILON_KW
        if pools.solar_kw > EPSILON_KW and remaining <= EPSILON_KW and limit_kw > 0:
            binding.add("max_export_kw")
        return requested_kw, flows

    requested_kw = interval.requests_kw.get(consumer.name, consumer.requested_kw)
    remaining = requested_kw
    kw = take("solar", pools.solar_kw, remaining)
    pools.solar_kw -= kw
    remaining -= kw
    if kind in (ConsumerKind.FLEET, ConsumerKind.FACILITY) and pools.charged_kw == 0:
        kw = take("battery", pools.battery_kw, remaining)
        pools.battery_kw -= kw
        pools.discharged_kw += kw
        remaining -= kw
        pools.battery_short |= remaining > EPSILON_KW
    if _may_use_grid(consumer, interval.price_per_kwh, fleet_short):
        kw = take("grid", pools.grid_kw, remaining)
        pools.grid_kw -= kw
        pools.imported_kw += kw
        remaining -= kw
        if remaining > EPSILON_KW:
            binding.add("max_grid_import_kw")
    return requested_kw, flows


def _may_use_grid(consumer: ConsumerConfig, price_per_kwh: float, fleet_short: bool) -> bool:
    if not consumer.grid_allowed:
        return False
    if consumer.kind is ConsumerKind.FLEET and fleet_short:
        return True  # the minimum state of charge outranks the price limit
    limit = consumer.max_grid_price_per_kwh
    return limit is None or price_per_kwh <= limit


def baseline_net_cost(
    interval: IntervalInputs, config: AllocationConfig, allocations: Iterable[Allocation]
) -> float:
    """Net cost of serving the same loads with no optimisation. [currency]

    The baseline is what the site would pay for the *same delivered load* (the
    ``allocated_kw`` of every fleet, facility and opportunistic consumer in the
    plan) with no controller at all:

    * no battery dispatch (the battery neither charges nor discharges);
    * solar serves the loads first - every inverter does that by itself - and
      the surplus is exported up to ``max_export_kw`` when the export price is not
      negative, the rest curtailed;
    * the grid covers whatever solar does not, at the import price. The import
      limit is not applied: the baseline is an accounting counterfactual, not a
      plan, and it serves exactly the load the plan served so that the saving
      measures dispatch, not service level.

    ``saving = baseline_net_cost - net_cost`` is therefore what battery dispatch
    and the priority order earned in this interval. It can be negative in a single
    interval (charging from the grid at night, or storing solar instead of
    exporting it) and is recovered at peak: judge it over a day.
    """
    load_kw = sum(
        a.allocated_kw
        for a, c in _with_consumers(allocations, config)
        if c.kind not in (ConsumerKind.BATTERY_CHARGING, ConsumerKind.EXPORT)
    )
    solar_to_load_kw = min(interval.solar_kw, load_kw)
    import_kw = load_kw - solar_to_load_kw
    export_kw = 0.0
    if interval.export_price_per_kwh >= 0:
        export_kw = min(interval.solar_kw - solar_to_load_kw, config.limits.max_export_kw)
    dt_h = interval.duration_h
    return import_kw * dt_h * interval.price_per_kwh - export_kw * dt_h * (
        interval.export_price_per_kwh
    )


def _with_consumers(
    allocations: Iterable[Allocation], config: AllocationConfig
) -> list[tuple[Allocation, ConsumerConfig]]:
    by_name = {c.name: c for c in config.consumers}
    return [(a, by_name[a.consumer]) for a in allocations]


def dispatch_series(
    intervals: Iterable[IntervalInputs], config: AllocationConfig, initial_soc_pct: float
) -> list[Dispatch]:
    """Allocate consecutive intervals, carrying the battery's state of charge forward.

    Each interval starts at the state of charge the previous plan ends with (its
    own ``battery_soc_pct`` is ignored): what a backtest of the plans would see if
    the battery followed them exactly.
    """
    soc_pct = initial_soc_pct
    out: list[Dispatch] = []
    for interval in intervals:
        result = dispatch(replace(interval, battery_soc_pct=soc_pct), config)
        out.append(result)
        if result.battery_soc_end_pct is not None:
            soc_pct = result.battery_soc_end_pct
    return out


# --- the stream's adapter: telemetry of one price interval -> IntervalInputs --------------
#
# The agent plans each price interval once it is over, from what was measured in it
# (a retrospective plan: "who should have got what"). Readings are folded into
# 5-minute event-time buckets as they arrive; when the first reading at or after
# an interval's end has arrived and the interval's price is known, the buckets
# inside it become the interval's inputs:
#
# * solar_kw: mean power of each solar device over its readings, summed over devices;
# * facility demand (the first ``facility`` consumer): ``load_from = "meter"`` (default)
#   derives the site load as meter + solar + battery + generator - ev, the site's
#   balance at the connection point; ``"home"`` takes the mean of ``home`` readings;
# * fleet demand (the first ``fleet`` consumer): mean ``ev`` charging power (>= 0),
#   and fleet_soc_pct the lowest state of charge of the vehicles plugged in at the end;
# * battery_soc_pct: the first battery reading of the interval (the state at its start;
#   mean over battery devices), else the last one seen before;
# * tou_period: from ``tou_periods``, time-of-day windows in ``timezone``;
# * price: the site's price tick; export at the fixed ``export_price_per_kwh``.
#
# Buckets are lossless for intervals that start on a 5-minute boundary (5, 15, 30 and
# 60-minute markets all do). Readings arriving after their interval was planned are
# counted as late and ignored; telemetry of a site arrives in event-time order on one
# partition, so whatever order prices arrive in, the plans are the same.

INTERVAL_BUCKET_MS = 5 * 60 * 1000
# Prices and planned intervals older than this behind the newest reading are pruned.
INTERVAL_HORIZON_MS = 48 * 3600 * 1000
# Buckets wait this long for their price, as arbitrage's unpriced readings do: a replay
# at full speed runs days ahead of the price fan-out, and plans must not depend on that.
BUCKET_HORIZON_MS = 31 * 24 * 3600 * 1000


class TouWindow(_Config):
    """From ``start`` (local time of day) until the next window's start, this period applies."""

    start: time
    period: DispatchPeriod

    @field_validator("period", mode="before")
    @classmethod
    def _alias(cls, value: object) -> object:
        return period_from_name(value) if isinstance(value, str) else value


class AllocationSettings(AllocationConfig):
    """``[sites.allocation]``: :class:`AllocationConfig` (``site`` is the site's id) plus
    how the stream turns telemetry into :class:`IntervalInputs`."""

    tou_periods: list[TouWindow] = Field(
        default_factory=lambda: [TouWindow(start=time(0), period=DispatchPeriod.SHOULDER)],
        min_length=1,
    )
    """Time-of-use windows of a day; the default (all day shoulder) never moves the battery."""
    timezone: str = "UTC"
    """IANA zone of the ``tou_periods`` times (tariffs follow local time, DST included)."""
    export_price_per_kwh: float = 0.0
    """Feed-in price. [currency/kWh]"""
    load_from: Literal["meter", "home"] = "meter"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        time_zone(value)
        return value

    def tou_period_at(self, instant: datetime) -> DispatchPeriod:
        """The period in force at ``instant`` (local time of day in ``timezone``)."""
        local = instant.astimezone(time_zone(self.timezone)).time().replace(tzinfo=None)
        windows = sorted(self.tou_periods, key=lambda w: w.start)
        current = windows[-1]  # before the first start of the day, yesterday's last goes on
        for window in windows:
            if window.start <= local:
                current = window
        return current.period

    def consumer_of(self, kind: ConsumerKind) -> str | None:
        return next((c.name for c in self.consumers if c.kind is kind), None)


def allocation_settings(site: SiteConfig) -> AllocationSettings | None:
    """Validate a site's ``allocation`` section (None without one); raises SettingsError."""
    if site.allocation is None:
        return None
    where = f"sites[{site.id}].allocation"
    data = {**site.allocation, "site": site.id}
    if "battery" not in data and site.batteries:
        if len(site.batteries) > 1:
            raise SettingsError(
                f"invalid settings:\n  {where}.battery: required when the site has several "
                f"batteries ({[b.device for b in site.batteries]}); allocation sees one"
            )
        data["battery"] = StorageConfig.from_battery(site.batteries[0]).model_dump()
    return validate_section(AllocationSettings, where, data)


@dataclass
class Bucket:
    """Readings of one 5-minute event-time bucket, reduced to what an interval needs."""

    power: dict[str, list[float]] = field(default_factory=dict)
    """``kind/device`` -> [sum of power_kw, number of readings, ts_ms of the latest]."""
    first_soc: dict[str, list[float]] = field(default_factory=dict)
    """Battery device -> [ts_ms, soc_pct] of its earliest reading."""
    ev: dict[str, list[Any]] = field(default_factory=dict)
    """EV device -> [ts_ms, soc_pct or None, plugged_in] of its latest reading."""

    def to_json(self) -> dict[str, Any]:
        return {"p": self.power, "soc": self.first_soc, "ev": self.ev}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Bucket:
        return cls(data["p"], data["soc"], data["ev"])

    def add(self, reading: Reading, ts_ms: int) -> None:
        key = f"{reading.kind}/{reading.device}"
        power_kw = getattr(reading, "power_kw", None)
        if power_kw is not None:
            total = self.power.setdefault(key, [0.0, 0, -1])
            # A device's readings come in time order: one not after the latest is a
            # duplicate, or a replay of what this state has counted already (a worker
            # restarted after its state was written, before its input was committed).
            if len(total) > 2 and ts_ms <= total[2]:
                return
            total[0] += float(power_kw)
            total[1] += 1
            total[2:] = [ts_ms]
        if isinstance(reading, BatteryReading):
            first = self.first_soc.get(reading.device)
            if first is None or ts_ms < first[0]:
                self.first_soc[reading.device] = [ts_ms, reading.soc_pct]
        elif isinstance(reading, EvReading):
            last = self.ev.get(reading.device)
            if last is None or ts_ms >= last[0]:
                self.ev[reading.device] = [ts_ms, reading.soc_pct, reading.plugged_in]


def interval_inputs(
    buckets: Iterable[Bucket],
    start: datetime,
    duration_h: float,
    price_per_kwh: float,
    cfg: AllocationSettings,
    fallback_soc_pct: float | None = None,
) -> IntervalInputs:
    """The :class:`IntervalInputs` of one interval from its buckets (see the notes above)."""
    sums: dict[str, list[float]] = {}
    first_soc: dict[str, list[float]] = {}
    ev: dict[str, list[Any]] = {}
    for bucket in buckets:
        for key, (total, count, *_) in bucket.power.items():
            merged = sums.setdefault(key, [0.0, 0])
            merged[0] += total
            merged[1] += count
        for device, (ts_ms, soc) in bucket.first_soc.items():
            if device not in first_soc or ts_ms < first_soc[device][0]:
                first_soc[device] = [ts_ms, soc]
        for device, last in bucket.ev.items():
            if device not in ev or last[0] >= ev[device][0]:
                ev[device] = last

    def mean_kw(kind: str) -> float | None:
        means = [t / n for key, (t, n) in sums.items() if key.startswith(f"{kind}/") and n]
        return sum(means) if means else None

    solar_kw = max(0.0, mean_kw("solar") or 0.0)
    ev_kw = mean_kw("ev")
    requests: dict[str, float] = {}
    fleet = cfg.consumer_of(ConsumerKind.FLEET)
    if fleet is not None and ev_kw is not None:
        requests[fleet] = max(0.0, ev_kw)
    facility = cfg.consumer_of(ConsumerKind.FACILITY)
    if facility is not None:
        if cfg.load_from == "home":
            load_kw = mean_kw("home")
        else:
            meter_kw = mean_kw("meter")
            load_kw = None
            if meter_kw is not None:
                load_kw = (
                    meter_kw
                    + solar_kw
                    + (mean_kw("battery") or 0.0)
                    + (mean_kw("generator") or 0.0)
                    - max(0.0, ev_kw or 0.0)
                )
        if load_kw is not None:
            requests[facility] = max(0.0, load_kw)
    socs = [soc for _, soc in first_soc.values()]
    battery_soc_pct = sum(socs) / len(socs) if socs else fallback_soc_pct
    plugged_socs = [soc for _, soc, plugged in ev.values() if plugged and soc is not None]
    return IntervalInputs(
        start=start,
        duration_h=duration_h,
        solar_kw=solar_kw,
        price_per_kwh=price_per_kwh,
        export_price_per_kwh=cfg.export_price_per_kwh,
        tou_period=cfg.tou_period_at(start),
        battery_soc_pct=None if cfg.battery is None else battery_soc_pct,
        fleet_soc_pct=min(plugged_socs) if plugged_socs else None,
        requests_kw=requests,
    )


@dataclass
class AllocationState:
    """What the allocation of one site remembers between messages (a Faust table value)."""

    intervals: list[list[Any]] = field(default_factory=list)
    """Known price intervals [start_ms, end_ms, price_per_kwh], sorted by start."""
    buckets: dict[int, Bucket] = field(default_factory=dict)
    planned: list[int] = field(default_factory=list)
    """Starts of the intervals already planned (within the horizon)."""
    newest_ms: int | None = None
    last_soc_pct: float | None = None
    late: int = 0
    """Readings that arrived after their interval was planned (ignored)."""
    unplanned: int = 0
    """Intervals that could not be planned (no battery state of charge, bad inputs)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "intervals": self.intervals,
            "buckets": {str(k): b.to_json() for k, b in self.buckets.items()},
            "planned": self.planned,
            "newest": self.newest_ms,
            "soc": self.last_soc_pct,
            "late": self.late,
            "unplanned": self.unplanned,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> AllocationState:
        if not data:
            return cls()
        return cls(
            intervals=[list(i) for i in data["intervals"]],
            buckets={int(k): Bucket.from_json(b) for k, b in data["buckets"].items()},
            planned=list(data["planned"]),
            newest_ms=data["newest"],
            last_soc_pct=data["soc"],
            late=data["late"],
            unplanned=data["unplanned"],
        )


class SiteAllocation:
    """Plans each price interval of one site once it is over (plain Python, no Faust)."""

    def __init__(self, cfg: AllocationSettings) -> None:
        self.cfg = cfg

    def on_readings(self, state: AllocationState, readings: Iterable[Reading]) -> list[Dispatch]:
        planned = self._planned_intervals(state)
        for reading in readings:
            ts_ms = int(reading.ts.timestamp() * 1000)
            bucket_ms = ts_ms - ts_ms % INTERVAL_BUCKET_MS
            if bucket_ms not in state.buckets and any(s <= bucket_ms < e for s, e, _ in planned):
                state.late += 1
                continue
            state.buckets.setdefault(bucket_ms, Bucket()).add(reading, ts_ms)
            if isinstance(reading, BatteryReading):
                state.last_soc_pct = reading.soc_pct
            state.newest_ms = max(ts_ms, state.newest_ms or ts_ms)
        return self._ready(state)

    def on_price(
        self, state: AllocationState, start: datetime, end: datetime, price: float
    ) -> list[Dispatch]:
        start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
        state.intervals = [i for i in state.intervals if i[0] != start_ms]
        state.intervals.append([start_ms, end_ms, price])
        state.intervals.sort(key=lambda i: i[0])
        return self._ready(state)

    @staticmethod
    def _planned_intervals(state: AllocationState) -> list[tuple[int, int, float]]:
        planned = set(state.planned)
        return [(s, e, p) for s, e, p in state.intervals if s in planned]

    def _ready(self, state: AllocationState) -> list[Dispatch]:
        out: list[Dispatch] = []
        newest = state.newest_ms
        if newest is None:
            return out
        planned = set(state.planned)
        for start_ms, end_ms, price in state.intervals:
            if end_ms > newest or start_ms in planned:
                continue
            # Bucket keys are multiples of the bucket length: look up the interval's own
            # (12 for an hour), not every bucket a worker ahead of its prices holds.
            first_ms = -(-start_ms // INTERVAL_BUCKET_MS) * INTERVAL_BUCKET_MS
            inside = [k for k in range(first_ms, end_ms, INTERVAL_BUCKET_MS) if k in state.buckets]
            if not inside:
                continue  # nothing measured in it (yet): no plan
            buckets = [state.buckets.pop(k) for k in inside]
            state.planned.append(start_ms)
            planned.add(start_ms)
            start = datetime.fromtimestamp(start_ms / 1000, tz=UTC)
            try:
                out.append(
                    dispatch(
                        interval_inputs(
                            buckets,
                            start,
                            (end_ms - start_ms) / 3_600_000,
                            price,
                            self.cfg,
                            state.last_soc_pct,
                        ),
                        self.cfg,
                    )
                )
            except ValueError as error:  # e.g. a battery but never a state of charge
                state.unplanned += 1
                log.warning("site %s: interval %s not planned: %s", self.cfg.site, start, error)
        self._prune(state)
        return out

    @staticmethod
    def _prune(state: AllocationState) -> None:
        assert state.newest_ms is not None
        horizon = state.newest_ms - INTERVAL_HORIZON_MS
        state.intervals = [i for i in state.intervals if i[1] >= horizon]
        state.planned = [s for s in state.planned if s >= horizon]
        oldest = state.newest_ms - BUCKET_HORIZON_MS
        for k in [k for k in state.buckets if k < oldest]:
            del state.buckets[k]


# --- wiring -------------------------------------------------------------------------------


def register(app: faust.App, settings: Settings) -> None:
    """Wire allocation to Kafka: telemetry + site prices in, allocation plans out.

    Only sites with an ``allocation`` section get work; their sections are validated
    here, at start-up.
    """
    from pipeline.streams import site_agent, site_state

    engines = {
        site.id: SiteAllocation(cfg)
        for site in settings.sites
        if (cfg := allocation_settings(site)) is not None
    }
    if not engines:
        return
    states = site_state(
        app,
        settings,
        "allocation-state",
        "Per-site allocation state: known prices, readings of unplanned intervals.",
        AllocationState.from_json,
        AllocationState.to_json,
    )

    def on_telemetry(site: str, batch: TelemetryBatch) -> list[AllocationPlan]:
        state = states.get(site)
        results = engines[site].on_readings(state, batch.readings)
        states.put(site, state)
        return [result.plan for result in results]

    def on_price(site: str, tick: PriceTick) -> list[AllocationPlan]:
        state = states.get(site)
        results = engines[site].on_price(state, tick.start, tick.end, tick.price_per_kwh)
        states.put(site, state)
        return [result.plan for result in results]

    site_agent(
        app, settings, f"{__name__}.allocation", engines, telemetry=on_telemetry, prices=on_price
    )
