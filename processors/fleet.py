"""Fleet charging and vehicle-to-grid (V2G) on a site with a constrained connection.

Electric vehicles plug in with a state of charge, a target and a departure
time, each at a charger with its own power limit. The site's connection
allows ``max_import_kw`` for the building's base load and the chargers
together (optionally also a charging budget of the charger cluster). The plan
is time-stepped (15-minute steps by default) and gives every vehicle a power
per step: positive charges the car, negative is V2G discharge. Re-planning at
every step with measured states of charge (receding horizon) is the caller's
job; :func:`commands` turns the current step into setpoints.

Algorithm: a linear program solved with HiGHS (``scipy.optimize.linprog``),
in three lexicographic stages. With ``c[i,t]`` the grid-side charging power of
vehicle ``i`` in step ``t`` (only steps it is plugged in for), ``dt`` the step
length and ``cap_t = min(max_import_kw - base_load_t, ev_budget_kw)``:

1. **Serve, urgent first.** Maximise ``sum_i w_i * dt * sum_t c[i,t]`` subject to
   ``sum_i c[i,t] <= cap_t``, ``0 <= c[i,t] <= max_charge_kw_i`` and
   ``eta_i * dt * sum_t c[i,t] <= energy needed to reach the target``, with
   weights ``w`` strictly decreasing in urgency. The energies that can be
   delivered to the vehicles form a polymatroid (it is a flow network:
   source -> vehicle -> step -> sink), so by Edmonds' greedy theorem this
   optimum is unique in the delivered energies and equals the lexicographic
   greedy: the most urgent vehicle gets all it can, then the next one gets all
   it can without taking anything from the first, and so on. Consequences:
   if the fleet can be served jointly, every vehicle reaches its target (no
   starvation); if not, a vehicle misses only because more urgent ones need the
   capacity it would have used, never the other way round.
2. **Shave the peak** (only with ``peak_target_kw``). Keeping at least the
   energy of stage 1 in every vehicle, minimise the site's energy above the
   target: charging moves to other steps, and vehicles with slack discharge.
   A vehicle may discharge only if stage 1 brings it to its target and it
   starts at or above its trip minimum; its state of charge then stays in
   [trip minimum, max(now, target)] at every step and ends at or above its
   target, so discharging never costs a driver the next trip or the target.
   A bidirectional charger does one thing at a time:
   ``c/max_charge_kw + d/max_discharge_kw <= 1``. V2G is not used to lend
   energy from one car to another (it would pass the losses twice and wear the
   batteries for capacity the site does not lack in stage 1).
3. **Timing.** Keeping the energies of stage 1 and the peak of stage 2,
   minimise ``sum (t + 1) * w_i * c[i,t]``: everyone charges as early as the
   others allow (a car taken early has more), and where they compete the more
   urgent ones go first and finish first.

Urgency is least laxity first: laxity = time plugged in before departure
(within the horizon) - time needed at full charger power. A vehicle whose
target cannot be reached even alone (not enough time at its charger limit)
goes after all those that can: capacity given to it cannot make it reach its
target, but could make another vehicle miss. It still gets what is left, and
is reported with the reason and the shortfall.

Why an LP and not earliest-deadline-first or least-laxity-first allocation
per step: with a charger limit per car the shared capacity is not a single
processor but a multiprocessor-like resource, where EDF and LLF are not
optimal (Dhall's effect: two small urgent jobs take the capacity first and a
long one with a slightly later deadline misses although a schedule exists).
Feasibility there is a max-flow problem (Horn 1974), which stage 1 solves
exactly. LLF remains as the rule-based fallback if HiGHS fails (the plan then
says so); the stream never stops for a solver.

Conventions: a vehicle is planned only in steps it is plugged in for
completely (plugged in at or before the step's start, departing at or after
its end), so no power is ever planned for a car that has left. ``horizon_steps``
shorter than a session clips its deadline to the end of the horizon (it looks
more urgent, it is never silently left out). Powers are at the charger (grid
side): charging ``p`` kW for ``dt`` h stores ``charge_efficiency * p * dt``
kWh; discharging ``p`` kW delivers ``p * dt`` kWh and draws
``p * dt / discharge_efficiency`` from the battery.

Everything here is plain Python (no Faust import).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import sparse
from scipy.optimize import linprog

from pipeline.schemas import (
    Alert,
    Command,
    EvReading,
    Identifier,
    Severity,
    TelemetryBatch,
    UtcDatetime,
    stable_id,
)
from pipeline.settings import Settings, SiteConfig, repeated, time_zone, validate_section

if TYPE_CHECKING:
    import faust

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Pct = Annotated[float, Field(ge=0, le=100)]

# 1 Wh: far below what a charger meters, far above HiGHS' tolerances (~1e-7),
# so "reaches its target" does not flip on solver rounding.
ENERGY_TOL_KWH = 1e-3
# Below this a planned power is solver noise, not a setpoint.
MIN_POWER_KW = 1e-6
# Stage 2 charges a small price for V2G energy, so charging is moved before a
# car is discharged, and a car is never discharged where it shaves nothing.
V2G_COST_PER_KWH = 1e-3
# A plan longer than this is cut (a week of 5-minute steps): bounds the LP size.
MAX_STEPS = 7 * 24 * 12

Reason = Literal["charger_limit", "site_capacity"]
Method = Literal["lp", "llf_fallback"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class EvSession(_Model):
    """One vehicle plugged in (or booked to plug in) at a charger of the site."""

    vehicle_id: Identifier
    plugged_in_at: UtcDatetime
    departure: UtcDatetime
    capacity_kwh: PositiveFloat
    """Usable battery capacity. [kWh]"""
    soc_pct: Pct
    """State of charge now (at the plan's start, or at plug-in for a future session). [%]"""
    target_soc_pct: Pct
    """What the driver asked for by departure. [%]"""
    max_charge_kw: PositiveFloat
    """Charger limit (the lower of the charger's and the car's onboard limit). [kW]"""
    max_discharge_kw: NonNegativeFloat = 0.0
    """V2G limit; 0 = the charger or the car cannot discharge. [kW]"""
    charge_efficiency: Fraction = 0.92
    """Grid to battery; ~0.9-0.95 for AC charging of current cars."""
    discharge_efficiency: Fraction = 0.92
    """Battery to grid."""
    trip_min_soc_pct: Pct | None = None
    """V2G never takes the car below this (its next trip). None: the target itself,
    so a car only gives back what it holds above its target unless told otherwise. [%]"""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        who = f"ev session {self.vehicle_id}"
        if not self.departure > self.plugged_in_at:
            raise ValueError(
                f"{who}: departure ({self.departure.isoformat()}) must be after "
                f"plugged_in_at ({self.plugged_in_at.isoformat()})"
            )
        if self.trip_min_soc_pct is not None and self.trip_min_soc_pct > self.target_soc_pct:
            raise ValueError(
                f"{who}: trip_min_soc_pct ({self.trip_min_soc_pct}) must not exceed "
                f"target_soc_pct ({self.target_soc_pct})"
            )
        return self

    @property
    def trip_floor_pct(self) -> float:
        """The lowest state of charge V2G may leave. [%]"""
        return self.target_soc_pct if self.trip_min_soc_pct is None else self.trip_min_soc_pct


class FleetSiteLimits(_Model):
    """What the site's connection allows the fleet."""

    site: Identifier
    max_import_kw: PositiveFloat
    """Connection limit for base load plus charging. [kW]"""
    ev_budget_kw: PositiveFloat | None = None
    """Limit of the chargers together (cluster feeder, contract), per step. [kW]"""
    peak_target_kw: PositiveFloat | None = None
    """Shave the site's import down to this where vehicles have slack; None: no V2G. [kW]"""
    step_minutes: Annotated[int, Field(ge=1, le=240)] = 15
    """15 min: the settlement period of most European markets and demand charges."""
    horizon_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    """None: up to the last departure."""

    @model_validator(mode="after")
    def _target_below_limit(self) -> Self:
        if self.peak_target_kw is not None and self.peak_target_kw > self.max_import_kw:
            raise ValueError(
                f"fleet site {self.site}: peak_target_kw ({self.peak_target_kw}) must not "
                f"exceed max_import_kw ({self.max_import_kw})"
            )
        return self


@dataclass(frozen=True)
class VehiclePlan:
    """One vehicle's part of the plan, and whether it reaches its target."""

    vehicle_id: str
    session: EvSession
    priority: int
    """0 = most urgent."""
    laxity_h: float
    """Time plugged in before departure minus time needed at full charger power. [h]"""
    first_step: int
    stop_step: int
    """The vehicle is planned in steps ``first_step <= k < stop_step``."""
    power_kw: tuple[float, ...]
    """Per step: positive charging, negative V2G. [kW]"""
    soc_pct: tuple[float, ...]
    """At the end of each step. [%]"""
    energy_needed_kwh: float
    """Into the battery to reach the target from now (0 if already there). [kWh]"""
    energy_planned_kwh: float
    """Net into the battery over the plan (V2G discharge counted negative). [kWh]"""
    grid_energy_kwh: float
    """Net drawn from the site: charging minus V2G delivered. [kWh]"""
    v2g_energy_kwh: float
    """Delivered to the site by V2G. [kWh]"""
    final_soc_pct: float
    min_soc_pct: float
    """Lowest state of charge along the plan, now included. [%]"""
    reaches_target: bool
    finish_at: datetime | None
    """From then on the state of charge stays at or above the target; None if never."""
    reason: Reason | None = None
    reason_detail: str = ""
    shortfall_kwh: float = 0.0
    """Missing in the battery at departure. [kWh]"""

    def available(self, step: int) -> bool:
        return self.first_step <= step < self.stop_step


@dataclass(frozen=True)
class FleetSchedule:
    plan_id: str
    start: datetime
    step_minutes: int
    vehicles: tuple[VehiclePlan, ...]
    """In priority order, most urgent first."""
    base_load_kw: tuple[float, ...]
    charging_capacity_kw: tuple[float, ...]
    """What the chargers may draw together in each step. [kW]"""
    ev_power_kw: tuple[float, ...]
    """Net power of all vehicles per step. [kW]"""
    site_power_kw: tuple[float, ...]
    """Base load plus vehicles per step: the import at the connection. [kW]"""
    site_limit_kw: float
    peak_target_kw: float | None
    method: Method
    notes: tuple[str, ...] = field(default=())

    @property
    def n_steps(self) -> int:
        return len(self.base_load_kw)

    @property
    def step(self) -> timedelta:
        return timedelta(minutes=self.step_minutes)

    def step_start(self, step: int) -> datetime:
        return self.start + step * self.step

    def step_index(self, now: datetime) -> int | None:
        """The step that contains ``now``, or None outside the plan."""
        if now < self.start:
            return None
        index = (now - self.start) // self.step
        return index if index < self.n_steps else None

    def vehicle(self, vehicle_id: str) -> VehiclePlan:
        for plan in self.vehicles:
            if plan.vehicle_id == vehicle_id:
                return plan
        raise KeyError(vehicle_id)

    @property
    def infeasible(self) -> tuple[VehiclePlan, ...]:
        return tuple(v for v in self.vehicles if not v.reaches_target)


# --- preparation -------------------------------------------------------------------------


@dataclass
class _Vehicle:
    session: EvSession
    first: int
    stop: int
    soc0_kwh: float
    target_kwh: float
    floor_kwh: float
    need_kwh: float
    need_grid_kwh: float
    max_grid_kwh: float
    laxity_h: float
    alone_ok: bool
    rank: int = 0

    @property
    def steps(self) -> range:
        return range(self.first, self.stop)

    @property
    def eta_c(self) -> float:
        return self.session.charge_efficiency

    @property
    def eta_d(self) -> float:
        return self.session.discharge_efficiency


def _ceil_div(a: timedelta, b: timedelta) -> int:
    return -((-a) // b)


def _prepare(
    sessions: Sequence[EvSession], start: datetime, step: timedelta, n_steps: int
) -> list[_Vehicle]:
    dt_h = step / timedelta(hours=1)
    vehicles: list[_Vehicle] = []
    for s in sessions:
        first = max(0, _ceil_div(s.plugged_in_at - start, step))
        stop = max(first, min(n_steps, (s.departure - start) // step))
        cap = s.capacity_kwh
        soc0_kwh = s.soc_pct / 100.0 * cap
        target_kwh = s.target_soc_pct / 100.0 * cap
        need_kwh = max(0.0, target_kwh - soc0_kwh)
        need_grid_kwh = need_kwh / s.charge_efficiency
        max_grid_kwh = s.max_charge_kw * dt_h * (stop - first)
        vehicles.append(
            _Vehicle(
                session=s,
                first=first,
                stop=stop,
                soc0_kwh=soc0_kwh,
                target_kwh=target_kwh,
                floor_kwh=s.trip_floor_pct / 100.0 * cap,
                need_kwh=need_kwh,
                need_grid_kwh=need_grid_kwh,
                max_grid_kwh=max_grid_kwh,
                laxity_h=(stop - first) * dt_h - need_grid_kwh / s.max_charge_kw,
                alone_ok=need_kwh <= s.charge_efficiency * max_grid_kwh + ENERGY_TOL_KWH,
            )
        )
    order = sorted(
        vehicles,
        key=lambda v: (not v.alone_ok, v.laxity_h, v.session.departure, v.session.vehicle_id),
    )
    for rank, v in enumerate(order):
        v.rank = rank
    return order


# --- the linear programs -----------------------------------------------------------------


class _Lp:
    """A sparse LP under construction: variables with bounds, <= and = rows."""

    def __init__(self) -> None:
        self.bounds: list[tuple[float, float | None]] = []
        self.ub_rows: list[list[tuple[int, float]]] = []
        self.ub_rhs: list[float] = []
        self.eq_rows: list[list[tuple[int, float]]] = []
        self.eq_rhs: list[float] = []

    def var(self, low: float, high: float | None) -> int:
        self.bounds.append((low, high))
        return len(self.bounds) - 1

    def le(self, row: list[tuple[int, float]], rhs: float) -> None:
        if row:
            self.ub_rows.append(row)
            self.ub_rhs.append(rhs)

    def eq(self, row: list[tuple[int, float]], rhs: float) -> None:
        self.eq_rows.append(row)
        self.eq_rhs.append(rhs)

    def _matrix(self, rows: list[list[tuple[int, float]]]) -> sparse.csr_matrix | None:
        if not rows:
            return None
        r = [i for i, row in enumerate(rows) for _ in row]
        c = [j for row in rows for j, _ in row]
        v = [x for row in rows for _, x in row]
        return sparse.csr_matrix((v, (r, c)), shape=(len(rows), len(self.bounds)))

    def solve(self, cost: np.ndarray) -> np.ndarray | None:
        if not self.bounds:
            return np.zeros(0)  # no vehicle is plugged in for a whole step: nothing to decide
        a_ub = self._matrix(self.ub_rows)
        a_eq = self._matrix(self.eq_rows)
        result = linprog(
            cost,
            A_ub=a_ub,
            b_ub=np.array(self.ub_rhs) if a_ub is not None else None,
            A_eq=a_eq,
            b_eq=np.array(self.eq_rhs) if a_eq is not None else None,
            bounds=self.bounds,
            method="highs",
        )
        if result.status != 0 or result.x is None:
            return None
        return np.asarray(result.x, dtype=float)


@dataclass
class _Layout:
    lp: _Lp
    charge: dict[tuple[int, int], int]
    """(vehicle rank, step) -> variable."""
    discharge: dict[tuple[int, int], int]
    excess: dict[int, int]
    """step -> energy above the peak target (as power). [kW]"""


def _layout(
    vehicles: list[_Vehicle],
    capacity_kw: np.ndarray,
    base_kw: np.ndarray,
    dt_h: float,
    *,
    low_kwh: list[float] | None,
    v2g: set[int],
    peak_target_kw: float | None,
    excess_max_kwh: float | None,
) -> _Layout:
    """Variables and constraints shared by the three stages.

    ``low_kwh`` (stages 2 and 3): net energy each vehicle must at least gain;
    ``v2g``: ranks of vehicles that may discharge; ``excess_max_kwh`` (stage 3):
    the site's energy above the peak target that stage 2 achieved.
    """
    lp = _Lp()
    charge: dict[tuple[int, int], int] = {}
    discharge: dict[tuple[int, int], int] = {}
    excess: dict[int, int] = {}
    for v in vehicles:
        s = v.session
        net: list[tuple[int, float]] = []
        previous_soc: int | None = None
        for t in v.steps:
            c = lp.var(0.0, s.max_charge_kw)
            charge[v.rank, t] = c
            net.append((c, v.eta_c * dt_h))
            if v.rank not in v2g:
                continue
            d = lp.var(0.0, s.max_discharge_kw)
            discharge[v.rank, t] = d
            net.append((d, -dt_h / v.eta_d))
            # One converter: charging and discharging in one step only by turns.
            lp.le([(c, 1.0 / s.max_charge_kw), (d, 1.0 / s.max_discharge_kw)], 1.0)
            # Stored energy at the end of the step, kept in [trip floor, max(now, target)].
            e = lp.var(v.floor_kwh, max(v.soc0_kwh, v.target_kwh))
            row = [(e, 1.0), (c, -v.eta_c * dt_h), (d, dt_h / v.eta_d)]
            if previous_soc is None:
                lp.eq(row, v.soc0_kwh)
            else:
                lp.eq([*row, (previous_soc, -1.0)], 0.0)
            previous_soc = e
        # Never beyond the target at departure (nor beyond where it started).
        lp.le(net, v.need_kwh)
        if low_kwh is not None:
            lp.le([(j, -x) for j, x in net], -low_kwh[v.rank])
    n_steps = len(capacity_kw)
    by_step: list[list[int]] = [[] for _ in range(n_steps)]
    for (_, t), c in charge.items():
        by_step[t].append(c)
    for t, cs in enumerate(by_step):
        lp.le([(c, 1.0) for c in cs], float(capacity_kw[t]))
    if peak_target_kw is not None:
        ds_by_step: list[list[int]] = [[] for _ in range(n_steps)]
        for (_, t), d in discharge.items():
            ds_by_step[t].append(d)
        for t in range(n_steps):
            if not by_step[t] and not ds_by_step[t]:
                continue  # no vehicle can change this step's excess
            x = lp.var(0.0, None)
            excess[t] = x
            row = [(c, 1.0) for c in by_step[t]] + [(d, -1.0) for d in ds_by_step[t]]
            lp.le([*row, (x, -1.0)], peak_target_kw - float(base_kw[t]))
        if excess_max_kwh is not None:
            lp.le([(x, dt_h) for x in excess.values()], excess_max_kwh)
    return _Layout(lp, charge, discharge, excess)


def _extract(
    layout: _Layout, x: np.ndarray, n_vehicles: int, n_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    charge = np.zeros((n_vehicles, n_steps))
    discharge = np.zeros((n_vehicles, n_steps))
    for (rank, t), j in layout.charge.items():
        charge[rank, t] = x[j]
    for (rank, t), j in layout.discharge.items():
        discharge[rank, t] = x[j]
    return charge, discharge


def _solve(
    vehicles: list[_Vehicle],
    capacity_kw: np.ndarray,
    base_kw: np.ndarray,
    dt_h: float,
    peak_target_kw: float | None,
) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The three stages (module docstring); None if stage 1 fails."""
    n, n_steps = len(vehicles), len(capacity_kw)
    notes: list[str] = []
    weight = {v.rank: float(n - v.rank) for v in vehicles}  # strictly decreasing in urgency

    layout = _layout(
        vehicles,
        capacity_kw,
        base_kw,
        dt_h,
        low_kwh=None,
        v2g=set(),
        peak_target_kw=None,
        excess_max_kwh=None,
    )
    cost = np.zeros(len(layout.lp.bounds))
    for (rank, _), j in layout.charge.items():
        cost[j] = -weight[rank] * dt_h
    x = layout.lp.solve(cost)
    if x is None:
        return None
    charge, discharge = _extract(layout, x, n, n_steps)
    stored = np.array([v.eta_c * dt_h * charge[v.rank].sum() for v in vehicles])
    # What stage 1 stores is kept by the later stages (less the solver's tolerance).
    low_kwh = [0.0] * n
    for v in vehicles:
        low_kwh[v.rank] = max(0.0, float(stored[v.rank]) - 1e-6)
        if v.need_kwh <= 0.0:  # at or above target already: may give back down to it
            low_kwh[v.rank] = v.target_kwh - v.soc0_kwh

    v2g: set[int] = set()
    excess_max_kwh: float | None = None
    if peak_target_kw is not None:
        v2g = {
            v.rank
            for v in vehicles
            if v.session.max_discharge_kw > 0
            and v.soc0_kwh >= v.floor_kwh
            and stored[v.rank] >= v.need_kwh - ENERGY_TOL_KWH
        }
        layout = _layout(
            vehicles,
            capacity_kw,
            base_kw,
            dt_h,
            low_kwh=low_kwh,
            v2g=v2g,
            peak_target_kw=peak_target_kw,
            excess_max_kwh=None,
        )
        cost = np.zeros(len(layout.lp.bounds))
        for j in layout.excess.values():
            cost[j] = dt_h
        for j in layout.discharge.values():
            cost[j] = V2G_COST_PER_KWH * dt_h
        x = layout.lp.solve(cost)
        if x is None:
            notes.append("peak shaving LP failed: plan without V2G or charging shifts")
            return charge, discharge, notes
        charge, discharge = _extract(layout, x, n, n_steps)
        excess_kwh = sum(float(x[j]) * dt_h for j in layout.excess.values())
        excess_max_kwh = excess_kwh + 1e-6 + 1e-9 * excess_kwh

    layout = _layout(
        vehicles,
        capacity_kw,
        base_kw,
        dt_h,
        low_kwh=low_kwh,
        v2g=v2g,
        peak_target_kw=peak_target_kw,
        excess_max_kwh=excess_max_kwh,
    )
    cost = np.zeros(len(layout.lp.bounds))
    for (rank, t), j in layout.charge.items():
        cost[j] = dt_h * (t + 1) * weight[rank]
    # Above any timing gain: no discharge beyond what the peak needs.
    for j in layout.discharge.values():
        cost[j] = dt_h * (n_steps + 1) * (n + 1)
    x = layout.lp.solve(cost)
    if x is None:
        notes.append("timing LP failed: energies and peak are optimal, timing is not")
        return charge, discharge, notes
    charge, discharge = _extract(layout, x, n, n_steps)
    return charge, discharge, notes


def _least_laxity_first(
    vehicles: list[_Vehicle], capacity_kw: np.ndarray, dt_h: float
) -> tuple[np.ndarray, np.ndarray]:
    """The rule-based fallback: each step, least laxity first, at full charger power."""
    n_steps = len(capacity_kw)
    charge = np.zeros((len(vehicles), n_steps))
    remaining = {v.rank: v.need_grid_kwh for v in vehicles}
    for t in range(n_steps):
        present = [v for v in vehicles if v.first <= t < v.stop and remaining[v.rank] > 0]
        present.sort(
            key=lambda v: (
                not v.alone_ok,
                (v.stop - t) * dt_h - remaining[v.rank] / v.session.max_charge_kw,
                v.session.departure,
                v.session.vehicle_id,
            )
        )
        left_kw = float(capacity_kw[t])
        for v in present:
            power_kw = min(v.session.max_charge_kw, remaining[v.rank] / dt_h, left_kw)
            charge[v.rank, t] = power_kw
            remaining[v.rank] -= power_kw * dt_h
            left_kw -= power_kw
    return charge, np.zeros_like(charge)


# --- the plan ----------------------------------------------------------------------------


def schedule(
    sessions: Sequence[EvSession],
    site_limit_kw: float,
    start: datetime,
    step_minutes: int = 15,
    horizon_steps: int | None = None,
    site_base_load_kw: Sequence[float] | None = None,
    peak_target_kw: float | None = None,
    *,
    ev_budget_kw: float | None = None,
) -> FleetSchedule:
    """Plan every session's power per step from ``start``; see the module docstring.

    ``site_base_load_kw`` is the forecast of everything but the chargers, one
    value per step (None: 0). [kW]
    """
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    if not 1 <= step_minutes <= 240:
        raise ValueError(f"step_minutes must be in [1, 240], got {step_minutes}")
    if not (math.isfinite(site_limit_kw) and site_limit_kw > 0):
        raise ValueError(f"site_limit_kw must be positive and finite, got {site_limit_kw}")
    if ev_budget_kw is not None and not (math.isfinite(ev_budget_kw) and ev_budget_kw > 0):
        raise ValueError(f"ev_budget_kw must be positive and finite, got {ev_budget_kw}")
    if peak_target_kw is not None and not (math.isfinite(peak_target_kw) and peak_target_kw > 0):
        raise ValueError(f"peak_target_kw must be positive and finite, got {peak_target_kw}")
    ids = [s.vehicle_id for s in sessions]
    duplicates = repeated(ids)
    if duplicates:
        raise ValueError(f"duplicate vehicle_id in sessions: {duplicates}")
    step = timedelta(minutes=step_minutes)
    dt_h = step_minutes / 60.0
    if horizon_steps is None:
        last = max(((s.departure - start) // step for s in sessions), default=1)
        horizon_steps = max(1, min(MAX_STEPS, last))
    if not 1 <= horizon_steps <= MAX_STEPS:
        raise ValueError(f"horizon_steps must be in [1, {MAX_STEPS}], got {horizon_steps}")
    n_steps = horizon_steps
    if site_base_load_kw is None:
        base_kw = np.zeros(n_steps)
    else:
        if len(site_base_load_kw) != n_steps:
            raise ValueError(
                f"site_base_load_kw has {len(site_base_load_kw)} values but the horizon "
                f"has {n_steps} steps"
            )
        base_kw = np.array(site_base_load_kw, dtype=float)
        if not np.all(np.isfinite(base_kw)):
            raise ValueError("site_base_load_kw must be finite (no NaN or infinity)")
    headroom_kw = site_limit_kw - base_kw
    if ev_budget_kw is not None:
        headroom_kw = np.minimum(headroom_kw, ev_budget_kw)
    capacity_kw = np.maximum(0.0, headroom_kw)

    vehicles = _prepare(sessions, start, step, n_steps)
    notes: list[str] = []
    if n_steps < max(((s.departure - start) // step for s in sessions), default=0):
        notes.append(f"horizon of {n_steps} steps ends before some departures: deadlines clipped")
    method: Method = "lp"
    solved = _solve(vehicles, capacity_kw, base_kw, dt_h, peak_target_kw) if vehicles else None
    if solved is not None:
        charge, discharge, stage_notes = solved
        notes.extend(stage_notes)
    elif vehicles:
        method = "llf_fallback"
        notes.append("HiGHS failed: least-laxity-first rule, no V2G")
        charge, discharge = _least_laxity_first(vehicles, capacity_kw, dt_h)
    else:
        charge = discharge = np.zeros((0, n_steps))
    charge, discharge = _clean(vehicles, charge, discharge, capacity_kw)

    plans = tuple(
        _vehicle_plan(v, charge[v.rank], discharge[v.rank], start, step, dt_h) for v in vehicles
    )
    ev_kw = (charge - discharge).sum(axis=0) if vehicles else np.zeros(n_steps)
    plan_id = stable_id(
        "fleetplan",
        start.isoformat(),
        step_minutes,
        n_steps,
        site_limit_kw,
        ev_budget_kw,
        peak_target_kw,
        tuple(round(float(b), 6) for b in base_kw),
        tuple(s.model_dump_json() for s in sorted(sessions, key=lambda s: s.vehicle_id)),
    )
    return FleetSchedule(
        plan_id=plan_id,
        start=start,
        step_minutes=step_minutes,
        vehicles=plans,
        base_load_kw=tuple(float(b) for b in base_kw),
        charging_capacity_kw=tuple(float(c) for c in capacity_kw),
        ev_power_kw=tuple(float(p) for p in ev_kw),
        site_power_kw=tuple(float(b + p) for b, p in zip(base_kw, ev_kw, strict=True)),
        site_limit_kw=site_limit_kw,
        peak_target_kw=peak_target_kw,
        method=method,
        notes=tuple(notes),
    )


def plan_site(
    sessions: Sequence[EvSession],
    limits: FleetSiteLimits,
    start: datetime,
    site_base_load_kw: Sequence[float] | None = None,
) -> FleetSchedule:
    """:func:`schedule` with a site's configured limits."""
    return schedule(
        sessions,
        limits.max_import_kw,
        start,
        limits.step_minutes,
        limits.horizon_steps,
        site_base_load_kw,
        limits.peak_target_kw,
        ev_budget_kw=limits.ev_budget_kw,
    )


def _clean(
    vehicles: list[_Vehicle], charge: np.ndarray, discharge: np.ndarray, capacity_kw: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Remove solver noise: tiny powers, and the last 1e-9 over a limit."""
    charge = np.where(charge < MIN_POWER_KW, 0.0, charge)
    discharge = np.where(discharge < MIN_POWER_KW, 0.0, discharge)
    for v in vehicles:
        charge[v.rank] = np.minimum(charge[v.rank], v.session.max_charge_kw)
        discharge[v.rank] = np.minimum(discharge[v.rank], v.session.max_discharge_kw)
    if len(vehicles):
        total = charge.sum(axis=0)
        over = total > capacity_kw
        if np.any(over):
            scale = np.where(over, capacity_kw / np.where(total > 0, total, 1.0), 1.0)
            charge = charge * scale
    return charge, discharge


def _vehicle_plan(
    v: _Vehicle,
    charge: np.ndarray,
    discharge: np.ndarray,
    start: datetime,
    step: timedelta,
    dt_h: float,
) -> VehiclePlan:
    s = v.session
    stored_per_step = v.eta_c * dt_h * charge - dt_h / v.eta_d * discharge
    levels_kwh = v.soc0_kwh + np.concatenate(([0.0], np.cumsum(stored_per_step)))
    final_kwh = float(levels_kwh[-1])
    reaches = final_kwh >= v.target_kwh - ENERGY_TOL_KWH
    finish_at: datetime | None = None
    if reaches:
        below = np.nonzero(levels_kwh < v.target_kwh - ENERGY_TOL_KWH)[0]
        finish_at = start + (int(below[-1]) + 1 if len(below) else 0) * step
    reason: Reason | None = None
    detail = ""
    shortfall_kwh = 0.0
    if not reaches:
        shortfall_kwh = v.target_kwh - final_kwh
        hours = (v.stop - v.first) * dt_h
        if not v.alone_ok:
            reason = "charger_limit"
            detail = (
                f"needs {v.need_kwh:.2f} kWh but at most "
                f"{v.eta_c * v.max_grid_kwh:.2f} kWh fit in {hours:.2f} h at "
                f"{s.max_charge_kw:.2f} kW before departure"
            )
        else:
            reason = "site_capacity"
            detail = (
                f"reachable alone ({hours:.2f} h at {s.max_charge_kw:.2f} kW) but the site's "
                f"capacity goes to more urgent vehicles; short {shortfall_kwh:.2f} kWh"
            )
    capacity = s.capacity_kwh
    return VehiclePlan(
        vehicle_id=s.vehicle_id,
        session=s,
        priority=v.rank,
        laxity_h=v.laxity_h,
        first_step=v.first,
        stop_step=v.stop,
        power_kw=tuple(float(p) for p in charge - discharge),
        soc_pct=tuple(float(x) / capacity * 100.0 for x in levels_kwh[1:]),
        energy_needed_kwh=v.need_kwh,
        energy_planned_kwh=final_kwh - v.soc0_kwh,
        grid_energy_kwh=float((charge - discharge).sum() * dt_h),
        v2g_energy_kwh=float(discharge.sum() * dt_h),
        final_soc_pct=final_kwh / capacity * 100.0,
        min_soc_pct=float(levels_kwh.min()) / capacity * 100.0,
        reaches_target=reaches,
        finish_at=finish_at,
        reason=reason,
        reason_detail=detail,
        shortfall_kwh=shortfall_kwh,
    )


# --- messages ----------------------------------------------------------------------------


def commands(
    plan: FleetSchedule, site: str, now: datetime, *, dry_run: bool = True
) -> list[Command]:
    """The setpoints of the step containing ``now``, one per vehicle plugged in for it.

    A vehicle that should pause gets a 0 kW setpoint, so a charger never keeps
    running on an old one. Ids are deterministic: the same plan at the same
    step gives the same commands.
    """
    step = plan.step_index(now)
    if step is None:
        return []
    step_start = plan.step_start(step)
    valid_until = step_start + plan.step
    out: list[Command] = []
    n = len(plan.vehicles)
    for v in plan.vehicles:
        if not v.available(step):
            continue
        s = v.session
        setpoint_kw = round(v.power_kw[step], 3) + 0.0  # no "-0.0" in ids
        urgency = (
            f"urgency {v.priority + 1}/{n} (laxity {v.laxity_h:.2f} h, departs "
            f"{s.departure:%Y-%m-%dT%H:%MZ}, target {s.target_soc_pct:.0f}%)"
        )
        if setpoint_kw > 0:
            reason = f"charge {setpoint_kw:.2f} kW: {urgency}"
        elif setpoint_kw < 0:
            reason = (
                f"V2G discharge {-setpoint_kw:.2f} kW: peak shaving toward "
                f"{plan.peak_target_kw} kW site import; keeps soc >= "
                f"{s.trip_floor_pct:.0f}% and reaches target by departure"
            )
        elif v.energy_needed_kwh <= 0 or (v.finish_at is not None and v.finish_at <= step_start):
            reason = f"hold 0 kW: target {s.target_soc_pct:.0f}% reached"
        else:
            reason = f"hold 0 kW: capacity goes to more urgent vehicles; {urgency}"
        if not v.reaches_target:
            reason += f"; target unreachable ({v.reason}, short {v.shortfall_kwh:.2f} kWh)"
        out.append(
            Command(
                command_id=stable_id(
                    "cmd", site, s.vehicle_id, "set_power", step_start.isoformat(), setpoint_kw
                ),
                site=site,
                device=s.vehicle_id,
                action="set_power",
                setpoint_kw=setpoint_kw,
                reason=reason,
                issued_at=now,
                valid_until=valid_until,
                dry_run=dry_run,
                source_id=plan.plan_id,
            )
        )
    return out


def infeasible_alerts(plan: FleetSchedule, site: str) -> list[Alert]:
    """One ``ev_target_unreachable`` warning per vehicle that misses its target.

    The id is per session (vehicle, plug-in, departure, target), not per plan,
    so re-planning every step sends no duplicate webhook.
    """
    alerts: list[Alert] = []
    for v in plan.infeasible:
        s = v.session
        alerts.append(
            Alert(
                alert_id=stable_id(
                    "alert",
                    site,
                    s.vehicle_id,
                    "ev_target_unreachable",
                    s.plugged_in_at.isoformat(),
                    s.departure.isoformat(),
                    s.target_soc_pct,
                ),
                site=site,
                device=s.vehicle_id,
                alert_type="ev_target_unreachable",
                severity=Severity.WARNING,
                subject=f"{s.vehicle_id} will not reach {s.target_soc_pct:.0f}% by departure",
                message=(
                    f"{s.vehicle_id}: planned {v.final_soc_pct:.1f}% of "
                    f"{s.target_soc_pct:.1f}% by {s.departure.isoformat()} ({v.reason}: "
                    f"{v.reason_detail})"
                ),
                start=plan.start,
                observed=v.final_soc_pct,
                expected=s.target_soc_pct,
                details={
                    "reason": v.reason or "",
                    "shortfall_kwh": v.shortfall_kwh,
                    "departure": s.departure.isoformat(),
                    "priority": float(v.priority),
                    "plan_id": plan.plan_id,
                },
            )
        )
    return alerts


# --- the stream's adapter: configured vehicles + live ev readings -> sessions -------------
#
# A vehicle is configured once (``[[sites.fleet.vehicles]]``: capacity, target, charger
# limit, typical departure as a local time of day); its ``ev`` readings (device =
# ``vehicle_id``) say when it is plugged in and its state of charge. A session starts
# at the first plugged-in reading and ends at the first unplugged one; its departure is
# the next occurrence of the typical departure time after now (a car still plugged in
# after it leaves tomorrow). The site is re-planned at most once per ``step_minutes``
# of event time, at the first reading that finds the last plan a step old and some
# vehicle plugged in; each plan sends the setpoints of its first step and a warning
# per session that misses its target (once per session).


class VehicleSettings(_Model):
    """One vehicle of a site's fleet, as configured."""

    vehicle_id: Identifier
    """Also the ``device`` of its ev readings and of the commands to its charger."""
    capacity_kwh: PositiveFloat
    target_soc_pct: Pct
    max_charge_kw: PositiveFloat
    max_discharge_kw: NonNegativeFloat = 0.0
    departure: time
    """Typical departure, local time of day in the fleet's ``timezone``."""
    trip_min_soc_pct: Pct | None = None
    charge_efficiency: Fraction = 0.92
    discharge_efficiency: Fraction = 0.92

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.trip_min_soc_pct is not None and self.trip_min_soc_pct > self.target_soc_pct:
            raise ValueError(
                f"vehicle {self.vehicle_id}: trip_min_soc_pct ({self.trip_min_soc_pct}) must "
                f"not exceed target_soc_pct ({self.target_soc_pct})"
            )
        return self


class FleetSettings(FleetSiteLimits):
    """``[sites.fleet]``: :class:`FleetSiteLimits` (``site`` is the site's id) plus vehicles."""

    vehicles: list[VehicleSettings] = Field(min_length=1)
    timezone: str = "UTC"
    """IANA zone of the vehicles' departure times."""
    base_load_kw: NonNegativeFloat = 0.0
    """Flat forecast of the site's load besides the chargers. [kW]"""
    dry_run: bool = True

    @model_validator(mode="after")
    def _valid(self) -> Self:
        ids = [v.vehicle_id for v in self.vehicles]
        duplicates = repeated(ids)
        if duplicates:
            raise ValueError(f"duplicate vehicle_id {duplicates}")
        time_zone(self.timezone)
        return self

    def vehicle(self, vehicle_id: str) -> VehicleSettings | None:
        return next((v for v in self.vehicles if v.vehicle_id == vehicle_id), None)


def fleet_settings(site: SiteConfig) -> FleetSettings | None:
    """Validate a site's ``fleet`` section (None without one); raises SettingsError."""
    if site.fleet is None:
        return None
    return validate_section(
        FleetSettings, f"sites[{site.id}].fleet", {**site.fleet, "site": site.id}
    )


def next_departure(now: datetime, departure: time, zone: str) -> datetime:
    """The first occurrence of a local time of day strictly after ``now`` (UTC)."""
    tz = ZoneInfo(zone)
    local = now.astimezone(tz)
    for days in range(3):  # DST gaps can skip one day's occurrence at most
        day = local.date() + timedelta(days=days)
        candidate = datetime.combine(day, departure, tzinfo=tz).astimezone(UTC)
        if candidate > now:
            return candidate
    raise AssertionError("unreachable: a local time recurs within three days")


@dataclass
class FleetState:
    """What the fleet agent of one site remembers (a Faust table value)."""

    plugged_since: dict[str, str] = field(default_factory=dict)
    """Vehicle -> start of its current session (ISO), for vehicles plugged in."""
    soc_pct: dict[str, float] = field(default_factory=dict)
    """Vehicle -> latest known state of charge."""
    last_plan: str | None = None
    """Event time of the last plan (ISO)."""
    alerted: list[str] = field(default_factory=list)
    """Ids of the target-unreachable alerts already sent (one per session)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "plugged": self.plugged_since,
            "soc": self.soc_pct,
            "last_plan": self.last_plan,
            "alerted": self.alerted,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> FleetState:
        if not data:
            return cls()
        return cls(
            dict(data["plugged"]), dict(data["soc"]), data["last_plan"], list(data["alerted"])
        )


# Alert ids remembered per site: far more sessions than a depot has chargers.
MAX_ALERTED = 256


def sessions_at(cfg: FleetSettings, state: FleetState, now: datetime) -> list[EvSession]:
    """The sessions of the vehicles plugged in at ``now`` whose state of charge is known."""
    out: list[EvSession] = []
    for vehicle_id, since in sorted(state.plugged_since.items()):
        vehicle = cfg.vehicle(vehicle_id)
        soc = state.soc_pct.get(vehicle_id)
        if vehicle is None or soc is None:
            continue
        out.append(
            EvSession(
                vehicle_id=vehicle_id,
                plugged_in_at=datetime.fromisoformat(since),
                departure=next_departure(now, vehicle.departure, cfg.timezone),
                capacity_kwh=vehicle.capacity_kwh,
                soc_pct=soc,
                target_soc_pct=vehicle.target_soc_pct,
                max_charge_kw=vehicle.max_charge_kw,
                max_discharge_kw=vehicle.max_discharge_kw,
                charge_efficiency=vehicle.charge_efficiency,
                discharge_efficiency=vehicle.discharge_efficiency,
                trip_min_soc_pct=vehicle.trip_min_soc_pct,
            )
        )
    return out


class SiteFleet:
    """Re-plans a site's charging from its ev readings (plain Python, no Faust)."""

    def __init__(self, cfg: FleetSettings) -> None:
        self.cfg = cfg

    def on_readings(
        self, state: FleetState, readings: Iterable[EvReading]
    ) -> list[Command | Alert]:
        by_ts: dict[datetime, list[EvReading]] = {}
        for reading in readings:
            if self.cfg.vehicle(reading.device) is not None:
                by_ts.setdefault(reading.ts, []).append(reading)
        out: list[Command | Alert] = []
        step = timedelta(minutes=self.cfg.step_minutes)
        for now in sorted(by_ts):
            for reading in by_ts[now]:
                if reading.soc_pct is not None:
                    state.soc_pct[reading.device] = reading.soc_pct
                if not reading.plugged_in:
                    state.plugged_since.pop(reading.device, None)
                else:
                    state.plugged_since.setdefault(reading.device, now.isoformat())
            last = None if state.last_plan is None else datetime.fromisoformat(state.last_plan)
            if last is not None and now < last + step:
                continue
            out += self.plan(state, now)
        return out

    def plan(self, state: FleetState, now: datetime) -> list[Command | Alert]:
        sessions = sessions_at(self.cfg, state, now)
        if not sessions:
            return []
        state.last_plan = now.isoformat()
        step = timedelta(minutes=self.cfg.step_minutes)
        horizon_steps = self.cfg.horizon_steps
        if horizon_steps is None:
            last = max((s.departure - now) // step for s in sessions)
            horizon_steps = max(1, min(MAX_STEPS, last))
        plan = schedule(
            sessions,
            self.cfg.max_import_kw,
            now,
            self.cfg.step_minutes,
            horizon_steps,
            [self.cfg.base_load_kw] * horizon_steps,
            self.cfg.peak_target_kw,
            ev_budget_kw=self.cfg.ev_budget_kw,
        )
        out: list[Command | Alert] = list(
            commands(plan, self.cfg.site, now, dry_run=self.cfg.dry_run)
        )
        for alert in infeasible_alerts(plan, self.cfg.site):
            if alert.alert_id not in state.alerted:
                state.alerted = [*state.alerted, alert.alert_id][-MAX_ALERTED:]
                out.append(alert)
        return out


# --- wiring -------------------------------------------------------------------------------


def register(app: faust.App, settings: Settings) -> None:
    """Wire fleet charging to Kafka: telemetry in, charger setpoints and alerts out.

    Only sites with a ``fleet`` section get work; sections are validated here, at
    start-up. Undecodable telemetry is dead-lettered once, by the shared site agent
    (:func:`pipeline.streams.site_agent`).
    """
    from pipeline.streams import site_state, site_telemetry_agent

    engines = {
        site.id: SiteFleet(cfg)
        for site in settings.sites
        if (cfg := fleet_settings(site)) is not None
    }
    states = site_state(
        app,
        settings,
        "fleet-state",
        "Per-site fleet state: plugged-in vehicles, states of charge, last plan.",
        FleetState.from_json,
        FleetState.to_json,
    )

    def step(site: str, batch: TelemetryBatch) -> list[Alert | Command]:
        readings = [r for r in batch.readings if isinstance(r, EvReading)]
        if not readings:
            return []
        state = states.get(site)
        out = engines[site].on_readings(state, readings)
        states.put(site, state)
        return out

    # Telemetry only: this agent does not use prices, so it does not read them.
    site_telemetry_agent(app, settings, f"{__name__}.fleet", engines, step)
