"""The OCPP control path end to end: ``Command``s produced to the embedded broker's
commands topic reach simulated charge points (1.6 and 2.0.1, real WebSockets) as
charging profiles that their power follows, with one audit record per command.

The failed paths use a bare charge point too: the ``ocpp`` package's client over a
real WebSocket, booted (and with a transaction opened) by hand, that answers a
SetChargingProfile as a test asks, or never."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v16 import enums as enums16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from ocpp.v201 import enums as enums201
from websockets.asyncio.client import connect
from websockets.headers import build_authorization_basic
from websockets.typing import Subprotocol

from ingest.control import ControlConfig, ControlConnector, Outcome, audit_outcome
from ingest.ocpp import OcppConnector
from ingest.simulators.ocpp import ChargePointFleet, SimulatedChargePoint
from pipeline import codec, kafka, topics
from pipeline.schemas import Command, stable_id
from pipeline.settings import Settings
from tests.integration.test_control_connector import send_commands
from tests.integration.test_ocpp import (
    PASSWORD,
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


# --- the failed paths, with a bare charge point ----------------------------------------

Version = Literal["1.6", "2.0.1"]
Answer = Literal["Accepted", "Rejected", "silent"]
"""How the bare charge point answers a SetChargingProfile; silent: never."""


@dataclass
class Asked:
    """What the CSMS asked of a bare charge point: (action, payload) in order."""

    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


async def _answer(asked: Asked, answer: Answer, action: str, payload: dict[str, Any]) -> str:
    asked.requests.append((action, payload))
    if answer == "silent":
        # Never returns: the package answers a call when its handler does.
        await asyncio.Future()
    return answer


class _Bare16(ChargePoint16):
    asked: Asked
    answer: Answer

    @on(enums16.Action.set_charging_profile)
    async def on_set_charging_profile(
        self, connector_id: int, cs_charging_profiles: dict[str, Any]
    ) -> Any:
        payload = {"connector_id": connector_id, "cs_charging_profiles": cs_charging_profiles}
        status = await _answer(self.asked, self.answer, "SetChargingProfile", payload)
        return result16.SetChargingProfile(status=status)


class _Bare201(ChargePoint201):
    asked: Asked
    answer: Answer

    @on(enums201.Action.set_charging_profile)
    async def on_set_charging_profile(
        self, evse_id: int, charging_profile: dict[str, Any], **kwargs: Any
    ) -> Any:
        payload = {"evse_id": evse_id, "charging_profile": charging_profile}
        status = await _answer(self.asked, self.answer, "SetChargingProfile", payload)
        return result201.SetChargingProfile(status=status)


def _iso_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@contextlib.asynccontextmanager
async def bare_charge_point(
    csms: OcppConnector,
    charge_point_id: str,
    version: Version,
    *,
    answer: Answer = "Accepted",
    transaction: bool = True,
) -> AsyncIterator[Asked]:
    """A charge point of ``csms``'s table, connected, booted and (``transaction``) with a
    transaction open on connector / EVSE 1, answering SetChargingProfile with ``answer``."""
    asked = Asked()
    headers = {"Authorization": build_authorization_basic(charge_point_id, PASSWORD)}
    async with connect(
        f"{csms.url}/{charge_point_id}",
        subprotocols=[Subprotocol(f"ocpp{version}")],
        additional_headers=headers,
    ) as connection:
        link: _Bare16 | _Bare201 = (
            _Bare16(charge_point_id, connection, response_timeout=10)
            if version == "1.6"
            else _Bare201(charge_point_id, connection, response_timeout=10)
        )
        link.asked, link.answer = asked, answer
        serving = asyncio.create_task(link.start())
        try:
            if isinstance(link, _Bare16):
                await link.call(
                    call16.BootNotification(charge_point_model="bare", charge_point_vendor="test"),
                    suppress=False,
                )
                if transaction:
                    await link.call(
                        call16.StartTransaction(
                            connector_id=1, id_tag="TAG-1", meter_start=1000, timestamp=_iso_now()
                        ),
                        suppress=False,
                    )
            else:
                await link.call(
                    call201.BootNotification(
                        charging_station={"model": "bare", "vendor_name": "test"},
                        reason="PowerUp",
                    ),
                    suppress=False,
                )
                if transaction:
                    await link.call(
                        call201.TransactionEvent(
                            event_type="Started",
                            timestamp=_iso_now(),
                            trigger_reason="CablePluggedIn",
                            seq_no=0,
                            transaction_info={
                                "transaction_id": f"tx-{uuid.uuid4().hex[:8]}",
                                "charging_state": "Charging",
                            },
                            evse={"id": 1, "connector_id": 1},
                        ),
                        suppress=False,
                    )
            session = csms.sessions[charge_point_id]
            assert csms.connected(charge_point_id)
            assert (session.open_transaction(1) is not None) is transaction
            yield asked
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving


def bare_command(charge_point_id: str, action: str, setpoint_kw: float | None) -> Command:
    issued = datetime.now(UTC)
    return Command(
        command_id=stable_id("cmd", charge_point_id, action, uuid.uuid4().hex),
        site=site_of(charge_point_id),
        device=f"ev-{charge_point_id}",
        action=action,
        setpoint_kw=setpoint_kw,
        reason="test",
        issued_at=issued,
        valid_until=issued + timedelta(minutes=5),
        dry_run=False,
    )


ENABLED = {"enabled": True, "min_interval_s": 0.0}


async def test_a_command_for_a_known_charge_point_that_is_not_connected_fails_unsent(
    settings: Settings,
) -> None:
    fleet = fleet_config(charge_points=2)
    absent, also_absent = fleet.charge_point_ids()
    async with running_csms(settings, charge_points=known(fleet), control=ENABLED) as csms:
        limit = bare_command(absent, "set_power", 3.0)
        restore = bare_command(also_absent, "restore", None)
        await send_commands(settings, [limit, restore])
        records = await audited(settings, csms, [limit, restore])
        assert csms.control is not None
        assert (csms.control.stats.failed, csms.control.stats.ignored) == (2, 0)
    assert set(records) == {limit.command_id, restore.command_id}
    for item, what in ((limit, "SetChargingProfile 3 kW"), (restore, "ClearChargingProfile")):
        record = records[item.command_id]
        assert audit_outcome(record) is Outcome.FAILED, record.reason
        assert record.dry_run is True  # nothing was sent
        cp_id = item.device.removeprefix("ev-")
        assert f"{what} on {cp_id} connector 1: charge point {cp_id!r} is not connected" in (
            record.reason
        )
        assert record.reason.endswith("| test")


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_a_connected_charge_point_without_a_transaction_fails_unsent(
    settings: Settings, version: Version
) -> None:
    fleet = fleet_config(charge_points=1)
    (cp_id,) = fleet.charge_point_ids()
    async with (
        running_csms(settings, charge_points=known(fleet), control=ENABLED) as csms,
        bare_charge_point(csms, cp_id, version, transaction=False) as asked,
    ):
        limit = bare_command(cp_id, "set_power", 3.0)
        await send_commands(settings, [limit])
        records = await audited(settings, csms, [limit])
        assert asked.requests == []  # the charge point was asked nothing
    record = records[limit.command_id]
    assert audit_outcome(record) is Outcome.FAILED, record.reason
    assert record.dry_run is True
    assert "SetChargingProfile 3 kW on" in record.reason
    assert "no open transaction (a TxProfile applies to one)" in record.reason


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        ("silent", "did not answer SetChargingProfile in 1 s"),
        ("Rejected", ": Rejected | test"),
    ],
)
async def test_a_charge_point_that_rejects_or_never_answers_a_profile_fails_sent(
    settings: Settings, version: Version, answer: Answer, detail: str
) -> None:
    fleet = fleet_config(charge_points=1)
    (cp_id,) = fleet.charge_point_ids()
    async with (
        running_csms(
            settings, charge_points=known(fleet), control=ENABLED, response_timeout_s=1.0
        ) as csms,
        bare_charge_point(csms, cp_id, version, answer=answer) as asked,
    ):
        limit = bare_command(cp_id, "set_power", 2.5)
        started = asyncio.get_running_loop().time()
        await send_commands(settings, [limit])
        records = await audited(settings, csms, [limit])
        waited_s = asyncio.get_running_loop().time() - started
        # The request went out, with the command's limit.
        ((action, payload),) = asked.requests
        assert action == "SetChargingProfile"
        profile = payload.get("cs_charging_profiles") or payload["charging_profile"]
        schedule = profile["charging_schedule"]
        period = (schedule if isinstance(schedule, dict) else schedule[0])[
            "charging_schedule_period"
        ][0]
        assert period["limit"] == 2500.0
    record = records[limit.command_id]
    assert audit_outcome(record) is Outcome.FAILED, record.reason
    assert record.dry_run is False  # the request reached the charge point
    assert detail in record.reason, record.reason
    if answer == "silent":
        assert waited_s >= 1.0  # it waited out response_timeout_s
    assert csms.control is not None and csms.control.stats.failed == 1


async def test_next_to_the_control_connector_ignoring_unknown_devices_one_audit_per_command(
    settings: Settings,
) -> None:
    """Both control paths on one commands topic, each in its own group: an OCPP
    charger's command gets the CSMS's audit only, a Modbus device's the connector's."""
    fleet = fleet_config(charge_points=1)
    (cp_id,) = fleet.charge_point_ids()
    battery = {
        "transport": "modbus",
        "host": "127.0.0.1",
        "port": 1,  # dry-run: never connected
        "site": site_of(cp_id),
        "device": "bat-1",
        "model": 704,
        "point": "WSet",
        "min_setpoint_kw": -5.0,
        "max_setpoint_kw": 5.0,
    }
    control = ControlConnector(
        settings, ControlConfig.model_validate({"unknown_devices": "ignore", "devices": [battery]})
    )
    async with (
        running_csms(settings, charge_points=known(fleet), control={}) as csms,
        control,
    ):
        runner = asyncio.create_task(control.run())
        try:
            charger = bare_command(cp_id, "set_power", 3.0)
            modbus = bare_command(cp_id, "set_power", 2.0).model_copy(
                update={"device": "bat-1", "command_id": f"cmd-bat-{uuid.uuid4().hex[:8]}"}
            )
            await send_commands(settings, [charger, modbus])
            # audits() asserts one record per command id; the group of the connector
            # has committed everything too, so nothing else is coming from it.
            records = await audited(settings, csms, [charger, modbus])

            async def connector_committed() -> bool:
                lag = await kafka.group_lag(
                    settings, control.group_id, [settings.topic(topics.COMMANDS)]
                )
                return lag.total == 0

            await eventually(connector_committed, 10)
            records = await audits(settings, csms)
        finally:
            await control.stop()
            await runner
    assert set(records) == {charger.command_id, modbus.command_id}
    assert all(audit_outcome(r) is Outcome.DRY_RUN for r in records.values())
    assert "would SetChargingProfile 3 kW" in records[charger.command_id].reason
    assert "would write 704.WSet = 2000 W" in records[modbus.command_id].reason
    assert (control.stats.ignored, control.stats.audited) == (1, 1)
    assert csms.control is not None
    assert (csms.control.stats.ignored, csms.control.stats.audited) == (1, 1)
