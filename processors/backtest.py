"""Backtests of arbitrage strategies over a price history, against the perfect-foresight bound.

Plain Python: the same decision code the agents run (``decide_threshold``,
:class:`processors.optimal.RollingOptimizer`, the ``mpc`` planner), driven interval by
interval over a history with no broker.

**What each decision knows** (``foresight``) is explicit:

* ``day-ahead`` (the default): a decision at time t sees every price published by t.
  Unless the history says when each price was published (``published_at``), the
  European day-ahead auction is modelled: prices of delivery day D (in the market's
  time zone) are known from ``publication_time`` on day D-1 (default 13:00
  Europe/Brussels, when SDAC results are out). So at 09:00 a strategy sees the rest of
  today, at 14:00 also all of tomorrow.
* ``none``: a decision at t sees the prices of the intervals up to and including the
  one starting at t, and nothing after: real-time and imbalance prices, or a site that
  only sees its current tariff.

Strategies: ``threshold`` (the specification's rule; fixed thresholds or the trailing
week's 30th/70th percentiles), ``optimal`` (the LP over the known prices only, with a
terminal value) and ``mpc`` (the same LP over a 48-hour horizon: known prices where
there are any, the forecaster's (:mod:`processors.price_forecast`) after them,
re-planned at every step).

Every strategy starts from the same state of charge, and the physics are the
same for all (efficiency split evenly between charge and discharge, state of
charge kept within its band). Revenue is the grid cash flow: energy sold
times price minus energy bought times price.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Literal
from zoneinfo import ZoneInfo

import numpy as np

from processors.optimal import (
    BatteryModel,
    RollingOptimizer,
    perfect_foresight,
)

if TYPE_CHECKING:
    from processors.mpc import MpcPlanner

STRATEGIES = ("threshold", "optimal", "mpc")
Foresight = Literal["day-ahead", "none"]
FORESIGHTS: tuple[Foresight, ...] = ("day-ahead", "none")


@dataclass(frozen=True)
class PricePoint:
    start: datetime
    price_per_kwh: float
    published_at: datetime | None = None


@dataclass(frozen=True)
class Publication:
    """When a day-ahead price is known, if the history does not say."""

    time_zone: str = "Europe/Brussels"
    publication_time: time = time(13, 0)

    def published_at(self, start: datetime) -> datetime:
        zone = ZoneInfo(self.time_zone)
        delivery_day = start.astimezone(zone).date()
        day_before = delivery_day - timedelta(days=1)
        return datetime.combine(day_before, self.publication_time, tzinfo=zone).astimezone(UTC)


@dataclass
class StrategyResult:
    revenue: float = 0.0
    energy_bought_kwh: float = 0.0
    energy_sold_kwh: float = 0.0
    equivalent_cycles: float = 0.0
    replans: int = 0
    power_kw: list[float] = field(default_factory=list)
    stored_kwh: list[float] = field(default_factory=list)
    cumulative_revenue: list[float] = field(default_factory=list)

    def summary(self, bound_revenue: float) -> dict[str, float | int | None]:
        """``energy_charged_kwh``: bought from the grid to charge; ``energy_discharged_kwh``:
        sold to it; ``full_cycles``: energy out of the cells over the usable capacity."""
        return {
            "revenue": round(self.revenue, 6),
            "share_of_bound": (
                round(self.revenue / bound_revenue, 6) if bound_revenue > 1e-9 else None
            ),
            "energy_charged_kwh": round(self.energy_bought_kwh, 3),
            "energy_discharged_kwh": round(self.energy_sold_kwh, 3),
            "full_cycles": round(self.equivalent_cycles, 3),
            "replans": self.replans,
        }


@dataclass
class BacktestResult:
    starts: list[datetime]
    prices_per_kwh: list[float]
    durations_h: list[float]
    strategies: dict[str, StrategyResult]
    bound: StrategyResult
    battery: BatteryModel
    initial_stored_kwh: float
    foresight: Foresight = "day-ahead"
    step: timedelta = timedelta(hours=1)
    forecast_mae_by_horizon: dict[str, float | None] | None = None
    """The mpc forecaster's mean absolute error per kWh, by horizon (None: no mpc)."""

    @property
    def hours(self) -> float:
        return float(sum(self.durations_h))

    def to_json(self) -> dict[str, object]:
        bound = self.bound.revenue
        out: dict[str, object] = {
            "foresight": self.foresight,
            "strategies": {name: r.summary(bound) for name, r in self.strategies.items()},
            "bound": self.bound.summary(bound),
            "hours": round(self.hours, 6),
            "intervals": len(self.starts),
            "step_minutes": self.step / timedelta(minutes=1),
            "first": self.starts[0].isoformat() if self.starts else None,
            "last": self.starts[-1].isoformat() if self.starts else None,
        }
        if self.forecast_mae_by_horizon is not None:
            out["forecast_mae_per_kwh_by_horizon"] = {
                k: None if v is None else round(v, 6)
                for k, v in self.forecast_mae_by_horizon.items()
            }
        return out


def resolution(starts: Sequence[datetime]) -> timedelta:
    """The market's step: the most common gap between prices (1 h for a single price)."""
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    return statistics.mode(gaps) if gaps else timedelta(hours=1)


def interval_durations_h(starts: Sequence[datetime]) -> list[float]:
    """Each interval lasts until the next price, but no longer than the market's resolution.

    The resolution is the most common gap between prices; a longer gap is a
    hole in the history (blank prices), during which nothing is traded.
    """
    if not starts:
        return []
    resolution_h = resolution(starts) / timedelta(hours=1)
    gaps_h = [(b - a).total_seconds() / 3600 for a, b in itertools.pairwise(starts)]
    return [min(gap, resolution_h) for gap in gaps_h] + [resolution_h]


def known_from(
    prices: Sequence[PricePoint], foresight: Foresight, publication: Publication
) -> list[datetime]:
    """When each price becomes known to a decision (see the module docstring)."""
    if foresight == "none":
        return [p.start for p in prices]
    if foresight != "day-ahead":
        raise ValueError(f"foresight must be one of {list(FORESIGHTS)}, got {foresight!r}")
    return [p.published_at or publication.published_at(p.start) for p in prices]


class _Simulation:
    """Applies setpoints to one battery and books the cash flow."""

    def __init__(self, battery: BatteryModel, stored_kwh: float) -> None:
        self.battery = battery
        self.stored_kwh = stored_kwh
        self.result = StrategyResult()
        self._cells_out_kwh = 0.0

    def apply(self, power_kw: float, price: float, duration_h: float) -> None:
        battery = self.battery
        eta = battery.one_way_efficiency
        floor = min(battery.floor_kwh, self.stored_kwh)
        ceiling = max(battery.ceiling_kwh, self.stored_kwh)
        if power_kw < 0:  # charge, within the rate and the headroom
            charge_kw = min(-power_kw, battery.max_charge_kw)
            charge_kw = min(charge_kw, (ceiling - self.stored_kwh) / (eta * duration_h))
            self.stored_kwh += charge_kw * duration_h * eta
            grid_kwh = -charge_kw * duration_h
        else:
            discharge_kw = min(power_kw, battery.max_discharge_kw)
            discharge_kw = min(discharge_kw, (self.stored_kwh - floor) * eta / duration_h)
            discharge_kw = max(0.0, discharge_kw)
            self.stored_kwh -= discharge_kw * duration_h / eta
            self._cells_out_kwh += discharge_kw * duration_h / eta
            grid_kwh = discharge_kw * duration_h
        result = self.result
        result.revenue += grid_kwh * price
        if grid_kwh < 0:
            result.energy_bought_kwh -= grid_kwh
        else:
            result.energy_sold_kwh += grid_kwh
        result.power_kw.append(grid_kwh / duration_h)
        result.stored_kwh.append(self.stored_kwh)
        result.cumulative_revenue.append(result.revenue)
        usable_kwh = battery.ceiling_kwh - battery.floor_kwh
        result.equivalent_cycles = self._cells_out_kwh / usable_kwh


def _threshold_thresholds(
    history: Sequence[float], charge_below: float | None, discharge_above: float | None
) -> tuple[float, float] | None:
    """Fixed thresholds if given; otherwise the 30th/70th percentiles of the past week.

    Without configured thresholds the rule needs some, and it may not peek at the
    future: the trailing week's quantiles are what an operator would set by hand.
    """
    if charge_below is not None and discharge_above is not None:
        return charge_below, discharge_above
    if len(history) < 24:
        return None
    low, high = np.quantile(np.asarray(history[-168:]), [0.3, 0.7])
    return (float(low), float(high)) if low < high else None


def run_backtest(
    prices: Sequence[PricePoint],
    battery: BatteryModel,
    initial_soc_pct: float = 50.0,
    strategies: Sequence[str] = STRATEGIES,
    publication: Publication | None = None,
    charge_below_price_per_kwh: float | None = None,
    discharge_above_price_per_kwh: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    foresight: Foresight = "day-ahead",
    mpc_horizon_h: float = 48.0,
) -> BacktestResult:
    """Run each strategy over ``prices`` (sorted, unique starts) and compute the bound."""
    unknown = [name for name in strategies if name not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    if not prices:
        raise ValueError("no prices to backtest")
    publication = publication or Publication()
    starts = [p.start for p in prices]
    price = [p.price_per_kwh for p in prices]
    durations = interval_durations_h(starts)
    published = known_from(prices, foresight, publication)
    initial_kwh = battery.capacity_kwh * initial_soc_pct / 100.0
    step = resolution(starts)

    results: dict[str, StrategyResult] = {}
    if "threshold" in strategies:
        results["threshold"] = _run_threshold(
            battery,
            price,
            durations,
            initial_kwh,
            charge_below_price_per_kwh,
            discharge_above_price_per_kwh,
        )
    if "optimal" in strategies:
        results["optimal"] = _run_optimal(
            battery, starts, price, durations, published, initial_kwh, progress
        )
    mae: dict[str, float | None] | None = None
    if "mpc" in strategies:
        from processors.mpc import MpcPlanner

        planner = MpcPlanner(battery, step, horizon_h=mpc_horizon_h)
        results["mpc"] = _run_mpc(
            planner, starts, price, durations, published, initial_kwh, progress
        )
        mae = planner.forecaster.mae_by_horizon()

    return BacktestResult(
        starts,
        price,
        durations,
        results,
        _bound(battery, price, durations, initial_kwh),
        battery,
        initial_kwh,
        foresight,
        step,
        mae,
    )


def _bound(
    battery: BatteryModel, price: list[float], durations: list[float], initial_kwh: float
) -> StrategyResult:
    """The perfect-foresight LP's own cash flow: an upper bound on every strategy."""
    plan = perfect_foresight(battery, price, durations, initial_kwh)
    dt = np.asarray(durations)
    grid_kwh = plan.net_power_kw * dt
    cash = grid_kwh * np.asarray(price)
    usable_kwh = battery.ceiling_kwh - battery.floor_kwh
    cells_out_kwh = float((plan.discharge_kw * dt).sum()) / battery.one_way_efficiency
    return StrategyResult(
        revenue=float(cash.sum()),
        energy_bought_kwh=float((plan.charge_kw * dt).sum()),
        energy_sold_kwh=float((plan.discharge_kw * dt).sum()),
        equivalent_cycles=cells_out_kwh / usable_kwh,
        replans=1,
        power_kw=[float(p) for p in plan.net_power_kw],
        stored_kwh=[float(s) for s in plan.stored_kwh],
        cumulative_revenue=[float(c) for c in np.cumsum(cash)],
    )


def _run_threshold(
    battery: BatteryModel,
    price: list[float],
    durations: list[float],
    initial_kwh: float,
    charge_below: float | None,
    discharge_above: float | None,
) -> StrategyResult:
    simulation = _Simulation(battery, initial_kwh)
    for index, (now, duration) in enumerate(zip(price, durations, strict=True)):
        thresholds = _threshold_thresholds(price[:index], charge_below, discharge_above)
        power_kw = 0.0
        if thresholds is not None:
            low, high = thresholds
            if now < low:
                power_kw = -battery.max_charge_kw
            elif now > high:
                power_kw = battery.max_discharge_kw
        simulation.apply(power_kw, now, duration)
    return simulation.result


def _run_optimal(
    battery: BatteryModel,
    starts: list[datetime],
    price: list[float],
    durations: list[float],
    published: list[datetime],
    initial_kwh: float,
    progress: Callable[[str, int, int], None] | None,
) -> StrategyResult:
    """Re-plan when new prices are known or the state of charge left the plan."""
    optimizer = RollingOptimizer(battery)
    simulation = _Simulation(battery, initial_kwh)
    plan_from = -1
    plan_horizon_end = -1
    plan_power: list[float] = []
    plan_stored: list[float] = []
    drift_kwh = 0.01 * battery.capacity_kwh
    horizon_end = 0
    for index, decided_at in enumerate(starts):
        if published[index] > decided_at:
            simulation.apply(0.0, price[index], durations[index])  # no price yet: hold
            continue
        # The known horizon: consecutive intervals from now whose prices are out.
        horizon_end = max(horizon_end, index + 1)
        while horizon_end < len(starts) and published[horizon_end] <= decided_at:
            horizon_end += 1
        offset = index - plan_from
        stale = (
            plan_from < 0
            or horizon_end != plan_horizon_end
            or offset >= len(plan_power)
            or (offset > 0 and abs(plan_stored[offset - 1] - simulation.stored_kwh) > drift_kwh)
        )
        if stale:
            plan = optimizer.plan(
                simulation.stored_kwh, price[index:horizon_end], durations[index:horizon_end]
            )
            plan_from, plan_horizon_end = index, horizon_end
            plan_power = [float(p) for p in plan.net_power_kw]
            plan_stored = [float(v) for v in plan.stored_kwh]
            simulation.result.replans += 1
            offset = 0
        simulation.apply(plan_power[offset], price[index], durations[index])
        if progress is not None and index % 500 == 0:
            progress("optimal", index, len(starts))
    return simulation.result


def _run_mpc(
    planner: MpcPlanner,
    starts: list[datetime],
    price: list[float],
    durations: list[float],
    published: list[datetime],
    initial_kwh: float,
    progress: Callable[[str, int, int], None] | None,
) -> StrategyResult:
    """Re-plan at every step over the known prices and the forecast after them."""
    simulation = _Simulation(planner.battery, initial_kwh)
    observed = 0
    for index, decided_at in enumerate(starts):
        while observed < len(starts) and published[observed] <= decided_at:
            planner.observe(starts[observed], price[observed], durations[observed])
            observed += 1
        if observed <= index:
            simulation.apply(0.0, price[index], durations[index])  # no price yet: hold
            continue
        step = planner.decide(decided_at, simulation.stored_kwh)
        simulation.result.replans += 1
        simulation.apply(step.power_kw, price[index], durations[index])
        if progress is not None and index % 500 == 0:
            progress("mpc", index, len(starts))
    return simulation.result


def bound_share(result: BacktestResult, strategy: str) -> float | None:
    bound = result.bound.revenue
    if bound <= 1e-9:
        return None
    return result.strategies[strategy].revenue / bound
