"""The LP of the optimal strategy, the perfect-foresight bound and the backtest's discipline."""

from __future__ import annotations

import math
from datetime import UTC, datetime, time, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.backtest import PricePoint, Publication, run_backtest
from processors.optimal import BatteryModel, RollingOptimizer, perfect_foresight, solve

T0 = datetime(2025, 1, 6, tzinfo=UTC)  # a Monday, 01:00 in Brussels


def battery(**overrides: float) -> BatteryModel:
    values = {
        "capacity_kwh": 10.0,
        "max_charge_kw": 5.0,
        "max_discharge_kw": 5.0,
        "round_trip_efficiency": 1.0,
        "floor_kwh": 0.0,
        "ceiling_kwh": 10.0,
    }
    values.update(overrides)
    return BatteryModel(**values)


def test_buys_low_and_sells_high_as_much_as_the_limits_allow() -> None:
    plan = solve(battery(), [0.10, 0.10, 0.30, 0.30], [1, 1, 1, 1], stored_kwh=0.0)
    assert np.allclose(plan.net_power_kw, [-5, -5, 5, 5], atol=1e-6)
    # 10 kWh bought at 0.10, sold at 0.30.
    assert plan.objective == pytest.approx(2.0)


def test_efficiency_makes_small_spreads_not_worth_cycling() -> None:
    # Round trip 81 %: buying at 0.10 pays only if selling above 0.10 / 0.81 = 0.1235.
    lossy = battery(round_trip_efficiency=0.81)
    assert np.allclose(solve(lossy, [0.10, 0.12], [1, 1], 0.0).net_power_kw, 0, atol=1e-6)
    worth = solve(lossy, [0.10, 0.13], [1, 1], 0.0)
    assert worth.net_power_kw[0] < -1 and worth.net_power_kw[1] > 1


def test_state_of_charge_band_and_rates_hold() -> None:
    model = battery(floor_kwh=2.0, ceiling_kwh=9.0, max_charge_kw=3.0, round_trip_efficiency=0.9)
    prices = [0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 0.01, 0.9]
    plan = solve(model, prices, [1.0] * len(prices), stored_kwh=5.0)
    assert plan.stored_kwh.min() >= 2.0 - 1e-6 and plan.stored_kwh.max() <= 9.0 + 1e-6
    assert plan.charge_kw.max() <= 3.0 + 1e-6 and plan.discharge_kw.max() <= 5.0 + 1e-6


def test_a_battery_below_its_floor_is_not_infeasible_and_does_not_discharge() -> None:
    plan = solve(battery(floor_kwh=4.0), [0.5, 0.5], [1, 1], stored_kwh=1.0)
    assert plan.discharge_kw.max() <= 1e-6


def test_degradation_cost_removes_marginal_cycles() -> None:
    prices = [0.10, 0.14]
    assert solve(battery(), prices, [1, 1], 0.0).net_power_kw[1] > 1
    worn = battery(degradation_cost_per_kwh=0.05)
    assert np.allclose(solve(worn, prices, [1, 1], 0.0).net_power_kw, 0, atol=1e-6)


def test_terminal_value_keeps_energy_for_later_instead_of_ending_empty() -> None:
    prices = [0.30, 0.30, 0.30, 0.05, 0.05]
    durations = [1.0] * 5
    without = solve(battery(), prices, durations, stored_kwh=10.0)
    # Recent prices (median 0.30) say a kWh left at the end still sells for ~0.30 later:
    # so the plan sells now and buys back in the cheap hours at the end.
    rolling = RollingOptimizer(battery()).plan(10.0, prices, durations)
    assert without.stored_kwh[-1] == pytest.approx(0.0, abs=1e-6)
    assert rolling.stored_kwh[-1] == pytest.approx(10.0, abs=1e-6)
    assert rolling.net_power_kw[:2] == pytest.approx([5.0, 5.0], abs=1e-6)


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="round_trip_efficiency"):
        battery(round_trip_efficiency=1.2)
    with pytest.raises(ValueError, match="floor"):
        battery(floor_kwh=9.0, ceiling_kwh=8.0)
    with pytest.raises(ValueError, match="one duration per price"):
        solve(battery(), [0.1, 0.2], [1.0], 0.0)


prices_strategy = st.lists(
    st.floats(min_value=-0.2, max_value=0.8, allow_nan=False), min_size=24, max_size=96
)


@settings(max_examples=40, deadline=None)
@given(
    prices=prices_strategy,
    efficiency=st.floats(min_value=0.6, max_value=1.0),
    soc=st.floats(min_value=0, max_value=100),
)
def test_no_strategy_beats_the_perfect_foresight_bound(
    prices: list[float], efficiency: float, soc: float
) -> None:
    points = [PricePoint(T0 + timedelta(hours=h), p) for h, p in enumerate(prices)]
    model = battery(round_trip_efficiency=efficiency, max_charge_kw=4.0, max_discharge_kw=6.0)
    result = run_backtest(points, model, initial_soc_pct=soc)
    bound = result.bound.revenue
    for run in result.strategies.values():
        assert run.revenue <= bound + 1e-6
        stored = np.asarray(run.stored_kwh)
        assert stored.min() >= -1e-9 and stored.max() <= 10 + 1e-9
        assert max(run.power_kw) <= 6 + 1e-9 and min(run.power_kw) >= -4 - 1e-9


def test_with_every_price_known_the_rolling_plan_earns_the_bound() -> None:
    rng = np.random.default_rng(7)
    hours = 24 * 7
    daily = 0.12 + 0.08 * np.sin(np.arange(hours) * 2 * math.pi / 24)
    prices = daily + rng.normal(0, 0.02, hours)
    long_ago = T0 - timedelta(days=30)
    points = [
        PricePoint(T0 + timedelta(hours=h), float(p), published_at=long_ago)
        for h, p in enumerate(prices)
    ]
    model = battery(round_trip_efficiency=0.9)
    result = run_backtest(points, model, strategies=["optimal"])
    optimal = result.strategies["optimal"]
    assert optimal.replans == 1  # nothing new ever arrived: one plan, followed to the end
    # The plan keeps what it values at the end (the bound sells it): that is the whole gap.
    left_kwh = optimal.stored_kwh[-1] - result.bound.stored_kwh[-1]
    assert 0 <= result.bound.revenue - optimal.revenue <= left_kwh * max(prices) + 1e-6
    assert optimal.revenue >= 0.95 * result.bound.revenue


def test_decisions_never_use_prices_published_after_them() -> None:
    # Two histories that differ only on day 3; its prices are out at 13:00 on day 2.
    base = [0.1 + 0.05 * math.sin(h * 2 * math.pi / 24) for h in range(72)]
    spiked = [p + (2.0 if 48 + 17 <= h < 48 + 20 else 0.0) for h, p in enumerate(base)]
    publication = Publication("Europe/Brussels", time(13, 0))
    runs = []
    for prices in (base, spiked):
        points = [PricePoint(T0 + timedelta(hours=h), p) for h, p in enumerate(prices)]
        runs.append(run_backtest(points, battery(), publication=publication))
    cutoff = publication.published_at(T0 + timedelta(hours=48))
    before = sum(1 for h in range(72) if T0 + timedelta(hours=h) < cutoff)
    assert 30 < before < 48
    same, spike = (r.strategies["optimal"].power_kw for r in runs)
    assert same[:before] == spike[:before]
    assert same[before:] != spike[before:]  # once published, the spike is used


def test_day_ahead_prices_are_published_the_day_before_at_13_brussels_time() -> None:
    publication = Publication()
    # Delivery 2025-01-07 00:00 Brussels (23:00 UTC the day before).
    start = datetime(2025, 1, 6, 23, tzinfo=UTC)
    assert publication.published_at(start) == datetime(2025, 1, 6, 12, tzinfo=UTC)
    summer = datetime(2025, 7, 7, 10, tzinfo=UTC)
    assert publication.published_at(summer) == datetime(2025, 7, 6, 11, tzinfo=UTC)


def test_holes_in_the_history_trade_nothing() -> None:
    starts = [T0 + timedelta(hours=h) for h in (0, 1, 2, 10, 11)]
    points = [PricePoint(s, p) for s, p in zip(starts, [0.1, 0.1, 0.1, 0.5, 0.5], strict=True)]
    result = run_backtest(points, battery())
    assert result.durations_h == [1, 1, 1, 1, 1]
    assert result.hours == 5


def test_perfect_foresight_matches_a_brute_force_on_a_tiny_case() -> None:
    # Efficiency 1, 1 kWh battery, 1 kW: grid energy per hour is in {-1, 0, +1} at the optimum.
    prices = [0.3, 0.1, 0.4, 0.2, 0.5]
    model = battery(capacity_kwh=1, ceiling_kwh=1, max_charge_kw=1, max_discharge_kw=1)
    best = -math.inf
    for moves in np.ndindex(*(3,) * len(prices)):
        stored, cash, ok = 0.0, 0.0, True
        for move, price in zip(moves, prices, strict=True):
            power = move - 1  # -1 charge, 0 hold, +1 discharge
            stored -= power
            ok &= 0 <= stored <= 1
            cash += power * price
        if ok:
            best = max(best, cash)
    plan = perfect_foresight(model, prices, [1] * len(prices), 0.0)
    assert plan.objective == pytest.approx(best)
