"""The MQTT connector against a real Mosquitto and the embedded Kafka broker: payloads in,
batches and dead letters out, a broker restart under load, and redelivery of what was
never produced."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.mqtt import MqttConfig, MqttConnector, MqttConnectorError
from pipeline import codec, kafka, topics
from pipeline.local import EmbeddedBroker
from pipeline.schemas import DeadLetter, TelemetryBatch
from pipeline.settings import Settings
from tests.conftest import SettingsFactory
from tests.servers import Mosquitto

pytestmark = pytest.mark.integration


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


class Publisher:
    """A device: paho with a persistent MQTT 5 session, so QoS 1 messages published
    while the broker is away are kept and sent when it is back."""

    def __init__(self, broker: Mosquitto) -> None:
        self.connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"pub-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda *args: self.connected.set()
        self.client.on_disconnect = lambda *args: self.connected.clear()
        # PUBACKs by packet id. MQTTMessageInfo.is_published() raises for a message
        # published while disconnected, although paho sends it after reconnecting.
        self.acked: set[int] = set()
        self.client.on_publish = lambda _c, _u, mid, _rc, _p: self.acked.add(mid)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 600
        self.client.connect_async(
            broker.host, broker.port, clean_start=False, properties=properties
        )
        self.client.loop_start()
        assert self.connected.wait(10), "publisher could not connect"
        self.infos: list[paho.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes | str) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1))

    def all_acked(self) -> bool:
        return all(info.mid in self.acked for info in self.infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    device = Publisher(broker)
    try:
        yield device
    finally:
        device.close()


@pytest.fixture
async def settings(kafka_broker: EmbeddedBroker, make_settings: SettingsFactory) -> Settings:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    return settings


@pytest.fixture
def root() -> str:
    """A topic root of this test's own: the Mosquitto is shared by the session."""
    return f"t{uuid.uuid4().hex[:10]}"


def config(mosquitto: Mosquitto, root: str, **overrides: Any) -> MqttConfig:
    defaults: dict[str, Any] = {
        "url": mosquitto.url,
        "client_id": f"ingest-{root}",
        "topics": (f"{root}/{{site}}/{{kind}}/{{device}}",),
        "batch_max_wait_s": 0.2,
        "reconnect_min_s": 1,
        "reconnect_max_s": 1,
        # Short keepalive so a broker that vanished is noticed quickly.
        "keepalive_s": 5,
    }
    return MqttConfig(**{**defaults, **overrides})


@contextlib.asynccontextmanager
async def running(connector: MqttConnector) -> AsyncIterator[MqttConnector]:
    await connector.start()
    task = asyncio.create_task(connector.run())
    try:
        yield connector
    finally:
        await connector.stop()
        await connector.stop()  # safe twice
        await task


async def telemetry(settings: Settings) -> list[tuple[str, TelemetryBatch]]:
    records = await kafka.read_all(settings, topics.TELEMETRY)
    return [((key or b"").decode(), codec.decode(TelemetryBatch, value)) for key, value in records]


async def dead_letters(settings: Settings) -> list[DeadLetter]:
    records = await kafka.read_all(settings, topics.DEAD_LETTERS)
    return [codec.decode(DeadLetter, value) for _, value in records]


async def test_json_payloads_flow_and_a_malformed_one_is_dead_lettered(
    settings: Settings, mosquitto: Mosquitto, root: str
) -> None:
    connector = MqttConnector(settings, config(mosquitto, root))
    async with running(connector):
        with publisher(mosquitto) as device:
            device.publish(
                f"{root}/turin/battery/bat-1",
                orjson.dumps({"ts": "2025-04-07T10:00:00Z", "P": -1500, "SoC": 48.5}),
            )
            device.publish(f"{root}/turin/meter/m-1", b'{"power_kw": ')
            device.publish(
                f"{root}/milan/meter/m-2",
                orjson.dumps(
                    [
                        {"time": "2025-04-07T10:00:00Z", "power_kw": 2.0},
                        {"time": "2025-04-07T10:00:10Z", "power_kw": -0.5, "E_in": 1000},
                    ]
                ),
            )
            device.publish(f"{root}/turin/heatpump/hp-1", b'{"power_kw": 1}')
            await eventually(lambda: connector.stats.messages_acked == 4)
            await eventually(device.all_acked)
    assert connector.stats.messages_received == 4
    assert connector.stats.readings_produced == 3
    assert connector.stats.dead_lettered == 2

    batches = await telemetry(settings)
    assert {key for key, _ in batches} == {"turin", "milan"}
    assert all(
        batch.site == key and batch.source == f"mqtt:ingest-{root}" for key, batch in batches
    )
    readings = {
        (batch.site, r.device): r.model_dump(mode="json", exclude_none=True)
        for _, batch in batches
        for r in batch.readings
    }
    assert readings[("turin", "bat-1")] == {
        "kind": "battery",
        "device": "bat-1",
        "ts": "2025-04-07T10:00:00Z",
        "power_kw": -1.5,
        "soc_pct": 48.5,
    }
    milan = [r for _, b in batches if b.site == "milan" for r in b.readings]
    assert [(r.model_dump()["power_kw"], r.model_dump()["import_energy_kwh"]) for r in milan] == [
        (2.0, None),
        (-0.5, 1.0),
    ]

    letters = {letter.source_topic: letter for letter in await dead_letters(settings)}
    bad_json = letters[f"{root}/turin/meter/m-1"]
    assert bad_json.component == "ingest.mqtt"
    assert bad_json.raw == '{"power_kw": '
    assert bad_json.reason.startswith("not JSON: ")
    bad_kind = letters[f"{root}/turin/heatpump/hp-1"]
    assert bad_kind.error_type == "UnknownKind" and "'heatpump'" in bad_kind.reason


async def test_line_protocol_payloads_with_tags_and_a_malformed_line(
    settings: Settings, mosquitto: Mosquitto, root: str
) -> None:
    connector = MqttConnector(
        settings, config(mosquitto, root, payload_format="line-protocol", mqtt_version="3.1.1")
    )
    async with running(connector):
        with publisher(mosquitto) as device:
            device.publish(
                f"{root}/turin/lp/gw-1",
                "solar,device=pv-1 P=3200i,irradiance_w_m2=810 1744020000000000000\n"
                "solar,device=pv-2 P=\n"
                "home,site=milan power_kw=0.4 1744020000000000000\n",
            )
            await eventually(lambda: connector.stats.messages_acked == 1)
    batches = await telemetry(settings)
    by_site = {key: batch for key, batch in batches}
    (solar,) = by_site["turin"].readings
    assert solar.model_dump() == {
        "kind": "solar",
        "device": "pv-1",
        "ts": datetime(2025, 4, 7, 10, tzinfo=UTC),
        "power_kw": 3.2,
        "irradiance_w_m2": 810.0,
        "temp_air_c": None,
        "temp_module_c": None,
    }
    (home,) = by_site["milan"].readings
    assert (home.device, home.model_dump()["power_kw"]) == ("gw-1", 0.4)
    (letter,) = await dead_letters(settings)
    assert letter.reason == "line 2: Failed to parse value of field. in 'solar,device=pv-2 P='"
    assert letter.raw.startswith("solar,device=pv-1")


async def test_a_message_not_yet_produced_is_not_acked_and_comes_again(
    settings: Settings, mosquitto: Mosquitto, root: str
) -> None:
    """A crash between receipt and the Kafka produce loses nothing: the ack waits for Kafka."""
    # A long batch wait keeps the message in memory until we "crash".
    crashing = MqttConnector(settings, config(mosquitto, root, batch_max_wait_s=60))
    await crashing.start()
    task = asyncio.create_task(crashing.run())
    with publisher(mosquitto) as device:
        device.publish(f"{root}/s1/meter/m1", b'{"power_kw": 7.5}')
        await eventually(lambda: crashing.stats.messages_received == 1)
    # A crash: the network connection and the producer go, nothing is flushed.
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await crashing._shutdown_clients()
    assert crashing.stats.messages_acked == 0 and crashing.stats.readings_produced == 0

    again = MqttConnector(settings, config(mosquitto, root))
    async with running(again):
        await eventually(lambda: again.stats.readings_produced == 1)
    ((_, batch),) = await telemetry(settings)
    assert batch.readings[0].model_dump()["power_kw"] == 7.5


async def test_a_refused_login_fails_start_at_once_and_is_not_retried(
    settings: Settings, root: str
) -> None:
    with Mosquitto(allow_anonymous=False) as closed_broker:
        connector = MqttConnector(
            settings, config(closed_broker, root, username="u", password="not-logged")
        )
        started = asyncio.get_running_loop().time()
        with pytest.raises(MqttConnectorError, match="refused the connection: Not authorized"):
            await connector.start()
        assert asyncio.get_running_loop().time() - started < 5  # not the 10 s connect timeout
        await connector.stop()
        assert "not-logged" not in closed_broker.log_tail()
