"""Island mode (shed, generators, reconnect) and battery health on synthetic data."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.schemas import Alert, AlertStatus, BatteryReading, Command, Severity
from processors.allocation import default_consumers
from processors.island import (
    BatteryHealth,
    GridState,
    IslandConfig,
    IslandController,
    IslandState,
    SiteObservation,
)

T0 = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def island_config(**overrides: Any) -> IslandConfig:
    values: dict[str, Any] = {
        "site": "s1",
        # fleet, facility (critical), battery, opportunistic, export
        "consumers": [c.model_dump() for c in default_consumers()],
        "generators": [{"device": "gen1", "rated_kw": 20.0, "min_run_s": 1800.0}],
        "battery_capacity_kwh": 20.0,
        "battery_max_discharge_kw": 10.0,
        "battery_round_trip_efficiency": 0.81,
        "battery_min_soc_pct": 10.0,
        "generator_stop_soc_pct": 60.0,
        "horizon_h": 1.0,
        "start_confirm_s": 10.0,
        "failure_confirm_s": 2.0,
        "return_stable_s": 300.0,
    }
    values.update(overrides)
    return IslandConfig.model_validate(values)


def commands(out: list[Command | Alert], action: str | None = None) -> list[Command]:
    return [o for o in out if isinstance(o, Command) and (action is None or o.action == action)]


def alerts(out: list[Command | Alert]) -> list[Alert]:
    return [o for o in out if isinstance(o, Alert)]


def grid(ts: float, volts: float = 230.0, hz: float = 50.0, **site: Any) -> SiteObservation:
    return SiteObservation(ts=at(ts), grid_voltage_v=volts, grid_frequency_hz=hz, **site)


def islanded(
    controller: IslandController, **site: Any
) -> tuple[IslandState, list[Command | Alert]]:
    """A state islanded by a dead grid at t=0..2 s, and what islanding sent."""
    state = IslandState()
    out: list[Command | Alert] = []
    for second in (0, 1, 2):
        out += controller.step(state, grid(second, volts=0.0, hz=0.0, **site))
    assert state.grid is GridState.ISLANDED
    return state, out


class TestGridFailure:
    def test_a_dead_grid_sheds_non_critical_loads_and_fires_one_alert(self) -> None:
        controller = IslandController(island_config())
        state = IslandState()
        assert controller.step(state, grid(-1)) == []
        assert controller.step(state, grid(0, volts=0.0, hz=0.0)) == []
        assert controller.step(state, grid(1, volts=0.0, hz=0.0)) == []  # not confirmed yet
        out = controller.step(state, grid(2, volts=0.0, hz=0.0))
        assert state.grid is GridState.ISLANDED
        [alert] = alerts(out)
        assert (alert.alert_type, alert.severity, alert.status) == (
            "grid_failure",
            Severity.CRITICAL,
            AlertStatus.FIRING,
        )
        assert alert.start == at(0)  # the outage started when first seen, not when confirmed
        shed = commands(out, "shed")
        # Facility is critical; battery charging and export are flows, not loads.
        assert sorted(c.device for c in shed) == ["fleet", "opportunistic"]
        assert all(c.dry_run and c.source_id == alert.alert_id for c in shed)
        # Staying islanded does not repeat the alert or the sheds.
        assert alerts(controller.step(state, grid(3, volts=0.0, hz=0.0))) == []

    def test_a_short_sag_is_not_an_outage(self) -> None:
        controller = IslandController(island_config())
        state = IslandState()
        for second, volts in [(0, 150.0), (1, 150.0), (2, 229.0), (3, 150.0), (4, 231.0)]:
            assert controller.step(state, grid(second, volts=volts)) == []
        assert state.grid is GridState.CONNECTED

    def test_frequency_out_of_band_is_a_failure(self) -> None:
        controller = IslandController(island_config())
        state = IslandState()
        out = [o for s in (0, 1, 2) for o in controller.step(state, grid(s, hz=46.9))]
        assert state.grid is GridState.ISLANDED
        assert len(alerts(out)) == 1

    def test_an_explicit_grid_status_islands_at_once(self) -> None:
        controller = IslandController(island_config())
        state = IslandState()
        out = controller.step(state, SiteObservation(ts=at(0), grid_connected=False))
        assert state.grid is GridState.ISLANDED
        assert len(alerts(out)) == 1

    def test_ids_are_deterministic_and_state_survives_json(self) -> None:
        controller = IslandController(island_config())
        _, first = islanded(controller)
        _, again = islanded(controller)
        assert [o.model_dump() for o in first] == [o.model_dump() for o in again]
        ids = [c.command_id for c in commands(first)]
        assert len(set(ids)) == len(ids)
        state, _ = islanded(controller)
        restored = IslandState.from_json(state.to_json())
        assert restored == state


class TestGenerators:
    def test_a_load_beyond_the_battery_limit_starts_the_generator_after_confirmation(
        self,
    ) -> None:
        controller = IslandController(island_config())
        site = {"critical_load_kw": 15.0, "solar_kw": 2.0, "battery_soc_pct": 80.0}
        state, out = islanded(controller, **site)
        assert commands(out, "start_job") == []  # 13 kW > 10 kW, but only for 0 s yet
        assert commands(controller.step(state, grid(11, volts=0.0, **site)), "start_job") == []
        started = commands(controller.step(state, grid(12, volts=0.0, **site)), "start_job")
        assert [(c.device, c.setpoint_kw, c.dry_run) for c in started] == [("gen1", 20.0, True)]

    def test_a_battery_that_would_run_down_within_the_horizon_starts_it(self) -> None:
        controller = IslandController(island_config())
        # 8 kW from 40 %: 30 % of 20 kWh x 0.9 = 5.4 kWh, 0.675 h < 1 h.
        low = {"critical_load_kw": 8.0, "solar_kw": 0.0, "battery_soc_pct": 40.0}
        state, _ = islanded(controller, **low)
        out = controller.step(state, grid(20, volts=0.0, **low))
        assert [c.device for c in commands(out, "start_job")] == ["gen1"]
        # From 80 %: 12.6 kWh, 1.6 h: the battery carries it.
        high = {**low, "battery_soc_pct": 80.0}
        state, _ = islanded(controller, **high)
        assert commands(controller.step(state, grid(20, volts=0.0, **high))) == []

    def test_several_generators_are_staged_by_need(self) -> None:
        config = island_config(
            generators=[
                {"device": "gen1", "rated_kw": 10.0},
                {"device": "gen2", "rated_kw": 10.0},
                {"device": "gen3", "rated_kw": 10.0},
            ]
        )
        controller = IslandController(config)
        site = {"critical_load_kw": 18.0, "solar_kw": 0.0, "battery_soc_pct": 15.0}
        state, _ = islanded(controller, **site)
        out = controller.step(state, grid(20, volts=0.0, **site))
        assert [c.device for c in commands(out, "start_job")] == ["gen1", "gen2"]

    def test_noisy_load_does_not_make_the_generator_flap(self) -> None:
        controller = IslandController(island_config())
        rng = random.Random(7)
        state, out = islanded(controller, critical_load_kw=4.0, battery_soc_pct=30.0)
        soc = 30.0
        sent: list[Command | Alert] = list(out)
        # Two hours of load jumping between 2 and 14 kW every 5 s around the 10 kW limit,
        # while the generator slowly recharges the battery to 55 % (< 60 % stop level).
        for step in range(1, 1441):
            soc = min(55.0, soc + 0.02)
            load = rng.choice([2.0, 6.0, 9.5, 10.5, 14.0])
            sent += controller.step(
                state, grid(5 * step, volts=0.0, critical_load_kw=load, battery_soc_pct=soc)
            )
        assert [c.action for c in commands(sent) if c.device == "gen1"] == ["start_job"]
        # Battery recovered past the stop level and the load is light: one stop, after min run.
        sent = controller.step(
            state, grid(7300, volts=0.0, critical_load_kw=2.0, battery_soc_pct=70.0)
        )
        assert [c.action for c in commands(sent)] == ["stop_job"]
        assert state.running == {}
        # Short spikes above the battery limit (one 5 s reading each) do not restart it.
        restarts: list[Command | Alert] = []
        for step in range(1, 121):
            load = 14.0 if step % 6 == 0 else 3.0
            restarts += controller.step(
                state,
                grid(7300 + 5 * step, volts=0.0, critical_load_kw=load, battery_soc_pct=70.0),
            )
        assert commands(restarts) == []

    def test_the_generator_keeps_its_minimum_run_time(self) -> None:
        controller = IslandController(island_config())
        site = {"critical_load_kw": 12.0, "battery_soc_pct": 50.0}
        state, _ = islanded(controller, **site)
        controller.step(state, grid(20, volts=0.0, **site))
        assert "gen1" in state.running
        recovered = {"critical_load_kw": 1.0, "battery_soc_pct": 90.0}
        assert commands(controller.step(state, grid(600, volts=0.0, **recovered))) == []
        stop = commands(controller.step(state, grid(20 + 1800, volts=0.0, **recovered)))
        assert [c.action for c in stop] == ["stop_job"]


class TestGridReturn:
    def test_a_stable_return_restores_loads_stops_generators_and_resolves(self) -> None:
        controller = IslandController(island_config())
        site = {"critical_load_kw": 15.0, "battery_soc_pct": 30.0}
        state, out = islanded(controller, **site)
        [firing] = alerts(out)
        controller.step(state, grid(20, volts=0.0, **site))
        assert "gen1" in state.running
        # Grid back at t=100; a blip at t=200 restarts the 300 s clock.
        returned: list[Command | Alert] = []
        for second in range(100, 600, 10):
            volts = 120.0 if second == 200 else 231.0
            returned += controller.step(state, grid(second, volts=volts, **site))
            if second < 510:
                assert state.grid is GridState.ISLANDED, second
        assert state.grid is GridState.CONNECTED
        assert [(c.device, c.action) for c in commands(returned)] == [
            ("gen1", "stop_job"),
            ("fleet", "restore"),
            ("opportunistic", "restore"),
        ]
        assert all(c.issued_at == at(510) for c in commands(returned))
        [resolved] = alerts(returned)
        assert resolved.status is AlertStatus.RESOLVED
        assert resolved.alert_id == firing.alert_id
        assert (resolved.start, resolved.end) == (at(0), at(510))
        assert state.shed == [] and state.running == {}

    def test_a_second_outage_is_a_new_incident(self) -> None:
        controller = IslandController(island_config(return_stable_s=0.0))
        state, first = islanded(controller)
        controller.step(state, grid(10))
        assert state.grid is GridState.CONNECTED
        second = controller.step(state, SiteObservation(ts=at(20), grid_connected=False))
        assert alerts(first)[0].alert_id != alerts(second)[0].alert_id

    def test_config_errors_name_the_setting(self) -> None:
        with pytest.raises(ValidationError, match="generator_stop_soc_pct"):
            island_config(generator_stop_soc_pct=5.0)
        with pytest.raises(ValidationError, match="min_frequency_hz"):
            island_config(min_frequency_hz=52.0)
        with pytest.raises(ValidationError, match="duplicate generators"):
            island_config(generators=[{"device": "g", "rated_kw": 1}] * 2)


# --- battery health --------------------------------------------------------------------------


def synthetic_cycle(
    round_trip_efficiency: float, quantise_pct: float | None = None
) -> list[tuple[datetime, float, float]]:
    """A 10 kWh battery, one reading a minute: charge 5 kW for 1 h from 20 %, rest 10 min,
    discharge 4.5 kW until a little below 20 %. Returns (ts, power_kw, soc_pct)."""
    eta = math.sqrt(round_trip_efficiency)
    capacity_kwh = 10.0
    soc = 20.0
    powers = [-5.0] * 60 + [0.0] * 10 + [4.5] * 66
    readings = []
    for minute, power_kw in enumerate(powers):
        shown = soc if quantise_pct is None else round(soc / quantise_pct) * quantise_pct
        readings.append((at(60 * minute), power_kw, shown))
        # The power read at a minute holds for that minute (the tracker's convention).
        energy_kwh = power_kw / 60.0
        cell_kwh = -energy_kwh * eta if energy_kwh < 0 else -energy_kwh / eta
        soc += cell_kwh / capacity_kwh * 100.0
    return readings


class TestBatteryHealth:
    def test_a_closed_cycle_measures_the_round_trip_efficiency(self) -> None:
        health = BatteryHealth("b1", 10.0, floor_soc_pct=20.0)
        for ts, power_kw, soc in synthetic_cycle(0.90):
            snapshot = health.update(ts, power_kw, soc)
        assert snapshot.closed_cycles == 1
        assert snapshot.measured_round_trip_efficiency == pytest.approx(0.90, rel=1e-9)
        assert snapshot.energy_in_kwh == pytest.approx(5.0)
        # 66 minutes at 4.5 kW were integrated (the last reading's power is not yet).
        assert snapshot.energy_out_kwh == pytest.approx(4.5 * 65 / 60)
        assert snapshot.equivalent_full_cycles == pytest.approx((5.0 + 4.5 * 65 / 60) / 20.0)

    @pytest.mark.parametrize("efficiency", [0.75, 0.85, 0.95])
    def test_measurement_tracks_the_true_efficiency_with_quantised_soc(
        self, efficiency: float
    ) -> None:
        health = BatteryHealth("b1", 10.0)
        for ts, power_kw, soc in synthetic_cycle(efficiency, quantise_pct=0.1):
            health.update(ts, power_kw, soc)
        measured = health.measured_round_trip_efficiency
        assert measured is not None
        assert measured == pytest.approx(efficiency, abs=0.01)

    def test_no_efficiency_before_a_cycle_closes(self) -> None:
        health = BatteryHealth("b1", 10.0)
        for ts, power_kw, soc in synthetic_cycle(0.9)[:100]:  # still above the start SOC
            snapshot = health.update(ts, power_kw, soc)
        assert snapshot.closed_cycles == 0
        assert snapshot.measured_round_trip_efficiency is None

    def test_runtime_at_the_current_load(self) -> None:
        health = BatteryHealth("b1", 10.0, floor_soc_pct=20.0, rated_round_trip_efficiency=0.81)
        snapshot = health.update(T0, 4.0, 60.0)
        # 40 % of 10 kWh in the cells, 0.9 of it delivered: 3.6 kWh at 4 kW.
        assert snapshot.runtime_h == pytest.approx(0.9)
        assert snapshot.energy_kwh == pytest.approx(6.0)
        assert health.update(at(60), -3.0, 60.5).runtime_h is None  # charging
        assert health.update(at(120), 2.0, 15.0).runtime_h == 0.0  # below the floor

    def test_runtime_uses_the_measured_efficiency_once_known(self) -> None:
        health = BatteryHealth("b1", 10.0, floor_soc_pct=20.0, rated_round_trip_efficiency=0.5)
        for ts, power_kw, soc in synthetic_cycle(0.81):
            health.update(ts, power_kw, soc)
        snapshot = health.update(at(60 * 200), 4.0, 60.0)
        assert snapshot.runtime_h == pytest.approx(0.9, rel=1e-6)

    def test_gaps_and_out_of_order_readings_invent_no_energy(self) -> None:
        health = BatteryHealth("b1", 10.0, max_gap_s=900.0)
        health.update(T0, -5.0, 50.0)
        health.update(at(3600), -5.0, 70.0)  # one hour of silence: not integrated
        assert health.energy_in_kwh == 0.0
        health.update(at(3660), -5.0, 70.8)
        assert health.energy_in_kwh == pytest.approx(5.0 / 60)
        before = health.energy_in_kwh
        health.update(at(3630), -5.0, 70.4)
        assert (health.energy_in_kwh, health.out_of_order) == (before, 1)

    def test_feed_takes_battery_readings_of_its_device_only(self) -> None:
        health = BatteryHealth("b1", 10.0)
        reading = BatteryReading(device="b1", ts=T0, power_kw=1.0, soc_pct=50.0)
        assert health.feed(reading).soc_pct == 50.0
        with pytest.raises(ValueError, match="'b2'"):
            health.feed(reading.model_copy(update={"device": "b2"}))
        with pytest.raises(ValueError, match="non-finite"):
            health.update(at(1), math.nan, 50.0)
