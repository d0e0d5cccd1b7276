"""The SunSpec simulator and the Modbus connector over real Modbus TCP.

* pysunspec2's own client scans the simulator and decodes the same values as our
  decoder: two independent implementations of the SunSpec rules agree.
* The connector polls simulators and its readings arrive in the embedded Kafka broker.
* A simulator that goes away raises a device-offline alert, and a resolved one when
  it is back, while a device on another simulator keeps being polled on time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from pymodbus.client import AsyncModbusTcpClient
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from ingest import sunspec
from ingest.modbus import ModbusConfig, ModbusConnector
from ingest.simulators.sunspec_server import SunSpecServer, battery, inverter, meter
from pipeline import codec, kafka, topics
from pipeline.local import EmbeddedBroker
from pipeline.schemas import (
    Alert,
    BatteryReading,
    DeadLetter,
    MeterReading,
    TelemetryBatch,
)
from pipeline.settings import Settings
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration

T = TypeVar("T")


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


async def in_daemon_thread(function: Callable[[], T], timeout_s: float = 30.0) -> T:
    """Run blocking code (pysunspec2's socket client) off the loop that serves the
    simulator. A daemon thread, not the default executor, whose worker threads
    outlive the test and trip the leaked-thread guard."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = function()
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting test
            loop.call_soon_threadsafe(future.set_exception, error)
        else:
            loop.call_soon_threadsafe(future.set_result, result)

    threading.Thread(target=target, daemon=True).start()
    return await asyncio.wait_for(future, timeout_s)


async def test_address_has_no_shift() -> None:
    """SunS is served at 40000 exactly; 39999 is an illegal address."""
    async with SunSpecServer([inverter(unit_id=1)]) as server:
        client = AsyncModbusTcpClient(server.host, port=server.port)
        await client.connect()
        try:
            marker = await client.read_holding_registers(40000, count=2, device_id=1)
            assert tuple(marker.registers) == sunspec.SUNS_MARKER
            before = await client.read_holding_registers(39999, count=1, device_id=1)
            assert before.isError() and before.exception_code == 2
        finally:
            client.close()


async def test_pysunspec2_client_agrees_with_our_decoder() -> None:
    devices = [
        inverter(unit_id=1, power_w=1234.0),
        battery(unit_id=2, soc_pct=63.7, power_w=-2100.0),
        meter(unit_id=3, power_w=-1520.0, import_wh=123_456.0, export_wh=7_890.0),
    ]
    async with SunSpecServer(devices) as server:
        for device in devices:

            def scan(unit_id: int = device.unit_id) -> dict[int, dict[str, Any]]:
                client = SunSpecModbusClientDeviceTCP(
                    slave_id=unit_id, ipaddr=server.host, ipport=server.port, timeout=5
                )
                try:
                    client.scan()
                    return {
                        model_id: {name: point.cvalue for name, point in models[0].points.items()}
                        for model_id, models in client.models.items()
                        if isinstance(model_id, int)
                    }
                finally:
                    client.close()

            theirs = await in_daemon_thread(scan)
            assert set(theirs) == set(device.models), f"unit {device.unit_id}"
            client = AsyncModbusTcpClient(server.host, port=server.port)
            await client.connect()
            try:
                ours = await read_models(client, device.unit_id)
            finally:
                client.close()
            for model_id, their_points in theirs.items():
                for name, their_value in their_points.items():
                    if sunspec.load_model(model_id).point(name).type == "pad":
                        continue  # padding carries no value: our decoder omits it
                    assert name in ours[model_id], (model_id, name)
                    our_value = ours[model_id].get(name)
                    if isinstance(their_value, float) or isinstance(our_value, float):
                        assert our_value == pytest.approx(their_value, rel=1e-12), (
                            model_id,
                            name,
                        )
                    else:
                        assert our_value == their_value, (model_id, name)
    # Spot-check the physical values made it through both implementations.
    assert theirs[203]["W"] == -1520.0


async def read_models(client: AsyncModbusTcpClient, unit_id: int) -> dict[int, dict[str, Any]]:
    marker = await client.read_holding_registers(40000, count=2, device_id=unit_id)
    assert tuple(marker.registers) == sunspec.SUNS_MARKER
    decoded: dict[int, dict[str, Any]] = {}
    address = 40002
    while True:
        header = await client.read_holding_registers(address, count=2, device_id=unit_id)
        model_id, length = header.registers
        step = sunspec.next_header(address, model_id, length, len(decoded))
        if step is None:
            return decoded
        block = await client.read_holding_registers(
            address, count=step.length + 2, device_id=unit_id
        )
        decoded[step.model_id] = sunspec.decode_model(step.model_id, block.registers)
        address = step.end


# --- the connector with Kafka -------------------------------------------------------------


async def batches(settings: Settings) -> list[TelemetryBatch]:
    records = await kafka.read_all(settings, topics.TELEMETRY)
    return [codec.decode(TelemetryBatch, value) for _, value in records]


async def alerts(settings: Settings) -> list[Alert]:
    records = await kafka.read_all(settings, topics.ALERTS)
    return [codec.decode(Alert, value) for _, value in records]


def device(server: SunSpecServer, unit_id: int, **fields: Any) -> dict[str, Any]:
    return {"host": server.host, "port": server.port, "unit_id": unit_id, **fields}


async def test_readings_arrive_in_kafka(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    server = SunSpecServer(
        [
            inverter(unit_id=1, power_w=1500.0),
            battery(unit_id=2, soc_pct=48.5, power_w=-2000.0),
            meter(unit_id=3, power_w=-1200.0, import_wh=1_000_000.0, export_wh=500_000.0),
        ]
    )
    config = ModbusConfig(
        devices=[
            device(server, 1, site="turin-home", device="pv-1", kind="solar", poll_interval_s=0.2),
            device(
                server, 2, site="turin-home", device="bat-1", kind="battery", poll_interval_s=0.2
            ),
            device(server, 3, site="turin-home", device="grid", kind="meter", poll_interval_s=0.2),
        ]
    )
    async with server, ModbusConnector(settings, config) as connector:
        runner = asyncio.create_task(connector.run())
        try:

            async def all_kinds() -> bool:
                kinds = {r.kind for b in await batches(settings) for r in b.readings}
                return kinds == {"solar", "battery", "meter"}

            await eventually(all_kinds)
        finally:
            await connector.stop()
            await runner
    readings = {r.kind: r for b in await batches(settings) for r in b.readings}
    assert readings["solar"].model_dump(exclude={"ts"}) == {
        "device": "pv-1",
        "kind": "solar",
        "power_kw": 1.5,
        "irradiance_w_m2": None,
        "temp_air_c": None,
        "temp_module_c": None,
    }
    bat, grid = readings["battery"], readings["meter"]
    assert isinstance(bat, BatteryReading) and isinstance(grid, MeterReading)
    assert (bat.device, bat.power_kw, bat.soc_pct, bat.voltage_v) == ("bat-1", -2.0, 48.5, 51.2)
    assert (grid.power_kw, grid.import_energy_kwh, grid.export_energy_kwh) == (
        -1.2,
        1000.0,
        500.0,
    )
    assert (grid.voltage_v, grid.frequency_hz) == (230.0, 50.0)
    assert all(
        b.site == "turin-home" and b.source == "modbus:wattstream-modbus"
        for b in await batches(settings)
    )
    assert connector.stats.polls_ok > 0 and connector.stats.registers_read > 0


async def test_illegal_address_is_dead_lettered_not_offline(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    """A unit id whose map has no SunS anywhere: a config problem, dead-lettered once."""
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    server = SunSpecServer([inverter(unit_id=1)], base_address=40000)
    config = ModbusConfig(
        devices=[
            device(
                server,
                1,
                site="site-b",
                device="pv-x",
                kind="solar",
                poll_interval_s=0.1,
                base_address=50000,
            )
        ],
        offline_after_failures=1,
    )
    async with server, ModbusConnector(settings, config) as connector:
        runner = asyncio.create_task(connector.run())
        try:
            await eventually(lambda: connector.stats.dead_lettered == 1)
            state = connector.device_state("site-b", "pv-x")
            # Left alone until reconnect_max_s (60 s) has passed: no rediscovery storm.
            assert state.models is None and state.rediscover_at > asyncio.get_running_loop().time()
        finally:
            await connector.stop()
            await runner
    assert connector.stats.dead_lettered == 1 and connector.stats.polls_failed == 0
    assert connector.stats.alerts_sent == 0 and connector.stats.devices_offline == 0
    letters = await kafka.read_all(settings, topics.DEAD_LETTERS)
    assert len(letters) == 1 and b"illegal" in letters[0][1]


async def test_model_with_illegal_address_is_dropped_and_dead_lettered_once(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    """The battery's 802 block answers "illegal address": SoC then comes from nowhere,
    so the reading fails validation (dead-lettered once too); the device is not offline
    and 802 is not asked for again."""
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    bat = battery(unit_id=1, soc_pct=40.0)
    bat.refused_models.add(802)
    server = SunSpecServer([bat])
    config = ModbusConfig(
        devices=[
            device(server, 1, site="site-c", device="bat-x", kind="battery", poll_interval_s=0.1)
        ],
        offline_after_failures=1,
    )
    async with server, ModbusConnector(settings, config) as connector:
        runner = asyncio.create_task(connector.run())
        try:
            await eventually(lambda: connector.stats.polls_ok >= 5)
        finally:
            await connector.stop()
            await runner
    state = connector.device_state("site-c", "bat-x")
    assert state.models is not None and 802 not in {h.model_id for h in state.models}
    assert connector.stats.alerts_sent == 0 and connector.stats.polls_failed == 0
    letters = [
        codec.decode(DeadLetter, value)
        for _, value in await kafka.read_all(settings, topics.DEAD_LETTERS)
    ]
    assert sorted(letter.error_type for letter in letters) == ["illegal", "mapping"]
    assert any("model 802" in letter.reason for letter in letters)
