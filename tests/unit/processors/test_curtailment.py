"""Mismatch detection and curtailment planning, per home and per transformer, on
synthetic readings.

The street: two homes behind one transformer. Home h1 has a meter, a PV inverter, a
battery and a heat pump; home h2 has a meter and a PV inverter. Every test feeds
event-time readings and checks what is sent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.schemas import (
    Alert,
    AlertStatus,
    BatteryReading,
    Command,
    HomeReading,
    MeterReading,
    Reading,
    Severity,
    SolarReading,
)
from pipeline.settings import SettingsError, SiteConfig
from processors.alerting import incident_id
from processors.curtailment import (
    CurtailmentEngine,
    CurtailmentSettings,
    CurtailmentState,
    curtailment_settings,
)

SITE = "street"
T0 = datetime(2025, 6, 2, 11, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def h1(**overrides: Any) -> dict[str, Any]:
    return {
        "id": "h1",
        "transformer": "tx",
        "meter": "m1",
        "solar": [{"device": "pv1", "rated_kw": 8.0}],
        "batteries": [{"device": "b1", "max_charge_kw": 4.0, "max_discharge_kw": 5.0}],
        "loads": [{"device": "hp1", "max_kw": 3.0}],
        "max_import_kw": 10.0,
        "max_export_kw": 3.0,
        "tolerance_kw": 0.2,
        "hysteresis_kw": 0.5,
        **overrides,
    }


def h2(**overrides: Any) -> dict[str, Any]:
    return {
        "id": "h2",
        "transformer": "tx",
        "meter": "m2",
        "solar": [{"device": "pv2", "rated_kw": 6.0}],
        **overrides,
    }


def settings(homes: list[dict[str, Any]] | None = None, **overrides: Any) -> CurtailmentSettings:
    values: dict[str, Any] = {
        "site": SITE,
        "homes": [h1(), h2()] if homes is None else homes,
        "transformers": [
            {"id": "tx", "rating_kw": 20.0, "max_reverse_kw": 12.0, "tolerance_kw": 1.0}
        ],
        "persist_s": 60.0,
        "resolve_s": 300.0,
        **overrides,
    }
    return CurtailmentSettings.model_validate(values)


def street(
    t: float,
    *,
    m1: float | None = -2.0,
    pv1: float | None = 4.0,
    b1: float | None = 0.0,
    b1_soc: float = 50.0,
    hp1: float | None = 1.0,
    m2: float | None = 0.5,
    pv2: float | None = 0.0,
) -> list[Reading]:
    """One instant of the street; None leaves a device out (silent)."""
    ts = at(t)
    out: list[Reading] = []
    if m1 is not None:
        out.append(MeterReading(device="m1", ts=ts, power_kw=m1))
    if pv1 is not None:
        out.append(SolarReading(device="pv1", ts=ts, power_kw=pv1))
    if b1 is not None:
        out.append(BatteryReading(device="b1", ts=ts, power_kw=b1, soc_pct=b1_soc))
    if hp1 is not None:
        out.append(HomeReading(device="hp1", ts=ts, power_kw=hp1))
    if m2 is not None:
        out.append(MeterReading(device="m2", ts=ts, power_kw=m2))
    if pv2 is not None:
        out.append(SolarReading(device="pv2", ts=ts, power_kw=pv2))
    return out


def run(
    engine: CurtailmentEngine, seconds: range | list[int], **site: Any
) -> tuple[CurtailmentState, list[Alert | Command]]:
    state = CurtailmentState()
    out: list[Alert | Command] = []
    for t in seconds:
        out += engine.on_readings(state, street(t, **site))
    return state, out


def alerts(out: list[Alert | Command]) -> list[Alert]:
    return [o for o in out if isinstance(o, Alert)]


def commands(out: list[Alert | Command]) -> list[Command]:
    return [o for o in out if isinstance(o, Command)]


def setpoints(out: list[Alert | Command]) -> list[tuple[str, str, float | None]]:
    return [(c.device, c.action, c.setpoint_kw) for c in commands(out)]


# --- detection: tolerance and persistence -------------------------------------------------


def test_a_mismatch_exactly_at_the_tolerance_is_no_mismatch() -> None:
    # Export 3.2 kW against a 3 kW limit with 0.2 kW tolerance, for ten minutes.
    _, out = run(CurtailmentEngine(settings()), range(0, 601, 10), m1=-3.2)
    assert out == []


def test_just_over_the_tolerance_but_shorter_than_persist_s_does_nothing() -> None:
    engine = CurtailmentEngine(settings())
    state = CurtailmentState()
    out: list[Alert | Command] = []
    for t in range(0, 60, 10):  # over for 50 s of a 60 s persistence
        out += engine.on_readings(state, street(t, m1=-3.21))
    out += engine.on_readings(state, street(60, m1=-2.0))  # back within: the clock restarts
    for t in range(70, 130, 10):
        out += engine.on_readings(state, street(t, m1=-3.21))
    assert out == []
    out += engine.on_readings(state, street(130, m1=-3.21))  # 60 s over since 70 s
    assert [a.alert_type for a in alerts(out)] == ["home_export_limit"]
    assert alerts(out)[0].start == at(70)


# --- the plan: order, stopping when covered, device limits --------------------------------


def test_a_sustained_export_plans_loads_then_solar_and_stops_when_covered() -> None:
    # Export 8 kW against 3 kW: 5 kW to cover. The heat pump can rise by 2 kW (1 -> 3),
    # PV gives the other 3 kW (6 -> 3); the battery is not needed.
    engine = CurtailmentEngine(settings())
    _, out = run(engine, range(0, 61, 10), m1=-8.0, pv1=6.0)
    [alert] = alerts(out)
    assert alert.alert_type == "home_export_limit"
    assert alert.severity is Severity.WARNING
    assert alert.status is AlertStatus.FIRING
    assert alert.device == "h1" and alert.start == at(0)
    assert alert.alert_id == incident_id(SITE, "h1", "home_export_limit", at(0))
    assert alert.observed == pytest.approx(8.0) and alert.expected == pytest.approx(3.0)
    assert setpoints(out) == [("hp1", "set_power", 3.0), ("pv1", "set_power", 3.0)]
    assert alert.details["excess_kw"] == pytest.approx(5.0)
    assert alert.details["covered_kw"] == pytest.approx(5.0)
    assert alert.details["shortfall_kw"] == pytest.approx(0.0)
    assert str(alert.details["step_1"]).startswith("loads: start hp1 1.00 -> 3.00 kW")
    assert str(alert.details["step_2"]).startswith("solar: curtail pv1 6.00 -> 3.00 kW")
    assert "step_3" not in alert.details
    assert "exports 8.00 kW" in alert.message and "plan: loads: start hp1" in alert.message
    for command in commands(out):
        assert command.source_id == alert.alert_id
        assert command.dry_run is True
        assert command.issued_at == at(60)
        assert command.valid_until == at(60 + 300)
        assert command.reason.startswith("home_export_limit h1: ")


def test_loads_insufficient_then_solar_then_batteries_each_within_its_limits() -> None:
    # Export 13 kW against 3: 10 kW to cover. Heat pump +2 (to its 3 kW max), PV down
    # to its 2 kW minimum (+4), the battery charges at 4 kW of its 4 kW limit.
    homes = [h1(solar=[{"device": "pv1", "rated_kw": 8.0, "min_kw": 2.0}]), h2()]
    _, out = run(CurtailmentEngine(settings(homes)), range(0, 61, 10), m1=-13.0, pv1=6.0)
    [alert] = alerts(out)
    assert setpoints(out) == [
        ("hp1", "set_power", 3.0),
        ("pv1", "set_power", 2.0),
        ("b1", "set_power", -4.0),
    ]
    assert alert.details["covered_kw"] == pytest.approx(10.0)
    assert str(alert.details["step_3"]).startswith("batteries: charge b1 0.00 -> -4.00 kW")


def test_a_configured_order_is_followed() -> None:
    engine = CurtailmentEngine(settings(order=["batteries", "solar"]))
    _, out = run(engine, range(0, 61, 10), m1=-8.0, pv1=6.0)
    # Battery 4 kW first, then 1 kW of PV; the heat pump is never touched.
    assert setpoints(out) == [("b1", "set_power", -4.0), ("pv1", "set_power", 5.0)]


def test_nothing_left_to_adjust_says_the_shortfall_remains() -> None:
    # Export 20 kW: heat pump +2, PV 6 -> 0, battery 4 kW: 12 of 17 kW; 5 kW remain.
    _, out = run(CurtailmentEngine(settings()), range(0, 61, 10), m1=-20.0, pv1=6.0)
    [alert] = alerts(out)
    assert alert.severity is Severity.CRITICAL
    assert alert.details["covered_kw"] == pytest.approx(12.0)
    assert alert.details["shortfall_kw"] == pytest.approx(5.0)
    assert "shortfall 5.00 kW remains: nothing left to adjust" in alert.message


def test_a_battery_at_its_soc_limit_cannot_charge_but_can_stop_discharging() -> None:
    homes = [h1(loads=[], solar=[]), h2()]
    engine = CurtailmentEngine(settings(homes))
    _, full = run(engine, range(0, 61, 10), m1=-5.0, b1=0.0, b1_soc=95.0)
    [alert] = alerts(full)
    assert commands(full) == []
    assert alert.details["shortfall_kw"] == pytest.approx(2.0)
    _, discharging = run(engine, range(0, 61, 10), m1=-5.0, b1=1.5, b1_soc=95.0)
    assert setpoints(discharging) == [("b1", "set_power", 0.0)]
    assert alerts(discharging)[0].details["shortfall_kw"] == pytest.approx(0.5)


def test_an_import_beyond_the_connection_limit_sheds_loads_then_discharges() -> None:
    # Import 14 kW against 10: shed the heat pump (2 kW), then discharge 2 kW; PV cannot help.
    _, out = run(CurtailmentEngine(settings()), range(0, 61, 10), m1=14.0, hp1=2.0, pv1=0.0)
    [alert] = alerts(out)
    assert alert.alert_type == "home_import_limit"
    assert setpoints(out) == [("hp1", "shed", 0.0), ("b1", "set_power", 2.0)]
    assert str(alert.details["step_1"]).startswith("loads: shed hp1 2.00 -> 0.00 kW")


def test_a_battery_at_its_minimum_soc_cannot_discharge() -> None:
    _, out = run(
        CurtailmentEngine(settings()), range(0, 61, 10), m1=14.0, hp1=0.0, b1=0.0, b1_soc=20.0
    )
    [alert] = alerts(out)
    assert commands(out) == []
    assert alert.details["shortfall_kw"] == pytest.approx(4.0)


# --- resolution, hysteresis, extension ----------------------------------------------------


def test_resolution_releases_the_curtailment_after_resolve_s_inside_the_hysteresis() -> None:
    engine = CurtailmentEngine(settings())
    state = CurtailmentState()
    out: list[Alert | Command] = []
    for t in range(0, 61, 10):
        out += engine.on_readings(state, street(t, m1=-8.0, pv1=6.0))
    [fired] = alerts(out)
    # Dry run: the meter still shows the uncurtailed export. 2.7 kW is inside the 3 kW
    # limit but not by the 0.5 kW hysteresis: no release, however long.
    for t in range(70, 800, 10):
        out += engine.on_readings(state, street(t, m1=-2.7, pv1=3.0))
    assert len(alerts(out)) == 1
    release: list[Alert | Command] = []
    for t in range(800, 1101, 10):  # 2.4 kW: inside by 0.6 kW, for 300 s
        release += engine.on_readings(state, street(t, m1=-2.4, pv1=3.0))
    [done] = alerts(release)
    assert done.status is AlertStatus.RESOLVED
    assert done.alert_id == fired.alert_id and done.end == at(1100)
    assert done.details["released"] == "hp1, pv1"
    # The heat pump back to its power before the plan, the PV cap lifted to its rating.
    assert setpoints(release) == [("hp1", "restore", 1.0), ("pv1", "restore", 8.0)]
    assert {c.source_id for c in commands(release)} == {fired.alert_id}
    assert state.adjustments == {}
    # A new export after the release is a new incident with a new id.
    again: list[Alert | Command] = []
    for t in range(1110, 1200, 10):
        again += engine.on_readings(state, street(t, m1=-8.0, pv1=6.0))
    assert [a.alert_id != fired.alert_id for a in alerts(again)] == [True]


def test_a_growing_export_extends_the_plan_under_the_same_alert() -> None:
    engine = CurtailmentEngine(settings())
    state = CurtailmentState()
    out: list[Alert | Command] = []
    for t in range(0, 61, 10):  # 1 kW over: the heat pump alone covers it
        out += engine.on_readings(state, street(t, m1=-4.0, pv1=6.0))
    assert setpoints(out) == [("hp1", "set_power", 2.0)]
    more: list[Alert | Command] = []
    for t in range(70, 200, 10):  # the sun rises: 3 kW more export
        more += engine.on_readings(state, street(t, m1=-7.0, pv1=9.0))
    first, second = alerts(out)[0], alerts(more)[0]
    assert second.alert_id == first.alert_id and second.details["revision"] == 1.0
    # Projected export 7 - 1 = 6 kW: 3 kW more, the heat pump's last 1 kW then PV 2 kW.
    assert setpoints(more)[:2] == [("hp1", "set_power", 3.0), ("pv1", "set_power", 7.0)]
    assert [k for k in second.details if k.startswith("step_")] == ["step_1", "step_2", "step_3"]


# --- transformers -------------------------------------------------------------------------


def test_reverse_power_flow_on_the_transformer_uses_every_home_in_order() -> None:
    # Each home within its own limits (h1 exports 3, h2 has none), together 13 kW of
    # reverse flow against 12 kW with 1 kW tolerance... 13 is at the tolerance: nothing.
    engine = CurtailmentEngine(settings())
    _, quiet = run(engine, range(0, 601, 30), m1=-3.0, m2=-10.0, pv2=10.0)
    assert quiet == []
    # 16 kW reverse flow: 4 kW to cover. Loads first (h1's heat pump +2), then solar:
    # h1's PV 4 -> 2. h2's PV is not needed.
    _, out = run(engine, range(0, 61, 10), m1=-3.0, m2=-13.0, pv2=10.0)
    [alert] = alerts(out)
    assert alert.alert_type == "reverse_power_flow"
    assert alert.device == "tx" and alert.severity is Severity.CRITICAL
    assert alert.details["scope"] == "transformer"
    assert setpoints(out) == [("hp1", "set_power", 3.0), ("pv1", "set_power", 2.0)]


def test_a_transformer_plans_only_what_its_homes_plans_leave_uncovered() -> None:
    # h1 exports 8 (5 over its limit: heat pump +2, PV -3); the street exports 8 + 11 =
    # 19 kW, 7 over the transformer's 12. With h1's dry-run plan counted, the street
    # would export 14 kW: 2 kW more, from h1's PV (3 kW left under its cap) before h2's.
    _, out = run(CurtailmentEngine(settings()), range(0, 61, 10), m1=-8.0, pv1=6.0, m2=-11.0)
    home, transformer = alerts(out)
    assert (home.alert_type, transformer.alert_type) == ("home_export_limit", "reverse_power_flow")
    assert transformer.details["excess_kw"] == pytest.approx(2.0)
    assert setpoints(out) == [
        ("hp1", "set_power", 3.0),
        ("pv1", "set_power", 3.0),
        ("pv1", "set_power", 1.0),
    ]
    assert commands(out)[2].source_id == transformer.alert_id


def test_a_transformer_overload_sheds_and_discharges_and_releases_its_own_share() -> None:
    engine = CurtailmentEngine(settings())
    state = CurtailmentState()
    out: list[Alert | Command] = []
    for t in range(0, 61, 10):
        out += engine.on_readings(state, street(t, m1=14.0, hp1=2.0, pv1=0.0, m2=13.0))
    home, transformer = alerts(out)
    # h1 imports 4 kW over its 10: shed the heat pump (2), discharge 2. The street draws
    # 27 kW, 23 with h1's plan: 3 kW over the rating. The heat pump is already shed and
    # PV cannot help a deficit, so the battery discharges 3 kW more, to its 5 kW limit.
    assert (home.alert_type, transformer.alert_type) == (
        "home_import_limit",
        "transformer_overload",
    )
    assert setpoints(out) == [
        ("hp1", "shed", 0.0),
        ("b1", "set_power", 2.0),
        ("b1", "set_power", 5.0),
    ]
    # The street's load falls (h2: 3 kW) while h1 still imports 14: the transformer's
    # incident resolves after 300 s and gives back only its 3 kW of the battery.
    later: list[Alert | Command] = []
    for t in range(70, 400, 10):
        later += engine.on_readings(state, street(t, m1=14.0, hp1=0.0, pv1=0.0, m2=3.0))
    [done] = alerts(later)
    assert (done.alert_id, done.status) == (transformer.alert_id, AlertStatus.RESOLVED)
    assert setpoints(later) == [("b1", "set_power", 2.0)]
    # Then h1's import falls too: its incident resolves; both devices are handed back.
    last: list[Alert | Command] = []
    for t in range(400, 800, 10):
        last += engine.on_readings(state, street(t, m1=5.0, hp1=0.0, pv1=0.0, m2=3.0))
    assert [(a.alert_id, a.status) for a in alerts(last)] == [(home.alert_id, AlertStatus.RESOLVED)]
    assert setpoints(last) == [("hp1", "restore", 2.0), ("b1", "restore", 0.0)]
    assert state.adjustments == {}


# --- data quality: order, silence ---------------------------------------------------------


def test_readings_out_of_order_are_sorted_within_a_batch_and_late_ones_ignored() -> None:
    engine = CurtailmentEngine(settings())
    ordered = [r for t in range(0, 61, 10) for r in street(t, m1=-8.0, pv1=6.0)]
    _, want = CurtailmentState(), engine.on_readings(CurtailmentState(), ordered)
    scrambled_state = CurtailmentState()
    got = engine.on_readings(scrambled_state, list(reversed(ordered)))
    assert got == want and len(alerts(got)) == 1

    state = CurtailmentState()
    engine.on_readings(state, street(100, m1=-2.0))
    # A late batch: the meter's old export must not replace its newer reading or
    # start a mismatch clock in the past.
    late = engine.on_readings(state, [r for t in range(0, 90, 10) for r in street(t, m1=-9.0)])
    assert late == []
    assert state.latest["m1"].power_kw == -2.0 and state.late_readings > 0
    assert state.clock == at(100)


def test_a_silent_meter_stops_the_home_and_its_transformer_from_acting() -> None:
    engine = CurtailmentEngine(settings())
    state = CurtailmentState()
    out = engine.on_readings(state, street(0, m1=-3.0, m2=0.5))
    # h1's meter goes silent after t=0. Its last reading holds for stale_s (300 s), then
    # the street's flow is unknown (h1 has no consumption devices to stand in): h2
    # alone now exports 13 kW, 16 with h1's last value, but nothing is done on a guess.
    for t in range(10, 310, 10):
        out += engine.on_readings(state, street(t, m1=None, m2=0.5))
    for t in range(310, 900, 10):
        out += engine.on_readings(state, street(t, m1=None, m2=-13.0, pv2=10.0))
    assert out == []
    assert engine.measured_kw(state, engine.scopes[-1], at(890)) is None
    # The meter is back: the clock starts again, and only 60 s later does anything happen.
    for t in range(900, 960, 10):
        out += engine.on_readings(state, street(t, m1=-3.0, m2=-13.0, pv2=10.0))
    assert out == []
    out += engine.on_readings(state, street(960, m1=-3.0, m2=-13.0, pv2=10.0))
    assert [a.alert_type for a in alerts(out)] == ["reverse_power_flow"]
    assert alerts(out)[0].start == at(900)


def test_a_home_without_a_fresh_meter_falls_back_to_its_parts() -> None:
    homes = [h1(consumption=["hp1", "base1"]), h2()]
    engine = CurtailmentEngine(settings(homes))
    state = CurtailmentState()
    out: list[Alert | Command] = []
    for t in range(0, 61, 10):
        # Consumption 1 + 0.5, PV 8, battery 0: the home exports 6.5 kW.
        readings = street(t, m1=None, pv1=8.0)
        readings.append(HomeReading(device="base1", ts=at(t), power_kw=0.5))
        out += engine.on_readings(state, readings)
    [alert] = alerts(out)
    assert alert.alert_type == "home_export_limit"
    assert alert.observed == pytest.approx(6.5)


def test_a_device_without_a_recent_reading_is_not_adjusted_and_says_why() -> None:
    engine = CurtailmentEngine(settings(stale_s=30.0))
    state = CurtailmentState()
    out = engine.on_readings(state, street(0, m1=-8.0, pv1=6.0))
    for t in range(10, 61, 10):  # the heat pump's reading stops after t=0
        out += engine.on_readings(state, street(t, m1=-8.0, pv1=6.0, hp1=None))
    [alert] = alerts(out)
    assert setpoints(out) == [("pv1", "set_power", 1.0)]
    assert "hp1: no reading within 30 s" in str(alert.details["not_adjusted"])


# --- commands modes, determinism, state ---------------------------------------------------


@pytest.mark.parametrize(("mode", "dry_run"), [("dry_run", True), ("live", False)])
def test_the_command_mode_marks_commands(mode: str, dry_run: bool) -> None:
    _, out = run(CurtailmentEngine(settings(commands=mode)), range(0, 61, 10), m1=-8.0, pv1=6.0)
    assert commands(out) and {c.dry_run for c in commands(out)} == {dry_run}


def test_commands_off_sends_the_alert_with_its_plan_and_no_command() -> None:
    _, out = run(CurtailmentEngine(settings(commands="off")), range(0, 61, 10), m1=-8.0, pv1=6.0)
    [alert] = out
    assert isinstance(alert, Alert) and alert.details["commands"] == "off"
    assert "step_2" in alert.details


def test_live_pv_cap_that_no_longer_binds_lets_the_export_alert_resolve_at_dusk() -> None:
    engine = CurtailmentEngine(settings(commands="live", homes=[h1(loads=[]), h2()]))
    state = CurtailmentState()
    out: list[Alert | Command] = []
    for t in range(0, 61, 10):
        out += engine.on_readings(state, street(t, m1=-5.0, pv1=6.0))
    assert setpoints(out) == [("pv1", "set_power", 4.0)]
    # The cap holds (pv at 4 kW, export at the limit): not resolved.
    for t in range(70, 600, 10):
        out += engine.on_readings(state, street(t, m1=-3.0, pv1=4.0))
    assert len(alerts(out)) == 1
    # Dusk: PV makes 1 kW under a 4 kW cap; the home imports. Resolved after 300 s.
    for t in range(600, 901, 10):
        out += engine.on_readings(state, street(t, m1=0.5, pv1=1.0))
    assert [a.status for a in alerts(out)] == [AlertStatus.FIRING, AlertStatus.RESOLVED]


def test_output_is_deterministic_and_survives_a_state_round_trip() -> None:
    engine = CurtailmentEngine(settings())
    seconds = list(range(0, 1200, 10))

    def site(t: int) -> dict[str, float]:
        return {"m1": -8.0 if t < 600 else -1.0, "pv1": 6.0, "m2": -10.0}

    state = CurtailmentState()
    once = [o for t in seconds for o in engine.on_readings(state, street(t, **site(t)))]
    resumed: list[Alert | Command] = []
    data: dict[str, Any] | None = None
    for t in seconds:  # as the agent does: state through JSON between batches
        restored = CurtailmentState.from_json(data)
        resumed += engine.on_readings(restored, street(t, **site(t)))
        data = restored.to_json()
    assert resumed == once
    assert {a.status for a in alerts(once)} == {AlertStatus.FIRING, AlertStatus.RESOLVED}
    ids = [c.command_id for c in commands(once)]
    assert len(ids) == len(set(ids))


# --- settings -----------------------------------------------------------------------------


def site_config(section: dict[str, Any]) -> SiteConfig:
    return SiteConfig.model_validate(
        {
            "id": SITE,
            "market": "M",
            "batteries": [
                {
                    "device": "b1",
                    "capacity_kwh": 10.0,
                    "max_charge_kw": 3.0,
                    "max_discharge_kw": 3.5,
                    "reserve_pct": 25.0,
                    "charge_below_price_per_kwh": 0.1,
                    "discharge_above_price_per_kwh": 0.2,
                }
            ],
            "curtailment": section,
        }
    )


def test_a_site_without_the_section_gets_no_engine() -> None:
    assert curtailment_settings(SiteConfig(id=SITE, market="M")) is None


def test_home_batteries_take_the_site_batterys_limits() -> None:
    home = h1(batteries=[{"device": "b1"}])
    cfg = curtailment_settings(
        site_config({"homes": [home, h2()], "transformers": [{"id": "tx", "rating_kw": 20.0}]})
    )
    assert cfg is not None
    battery = cfg.homes[0].batteries[0]
    assert (battery.max_charge_kw, battery.max_discharge_kw, battery.soc_min_pct) == (
        3.0,
        3.5,
        25.0,
    )
    assert cfg.order == ["loads", "solar", "batteries"]
    assert cfg.transformers[0].max_reverse_kw is None  # the rating applies


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"homes": [h1(max_export_kw=-1.0)]}, "sites[street].curtailment.homes[0].max_export_kw"),
        ({"homes": [h1(transformer=None)], "persist_s": -5}, "sites[street].curtailment.persist_s"),
        (
            {"homes": [h1(transformer=None, loads=[{"device": "hp1", "max_kw": 0}])]},
            "sites[street].curtailment.homes[0].loads[0].max_kw",
        ),
        ({"homes": [h1(transformer=None)], "order": ["loads", "wind"]}, "order[1]"),
        ({"homes": []}, "sites[street].curtailment.homes"),
        ({"homes": [h1(transformer=None)], "commands": "yes"}, "curtailment.commands"),
    ],
)
def test_a_bad_setting_is_named(section: dict[str, Any], named: str) -> None:
    with pytest.raises(SettingsError) as error:
        curtailment_settings(site_config(section))
    assert named in str(error.value)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"homes": [h1()]}, "home h1 names transformer 'tx', which is not in transformers"),
        (
            {"homes": [h1(transformer=None)], "transformers": [{"id": "tx", "rating_kw": 5}]},
            "no home has transformer = 'tx'",
        ),
        (
            {"homes": [h1(transformer=None), h2(transformer=None, meter="m1")]},
            "device 'm1' is both the meter of home h1 and the meter of home h2",
        ),
        ({"homes": [h1(transformer=None, meter=None)]}, "home h1: needs a meter or consumption"),
        (
            {"homes": [h1(transformer=None)], "order": ["solar", "solar"]},
            "order names ['solar'] more than once",
        ),
    ],
)
def test_an_inconsistent_section_is_rejected_with_the_reason(
    section: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError) as error:
        curtailment_settings(site_config(section))
    assert "sites[street].curtailment" in str(error.value)
    assert message in str(error.value)
