"""The threshold rule at its edges, and the reading/price join in any arrival order."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.schemas import Action, BatteryReading, PriceTick
from pipeline.settings import BatteryConfig, SiteConfig
from processors.arbitrage import (
    MAX_UNPRICED,
    SiteArbitrage,
    SiteState,
    command_for,
    decide_threshold,
)


def battery(**overrides: object) -> BatteryConfig:
    values: dict[str, object] = {
        "device": "b1",
        "capacity_kwh": 10.0,
        "max_charge_kw": 5.0,
        "max_discharge_kw": 4.0,
        "round_trip_efficiency": 0.81,  # sqrt = 0.9 each way: easy numbers
        "soc_min_pct": 10.0,
        "soc_max_pct": 90.0,
        "reserve_pct": 20.0,
        "charge_below_price_per_kwh": 0.05,
        "discharge_above_price_per_kwh": 0.15,
    }
    values.update(overrides)
    return BatteryConfig.model_validate(values)


class TestThresholdRule:
    def test_cheap_price_charges_at_the_rate_limit(self) -> None:
        setpoint = decide_threshold(battery(), soc_pct=50.0, price_per_kwh=0.02, duration_h=0.5)
        assert setpoint.action is Action.CHARGE
        assert setpoint.power_kw == pytest.approx(-5.0)
        assert setpoint.grid_energy_kwh == pytest.approx(-2.5)
        # 2.5 kWh bought, 0.9 of it stored in a 10 kWh battery: +22.5 points of SoC.
        assert setpoint.expected_soc_pct == pytest.approx(72.5)
        assert setpoint.binding == ("max_charge_kw",)

    def test_dear_price_discharges_at_the_rate_limit(self) -> None:
        setpoint = decide_threshold(battery(), soc_pct=80.0, price_per_kwh=0.30, duration_h=0.5)
        assert setpoint.action is Action.DISCHARGE
        assert setpoint.power_kw == pytest.approx(4.0)
        assert setpoint.grid_energy_kwh == pytest.approx(2.0)
        # 2 kWh delivered costs 2/0.9 kWh from the cells: -22.2 points.
        assert setpoint.expected_soc_pct == pytest.approx(80.0 - 2.0 / 0.9 / 10 * 100)
        assert setpoint.binding == ("max_discharge_kw",)

    def test_price_between_thresholds_holds(self) -> None:
        setpoint = decide_threshold(battery(), soc_pct=50.0, price_per_kwh=0.10, duration_h=1.0)
        assert (setpoint.action, setpoint.power_kw, setpoint.grid_energy_kwh) == (
            Action.HOLD,
            0.0,
            0.0,
        )

    @pytest.mark.parametrize("price", [0.05, 0.15])
    def test_a_price_equal_to_a_threshold_holds(self, price: float) -> None:
        assert decide_threshold(battery(), 50.0, price, 1.0).action is Action.HOLD

    def test_full_battery_does_not_charge(self) -> None:
        setpoint = decide_threshold(battery(), soc_pct=90.0, price_per_kwh=0.01, duration_h=1.0)
        assert setpoint.action is Action.HOLD
        assert setpoint.binding == ("soc_max_pct",)
        assert "full" in setpoint.reason

    def test_battery_above_its_maximum_does_not_charge(self) -> None:
        assert decide_threshold(battery(), 97.0, 0.01, 1.0).action is Action.HOLD

    def test_empty_battery_does_not_discharge(self) -> None:
        setpoint = decide_threshold(battery(), soc_pct=20.0, price_per_kwh=0.50, duration_h=1.0)
        assert setpoint.action is Action.HOLD
        assert setpoint.binding == ("reserve_pct",)

    def test_battery_below_its_minimum_still_charges(self) -> None:
        # A real battery can report a SoC under its configured minimum: no error, just charge.
        setpoint = decide_threshold(battery(), soc_pct=3.0, price_per_kwh=0.01, duration_h=1.0)
        assert setpoint.action is Action.CHARGE

    def test_headroom_limits_charge_below_the_rate(self) -> None:
        # 2 kWh of headroom stores from 2/0.9 kWh bought over 1 h: 2.22 kW < 5 kW.
        setpoint = decide_threshold(battery(), soc_pct=70.0, price_per_kwh=0.01, duration_h=1.0)
        assert setpoint.power_kw == pytest.approx(-2.0 / 0.9)
        assert setpoint.expected_soc_pct == pytest.approx(90.0)
        assert setpoint.binding == ("soc_max_pct",)

    def test_reserve_limits_discharge(self) -> None:
        # 1 kWh above the 20 % reserve delivers 0.9 kWh over 1 h.
        setpoint = decide_threshold(battery(), soc_pct=30.0, price_per_kwh=0.50, duration_h=1.0)
        assert setpoint.power_kw == pytest.approx(0.9)
        assert setpoint.expected_soc_pct == pytest.approx(20.0)
        assert setpoint.binding == ("reserve_pct",)

    def test_soc_min_binds_when_the_reserve_is_lower(self) -> None:
        setpoint = decide_threshold(battery(reserve_pct=0.0), 10.0, 0.50, 1.0)
        assert setpoint.action is Action.HOLD
        assert setpoint.binding == ("soc_min_pct",)

    def test_negative_price_charges_and_earns(self) -> None:
        setpoint = decide_threshold(battery(), soc_pct=50.0, price_per_kwh=-0.03, duration_h=1.0)
        assert setpoint.action is Action.CHARGE
        # Buying at a negative price is income: energy < 0 times price < 0.
        assert setpoint.grid_energy_kwh * -0.03 > 0

    def test_lower_efficiency_stores_less(self) -> None:
        lossy = decide_threshold(battery(round_trip_efficiency=0.64), 50.0, 0.01, 0.5)
        lossless = decide_threshold(battery(round_trip_efficiency=1.0), 50.0, 0.01, 0.5)
        assert lossy.grid_energy_kwh == lossless.grid_energy_kwh
        assert lossy.expected_soc_pct == pytest.approx(50.0 + 2.5 * 0.8 * 10)
        assert lossless.expected_soc_pct == pytest.approx(75.0)

    def test_non_positive_duration_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="duration_h"):
            decide_threshold(battery(), 50.0, 0.01, 0.0)

    @settings(max_examples=300, deadline=None)
    @given(
        soc=st.floats(0.0, 100.0),
        price=st.floats(-1.0, 5.0),
        duration_h=st.floats(1 / 60, 1.0),
        efficiency=st.floats(0.5, 1.0),
    )
    def test_limits_always_hold(
        self, soc: float, price: float, duration_h: float, efficiency: float
    ) -> None:
        spec = battery(round_trip_efficiency=efficiency)
        setpoint = decide_threshold(spec, soc, price, duration_h)
        assert -spec.max_charge_kw - 1e-9 <= setpoint.power_kw <= spec.max_discharge_kw + 1e-9
        assert math.isclose(setpoint.grid_energy_kwh, setpoint.power_kw * duration_h, abs_tol=1e-9)
        if setpoint.action is Action.CHARGE:
            assert setpoint.expected_soc_pct <= spec.soc_max_pct + 1e-9
        if setpoint.action is Action.DISCHARGE:
            assert setpoint.expected_soc_pct >= max(spec.soc_min_pct, spec.reserve_pct) - 1e-9


T0 = datetime(2025, 4, 7, tzinfo=UTC)
SITE = SiteConfig(id="s1", market="M", batteries=[battery()])


def reading(minute: int, soc: float, device: str = "b1") -> BatteryReading:
    return BatteryReading(
        device=device, ts=T0 + timedelta(minutes=minute), power_kw=0.0, soc_pct=soc
    )


def tick(hour: int, price: float) -> PriceTick:
    start = T0 + timedelta(hours=hour)
    return PriceTick(market="M", start=start, end=start + timedelta(hours=1), price_per_kwh=price)


class TestSiteJoin:
    def test_one_decision_per_interval_from_its_first_reading(self) -> None:
        engine, state = SiteArbitrage(SITE), SiteState()
        engine.on_price(state, tick(0, 0.01))
        decisions = engine.on_readings(state, [reading(m, 50.0 + m / 10) for m in range(0, 60, 5)])
        assert len(decisions) == 1
        decision = decisions[0]
        assert decision.action is Action.CHARGE
        assert decision.soc_pct == 50.0
        assert decision.decided_at == T0
        assert decision.valid_from == T0 and decision.valid_until == T0 + timedelta(hours=1)
        assert decision.expected_revenue == pytest.approx(decision.grid_energy_kwh * 0.01)

    def test_a_reading_inside_the_interval_decides_for_the_rest_of_it(self) -> None:
        engine, state = SiteArbitrage(SITE), SiteState()
        engine.on_price(state, tick(0, 0.01))
        (decision,) = engine.on_readings(state, [reading(30, 50.0)])
        assert decision.grid_energy_kwh == pytest.approx(-5.0 * 0.5)

    def test_readings_wait_for_their_price(self) -> None:
        engine, state = SiteArbitrage(SITE), SiteState()
        assert engine.on_readings(state, [reading(0, 40.0), reading(61, 60.0)]) == []
        first = engine.on_price(state, tick(0, 0.30))
        assert [d.soc_pct for d in first] == [40.0]
        second = engine.on_price(state, tick(1, 0.01))
        assert [(d.soc_pct, d.action) for d in second] == [(60.0, Action.CHARGE)]
        assert state.batteries["b1"].unpriced == []

    def test_unknown_batteries_are_ignored(self) -> None:
        engine, state = SiteArbitrage(SITE), SiteState()
        engine.on_price(state, tick(0, 0.01))
        assert engine.on_readings(state, [reading(0, 50.0, device="other")]) == []

    def test_decision_ids_are_deterministic(self) -> None:
        runs = []
        for _ in range(2):
            engine, state = SiteArbitrage(SITE), SiteState()
            engine.on_price(state, tick(0, 0.01))
            runs.append(engine.on_readings(state, [reading(0, 50.0)])[0].decision_id)
        assert runs[0] == runs[1]

    def test_state_survives_a_json_round_trip(self) -> None:
        engine, state = SiteArbitrage(SITE), SiteState()
        engine.on_readings(state, [reading(0, 40.0)])
        engine.on_price(state, tick(1, 0.2))
        restored = SiteState.from_json(state.to_json())
        assert restored == state
        assert [d.soc_pct for d in engine.on_price(restored, tick(0, 0.3))] == [40.0]

    def test_waiting_readings_keep_the_first_of_each_5_minute_bucket(self) -> None:
        engine, state = SiteArbitrage(SITE), SiteState()
        engine.on_readings(state, [reading(m, 50.0 + m) for m in range(12)])
        assert [soc for _, soc in state.batteries["b1"].unpriced] == [50.0, 55.0, 60.0]

    def test_waiting_readings_are_kept_and_decided_in_time_order(self) -> None:
        # A late reading of an earlier interval waits in its place: the tick of its own
        # interval finds it (a slice of the waiting list), the others keep waiting.
        engine, state = SiteArbitrage(SITE), SiteState()
        engine.on_readings(state, [reading(125, 70.0), reading(0, 40.0), reading(61, 60.0)])
        assert [soc for _, soc in state.batteries["b1"].unpriced] == [40.0, 60.0, 70.0]
        # A state saved unordered (by an older version) is ordered when restored.
        saved = state.to_json()
        saved["batteries"]["b1"]["unpriced"].reverse()
        restored = SiteState.from_json(saved)
        assert restored == state
        assert [d.soc_pct for d in engine.on_price(state, tick(1, 0.01))] == [60.0]
        assert [soc for _, soc in state.batteries["b1"].unpriced] == [40.0, 70.0]

    def test_an_earlier_reading_of_a_bucket_arriving_late_takes_its_place(self) -> None:
        engine, state = SiteArbitrage(SITE), SiteState()
        engine.on_readings(state, [reading(3, 53.0), reading(7, 57.0)])
        engine.on_readings(state, [reading(4, 54.0), reading(1, 51.0), reading(6, 56.0)])
        assert [soc for _, soc in state.batteries["b1"].unpriced] == [51.0, 56.0]

    def test_readings_read_again_after_a_restart_do_not_push_out_waiting_ones(self) -> None:
        """A worker restarted from its committed offsets reads again what its state holds,
        behind newer readings: that neither grows the waiting list nor drops from it."""
        engine, state = SiteArbitrage(SITE), SiteState()
        days = 30  # within MAX_UNPRICED buckets
        minutes = range(0, days * 24 * 60)
        engine.on_readings(state, [reading(m, 50.0) for m in minutes])
        waiting = list(state.batteries["b1"].unpriced)
        assert len(waiting) == days * 24 * 12 <= MAX_UNPRICED
        engine.on_readings(state, [reading(m, 50.0) for m in minutes[-3 * 24 * 60 :]])
        assert state.batteries["b1"].unpriced == waiting
        assert state.dropped_unpriced == 0
        (decision,) = engine.on_price(state, tick(0, 0.01))
        assert decision.decided_at == T0

    def test_a_state_saved_with_several_readings_per_bucket_keeps_the_earliest(self) -> None:
        saved = SiteState().to_json()
        minute_ms = 60_000
        t0_ms = int(T0.timestamp() * 1000)
        saved["batteries"] = {
            "b1": {
                "last": None,
                "unpriced": [
                    [t0_ms + 6 * minute_ms, 56.0],
                    [t0_ms, 50.0],
                    [t0_ms, 50.0],
                    [t0_ms + 2 * minute_ms, 52.0],
                ],
            }
        }
        restored = SiteState.from_json(saved)
        assert restored.batteries["b1"].unpriced == [(t0_ms, 50.0), (t0_ms + 6 * minute_ms, 56.0)]

    def test_waiting_readings_are_bounded_by_count_not_by_event_time(self) -> None:
        engine, state = SiteArbitrage(SITE), SiteState()
        days = 40
        engine.on_readings(state, [reading(m, 50.0) for m in range(0, days * 24 * 60, 5)])
        assert len(state.batteries["b1"].unpriced) == MAX_UNPRICED
        assert state.dropped_unpriced == days * 24 * 12 - MAX_UNPRICED
        # A price for a day long past still decides, however far ahead the readings ran.
        (decision,) = engine.on_price(state, tick(24 * 20, 0.01))
        assert decision.valid_from == T0 + timedelta(days=20)

    @settings(max_examples=50, deadline=None)
    @given(seed=st.integers(0, 10_000))
    def test_arrival_order_does_not_change_the_decisions(self, seed: int) -> None:
        """Prices and readings arrive on two topics: any interleaving gives the same decisions."""
        rng = random.Random(seed)
        readings = [reading(m, 20.0 + (m % 700) / 10) for m in range(0, 12 * 60, 7)]
        ticks = [tick(h, rng.choice([-0.02, 0.01, 0.10, 0.20, 0.40])) for h in range(12)]
        chunks = [readings[i : i + rng.randint(1, 20)] for i in range(0, len(readings), 20)]
        reference_engine, reference_state = SiteArbitrage(SITE), SiteState()
        for t in ticks:
            reference_engine.on_price(reference_state, t)
        expected = [
            d for chunk in chunks for d in reference_engine.on_readings(reference_state, chunk)
        ]

        # Interleave the two streams at random, each keeping its own order.
        engine, state = SiteArbitrage(SITE), SiteState()
        got = []
        p_queue, r_queue = list(ticks), list(chunks)
        while p_queue or r_queue:
            take_price = p_queue and (not r_queue or rng.random() < 0.5)
            if take_price:
                got.extend(engine.on_price(state, p_queue.pop(0)))
            else:
                got.extend(engine.on_readings(state, r_queue.pop(0)))
        assert sorted(got, key=lambda d: d.valid_from) == expected


class TestOptimalStrategy:
    """The ``optimal`` strategy inside the site engine: same join, an LP per decision."""

    @staticmethod
    def engine(**overrides: object) -> SiteArbitrage:
        optimal = battery(
            strategy="optimal",
            charge_below_price_per_kwh=None,
            discharge_above_price_per_kwh=None,
            **overrides,
        )
        return SiteArbitrage(SiteConfig(id="s", market="M", batteries=[optimal]))

    @staticmethod
    def day_ahead(hour: int, price: float, published_hour: int) -> PriceTick:
        start = T0 + timedelta(hours=hour)
        return PriceTick(
            market="M",
            start=start,
            end=start + timedelta(hours=1),
            price_per_kwh=price,
            published_at=T0 + timedelta(hours=published_hour),
        )

    def test_charges_before_a_known_peak_and_discharges_into_it(self) -> None:
        engine, state = self.engine(), SiteState()
        prices = [0.10, 0.02, 0.02, 0.10, 0.40, 0.40, 0.10, 0.10]
        for hour, price in enumerate(prices):
            engine.on_price(state, self.day_ahead(hour, price, published_hour=-12))
        decisions = []
        soc = 30.0
        for hour in range(len(prices)):
            (decision,) = engine.on_readings(state, [reading(hour * 60, soc)])
            decisions.append(decision)
            soc = decision.expected_soc_pct
        actions = [d.action for d in decisions]
        assert actions[1] is Action.CHARGE and actions[2] is Action.CHARGE
        assert actions[4] is Action.DISCHARGE and actions[5] is Action.DISCHARGE
        assert all(d.strategy == "optimal" for d in decisions)
        assert "LP over" in decisions[0].reason
        # Limits hold: rates, and never below the reserve (20 %) nor above soc_max (90 %).
        assert all(-5.0 - 1e-6 <= d.power_kw <= 4.0 + 1e-6 for d in decisions)
        assert all(20.0 - 1e-6 <= d.expected_soc_pct <= 90.0 + 1e-6 for d in decisions)

    def test_plans_only_over_prices_published_by_the_decision(self) -> None:
        # Without the spike no spread pays for the losses (0.05 / 0.81 > 0.055), and a kWh
        # kept is valued at 0.9 x median 0.055 < 0.05 / 0.9: nothing to buy for.
        prices = [0.05, 0.055, 0.055, 0.60]
        soc = 20.0

        def first_decision(published_hour: int) -> Action:
            engine, state = self.engine(), SiteState()
            for hour, price in enumerate(prices[:3]):
                engine.on_price(state, self.day_ahead(hour, price, published_hour=-1))
            # The spike at hour 3 is delivered at once but published at published_hour.
            engine.on_price(state, self.day_ahead(3, prices[3], published_hour=published_hour))
            (decision,) = engine.on_readings(state, [reading(0, soc)])
            return decision.action

        assert first_decision(published_hour=-1) is Action.CHARGE  # the spike is known
        assert first_decision(published_hour=2) is not Action.CHARGE  # not yet: no peeking

    def test_the_plan_is_followed_until_prices_arrive_or_the_battery_drifts(self) -> None:
        engine, state = self.engine(), SiteState()
        prices = [0.02, 0.02, 0.30, 0.30, 0.10, 0.10]
        for hour, price in enumerate(prices):
            engine.on_price(state, self.day_ahead(hour, price, published_hour=-12))
        (first,) = engine.on_readings(state, [reading(0, 30.0)])
        assert "new plan" in first.reason
        # The battery did what was planned: the plan goes on.
        (second,) = engine.on_readings(state, [reading(60, first.expected_soc_pct)])
        assert "step 2 of the plan" in second.reason
        # It did not (a 10-point drift): plan again from what was measured.
        (third,) = engine.on_readings(state, [reading(120, second.expected_soc_pct - 10)])
        assert "new plan" in third.reason
        # New prices published: plan again over the longer horizon.
        engine.on_price(state, self.day_ahead(6, 0.5, published_hour=2))
        (fourth,) = engine.on_readings(state, [reading(180, third.expected_soc_pct)])
        assert "new plan" in fourth.reason and "over 4 known" in fourth.reason

    def test_a_battery_below_its_reserve_is_not_discharged(self) -> None:
        engine, state = self.engine(), SiteState()
        engine.on_price(state, self.day_ahead(0, 0.90, published_hour=-1))
        (decision,) = engine.on_readings(state, [reading(0, 15.0)])
        assert decision.action is not Action.DISCHARGE

    def test_state_with_publication_times_round_trips(self) -> None:
        engine, state = self.engine(), SiteState()
        engine.on_price(state, self.day_ahead(0, 0.1, published_hour=-5))
        again = SiteState.from_json(state.to_json())
        assert again.intervals == state.intervals
        assert again.intervals[0].published_ms == int((T0 - timedelta(hours=5)).timestamp() * 1000)
        # State written before publication times were kept still loads.
        old = state.to_json()
        old["intervals"] = [row[:4] for row in old["intervals"]]
        assert SiteState.from_json(old).intervals[0].published_ms is None


def test_threshold_needs_its_thresholds_optimal_does_not() -> None:
    with pytest.raises(ValueError, match="needs charge_below_price_per_kwh"):
        battery(charge_below_price_per_kwh=None)
    optimal = battery(
        strategy="optimal", charge_below_price_per_kwh=None, discharge_above_price_per_kwh=None
    )
    assert optimal.strategy == "optimal"


def test_a_decision_becomes_a_command_dry_run_unless_live() -> None:
    engine, state = SiteArbitrage(SITE), SiteState()
    engine.on_price(state, tick(0, 0.01))
    (decision,) = engine.on_readings(state, [reading(0, 50.0)])
    command = command_for(decision, battery())
    assert command is not None
    assert (command.action, command.setpoint_kw, command.source_id) == (
        "set_power",
        decision.power_kw,
        decision.decision_id,
    )
    assert command.dry_run and command.valid_until == decision.valid_until
    assert command_for(decision, battery()) == command  # deterministic id: replays repeat it
    live = command_for(decision, battery(commands="live"))
    assert live is not None and not live.dry_run
    assert command_for(decision, battery(commands="off")) is None
