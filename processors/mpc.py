"""The ``mpc`` arbitrage strategy: model-predictive control over forecast prices.

At every step the battery re-plans over a fixed horizon (48 hours by default) with
the same linear program and limits as ``optimal`` (:mod:`processors.optimal`: state of
charge band, charge and discharge power, round-trip efficiency, reserve, wear cost
per kWh cycled) and applies the plan's first interval. The horizon holds the prices
known at that moment, from the current interval on (with day-ahead prices: the rest
of today, and tomorrow after the auction; with none known ahead: only the current
price), and after them the forecast of :class:`processors.price_forecast.
ProfileForecaster`, which learns from the prices seen so far and nothing else.

The energy left at the end of the horizon is valued at what it could be sold for
later: the median price of the horizon's last 24 hours, after discharge losses and
wear (:func:`processors.optimal.horizon_terminal_value`), so the plan neither dumps
the battery at the horizon's end nor hoards. Negative prices need nothing special:
the LP charges when it is paid to, and its terminal value is never negative.

The backtest (:mod:`processors.backtest`) and the streaming agent
(:mod:`processors.arbitrage`) run this same class: :meth:`MpcPlanner.observe` each
price as it becomes known, :meth:`MpcPlanner.decide` at each decision.

Plain Python (no Faust import).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from processors.optimal import (
    BatteryModel,
    Plan,
    Step,
    WarmLp,
    horizon_terminal_value,
    solve,
)
from processors.price_forecast import ProfileForecaster

DEFAULT_HORIZON_H = 48.0
TERMINAL_WINDOW_H = 24.0


@dataclass(frozen=True)
class Horizon:
    """What one plan is made over: prices (known, then forecast) and their lengths."""

    prices_per_kwh: list[float]
    durations_h: list[float]
    known_steps: int
    """How many of the prices are known (the rest are forecasts)."""


class MpcPlanner:
    """One battery's model-predictive planner over one market's prices."""

    def __init__(
        self,
        battery: BatteryModel,
        step: timedelta,
        *,
        horizon_h: float = DEFAULT_HORIZON_H,
        terminal_window_h: float = TERMINAL_WINDOW_H,
    ) -> None:
        if not horizon_h > 0:
            raise ValueError(f"horizon_h must be positive, got {horizon_h}")
        self.battery = battery
        self.step = step
        self.step_h = step / timedelta(hours=1)
        self.horizon_steps = max(1, math.ceil(horizon_h / self.step_h - 1e-9))
        self.terminal_window_h = terminal_window_h
        self.forecaster = ProfileForecaster(step, self.horizon_steps)
        self._starts: list[datetime] = []
        self._prices: list[float] = []
        self._durations: list[float] = []
        self._lps: dict[int, WarmLp] = {}
        self.last_horizon: Horizon | None = None
        """The horizon of the last plan (for the decision's reason)."""

    def observe(
        self, start: datetime, price_per_kwh: float, duration_h: float | None = None
    ) -> None:
        """The price of the interval starting at ``start`` is known (in time order)."""
        self.forecaster.observe(start, price_per_kwh)
        self._starts.append(start)
        self._prices.append(price_per_kwh)
        self._durations.append(self.step_h if duration_h is None else min(duration_h, self.step_h))

    def knows(self, start: datetime) -> bool:
        index = bisect.bisect_left(self._starts, start)
        return index < len(self._starts) and self._starts[index] == start

    def horizon(self, now: datetime) -> Horizon:
        """The known prices from the interval starting at ``now``, then forecasts."""
        first = bisect.bisect_left(self._starts, now)
        if first >= len(self._starts) or self._starts[first] != now:
            raise ValueError(f"the price of the interval starting {now.isoformat()} is not known")
        # What is behind us is not planned again: forget it (the forecaster keeps its own).
        del self._starts[:first], self._prices[:first], self._durations[:first]
        prices = list(self._prices)
        durations = list(self._durations)
        missing = self.horizon_steps - len(prices)
        if missing > 0:
            forecast = self.forecaster.forecast()[:missing]
            prices += [float(p) for p in forecast]
            durations += [self.step_h] * len(forecast)
        return Horizon(prices, durations, len(self._prices))

    def plan(self, now: datetime, stored_kwh: float) -> tuple[Plan, Horizon]:
        horizon = self.last_horizon = self.horizon(now)
        value = horizon_terminal_value(
            self.battery, horizon.prices_per_kwh, horizon.durations_h, self.terminal_window_h
        )
        steps = len(horizon.prices_per_kwh)
        if all(d == self.step_h for d in horizon.durations_h):
            lp = self._lps.get(steps)
            if lp is None:
                lp = self._lps[steps] = WarmLp(self.battery, horizon.durations_h)
            return lp.solve(horizon.prices_per_kwh, stored_kwh, value), horizon
        # A hole in the known prices: a one-off shape.
        plan = solve(self.battery, horizon.prices_per_kwh, horizon.durations_h, stored_kwh, value)
        return plan, horizon

    def decide(self, now: datetime, stored_kwh: float) -> Step:
        """What to do in the interval starting at ``now`` (its price must be known)."""
        plan, horizon = self.plan(now, stored_kwh)
        return Step.first_of(plan, horizon.prices_per_kwh, horizon.durations_h)
