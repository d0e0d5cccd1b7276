"""Battery arbitrage as a linear program: the ``optimal`` strategy and the perfect-foresight bound.

Over a horizon of price intervals ``t`` (length ``dt_t`` hours, price ``p_t``
per kWh) choose charge power ``c_t`` and discharge power ``d_t`` (kW, both
>= 0) and the energy stored at the end of each interval ``s_t`` (kWh):

    maximise   sum_t p_t * dt_t * (d_t - c_t)                  (grid revenue)
             - degradation_cost * sum_t dt_t * d_t / eta_d     (wear, per kWh out of the cells)
             + terminal_value * s_T                            (what is left is worth something)
    subject to s_t = s_{t-1} + eta_c * dt_t * c_t - dt_t * d_t / eta_d
               0 <= c_t <= max_charge_kw,  0 <= d_t <= max_discharge_kw
               floor <= s_t <= ceiling

               c_t / max_charge_kw + d_t / max_discharge_kw <= 1

with ``eta_c = eta_d = sqrt(round_trip_efficiency)`` (as in the threshold
rule), ``floor`` = max(soc_min, reserve) and ``ceiling`` = soc_max. It is
solved with HiGHS (scipy.optimize.linprog). Charging and discharging in the
same interval (by turns: the last constraint) is never better than their net
at positive prices; at negative prices it burns energy in the losses, which a
battery paid to consume could do. A decision is one setpoint, the net power,
so a strategy never earns more than this LP: its optimum is a true bound.

**Perfect foresight** (:func:`perfect_foresight`) solves this once over the
whole history with no terminal value: the most any strategy could have
earned, the bound every backtest reports.

**Rolling horizon** (:class:`RollingOptimizer`): at each decision only the
prices published by then are known (day-ahead: until the end of today, or of
tomorrow after the auction). The plan over them is solved, its first interval
is applied, and the next decision plans again, so new prices and a measured
state of charge that drifted from the plan are taken in at once. What is
stored at the end of the known horizon is valued at ``eta_d`` times the
median price of the last day of known prices: the energy will be sold later
at a price like the recent ones, after discharge losses. Without that value
the plan empties the battery at the horizon's end (often midnight, before the
next day's prices are out), selling cheap what the morning peak would have
paid for. The median, not a tuned quantile, keeps this free of any one
market's shape.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

# Below this a setpoint is noise from the solver's tolerances: treat as zero.
MIN_POWER_KW = 1e-6


@dataclass(frozen=True)
class BatteryModel:
    """What the LP needs to know about a battery (energies in kWh, powers in kW)."""

    capacity_kwh: float
    max_charge_kw: float
    max_discharge_kw: float
    round_trip_efficiency: float
    floor_kwh: float
    """Lowest energy arbitrage may leave in the cells (soc_min or reserve)."""
    ceiling_kwh: float
    degradation_cost_per_kwh: float = 0.0
    """Wear cost per kWh discharged from the cells."""

    def __post_init__(self) -> None:
        if not 0 < self.round_trip_efficiency <= 1:
            raise ValueError(
                f"round_trip_efficiency must be in (0, 1], got {self.round_trip_efficiency}"
            )
        if not 0 <= self.floor_kwh < self.ceiling_kwh <= self.capacity_kwh:
            raise ValueError(
                f"need 0 <= floor ({self.floor_kwh}) < ceiling ({self.ceiling_kwh}) "
                f"<= capacity ({self.capacity_kwh}) kWh"
            )

    @property
    def one_way_efficiency(self) -> float:
        return math.sqrt(self.round_trip_efficiency)


@dataclass(frozen=True)
class Plan:
    charge_kw: np.ndarray
    discharge_kw: np.ndarray
    stored_kwh: np.ndarray
    """Energy stored at the end of each interval."""
    objective: float
    """Revenue minus wear plus terminal value, as optimised."""

    @property
    def net_power_kw(self) -> np.ndarray:
        """Positive: discharge (sold), negative: charge (bought)."""
        return self.discharge_kw - self.charge_kw


class InfeasiblePlanError(RuntimeError):
    pass


def solve(
    battery: BatteryModel,
    prices_per_kwh: Sequence[float],
    durations_h: Sequence[float],
    stored_kwh: float,
    terminal_value_per_kwh: float = 0.0,
) -> Plan:
    """The LP of the module docstring from ``stored_kwh`` now over the given intervals."""
    steps = len(prices_per_kwh)
    if steps == 0 or len(durations_h) != steps:
        raise ValueError("need one duration per price, and at least one price")
    price = np.asarray(prices_per_kwh, dtype=float)
    dt = np.asarray(durations_h, dtype=float)
    eta = battery.one_way_efficiency
    # Variables: c_0..c_{T-1}, d_0..d_{T-1}, s_0..s_{T-1} (s_t: stored at the end of t).
    cost = np.concatenate(
        [
            price * dt,
            -price * dt + battery.degradation_cost_per_kwh * dt / eta,
            np.zeros(steps),
        ]
    )
    cost[-1] -= terminal_value_per_kwh
    # s_t - s_{t-1} - eta*dt_t*c_t + dt_t/eta*d_t = 0, with s_{-1} = stored_kwh.
    identity = sparse.identity(steps, format="csr")
    previous = sparse.eye(steps, k=-1, format="csr")
    equality = sparse.hstack(
        [sparse.diags(-eta * dt), sparse.diags(dt / eta), identity - previous], format="csr"
    )
    rhs = np.zeros(steps)
    rhs[0] = stored_kwh
    # Starting outside the band (a battery below its reserve) must stay solvable:
    # the band widens to include where it is, and the plan cannot go further out.
    floor = min(battery.floor_kwh, stored_kwh)
    ceiling = max(battery.ceiling_kwh, stored_kwh)
    bounds = (
        [(0.0, battery.max_charge_kw)] * steps
        + [(0.0, battery.max_discharge_kw)] * steps
        + [(floor, ceiling)] * steps
    )
    # One inverter: charging and discharging in one interval share its time,
    # c_t/max_charge + d_t/max_discharge <= 1 (both at once is only possible by turns).
    sharing = sparse.hstack(
        [
            sparse.identity(steps) / battery.max_charge_kw,
            sparse.identity(steps) / battery.max_discharge_kw,
            sparse.csr_matrix((steps, steps)),
        ],
        format="csr",
    )
    result = linprog(
        cost,
        A_ub=sharing,
        b_ub=np.ones(steps),
        A_eq=equality,
        b_eq=rhs,
        bounds=bounds,
        method="highs",
    )
    if result.status != 0:
        raise InfeasiblePlanError(f"HiGHS: {result.message}")
    x = result.x
    charge, discharge = x[:steps], x[steps : 2 * steps]
    charge = np.where(charge < MIN_POWER_KW, 0.0, charge)
    discharge = np.where(discharge < MIN_POWER_KW, 0.0, discharge)
    return Plan(charge, discharge, x[2 * steps :], -float(result.fun))


_BANNER_SHOWN = False


def _new_highs() -> Any:
    """A silent HiGHS instance. The first one of a process prints HiGHS's banner to the
    C-level stdout, which would corrupt ``--json`` output: it is sent to /dev/null."""
    global _BANNER_SHOWN
    import highspy

    if _BANNER_SHOWN:
        highs = highspy.Highs()
    else:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 1)
                highs = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _BANNER_SHOWN = True
    highs.silent()
    # One core: a small LP gains nothing from threads, and a backtest runs one per step.
    highs.setOptionValue("threads", 1)
    return highs


class WarmLp:
    """:func:`solve`'s LP kept in one HiGHS instance for plans of one shape.

    A strategy that re-plans at every step (``mpc``) solves the same LP again with
    new prices and a new state of charge: changing only the costs and the first
    balance row and re-solving from the last basis takes about a tenth of building
    and solving it afresh (measured: 0.7 ms against 4.7 ms for 192 intervals), and
    gives the same optimum.
    """

    def __init__(self, battery: BatteryModel, durations_h: Sequence[float]) -> None:
        import highspy

        self.battery = battery
        self.durations_h = np.asarray(durations_h, dtype=float)
        steps = len(self.durations_h)
        if steps == 0:
            raise ValueError("need at least one interval")
        self.steps = steps
        dt = self.durations_h
        eta = battery.one_way_efficiency
        identity = sparse.identity(steps, format="csr")
        previous = sparse.eye(steps, k=-1, format="csr")
        matrix = sparse.vstack(
            [
                sparse.hstack(
                    [sparse.diags(-eta * dt), sparse.diags(dt / eta), identity - previous]
                ),
                sparse.hstack(
                    [
                        identity / battery.max_charge_kw,
                        identity / battery.max_discharge_kw,
                        sparse.csr_matrix((steps, steps)),
                    ]
                ),
            ]
        ).tocsc()
        lp = highspy.HighsLp()
        lp.num_col_ = 3 * steps
        lp.num_row_ = 2 * steps
        lp.col_cost_ = np.zeros(3 * steps)
        lp.col_lower_ = np.concatenate([np.zeros(2 * steps), np.full(steps, battery.floor_kwh)])
        lp.col_upper_ = np.concatenate(
            [
                np.full(steps, battery.max_charge_kw),
                np.full(steps, battery.max_discharge_kw),
                np.full(steps, battery.ceiling_kwh),
            ]
        )
        lp.row_lower_ = np.concatenate([np.zeros(steps), np.full(steps, -highspy.kHighsInf)])
        lp.row_upper_ = np.concatenate([np.zeros(steps), np.ones(steps)])
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.num_col_ = 3 * steps
        lp.a_matrix_.num_row_ = 2 * steps
        lp.a_matrix_.start_ = matrix.indptr
        lp.a_matrix_.index_ = matrix.indices
        lp.a_matrix_.value_ = matrix.data
        self._highs = _new_highs()
        self._highs.passModel(lp)
        self._columns = np.arange(3 * steps, dtype=np.int32)
        self._state_columns = np.arange(2 * steps, 3 * steps, dtype=np.int32)
        self._band = (battery.floor_kwh, battery.ceiling_kwh)
        self._ok = highspy.HighsModelStatus.kOptimal

    def solve(
        self,
        prices_per_kwh: Sequence[float] | np.ndarray,
        stored_kwh: float,
        terminal_value_per_kwh: float = 0.0,
    ) -> Plan:
        """As :func:`solve` over this instance's durations."""
        battery, steps, dt = self.battery, self.steps, self.durations_h
        price = np.asarray(prices_per_kwh, dtype=float)
        if len(price) != steps:
            raise ValueError(f"need {steps} prices, got {len(price)}")
        eta = battery.one_way_efficiency
        cost = np.concatenate(
            [price * dt, -price * dt + battery.degradation_cost_per_kwh * dt / eta, np.zeros(steps)]
        )
        cost[-1] -= terminal_value_per_kwh
        highs = self._highs
        highs.changeColsCost(3 * steps, self._columns, cost)
        highs.changeRowBounds(0, stored_kwh, stored_kwh)
        band = (min(battery.floor_kwh, stored_kwh), max(battery.ceiling_kwh, stored_kwh))
        if band != self._band:  # outside the band: widen it to where the battery is
            highs.changeColsBounds(
                steps,
                self._state_columns,
                np.full(steps, band[0]),
                np.full(steps, band[1]),
            )
            self._band = band
        highs.run()
        if highs.getModelStatus() != self._ok:
            raise InfeasiblePlanError(f"HiGHS: {highs.modelStatusToString(highs.getModelStatus())}")
        x = np.asarray(highs.getSolution().col_value)
        charge, discharge = x[:steps], x[steps : 2 * steps]
        charge = np.where(charge < MIN_POWER_KW, 0.0, charge)
        discharge = np.where(discharge < MIN_POWER_KW, 0.0, discharge)
        objective = -float(highs.getInfo().objective_function_value)
        return Plan(charge, discharge, x[2 * steps :], objective)


def perfect_foresight(
    battery: BatteryModel,
    prices_per_kwh: Sequence[float],
    durations_h: Sequence[float],
    stored_kwh: float,
) -> Plan:
    """The most any strategy could earn over this history, knowing every price in advance."""
    return solve(battery, prices_per_kwh, durations_h, stored_kwh, terminal_value_per_kwh=0.0)


def terminal_value(battery: BatteryModel, recent_prices_per_kwh: Sequence[float]) -> float:
    """What a kWh stored at the end of the horizon is worth (see the module docstring)."""
    if not recent_prices_per_kwh:
        return 0.0
    sell_later = statistics.median(recent_prices_per_kwh) * battery.one_way_efficiency
    return max(0.0, sell_later - battery.degradation_cost_per_kwh / battery.one_way_efficiency)


def horizon_terminal_value(
    battery: BatteryModel,
    prices_per_kwh: Sequence[float],
    durations_h: Sequence[float],
    window_h: float = 24.0,
) -> float:
    """:func:`terminal_value` of the last ``window_h`` hours of a horizon's prices."""
    window: list[float] = []
    elapsed_h = 0.0
    for price, duration in zip(reversed(prices_per_kwh), reversed(durations_h), strict=True):
        if elapsed_h >= window_h:
            break
        window.append(float(price))
        elapsed_h += duration
    return terminal_value(battery, window)


@dataclass(frozen=True)
class Step:
    """The first interval of a plan: what to do now."""

    power_kw: float
    """Positive discharge, negative charge (net of the two)."""
    charge_kw: float
    discharge_kw: float
    stored_after_kwh: float
    expected_revenue: float
    """Grid revenue of this interval if the plan is followed."""
    horizon_steps: int
    planned_revenue: float
    """Grid revenue of the whole plan."""

    @classmethod
    def first_of(
        cls, plan: Plan, prices_per_kwh: Sequence[float], durations_h: Sequence[float]
    ) -> Step:
        """The first interval of ``plan``, made over these prices and durations."""
        dt = np.asarray(durations_h, dtype=float)
        revenue = np.asarray(prices_per_kwh, dtype=float) * dt * plan.net_power_kw
        return cls(
            power_kw=float(plan.net_power_kw[0]),
            charge_kw=float(plan.charge_kw[0]),
            discharge_kw=float(plan.discharge_kw[0]),
            stored_after_kwh=float(plan.stored_kwh[0]),
            expected_revenue=float(revenue[0]),
            horizon_steps=len(prices_per_kwh),
            planned_revenue=float(revenue.sum()),
        )


# Plans of this many shapes (horizon lengths and durations) keep their LP warm; others,
# rare (holes in the prices), are solved afresh.
MAX_WARM_SHAPES = 64


class RollingOptimizer:
    """Re-plans over the known prices at every decision and applies the first interval."""

    def __init__(self, battery: BatteryModel, terminal_window_h: float = 24.0) -> None:
        self.battery = battery
        self.terminal_window_h = terminal_window_h
        self._lps: dict[tuple[float, ...], WarmLp] = {}

    def plan(
        self,
        stored_kwh: float,
        prices_per_kwh: Sequence[float],
        durations_h: Sequence[float],
    ) -> Plan:
        """The plan from now (the first price) to the last known price."""
        value = horizon_terminal_value(
            self.battery, prices_per_kwh, durations_h, self.terminal_window_h
        )
        shape = tuple(float(d) for d in durations_h)
        lp = self._lps.get(shape)
        if lp is None and len(self._lps) < MAX_WARM_SHAPES:
            lp = self._lps[shape] = WarmLp(self.battery, shape)
        if lp is not None:
            return lp.solve(prices_per_kwh, stored_kwh, value)
        return solve(self.battery, prices_per_kwh, durations_h, stored_kwh, value)

    def decide(
        self,
        stored_kwh: float,
        prices_per_kwh: Sequence[float],
        durations_h: Sequence[float],
    ) -> Step:
        """What to do in the first interval of the plan over the known prices."""
        plan = self.plan(stored_kwh, prices_per_kwh, durations_h)
        return Step.first_of(plan, prices_per_kwh, durations_h)
