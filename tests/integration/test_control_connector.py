"""The control connector against real servers: commands from the embedded Kafka broker,
setpoints written to pymodbus' Modbus TCP server (SunSpec models 704 and 123, and a raw
register) and published to a real Mosquitto, audit records back in Kafka.

The Modbus server here holds the control models with no refresh callback (unlike the
telemetry simulator, which re-encodes its map on every request), so a write stays in
the registers and is read back with a pymodbus client, decoded with the scale factor.
The server's callback records every write request: the count of writes is observed at
the device, independently of what the connector reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from ingest import sunspec
from ingest.control import (
    ControlConfig,
    ControlConnector,
    Outcome,
    audit_outcome,
    audit_topic_spec,
)
from pipeline import codec, kafka, topics
from pipeline.local import EmbeddedBroker, free_port
from pipeline.schemas import Command, stable_id
from pipeline.settings import Settings
from tests.conftest import SettingsFactory
from tests.servers import Mosquitto
from tests.workers import metrics_page

pytestmark = pytest.mark.integration

SITE = "turin-home"
BASE = 40000
RAW_REGISTER = 100
LOCKED_REGISTER = 200


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        outcome = check()
        if isinstance(outcome, Awaitable):
            outcome = await outcome
        if outcome:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.1)


# --- a Modbus TCP server holding the control models ------------------------------------


@dataclass
class Write:
    unit_id: int
    address: int
    values: list[int]
    at: float


@dataclass
class ControlServer:
    """pymodbus' TCP server: unit 1 a battery inverter (1 + 704), unit 2 a PV inverter
    (1 + 123), unit 3 a raw register at 100 and a read-only one at 200."""

    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    writes: list[Write] = field(default_factory=list)
    busy_writes: int = 0
    """The next this many write requests are answered "device busy"."""
    server: ModbusTcpServer | None = None

    def _action(self, unit_id: int) -> Any:
        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            if set_values is None:
                return None
            if self.busy_writes > 0:
                self.busy_writes -= 1
                return ExcCodes.DEVICE_BUSY
            values = [int(v) for v in set_values]
            self.writes.append(Write(unit_id, address, values, time.monotonic()))
            return None

        return action

    @staticmethod
    def _sunspec(*models: tuple[int, dict[str, sunspec.Value]]) -> list[int]:
        words = list(sunspec.SUNS_MARKER)
        for model_id, values in models:
            words.extend(sunspec.encode_model(model_id, values))
        return [*words, sunspec.END_MODEL_ID, 0]

    def devices(self) -> list[SimDevice]:
        common: dict[str, sunspec.Value] = {
            "Mn": "wattstream",
            "Md": "sim-control",
            "SN": "CTL-1",
            "DA": 1,
        }
        battery = self._sunspec(
            (1, common),
            (704, {"WSet": 1230.0, "WSet_SF": 1, "WSetEna": 0, "WMaxLimPct_SF": -1}),
        )
        pv = self._sunspec(
            (1, common),
            (123, {"WMaxLimPct": 100.0, "WMaxLimPct_SF": -1, "WMaxLim_Ena": 0}),
        )
        registers = DataType.REGISTERS
        return [
            SimDevice(
                id=1,
                simdata=[SimData(BASE, values=battery, datatype=registers)],
                action=self._action(1),
            ),
            SimDevice(
                id=2, simdata=[SimData(BASE, values=pv, datatype=registers)], action=self._action(2)
            ),
            SimDevice(
                id=3,
                simdata=[
                    SimData(RAW_REGISTER, values=[7], datatype=registers),
                    SimData(LOCKED_REGISTER, values=[9], datatype=registers, readonly=True),
                ],
                action=self._action(3),
            ),
        ]

    async def start(self) -> None:
        self.server = ModbusTcpServer(self.devices(), address=(self.host, self.port))
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.shutdown()
            await asyncio.sleep(0)

    def writes_to(self, unit_id: int, address: int) -> list[Write]:
        return [w for w in self.writes if (w.unit_id, w.address) == (unit_id, address)]


@pytest.fixture
async def modbus() -> AsyncIterator[ControlServer]:
    server = ControlServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def read_model(
    server: ControlServer, unit_id: int, model_id: int
) -> tuple[int, dict[str, Any]]:
    """(address of the ID register, decoded points) of one model, read over Modbus TCP."""
    client = AsyncModbusTcpClient(server.host, port=server.port)
    await client.connect()
    try:
        address = BASE + 2
        for index in range(10):
            header = await client.read_holding_registers(address, count=2, device_id=unit_id)
            model, length = header.registers
            step = sunspec.next_header(address, model, length, index)
            assert step is not None, f"model {model_id} not found"
            if step.model_id == model_id:
                block = await client.read_holding_registers(
                    address, count=step.length + 2, device_id=unit_id
                )
                return address, sunspec.decode_model(model_id, block.registers)
            address = step.end
        raise AssertionError("chain too long")
    finally:
        client.close()


async def read_register(server: ControlServer, unit_id: int, address: int) -> int:
    client = AsyncModbusTcpClient(server.host, port=server.port)
    await client.connect()
    try:
        response = await client.read_holding_registers(address, count=1, device_id=unit_id)
        value: int = response.registers[0]
        return value
    finally:
        client.close()


# --- an MQTT subscriber ------------------------------------------------------------------


class Subscriber:
    """A device listening for commands on a real Mosquitto."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.messages: list[tuple[str, bytes, int]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "subscriber could not subscribe"

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), message.qos))

    def received(self) -> list[tuple[str, bytes, int]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def subscriber(broker: Mosquitto, topic: str) -> Iterator[Subscriber]:
    device = Subscriber(broker, topic)
    try:
        yield device
    finally:
        device.close()


# --- Kafka ---------------------------------------------------------------------------------


@pytest.fixture
async def settings(kafka_broker: EmbeddedBroker, make_settings: SettingsFactory) -> Settings:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    return settings


def command(device: str, setpoint_kw: float | None, n: int = 0, **fields: Any) -> Command:
    issued = datetime.now(UTC)
    values: dict[str, Any] = {
        "command_id": stable_id("cmd", device, n, uuid.uuid4().hex),
        "site": SITE,
        "device": device,
        "action": "set_power",
        "setpoint_kw": setpoint_kw,
        "reason": f"test command {n}",
        "issued_at": issued,
        "valid_until": issued + timedelta(minutes=5),
        "dry_run": False,
        **fields,
    }
    return Command(**values)


async def send_commands(settings: Settings, commands: list[Command]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for item in commands:
            await producer.send(
                settings.topic(topics.COMMANDS), codec.encode(item), key=item.site.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


async def audits(settings: Settings, connector: ControlConnector) -> list[Command]:
    records = await kafka.read_all(settings, connector.audit_spec)
    return [codec.decode(Command, value) for _, value in records]


@contextlib.asynccontextmanager
async def running(connector: ControlConnector) -> AsyncIterator[ControlConnector]:
    async with connector:
        runner = asyncio.create_task(connector.run())
        try:
            yield connector
        finally:
            await connector.stop()
            await runner


async def run_until_audited(
    settings: Settings, connector: ControlConnector, commands: list[Command]
) -> dict[str, Command]:
    """Run the connector until every command has its audit record; by command id."""
    async with running(connector):
        await send_commands(settings, commands)

        async def all_audited() -> bool:
            return len(await audits(settings, connector)) >= len(commands)

        await eventually(all_audited)
        # Everything audited is committed: the group has nothing left on the topic.
        await eventually(lambda: _lag_is_zero(settings, connector), timeout_s=10.0)
    records = await audits(settings, connector)
    assert len(records) == len(commands), "one audit record per command"
    by_id = {r.command_id: r for r in records}
    assert set(by_id) == {c.command_id for c in commands}
    return by_id


async def _lag_is_zero(settings: Settings, connector: ControlConnector) -> bool:
    lag = await kafka.group_lag(settings, connector.group_id, [settings.topic(topics.COMMANDS)])
    return lag.total == 0


def devices(server: ControlServer, mosquitto: Mosquitto, root: str) -> list[dict[str, Any]]:
    modbus = {"transport": "modbus", "host": server.host, "port": server.port, "site": SITE}
    return [
        {
            **modbus,
            "device": "bat-1",
            "unit_id": 1,
            "model": 704,
            "point": "WSet",
            "enable": {"WSetEna": 1},
            "min_setpoint_kw": -5.0,
            "max_setpoint_kw": 5.0,
            "min_interval_s": 0.0,
        },
        {
            **modbus,
            "device": "pv-1",
            "unit_id": 2,
            "model": 123,
            "point": "WMaxLimPct",
            "enable": {"WMaxLim_Ena": 1},
            "rated_kw": 10.0,
            "min_setpoint_kw": 0.0,
            "max_setpoint_kw": 10.0,
            "min_interval_s": 0.0,
        },
        {
            **modbus,
            "device": "heat-pump",
            "unit_id": 3,
            "register": RAW_REGISTER,
            "dtype": "int16",
            "scale": 10.0,
            "min_setpoint_kw": 0.0,
            "max_setpoint_kw": 5.0,
            "min_interval_s": 0.0,
        },
        {
            "transport": "mqtt",
            "url": mosquitto.url,
            "topic": f"{root}/{{site}}/{{device}}/command",
            "site": SITE,
            "device": "ev-1",
            "min_setpoint_kw": 0.0,
            "max_setpoint_kw": 11.0,
            "min_interval_s": 0.0,
        },
    ]


# --- the tests -------------------------------------------------------------------------------


async def test_dry_run_by_default_writes_and_publishes_nothing(
    settings: Settings, modbus: ControlServer, mosquitto: Mosquitto
) -> None:
    root = f"t{uuid.uuid4().hex[:10]}"
    config = ControlConfig.model_validate({"devices": devices(modbus, mosquitto, root)})
    assert config.enabled is False
    commands = [
        command("bat-1", 3.0),
        command("pv-1", 4.0),
        command("heat-pump", 1.5),
        command("ev-1", 7.0),
    ]
    with subscriber(mosquitto, f"{root}/#") as device:
        by_id = await run_until_audited(settings, ControlConnector(settings, config), commands)
        await asyncio.sleep(0.5)  # a publish, had there been one, came before its audit
        assert device.received() == []
    assert modbus.writes == []
    _, model_704 = await read_model(modbus, 1, 704)
    assert (model_704["WSet"], model_704["WSetEna"]) == (1230.0, 0)
    _, model_123 = await read_model(modbus, 2, 123)
    assert model_123["WMaxLimPct"] == 100.0
    assert await read_register(modbus, 3, RAW_REGISTER) == 7
    for item in commands:
        record = by_id[item.command_id]
        assert audit_outcome(record) == Outcome.DRY_RUN, record.reason
        assert record.dry_run and record.setpoint_kw == item.setpoint_kw
        assert "control is not enabled" in record.reason
    assert "would write 704.WSet = 3000 W, then WSetEna = 1" in by_id[commands[0].command_id].reason
    assert "would write 123.WMaxLimPct = 40 % WMax" in by_id[commands[1].command_id].reason
    assert '"setpoint_kw":7.0' in by_id[commands[3].command_id].reason


async def test_enabled_writes_clamped_setpoints_and_publishes(
    settings: Settings, modbus: ControlServer, mosquitto: Mosquitto
) -> None:
    root = f"t{uuid.uuid4().hex[:10]}"
    config = ControlConfig.model_validate(
        {"enabled": True, "devices": devices(modbus, mosquitto, root)}
    )
    past = datetime.now(UTC) - timedelta(minutes=10)
    commands = [
        command("bat-1", 12.0),  # clamped to 5 kW
        command("pv-1", 4.0),  # 40 % of 10 kW
        command("heat-pump", 3.3),  # 33 in 0.1 kW
        command("ev-1", 20.0),  # clamped to 11 kW
        command("ev-9", 1.0),  # unknown device
        command("heat-pump", 1.0, issued_at=past, valid_until=past + timedelta(minutes=1)),
    ]
    with subscriber(mosquitto, f"{root}/#") as device:
        by_id = await run_until_audited(settings, ControlConnector(settings, config), commands)
        await eventually(lambda: len(device.received()) >= 1, timeout_s=5.0)
        await asyncio.sleep(0.3)
        received = device.received()

    # The registers, read back over Modbus TCP and decoded with the device's scale factors.
    address_704, model_704 = await read_model(modbus, 1, 704)
    assert (model_704["WSet"], model_704["WSetEna"]) == (5000.0, 1)
    point = sunspec.load_model(704).point("WSet")
    # WSet_SF is 1: 5000 W is stored as 500.
    assert modbus.writes_to(1, address_704 + point.offset)[0].values == [0, 500]
    _, model_123 = await read_model(modbus, 2, 123)
    assert (model_123["WMaxLimPct"], model_123["WMaxLim_Ena"]) == (40.0, 1)
    assert await read_register(modbus, 3, RAW_REGISTER) == 33

    assert len(received) == 1
    topic, payload, qos = received[0]
    assert topic == f"{root}/{SITE}/ev-1/command" and qos == 1
    body = orjson.loads(payload)
    assert body["setpoint_kw"] == 11.0 and body["command_id"] == commands[3].command_id

    outcomes = {c.device + str(c.setpoint_kw): by_id[c.command_id] for c in commands}
    bat, pv, heat, ev = (outcomes[k] for k in ("bat-112.0", "pv-14.0", "heat-pump3.3", "ev-120.0"))
    for record in (bat, pv, heat, ev):
        assert audit_outcome(record) == Outcome.SENT, record.reason
        assert record.dry_run is False
    assert (bat.setpoint_kw, ev.setpoint_kw, pv.setpoint_kw) == (5.0, 11.0, 4.0)
    assert bat.reason.startswith("sent: clamped from 12 to 5 kW; wrote 704.WSet = 5000 W")
    assert ev.reason.startswith("sent: clamped from 20 to 11 kW; published")
    assert "clamped" not in pv.reason and "clamped" not in heat.reason
    unknown = outcomes["ev-91.0"]
    assert audit_outcome(unknown) == Outcome.REJECTED and unknown.dry_run
    assert "unknown device turin-home/ev-9" in unknown.reason
    expired = outcomes["heat-pump1.0"]
    assert audit_outcome(expired) == Outcome.SKIPPED and "expired at" in expired.reason
    # The expired command wrote nothing: the raw register saw exactly one write.
    assert [w.values for w in modbus.writes_to(3, RAW_REGISTER)] == [[33]]


async def test_a_burst_to_one_device_is_rate_limited_and_the_latest_wins(
    settings: Settings, modbus: ControlServer, mosquitto: Mosquitto
) -> None:
    """Commands every 0.1 s for 1.5 s to a device allowing one per second: without the
    limit that would be 15 writes; with it, writes are at least 1 s apart and each newer
    command replaces the pending one, so the device ends with the last setpoint."""
    min_interval_s = 1.0
    battery = {
        **devices(modbus, mosquitto, "unused")[0],
        "min_setpoint_kw": -20.0,
        "max_setpoint_kw": 20.0,
        "min_interval_s": min_interval_s,
    }
    config = ControlConfig.model_validate({"enabled": True, "devices": [battery]})
    first = command("bat-1", 0.5, 0)
    burst = [command("bat-1", 0.5 * (n + 1), n) for n in range(1, 16)]
    commands = [first, *burst]
    connector = ControlConnector(settings, config)
    async with running(connector):
        await send_commands(settings, [first])

        async def audited(count: int) -> bool:
            return len(await audits(settings, connector)) >= count

        # The consumer has joined and the first command went at once.
        await eventually(lambda: audited(1))
        burst_started = time.monotonic()
        for item in burst:
            await send_commands(settings, [item])
            await asyncio.sleep(0.1)
        burst_s = time.monotonic() - burst_started
        await eventually(lambda: audited(len(commands)))
        await eventually(lambda: _lag_is_zero(settings, connector), timeout_s=10.0)
    records = await audits(settings, connector)
    assert len(records) == len(commands), "one audit record per command"
    by_id = {r.command_id: r for r in records}

    address_704, model_704 = await read_model(modbus, 1, 704)
    setpoint_writes = modbus.writes_to(
        1, address_704 + sunspec.load_model(704).point("WSet").offset
    )
    # Never more writes than the limit allows, and at least the interval apart.
    assert 2 <= len(setpoint_writes) <= 1 + math.ceil(burst_s / min_interval_s) + 1
    gaps = [b.at - a.at for a, b in itertools.pairwise(setpoint_writes)]
    assert all(gap >= min_interval_s * 0.95 for gap in gaps), gaps
    # Replace-pending: the last command is what the device ends up with.
    assert model_704["WSet"] == 8000.0
    outcomes = [audit_outcome(by_id[c.command_id]) for c in commands]
    assert outcomes[0] == Outcome.SENT and outcomes[-1] == Outcome.SENT
    assert outcomes.count(Outcome.SENT) == len(setpoint_writes)
    assert outcomes.count(Outcome.RATE_LIMITED) == len(commands) - len(setpoint_writes)
    superseded = [
        by_id[c.command_id]
        for c, o in zip(commands, outcomes, strict=True)
        if o == Outcome.RATE_LIMITED
    ]
    assert all("superseded by" in r.reason and r.dry_run for r in superseded)


async def test_a_scram_is_applied_at_once_whatever_the_rate_limit(
    settings: Settings, modbus: ControlServer, mosquitto: Mosquitto
) -> None:
    """A device allowing one write per minute: a setpoint goes, then a SCRAM does not wait
    out the minute, and a setpoint that follows it cannot supersede it."""
    battery = {
        **devices(modbus, mosquitto, "unused")[0],
        "min_setpoint_kw": -20.0,
        "max_setpoint_kw": 20.0,
        "min_interval_s": 60.0,
    }
    config = ControlConfig.model_validate({"enabled": True, "devices": [battery]})
    setpoint = command("bat-1", 5.0, 0)
    scram = command("bat-1", None, 1, action="scram")
    after = command("bat-1", 7.0, 2)
    connector = ControlConnector(settings, config)
    async with running(connector):

        async def audited(count: int) -> bool:
            return len(await audits(settings, connector)) >= count

        await send_commands(settings, [setpoint])
        await eventually(lambda: audited(1))
        started = time.monotonic()
        await send_commands(settings, [scram, after])
        await eventually(lambda: audited(3))
        waited_s = time.monotonic() - started
    by_id = {r.command_id: r for r in await audits(settings, connector)}
    assert audit_outcome(by_id[setpoint.command_id]) == Outcome.SENT
    assert audit_outcome(by_id[scram.command_id]) == Outcome.SENT
    held = by_id[after.command_id]
    assert audit_outcome(held) == Outcome.RATE_LIMITED and "held back" in held.reason
    assert waited_s < 30.0  # not the 60 s interval
    address_704, model_704 = await read_model(modbus, 1, 704)
    writes = modbus.writes_to(1, address_704 + sunspec.load_model(704).point("WSet").offset)
    assert len(writes) == 2
    assert model_704["WSet"] == 0.0  # the safe state, not the later setpoint


async def test_a_device_that_does_not_answer_fails_after_retries_and_the_stream_goes_on(
    settings: Settings, modbus: ControlServer, mosquitto: Mosquitto
) -> None:
    modbus.busy_writes = 2  # the battery answers "busy" twice, then takes the write
    nobody = free_port()
    fast = {"min_interval_s": 0.0, "site": SITE, "transport": "modbus", "host": "127.0.0.1"}
    config = ControlConfig.model_validate(
        {
            "enabled": True,
            "max_attempts": 3,
            "retry_initial_s": 0.05,
            "retry_max_s": 0.2,
            "request_timeout_s": 1.0,
            "devices": [
                {
                    **fast,
                    "device": "dead",
                    "port": nobody,
                    "register": 1,
                    "min_setpoint_kw": 0.0,
                    "max_setpoint_kw": 5.0,
                },
                {
                    **fast,
                    "device": "locked",
                    "port": modbus.port,
                    "unit_id": 3,
                    "register": LOCKED_REGISTER,
                    "min_setpoint_kw": 0.0,
                    "max_setpoint_kw": 5.0,
                },
                devices(modbus, mosquitto, "unused")[0],
            ],
        }
    )
    commands = [command("dead", 1.0), command("locked", 1.0), command("bat-1", 2.0)]
    connector = ControlConnector(settings, config)
    by_id = await run_until_audited(settings, connector, commands)
    dead, locked, bat = (by_id[c.command_id] for c in commands)
    assert audit_outcome(dead) == Outcome.FAILED
    assert "no answer after 3 attempts" in dead.reason and dead.dry_run is False
    # Illegal address: no retry helps, so none is made.
    assert audit_outcome(locked) == Outcome.FAILED and "not retried" in locked.reason
    assert await read_register(modbus, 3, LOCKED_REGISTER) == 9
    # The battery answered busy twice; the third attempt went through.
    assert audit_outcome(bat) == Outcome.SENT, bat.reason
    _, model_704 = await read_model(modbus, 1, 704)
    assert model_704["WSet"] == 2000.0
    assert connector.stats.attempts_failed == 3 + 2
    assert (connector.stats.sent, connector.stats.failed) == (1, 2)


async def test_with_unknown_devices_ignore_another_consumers_commands_get_no_audit(
    settings: Settings, modbus: ControlServer, mosquitto: Mosquitto
) -> None:
    """Next to another consumer of the commands topic (the OCPP CSMS), a command for a
    device not in the config is left to it: no audit here, yet committed past."""
    battery = devices(modbus, mosquitto, "unused")[0]
    config = ControlConfig.model_validate(
        {"enabled": True, "unknown_devices": "ignore", "devices": [battery]}
    )
    # The known command between two ignored ones of its partition (same site, same key),
    # and one of another site: every partition must be committed to its end.
    before = command("ev-9", 1.0, 0)
    known = command("bat-1", 2.0, 1)
    after = command("wallbox-1", 3.0, 2)
    elsewhere = command("bat-1", 1.0, 3, site="milan")
    connector = ControlConnector(settings, config)
    async with running(connector):
        await send_commands(settings, [before, known, after, elsewhere])

        async def known_audited() -> bool:
            return len(await audits(settings, connector)) >= 1

        await eventually(known_audited)
        await eventually(lambda: _lag_is_zero(settings, connector), timeout_s=10.0)
        # Lag 0: every command was handled (an audit is acked before its offset is
        # released), so the audit topic now holds all there will ever be.
        records = await audits(settings, connector)
    assert [r.command_id for r in records] == [known.command_id]
    assert audit_outcome(records[0]) == Outcome.SENT, records[0].reason
    _, model_704 = await read_model(modbus, 1, 704)
    assert model_704["WSet"] == 2000.0
    stats = connector.stats
    assert (stats.commands, stats.ignored, stats.audited, stats.rejected) == (4, 3, 1, 0)


async def test_the_cli_runs_the_connector_until_sigterm(
    settings: Settings, modbus: ControlServer, tmp_path: Path
) -> None:
    """`wattstream ingest control CONFIG.toml`: dry-run by default, audits, exits 0."""
    config = tmp_path / "control.toml"
    config.write_text(
        f"""[control]
[[control.devices]]
transport = "modbus"
host = "{modbus.host}"
port = {modbus.port}
site = "{SITE}"
device = "bat-1"
model = 704
point = "WSet"
min_setpoint_kw = -5.0
max_setpoint_kw = 5.0
"""
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    metrics_port = free_port("127.0.0.1")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline.cli",
        "ingest",
        "control",
        str(config),
        env={
            **environment,
            "WATTSTREAM_BROKER": settings.broker or "",
            "WATTSTREAM_TOPIC_PREFIX": settings.topic_prefix,
            "WATTSTREAM_PARTITIONS": str(settings.partitions),
            "WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH": "true",
            "WATTSTREAM_METRICS_PORT": str(metrics_port),
        },
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        item = command("bat-1", 9.0)
        await send_commands(settings, [item])
        spec = audit_topic_spec()

        async def audited() -> bool:
            assert process.returncode is None, "the connector exited"
            return len(await kafka.read_all(settings, spec)) == 1

        await eventually(audited, timeout_s=60.0)
        # Its /metrics says the same: one command, dry-run.
        page = await asyncio.to_thread(metrics_page, f"http://127.0.0.1:{metrics_port}/metrics")
        assert page[("wattstream_commands_total", ("control", "dry_run"))] == 1.0
        assert page[("wattstream_commands_total", ("control", "sent"))] == 0.0
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert b"Traceback" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    (_, value), *_ = await kafka.read_all(settings, spec)
    record = codec.decode(Command, value)
    assert record.command_id == item.command_id and audit_outcome(record) == Outcome.DRY_RUN
    assert record.setpoint_kw == 5.0 and "clamped from 9 to 5 kW" in record.reason
    assert modbus.writes == []
