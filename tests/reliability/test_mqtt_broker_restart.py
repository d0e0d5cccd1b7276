"""Mosquitto restarted under the MQTT connector: it reconnects by itself, and QoS 1 messages
published during the outage by a persistent client arrive (moved from
tests/integration/test_mqtt_connector.py, whose fixtures and helpers they use)."""

from __future__ import annotations

import orjson
import pytest

from ingest.mqtt import MqttConnector
from pipeline.settings import Settings
from tests.integration.test_mqtt_connector import (
    config,
    eventually,
    publisher,
    running,
    telemetry,
)
from tests.servers import Mosquitto

pytestmark = pytest.mark.reliability


async def test_mosquitto_restart_under_a_running_connector_loses_nothing(
    settings: Settings, mosquitto: Mosquitto, root: str
) -> None:
    def reading(n: int) -> bytes:
        return orjson.dumps({"ts": f"2025-04-07T10:{n:02d}:00Z", "power_kw": float(n)})

    connector = MqttConnector(settings, config(mosquitto, root))
    async with running(connector):
        with publisher(mosquitto) as device:
            for n in range(3):
                device.publish(f"{root}/s1/meter/m1", reading(n))
            await eventually(lambda: connector.stats.readings_produced == 3)

            mosquitto.stop()
            try:
                await eventually(lambda: not connector.connected, timeout_s=15)
                # Published while the broker is down: paho keeps QoS 1 messages of its
                # session and sends them once it is back.
                for n in range(3, 10):
                    device.publish(f"{root}/s1/meter/m1", reading(n))
            finally:
                mosquitto.start()
            await eventually(lambda: connector.stats.readings_produced == 10)
            await eventually(device.all_acked)
    assert connector.stats.connects >= 2 and connector.stats.disconnects >= 1
    values = sorted(
        r.model_dump()["power_kw"] for _, batch in await telemetry(settings) for r in batch.readings
    )
    assert values == [float(n) for n in range(10)]


async def test_messages_for_a_stopped_connector_wait_in_its_session_across_a_broker_restart(
    settings: Settings, mosquitto: Mosquitto, root: str
) -> None:
    """clean_start False from the very first connect: the broker kept our session, wrote
    it to its persistence file on restart, and delivers what came while we were away."""
    first = MqttConnector(settings, config(mosquitto, root))
    async with running(first):
        pass  # the first connect creates the session and its subscription
    with publisher(mosquitto) as device:
        for n in range(5):
            device.publish(f"{root}/s1/home/h1", orjson.dumps({"power_kw": float(n)}))
        await eventually(device.all_acked)
    mosquitto.stop()
    mosquitto.start()
    second = MqttConnector(settings, config(mosquitto, root))
    async with running(second):
        await eventually(lambda: second.stats.readings_produced == 5)
    values = [r.model_dump()["power_kw"] for _, b in await telemetry(settings) for r in b.readings]
    assert sorted(values) == [0.0, 1.0, 2.0, 3.0, 4.0]
