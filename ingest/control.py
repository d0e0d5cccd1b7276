"""The control path: ``Command`` messages become Modbus setpoint writes or MQTT publishes.

Decisions become commands on the ``commands`` topic; this connector consumes them
(its own consumer group) and, for each one:

1. **validates** it: an unknown ``site``/``device`` or an action the device does not
   allow is *rejected* (an unknown device is *ignored* instead with ``unknown_devices =
   "ignore"``: see below); a command past its ``valid_until`` (or, without one, issued
   more than ``max_command_age_s`` ago, so a new consumer group does not replay a
   month of history into the devices) is *skipped*;
2. **clamps** the setpoint to the device's ``min_setpoint_kw`` .. ``max_setpoint_kw``
   and records the clamp. ``shed`` and ``scram`` use the device's
   ``fixed_setpoints_kw`` (0 kW by default) whatever the command says: they are the
   device's safe states;
3. **rate-limits** it: at most one command per device per ``min_interval_s``. A newer
   command that arrives within the interval *replaces* the pending one (a setpoint is
   state: only the latest matters), which is audited as *rate-limited*. ``scram`` and
   ``shed`` (``SAFETY_ACTIONS``) are applied at once whatever the interval, and no
   ordinary command replaces one that is pending;
4. **applies** it, or only logs what it would send (**dry-run**). Dry-run is the
   default: a command is sent only when ``enabled = true`` *and* the command itself is
   not marked ``dry_run`` (two keys, like a two-man rule; ``respect_command_dry_run =
   false`` drops the second). Modbus: the setpoint is converted to the SunSpec point's
   unit (W, or percent of ``rated_kw``), encoded with the scale factor read from the
   device, written, then the ``enable`` points (e.g. ``WSetEna = 1``). MQTT: a JSON
   payload published with QoS 1, waiting for the broker's PUBACK;
5. **audits** it: exactly one audit record per command, once its outcome is known.

Sharing the commands topic: other consumers (the OCPP CSMS's ``[ocpp.control]``,
:mod:`ingest.ocpp_control`, or another control connector with other devices) may read
the same topic in their own groups and audit their own devices' commands. Run this
connector with ``unknown_devices = "ignore"`` then: a command whose (``site``,
``device``) is not in its config gets no audit record from here (its offset is
settled at once, it is counted in ``ControlStats.ignored`` and logged at DEBUG), so
each command still has exactly one audit, its owner's. The default, ``"reject"``,
audits it *rejected*: right when this connector is the only consumer, where an
unknown device is a mistake somebody should see.

A device that does not answer is retried with capped exponential backoff
(:class:`pipeline.backoff.Backoff`) up to ``max_attempts`` attempts, then audited as
*failed*; an answer that no retry can change (illegal address, a value that does not
fit the register) fails at once. Each device has its own worker task, so a dead
device delays nobody else, and the stream goes on.

Why the audit is a ``Command`` on its own topic
-----------------------------------------------

Messages live in :mod:`pipeline.schemas`, and there is no audit message there. The
audit record is therefore a copy of the command (same ``command_id``, ``site``,
``device``, ``action``, ``issued_at``, ``source_id``) where

* ``setpoint_kw`` is what was (or would have been) sent, after clamping;
* ``dry_run`` is ``False`` only when the connector acted on the device for real
  (``sent``, or ``failed`` while trying); ``True`` when nothing reached a device;
* ``reason`` starts with the outcome, then the details, then ``|`` and the original
  reason: ``sent: clamped from 12 to 5 kW; wrote 704.WSet = 5000 W ... | arbitrage``.
  Outcomes: ``sent``, ``dry-run``, ``rate-limited``, ``rejected``, ``skipped``,
  ``failed`` (:func:`audit_outcome` reads it back).

Any consumer of commands (the InfluxDB sink, Grafana) reads audits with no new code.
They go to ``audit_topic`` (default ``wattstream.commands-audit``, with the
deployment's prefix), not to ``commands`` itself: this connector consumes
``commands``, and would otherwise read its own audits back as new commands. The
topic is declared here (:func:`audit_topic_spec`) because topics.py belongs to
another part; it should move to the registry there.

Example audit record (key ``turin-home``)::

    {"schema_version": 1, "command_id": "cmd-1f0c...", "site": "turin-home",
     "device": "bat-1", "action": "set_power", "setpoint_kw": 5.0,
     "reason": "sent: clamped from 12 to 5 kW; wrote 704.WSet = 5000 W (raw [0, 500],
                WSet_SF 1) at 40072 on 10.0.0.7:502 unit 1 | arbitrage: price 0.31",
     "issued_at": "2026-11-23T11:00:00Z", "valid_until": "2026-11-23T12:00:00Z",
     "dry_run": false, "source_id": "dec-5c2e..."}

Delivery guarantee: at least once, per command. A command's offset is committed
only after its audit record has been acked by Kafka (commit positions never pass a
command whose outcome is unknown, e.g. one waiting out its rate limit). A crash
before that replays it: the write is repeated (a setpoint write is idempotent) and
the audit record is duplicated with the same ``command_id``. The rate limit lives
in memory: a restart may write once more within ``min_interval_s``. Run one
connector per deployment, or several in the group: Kafka splits them by site.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from importlib import resources
from types import TracebackType
from typing import Annotated, Any, ClassVar, Generic, Literal, Protocol, Self, TypeVar
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as paho
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from ingest import sunspec
from ingest.config import TomlConfig, check_unique_devices
from ingest.mqtt import join_network_thread
from ingest.running import gather_until_stopped
from pipeline import codec, kafka, topics
from pipeline.backoff import Backoff
from pipeline.schemas import Command, Identifier, dead_letter
from pipeline.settings import Settings

log = logging.getLogger(__name__)

COMPONENT = "ingest.control"

ActionName = Literal["set_power", "shed", "restore", "scram", "start_job", "stop_job"]
ACTIONS: tuple[str, ...] = ("set_power", "shed", "restore", "scram", "start_job", "stop_job")
SAFETY_ACTIONS: frozenset[str] = frozenset({"scram", "shed"})
"""Actions that put a device in its safe state: applied at once, whatever the rate limit,
and never superseded by an ordinary command while pending."""

AUDIT_TOPIC = "wattstream.commands-audit"

# SunSpec point units -> how a setpoint [kW] becomes the point's physical value.
# W, VA, var (and their spellings in the model files) [W]: setpoint_kw * 1000.
_WATT_UNITS = frozenset({"W", "VA", "var", "Var", "VAr"})
# Percent points ("%", "% WMax", "Pct", "%WHRtg", "% WChaMax" ...) [%]: setpoint_kw /
# rated_kw * 100, where rated_kw is what 100 % means for that point (WMax for
# WMaxLimPct, WChaMax for InWRte ...): the device's configuration, given in ours.

# Modbus exception codes that say the request can never succeed as asked: illegal
# function, illegal data address, illegal data value.
_PERMANENT_EXCEPTIONS = frozenset({1, 2, 3})
# A Modbus read returns at most 125 registers (the PDU is 253 bytes).
_MAX_READ_REGISTERS = 125
# PUBACK ids seen before their publish() call returned (QoS 0 ids never get a waiter):
# bounded so a long run of QoS 0 publishes cannot grow it.
_MAX_EARLY_ACKS = 1000

_DTYPES: dict[str, tuple[str, int]] = {
    # dtype: (struct format, big-endian; registers)
    "int16": (">h", 1),
    "uint16": (">H", 1),
    "int32": (">i", 2),
    "uint32": (">I", 2),
    "float32": (">f", 2),
}
PAYLOAD_FIELDS = (
    "command_id",
    "site",
    "device",
    "action",
    "setpoint_kw",
    "issued_at",
    "valid_until",
    "source_id",
)
"""Keys of an MQTT command payload (renamed by ``payload_keys``)."""


def audit_topic_spec(name: str = AUDIT_TOPIC) -> topics.TopicSpec:
    """The audit topic: ``Command`` records keyed by site, kept 400 days (a year of
    history for whoever asks what was sent to a device, and when)."""
    return topics.TopicSpec(
        name,
        Command,
        key="site",
        retention_ms=400 * topics.DAY_MS,
        description="What the control path did with each command: sent, dry-run, "
        "rate-limited, rejected, skipped or failed (see ingest/control.py).",
    )


# --- SunSpec points -------------------------------------------------------------------


@cache
def _point_access(model_id: int) -> dict[str, str]:
    """``{point: "R" | "RW"}`` of a model's fixed points, from pysunspec2's JSON file."""
    text = (
        resources.files("sunspec2")
        .joinpath("models", "json", f"model_{model_id}.json")
        .read_text(encoding="utf-8")
    )
    points = json.loads(text)["group"].get("points", [])
    return {p["name"]: p.get("access", "R") for p in points}


def _writable_point(model_id: int, name: str, key: str) -> sunspec.Point:
    """The definition of a writable point; ValueError naming ``key`` otherwise."""
    try:
        definition = sunspec.load_model(model_id)
    except KeyError:
        raise ValueError(f"model: no SunSpec definition of model {model_id}") from None
    try:
        point = definition.point(name)
    except KeyError:
        writable = sorted(n for n, a in _point_access(model_id).items() if a == "RW")
        raise ValueError(
            f"{key}: model {model_id} has no point {name!r}; its writable points: {writable}"
        ) from None
    if _point_access(model_id).get(name) != "RW":
        raise ValueError(f"{key}: point {name!r} of model {model_id} is read-only")
    return point


def _is_percent(units: str | None) -> bool:
    return units is not None and (units.startswith("%") or units == "Pct")


# --- configuration ------------------------------------------------------------------


def _safe_states() -> dict[ActionName, float]:
    # Shedding and scramming mean "stop exchanging power": 0 kW, clamped to the limits.
    return {"shed": 0.0, "scram": 0.0}


class _DeviceBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    site: Identifier
    device: Identifier
    """Our device id: the command's ``device``."""
    min_setpoint_kw: float
    """Lowest setpoint ever sent; lower ones are clamped (negative: charging). [kW]"""
    max_setpoint_kw: float
    """Highest setpoint ever sent; higher ones are clamped. [kW]"""
    min_interval_s: float = Field(default=10.0, ge=0, le=86_400)
    """At most one command per this interval; a newer one replaces the pending one.
    10 s: faster than any price interval, slow enough for an inverter to ramp. [s]"""
    allowed_actions: tuple[ActionName, ...] = ("set_power", "shed", "scram")
    """Other actions are rejected (and audited so)."""
    fixed_setpoints_kw: dict[ActionName, float] = Field(default_factory=_safe_states)
    """Actions whose setpoint is the device's own, whatever the command says. [kW]"""

    @model_validator(mode="after")
    def _limits(self) -> Self:
        if self.min_setpoint_kw > self.max_setpoint_kw:
            raise ValueError(
                f"min_setpoint_kw ({self.min_setpoint_kw}) must not exceed "
                f"max_setpoint_kw ({self.max_setpoint_kw})"
            )
        if not self.allowed_actions:
            raise ValueError("allowed_actions must name at least one action")
        return self


class ModbusControl(_DeviceBase):
    """A device written over Modbus TCP: a SunSpec point, or a raw register."""

    transport: Literal["modbus"]
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65_535)
    unit_id: int = Field(default=1, ge=0, le=255)
    """Modbus unit id (pymodbus ``device_id=``)."""
    base_address: int | None = Field(default=None, ge=0, le=65_534)
    """Where ``SunS`` is; None tries 40000, 0 and 50000 in that order."""
    model: int | None = None
    """SunSpec model holding ``point``: 704 (``WSet``, ``WMaxLimPct``), 123
    (``WMaxLimPct``), 124 (``WChaMax``, ``InWRte``, ``OutWRte``) ..."""
    point: str | None = None
    """The writable point that takes the setpoint; its units say the conversion."""
    rated_kw: float | None = Field(default=None, gt=0)
    """What 100 % means for a percent point (WMax for WMaxLimPct). [kW]"""
    enable: dict[str, int] = Field(default_factory=dict)
    """Points of ``model`` written (raw) after each setpoint, e.g. ``{WSetEna = 1}``."""
    # TOML key `register`; the attribute has another name because `register` is a
    # method of every pydantic model (from ABC).
    register_address: int | None = Field(default=None, ge=0, le=65_535, alias="register")
    """A non-SunSpec device: the holding register that takes the setpoint."""
    dtype: Literal["int16", "uint16", "int32", "uint32", "float32"] = "int16"
    """``register``'s type; 32-bit values are big-endian, high word first."""
    scale: float = Field(default=1000.0, gt=0)
    """``register`` units per kW: 1000 when it holds W, 10 when it holds 0.1 kW."""

    @model_validator(mode="after")
    def _target(self) -> Self:
        sunspec_mode = self.model is not None or self.point is not None
        if sunspec_mode == (self.register_address is not None):
            raise ValueError("give either model and point (SunSpec) or register, not both")
        if self.register_address is not None:
            if self.enable:
                raise ValueError("enable: only with a SunSpec model and point")
            if self.dtype.startswith("uint") and self.min_setpoint_kw < 0:
                raise ValueError(
                    f"min_setpoint_kw ({self.min_setpoint_kw}) must be >= 0: dtype {self.dtype} "
                    "is unsigned"
                )
            return self
        if self.model is None or self.point is None:
            raise ValueError("model and point go together: give both")
        point = _writable_point(self.model, self.point, "point")
        if point.type.startswith("uint") and self.min_setpoint_kw < 0:
            raise ValueError(
                f"min_setpoint_kw ({self.min_setpoint_kw}) must be >= 0: point {self.point!r} "
                f"is unsigned ({point.type})"
            )
        if _is_percent(point.units):
            if self.rated_kw is None:
                raise ValueError(
                    f"rated_kw is required: point {self.point!r} is in {point.units!r}, "
                    "and rated_kw says what 100 % is"
                )
            if self.max_setpoint_kw > self.rated_kw:
                raise ValueError(
                    f"max_setpoint_kw ({self.max_setpoint_kw}) exceeds rated_kw "
                    f"({self.rated_kw}): point {self.point!r} would be asked for over 100 %"
                )
        elif point.units not in _WATT_UNITS:
            raise ValueError(
                f"point: {self.point!r} is in {point.units!r}; a power setpoint needs a "
                "point in W or percent"
            )
        for name in self.enable:
            _writable_point(self.model, name, "enable")
        return self

    def physical_value(self, setpoint_kw: float) -> float:
        """The point's physical value for a setpoint: W, or percent of rated_kw."""
        assert self.model is not None and self.point is not None
        point = sunspec.load_model(self.model).point(self.point)
        if _is_percent(point.units):
            assert self.rated_kw is not None
            return setpoint_kw / self.rated_kw * 100.0
        return setpoint_kw * 1000.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port} unit {self.unit_id}"


class MqttControl(_DeviceBase):
    """A device commanded by MQTT: a JSON payload on a topic."""

    transport: Literal["mqtt"]
    url: str
    """Broker address, ``mqtt://host:port`` (TLS is not supported yet)."""
    topic: str = "sites/{site}/{device}/command"
    """Placeholders: ``{site}``, ``{device}``, ``{action}``."""
    qos: Literal[0, 1] = 1
    """1: the broker acknowledges (PUBACK) before the command counts as sent."""
    retain: bool = False
    payload_keys: dict[str, str] = Field(default_factory=dict)
    """Renames payload keys, e.g. ``{setpoint_kw = "p_set_kw"}``."""
    payload_static: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Fixed keys added to every payload, e.g. ``{vendor_cmd = "limit"}``."""

    @model_validator(mode="after")
    def _mqtt(self) -> Self:
        mqtt_address(self.url)
        if "+" in self.topic or "#" in self.topic:
            raise ValueError(f"topic {self.topic!r}: a publish topic has no wildcards")
        try:
            self.topic.format(site="s", device="d", action="a")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"topic {self.topic!r}: placeholders are {{site}}, {{device}}, {{action}} "
                f"({error!r})"
            ) from None
        unknown = sorted(set(self.payload_keys) - set(PAYLOAD_FIELDS))
        if unknown:
            raise ValueError(f"payload_keys: unknown keys {unknown}; known: {PAYLOAD_FIELDS}")
        return self

    def topic_for(self, command: Command) -> str:
        return self.topic.format(site=command.site, device=command.device, action=command.action)


def mqtt_address(url: str) -> tuple[str, int]:
    """(host, port) of ``mqtt://host[:port]``; ValueError naming ``url`` otherwise."""
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


ControlDevice = Annotated[ModbusControl | MqttControl, Field(discriminator="transport")]


class ControlConfig(TomlConfig):
    """Settings of the control connector; validated at construction, no network calls.

    >>> ControlConfig(devices=[{"transport": "modbus", "host": "10.0.0.7", "site": "s1",
    ...     "device": "bat-1", "model": 704, "point": "WSet",
    ...     "min_setpoint_kw": -5, "max_setpoint_kw": 5}])
    """

    toml_table: ClassVar[str | None] = "control"

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    enabled: bool = False
    """The master switch. False: log and audit what would be sent, send nothing."""
    name: str = Field(default="wattstream-control", min_length=1, max_length=100)
    """Names the connector in logs and in its MQTT client ids."""
    devices: tuple[ControlDevice, ...] = Field(min_length=1)
    group_id: str | None = Field(default=None, min_length=1)
    """Consumer group; None: ``<app_id>.control``."""
    audit_topic: str = Field(default=AUDIT_TOPIC, pattern=r"^[A-Za-z0-9._\-]+$")
    """Where audit records go (the deployment's topic_prefix is added)."""
    respect_command_dry_run: bool = True
    """A command marked ``dry_run`` is never sent, even when enabled."""
    max_command_age_s: float = Field(default=300.0, gt=0)
    """A command without ``valid_until`` issued longer ago is skipped: 5 min covers a
    restart, and keeps a new consumer group from replaying history into devices. [s]"""
    request_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """One Modbus request or MQTT PUBACK wait. [s]"""
    max_attempts: int = Field(default=3, ge=1, le=100)
    """Attempts per command while a device does not answer, then it is failed."""
    retry_initial_s: float = Field(default=0.5, gt=0)
    """First delay between attempts; doubles (with jitter) up to retry_max_s. [s]"""
    retry_max_s: float = Field(default=10.0, gt=0)
    produce_retry_max_s: float = Field(default=30.0, gt=0)
    """Backoff ceiling while Kafka does not take an audit record. [s]"""
    unknown_devices: Literal["reject", "ignore"] = "reject"
    """A command for a (site, device) that is not in ``devices``: ``"reject"`` audits it
    *rejected* (this connector is the only consumer of the commands topic);
    ``"ignore"`` writes no audit record for it, settles its offset and counts it in
    ``ControlStats.ignored``, for when another consumer (the OCPP CSMS's
    ``[ocpp.control]``, another control connector) owns and audits those devices'
    commands: one audit per command. With ``"ignore"``, a command for a device that
    nobody owns is audited by nobody."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be >= retry_initial_s")
        check_unique_devices(self.devices)
        return self

    def device(self, site: str, device: str) -> ModbusControl | MqttControl | None:
        return next((d for d in self.devices if (d.site, d.device) == (site, device)), None)


# --- decisions (pure: no I/O) -------------------------------------------------------------


class Outcome(StrEnum):
    SENT = "sent"
    DRY_RUN = "dry-run"
    RATE_LIMITED = "rate-limited"
    REJECTED = "rejected"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class Verdict:
    """A command that ends before reaching a device: rejected or skipped."""

    outcome: Outcome
    detail: str


@dataclass(frozen=True)
class Ignored:
    """A command that is not this connector's (``unknown_devices = "ignore"``): no audit,
    its offset is settled, another consumer of the commands topic owns it."""

    detail: str


@dataclass(frozen=True)
class Plan:
    """What to do with a valid command: the clamped setpoint, and whether to send it."""

    command: Command
    device: ModbusControl | MqttControl
    setpoint_kw: float | None
    requested_kw: float | None
    dry_run: bool
    dry_run_why: str = ""

    @property
    def clamped(self) -> bool:
        return self.requested_kw is not None and self.setpoint_kw != self.requested_kw

    def clamp_note(self) -> str:
        if not self.clamped:
            return ""
        return f"clamped from {self.requested_kw:g} to {self.setpoint_kw:g} kW"


def clamp(setpoint_kw: float, device: ModbusControl | MqttControl) -> float:
    """The setpoint bounded by the device's limits. [kW]"""
    return min(max(setpoint_kw, device.min_setpoint_kw), device.max_setpoint_kw)


def expiry(command: Command, now: datetime, max_age_s: float) -> str | None:
    """Why a command is too old to apply at ``now``, or None."""
    if command.valid_until is not None:
        if command.valid_until <= now:
            return f"expired at {command.valid_until.isoformat()}"
        return None
    age_s = (now - command.issued_at).total_seconds()
    if age_s > max_age_s:
        return (
            f"stale: issued {age_s:.0f} s ago with no valid_until "
            f"(max_command_age_s = {max_age_s:g})"
        )
    return None


def plan_command(
    command: Command, config: ControlConfig, now: datetime
) -> Plan | Verdict | Ignored:
    """Validate and clamp one command (pure): a Plan to apply, why not (a Verdict, to
    audit), or Ignored (not ours, no audit: ``unknown_devices = "ignore"``)."""
    device = config.device(command.site, command.device)
    if device is None:
        unknown = f"unknown device {command.site}/{command.device}"
        if config.unknown_devices == "ignore":
            return Ignored(unknown)
        return Verdict(Outcome.REJECTED, unknown)
    if command.action not in device.allowed_actions:
        return Verdict(
            Outcome.REJECTED,
            f"action {command.action!r} is not allowed for {command.site}/{command.device} "
            f"(allowed_actions: {', '.join(device.allowed_actions)})",
        )
    if (why := expiry(command, now, config.max_command_age_s)) is not None:
        return Verdict(Outcome.SKIPPED, why)
    fixed = next((kw for a, kw in device.fixed_setpoints_kw.items() if a == command.action), None)
    requested = fixed if fixed is not None else command.setpoint_kw
    if requested is None and (command.action == "set_power" or device.transport == "modbus"):
        return Verdict(Outcome.REJECTED, f"action {command.action!r} needs a setpoint_kw")
    dry_run_why = ""
    if not config.enabled:
        dry_run_why = "control is not enabled"
    elif config.respect_command_dry_run and command.dry_run:
        dry_run_why = "the command is marked dry_run"
    return Plan(
        command=command,
        device=device,
        setpoint_kw=None if requested is None else clamp(requested, device),
        requested_kw=requested,
        dry_run=bool(dry_run_why),
        dry_run_why=dry_run_why,
    )


def audit_record(
    command: Command,
    outcome: Outcome,
    detail: str = "",
    *,
    setpoint_kw: float | None = None,
    sent: bool = False,
) -> Command:
    """The audit copy of a command: see the module docstring."""
    head = f"{outcome.value}: {detail}" if detail else outcome.value
    return Command.model_validate(
        {
            **command.model_dump(),
            "reason": f"{head} | {command.reason}",
            "dry_run": not sent,
            "setpoint_kw": command.setpoint_kw if setpoint_kw is None else setpoint_kw,
        }
    )


def audit_outcome(record: Command) -> Outcome:
    """The outcome an audit record states (ValueError for a record that is no audit)."""
    head = record.reason.split(" | ", 1)[0].split(":", 1)[0]
    return Outcome(head)


T = TypeVar("T")


class RateLimit(Generic[T]):
    """At most one item taken per ``min_interval_s``; a newer offer replaces the pending one.

    Pure: the caller passes monotonic times. The interval runs from one take to the
    next, so whatever the burst, takes are at least ``min_interval_s`` apart.
    """

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self.pending: T | None = None
        self.pending_urgent = False
        self.last_taken_at: float | None = None

    def offer(self, item: T, urgent: bool = False) -> T | None:
        """Make ``item`` the pending one; returns the one that lost, if any.

        An ``urgent`` item (a SCRAM, a shed: a device's safe state) is due at once,
        whatever the interval, and no ordinary item replaces it: an ordinary offer
        while an urgent one is pending is the one that loses.
        """
        if self.pending_urgent and not urgent:
            return item
        replaced, self.pending = self.pending, item
        self.pending_urgent = urgent
        return replaced

    def due_at(self) -> float | None:
        """When the pending item may be taken (-inf: now); None when nothing is pending."""
        if self.pending is None:
            return None
        if self.last_taken_at is None or self.pending_urgent:
            return -math.inf
        return self.last_taken_at + self.min_interval_s

    def take(self, now: float) -> T | None:
        """The pending item if it is due at ``now`` (the interval restarts), else None."""
        due = self.due_at()
        if due is None or now < due:
            return None
        item, self.pending = self.pending, None
        self.pending_urgent = False
        self.last_taken_at = now
        return item


# --- errors ---------------------------------------------------------------------------


class DeviceUnreachable(Exception):
    """No answer, a closed connection, a busy device or broker: retrying can succeed."""

    retriable = True


class WriteRejected(Exception):
    """An answer no retry changes: illegal address or value, a value that does not fit."""

    retriable = False


# --- transports ------------------------------------------------------------------------


class _Target(Protocol):
    def describe(self, plan: Plan) -> str: ...
    async def send(self, plan: Plan) -> str: ...


class _ModbusLink:
    """One Modbus TCP connection (host, port), shared by the unit ids behind it."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.lock = asyncio.Lock()
        self.client: AsyncModbusTcpClient | None = None
        self.generation = 0
        """Counts connections: what was discovered on an older one is rediscovered."""

    async def connected(self) -> AsyncModbusTcpClient:
        if self.client is not None and self.client.connected:
            return self.client
        self.close()
        # Our own backoff decides when to retry: pymodbus' reconnects and retries off.
        client = AsyncModbusTcpClient(
            self.host, port=self.port, timeout=self.timeout_s, retries=0, reconnect_delay=0
        )
        self.client = client
        try:
            ok = await asyncio.wait_for(client.connect(), self.timeout_s)
        except (TimeoutError, OSError, ModbusException) as error:
            raise DeviceUnreachable(f"connect {self.host}:{self.port}: {error!r}") from error
        if not ok:
            raise DeviceUnreachable(f"connect {self.host}:{self.port} failed")
        self.generation += 1
        return client

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()


def _register_words(dtype: str, value: float) -> list[int]:
    fmt, _ = _DTYPES[dtype]
    number: float | int = value if dtype == "float32" else round(value)
    try:
        data = struct.pack(fmt, number)
    except struct.error as error:
        raise WriteRejected(f"{value:g} does not fit a {dtype} register ({error})") from None
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


class _ModbusTarget:
    def __init__(self, device: ModbusControl, link: _ModbusLink, stats: ControlStats) -> None:
        self.device = device
        self.link = link
        self.stats = stats
        self._block: tuple[int, int] | None = None
        """(generation, address of the model's ID register) once discovered."""

    def describe(self, plan: Plan) -> str:
        device = self.device
        assert plan.setpoint_kw is not None
        if device.register_address is not None:
            raw = plan.setpoint_kw * device.scale
            where = f"register {device.register_address} on {device.address}"
            return f"write {raw:g} ({device.dtype}) to {where}"
        assert device.model is not None and device.point is not None
        units = sunspec.load_model(device.model).point(device.point).units
        enable = "".join(f", then {name} = {v}" for name, v in device.enable.items())
        return (
            f"write {device.model}.{device.point} = {device.physical_value(plan.setpoint_kw):g} "
            f"{units}{enable} on {device.address}"
        )

    async def send(self, plan: Plan) -> str:
        assert plan.setpoint_kw is not None
        async with self.link.lock:
            client = await self.link.connected()
            try:
                if self.device.register_address is not None:
                    words = _register_words(self.device.dtype, plan.setpoint_kw * self.device.scale)
                    await self._write(client, self.device.register_address, words)
                    return (
                        f"wrote {words} ({self.device.dtype}) to register "
                        f"{self.device.register_address} on {self.device.address}"
                    )
                return await self._send_sunspec(client, plan.setpoint_kw)
            except DeviceUnreachable:
                self.link.close()
                raise

    async def _send_sunspec(self, client: AsyncModbusTcpClient, setpoint_kw: float) -> str:
        device = self.device
        assert device.model is not None and device.point is not None
        address = await self._model_address(client)
        length = (await self._read(client, address, 2))[1]
        block = await self._read(client, address, length + 2)
        try:
            decoded = sunspec.decode_model(device.model, block)
        except sunspec.SunSpecError as error:
            raise WriteRejected(f"model {device.model} block does not decode: {error}") from None
        point = sunspec.load_model(device.model).point(device.point)
        value = device.physical_value(setpoint_kw)
        words, sf_note = self._point_words(point, value, decoded)
        await self._write(client, address + point.offset, words)
        note = (
            f"wrote {device.model}.{point.name} = {value:g} {point.units} (raw {words}"
            f"{sf_note}) at {address + point.offset} on {device.address}"
        )
        for name, raw in device.enable.items():
            enable_point = sunspec.load_model(device.model).point(name)
            enable_words, _ = self._point_words(enable_point, raw, decoded)
            await self._write(client, address + enable_point.offset, enable_words)
            note += f", {name} = {raw}"
        return note

    def _point_words(
        self, point: sunspec.Point, value: float, decoded: Mapping[str, sunspec.Value]
    ) -> tuple[list[int], str]:
        """The registers of ``point`` holding ``value``, encoded with the device's own
        scale factor (a read-only property of the device, read just before)."""
        assert self.device.model is not None
        values: dict[str, sunspec.Value] = {point.name: value}
        note = ""
        if isinstance(point.sf, str):
            sf = decoded.get(point.sf)
            if not isinstance(sf, int):
                raise WriteRejected(
                    f"scale factor {point.sf} of model {self.device.model} is not implemented"
                )
            values[point.sf] = sf
            note = f", {point.sf} {sf}"
        try:
            block = sunspec.encode_model(self.device.model, values)
        except ValueError as error:
            raise WriteRejected(f"{point.name} = {value:g}: {error}") from None
        return block[point.offset : point.offset + point.size], note

    async def _model_address(self, client: AsyncModbusTcpClient) -> int:
        """The ID register of ``model``, discovered once per connection."""
        if self._block is not None and self._block[0] == self.link.generation:
            return self._block[1]
        device = self.device
        bases = (
            (device.base_address,) if device.base_address is not None else sunspec.BASE_ADDRESSES
        )
        for base in bases:
            try:
                marker = await self._read(client, base, 2)
            except WriteRejected:
                continue
            if tuple(marker) != sunspec.SUNS_MARKER:
                continue
            address, index = base + 2, 0
            try:
                while True:
                    model_id, length = await self._read(client, address, 2)
                    header = sunspec.next_header(address, model_id, length, index)
                    if header is None:
                        break
                    if header.model_id == device.model:
                        self._block = (self.link.generation, header.address)
                        return header.address
                    address, index = header.end, index + 1
            except sunspec.SunSpecError as error:
                raise WriteRejected(f"SunSpec chain at {base}: {error}") from None
            raise WriteRejected(f"model {device.model} is not in the SunSpec map at {base}")
        raise WriteRejected(f"no SunS marker at {list(bases)} on {device.address}")

    async def _read(self, client: AsyncModbusTcpClient, address: int, count: int) -> list[int]:
        words: list[int] = []
        while count > 0:
            chunk = min(count, _MAX_READ_REGISTERS)
            try:
                response = await client.read_holding_registers(
                    address, count=chunk, device_id=self.device.unit_id
                )
            except (ModbusException, OSError, TimeoutError) as error:
                raise DeviceUnreachable(f"read {chunk} at {address}: {error!r}") from error
            self._check(response, f"reading {chunk} at {address}")
            if len(response.registers) != chunk:
                raise DeviceUnreachable(f"asked {chunk} registers at {address}")
            words.extend(response.registers)
            address += chunk
            count -= chunk
        return words

    async def _write(self, client: AsyncModbusTcpClient, address: int, words: list[int]) -> None:
        try:
            response = await client.write_registers(address, words, device_id=self.device.unit_id)
        except (ModbusException, OSError, TimeoutError) as error:
            raise DeviceUnreachable(f"write {words} at {address}: {error!r}") from error
        self._check(response, f"writing {words} at {address}")
        self.stats.register_writes += 1

    @staticmethod
    def _check(response: Any, what: str) -> None:
        if not response.isError():
            return
        code = getattr(response, "exception_code", 0)
        if code in _PERMANENT_EXCEPTIONS:
            raise WriteRejected(f"Modbus exception {code} {what}")
        # Busy, device failure, gateway errors: the device may answer next time.
        raise DeviceUnreachable(f"Modbus exception {code} {what}")


class _MqttLink:
    """One paho client per broker URL, in its own network thread (it reconnects)."""

    def __init__(self, url: str, client_id: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.connected = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Guards the waiters against paho's thread; reentrant because paho may call
        # on_publish from inside publish() on our own thread (QoS 0).
        self._lock = threading.RLock()
        self._waiting: dict[int, asyncio.Future[ReasonCode | None]] = {}
        self._early: dict[int, ReasonCode | None] = {}
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=True,
        )
        self.client.reconnect_delay_set(1, 30)
        self.client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        host, port = mqtt_address(self.url)
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    async def wait_connected(self, timeout_s: float) -> bool:
        # paho signals from its own thread: poll the threading.Event in short slices.
        for _ in range(max(1, math.ceil(timeout_s / 0.02))):
            if self.connected.is_set():
                return True
            await asyncio.sleep(0.02)
        return self.connected.is_set()

    async def stop(self) -> None:
        self.client.disconnect()
        await join_network_thread(self.client)

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if not self.connected.is_set():
            raise DeviceUnreachable(f"MQTT broker {self.url} is not connected")
        assert self._loop is not None
        future: asyncio.Future[ReasonCode | None] = self._loop.create_future()
        with self._lock:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise DeviceUnreachable(f"publish to {topic!r}: {paho.error_string(info.rc)}")
            if qos == 0:
                return
            if info.mid in self._early:
                future.set_result(self._early.pop(info.mid))
            else:
                self._waiting[info.mid] = future
        try:
            code = await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise DeviceUnreachable(
                f"no PUBACK from {self.url} within {self.timeout_s:g} s for {topic!r}"
            ) from None
        finally:
            with self._lock:
                self._waiting.pop(info.mid, None)
        if code is not None and code.is_failure:
            raise WriteRejected(f"broker {self.url} refused the publish to {topic!r}: {code}")

    # paho's thread:

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("control: MQTT broker %s refused the connection: %s", self.url, reason_code)
            return
        log.info("control: connected to MQTT broker %s", self.url)
        self.connected.set()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            future = self._waiting.get(mid)
            if future is None:
                if len(self._early) >= _MAX_EARLY_ACKS:
                    self._early.clear()
                self._early[mid] = reason_code
                return
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, future, reason_code)


def _resolve(future: asyncio.Future[ReasonCode | None], code: ReasonCode | None) -> None:
    if not future.done():
        future.set_result(code)


def mqtt_payload(plan: Plan) -> bytes:
    """The JSON payload of an MQTT command (keys renamed by ``payload_keys``)."""
    device = plan.device
    assert isinstance(device, MqttControl)
    command = plan.command
    body: dict[str, Any] = {
        "command_id": command.command_id,
        "site": command.site,
        "device": command.device,
        "action": command.action,
        "setpoint_kw": plan.setpoint_kw,
        "issued_at": command.issued_at.isoformat(),
        "valid_until": command.valid_until.isoformat() if command.valid_until else None,
        "source_id": command.source_id,
    }
    renamed = {device.payload_keys.get(key, key): value for key, value in body.items()}
    return orjson.dumps({**renamed, **device.payload_static})


class _MqttTarget:
    def __init__(self, device: MqttControl, link: _MqttLink, stats: ControlStats) -> None:
        self.device = device
        self.link = link
        self.stats = stats

    def describe(self, plan: Plan) -> str:
        return (
            f"publish {mqtt_payload(plan).decode()} to {self.device.topic_for(plan.command)!r} "
            f"on {self.device.url}"
        )

    async def send(self, plan: Plan) -> str:
        topic = self.device.topic_for(plan.command)
        await self.link.publish(topic, mqtt_payload(plan), self.device.qos, self.device.retain)
        self.stats.mqtt_publishes += 1
        acked = "acked" if self.device.qos == 1 else "sent with QoS 0"
        return f"published to {topic!r} on {self.device.url} ({acked})"


# --- the connector --------------------------------------------------------------------------


@dataclass
class ControlStats:
    commands: int = 0
    sent: int = 0
    dry_run: int = 0
    rate_limited: int = 0
    rejected: int = 0
    skipped: int = 0
    failed: int = 0
    clamped: int = 0
    attempts_failed: int = 0
    register_writes: int = 0
    mqtt_publishes: int = 0
    audited: int = 0
    dead_lettered: int = 0
    ignored: int = 0
    """Commands for devices not in the config, with ``unknown_devices = "ignore"``: not
    audited (another consumer owns them)."""
    last_error: str | None = None


@dataclass(frozen=True)
class CommandRef:
    """Where a command came from, so its offset is released once it is audited."""

    partition: TopicPartition
    offset: int


@dataclass(frozen=True)
class _Pending:
    plan: Plan
    ref: CommandRef


@dataclass
class _DeviceState:
    config: ModbusControl | MqttControl
    target: _Target
    limit: RateLimit[_Pending]
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


class AuditedOffsets:
    """Commit positions that never pass a command whose outcome is not audited yet."""

    def __init__(self) -> None:
        self.unresolved: dict[TopicPartition, set[int]] = defaultdict(set)
        self.next: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}

    def received(self, ref: CommandRef) -> None:
        self.unresolved[ref.partition].add(ref.offset)
        self.next[ref.partition] = max(self.next.get(ref.partition, 0), ref.offset + 1)

    def resolved(self, ref: CommandRef) -> None:
        self.unresolved[ref.partition].discard(ref.offset)

    def to_commit(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        positions = {}
        for tp, next_offset in self.next.items():
            if tp not in assigned:
                continue
            waiting = self.unresolved.get(tp)
            position = min(waiting) if waiting else next_offset
            if position != self.committed.get(tp):
                positions[tp] = position
        return positions

    def forget(self, assigned: set[TopicPartition]) -> None:
        """Drop partitions no longer ours (a rebalance): their commits are not ours."""
        for tp in [tp for tp in self.next if tp not in assigned]:
            self.next.pop(tp, None)
            self.unresolved.pop(tp, None)
            self.committed.pop(tp, None)


class ControlConnector:
    """Commands topic -> devices, with an audit record per command; ``async with`` works.

    ``start()`` creates the audit topic and connects Kafka and the MQTT brokers (Modbus
    devices are connected on their first command); ``run()`` handles commands until
    ``stop()``.
    """

    def __init__(
        self,
        settings: Settings,
        config: ControlConfig,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.config = config
        self.stats = ControlStats()
        self._clock = clock
        self.audit_spec = audit_topic_spec(config.audit_topic)
        self.group_id = config.group_id or f"{settings.app_id}.control"
        self._commands_topic = settings.topic(topics.COMMANDS)
        self._audit_topic = settings.topic(self.audit_spec)
        self._dead_letter_topic = settings.topic(topics.DEAD_LETTERS)
        self._modbus_links: dict[tuple[str, int], _ModbusLink] = {}
        self._mqtt_links: dict[str, _MqttLink] = {}
        self._devices: dict[tuple[str, str], _DeviceState] = {}
        for device in config.devices:
            target: _Target
            if isinstance(device, ModbusControl):
                link = self._modbus_links.setdefault(
                    (device.host, device.port),
                    _ModbusLink(device.host, device.port, config.request_timeout_s),
                )
                target = _ModbusTarget(device, link, self.stats)
            else:
                mqtt_link = self._mqtt_links.get(device.url)
                if mqtt_link is None:
                    client_id = f"{config.name}-{uuid.uuid4().hex[:8]}"
                    mqtt_link = _MqttLink(device.url, client_id, config.request_timeout_s)
                    self._mqtt_links[device.url] = mqtt_link
                target = _MqttTarget(device, mqtt_link, self.stats)
            self._devices[(device.site, device.device)] = _DeviceState(
                device, target, RateLimit(device.min_interval_s)
            )
        self._offsets = AuditedOffsets()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._stop_requested = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    # -- lifecycle --

    async def start(self) -> None:
        if self._started:
            return
        self._stop_requested.clear()
        await kafka.ensure_topics(self.settings, [topics.COMMANDS, self.audit_spec])
        producer = kafka.producer(self.settings)
        await producer.start()
        self._producer = producer
        consumer = kafka.consumer(self.settings, self._commands_topic, group_id=self.group_id)
        try:
            await consumer.start()
        except BaseException:
            self._producer = None
            await producer.stop()
            raise
        self._consumer = consumer
        self._started = True
        for link in self._mqtt_links.values():
            link.start()
        for link in self._mqtt_links.values():
            # Not fatal: paho goes on retrying; commands meanwhile are retried or fail.
            if not await link.wait_connected(self.config.request_timeout_s):
                log.warning("control: MQTT broker %s not connected yet; retrying", link.url)
        log.info(
            "control %s: %d devices, %s, group %s, audit to %s",
            self.config.name,
            len(self._devices),
            "ENABLED" if self.config.enabled else "dry-run",
            self.group_id,
            self._audit_topic,
        )

    async def run(self) -> None:
        """Handle commands until ``stop()``; each device applies its own in its own task."""
        await self.start()
        self._tasks = [
            asyncio.create_task(self._device_worker(state), name=f"control-{key[0]}/{key[1]}")
            for key, state in self._devices.items()
        ]
        self._tasks.append(asyncio.create_task(self._consume(), name="control-consumer"))
        await gather_until_stopped(self._tasks, self._stop_requested)

    async def stop(self) -> None:
        """Stop handling, commit what is audited, close every connection; safe twice.

        Commands still waiting (rate limit, retries) are neither applied nor
        committed: the next run gets them again (and skips those that expired).
        """
        self._stop_requested.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if not self._started:
            return
        self._started = False
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(KafkaError):
                await self._commit(consumer)
            await consumer.stop()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
        for link in self._modbus_links.values():
            link.close()
        for mqtt_link in self._mqtt_links.values():
            await mqtt_link.stop()

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

    # -- consuming --

    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._stop_requested.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            for tp, records in batches.items():
                for record in records:
                    ref = CommandRef(tp, record.offset)
                    self._offsets.received(ref)
                    await self._handle(record, ref)
            try:
                await self._commit(consumer)
            except KafkaError as error:
                # A rebalance or a broker hiccup: the positions are committed next time.
                log.warning("control: commit failed (%r); retrying", error)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        assigned = set(consumer.assignment())
        self._offsets.forget(assigned)
        positions = self._offsets.to_commit(assigned)
        if positions:
            await consumer.commit(positions)
            self._offsets.committed.update(positions)

    async def _handle(self, record: ConsumerRecord[bytes, bytes], ref: CommandRef) -> None:
        self.stats.commands += 1
        try:
            command = codec.decode(Command, record.value or b"")
        except codec.DecodeError as error:
            await self._dead_letter(record, error, ref)
            return
        result = plan_command(command, self.config, self._now())
        if isinstance(result, Ignored):
            # Another consumer of the commands topic owns it and audits it.
            log.debug(
                "control %s/%s %s ignored: %s (unknown_devices = ignore)",
                command.site,
                command.device,
                command.command_id,
                result.detail,
            )
            self.stats.ignored += 1
            self._offsets.resolved(ref)
            return
        if isinstance(result, Verdict):
            log.info(
                "control %s/%s %s %s: %s",
                command.site,
                command.device,
                command.command_id,
                result.outcome.value,
                result.detail,
            )
            await self._audit(audit_record(command, result.outcome, result.detail), ref)
            return
        state = self._devices[(command.site, command.device)]
        replaced = state.limit.offer(_Pending(result, ref), urgent=command.action in SAFETY_ACTIONS)
        state.wakeup.set()
        if replaced is not None:
            interval = f"min_interval_s = {state.config.min_interval_s:g}"
            detail = f"superseded by {command.command_id} within {interval}"
            if replaced.plan.command is command:
                standing = state.limit.pending
                assert standing is not None
                detail = (
                    f"held back: {standing.plan.command.action} "
                    f"{standing.plan.command.command_id} is pending and a safety action is "
                    "not superseded"
                )
            await self._audit(
                audit_record(
                    replaced.plan.command,
                    Outcome.RATE_LIMITED,
                    detail,
                    setpoint_kw=replaced.plan.setpoint_kw,
                ),
                replaced.ref,
            )

    # -- applying --

    async def _device_worker(self, state: _DeviceState) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop_requested.is_set():
            due = state.limit.due_at()
            now = loop.time()
            if due is None or due > now:
                state.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.wakeup.wait(), None if due is None else due - now)
                continue
            pending = state.limit.take(now)
            if pending is not None:
                await self._apply(state, pending)

    async def _apply(self, state: _DeviceState, pending: _Pending) -> None:
        plan = pending.plan
        command = plan.command
        name = f"{command.site}/{command.device}"
        if (why := expiry(command, self._now(), self.config.max_command_age_s)) is not None:
            # It waited out the rate limit meanwhile.
            await self._finish(plan, pending.ref, Outcome.SKIPPED, why)
            return
        what = state.target.describe(plan)
        if plan.dry_run:
            log.info("control dry-run %s %s: would %s", name, command.command_id, what)
            await self._finish(
                plan, pending.ref, Outcome.DRY_RUN, f"would {what} ({plan.dry_run_why})"
            )
            return
        backoff = Backoff(self.config.retry_initial_s, self.config.retry_max_s)
        last: Exception | None = None
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                done = await state.target.send(plan)
            except WriteRejected as error:
                log.warning("control %s %s: %s (not retried)", name, command.command_id, error)
                self.stats.last_error = f"{name}: {error}"
                await self._finish(
                    plan, pending.ref, Outcome.FAILED, f"{error} (not retried)", sent=True
                )
                return
            except DeviceUnreachable as error:
                last = error
                self.stats.attempts_failed += 1
                self.stats.last_error = f"{name}: {error}"
                log.warning(
                    "control %s %s: attempt %d/%d failed: %s",
                    name,
                    command.command_id,
                    attempt,
                    self.config.max_attempts,
                    error,
                )
            else:
                log.info("control %s %s: %s", name, command.command_id, done)
                await self._finish(plan, pending.ref, Outcome.SENT, done, sent=True)
                return
            if attempt == self.config.max_attempts:
                break
            newer = state.limit.pending
            if newer is not None:
                detail = (
                    f"superseded by {newer.plan.command.command_id} after {attempt} failed "
                    f"attempts: {last}"
                )
                await self._finish(plan, pending.ref, Outcome.FAILED, detail, sent=True)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), backoff.next_delay_s())
            if self._stop_requested.is_set():
                return  # not audited, not committed: the next run handles it
        detail = f"no answer after {self.config.max_attempts} attempts: {last}"
        await self._finish(plan, pending.ref, Outcome.FAILED, detail, sent=True)

    async def _finish(
        self, plan: Plan, ref: CommandRef, outcome: Outcome, detail: str, *, sent: bool = False
    ) -> None:
        note = plan.clamp_note()
        if note:
            self.stats.clamped += 1
        text = "; ".join(part for part in (note, detail) if part)
        record = audit_record(plan.command, outcome, text, setpoint_kw=plan.setpoint_kw, sent=sent)
        await self._audit(record, ref)

    # -- producing --

    async def _audit(self, record: Command, ref: CommandRef) -> None:
        """Produce the audit record; the command's offset is released once Kafka has it."""
        if await self._send(self._audit_topic, codec.encode(record), record.site):
            counter = audit_outcome(record).value.replace("-", "_")
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            self.stats.audited += 1
            self._offsets.resolved(ref)

    async def _dead_letter(
        self, record: ConsumerRecord[bytes, bytes], error: codec.DecodeError, ref: CommandRef
    ) -> None:
        log.warning(
            "control: command at %s/%d does not decode: %s (dead-lettered)",
            ref.partition.partition,
            ref.offset,
            error.reason,
        )
        letter = dead_letter(
            raw=record.value or b"",
            reason=error.reason,
            error_type=error.error_type,
            component=COMPONENT,
            source_topic=record.topic,
            key=record.key,
            partition=record.partition,
            offset=record.offset,
            now=self._now(),
        )
        if await self._send(self._dead_letter_topic, codec.encode(letter), record.topic):
            self.stats.dead_lettered += 1
            self._offsets.resolved(ref)

    async def _send(self, topic: str, value: bytes, key: str) -> bool:
        """Produce one record, retrying with backoff while Kafka fails; False on stop."""
        backoff = Backoff(
            min(0.5, self.config.produce_retry_max_s), self.config.produce_retry_max_s
        )
        while not self._stop_requested.is_set():
            producer = self._producer
            if producer is None:
                return False
            try:
                await (await producer.send(topic, value, key=key.encode()))
                return True
            except KafkaError as error:
                self.stats.last_error = f"kafka: {error!r}"
                log.warning("control: producing to %s failed (%r); retrying", topic, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), backoff.next_delay_s())
        return False

    def _now(self) -> datetime:
        return self._clock()


__all__ = [
    "ACTIONS",
    "AUDIT_TOPIC",
    "PAYLOAD_FIELDS",
    "ControlConfig",
    "ControlConnector",
    "ControlStats",
    "DeviceUnreachable",
    "Ignored",
    "ModbusControl",
    "MqttControl",
    "Outcome",
    "Plan",
    "RateLimit",
    "Verdict",
    "WriteRejected",
    "audit_outcome",
    "audit_record",
    "audit_topic_spec",
    "clamp",
    "expiry",
    "mqtt_payload",
    "plan_command",
]
