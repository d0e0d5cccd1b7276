"""Publish simulated device telemetry over MQTT, paced by simulated time.

A simulation is a function from an instant to readings (``ReadingSource``);
:func:`run_simulation` steps simulated time from ``start`` by ``step_s``,
``speed`` times faster than the wall clock, and publishes each reading as one
JSON payload on ``sites/{site}/{kind}/{device}`` (the pattern
:mod:`ingest.mqtt` subscribes to by default) at QoS 1. The payloads use our
field names, so the connector needs no field map::

    sites/sim-home/home/home-1   {"ts": "2026-06-21T12:00:00+00:00", "power_kw": 0.522}
    sites/sim-home/solar/pv-1    {"ts": "2026-06-21T12:00:00+00:00", "power_kw": 2.13}
    sites/sim-home/ev/ev-1       {"ts": "2026-06-21T12:00:00+00:00", "power_kw": 11.0,
                                  "soc_pct": 49.3, "plugged_in": true, "energy_kwh": 0.94}

:class:`HomeFleet` is the household simulation (``wattstream simulate mqtt``):
``homes`` homes with an H25 load and a rooftop PV array each, and ``evs``
electric vehicles with a wallbox, all at one site (see
:mod:`ingest.simulators.profiles`). The fusion simulation
(:mod:`ingest.simulators.fusion`) publishes through the same functions.

Delivery: QoS 1 from us to the broker; :meth:`MqttPublisher.stop` waits (up
to ``drain_timeout_s``) for the broker's PUBACK of everything published before
it disconnects, so a clean stop loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from ingest.mqtt import join_network_thread
from ingest.simulators.profiles import (
    EvConfig,
    PvArray,
    ev_state,
    household_load_kw,
    pv_power_kw,
)
from pipeline.schemas import Identifier

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "sites/{site}/{kind}/{device}"

Reading = tuple[str, str, dict[str, Any]]
"""(kind, device, fields) of one reading; the publisher adds ``ts``."""
ReadingSource = Callable[[datetime], list[Reading]]


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """(host, port) of ``mqtt://host[:port]``; raises ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt":
        raise ValueError(f"url {url!r}: scheme must be mqtt:// (TLS is not supported yet)")
    if parts.username or parts.password:
        raise ValueError("url must not hold credentials")
    if not parts.hostname:
        raise ValueError(f"url {url!r} has no host")
    try:
        return parts.hostname, parts.port or 1883
    except ValueError:
        raise ValueError(f"url {url!r} has an invalid port") from None


class PublisherConfig(BaseModel):
    """Where and how simulated readings are published; checked with no network calls."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    url: str = "mqtt://localhost:1883"
    site: Identifier = "sim-home"
    topic: str = DEFAULT_TOPIC
    """Topic pattern with ``{site}``, ``{kind}`` and ``{device}``."""
    speed: float = Field(default=60.0, gt=0, le=1_000_000)
    """Simulated seconds per wall-clock second. [-]"""
    step_s: float = Field(default=60.0, gt=0)
    """Simulated time between two readings of a device. [s]"""
    duration_s: float | None = Field(default=None, gt=0)
    """Simulated time to cover; None runs until stopped. [s]"""
    start: AwareDatetime | None = None
    """First simulated instant; None is now."""
    seed: int = 0
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    drain_timeout_s: float = Field(default=10.0, gt=0)
    """How long stop() waits for the broker's acks of what was published. [s]"""

    @model_validator(mode="after")
    def _consistent(self) -> PublisherConfig:
        parse_mqtt_url(self.url)
        for name in ("{site}", "{kind}", "{device}"):
            if name not in self.topic:
                raise ValueError(f"topic {self.topic!r} must contain {name}")
        return self


class MqttPublisher:
    """A paho 2.x client that publishes at QoS 1 from asyncio and stops cleanly."""

    def __init__(self, url: str, *, client_id: str | None = None, qos: int = 1) -> None:
        self.host, self.port = parse_mqtt_url(url)
        self.url = url
        self.qos = qos
        self.published = 0
        self.acked = 0
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"wattstream-sim-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self._client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        # paho queues beyond its in-flight window; 100 keeps a fast simulation from
        # waiting on round trips while staying far below Mosquitto's queue limits.
        self._client.max_inflight_messages_set(100)
        self._started = False

    async def start(self, timeout_s: float = 10.0) -> None:
        """Connect; raises ConnectionError naming the broker if it does not answer."""
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()
        self._started = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._connected.is_set():
            if loop.time() > deadline:
                await self.stop()
                raise ConnectionError(f"MQTT broker {self.url} did not accept us in {timeout_s} s")
            await asyncio.sleep(0.05)

    def publish(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.published += 1
        self._client.publish(topic, payload, qos=self.qos)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Wait for the acks of what was published, disconnect and join paho's thread."""
        if not self._started:
            return
        self._started = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        while self.qos and self.acked < self.published and self._connected.is_set():
            if loop.time() > deadline:
                log.warning(
                    "mqtt simulator: %d of %d messages not acked by %s at stop",
                    self.published - self.acked,
                    self.published,
                    self.url,
                )
                break
            await asyncio.sleep(0.05)
        self._client.disconnect()
        await join_network_thread(self._client)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("mqtt simulator: %s refused the connection: %s", self.url, reason_code)
            return
        log.info("mqtt simulator connected to %s", self.url)
        self._connected.set()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self.acked += 1


@dataclass
class SimulationStats:
    steps: int = 0
    readings_published: int = 0
    messages_acked: int = 0
    first_ts: datetime | None = None
    last_ts: datetime | None = None


async def run_simulation(
    source: ReadingSource,
    config: PublisherConfig,
    *,
    stop: asyncio.Event | None = None,
    on_step: Callable[[SimulationStats], None] | None = None,
) -> SimulationStats:
    """Publish ``source``'s readings every ``step_s`` of simulated time until
    ``duration_s`` is covered or ``stop`` is set, then stop the client cleanly."""
    stop = stop or asyncio.Event()
    stats = SimulationStats()
    start = config.start or datetime.now(UTC)
    publisher = MqttPublisher(config.url, client_id=config.client_id)
    await publisher.start()
    try:
        loop = asyncio.get_running_loop()
        wall_start = loop.time()
        step = 0
        while not stop.is_set():
            offset_s = step * config.step_s
            if config.duration_s is not None and offset_s >= config.duration_s:
                break
            delay_s = wall_start + offset_s / config.speed - loop.time()
            if delay_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay_s)
                if stop.is_set():
                    break
            at = start + timedelta(seconds=offset_s)
            for kind, device, fields in source(at):
                topic = config.topic.format(site=config.site, kind=kind, device=device)
                publisher.publish(topic, orjson.dumps({"ts": at, **fields}))
                stats.readings_published += 1
            stats.first_ts = stats.first_ts or at
            stats.last_ts = at
            stats.steps = step = step + 1
            if on_step is not None:
                on_step(stats)
    finally:
        await publisher.stop(config.drain_timeout_s)
        stats.messages_acked = publisher.acked
    return stats


# --- households ---------------------------------------------------------------------------


class FleetConfig(BaseModel):
    """The households and vehicles of ``wattstream simulate mqtt``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    homes: int = Field(default=3, ge=0, le=10_000)
    evs: int = Field(default=1, ge=0, le=10_000)
    annual_kwh: float = Field(default=3_500.0, ge=0)
    """Yearly consumption of each home (a typical 3-person household). [kWh]"""
    pv_kwp: float = Field(default=5.0, ge=0)
    """Rooftop array per home; 0 publishes no solar readings. [kWp]"""
    charger_kw: float = Field(default=11.0, gt=0)
    timezone: str = "Europe/Berlin"

    @model_validator(mode="after")
    def _simulates_something(self) -> FleetConfig:
        if self.homes == 0 and self.evs == 0:
            raise ValueError("homes and evs are both 0: nothing to simulate")
        return self


class HomeFleet:
    """``homes`` homes (load ``home-i``, PV ``pv-i``) and ``evs`` cars (``ev-j``)."""

    def __init__(self, config: FleetConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.array = PvArray(kwp=config.pv_kwp, inverter_kw=config.pv_kwp * 0.92)
        self.ev_config = EvConfig(charger_kw=config.charger_kw, timezone=config.timezone)

    def readings_at(self, at: datetime) -> list[Reading]:
        out: list[Reading] = []
        for i in range(1, self.config.homes + 1):
            load_kw = household_load_kw(
                f"home-{i}",
                at,
                annual_kwh=self.config.annual_kwh,
                seed=self.seed,
                timezone=self.config.timezone,
            )
            out.append(("home", f"home-{i}", {"power_kw": round(load_kw, 3)}))
            if self.config.pv_kwp > 0:
                out.append(
                    ("solar", f"pv-{i}", {"power_kw": round(pv_power_kw(at, self.array), 3)})
                )
        for j in range(1, self.config.evs + 1):
            state = ev_state(f"ev-{j}", at, seed=self.seed, config=self.ev_config)
            fields = {
                "power_kw": round(state.power_kw, 3),
                "soc_pct": round(state.soc_pct, 2),
                "plugged_in": state.plugged_in,
                "energy_kwh": round(state.energy_kwh, 3),
            }
            out.append(("ev", f"ev-{j}", fields))
        return out
