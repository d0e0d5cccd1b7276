"""The control path's pure parts: config validation, clamping, expiry, the rate limit
with replace-pending semantics, dry-run by default and the audit records."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from ingest.control import (
    AUDIT_TOPIC,
    ControlConfig,
    Ignored,
    MqttControl,
    Outcome,
    Plan,
    RateLimit,
    Verdict,
    audit_outcome,
    audit_record,
    audit_topic_spec,
    clamp,
    expiry,
    mqtt_payload,
    plan_command,
)
from pipeline.schemas import Command
from tests.conftest import REPO

NOW = datetime(2026, 11, 23, 11, 0, tzinfo=UTC)


def battery(**overrides: Any) -> dict[str, Any]:
    return {
        "transport": "modbus",
        "host": "127.0.0.1",
        "site": "turin-home",
        "device": "bat-1",
        "model": 704,
        "point": "WSet",
        "min_setpoint_kw": -5.0,
        "max_setpoint_kw": 5.0,
        **overrides,
    }


def ev(**overrides: Any) -> dict[str, Any]:
    return {
        "transport": "mqtt",
        "url": "mqtt://127.0.0.1:1883",
        "site": "turin-home",
        "device": "ev-1",
        "min_setpoint_kw": 0.0,
        "max_setpoint_kw": 11.0,
        "allowed_actions": ["set_power", "shed", "restore"],
        **overrides,
    }


def config(*devices: dict[str, Any], **overrides: Any) -> ControlConfig:
    return ControlConfig.model_validate(
        {"devices": list(devices) or [battery()], "enabled": True, **overrides}
    )


def command(**overrides: Any) -> Command:
    fields: dict[str, Any] = {
        "command_id": "cmd-1",
        "site": "turin-home",
        "device": "bat-1",
        "action": "set_power",
        "setpoint_kw": 3.0,
        "reason": "arbitrage: price 0.31",
        "issued_at": NOW - timedelta(seconds=1),
        "dry_run": False,
        **overrides,
    }
    return Command(**fields)


def planned(result: Plan | Verdict | Ignored) -> Plan:
    assert isinstance(result, Plan), result
    return result


# --- configuration ----------------------------------------------------------------


def test_the_sample_config_loads_and_is_dry_run() -> None:
    sample = ControlConfig.from_toml(REPO / "ingest" / "control.sample.toml")
    assert sample.enabled is False
    assert [d.device for d in sample.devices] == ["bat-1", "pv-1", "ev-1"]
    plan = planned(plan_command(command(), sample, NOW))
    assert plan.dry_run and plan.dry_run_why == "control is not enabled"


def test_dry_run_is_the_default_even_for_a_command_that_asks_to_be_sent() -> None:
    default = ControlConfig.model_validate({"devices": [battery()]})
    assert default.enabled is False
    assert planned(plan_command(command(dry_run=False), default, NOW)).dry_run


def test_a_command_marked_dry_run_is_not_sent_unless_configured_so() -> None:
    assert planned(plan_command(command(dry_run=True), config(), NOW)).dry_run
    assert not planned(plan_command(command(dry_run=False), config(), NOW)).dry_run
    lenient = config(respect_command_dry_run=False)
    assert not planned(plan_command(command(dry_run=True), lenient, NOW)).dry_run


def error_text(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        ControlConfig.model_validate(data)
    return "\n".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in caught.value.errors()
    )


@pytest.mark.parametrize(
    ("device", "key"),
    [
        (battery(hostt="x"), "hostt"),
        (battery(point="WSetX"), "point"),
        (battery(point="W_SF"), "point"),  # a scale factor: read-only
        (battery(model=103, point="W"), "read-only"),
        (battery(model=99999), "model"),
        (battery(point="WMaxLimPct", min_setpoint_kw=0.0), "rated_kw"),
        (battery(point="WMaxLimPct", min_setpoint_kw=0.0, rated_kw=4.0), "max_setpoint_kw"),
        (battery(model=123, point="WMaxLimPct", rated_kw=10.0), "min_setpoint_kw"),
        (battery(min_setpoint_kw=6.0), "min_setpoint_kw"),
        (battery(register=100), "register"),
        (battery(model=None, point=None), "register"),
        (battery(enable={"WSetEnaX": 1}), "enable"),
        (battery(allowed_actions=["explode"]), "allowed_actions"),
        (battery(min_interval_s=-1), "min_interval_s"),
        (ev(url="http://127.0.0.1"), "url"),
        (ev(topic="sites/{site}/#"), "topic"),
        (ev(topic="sites/{plant}"), "topic"),
        (ev(payload_keys={"power": "p"}), "payload_keys"),
        (ev(qos=2), "qos"),
        ({**battery(), "transport": "bacnet"}, "transport"),
    ],
)
def test_config_errors_name_the_key(device: dict[str, Any], key: str) -> None:
    assert key in error_text({"devices": [device]})


def test_config_errors_of_the_connector_itself() -> None:
    assert "devices" in error_text({"devices": []})
    assert "configured twice" in error_text({"devices": [battery(), battery()]})
    assert "retry_max_s" in error_text({"devices": [battery()], "retry_max_s": 0.1})
    assert "enabeld" in error_text({"devices": [battery()], "enabeld": True})


def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "control.toml"
    path.write_text(
        '[control]\n[[control.devices]]\ntransport = "modbus"\nhost = "127.0.0.1"\n'
        'site = "s"\ndevice = "pv-1"\nmodel = 123\npoint = "WMaxLimPct"\n'
        "min_setpoint_kw = 0.0\nmax_setpoint_kw = 5.0\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ingest", "control", str(path)],
        env={**env, "WATTSTREAM_BROKER": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "rated_kw" in result.stderr and "control.devices.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_audit_topic_is_site_keyed_commands() -> None:
    spec = audit_topic_spec()
    assert (spec.name, spec.value_schema, spec.key) == (AUDIT_TOPIC, Command, "site")
    assert spec.keyed_by_site and spec.retention_ms > 30 * 24 * 3600 * 1000


# --- clamping -----------------------------------------------------------------------


def test_clamp_bounds_both_sides_and_keeps_values_inside() -> None:
    device = config().devices[0]
    assert clamp(12.0, device) == 5.0
    assert clamp(-12.0, device) == -5.0
    assert clamp(-2.5, device) == -2.5
    assert clamp(0.0, device) == 0.0
    assert clamp(5.0, device) == 5.0


def test_a_clamped_setpoint_is_recorded() -> None:
    plan = planned(plan_command(command(setpoint_kw=12.0), config(), NOW))
    assert (plan.setpoint_kw, plan.requested_kw, plan.clamped) == (5.0, 12.0, True)
    assert plan.clamp_note() == "clamped from 12 to 5 kW"
    inside = planned(plan_command(command(setpoint_kw=-4.5), config(), NOW))
    assert not inside.clamped and inside.clamp_note() == ""


def test_shed_and_scram_use_the_devices_safe_state_whatever_the_command_says() -> None:
    scram = planned(plan_command(command(action="scram", setpoint_kw=4.0), config(), NOW))
    assert scram.setpoint_kw == 0.0
    pv = battery(device="pv-1", min_setpoint_kw=1.0, fixed_setpoints_kw={"shed": 0.0})
    shed = planned(plan_command(command(device="pv-1", action="shed"), config(pv), NOW))
    # The safe state is clamped too: this inverter never goes below 1 kW.
    assert (shed.setpoint_kw, shed.clamped) == (1.0, True)


# --- validation and expiry -----------------------------------------------------------


def test_unknown_device_and_disallowed_action_are_rejected() -> None:
    unknown = plan_command(command(device="bat-9"), config(), NOW)
    assert unknown == Verdict(Outcome.REJECTED, "unknown device turin-home/bat-9")
    other_site = plan_command(command(site="milan"), config(), NOW)
    assert isinstance(other_site, Verdict) and other_site.outcome == Outcome.REJECTED
    job = plan_command(command(action="start_job"), config(), NOW)
    assert isinstance(job, Verdict) and job.outcome == Outcome.REJECTED
    assert "allowed_actions" in job.detail


def test_unknown_devices_rejects_by_default_and_ignore_is_validated() -> None:
    assert config().unknown_devices == "reject"
    sample = ControlConfig.from_toml(REPO / "ingest" / "control.sample.toml")
    assert sample.unknown_devices == "reject"
    assert "unknown_devices" in error_text({"devices": [battery()], "unknown_devices": "drop"})


def test_with_unknown_devices_ignore_only_an_unknown_device_is_ignored() -> None:
    ignoring = config(unknown_devices="ignore")
    assert plan_command(command(device="bat-9"), ignoring, NOW) == Ignored(
        "unknown device turin-home/bat-9"
    )
    assert isinstance(plan_command(command(site="milan"), ignoring, NOW), Ignored)
    # Its own devices' commands are judged as ever: rejected, skipped, planned.
    job = plan_command(command(action="start_job"), ignoring, NOW)
    assert isinstance(job, Verdict) and job.outcome == Outcome.REJECTED
    expired = plan_command(command(valid_until=NOW - timedelta(minutes=5)), ignoring, NOW)
    assert isinstance(expired, Verdict) and expired.outcome == Outcome.SKIPPED
    assert planned(plan_command(command(), ignoring, NOW)).setpoint_kw == 3.0


def test_a_modbus_command_without_a_setpoint_is_rejected_an_mqtt_one_is_not() -> None:
    missing = plan_command(command(setpoint_kw=None), config(), NOW)
    assert isinstance(missing, Verdict) and missing.outcome == Outcome.REJECTED
    restore = plan_command(
        command(device="ev-1", action="restore", setpoint_kw=None), config(ev()), NOW
    )
    assert planned(restore).setpoint_kw is None


def test_expiry() -> None:
    past = command(valid_until=NOW - timedelta(seconds=1))
    assert (expiry(past, NOW, 300) or "").startswith("expired at")
    # valid_until is exclusive: at that instant the command is over.
    assert expiry(command(valid_until=NOW), NOW, 300) is not None
    old_but_valid = command(issued_at=NOW - timedelta(hours=2), valid_until=NOW + timedelta(1))
    assert expiry(old_but_valid, NOW, 300) is None
    stale = command(issued_at=NOW - timedelta(seconds=301))
    assert "stale" in (expiry(stale, NOW, 300) or "")
    assert expiry(command(issued_at=NOW - timedelta(seconds=299)), NOW, 300) is None


def test_an_expired_command_is_skipped_before_anything_else_is_planned() -> None:
    result = plan_command(command(valid_until=NOW - timedelta(minutes=5)), config(), NOW)
    assert isinstance(result, Verdict) and result.outcome == Outcome.SKIPPED


# --- rate limiting ------------------------------------------------------------------


def test_first_command_goes_at_once_then_one_per_interval() -> None:
    limit: RateLimit[str] = RateLimit(min_interval_s=10.0)
    assert limit.due_at() is None and limit.take(0.0) is None
    assert limit.offer("a") is None
    assert limit.take(100.0) == "a"
    assert limit.offer("b") is None
    assert limit.due_at() == 110.0
    assert limit.take(109.9) is None
    assert limit.take(110.0) == "b"
    assert limit.pending is None


def test_a_newer_command_replaces_the_pending_one() -> None:
    limit: RateLimit[str] = RateLimit(min_interval_s=1.0)
    limit.offer("c0")
    assert limit.take(0.0) == "c0"
    replaced = [limit.offer(f"c{i}") for i in range(1, 10)]
    assert replaced == [None, "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"]
    assert limit.take(0.5) is None
    assert limit.take(1.0) == "c9"


def test_a_burst_never_gives_more_takes_than_the_interval_allows() -> None:
    limit: RateLimit[int] = RateLimit(min_interval_s=1.0)
    taken: list[tuple[float, int]] = []
    superseded = 0
    for step in range(300):  # 3 s, a command and a poll every 10 ms
        now = step * 0.01
        if limit.offer(step) is not None:
            superseded += 1
        if (item := limit.take(now)) is not None:
            taken.append((now, item))
    assert [t for t, _ in taken] == pytest.approx([0.0, 1.0, 2.0])
    assert all(b - a >= 1.0 - 1e-9 for (a, _), (b, _) in itertools.pairwise(taken))
    assert len(taken) + superseded + (limit.pending is not None) == 300


def test_a_scram_goes_at_once_and_is_never_superseded() -> None:
    limit: RateLimit[str] = RateLimit(min_interval_s=10.0)
    limit.offer("setpoint")
    assert limit.take(0.0) == "setpoint"
    assert limit.offer("setpoint-2") is None  # waits for the interval
    assert limit.offer("scram", urgent=True) == "setpoint-2"
    assert limit.due_at() == -math.inf  # the interval does not hold a safe state back
    assert limit.offer("setpoint-3") == "setpoint-3"  # loses: the scram stands
    assert limit.pending == "scram"
    assert limit.take(0.1) == "scram"
    assert limit.offer("setpoint-4") is None  # ordinary again, and rate-limited again
    assert limit.due_at() == pytest.approx(10.1)


def test_zero_interval_sends_every_command() -> None:
    limit: RateLimit[str] = RateLimit(min_interval_s=0.0)
    for name in "abc":
        limit.offer(name)
        assert limit.take(5.0) == name


# --- audit records and payloads ----------------------------------------------------------


def test_audit_record_states_the_outcome_and_keeps_the_command() -> None:
    original = command(setpoint_kw=12.0, source_id="dec-1")
    record = audit_record(
        original, Outcome.SENT, "clamped from 12 to 5 kW; wrote", setpoint_kw=5.0, sent=True
    )
    assert record.reason == "sent: clamped from 12 to 5 kW; wrote | arbitrage: price 0.31"
    assert (record.setpoint_kw, record.dry_run) == (5.0, False)
    assert (record.command_id, record.source_id, record.issued_at) == (
        "cmd-1",
        "dec-1",
        NOW - timedelta(seconds=1),
    )
    assert audit_outcome(record) == Outcome.SENT
    dry = audit_record(original, Outcome.DRY_RUN, "would write")
    assert dry.dry_run and dry.setpoint_kw == 12.0 and audit_outcome(dry) == Outcome.DRY_RUN
    bare = audit_record(original, Outcome.RATE_LIMITED)
    assert audit_outcome(bare) == Outcome.RATE_LIMITED
    with pytest.raises(ValueError, match="not-an-outcome"):
        audit_outcome(command(reason="not-an-outcome: x"))


def test_mqtt_payload_renames_keys_and_adds_fixed_ones() -> None:
    device = ev(payload_keys={"setpoint_kw": "limit_kw"}, payload_static={"origin": "ws"})
    cfg = config(device)
    plan = planned(plan_command(command(device="ev-1", setpoint_kw=20.0), cfg, NOW))
    assert isinstance(plan.device, MqttControl)
    body = orjson.loads(mqtt_payload(plan))
    assert body["limit_kw"] == 11.0 and "setpoint_kw" not in body
    assert (body["origin"], body["action"], body["command_id"]) == ("ws", "set_power", "cmd-1")
    assert plan.device.topic_for(plan.command) == "sites/turin-home/ev-1/command"
