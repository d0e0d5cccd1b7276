"""The OCPP control path's decisions (no servers): which commands are ours, clamping,
V2G and unsupported actions, expiry, and the two keys of dry-run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from ingest.control import Outcome, Verdict
from ingest.ocpp import ChargePointConfig, OcppConfig, OcppConnector, OcppControlConfig
from ingest.ocpp_control import ChargerTarget, OcppCommandConsumer, OcppPlan, plan_ocpp_command
from pipeline.schemas import Command
from pipeline.settings import Settings

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
CHARGER = ChargerTarget("CP-001", 1, ChargePointConfig(site="home", device="wb-1", max_power_kw=11))


def command(action: str = "set_power", setpoint_kw: float | None = 5.0, **fields: Any) -> Command:
    values: dict[str, Any] = {
        "command_id": "cmd-1",
        "site": "home",
        "device": "wb-1",
        "action": action,
        "setpoint_kw": setpoint_kw,
        "reason": "test",
        "issued_at": NOW,
        "dry_run": False,
        **fields,
    }
    return Command(**values)


def plan(cmd: Command, **config: Any) -> OcppPlan | Verdict:
    return plan_ocpp_command(cmd, CHARGER, OcppControlConfig(**{"enabled": True, **config}), NOW)


@pytest.mark.parametrize(
    ("setpoint_kw", "limit_kw", "note"),
    [
        (5.0, 5.0, ""),
        (0.0, 0.0, ""),
        (11.0, 11.0, ""),
        (30.0, 11.0, "clamped from 30 to 11 kW"),
    ],
)
def test_set_power_is_clamped_to_the_charge_points_rating(
    setpoint_kw: float, limit_kw: float, note: str
) -> None:
    result = plan(command(setpoint_kw=setpoint_kw))
    assert isinstance(result, OcppPlan) and not result.dry_run
    assert (result.limit_kw, result.clamp_note()) == (limit_kw, note)


def test_a_negative_setpoint_v2g_is_rejected() -> None:
    result = plan(command(setpoint_kw=-3.0))
    assert isinstance(result, Verdict) and result.outcome is Outcome.REJECTED
    assert "discharge (V2G)" in result.detail


def test_set_power_without_setpoint_and_unsupported_actions_are_rejected() -> None:
    for cmd in (command(setpoint_kw=None), command("start_job")):
        result = plan(cmd)
        assert isinstance(result, Verdict) and result.outcome is Outcome.REJECTED


def test_restore_clears_and_safety_actions_limit_to_zero() -> None:
    restore = plan(command("restore", None))
    assert isinstance(restore, OcppPlan) and restore.limit_kw is None
    assert restore.describe() == "ClearChargingProfile on CP-001 connector 1"
    for action in ("shed", "scram"):
        result = plan(command(action, 7.0))  # the safe state, whatever the command says
        assert isinstance(result, OcppPlan) and result.limit_kw == 0.0


def test_expired_and_stale_commands_are_skipped() -> None:
    expired = command(valid_until=NOW - timedelta(seconds=1))
    stale = command(issued_at=NOW - timedelta(seconds=301))
    for cmd in (expired, stale):
        result = plan(cmd)
        assert isinstance(result, Verdict) and result.outcome is Outcome.SKIPPED


def test_dry_run_unless_enabled_and_the_command_is_not_marked_dry_run() -> None:
    off = plan(command(), enabled=False)
    assert isinstance(off, OcppPlan) and off.dry_run and off.dry_run_why == "control is not enabled"
    marked = plan(command(dry_run=True))
    assert isinstance(marked, OcppPlan) and marked.dry_run
    ignored_mark = plan(command(dry_run=True), respect_command_dry_run=False)
    assert isinstance(ignored_mark, OcppPlan) and not ignored_mark.dry_run


def test_the_control_section_is_optional_and_strict() -> None:
    assert OcppConfig(require_password=False).control is None
    config = OcppConfig(require_password=False, control={})
    assert config.control is not None and config.control.enabled is False
    assert config.control.audit_topic == "wattstream.commands-audit"
    with pytest.raises(ValidationError, match="enable"):
        OcppConfig(require_password=False, control={"enable": True})


def test_only_the_charge_points_connectors_are_targets() -> None:
    config = OcppConfig(
        require_password=False,
        control={},
        charge_points={
            "CP-001": {"site": "home", "device": "wb-1", "connector_devices": {2: "wb-1b"}},
            "CP-002": {"site": "work", "device": "wb-2"},
        },
    )
    consumer = OcppCommandConsumer(OcppConnector(Settings(), config), OcppControlConfig())
    first = consumer.target("home", "wb-1")
    second = consumer.target("home", "wb-1b")
    assert first is not None and (first.charge_point_id, first.connector_id) == ("CP-001", 1)
    assert second is not None and (second.charge_point_id, second.connector_id) == ("CP-001", 2)
    assert consumer.target("work", "wb-2") is not None
    assert consumer.target("home", "wb-2") is None  # another site's device id
    assert consumer.target("home", "battery-1") is None  # the control connector's
