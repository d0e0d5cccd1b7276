"""The OCPP control path end to end: ``Command``s produced to the embedded broker's
commands topic reach simulated charge points (1.6 and 2.0.1, real WebSockets) as
charging profiles that their power follows, with one audit record per command."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ingest.control import Outcome, audit_outcome
from ingest.ocpp import OcppConnector
from ingest.simulators.ocpp import ChargePointFleet, SimulatedChargePoint
from pipeline import codec, kafka, topics
from pipeline.schemas import Command, stable_id
from pipeline.settings import Settings
from tests.integration.test_control_connector import send_commands
from tests.integration.test_ocpp import (
    eventually,
    fleet_config,
    known,
    pointed_at,
    running_csms,
    site_of,
)
from tests.integration.test_ocpp import settings as settings  # the fixture, reused

pytestmark = pytest.mark.integration


def command(
    cp: SimulatedChargePoint, action: str, setpoint_kw: float | None, **fields: Any
) -> Command:
    issued = datetime.now(UTC)
    values: dict[str, Any] = {
        "command_id": stable_id("cmd", cp.id, action, uuid.uuid4().hex),
        "site": site_of(cp.id),
        "device": f"ev-{cp.id}",  # as known() names the charge point's connector 1
        "action": action,
        "setpoint_kw": setpoint_kw,
        "reason": "test",
        "issued_at": issued,
        "valid_until": issued + timedelta(minutes=5),
        "dry_run": False,
        **fields,
    }
    return Command(**values)


async def audits(settings: Settings, csms: OcppConnector) -> dict[str, Command]:
    assert csms.control is not None
    records = await kafka.read_all(settings, csms.control.audit_spec)
    by_id = {}
    for _, value in records:
        record = codec.decode(Command, value)
        assert record.command_id not in by_id, "one audit record per command"
        by_id[record.command_id] = record
    return by_id


async def audited(
    settings: Settings, csms: OcppConnector, commands: list[Command]
) -> dict[str, Command]:
    """Wait until each command has its audit and the group has committed everything."""

    async def done() -> bool:
        return len(await audits(settings, csms)) >= len(commands)

    await eventually(done, 20)
    assert csms.control is not None
    group = csms.control.group_id

    async def committed() -> bool:
        lag = await kafka.group_lag(settings, group, [settings.topic(topics.COMMANDS)])
        return lag.total == 0

    await eventually(committed, 10)
    return await audits(settings, csms)


async def later_reports(cps: list[SimulatedChargePoint], count: int = 3) -> dict[str, set[float]]:
    """The power each charge point reports over its next ``count`` reports but the first
    (a limit holds from the next simulated step). [W]"""
    marks = {cp.id: len(cp.reports) for cp in cps}
    await eventually(lambda: all(len(cp.reports) > marks[cp.id] + count for cp in cps), 20)
    return {cp.id: {r.power_w for r in cp.reports[marks[cp.id] + 1 :]} for cp in cps}


async def test_set_power_commands_become_profiles_followed_clamped_and_audited_sent(
    settings: Settings,
) -> None:
    fleet = fleet_config(charge_points=2, dwell_s=3000.0, speed=600.0)
    table = known(fleet, max_power_kw=11.0)
    cp201_id = fleet.charge_point_ids()[1]
    table[cp201_id]["max_power_kw"] = 4.0  # below every simulated car: the clamp shows
    control = {"enabled": True, "min_interval_s": 0.0}
    async with running_csms(settings, charge_points=table, control=control) as csms:
        simulation = ChargePointFleet(pointed_at(fleet, csms))
        cp16, cp201 = simulation.charge_points
        assert (cp16.version, cp201.version) == ("1.6", "2.0.1")
        stop = asyncio.Event()  # the cars charge on: stopped once checked
        run = asyncio.create_task(simulation.run(stop=stop))
        await eventually(lambda: all(cp.reports for cp in simulation.charge_points))

        set_16 = command(cp16, "set_power", 2.5)
        set_201 = command(cp201, "set_power", 50.0)  # clamped to the charger's 4 kW
        # Another connector's devices: not this CSMS's business, so not audited here.
        unknown = command(cp16, "set_power", 1.0, device="battery-1")
        other_site = command(cp16, "set_power", 1.0, site="elsewhere")
        await send_commands(settings, [set_16, unknown, set_201, other_site])
        records = await audited(settings, csms, [set_16, set_201])
        assert set(records) == {set_16.command_id, set_201.command_id}
        for record in records.values():
            assert audit_outcome(record) is Outcome.SENT and record.dry_run is False
            assert record.reason.endswith("| test")
        assert records[set_16.command_id].setpoint_kw == 2.5
        assert "SetChargingProfile 2500 W on" in records[set_16.command_id].reason
        assert "(OCPP 1.6): Accepted" in records[set_16.command_id].reason
        assert records[set_201.command_id].setpoint_kw == 4.0
        assert records[set_201.command_id].reason.startswith(
            "sent: clamped from 50 to 4 kW; SetChargingProfile 4000 W on"
        )
        assert "(OCPP 2.0.1): Accepted" in records[set_201.command_id].reason
        assert await later_reports([cp16, cp201]) == {cp16.id: {2500.0}, cp201.id: {4000.0}}

        # restore clears our profile: the charge point goes back to its own default.
        restore = command(cp16, "restore", None)
        await send_commands(settings, [restore])
        records = await audited(settings, csms, [set_16, set_201, restore])
        assert audit_outcome(records[restore.command_id]) is Outcome.SENT
        assert "ClearChargingProfile on" in records[restore.command_id].reason
        assert cp16.vehicle is not None
        default_w = min(cp16.vehicle.max_power_kw, 11.0) * 1000
        assert (await later_reports([cp16]))[cp16.id] == {default_w}
        assert csms.control is not None
        stats = csms.control.stats
        assert (stats.sent, stats.ignored, stats.clamped) == (3, 2, 1)
        stop.set()
        await asyncio.wait_for(run, 30)


async def test_without_enabled_a_command_is_audited_dry_run_and_nothing_is_sent(
    settings: Settings,
) -> None:
    fleet = fleet_config(charge_points=1, dwell_s=3000.0, speed=600.0)
    # [ocpp.control] present, enabled left at its default (false).
    async with running_csms(settings, charge_points=known(fleet), control={}) as csms:
        simulation = ChargePointFleet(pointed_at(fleet, csms))
        (cp,) = simulation.charge_points
        stop = asyncio.Event()  # the cars charge on: stopped once checked
        run = asyncio.create_task(simulation.run(stop=stop))
        await eventually(lambda: bool(cp.reports))
        before = cp.reports[-1].power_w
        limit = command(cp, "set_power", 2.0)
        await send_commands(settings, [limit])
        records = await audited(settings, csms, [limit])
        (record,) = records.values()
        assert audit_outcome(record) is Outcome.DRY_RUN and record.dry_run is True
        assert record.setpoint_kw == 2.0
        assert "would SetChargingProfile 2 kW on" in record.reason
        assert "(control is not enabled)" in record.reason
        assert cp.profiles == {}
        assert (await later_reports([cp]))[cp.id] == {before}
        stop.set()
        await asyncio.wait_for(run, 30)
