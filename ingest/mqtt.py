"""Subscribe to device telemetry over MQTT and produce it to Kafka as telemetry batches.

Topics are described by patterns such as ``sites/{site}/{kind}/{device}``: each
``{placeholder}`` is one topic level and becomes the MQTT wildcard ``+`` in the
subscription (``sites/+/+/+``). Literal levels must match exactly.

Payloads (``payload_format``):

* ``json``: one object or an array of objects, each one reading. ``ts`` (or
  ``time``) is an ISO 8601 instant with a UTC offset, or a Unix epoch number
  (seconds, or milliseconds when above 2e10: pydantic's rule); without either,
  the receive time is used. The keys ``site``, ``device`` and ``kind`` override
  the topic's. Every other key is a reading field: vendor names are renamed and
  scaled by the field map (see ``FIELD_MAP``), our own names pass unchanged.
* ``line-protocol``: InfluxDB line protocol, one reading per line. The
  measurement is the kind; the tags ``site`` and ``device`` override the
  topic's, other tags are ignored (Telegraf adds ``host``); fields go through
  the field map; the timestamp is in ``line_protocol_precision`` (nanoseconds
  by default), or the receive time when absent. Parsed by the
  ``line-protocol-parser`` package (a C parser aligned with InfluxDB's own
  v1 parser), imported only when this format is configured.

Each reading is validated as a ``pipeline.schemas`` reading. Valid readings
are grouped per site into ``TelemetryBatch`` messages (at most
``batch_max_readings`` each, at most ``batch_max_wait_s`` after the oldest
pending message) keyed by site. Whatever does not decode or validate (a whole
payload, or one element of an array or one line) becomes a ``DeadLetter``
(component ``ingest.mqtt``, source topic = the MQTT topic, raw = the payload
bytes, the reason naming the field and value); the rest of the payload and
the connector go on.

Example output message (key ``turin-home``) for a payload ``{"P": 1500,
"SoC": 48.5}`` on ``sites/turin-home/battery/bat-1`` with the default field
map::

    {"schema_version": 1, "batch_id": "bat-3f1c...", "site": "turin-home",
     "source": "mqtt:wattstream-ingest",
     "readings": [{"device": "bat-1", "ts": "2025-04-07T10:00:00.123456Z",
                   "kind": "battery", "power_kw": 1.5, "soc_pct": 48.5}]}

Delivery guarantee: at least once, from the publisher to Kafka.

* QoS 1 from the broker to us, in a persistent session (``clean_start`` False
  from the very first connect, a session expiry of ``session_expiry_s``): the
  broker keeps what arrives while we are away and resends what we have not
  acknowledged.
* Acknowledgements are manual (paho's ``manual_ack``): a message's PUBACK is
  sent only after every batch and dead letter made from it has been acked by
  Kafka (producer ``acks=all``). A crash, a Kafka outage or a lost
  connection before that leaves the message unacknowledged, and the broker
  redelivers it. PUBACKs go out in the order the messages arrived, as MQTT
  requires. An ack is never sent on a connection other than the one the
  message came on (the packet id may mean another message there); the broker
  redelivers instead.
* Duplicates are therefore possible (a redelivery after a crash between the
  produce and the ack); a batch's id is derived from its readings, so the same
  readings give the same ``batch_id`` and downstream writes are idempotent.
* The broker stops sending once it has its in-flight limit of unacknowledged
  messages out (Mosquitto ``max_inflight_messages``, 20 by default), so a
  flush is forced at ``max_unacked_messages``: keep it at or below the
  broker's limit. That window is also the backpressure while Kafka is down:
  nothing piles up in memory, it waits in the broker.
* With ``qos = 0`` (not the default) nothing of this holds: at most once.

Reconnects: paho's network thread reconnects with exponential backoff from
``reconnect_min_s`` doubling up to ``reconnect_max_s`` (paho has no jitter),
and we re-subscribe on every connect. A refused login or client id fails
``run()`` instead (retrying cannot help).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, ClassVar, Literal, Self
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as paho
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from ingest.batching import site_batches
from ingest.config import TomlConfig
from pipeline import codec, kafka, topics
from pipeline.schemas import (
    READING_ADAPTER,
    READING_MODELS,
    Identifier,
    Reading,
    dead_letter,
)
from pipeline.settings import Settings

log = logging.getLogger(__name__)

COMPONENT = "ingest.mqtt"

# Vendor field name -> our field, with the factor (and offset) that converts its unit
# to ours: value_ours = value_vendor * scale + offset. Applies to JSON keys and
# line-protocol fields alike; names not listed pass unchanged, so a device that
# already speaks our names (power_kw, soc_pct, ...) needs no mapping. A config's
# ``field_map`` is merged over this one (its entries win).
FIELD_MAP: dict[str, dict[str, Any]] = {
    # P (W) -> power_kw (kW): most inverters and meters report watts.
    "P": {"field": "power_kw", "scale": 0.001},
    # SoC (%) -> soc_pct (%): same unit, vendor name.
    "SoC": {"field": "soc_pct"},
    # U (V) -> voltage_v (V).
    "U": {"field": "voltage_v"},
    # f (Hz) -> frequency_hz (Hz).
    "f": {"field": "frequency_hz"},
    # E_in / E_out (Wh) -> import_energy_kwh / export_energy_kwh (kWh): meter registers.
    "E_in": {"field": "import_energy_kwh", "scale": 0.001},
    "E_out": {"field": "export_energy_kwh", "scale": 0.001},
    # T (K) -> temperature_c (degC): some BMSs report kelvin.
    "T_K": {"field": "temperature_c", "offset": -273.15},
}

# Envelope keys that are not reading fields: they say where a reading belongs.
_ROUTING_KEYS = ("site", "device", "kind")
_TIME_KEYS = ("ts", "time")
_PLACEHOLDERS = ("site", "kind", "device")
# Every field some reading kind has (besides the envelope): valid mapping targets.
_READING_FIELDS = sorted(
    {name for model in READING_MODELS.values() for name in model.model_fields}
    - {"kind", "device", "ts"}
)
_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)
# Longest excerpt of foreign input quoted in a reason or a log line.
_EXCERPT_CHARS = 120
# CONNACK reason codes that no retry can fix: unsupported protocol version, client
# id not valid, bad user name or password, not authorized, bad authentication method.
_PERMANENT_CONNACK_CODES = frozenset({132, 133, 134, 135, 140})
_NS_PER_UNIT = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _line_protocol_parser() -> Any:
    """The ``line_protocol_parser`` module, or a RuntimeError with the install hint."""
    try:
        return importlib.import_module("line_protocol_parser")
    except ImportError as error:
        raise RuntimeError(
            "payload_format = 'line-protocol' needs the line-protocol-parser package: "
            "pip install 'line-protocol-parser>=2.0.1'"
        ) from error


# --- configuration ------------------------------------------------------------------


class FieldMapping(BaseModel):
    """How one vendor field becomes one of ours: ``ours = vendor * scale + offset``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    field: str
    scale: float = 1.0
    offset: float = 0.0

    @model_validator(mode="after")
    def _known_field(self) -> FieldMapping:
        if self.field not in _READING_FIELDS:
            raise ValueError(
                f"field {self.field!r} is not a reading field; known: {_READING_FIELDS}"
            )
        if self.scale == 0:
            raise ValueError("scale must not be 0 (it would erase every value)")
        return self

    def apply(self, value: Any) -> Any:
        """The converted value; non-numbers pass unchanged when no conversion is asked."""
        if self.scale == 1.0 and self.offset == 0.0:
            return value
        # bool is an int in Python: scaling True would silently give 0.001.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"needs a number to scale, got {str(value)[:_EXCERPT_CHARS]!r}")
        return value * self.scale + self.offset


@dataclass(frozen=True)
class TopicPattern:
    """A topic pattern split into levels; ``{site}`` etc. match any one level."""

    text: str
    levels: tuple[str, ...]

    @classmethod
    def compile(cls, text: str) -> TopicPattern:
        levels = tuple(text.split("/"))
        seen: set[str] = set()
        for level in levels:
            if level.startswith("{") and level.endswith("}"):
                name = level[1:-1]
                if name not in _PLACEHOLDERS:
                    raise ValueError(
                        f"topic pattern {text!r}: unknown placeholder {level!r}; "
                        f"use {{site}}, {{kind}} or {{device}}"
                    )
                if name in seen:
                    raise ValueError(f"topic pattern {text!r}: {level!r} appears twice")
                seen.add(name)
            elif any(c in level for c in "+#{}") or "\x00" in level:
                raise ValueError(
                    f"topic pattern {text!r}: level {level!r} must be a literal or one "
                    "whole {placeholder} (wildcards are derived from the placeholders)"
                )
        return cls(text, levels)

    @property
    def subscription(self) -> str:
        return "/".join("+" if level.startswith("{") else level for level in self.levels)

    def match(self, topic: str) -> dict[str, str] | None:
        """The placeholder values of ``topic``, or None when it does not match."""
        parts = topic.split("/")
        if len(parts) != len(self.levels):
            return None
        values: dict[str, str] = {}
        for level, part in zip(self.levels, parts, strict=True):
            if level.startswith("{"):
                values[level[1:-1]] = part
            elif level != part:
                return None
        return values


class MqttConfig(TomlConfig):
    """Settings of one MQTT connector; validated at construction, no network calls.

    >>> MqttConfig(url="mqtt://127.0.0.1:1883", client_id="wattstream-ingest")
    """

    toml_table: ClassVar[str | None] = "mqtt"

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    url: str = "mqtt://localhost:1883"
    """Broker address, ``mqtt://host:port`` (TLS is not supported yet)."""
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    """Required for a persistent session: the broker keeps the session under this id."""
    persistent_session: bool = True
    """Keep the session (subscriptions, queued QoS 1 messages) while disconnected."""
    session_expiry_s: int = Field(default=86_400, ge=1)
    """MQTT 5: how long the broker keeps our session while we are away (a day covers
    a weekend-free maintenance window; messages older than that are gone). [s]"""
    username: str | None = None
    password: SecretStr | None = None
    mqtt_version: Literal["5", "3.1.1"] = "5"
    topics: tuple[str, ...] = ("sites/{site}/{kind}/{device}",)
    """Topic patterns; the first that matches a message's topic wins."""
    payload_format: Literal["json", "line-protocol"] = "json"
    line_protocol_precision: Literal["ns", "us", "ms", "s"] = "ns"
    field_map: dict[str, FieldMapping] = Field(default_factory=dict)
    """Merged over ``FIELD_MAP``: vendor name -> {field, scale, offset}."""
    qos: Literal[0, 1] = 1
    """1: at least once. 0 loses messages on any disconnect: only for tests of load."""
    keepalive_s: int = Field(default=30, ge=5)
    """A dead connection is noticed after about 1.5 x this. [s]"""
    batch_max_readings: int = Field(default=500, ge=1, le=100_000)
    """Readings per telemetry batch and per flush. [readings]"""
    batch_max_wait_s: float = Field(default=1.0, gt=0, le=60)
    """Longest a reading waits in memory before it is produced. [s]"""
    max_unacked_messages: int = Field(default=20, ge=1, le=65_535)
    """Flush when this many MQTT messages await their ack; at most the broker's
    in-flight limit (Mosquitto max_inflight_messages, default 20), or the broker
    stops sending until batch_max_wait_s runs out. [messages]"""
    reconnect_min_s: int = Field(default=1, ge=1)
    """First reconnect delay (paho takes whole seconds). [s]"""
    reconnect_max_s: int = Field(default=30, ge=1)
    """Reconnect backoff ceiling. [s]"""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """How long ``start()`` waits for the first connection before going on retrying
    in the background. [s]"""
    produce_retry_max_s: float = Field(default=30.0, gt=0)
    """Backoff ceiling between attempts to produce a flush while Kafka fails. [s]"""

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.persistent_session and not self.client_id:
            raise ValueError(
                "persistent_session requires client_id (the broker keeps the session under it)"
            )
        if self.password is not None and self.username is None:
            raise ValueError("password requires username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        self.address()  # raises with the reason
        patterns = [TopicPattern.compile(text) for text in self.topics]
        if not patterns:
            raise ValueError("topics must name at least one pattern")
        if self.payload_format == "line-protocol":
            _line_protocol_parser()
        return self

    def address(self) -> tuple[str, int]:
        """(host, port) of ``url``."""
        parts = urlsplit(self.url)
        if parts.scheme != "mqtt":
            raise ValueError(f"url {self.url!r}: scheme must be mqtt:// (TLS is not supported yet)")
        if parts.username or parts.password:
            # Credentials in a URL end up in logs; the password field is masked.
            raise ValueError("url must not hold credentials: use username and password")
        if not parts.hostname:
            raise ValueError(f"url {self.url!r} has no host")
        try:
            port = parts.port or 1883
        except ValueError:
            raise ValueError(f"url {self.url!r} has an invalid port") from None
        return parts.hostname, port

    def patterns(self) -> tuple[TopicPattern, ...]:
        return tuple(TopicPattern.compile(text) for text in self.topics)

    def merged_field_map(self) -> dict[str, FieldMapping]:
        defaults = {name: FieldMapping.model_validate(spec) for name, spec in FIELD_MAP.items()}
        return {**defaults, **self.field_map}

    @property
    def source(self) -> str:
        """The ``source`` of the batches this connector produces."""
        return f"mqtt:{self.client_id or 'anonymous'}"


# --- payloads -> readings (pure: no network) -----------------------------------------


@dataclass(frozen=True)
class Rejection:
    """Why (part of) a payload was rejected."""

    reason: str
    error_type: str


@dataclass
class ParseResult:
    readings: list[tuple[str, Reading]] = field(default_factory=list)
    """(site, reading) in payload order."""
    rejections: list[Rejection] = field(default_factory=list)


class PayloadParser:
    """Turns an MQTT topic and payload into readings and rejections. Never raises for input."""

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self.patterns = config.patterns()
        self.field_map = config.merged_field_map()
        # Any: the parser package ships no type information.
        self._lp: Any = (
            _line_protocol_parser() if config.payload_format == "line-protocol" else None
        )

    def parse(self, topic: str, payload: bytes, received_at: datetime) -> ParseResult:
        result = ParseResult()
        route = next((m for p in self.patterns if (m := p.match(topic)) is not None), None)
        if route is None:
            result.rejections.append(
                Rejection(f"topic {topic!r} matches none of {list(self.config.topics)}", "BadTopic")
            )
            return result
        if self.config.payload_format == "json":
            items = self._json_items(payload, result)
        else:
            items = self._line_items(payload, result)
        for label, routing, fields, ts in items:
            # Only an absent (or null) time is the receive time: "" or 0 is the payload's own.
            self._add(
                result, label, {**route, **routing}, fields, received_at if ts is None else ts
            )
        return result

    # Each item: (label for reasons, routing overrides, fields, ts or None).
    _Item = tuple[str, dict[str, str], dict[str, Any], Any]

    def _json_items(self, payload: bytes, result: ParseResult) -> Iterator[_Item]:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError as error:
            result.rejections.append(
                Rejection(f"not JSON: {error} in {payload[:_EXCERPT_CHARS]!r}", "JSONDecodeError")
            )
            return
        many = isinstance(data, list)
        objects = data if many else [data]
        if many and not objects:
            result.rejections.append(Rejection("empty JSON array: no reading", "ValidationError"))
        for index, obj in enumerate(objects):
            label = f"reading {index}: " if many else ""
            if not isinstance(obj, dict):
                result.rejections.append(
                    Rejection(
                        f"{label}expected a JSON object, got {type(obj).__name__} "
                        f"{str(obj)[:_EXCERPT_CHARS]!r}",
                        "ValidationError",
                    )
                )
                continue
            fields = dict(obj)
            routing = {}
            for key in _ROUTING_KEYS:
                if key in fields:
                    value = fields.pop(key)
                    if value is None:  # null overrides nothing (it is not the device "None")
                        continue
                    routing[key] = value if isinstance(value, str) else repr(value)
            present = [key for key in _TIME_KEYS if key in fields]
            if len(present) > 1:
                result.rejections.append(
                    Rejection(f"{label}both 'ts' and 'time' given; send one", "ValidationError")
                )
                continue
            ts = fields.pop(present[0]) if present else None
            yield label, routing, fields, ts

    def _line_items(self, payload: bytes, result: ParseResult) -> Iterator[_Item]:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as error:
            result.rejections.append(
                Rejection(f"line protocol is not UTF-8: {error}", "LineProtocolError")
            )
            return
        found = False
        lines = [line.rstrip("\r") for line in text.split("\n")]
        for number, line in enumerate(lines, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            label = f"line {number}: " if len(lines) > 1 else ""
            try:
                point = self._lp.parse_line(line)
            except self._lp.LineFormatError as error:
                result.rejections.append(
                    Rejection(f"{label}{error} in {line[:_EXCERPT_CHARS]!r}", "LineProtocolError")
                )
                continue
            tags: dict[str, str] = point["tags"]
            routing: dict[str, str] = {k: tags[k] for k in ("site", "device") if k in tags}
            routing["kind"] = point["measurement"]
            ts = None
            if point["time"] is not None:
                ns = point["time"] * _NS_PER_UNIT[self.config.line_protocol_precision]
                try:
                    ts = _EPOCH + timedelta(microseconds=ns // 1000)
                except OverflowError:  # e.g. a nanosecond clock read as seconds: year > 9999
                    result.rejections.append(
                        Rejection(
                            f"{label}timestamp {point['time']} "
                            f"({self.config.line_protocol_precision}) is out of range",
                            "LineProtocolError",
                        )
                    )
                    continue
            found = True
            yield label, routing, dict(point["fields"]), ts
        if not found and not result.rejections:
            result.rejections.append(Rejection("no line-protocol line in the payload", "Empty"))

    def _add(
        self,
        result: ParseResult,
        label: str,
        routing: dict[str, str],
        fields: dict[str, Any],
        ts: Any,
    ) -> None:
        for key in _ROUTING_KEYS:
            if not routing.get(key):
                result.rejections.append(
                    Rejection(
                        f"{label}no {key}: neither the topic pattern nor the payload names one",
                        "ValidationError",
                    )
                )
                return
        kind = routing["kind"]
        if kind not in READING_MODELS:
            result.rejections.append(
                Rejection(
                    f"{label}kind {kind!r} is not one of {sorted(READING_MODELS)}", "UnknownKind"
                )
            )
            return
        try:
            site = _IDENTIFIER.validate_python(routing["site"])
        except ValidationError as error:
            result.rejections.append(
                Rejection(f"{label}site: {codec.describe(error)}", "ValidationError")
            )
            return
        reading: dict[str, Any] = {"kind": kind, "device": routing["device"], "ts": ts}
        sources: dict[str, str] = {}
        for name, value in fields.items():
            mapping = self.field_map.get(name)
            target = mapping.field if mapping else name
            if target in sources:
                result.rejections.append(
                    Rejection(
                        f"{label}both {sources[target]!r} and {name!r} give {target}",
                        "ValidationError",
                    )
                )
                return
            sources[target] = name
            try:
                reading[target] = mapping.apply(value) if mapping else value
            except ValueError as error:
                result.rejections.append(Rejection(f"{label}{name}: {error}", "ValidationError"))
                return
        try:
            result.readings.append((site, READING_ADAPTER.validate_python(reading)))
        except ValidationError as error:
            result.rejections.append(
                Rejection(f"{label}{codec.describe(error)}", "ValidationError")
            )


# --- the connector ----------------------------------------------------------------------


class MqttConnectorError(RuntimeError):
    """The connector cannot go on (e.g. the broker refused our login)."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass
class MqttStats:
    messages_received: int = 0
    readings_produced: int = 0
    batches_produced: int = 0
    dead_lettered: int = 0
    messages_acked: int = 0
    acks_skipped: int = 0
    """Acks not sent because the connection changed: the broker redelivers those."""
    connects: int = 0
    disconnects: int = 0
    produce_failures: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class _Received:
    generation: int
    """Which connection the message came on (see ``_ack``)."""
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: datetime


@dataclass(frozen=True)
class _Pending:
    message: _Received
    parsed: ParseResult


class _Stop:
    """Queue sentinel: ``run()`` returns when it takes this."""


@dataclass(frozen=True)
class _Fatal:
    reason: str


_QueueItem = _Received | _Stop | _Fatal


class MqttConnector:
    """MQTT -> Kafka ``telemetry`` (and ``dead-letters``). See the module docstring.

    >>> async with MqttConnector(settings, MqttConfig(client_id="ingest-1")) as connector:
    ...     await connector.run()  # until cancelled or stop()
    """

    def __init__(self, settings: Settings, config: MqttConfig) -> None:
        self.settings = settings
        self.config = config
        self.parser = PayloadParser(config)
        self.stats = MqttStats()
        self._telemetry_topic = settings.topic(topics.TELEMETRY)
        self._dead_letter_topic = settings.topic(topics.DEAD_LETTERS)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._producer: AIOKafkaProducer | None = None
        self._client: paho.Client | None = None
        self._buffer: list[_Pending] = []
        self._buffered_readings = 0
        self._oldest_at: float | None = None
        # Written by paho's thread (on_connect), read by ours when acking.
        self._generation = 0
        self._connected = threading.Event()
        self._fatal: str | None = None
        self._stop_requested = asyncio.Event()
        self._running = False
        self._run_done = asyncio.Event()
        self._closed = False
        self._disconnecting = False

    # -- lifecycle --

    async def start(self) -> None:
        """Start the Kafka producer and connect to the broker (retrying in the background)."""
        if self._client is not None:
            return
        if self._closed:
            raise MqttConnectorError("connector is stopped; make a new one", retriable=False)
        self._loop = asyncio.get_running_loop()
        self._producer = kafka.producer(self.settings)
        await self._producer.start()
        try:
            self._client = self._make_client()
            host, port = self.config.address()
            self._client.connect_async(host, port, **self._connect_kwargs())
            self._client.loop_start()
            await self._wait_connected()
        except BaseException:
            await self._shutdown_clients()
            raise

    async def _wait_connected(self) -> None:
        assert self._loop is not None
        deadline = self._loop.time() + self.config.connect_timeout_s
        while not self._connected.is_set() and self._fatal is None:
            if self._loop.time() > deadline:
                log.warning(
                    "mqtt broker %s not connected after %.0f s; retrying in the background",
                    self.config.url,
                    self.config.connect_timeout_s,
                )
                return
            await asyncio.sleep(0.05)
        if self._fatal is not None:
            raise MqttConnectorError(self._fatal, retriable=False)

    async def run(self) -> None:
        """Receive, batch and produce until ``stop()`` (returns) or cancellation (raises)."""
        if self._stop_requested.is_set():
            return  # stop() came first: nothing to run
        await self.start()
        assert self._loop is not None
        self._running = True
        self._run_done.clear()
        try:
            while not self._stop_requested.is_set():
                timeout_s = None
                if self._oldest_at is not None:
                    timeout_s = max(
                        0.0, self._oldest_at + self.config.batch_max_wait_s - self._loop.time()
                    )
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout_s)
                except TimeoutError:
                    await self._flush_retrying()
                    continue
                if isinstance(item, _Stop):
                    break
                if isinstance(item, _Fatal):
                    raise MqttConnectorError(item.reason, retriable=False)
                self._accept(item)
                if (
                    self._buffered_readings >= self.config.batch_max_readings
                    or len(self._buffer) >= self.config.max_unacked_messages
                ):
                    await self._flush_retrying()
        finally:
            self._running = False
            self._run_done.set()

    async def stop(self) -> None:
        """Flush what is buffered (one attempt), disconnect and stop paho's thread.

        Safe to call twice. What could not be produced is not acked: the broker
        redelivers it to the next session under the same client id.
        """
        if self._closed:
            return
        self._closed = True
        self._stop_requested.set()
        self._queue.put_nowait(_Stop())
        if self._running:
            await self._run_done.wait()
        # Take what arrived meanwhile, so it is produced now rather than redelivered later.
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _Received):
                self._accept(item)
        if self._buffer and self._producer is not None:
            try:
                await self._flush()
            except KafkaError as error:
                log.warning(
                    "mqtt stop: %d messages not produced (%s); not acked, the broker redelivers",
                    len(self._buffer),
                    error,
                )
        await self._shutdown_clients()

    async def _shutdown_clients(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self._disconnecting = True
            # PUBACKs already queued go out before the DISCONNECT (one ordered queue).
            client.disconnect()
            await join_network_thread(client)
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- batching and producing (event-loop thread) --

    def _accept(self, message: _Received) -> None:
        assert self._loop is not None
        self.stats.messages_received += 1
        parsed = self.parser.parse(message.topic, message.payload, message.received_at)
        for rejection in parsed.rejections:
            log.warning(
                "mqtt %s: %s; payload %r (dead-lettered)",
                message.topic,
                rejection.reason,
                message.payload[:_EXCERPT_CHARS],
            )
        if not self._buffer:
            self._oldest_at = self._loop.time()
        self._buffer.append(_Pending(message, parsed))
        self._buffered_readings += len(parsed.readings)

    async def _flush_retrying(self) -> None:
        delay_s = 0.5
        while True:
            try:
                await self._flush()
                return
            except KafkaError as error:
                self.stats.produce_failures += 1
                self.stats.last_error = f"kafka: {error!r}"
                log.warning(
                    "mqtt: producing %d messages failed (%r); retrying in %.1f s, nothing acked",
                    len(self._buffer),
                    error,
                    delay_s,
                )
            # Wait, but give way at once to stop(): it makes its own last attempt.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay_s)
            if self._stop_requested.is_set():
                return
            delay_s = min(delay_s * 2, self.config.produce_retry_max_s)

    async def _flush(self) -> None:
        """Produce the buffer's batches and dead letters; ack its messages once Kafka has them."""
        if not self._buffer:
            return
        assert self._producer is not None
        pending = list(self._buffer)
        by_site: dict[str, list[Reading]] = defaultdict(list)
        for item in pending:
            for site, reading in item.parsed.readings:
                by_site[site].append(reading)
        futures = []
        batches = 0
        for batch in site_batches(self.config.source, by_site, self.config.batch_max_readings):
            futures.append(
                await self._producer.send(
                    self._telemetry_topic, codec.encode(batch), key=batch.site.encode()
                )
            )
            batches += 1
        letters = 0
        for item in pending:
            for rejection in item.parsed.rejections:
                letter = dead_letter(
                    raw=item.message.payload,
                    reason=rejection.reason,
                    error_type=rejection.error_type,
                    component=COMPONENT,
                    source_topic=item.message.topic,
                    key=item.message.topic,
                    now=item.message.received_at,
                )
                futures.append(
                    await self._producer.send(
                        self._dead_letter_topic,
                        codec.encode(letter),
                        key=item.message.topic.encode(),
                    )
                )
                letters += 1
        await asyncio.gather(*futures)
        # Kafka has everything: now, and only now, the broker may forget the messages.
        del self._buffer[: len(pending)]
        self._buffered_readings -= sum(len(item.parsed.readings) for item in pending)
        self._oldest_at = self._loop.time() if self._buffer and self._loop else None
        self.stats.batches_produced += batches
        self.stats.readings_produced += sum(len(r) for r in by_site.values())
        self.stats.dead_lettered += letters
        for item in pending:
            self._ack(item.message)
        log.debug(
            "mqtt flush messages=%d readings=%d batches=%d dead_letters=%d",
            len(pending),
            sum(len(r) for r in by_site.values()),
            batches,
            letters,
        )

    def _ack(self, message: _Received) -> None:
        if message.qos == 0:
            return
        client = self._client
        # A packet id is only meaningful on the connection it arrived on: on a new one
        # it may name another, unproduced message. The broker redelivers this one.
        if client is None or message.generation != self._generation:
            self.stats.acks_skipped += 1
            return
        client.ack(message.mid, message.qos)
        self.stats.messages_acked += 1

    # -- paho (network thread) --

    def _make_client(self) -> paho.Client:
        protocol = paho.MQTTv5 if self.config.mqtt_version == "5" else paho.MQTTv311
        kwargs: dict[str, Any] = {}
        if protocol == paho.MQTTv311:
            kwargs["clean_session"] = not self.config.persistent_session
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id or "",
            protocol=protocol,
            manual_ack=True,
            reconnect_on_failure=True,
            **kwargs,
        )
        if self.config.username is not None:
            password = self.config.password.get_secret_value() if self.config.password else None
            client.username_pw_set(self.config.username, password)
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"keepalive": self.config.keepalive_s}
        if self.config.mqtt_version == "5":
            # paho's default cleans the first connect's session, which throws away what
            # the broker kept for us since our last run: keep it from the very first.
            kwargs["clean_start"] = not self.config.persistent_session
            if self.config.persistent_session:
                properties = Properties(PacketTypes.CONNECT)
                # MQTT 5 ends a session when the connection closes unless this is > 0.
                properties.SessionExpiryInterval = self.config.session_expiry_s
                kwargs["properties"] = properties
        return kwargs

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            reason = f"broker {self.config.url} refused the connection: {reason_code}"
            if reason_code.value in _PERMANENT_CONNACK_CODES:
                self._fatal = reason
                self._post(_Fatal(reason))
                client.disconnect()
            log.error("mqtt: %s", reason)
            return
        self._generation += 1
        self.stats.connects += 1
        if self.config.persistent_session and not flags.session_present and self.stats.connects > 1:
            log.warning(
                "mqtt: broker %s had no session for %r: what was published while we were "
                "away is lost (broker restarted without persistence, or session expired)",
                self.config.url,
                self.config.client_id,
            )
        subscriptions: list[tuple[str, Any]] = []
        for pattern in self.parser.patterns:
            if self.config.mqtt_version == "5":
                # Retained messages only on a new subscription, not on every reconnect.
                options = SubscribeOptions(
                    qos=self.config.qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
                )
                subscriptions.append((pattern.subscription, options))
            else:
                subscriptions.append((pattern.subscription, self.config.qos))
        client.subscribe(subscriptions)
        log.info(
            "mqtt connected to %s (session present: %s), subscribing to %s",
            self.config.url,
            flags.session_present,
            [s for s, _ in subscriptions],
        )
        self._connected.set()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._connected.is_set():
            self.stats.disconnects += 1
            level = logging.INFO if self._disconnecting else logging.WARNING
            log.log(level, "mqtt disconnected from %s: %s", self.config.url, reason_code)
        self._connected.clear()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        for pattern, code in zip(self.parser.patterns, reason_codes, strict=False):
            if code.is_failure:
                self.stats.last_error = f"subscribe {pattern.subscription!r}: {code}"
                log.error("mqtt: subscription to %r refused: %s", pattern.subscription, code)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._post(
            _Received(
                generation=self._generation,
                mid=message.mid,
                qos=message.qos,
                topic=message.topic,
                payload=bytes(message.payload),
                received_at=datetime.now(UTC),
            )
        )

    def _post(self, item: _QueueItem) -> None:
        """Hand an item from paho's thread to the event loop (asyncio is not thread-safe)."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed: the message stays unacked
            loop.call_soon_threadsafe(self._queue.put_nowait, item)


async def join_network_thread(client: paho.Client) -> None:
    """Stop paho's network thread and wait for it, without blocking the event loop.

    ``loop_stop()`` joins the thread, so it runs in a daemon helper thread (not the
    default executor, whose threads outlive the call). paho sleeps in 1 s slices
    while waiting to reconnect: 10 s bounds a hang without failing a slow machine.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not done.done():
            done.set_result(None)

    def join() -> None:
        client.loop_stop()
        with contextlib.suppress(RuntimeError):  # the loop may be closed by now
            loop.call_soon_threadsafe(resolve)

    threading.Thread(target=join, name="mqtt-loop-stop", daemon=True).start()
    try:
        await asyncio.wait_for(done, 10.0)
    except TimeoutError:
        log.warning("paho network thread did not stop within 10 s")


__all__ = [
    "FIELD_MAP",
    "FieldMapping",
    "MqttConfig",
    "MqttConnector",
    "MqttConnectorError",
    "MqttStats",
    "ParseResult",
    "PayloadParser",
    "Rejection",
    "TopicPattern",
]
