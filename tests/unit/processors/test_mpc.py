"""The forecaster, the mpc strategy and what each decision is allowed to know."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from processors.backtest import STRATEGIES, PricePoint, Publication, run_backtest
from processors.mpc import MpcPlanner
from processors.optimal import BatteryModel, WarmLp, solve
from processors.price_forecast import ProfileForecaster

T0 = datetime(2025, 3, 3, tzinfo=UTC)  # a Monday
HOUR = timedelta(hours=1)


def battery(**overrides: float) -> BatteryModel:
    values = {
        "capacity_kwh": 10.0,
        "max_charge_kw": 5.0,
        "max_discharge_kw": 5.0,
        "round_trip_efficiency": 0.9,
        "floor_kwh": 0.0,
        "ceiling_kwh": 10.0,
    }
    values.update(overrides)
    return BatteryModel(**values)


def daily_prices(
    days: int, step: timedelta = HOUR, noise: float = 0.02, seed: int = 1
) -> list[float]:
    rng = np.random.default_rng(seed)
    per_day = round(timedelta(days=1) / step)
    t = np.arange(days * per_day)
    shape = (
        0.12 + 0.06 * np.sin(t * 2 * math.pi / per_day) + 0.03 * np.sin(t * 4 * math.pi / per_day)
    )
    return [float(p) for p in shape + rng.normal(0, noise, len(t))]


def points(prices: list[float], step: timedelta = HOUR) -> list[PricePoint]:
    return [PricePoint(T0 + i * step, p) for i, p in enumerate(prices)]


# --- the LP kept warm is the same LP --------------------------------------------------------


def test_the_warm_lp_finds_the_optimum_of_the_plain_one() -> None:
    rng = np.random.default_rng(3)
    model = battery(floor_kwh=1.0, ceiling_kwh=9.5, degradation_cost_per_kwh=0.01)
    durations = [0.25] * 48
    warm = WarmLp(model, durations)
    for _ in range(20):
        prices = [float(p) for p in rng.normal(0.1, 0.08, 48)]
        stored = float(rng.uniform(0, 10))  # sometimes outside the band: widened as solve does
        value = float(rng.uniform(0, 0.1))
        fast, plain = (
            warm.solve(prices, stored, value),
            solve(model, prices, durations, stored, value),
        )
        assert fast.objective == pytest.approx(plain.objective, abs=1e-7)
        assert np.allclose(fast.stored_kwh, plain.stored_kwh, atol=1e-5) or math.isclose(
            fast.objective, plain.objective, abs_tol=1e-7
        )


# --- the forecaster ---------------------------------------------------------------------------


def test_a_repeating_day_is_forecast_exactly_and_errors_are_scored_by_horizon() -> None:
    prices = daily_prices(14, noise=0.0)
    forecaster = ProfileForecaster(HOUR, horizon_steps=30)
    for i, p in enumerate(prices[:-30]):
        forecaster.observe(T0 + i * HOUR, p)
        if i >= 24:
            forecaster.forecast()
    known = len(prices) - 31
    forecast = forecaster.forecast()
    assert np.allclose(forecast, prices[known + 1 : known + 31], atol=1e-9)
    for i in range(len(prices) - 30, len(prices)):
        forecaster.observe(T0 + i * HOUR, prices[i])
    mae = forecaster.mae_by_horizon()
    assert set(mae) == {"1 step", "6h", "24h"}
    assert all(v is not None and v < 1e-9 for v in mae.values())


def test_persistence_is_learnt_from_how_long_deviations_last() -> None:
    # A flat profile plus an AR(1) deviation with coefficient 0.7 per hour.
    rng = np.random.default_rng(5)
    deviation, prices = 0.0, []
    for _ in range(24 * 35):
        deviation = 0.7 * deviation + rng.normal(0, 0.02)
        prices.append(0.1 + deviation)
    forecaster = ProfileForecaster(HOUR, horizon_steps=6)
    for i, p in enumerate(prices):
        forecaster.observe(T0 + i * HOUR, p)
    forecaster.forecast()
    assert forecaster.persistence is not None
    # The profile absorbs part of the deviation (it averages the same recent days), so
    # the fitted coefficient is below 0.7; it falls with the horizon as 0.7 ** h does.
    assert 0.4 < forecaster.persistence[0] < 0.8
    assert all(np.diff(forecaster.persistence) < 0)
    assert forecaster.persistence[5] < 0.35


def test_a_forecaster_rebuilt_from_the_last_ten_weeks_forecasts_what_the_whole_history_did() -> (
    None
):
    prices = daily_prices(90, noise=0.03, seed=9)
    whole = ProfileForecaster(HOUR, horizon_steps=48)
    for i, p in enumerate(prices):
        whole.observe(T0 + i * HOUR, p)
        if i % 24 == 23:
            whole.forecast(score=False)  # refits as the days go by
    recent = ProfileForecaster(HOUR, horizon_steps=48)
    first = len(prices) - 70 * 24
    for i in range(first, len(prices)):
        recent.observe(T0 + i * HOUR, prices[i])
    assert np.array_equal(whole.forecast(score=False), recent.forecast(score=False))
    assert (whole.decay, whole.weekly_weight) == (recent.decay, recent.weekly_weight)


def test_a_gap_is_not_invented_and_the_forecast_goes_on() -> None:
    prices = daily_prices(10)
    forecaster = ProfileForecaster(HOUR, horizon_steps=24)
    for i, p in enumerate(prices):
        if 100 <= i < 110:
            continue  # ten hours missing
        forecaster.observe(T0 + i * HOUR, p)
    assert np.isnan(forecaster._prices[100:110]).all()
    forecast = forecaster.forecast()
    assert np.isfinite(forecast).all() and len(forecast) == 24
    with pytest.raises(ValueError, match="time order"):
        forecaster.observe(T0 + 5 * HOUR, 0.1)
    with pytest.raises(ValueError, match="grid"):
        forecaster.observe(T0 + len(prices) * HOUR + timedelta(minutes=7), 0.1)


# --- what a decision may know ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_with_no_foresight_a_decision_does_not_change_when_the_future_is_poisoned(
    strategy: str,
) -> None:
    prices = daily_prices(12)
    clean = run_backtest(points(prices), battery(), strategies=[strategy], foresight="none")
    for t in (30, 150, 230):
        poisoned = prices[: t + 1] + [3.0 * (-1) ** i for i in range(len(prices) - t - 1)]
        run = run_backtest(points(poisoned), battery(), strategies=[strategy], foresight="none")
        assert (
            run.strategies[strategy].power_kw[: t + 1]
            == clean.strategies[strategy].power_kw[: t + 1]
        )
    # The poison is not ignored once it is known: the strategy trades on it.
    assert (
        run.strategies[strategy].power_kw[t + 1 :] != clean.strategies[strategy].power_kw[t + 1 :]
    )


@pytest.mark.parametrize("strategy", ["optimal", "mpc"])
def test_with_day_ahead_foresight_a_decision_sees_only_what_the_auction_published(
    strategy: str,
) -> None:
    prices = daily_prices(9)
    publication = Publication()
    clean = run_backtest(points(prices), battery(), strategies=[strategy])
    t = 24 * 6 + 10  # 10:00 UTC = 11:00 in Brussels: tomorrow's prices are not out yet
    decided_at = T0 + t * HOUR
    hidden = [i for i in range(len(prices)) if publication.published_at(T0 + i * HOUR) > decided_at]
    assert hidden[0] == 24 * 7 - 1  # 23:00 UTC = tomorrow 00:00 in Brussels
    poisoned = [3.0 * (-1) ** i if i in hidden else p for i, p in enumerate(prices)]
    run = run_backtest(points(poisoned), battery(), strategies=[strategy])
    assert (
        run.strategies[strategy].power_kw[: t + 1] == clean.strategies[strategy].power_kw[: t + 1]
    )
    # At 13:00 Brussels time tomorrow's prices are out, and the plan changes.
    assert (
        run.strategies[strategy].power_kw[: hidden[0]]
        != clean.strategies[strategy].power_kw[: hidden[0]]
    )


def test_the_json_says_what_was_known_and_what_each_strategy_did() -> None:
    result = run_backtest(points(daily_prices(10)), battery(), foresight="none")
    summary: dict[str, Any] = result.to_json()
    assert summary["foresight"] == "none"
    assert set(summary["strategies"]) == set(STRATEGIES)
    for item in summary["strategies"].values():
        assert set(item) >= {
            "revenue",
            "share_of_bound",
            "energy_charged_kwh",
            "energy_discharged_kwh",
            "full_cycles",
        }
    mae = summary["forecast_mae_per_kwh_by_horizon"]
    assert set(mae) == {"1 step", "6h", "24h", "48h"}


# --- the mpc strategy -----------------------------------------------------------------------


def test_mpc_with_no_foresight_earns_most_of_the_bound_on_a_regular_market() -> None:
    result = run_backtest(
        points(daily_prices(21, noise=0.01)), battery(), strategies=["mpc"], foresight="none"
    )
    share = result.strategies["mpc"].revenue / result.bound.revenue
    assert share > 0.85


def test_mpc_charges_when_it_is_paid_to_and_keeps_within_the_limits() -> None:
    prices = daily_prices(10)
    prices[24 * 8 + 3 : 24 * 8 + 6] = [-0.2, -0.25, -0.2]  # paid to take energy
    model = battery(floor_kwh=2.0, ceiling_kwh=9.0)
    result = run_backtest(points(prices), model, initial_soc_pct=30, strategies=["mpc"])
    run = result.strategies["mpc"]
    # It empties to its floor just before (selling dear), and is full at their end.
    assert run.stored_kwh[24 * 8 + 2] == pytest.approx(2.0, abs=1e-6)
    assert run.stored_kwh[24 * 8 + 5] == pytest.approx(9.0, abs=1e-6)
    assert sum(run.power_kw[24 * 8 + 3 : 24 * 8 + 6]) * 0.9**0.5 == pytest.approx(-7.0, abs=1e-5)
    assert min(run.stored_kwh) >= 2.0 - 1e-6 and max(run.stored_kwh) <= 9.0 + 1e-6
    assert max(run.power_kw) <= 5 + 1e-9 and min(run.power_kw) >= -5 - 1e-9


def test_the_planner_plans_over_known_prices_then_forecasts_and_needs_the_current_one() -> None:
    planner = MpcPlanner(battery(), timedelta(minutes=15), horizon_h=6)
    assert planner.horizon_steps == 24
    prices = daily_prices(3, step=timedelta(minutes=15))
    for i, p in enumerate(prices[:200]):
        planner.observe(T0 + i * timedelta(minutes=15), p)
    now = T0 + 190 * timedelta(minutes=15)
    horizon = planner.horizon(now)
    assert horizon.known_steps == 10 and len(horizon.prices_per_kwh) == 24
    assert horizon.prices_per_kwh[:10] == prices[190:200]
    step = planner.decide(now, 5.0)
    assert step.horizon_steps == 24
    with pytest.raises(ValueError, match="not known"):
        planner.horizon(T0 + 300 * timedelta(minutes=15))


# --- the streaming agent runs the same planner ------------------------------------------------


def test_the_site_agent_decides_what_the_backtest_did_with_the_same_prices() -> None:
    from pipeline.schemas import BatteryReading, PriceTick
    from pipeline.settings import BatteryConfig, SiteConfig
    from processors.arbitrage import SiteArbitrage, SiteState

    prices = daily_prices(24, noise=0.03, seed=4)
    backtest = run_backtest(
        points(prices), battery(), initial_soc_pct=50, strategies=["mpc"], foresight="none"
    )
    planned = backtest.strategies["mpc"]
    config = BatteryConfig(
        device="b1",
        capacity_kwh=10,
        max_charge_kw=5,
        max_discharge_kw=5,
        round_trip_efficiency=0.9,
        soc_min_pct=0,
        soc_max_pct=100,
        reserve_pct=0,
        strategy="mpc",
    )
    engine, state = SiteArbitrage(SiteConfig(id="s", market="M", batteries=[config])), SiteState()
    for i, price in enumerate(prices):  # delivered at once, each known from its start only
        start = T0 + i * HOUR
        engine.on_price(
            state, PriceTick(market="M", start=start, end=start + HOUR, price_per_kwh=price)
        )
    assert SiteState.from_json(state.to_json()).history == state.history
    for i in range(len(prices) - 36, len(prices)):
        soc_pct = planned.stored_kwh[i - 1] * 10  # % of 10 kWh, as the backtest's battery
        reading = BatteryReading(device="b1", ts=T0 + i * HOUR, power_kw=0.0, soc_pct=soc_pct)
        (decision,) = engine.on_readings(state, [reading])
        assert decision.strategy == "mpc" and "MPC over 48 intervals (1 known" in decision.reason
        assert decision.power_kw == pytest.approx(planned.power_kw[i], abs=1e-6)
