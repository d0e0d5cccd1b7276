"""An OCPP central system (CSMS): EV charge points over WebSocket into Kafka.

Charge points connect to ``ws://host:port/<any path>/<charge point id>`` (``wss://``
with TLS, below). The WebSocket subprotocol chooses the protocol: ``ocpp2.0.1`` or
``ocpp1.6`` (OCPP-J); a client offering both gets 2.0.1. A client offering neither
completes the handshake without a subprotocol and is closed at once (code 1002), as
OCPP-J asks. Each connection is one asyncio task; the ``ocpp`` package (mobilityhouse)
frames, routes and schema-validates the messages, ``websockets`` serves them.

Protocol mapping (1.6 / 2.0.1 -> wattstream):

* ``BootNotification``: Accepted, with ``heartbeat_interval_s`` as the interval.
  ``Heartbeat``: the current time. ``Authorize``: Accepted (no authorization list
  yet: every id token may charge). ``StartTransaction`` / ``TransactionEvent``
  answer Accepted too.
* ``MeterValues`` (both versions), the meter values in ``TransactionEvent`` (2.0.1) and
  in ``StopTransaction.transactionData`` (1.6): one ``EvReading`` per sampled instant
  (see ``MEASURAND_MAP`` for the measurands and units), with ``energy_kwh`` = the energy
  register now minus the register at the transaction's start (``meterStart`` in 1.6,
  the ``Transaction.Begin`` or first register sample in 2.0.1), ``soc_pct`` where the
  charge point reports ``SoC``, and ``plugged_in`` from the connector's state. Power is
  ``Power.Active.Import`` (minus ``Power.Active.Export``); without it,
  ``Current.Import`` x voltage (the sample's ``Voltage`` or the charge point's
  ``voltage_v``); without that, the register's rise since the transaction's previous
  register sample over the time between them (1.6 chargers sample only the register by
  default). An instant with no power at all gives no reading.
* ``StatusNotification``: the connector's cable state, ``plugged_in``: 1.6
  Preparing, Charging, SuspendedEV, SuspendedEVSE and Finishing are plugged in, 2.0.1
  Occupied is; Available is not; Reserved, Unavailable and Faulted keep what was known.
  A status that implies no energy flow (all but 1.6 Charging, and 2.0.1 Occupied during
  a transaction) is also a reading with ``power_kw`` 0. The 2.0.1 ``chargingState`` of
  a ``TransactionEvent`` (Idle: no cable) and its trigger reasons ``CablePluggedIn`` /
  ``EVDeparted`` update the cable state too.
* Sessions become ``ChargingSessionEvent``s on ``EV_SESSIONS`` (key: site):
  ``plugged_in`` / ``unplugged`` when the cable state changes, ``started`` at
  ``StartTransaction`` / ``TransactionEvent(Started)``, ``stopped`` at
  ``StopTransaction`` / ``TransactionEvent(Ended)`` with the session's energy and the
  stop reason. A transaction's start and stop are readings too (power 0 at the stop).
* The id token (RFID UID, contract id) is personal data: events keep only
  ``id_token_hash``, 16 hex digits of its HMAC-SHA256 under ``id_token_hash_key``
  (or of a plain SHA-256 without a key, which a 4-byte RFID UID does not protect
  against a dictionary of all UIDs: set the key). Tokens are never logged, except
  in the frame log (logger ``ingest.ocpp.frames``) at DEBUG and in the ``ocpp``
  package's report of a request that broke a handler.
* OCPP 1.6 transaction ids are assigned here: a hash of the charge point, connector,
  start time and ``meterStart``, so a StartTransaction the charge point repeats
  (after a lost answer) gets the same id, as does the same transaction after a
  restart of the CSMS.

Each charge point maps to a site and device through ``charge_points`` (connector 1 /
EVSE 1 is ``device``; others are ``<device>-<n>`` unless ``connector_devices`` names
them; connector 0, the charger's own meter, gives no reading). The CSMS keeps each charge
point's state (open transaction, start and last register, cable state) across its
connections, so a charge point that drops and reconnects resumes its session and
``energy_kwh`` continues; a restart of the CSMS loses it (a session then continues with
``energy_kwh`` None until it stops).

Errors: what the ``ocpp`` package rejects before a handler runs, an unknown action
(NotSupported; NotImplemented when the protocol has it but we do not handle it) and a
payload failing the OCPP JSON schema (FormatViolation, TypeConstraintViolation,
ProtocolError, ...), gets its CALLERROR from the package. It ignores a frame it cannot
unpack (logging it), so we answer that one ourselves: not JSON, not an array, a bad
message id -> 2.0.1 ``RpcFrameworkError`` (1.6, which lacks it: the package's own
FormatViolation / ProtocolError), an unknown message type id -> 2.0.1
``MessageTypeNotSupported`` (1.6: PropertyConstraintViolation), with the frame's message
id, or ``"-1"`` when none can be read; a broken CALLRESULT or CALLERROR gets no answer.
Every such frame, and every part of a valid message we cannot use (a number that is not
one, an unknown unit, a timestamp without offset), becomes a ``DeadLetter``
(component ``ingest.ocpp``, source topic ``ocpp:<charge point id>``, raw = the frame);
the rest of the message, the connection and the other charge points go on.

Example output message (key ``turin-home``) for a 1.6 ``MeterValues`` of charge point
``CP-001`` (device ``wallbox-1``) with ``Power.Active.Import`` 7400 W, the register at
12,345.6 Wh (the transaction started at 10,000 Wh) and ``SoC`` 48 %::

    {"schema_version": 1, "batch_id": "bat-3f1c...", "site": "turin-home",
     "source": "ocpp:wattstream-csms",
     "readings": [{"device": "wallbox-1", "ts": "2025-04-07T10:00:00Z", "kind": "ev",
                   "power_kw": 7.4, "soc_pct": 48.0, "plugged_in": true,
                   "energy_kwh": 2.3456}]}

Delivery guarantee: at least once, from the charge point to Kafka. A message's
CALLRESULT is sent only after every batch, session event and dead letter made from it
has been acked by Kafka (producer ``acks=all``). OCPP charge points queue transaction
messages (start, stop, transaction meter values) while offline and resend one that got
no answer or a CALLERROR, so a crash or a Kafka outage before the ack loses nothing of
those; a StatusNotification is not resent, so one that arrives during a crash is lost.
If Kafka has not acked within ``ack_timeout_s`` the message is answered InternalError
(the charge point retries) and stays buffered, to be produced when Kafka is back: the
retry may duplicate it, with the same readings (same device and ts) and event ids.
When ``max_buffered_readings`` are waiting, further messages are answered InternalError
at once and stay in the charge points' own queues: nothing is dropped here.

Security: profile 1 is HTTP Basic authentication in the WebSocket handshake, the user
name being the charge point id, the password its ``password`` (or ``password_env``, the
name of an environment variable, or ``password_file``, a file such as a Docker secret:
never logged, never in an error). A wrong password gets HTTP 401, an unknown charge point
id HTTP 404 (OCPP-J), unless ``auto_register`` accepts it into ``auto_register_site``
(with ``auto_register_password`` if set). Profile 2 is the same over TLS: set
``tls_certfile`` and ``tls_keyfile`` (PEM) and the charge points connect to ``wss://``;
TLS 1.2 at least. Profile 3 (client certificates) is not supported.

The CSMS side of smart charging is :meth:`OcppConnector.set_charging_limit`: it sends a
TxProfile SetChargingProfile (or ClearChargingProfile) and returns the charger's answer.
With ``[ocpp.control]`` the CSMS also consumes the commands topic and applies the commands
for its charge points through it, audited, dry-run unless enabled (:mod:`ingest.ocpp_control`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import ssl
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self
from urllib.parse import unquote, urlsplit

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from ocpp.exceptions import (
    FormatViolationError,
    InternalError,
    OCPPError,
    PropertyConstraintViolationError,
)
from ocpp.messages import CallError, MessageType, unpack
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v16 import datatypes as types16
from ocpp.v16 import enums as enums16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from ocpp.v201 import datatypes as types201
from ocpp.v201 import enums as enums201
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from websockets.asyncio.server import Server, ServerConnection, basic_auth, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from ingest.config import TomlConfig, check_unique_devices
from ingest.control import AUDIT_TOPIC

if TYPE_CHECKING:
    from ingest.ocpp_control import OcppCommandConsumer
from ingest.batching import site_batches
from pipeline import codec, kafka, metrics, topics
from pipeline.backoff import Backoff
from pipeline.schemas import (
    ChargingSessionEvent,
    DeadLetter,
    EvReading,
    Identifier,
    Reading,
    SessionEventType,
    UtcDatetime,
    dead_letter,
    stable_id,
)
from pipeline.settings import Settings

log = logging.getLogger(__name__)

COMPONENT = "ingest.ocpp"

OcppVersion = Literal["1.6", "2.0.1"]

# WebSocket subprotocol -> OCPP version, in our order of preference.
SUBPROTOCOLS: dict[str, OcppVersion] = {"ocpp2.0.1": "2.0.1", "ocpp1.6": "1.6"}

DEFAULT_MEASURAND = "Energy.Active.Import.Register"
"""What a sampled value without ``measurand`` measures (both versions)."""


@dataclass(frozen=True)
class Measurand:
    """How one OCPP measurand becomes one of our quantities."""

    quantity: str
    default_unit: str
    factors: Mapping[str, float]
    """Unit -> factor to our unit; any other unit is rejected."""


# OCPP measurand (unit) -> our quantity (unit). A sampled value's `unit` (1.6) or
# `unitOfMeasure.unit` x 10^`multiplier` (2.0.1) is converted; without one the
# measurand's OCPP default applies. Other measurands (reactive energy, temperature,
# frequency, ...) are ignored: an EvReading has no field for them.
MEASURAND_MAP: dict[str, Measurand] = {
    # Energy.Active.Import.Register (Wh) -> import_energy_kwh (kWh): the meter register;
    # energy_kwh is its rise since the transaction's start.
    "Energy.Active.Import.Register": Measurand(
        "import_energy_kwh", "Wh", {"Wh": 0.001, "kWh": 1.0}
    ),
    # Power.Active.Import (W) -> power_kw (kW): into the car.
    "Power.Active.Import": Measurand("power_kw", "W", {"W": 0.001, "kW": 1.0}),
    # Power.Active.Export (W) -> subtracted from power_kw (vehicle-to-grid is negative).
    "Power.Active.Export": Measurand("export_power_kw", "W", {"W": 0.001, "kW": 1.0}),
    # Current.Import (A) -> current_a (A): power_kw from it when no power is sampled.
    "Current.Import": Measurand("current_a", "A", {"A": 1.0}),
    # Voltage (V) -> voltage_v (V): for power from current.
    "Voltage": Measurand("voltage_v", "V", {"V": 1.0}),
    # SoC (Percent) -> soc_pct (%).
    "SoC": Measurand("soc_pct", "Percent", {"Percent": 1.0}),
}

# Where a sampled value was measured: the outlet (the default) is what the car gets; the
# inlet (grid side, losses included) stands in when the outlet is not sampled. SoC is
# the car's, sampled at location EV.
_OUTLET, _INLET = "Outlet", "Inlet"

_PLUGGED_16 = frozenset({"Preparing", "Charging", "SuspendedEV", "SuspendedEVSE", "Finishing"})
# A 1.6 Charging status says energy flows, but not how much: MeterValues will tell.
_POWER_UNKNOWN_16 = frozenset({"Charging"})
_PLUGGED_201 = frozenset({"Occupied"})
_UNPLUGGED = frozenset({"Available"})
# 2.0.1 chargingState: Idle is "no connection between EV and EVSE".
_PLUGGED_CHARGING_STATES = frozenset({"Charging", "EVConnected", "SuspendedEV", "SuspendedEVSE"})
_BOUNDARY_CONTEXTS = frozenset({"Transaction.Begin", "Transaction.End"})
_PLUG_TRIGGERS = {"CablePluggedIn": True, "EVDeparted": False, "EVCommunicationLost": False}

# A charge point identity becomes a path segment, a dead letter's key and (when
# auto-registered) a device id: OCPP 2.0.1 allows RFC 3986 "unreserved" characters, at
# most 48; "~" is left out so that every identity is also a valid device id.
_CHARGE_POINT_ID_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
)
_TIMESTAMP: TypeAdapter[datetime] = TypeAdapter(UtcDatetime)
# Longest excerpt of foreign input quoted in a reason or a log line.
_EXCERPT_CHARS = 120
# One charging profile id per connector (ours), so a new limit replaces the previous
# one and a clear removes just it, leaving profiles others installed alone.
_PROFILE_ID_BASE = 7_000
# A TxProfile overrides TxDefaultProfiles at any level; among TxProfiles the highest
# level wins, so one above the usual 0 keeps ours in force over a vendor's default one.
_PROFILE_STACK_LEVEL = 1
_REALM = "wattstream OCPP"


# --- configuration ------------------------------------------------------------------


def _take_secret(data: Any, name: str) -> Any:
    """Resolve ``<name>_env`` (a variable's name) or ``<name>_file`` (a path) into ``name``.

    Secrets stay out of the TOML file this way (Docker and Kubernetes secrets are files);
    a missing variable or unreadable file is an error naming the key, never the value.
    """
    if not isinstance(data, dict):
        return data
    keys = (name, f"{name}_env", f"{name}_file")
    given = [key for key in keys if data.get(key) is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)}: set only one")
    data = dict(data)
    if f"{name}_env" in given:
        variable = str(data[f"{name}_env"])
        value = os.environ.get(variable)
        if not value:
            raise ValueError(f"{name}_env: the environment variable {variable!r} is not set")
        data[name] = value
    elif f"{name}_file" in given:
        path = Path(data[f"{name}_file"])
        try:
            data[name] = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as error:
            raise ValueError(f"{name}_file: cannot read {str(path)!r}: {error.strerror}") from None
        if not data[name]:
            raise ValueError(f"{name}_file: {str(path)!r} is empty")
    return data


def _check_length(name: str, secret: SecretStr | None) -> None:
    # OCPP's minimum for Basic auth passwords; for a hash key, what makes guessing it moot.
    if secret is not None and len(secret.get_secret_value()) < 16:
        raise ValueError(f"{name}: at least 16 characters")


class ChargePointConfig(BaseModel):
    """One known charge point: where its readings belong, its limits and password."""

    # Errors must not echo what was given: it holds the password.
    model_config = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False, hide_input_in_errors=True
    )

    site: Identifier
    device: Identifier
    """Device id of connector 1 (1.6) / EVSE 1 (2.0.1)."""
    connector_devices: dict[int, Identifier] = Field(default_factory=dict)
    """Device ids of other connectors / EVSEs; default ``<device>-<n>``."""
    max_power_kw: float = Field(default=22.0, gt=0, le=1000)
    """The charge point's rating: a charging limit is capped at it. [kW]"""
    voltage_v: float = Field(default=230.0, gt=0, le=1000)
    """Phase-to-neutral voltage, to convert current to power and back. [V]"""
    phases: Literal[1, 2, 3] = 3
    charging_rate_unit: Literal["W", "A"] = "W"
    """Unit of the limits we send: many AC chargers accept only A (1.6 configuration
    key ChargingScheduleAllowedChargingRateUnit)."""
    password: SecretStr | None = None
    """HTTP Basic password (OCPP asks for at least 16 characters); a secret."""
    password_env: str | None = None
    """Name of an environment variable holding the password, instead of ``password``."""
    password_file: Path | None = None
    """A file holding the password (e.g. a Docker secret), instead of ``password``."""

    @model_validator(mode="before")
    @classmethod
    def _secret(cls, data: Any) -> Any:
        return _take_secret(data, "password")

    @model_validator(mode="after")
    def _connectors(self) -> ChargePointConfig:
        _check_length("password", self.password)
        if any(n < 1 for n in self.connector_devices):
            raise ValueError("connector_devices: connector ids start at 1 (0 is the charger)")
        return self

    def device_for(self, connector_id: int) -> str:
        if connector_id == 1:
            return self.device
        return self.connector_devices.get(connector_id, f"{self.device}-{connector_id}")


@dataclass(frozen=True)
class _Device:
    site: str
    device: str


class OcppControlConfig(BaseModel):
    """``[ocpp.control]``: the CSMS also applies ``Command``s to its charge points (see
    :mod:`ingest.ocpp_control`). Names and defaults follow ``[control]`` (ingest/control.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    enabled: bool = False
    """The master switch. False: audit what would be sent (dry-run), send nothing."""
    group_id: str | None = Field(default=None, min_length=1)
    """Consumer group; None: ``<app_id>.ocpp-control`` (not the control connector's: both
    read every command, each applies those of its own devices)."""
    audit_topic: str = Field(default=AUDIT_TOPIC, pattern=r"^[A-Za-z0-9._\-]+$")
    """Where audit records go (the deployment's topic_prefix is added); control.py's."""
    respect_command_dry_run: bool = True
    """A command marked ``dry_run`` is never sent, even when enabled."""
    max_command_age_s: float = Field(default=300.0, gt=0)
    """A command without ``valid_until`` issued longer ago is skipped (as control.py). [s]"""
    min_interval_s: float = Field(default=10.0, ge=0, le=86_400)
    """At most one command per charge point connector per interval; a newer one replaces
    the pending one. 10 s: as control.py; a charger ramps in seconds. [s]"""
    produce_retry_max_s: float = Field(default=30.0, gt=0)
    """Backoff ceiling while Kafka does not take an audit record. [s]"""


class OcppConfig(TomlConfig):
    """Settings of the OCPP central system; validated at construction, no network calls.

    >>> OcppConfig(port=9000, charge_points={"CP-001": {"site": "home", "device": "wb-1",
    ...     "password_env": "CP001_PASSWORD"}})
    """

    toml_table: ClassVar[str | None] = "ocpp"

    # Errors must not echo what was given: it holds passwords.
    model_config = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False, hide_input_in_errors=True
    )

    host: str = "127.0.0.1"
    """Address to listen on; "0.0.0.0" accepts charge points from the network."""
    port: int = Field(default=9000, ge=0, le=65_535)
    """0 picks a free port (tests)."""
    csms_id: Identifier = "wattstream-csms"
    """Names this CSMS in the batches' ``source`` (``ocpp:<csms_id>``)."""
    charge_points: dict[str, ChargePointConfig] = Field(default_factory=dict)
    """Known charge points by OCPP identity (the last segment of their URL)."""
    require_password: bool = True
    """False allows charge points without a password (security profile 0: only on a
    network that nothing else can reach)."""
    auto_register: bool = False
    """Accept unknown charge point ids into ``auto_register_site`` (device = the id)."""
    auto_register_site: Identifier | None = None
    auto_register_max_power_kw: float = Field(default=22.0, gt=0, le=1000)
    """Rating assumed for auto-registered charge points. [kW]"""
    auto_register_password: SecretStr | None = None
    """The one password every auto-registered charge point presents (commissioning)."""
    auto_register_password_env: str | None = None
    auto_register_password_file: Path | None = None
    tls_certfile: Path | None = None
    """Security profile 2: the server certificate (PEM, with its chain); serves wss://."""
    tls_keyfile: Path | None = None
    """The certificate's private key (PEM), if not inside ``tls_certfile``."""
    id_token_hash_key: SecretStr | None = None
    """Key of the id tokens' HMAC pseudonyms; keep it stable (a new key gives the same
    card another pseudonym). Without it a plain SHA-256 is used (weak for RFID UIDs)."""
    id_token_hash_key_env: str | None = None
    id_token_hash_key_file: Path | None = None
    heartbeat_interval_s: int = Field(default=300, ge=1, le=86_400)
    """Heartbeat interval sent in the BootNotification answer. [s]"""
    ping_interval_s: float = Field(default=30.0, gt=0)
    """WebSocket pings to each charge point: a dead connection is closed after about
    ping_interval_s + ping_timeout_s, and its charge point can reconnect at once. [s]"""
    ping_timeout_s: float = Field(default=30.0, gt=0)
    response_timeout_s: float = Field(default=30.0, gt=0)
    """How long a request to a charge point (set_charging_limit) waits. [s]"""
    batch_max_readings: int = Field(default=500, ge=1, le=100_000)
    """Readings per telemetry batch and per flush. [readings]"""
    batch_max_wait_s: float = Field(default=0.1, gt=0, le=30)
    """Longest a reading waits in memory before it is produced; each charge point's
    answer waits for its produce, so this is also added to its round trip, and to a
    charging limit sent meanwhile (the ocpp package reads a connection's next frame only
    once the handler before it has answered): 0.5 s made the command-to-profile p99
    267 ms, 0.05 s 10 ms. [s]"""
    ack_timeout_s: float = Field(default=20.0, gt=0)
    """How long a message waits for Kafka before it is answered InternalError (the
    charge point retries): below the chargers' own response timeout, often 30 s. [s]"""
    max_buffered_readings: int = Field(default=50_000, ge=1)
    """Above this many readings waiting for Kafka, messages are refused (InternalError)
    and stay queued in the charge points. [readings]"""
    produce_retry_max_s: float = Field(default=30.0, gt=0)
    """Backoff ceiling between attempts to produce a flush while Kafka fails. [s]"""
    control: OcppControlConfig | None = None
    """Present (``[ocpp.control]``): consume the commands topic and apply its commands for
    these charge points as charging profiles; dry-run unless ``enabled``."""

    @model_validator(mode="before")
    @classmethod
    def _secrets(cls, data: Any) -> Any:
        return _take_secret(_take_secret(data, "auto_register_password"), "id_token_hash_key")

    @model_validator(mode="after")
    def _consistent(self) -> OcppConfig:
        _check_length("auto_register_password", self.auto_register_password)
        _check_length("id_token_hash_key", self.id_token_hash_key)
        for charge_point_id, charge_point in self.charge_points.items():
            if not _is_charge_point_id(charge_point_id):
                raise ValueError(
                    f"charge_points: {charge_point_id!r} is not a charge point id "
                    "(letters, digits, '.', '_', '-'; at most 48)"
                )
            if self.require_password and charge_point.password is None:
                raise ValueError(
                    f"charge_points.{charge_point_id}: needs password, password_env or "
                    "password_file (or require_password = false: security profile 0, "
                    "trusted networks only)"
                )
        check_unique_devices(
            _Device(cp.site, cp.device_for(n))
            for cp in self.charge_points.values()
            for n in {1, *cp.connector_devices}
        )
        if self.auto_register and self.auto_register_site is None:
            raise ValueError("auto_register requires auto_register_site")
        if self.auto_register and self.require_password and self.auto_register_password is None:
            raise ValueError(
                "auto_register with require_password needs auto_register_password (or _env / _file)"
            )
        if self.tls_keyfile is not None and self.tls_certfile is None:
            raise ValueError("tls_keyfile needs tls_certfile")
        self.ssl_context()  # loads the files now: a bad one fails start-up, named
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context (security profile 2), or None for plain ws://."""
        if self.tls_certfile is None:
            return None
        for name in ("tls_certfile", "tls_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file {str(path)!r}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # OCPP's security profiles require TLS 1.2 or later.
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_certfile, self.tls_keyfile)
        except (ssl.SSLError, OSError) as error:
            raise ValueError(
                f"tls_certfile / tls_keyfile: cannot load {str(self.tls_certfile)!r}: {error}"
            ) from None
        return context

    def charge_point(self, charge_point_id: str) -> ChargePointConfig | None:
        """The charge point's settings; an auto-registered one's if allowed, else None."""
        known = self.charge_points.get(charge_point_id)
        if known is not None or not self.auto_register:
            return known
        assert self.auto_register_site is not None  # checked by _consistent
        return ChargePointConfig(
            site=self.auto_register_site,
            device=charge_point_id,
            max_power_kw=self.auto_register_max_power_kw,
        )

    def password_for(self, charge_point_id: str) -> SecretStr | None:
        known = self.charge_points.get(charge_point_id)
        return known.password if known is not None else self.auto_register_password

    @property
    def source(self) -> str:
        """The ``source`` of the batches this connector produces."""
        return f"ocpp:{self.csms_id}"


def _is_charge_point_id(text: str) -> bool:
    return 0 < len(text) <= 48 and set(text) <= _CHARGE_POINT_ID_CHARS


def charge_point_id_from_path(path: str) -> str | None:
    """The charge point id in a WebSocket request path (its last segment), or None."""
    # Not stripping a trailing "/": ".../ocpp/" names no charge point, not one "ocpp".
    segment = unquote(urlsplit(path).path.rpartition("/")[2])
    return segment if _is_charge_point_id(segment) else None


# --- OCPP messages -> readings and session events (pure: no network) --------------------


@dataclass(frozen=True)
class Rejection:
    """Why (part of) a message was not used."""

    reason: str
    error_type: str


@dataclass
class Outcome:
    """What one OCPP message becomes."""

    readings: list[tuple[str, EvReading]] = field(default_factory=list)
    """(site, reading) in message order."""
    events: list[ChargingSessionEvent] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    samples_without_power: int = 0

    def __bool__(self) -> bool:
        return bool(self.readings or self.events or self.rejections)


@dataclass(frozen=True)
class Sample:
    """One OCPP MeterValue (one instant), in our units; None where not sampled."""

    ts: datetime
    context: str | None = None
    power_kw: float | None = None
    """Import minus export. [kW]"""
    import_energy_kwh: float | None = None
    soc_pct: float | None = None
    current_a: float | None = None
    """Summed over the phases sampled, or one value without phase. [A]"""
    current_phases: int = 0
    """How many phase values ``current_a`` sums; 0 for one value without a phase."""
    voltage_v: float | None = None
    """Phase to neutral. [V]"""


def parse_meter_value(
    meter_value: Mapping[str, Any], label: str = ""
) -> tuple[Sample | None, list[Rejection]]:
    """One MeterValue (the ``ocpp`` package's snake_case dict, either version) as a Sample.

    A sampled value that cannot be used is a rejection and the others are kept; a bad
    timestamp rejects the whole instant.
    """
    rejections: list[Rejection] = []
    try:
        ts = _TIMESTAMP.validate_python(meter_value.get("timestamp"))
    except ValidationError as error:
        return None, [Rejection(f"{label}timestamp: {codec.describe(error)}", "ValidationError")]
    # quantity -> location -> phase (None: no phase) -> value in our unit
    found: dict[str, dict[str, dict[str | None, float]]] = defaultdict(lambda: defaultdict(dict))
    for index, sampled in enumerate(meter_value.get("sampled_value") or []):
        where = f"{label}sampled_value[{index}]"
        measurand_name = sampled.get("measurand") or DEFAULT_MEASURAND
        measurand = MEASURAND_MAP.get(measurand_name)
        if measurand is None:
            continue
        if sampled.get("format") == "SignedData":  # 1.6: a signed blob, not a number
            continue
        location = sampled.get("location") or _OUTLET
        if measurand.quantity == "soc_pct":
            location = _OUTLET
        elif location not in (_OUTLET, _INLET):
            continue  # EV, Cable, Body: not the energy the charge point delivers
        unit, multiplier = _unit(sampled, measurand)
        factor = measurand.factors.get(unit)
        if factor is None:
            rejections.append(
                Rejection(
                    f"{where}: {measurand_name} in unit {unit!r}; "
                    f"expected one of {sorted(measurand.factors)}",
                    "UnknownUnit",
                )
            )
            continue
        value = _number(sampled.get("value"))
        if value is None:
            rejections.append(
                Rejection(
                    f"{where}: {measurand_name} value "
                    f"{str(sampled.get('value'))[:_EXCERPT_CHARS]!r} is not a finite number",
                    "ValidationError",
                )
            )
            continue
        found[measurand.quantity][location][sampled.get("phase")] = value * 10**multiplier * factor
    values: dict[str, Any] = {}
    for quantity, by_location in found.items():
        by_phase = by_location.get(_OUTLET) or by_location[_INLET]
        if None in by_phase:
            values[quantity] = by_phase[None]
            continue
        if quantity == "voltage_v":
            values[quantity] = _phase_voltage(by_phase)
            continue
        # Per-phase values add up; a neutral current is not a phase's.
        phase_values = [v for phase, v in by_phase.items() if phase != "N"]
        values[quantity] = sum(phase_values)
        if quantity == "current_a":
            values["current_phases"] = len(phase_values)
    export_kw = values.pop("export_power_kw", None)
    if export_kw is not None:
        values["power_kw"] = values.get("power_kw", 0.0) - export_kw
    return Sample(
        ts=ts, context=meter_value.get("context") or _first_context(meter_value), **values
    ), rejections


def _first_context(meter_value: Mapping[str, Any]) -> str | None:
    # A context belongs to each sampled value; the instant's is that of its first.
    for sampled in meter_value.get("sampled_value") or []:
        if sampled.get("context"):
            return str(sampled["context"])
    return None


def _unit(sampled: Mapping[str, Any], measurand: Measurand) -> tuple[str, int]:
    """(unit, power-of-ten multiplier): 1.6 has ``unit``, 2.0.1 ``unit_of_measure``."""
    if "unit_of_measure" in sampled:
        uom = sampled["unit_of_measure"] or {}
        return str(uom.get("unit") or measurand.default_unit), int(uom.get("multiplier") or 0)
    return str(sampled.get("unit") or measurand.default_unit), 0


def _number(value: Any) -> float | None:
    """A finite number from 1.6's decimal string or 2.0.1's JSON number, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _phase_voltage(by_phase: Mapping[str | None, float]) -> float:
    """Mean phase-to-neutral voltage; line-to-line values (L1-L2) divided by sqrt(3)."""
    # "L1" and "L1-N" are to neutral; "L1-L2" is between two lines.
    to_neutral = [v for p, v in by_phase.items() if p and ("-" not in p or p.endswith("-N"))]
    if to_neutral:
        return sum(to_neutral) / len(to_neutral)
    between = list(by_phase.values())
    return sum(between) / len(between) / math.sqrt(3)


def hash_id_token(token: str, key: bytes | None = None) -> str:
    """The id token's pseudonym: 16 hex digits of HMAC-SHA256(key, token), or SHA-256.

    Only the token's value is hashed (not its 2.0.1 type), so one RFID card has one
    pseudonym at 1.6 and 2.0.1 charge points alike.
    """
    data = token.encode()
    digest = hmac.new(key, data, hashlib.sha256) if key else hashlib.sha256(data)
    return digest.hexdigest()[:16]


def transaction_id_16(
    charge_point_id: str, connector_id: int, timestamp: str, meter_start_wh: int
) -> int:
    """The id we assign to a 1.6 transaction: the same start always gets the same id.

    OCPP 1.6 ids are integers; the schema allows any, charge points often store 32 bits.
    """
    digest = hashlib.sha256(
        f"{charge_point_id}\x1f{connector_id}\x1f{timestamp}\x1f{meter_start_wh}".encode()
    ).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1) + 1


@dataclass
class ConnectorState:
    """What is known of one connector (1.6) or EVSE (2.0.1), across connections."""

    plugged_in: bool | None = None
    """None until a status or transaction says."""
    transaction_id: str | None = None
    start_register_kwh: float | None = None
    """The register at the open transaction's start; None if not (yet) known."""
    start_known: bool = True
    """False for a transaction first seen in the middle (after a CSMS restart): its
    first register is not its start, so energy_kwh stays unknown."""
    id_token_hash: str | None = None
    last_register_kwh: float | None = None
    last_register_ts: datetime | None = None
    """The open transaction's last register sample (for power from energy)."""

    def session_energy_kwh(self, register_kwh: float | None = None) -> float | None:
        register = self.last_register_kwh if register_kwh is None else register_kwh
        if self.transaction_id is None or self.start_register_kwh is None or register is None:
            return None
        energy = register - self.start_register_kwh
        return round(energy, 6) if energy >= 0 else None

    def open(
        self, transaction_id: str, start_register_kwh: float | None, *, start_known: bool = True
    ) -> None:
        self.transaction_id = transaction_id
        self.start_register_kwh = start_register_kwh
        self.start_known = start_known
        self.id_token_hash = None
        self.last_register_kwh = start_register_kwh
        self.last_register_ts = None

    def close(self) -> None:
        self.transaction_id = None
        self.start_register_kwh = None
        self.id_token_hash = None
        self.last_register_ts = None


class ChargePointSession:
    """One charge point's state and the mapping of its messages; no I/O, never raises
    for input. Kept by the CSMS across the charge point's connections."""

    def __init__(
        self,
        charge_point_id: str,
        config: ChargePointConfig,
        *,
        id_token_key: bytes | None = None,
    ) -> None:
        self.charge_point_id = charge_point_id
        self.config = config
        self.id_token_key = id_token_key
        self.version: OcppVersion = "1.6"
        self.connectors: dict[int, ConnectorState] = {}
        self._transaction_connector: dict[str, int] = {}

    def connector(self, connector_id: int) -> ConnectorState:
        return self.connectors.setdefault(connector_id, ConnectorState())

    def open_transaction(self, connector_id: int) -> str | None:
        state = self.connectors.get(connector_id)
        return state.transaction_id if state else None

    # -- both versions --

    def meter_values(
        self,
        connector_id: int,
        meter_values: Sequence[Mapping[str, Any]],
        *,
        transaction_id: str | None = None,
        outcome: Outcome | None = None,
    ) -> Outcome:
        """MeterValues (1.6, 2.0.1) and the meter values inside transaction messages."""
        out = outcome if outcome is not None else Outcome()
        if connector_id == 0:
            return out  # the charger's own meter: no car behind it
        state = self.connector(connector_id)
        if transaction_id is not None and state.transaction_id != transaction_id:
            # A transaction we did not see start (the CSMS restarted): follow it, but
            # its energy is unknown (its first register here is not its start).
            self._open(connector_id, transaction_id, None, start_known=False)
        for index, meter_value in enumerate(meter_values):
            sample, rejections = parse_meter_value(meter_value, f"meter_value[{index}].")
            out.rejections.extend(rejections)
            if sample is not None:
                self._apply(connector_id, state, sample, out)
        return out

    def _apply(
        self, connector_id: int, state: ConnectorState, sample: Sample, out: Outcome
    ) -> None:
        register = sample.import_energy_kwh
        power_kw = sample.power_kw
        if power_kw is None and sample.current_a is not None:
            voltage_v = sample.voltage_v or self.config.voltage_v
            phases = 1 if sample.current_phases else self.config.phases
            power_kw = sample.current_a * voltage_v * phases / 1000
        if (
            power_kw is None
            and register is not None
            # At a transaction's first and last instant the average since the previous
            # sample is not the power: the start and stop readings say it.
            and sample.context not in _BOUNDARY_CONTEXTS
            and state.transaction_id is not None
            and state.last_register_kwh is not None
            and state.last_register_ts is not None
            and sample.ts > state.last_register_ts
        ):
            hours = (sample.ts - state.last_register_ts).total_seconds() / 3600
            power_kw = max(0.0, register - state.last_register_kwh) / hours
        if register is not None and state.transaction_id is not None:
            if state.start_register_kwh is None and state.start_known:
                state.start_register_kwh = register  # 2.0.1 without a Transaction.Begin value
            if state.last_register_ts is None or sample.ts >= state.last_register_ts:
                state.last_register_kwh = register
                state.last_register_ts = sample.ts
        if power_kw is None:
            out.samples_without_power += 1
            return
        self._reading(
            out,
            connector_id,
            state,
            sample.ts,
            power_kw=power_kw,
            soc_pct=sample.soc_pct,
            energy_kwh=state.session_energy_kwh(register),
        )

    def _reading(
        self,
        out: Outcome,
        connector_id: int,
        state: ConnectorState,
        ts: datetime,
        *,
        power_kw: float,
        soc_pct: float | None = None,
        energy_kwh: float | None = None,
    ) -> None:
        try:
            reading = EvReading(
                device=self.config.device_for(connector_id),
                ts=ts,
                power_kw=round(power_kw, 6),
                soc_pct=soc_pct,
                plugged_in=bool(state.plugged_in),
                energy_kwh=energy_kwh,
            )
        except ValidationError as error:
            out.rejections.append(
                Rejection(f"connector {connector_id}: {codec.describe(error)}", "ValidationError")
            )
            return
        out.readings.append((self.config.site, reading))

    def _boundary_reading(
        self,
        out: Outcome,
        connector_id: int,
        state: ConnectorState,
        ts: datetime,
        energy_kwh: float | None,
    ) -> None:
        """A transaction's start or stop as a reading (no power), unless a sampled value
        of that instant already gave one."""
        device = self.config.device_for(connector_id)
        if any(r.device == device and r.ts == ts for _, r in out.readings):
            return
        self._reading(out, connector_id, state, ts, power_kw=0.0, energy_kwh=energy_kwh)

    def _event(
        self,
        out: Outcome,
        connector_id: int,
        state: ConnectorState,
        event_type: SessionEventType,
        ts: datetime,
        *,
        transaction_id: str | None = None,
        energy_kwh: float | None = None,
        import_energy_kwh: float | None = None,
        stop_reason: str | None = None,
    ) -> None:
        transaction_id = transaction_id if transaction_id is not None else state.transaction_id
        out.events.append(
            ChargingSessionEvent(
                event_id=stable_id(
                    "evs",
                    self.charge_point_id,
                    connector_id,
                    transaction_id,
                    event_type.value,
                    ts.isoformat(),
                ),
                site=self.config.site,
                device=self.config.device_for(connector_id),
                charge_point_id=self.charge_point_id,
                connector_id=connector_id,
                transaction_id=transaction_id,
                event_type=event_type,
                ocpp_version=self.version,
                id_token_hash=state.id_token_hash,
                energy_kwh=energy_kwh,
                import_energy_kwh=None
                if import_energy_kwh is None
                else round(import_energy_kwh, 6),
                stop_reason=stop_reason,
                ts=ts,
            )
        )

    def _plugged(
        self,
        out: Outcome,
        connector_id: int,
        state: ConnectorState,
        plugged: bool | None,
        ts: datetime,
    ) -> None:
        if plugged is None or plugged == state.plugged_in:
            return
        known = state.plugged_in is not None
        state.plugged_in = plugged
        if plugged:
            self._event(out, connector_id, state, SessionEventType.PLUGGED_IN, ts)
        elif known:  # "not plugged" at first contact is no news
            self._event(out, connector_id, state, SessionEventType.UNPLUGGED, ts)

    def _open(
        self,
        connector_id: int,
        transaction_id: str,
        start_register_kwh: float | None,
        *,
        start_known: bool = True,
    ) -> ConnectorState:
        state = self.connector(connector_id)
        if state.transaction_id is not None and state.transaction_id != transaction_id:
            log.warning(
                "ocpp %s connector %d: transaction %s starts while %s was open; "
                "the earlier one's stop never came",
                self.charge_point_id,
                connector_id,
                transaction_id,
                state.transaction_id,
            )
            self._transaction_connector.pop(state.transaction_id, None)
        state.open(transaction_id, start_register_kwh, start_known=start_known)
        self._transaction_connector[transaction_id] = connector_id
        return state

    def _close(self, state: ConnectorState) -> None:
        if state.transaction_id is not None:
            self._transaction_connector.pop(state.transaction_id, None)
        state.close()

    def _connector_of(self, transaction_id: str) -> int | None:
        """The connector of a known transaction; else the only connector there is."""
        if transaction_id in self._transaction_connector:
            return self._transaction_connector[transaction_id]
        known = [n for n in self.connectors if n > 0]
        return known[0] if len(known) == 1 else None

    def _timestamp(self, value: Any, received_at: datetime, out: Outcome, what: str) -> datetime:
        """The message's instant; the receive time (and a rejection) if it has none valid."""
        if value is None:
            return received_at
        try:
            return _TIMESTAMP.validate_python(value)
        except ValidationError as error:
            out.rejections.append(
                Rejection(
                    f"{what} timestamp: {codec.describe(error)}; used the receive time",
                    "ValidationError",
                )
            )
            return received_at

    def _status(
        self, out: Outcome, connector_id: int, ts: datetime, plugged: bool | None, zero_power: bool
    ) -> None:
        state = self.connector(connector_id)
        self._plugged(out, connector_id, state, plugged, ts)
        if zero_power:
            self._reading(
                out, connector_id, state, ts, power_kw=0.0, energy_kwh=state.session_energy_kwh()
            )

    def _id_token(self, token: str | None) -> str | None:
        return hash_id_token(token, self.id_token_key) if token else None

    # -- OCPP 1.6 --

    def status_16(
        self, connector_id: int, status: str, timestamp: str | None, received_at: datetime
    ) -> Outcome:
        out = Outcome()
        if connector_id == 0:
            return out  # the charge point as a whole
        ts = self._timestamp(timestamp, received_at, out, "StatusNotification")
        plugged = True if status in _PLUGGED_16 else False if status in _UNPLUGGED else None
        self._status(out, connector_id, ts, plugged, zero_power=status not in _POWER_UNKNOWN_16)
        return out

    def start_16(
        self,
        connector_id: int,
        id_tag: str,
        meter_start_wh: int,
        timestamp: str,
        received_at: datetime,
    ) -> tuple[int, Outcome]:
        out = Outcome()
        transaction_id = transaction_id_16(
            self.charge_point_id, connector_id, timestamp, meter_start_wh
        )
        ts = self._timestamp(timestamp, received_at, out, "StartTransaction")
        start_kwh = meter_start_wh / 1000
        state = self.connector(connector_id)
        if state.transaction_id != str(transaction_id):  # not a repeat of the same start
            state = self._open(connector_id, str(transaction_id), start_kwh)
        state.id_token_hash = self._id_token(id_tag)
        self._plugged(out, connector_id, state, True, ts)
        self._event(
            out,
            connector_id,
            state,
            SessionEventType.STARTED,
            ts,
            energy_kwh=0.0,
            import_energy_kwh=start_kwh,
        )
        self._reading(out, connector_id, state, ts, power_kw=0.0, energy_kwh=0.0)
        return transaction_id, out

    def stop_16(
        self,
        transaction_id: int,
        meter_stop_wh: int,
        timestamp: str,
        received_at: datetime,
        *,
        reason: str | None = None,
        id_tag: str | None = None,
        transaction_data: Sequence[Mapping[str, Any]] | None = None,
    ) -> Outcome:
        out = Outcome()
        key = str(transaction_id)
        connector_id = self._connector_of(key)
        if connector_id is None:
            out.rejections.append(
                Rejection(
                    f"StopTransaction of unknown transaction {transaction_id} "
                    "on a charge point with several connectors",
                    "UnknownTransaction",
                )
            )
            return out
        if transaction_data:
            self.meter_values(connector_id, transaction_data, transaction_id=key, outcome=out)
        ts = self._timestamp(timestamp, received_at, out, "StopTransaction")
        state = self.connector(connector_id)
        if state.transaction_id != key:
            # A repeat of a stop already processed, or a transaction we never saw.
            self._open(connector_id, key, None, start_known=False)
        if id_tag and state.id_token_hash is None:
            state.id_token_hash = self._id_token(id_tag)
        stop_kwh = meter_stop_wh / 1000
        energy_kwh = state.session_energy_kwh(stop_kwh)
        self._event(
            out,
            connector_id,
            state,
            SessionEventType.STOPPED,
            ts,
            energy_kwh=energy_kwh,
            import_energy_kwh=stop_kwh,
            stop_reason=reason or "Local",  # 1.6: an absent reason means Local
        )
        self._boundary_reading(out, connector_id, state, ts, energy_kwh)
        self._close(state)
        return out

    # -- OCPP 2.0.1 --

    def status_201(
        self, evse_id: int, connector_status: str, timestamp: str, received_at: datetime
    ) -> Outcome:
        out = Outcome()
        if evse_id == 0:
            return out
        ts = self._timestamp(timestamp, received_at, out, "StatusNotification")
        plugged = (
            True
            if connector_status in _PLUGGED_201
            else False
            if connector_status in _UNPLUGGED
            else None
        )
        in_transaction = self.open_transaction(evse_id) is not None
        # Occupied during a transaction says nothing about the power: meter values will.
        self._status(out, evse_id, ts, plugged, zero_power=not (plugged and in_transaction))
        return out

    def transaction_event_201(
        self,
        event_type: str,
        timestamp: str,
        trigger_reason: str,
        transaction_info: Mapping[str, Any],
        received_at: datetime,
        *,
        evse: Mapping[str, Any] | None = None,
        id_token: Mapping[str, Any] | None = None,
        meter_value: Sequence[Mapping[str, Any]] | None = None,
    ) -> Outcome:
        out = Outcome()
        transaction_id = str(transaction_info["transaction_id"])
        connector_id = int(evse["id"]) if evse else self._connector_of(transaction_id)
        if connector_id is None or connector_id == 0:
            out.rejections.append(
                Rejection(
                    f"TransactionEvent {event_type} of unknown transaction "
                    f"{transaction_id!r} without evse",
                    "UnknownTransaction",
                )
            )
            return out
        ts = self._timestamp(timestamp, received_at, out, "TransactionEvent")
        state = self.connector(connector_id)
        if state.transaction_id != transaction_id:
            state = self._open(
                connector_id, transaction_id, None, start_known=event_type == "Started"
            )
        token = (id_token or {}).get("id_token")
        if token:
            state.id_token_hash = self._id_token(str(token))
        charging_state = transaction_info.get("charging_state")
        plugged = (
            charging_state in _PLUGGED_CHARGING_STATES
            if charging_state is not None
            else _PLUG_TRIGGERS.get(trigger_reason)
        )
        # A cable goes in before a session starts and comes out after it ends.
        if plugged:
            self._plugged(out, connector_id, state, plugged, ts)
        if meter_value:
            self.meter_values(connector_id, meter_value, outcome=out)
        if event_type == "Started":
            self._event(
                out,
                connector_id,
                state,
                SessionEventType.STARTED,
                ts,
                energy_kwh=0.0 if state.start_register_kwh is not None else None,
                import_energy_kwh=state.start_register_kwh,
            )
            self._boundary_reading(out, connector_id, state, ts, state.session_energy_kwh())
        elif event_type == "Ended":
            energy_kwh = state.session_energy_kwh()
            self._event(
                out,
                connector_id,
                state,
                SessionEventType.STOPPED,
                ts,
                energy_kwh=energy_kwh,
                import_energy_kwh=state.last_register_kwh,
                stop_reason=transaction_info.get("stopped_reason") or "Local",
            )
            self._boundary_reading(out, connector_id, state, ts, energy_kwh)
            self._close(state)
        if plugged is False:
            self._plugged(out, connector_id, state, plugged, ts)
        return out


# --- the connections ----------------------------------------------------------------------


@dataclass(frozen=True)
class FrameError:
    """The CALLERROR for a frame the ``ocpp`` package could not unpack."""

    message_id: str | None
    """The frame's id, "-1" when it has none we can read; None: send nothing (the frame
    was a CALLRESULT or CALLERROR, which is never answered)."""
    code: str
    cause: str

    def call_error(self) -> str:
        assert self.message_id is not None
        return str(CallError(self.message_id, self.code, self.cause[:255], {}).to_json())


def frame_error(raw: str | bytes, version: OcppVersion, error: OCPPError) -> FrameError:
    """How to answer a frame that ``ocpp.messages.unpack`` refused with ``error``.

    2.0.1 has codes for exactly this (RpcFrameworkError, MessageTypeNotSupported); 1.6
    has not, and gets the package's (FormatViolation, ProtocolError,
    PropertyConstraintViolation).
    """
    cause = _cause(error)
    try:
        frame = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        frame = None
    readable = (
        isinstance(frame, list)
        and bool(frame)
        and isinstance(frame[0], int)
        and not isinstance(frame[0], bool)
    )
    if not readable:
        return FrameError("-1", "RpcFrameworkError" if version == "2.0.1" else error.code, cause)
    assert isinstance(frame, list)
    if frame[0] in (MessageType.CallResult, MessageType.CallError):
        return FrameError(None, error.code, cause)
    message_id = frame[1] if len(frame) > 1 and isinstance(frame[1], str) else "-1"
    if version == "1.6":
        return FrameError(message_id, error.code, cause)
    unknown_type = (
        isinstance(error, PropertyConstraintViolationError) and frame[0] != MessageType.Call
    )
    return FrameError(
        message_id, "MessageTypeNotSupported" if unknown_type else "RpcFrameworkError", cause
    )


class _FrameLog(logging.LoggerAdapter[logging.Logger]):
    """The ``ocpp`` package logs every frame at INFO, id tokens and all: DEBUG here."""

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)

    def exception(self, msg: object, *args: Any, **kwargs: Any) -> None:
        # The package logs a handler's error with a traceback and the request (its id
        # token too). Ours, InternalError while Kafka is slow or the buffer full, is
        # expected and repeats for every message meanwhile: one line, no request.
        error = sys.exc_info()[1]
        if isinstance(error, InternalError):
            self.warning("answered InternalError: %s", error.description)
            return
        super().exception(msg, *args, **kwargs)


_FRAME_LOG = _FrameLog(logging.getLogger(f"{__name__}.frames"), {})


class _Link:
    """The CSMS end of one charge point's connection (mixed into both versions' classes).

    ``route_message`` is the package's, plus what it leaves out: an answer and a dead
    letter for a frame it cannot unpack, and a dead letter for every CALLERROR.
    """

    csms: OcppConnector
    session: ChargePointSession
    version: OcppVersion
    _frame: str | bytes = ""
    # The package's ChargePoint provides these (annotations only: no shadowing in the MRO).
    id: str
    _connection: ServerConnection
    _response_queue: asyncio.Queue[Any]
    _send: Callable[[str], Awaitable[None]]
    _handle_call: Callable[[Any], Awaitable[Any]]
    start: Callable[[], Awaitable[None]]
    call: Callable[..., Awaitable[Any]]

    async def route_message(self, raw_msg: str | bytes) -> None:
        self.csms.stats.frames_received += 1
        try:
            msg = unpack(raw_msg)
        except RecursionError:  # JSON nested past Python's limit: the package lets it out
            msg = None
            error: OCPPError = FormatViolationError(details={"cause": "JSON nested too deep"})
        except OCPPError as unpack_error:
            msg = None
            error = unpack_error
        if msg is None:
            answer = frame_error(raw_msg, self.version, error)
            if answer.message_id is not None:
                await self._send(answer.call_error())
                self.csms.stats.call_errors_sent += 1
            await self.csms.reject(
                self, raw_msg, f"frame: {answer.code}: {answer.cause}", answer.code
            )
            return
        if msg.message_type_id == MessageType.Call:
            self._frame = raw_msg
            try:
                await self._handle_call(msg)
            except OCPPError as error:
                # What the package raises before a handler runs: an action it does not
                # route (NotSupported, NotImplemented) or a payload failing the schema.
                await self._send(msg.create_call_error(error).to_json())
                self.csms.stats.call_errors_sent += 1
                await self.csms.reject(
                    self, raw_msg, f"{msg.action}: {error.code}: {_cause(error)}", error.code
                )
        else:
            self._response_queue.put_nowait(msg)

    async def deliver(self, action: str, outcome: Outcome) -> None:
        """Hand ``outcome`` to Kafka and wait for the ack (the answer goes after it)."""
        await self.csms.deliver(self, action, outcome, self._frame)


def _cause(error: OCPPError) -> str:
    cause = error.details.get("cause") if isinstance(error.details, dict) else None
    return str(cause or error.description)[:500]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Link16(_Link, ChargePoint16):
    version: OcppVersion = "1.6"

    @on(enums16.Action.boot_notification)
    async def on_boot_notification(
        self, charge_point_vendor: str, charge_point_model: str, **kwargs: Any
    ) -> Any:
        log.info("ocpp %s booted: %s %s (1.6)", self.id, charge_point_vendor, charge_point_model)
        return result16.BootNotification(
            current_time=_now_iso(),
            interval=self.csms.config.heartbeat_interval_s,
            status=enums16.RegistrationStatus.accepted,
        )

    @on(enums16.Action.heartbeat)
    async def on_heartbeat(self) -> Any:
        return result16.Heartbeat(current_time=_now_iso())

    @on(enums16.Action.authorize)
    async def on_authorize(self, id_tag: str) -> Any:
        return result16.Authorize(id_tag_info={"status": enums16.AuthorizationStatus.accepted})

    @on(enums16.Action.status_notification)
    async def on_status_notification(
        self,
        connector_id: int,
        error_code: str,
        status: str,
        timestamp: str | None = None,
        **kwargs: Any,
    ) -> Any:
        await self.deliver(
            "StatusNotification",
            self.session.status_16(connector_id, status, timestamp, datetime.now(UTC)),
        )
        return result16.StatusNotification()

    @on(enums16.Action.start_transaction)
    async def on_start_transaction(
        self, connector_id: int, id_tag: str, meter_start: int, timestamp: str, **kwargs: Any
    ) -> Any:
        transaction_id, outcome = self.session.start_16(
            connector_id, id_tag, meter_start, timestamp, datetime.now(UTC)
        )
        await self.deliver("StartTransaction", outcome)
        return result16.StartTransaction(
            transaction_id=transaction_id,
            id_tag_info={"status": enums16.AuthorizationStatus.accepted},
        )

    @on(enums16.Action.stop_transaction)
    async def on_stop_transaction(
        self,
        meter_stop: int,
        timestamp: str,
        transaction_id: int,
        reason: str | None = None,
        id_tag: str | None = None,
        transaction_data: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Any:
        outcome = self.session.stop_16(
            transaction_id,
            meter_stop,
            timestamp,
            datetime.now(UTC),
            reason=reason,
            id_tag=id_tag,
            transaction_data=transaction_data,
        )
        await self.deliver("StopTransaction", outcome)
        if id_tag:
            return result16.StopTransaction(
                id_tag_info={"status": enums16.AuthorizationStatus.accepted}
            )
        return result16.StopTransaction()

    @on(enums16.Action.meter_values)
    async def on_meter_values(
        self,
        connector_id: int,
        meter_value: list[dict[str, Any]],
        transaction_id: int | None = None,
        **kwargs: Any,
    ) -> Any:
        outcome = self.session.meter_values(
            connector_id,
            meter_value,
            transaction_id=None if transaction_id is None else str(transaction_id),
        )
        await self.deliver("MeterValues", outcome)
        return result16.MeterValues()

    @on(enums16.Action.data_transfer)
    async def on_data_transfer(self, vendor_id: str, **kwargs: Any) -> Any:
        return result16.DataTransfer(status=enums16.DataTransferStatus.unknown_vendor_id)

    @on(enums16.Action.firmware_status_notification)
    async def on_firmware_status_notification(self, **kwargs: Any) -> Any:
        return result16.FirmwareStatusNotification()

    @on(enums16.Action.diagnostics_status_notification)
    async def on_diagnostics_status_notification(self, **kwargs: Any) -> Any:
        return result16.DiagnosticsStatusNotification()


class _Link201(_Link, ChargePoint201):
    version: OcppVersion = "2.0.1"

    @on(enums201.Action.boot_notification)
    async def on_boot_notification(
        self, charging_station: dict[str, Any], reason: str, **kwargs: Any
    ) -> Any:
        log.info(
            "ocpp %s booted: %s %s (2.0.1, %s)",
            self.id,
            charging_station.get("vendor_name"),
            charging_station.get("model"),
            reason,
        )
        return result201.BootNotification(
            current_time=_now_iso(),
            interval=self.csms.config.heartbeat_interval_s,
            status=enums201.RegistrationStatusEnumType.accepted,
        )

    @on(enums201.Action.heartbeat)
    async def on_heartbeat(self, **kwargs: Any) -> Any:
        return result201.Heartbeat(current_time=_now_iso())

    @on(enums201.Action.authorize)
    async def on_authorize(self, id_token: dict[str, Any], **kwargs: Any) -> Any:
        return result201.Authorize(
            id_token_info={"status": enums201.AuthorizationStatusEnumType.accepted}
        )

    @on(enums201.Action.status_notification)
    async def on_status_notification(
        self, timestamp: str, connector_status: str, evse_id: int, connector_id: int, **kwargs: Any
    ) -> Any:
        await self.deliver(
            "StatusNotification",
            self.session.status_201(evse_id, connector_status, timestamp, datetime.now(UTC)),
        )
        return result201.StatusNotification()

    @on(enums201.Action.transaction_event)
    async def on_transaction_event(
        self,
        event_type: str,
        timestamp: str,
        trigger_reason: str,
        seq_no: int,
        transaction_info: dict[str, Any],
        meter_value: list[dict[str, Any]] | None = None,
        evse: dict[str, Any] | None = None,
        id_token: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        outcome = self.session.transaction_event_201(
            event_type,
            timestamp,
            trigger_reason,
            transaction_info,
            datetime.now(UTC),
            evse=evse,
            id_token=id_token,
            meter_value=meter_value,
        )
        await self.deliver("TransactionEvent", outcome)
        if id_token:
            return result201.TransactionEvent(
                id_token_info={"status": enums201.AuthorizationStatusEnumType.accepted}
            )
        return result201.TransactionEvent()

    @on(enums201.Action.meter_values)
    async def on_meter_values(
        self, evse_id: int, meter_value: list[dict[str, Any]], **kwargs: Any
    ) -> Any:
        await self.deliver("MeterValues", self.session.meter_values(evse_id, meter_value))
        return result201.MeterValues()

    @on(enums201.Action.notify_event)
    async def on_notify_event(self, **kwargs: Any) -> Any:
        return result201.NotifyEvent()

    @on(enums201.Action.notify_report)
    async def on_notify_report(self, **kwargs: Any) -> Any:
        return result201.NotifyReport()

    @on(enums201.Action.security_event_notification)
    async def on_security_event_notification(self, **kwargs: Any) -> Any:
        return result201.SecurityEventNotification()

    @on(enums201.Action.firmware_status_notification)
    async def on_firmware_status_notification(self, **kwargs: Any) -> Any:
        return result201.FirmwareStatusNotification()

    @on(enums201.Action.log_status_notification)
    async def on_log_status_notification(self, **kwargs: Any) -> Any:
        return result201.LogStatusNotification()


# --- the connector ------------------------------------------------------------------------


class OcppConnectorError(RuntimeError):
    """A request to a charge point could not be made or answered."""

    def __init__(self, message: str, *, retriable: bool, sent: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.sent = sent
        """The request went out (no answer, or an error answer); False: nothing was sent."""


@dataclass
class OcppStats:
    connections: int = 0
    """WebSocket connections accepted (a reconnect counts again)."""
    connections_refused: int = 0
    """Handshakes refused: unknown id, bad credentials, no OCPP subprotocol."""
    frames_received: int = 0
    call_errors_sent: int = 0
    readings_produced: int = 0
    batches_produced: int = 0
    session_events_produced: int = 0
    dead_lettered: int = 0
    samples_without_power: int = 0
    """Meter values with no power and no way to derive it: no reading."""
    produce_failures: int = 0
    ack_timeouts: int = 0
    """Messages answered InternalError because Kafka had not acked in ack_timeout_s."""
    refused_buffer_full: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class ChargingLimitAnswer:
    """A charge point's answer to :meth:`OcppConnector.set_charging_limit`."""

    charge_point_id: str
    connector_id: int
    status: str
    """As the charge point answered: Accepted, Rejected, NotSupported (1.6), Unknown
    (nothing to clear)."""
    limit_kw: float | None
    """The limit sent, after capping at the charge point's rating; None: cleared. [kW]"""
    charging_rate_unit: Literal["W", "A"] | None = None
    limit: float | None = None
    """The limit in ``charging_rate_unit`` as sent. [W or A]"""

    @property
    def accepted(self) -> bool:
        return self.status == "Accepted"


@dataclass
class _Pending:
    readings: list[tuple[str, EvReading]]
    events: list[ChargingSessionEvent]
    letters: list[DeadLetter]
    done: asyncio.Future[None] | None
    """Resolved once Kafka has it all; None when no answer waits for it."""


class OcppConnector:
    """OCPP charge points -> Kafka ``telemetry``, ``ev-sessions`` (and ``dead-letters``).
    See the module docstring.

    >>> async with OcppConnector(settings, config) as csms:
    ...     await csms.run()  # until cancelled or stop()
    """

    def __init__(
        self,
        settings: Settings,
        config: OcppConfig,
        *,
        control_clock: Callable[[], datetime] | None = None,
    ) -> None:
        """``control_clock``: the time the control path judges commands' expiry by (the
        wall clock by default; a simulation's clock in the demo)."""
        self.settings = settings
        self.config = config
        self._control_clock = control_clock
        self.stats = OcppStats()
        self.sessions: dict[str, ChargePointSession] = {}
        """Per charge point id, kept across its connections."""
        key = config.id_token_hash_key
        self._id_token_key = key.get_secret_value().encode() if key is not None else None
        self._telemetry_topic = settings.topic(topics.TELEMETRY)
        self._sessions_topic = settings.topic(topics.EV_SESSIONS)
        self._dead_letter_topic = settings.topic(topics.DEAD_LETTERS)
        self._links: dict[str, _Link] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._producer: AIOKafkaProducer | None = None
        self._server: Server | None = None
        self._buffer: list[_Pending] = []
        self._buffered_readings = 0
        self._oldest_at: float | None = None
        self._wake = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._running = False
        self._run_done = asyncio.Event()
        self._closed = False
        self.control: OcppCommandConsumer | None = None
        """The command consumer, when the config has ``control`` (after ``start()``)."""
        self._control_task: asyncio.Task[None] | None = None

    # -- lifecycle --

    async def start(self) -> None:
        """Start the Kafka producer and listen for charge points."""
        if self._server is not None:
            return
        if self._closed:
            raise OcppConnectorError("connector is stopped; make a new one", retriable=False)
        self._producer = kafka.producer(self.settings)
        await self._producer.start()
        try:
            self._server = await serve(
                self._serve_connection,
                self.config.host,
                self.config.port,
                subprotocols=[Subprotocol(name) for name in SUBPROTOCOLS],
                select_subprotocol=_select_subprotocol,
                process_request=self._process_request,
                ssl=self.config.ssl_context(),
                ping_interval=self.config.ping_interval_s,
                ping_timeout=self.config.ping_timeout_s,
            )
        except BaseException:
            producer, self._producer = self._producer, None
            await producer.stop()
            raise
        log.info("ocpp CSMS listening on %s", self.url)
        if self.config.control is not None and self.control is None:
            # Imported here: ingest.ocpp_control builds on this module.
            from ingest.ocpp_control import OcppCommandConsumer

            control = (
                OcppCommandConsumer(self, self.config.control)
                if self._control_clock is None
                else OcppCommandConsumer(self, self.config.control, clock=self._control_clock)
            )
            try:
                await control.start()
            except BaseException:
                await self.stop()
                raise
            # Its commands (sent, dry-run...) on the process's /metrics, next to ours.
            metrics.CONNECTORS.connectors["ocpp-control"] = control.stats
            self.control = control

    @property
    def port(self) -> int:
        """The port listened on (the one picked when the config says 0)."""
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """Where charge points connect, up to their id: ``ws://host:port/ocpp``."""
        scheme = "wss" if self.config.tls_certfile is not None else "ws"
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"{scheme}://{host}:{self.port}/ocpp"

    def connected(self, charge_point_id: str) -> bool:
        return charge_point_id in self._links

    async def run(self) -> None:
        """Batch and produce until ``stop()`` (returns) or cancellation (raises)."""
        if self._stop_requested.is_set():
            return
        await self.start()
        loop = asyncio.get_running_loop()
        self._running = True
        self._run_done.clear()
        if self.control is not None and self._control_task is None:
            self._control_task = asyncio.create_task(self.control.run(), name="ocpp-control")
            self._control_task.add_done_callback(_report_control_end)
        try:
            while not self._stop_requested.is_set():
                timeout_s = None
                if self._oldest_at is not None:
                    timeout_s = max(
                        0.0, self._oldest_at + self.config.batch_max_wait_s - loop.time()
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout_s)
                self._wake.clear()
                if self._buffer and (
                    self._buffered_readings >= self.config.batch_max_readings
                    or self._oldest_at is None
                    or loop.time() >= self._oldest_at + self.config.batch_max_wait_s
                ):
                    await self._flush_retrying()
        finally:
            self._running = False
            self._run_done.set()

    async def stop(self) -> None:
        """Close every connection, produce what is buffered (one attempt), stop the producer.

        Safe to call twice. What could not be produced was never answered: the charge
        points send it again (transaction messages) when they reconnect.
        """
        if self._closed:
            return
        self._closed = True
        self._stop_requested.set()
        self._wake.set()
        # Control first, while the connections are up. A command cut short is neither
        # audited nor committed: the next run handles it.
        if self._control_task is not None:
            self._control_task.cancel()
            await asyncio.gather(self._control_task, return_exceptions=True)
        if self.control is not None:
            await self.control.stop()
        server = self._server
        if server is not None:
            server.close(close_connections=True)
        if self._running:
            await self._run_done.wait()
        if self._buffer and self._producer is not None:
            try:
                await self._flush()
            except KafkaError as error:
                log.warning(
                    "ocpp stop: %d messages not produced (%s); not answered",
                    len(self._buffer),
                    error,
                )
        for item in self._buffer:
            if item.done is not None and not item.done.done():
                item.done.set_exception(OcppConnectorError("CSMS stopping", retriable=True))
        self._buffer.clear()
        if server is not None:
            await server.wait_closed()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
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

    # -- the WebSocket side --

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """The handshake's checks: a known (or auto-registered) id, then its password."""
        charge_point_id = charge_point_id_from_path(request.path)
        if charge_point_id is None:
            self.stats.connections_refused += 1
            return connection.respond(HTTPStatus.NOT_FOUND, "No charge point id in the URL path\n")
        if self.config.charge_point(charge_point_id) is None:
            self.stats.connections_refused += 1
            log.warning(
                "ocpp: refused unknown charge point %r (not in charge_points)", charge_point_id
            )
            return connection.respond(HTTPStatus.NOT_FOUND, "Unknown charge point\n")
        password = self.config.password_for(charge_point_id)
        if password is None:
            return None  # require_password = false: security profile 0
        secret = password.get_secret_value().encode()

        def check(username: str, given: str) -> bool:
            # OCPP security profile 1: the user name is the charge point's identity.
            return username == charge_point_id and hmac.compare_digest(
                given.encode(errors="surrogateescape"), secret
            )

        response = await basic_auth(realm=_REALM, check_credentials=check)(connection, request)
        if response is not None:
            self.stats.connections_refused += 1
            log.warning(
                "ocpp: refused charge point %r: %s", charge_point_id, response.reason_phrase
            )
        return response

    async def _serve_connection(self, connection: ServerConnection) -> None:
        charge_point_id = charge_point_id_from_path(
            connection.request.path if connection.request else ""
        )
        assert charge_point_id is not None  # _process_request refused the others
        if connection.subprotocol is None:
            self.stats.connections_refused += 1
            log.warning(
                "ocpp %s: offered no OCPP subprotocol we speak (%s); closing",
                charge_point_id,
                "/".join(SUBPROTOCOLS),
            )
            await connection.close(1002, "no supported OCPP subprotocol")
            return
        version = SUBPROTOCOLS[connection.subprotocol]
        session = self.sessions.get(charge_point_id)
        if session is None:
            config = self.config.charge_point(charge_point_id)
            assert config is not None
            session = self.sessions[charge_point_id] = ChargePointSession(
                charge_point_id, config, id_token_key=self._id_token_key
            )
        session.version = version
        link_class: type[_Link16] | type[_Link201] = _Link16 if version == "1.6" else _Link201
        link = link_class(charge_point_id, connection, self.config.response_timeout_s, _FRAME_LOG)
        link.csms = self
        link.session = session
        previous = self._links.get(charge_point_id)
        if previous is not None:
            # A charge point has one connection; the old one is half-open (its network
            # dropped without a close): the new one wins.
            task = asyncio.create_task(
                previous._connection.close(1000, "replaced by a new connection")
            )
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._links[charge_point_id] = link
        self.stats.connections += 1
        log.info(
            "ocpp %s connected (OCPP %s, %s)", charge_point_id, version, connection.remote_address
        )
        try:
            await link.start()
        except ConnectionClosed as closed:
            log.info("ocpp %s disconnected: %s", charge_point_id, closed)
        finally:
            if self._links.get(charge_point_id) is link:
                del self._links[charge_point_id]

    # -- requests to charge points --

    async def set_charging_limit(
        self,
        charge_point_id: str,
        limit_kw: float | None,
        *,
        connector_id: int = 1,
        charging_rate_unit: Literal["W", "A"] | None = None,
    ) -> ChargingLimitAnswer:
        """Limit the open transaction on a connector to ``limit_kw`` (None: clear our limit).

        Sends a TxProfile SetChargingProfile (a Relative schedule of one period, so it
        holds from now to the transaction's end whatever the charger's clock says), or a
        ClearChargingProfile of that profile, and returns the charge point's answer. The
        limit is capped at the charge point's ``max_power_kw``; in ``A`` it is per phase
        over ``phases`` at ``voltage_v``. Raises :class:`OcppConnectorError` when the
        charge point is not connected, has no open transaction there (a TxProfile needs
        one), answers a CALLERROR or does not answer in ``response_timeout_s``.
        """
        link = self._links.get(charge_point_id)
        if link is None:
            raise OcppConnectorError(
                f"charge point {charge_point_id!r} is not connected", retriable=True
            )
        session = link.session
        profile_id = _PROFILE_ID_BASE + connector_id
        if limit_kw is None:
            request = (
                call16.ClearChargingProfile(id=profile_id)
                if link.version == "1.6"
                else call201.ClearChargingProfile(charging_profile_id=profile_id)
            )
            answer = await self._request(link, request)
            return ChargingLimitAnswer(charge_point_id, connector_id, str(answer.status), None)
        if not math.isfinite(limit_kw) or limit_kw < 0:
            raise ValueError(f"limit_kw must be a finite number >= 0, got {limit_kw!r}")
        transaction_id = session.open_transaction(connector_id)
        if transaction_id is None:
            raise OcppConnectorError(
                f"charge point {charge_point_id!r} connector {connector_id}: no open transaction "
                "(a TxProfile applies to one)",
                retriable=True,
            )
        cp = session.config
        capped_kw = min(limit_kw, cp.max_power_kw)
        unit = charging_rate_unit or cp.charging_rate_unit
        # OCPP limits have one decimal (1.6's schema: multipleOf 0.1).
        limit = round(
            capped_kw * 1000 if unit == "W" else capped_kw * 1000 / (cp.voltage_v * cp.phases), 1
        )
        phases = cp.phases if unit == "A" else None
        if link.version == "1.6":
            request = call16.SetChargingProfile(
                connector_id=connector_id,
                cs_charging_profiles=types16.ChargingProfile(
                    charging_profile_id=profile_id,
                    transaction_id=int(transaction_id),
                    stack_level=_PROFILE_STACK_LEVEL,
                    charging_profile_purpose=enums16.ChargingProfilePurposeType.tx_profile,
                    charging_profile_kind=enums16.ChargingProfileKindType.relative,
                    charging_schedule=types16.ChargingSchedule(
                        charging_rate_unit=enums16.ChargingRateUnitType(unit),
                        charging_schedule_period=[
                            types16.ChargingSchedulePeriod(
                                start_period=0, limit=limit, number_phases=phases
                            )
                        ],
                    ),
                ),
            )
        else:
            request = call201.SetChargingProfile(
                evse_id=connector_id,
                charging_profile=types201.ChargingProfileType(
                    id=profile_id,
                    stack_level=_PROFILE_STACK_LEVEL,
                    charging_profile_purpose=enums201.ChargingProfilePurposeEnumType.tx_profile,
                    charging_profile_kind=enums201.ChargingProfileKindEnumType.relative,
                    transaction_id=transaction_id,
                    charging_schedule=[
                        types201.ChargingScheduleType(
                            id=profile_id,
                            charging_rate_unit=enums201.ChargingRateUnitEnumType(unit),
                            charging_schedule_period=[
                                types201.ChargingSchedulePeriodType(
                                    start_period=0, limit=limit, number_phases=phases
                                )
                            ],
                        )
                    ],
                ),
            )
        answer = await self._request(link, request)
        return ChargingLimitAnswer(
            charge_point_id, connector_id, str(answer.status), capped_kw, unit, limit
        )

    async def _request(self, link: _Link, request: Any) -> Any:
        action = type(request).__name__
        try:
            return await link.call(request, suppress=False)
        except OCPPError as error:
            raise OcppConnectorError(
                f"charge point {link.id!r} answered {action} with {error.code}: {_cause(error)}",
                retriable=False,
                sent=True,
            ) from None
        except TimeoutError:
            raise OcppConnectorError(
                f"charge point {link.id!r} did not answer {action} "
                f"in {self.config.response_timeout_s:g} s",
                retriable=True,
                sent=True,
            ) from None
        except ConnectionClosed:
            raise OcppConnectorError(
                f"charge point {link.id!r} disconnected during {action}",
                retriable=True,
                sent=True,
            ) from None

    # -- batching and producing --

    async def reject(self, link: _Link, raw: str | bytes, reason: str, error_type: str) -> None:
        """Dead-letter a frame that got a CALLERROR; nothing waits for its produce."""
        log.warning("ocpp %s: %s; frame %r (dead-lettered)", link.id, reason, _excerpt(raw))
        self._enqueue([], [], [self._letter(link.id, raw, reason, error_type)], None)

    async def deliver(self, link: _Link, action: str, outcome: Outcome, raw: str | bytes) -> None:
        """Buffer what a message became and wait until Kafka has it (or fail, so the
        handler answers InternalError and the charge point retries)."""
        self.stats.samples_without_power += outcome.samples_without_power
        if not outcome:
            return
        letters = []
        for rejection in outcome.rejections:
            reason = f"{action}: {rejection.reason}"
            log.warning("ocpp %s: %s; frame %r (dead-lettered)", link.id, reason, _excerpt(raw))
            letters.append(self._letter(link.id, raw, reason, rejection.error_type))
        if self._closed:
            raise InternalError(description="CSMS stopping; retry later")
        if self._buffered_readings + len(outcome.readings) > self.config.max_buffered_readings:
            self.stats.refused_buffer_full += 1
            raise InternalError(
                description="telemetry buffer full (Kafka unavailable); retry later"
            )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(outcome.readings, outcome.events, letters, done)
        try:
            await asyncio.wait_for(asyncio.shield(done), self.config.ack_timeout_s)
        except TimeoutError:
            self.stats.ack_timeouts += 1
            raise InternalError(description="telemetry not stored in time; retry later") from None
        except OcppConnectorError as error:
            raise InternalError(description=str(error)) from None

    def _letter(
        self, charge_point_id: str, raw: str | bytes, reason: str, error_type: str
    ) -> DeadLetter:
        return dead_letter(
            raw=raw,
            reason=reason,
            error_type=error_type,
            component=COMPONENT,
            source_topic=f"ocpp:{charge_point_id}",
            key=charge_point_id,
        )

    def _enqueue(
        self,
        readings: list[tuple[str, EvReading]],
        events: list[ChargingSessionEvent],
        letters: list[DeadLetter],
        done: asyncio.Future[None] | None,
    ) -> None:
        if not self._buffer:
            self._oldest_at = asyncio.get_running_loop().time()
        self._buffer.append(_Pending(readings, events, letters, done))
        self._buffered_readings += len(readings)
        self._wake.set()

    async def _flush_retrying(self) -> None:
        backoff = Backoff(0.5, self.config.produce_retry_max_s)
        while True:
            try:
                await self._flush()
                return
            except KafkaError as error:
                self.stats.produce_failures += 1
                self.stats.last_error = f"kafka: {error!r}"
                delay_s = backoff.next_delay_s()
                log.warning(
                    "ocpp: producing %d messages failed (%r); retrying in %.1f s, none answered",
                    len(self._buffer),
                    error,
                    delay_s,
                )
            # Wait, but give way at once to stop(): it makes its own last attempt.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay_s)
            if self._stop_requested.is_set():
                return

    async def _flush(self) -> None:
        """Produce the buffer's batches, events and dead letters; then release its answers."""
        if not self._buffer:
            return
        assert self._producer is not None
        pending = list(self._buffer)
        by_site: dict[str, list[Reading]] = defaultdict(list)
        for item in pending:
            for site, reading in item.readings:
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
        events = 0
        letters = 0
        for item in pending:
            for event in item.events:
                futures.append(
                    await self._producer.send(
                        self._sessions_topic, codec.encode(event), key=event.site.encode()
                    )
                )
                events += 1
            for letter in item.letters:
                futures.append(
                    await self._producer.send(
                        self._dead_letter_topic,
                        codec.encode(letter),
                        key=letter.source_topic.encode(),
                    )
                )
                letters += 1
        await asyncio.gather(*futures)
        # Kafka has everything: now, and only now, the charge points get their answers.
        del self._buffer[: len(pending)]
        self._buffered_readings -= sum(len(item.readings) for item in pending)
        self._oldest_at = asyncio.get_running_loop().time() if self._buffer else None
        readings_count = sum(len(r) for r in by_site.values())
        self.stats.batches_produced += batches
        self.stats.readings_produced += readings_count
        self.stats.session_events_produced += events
        self.stats.dead_lettered += letters
        for item in pending:
            if item.done is not None and not item.done.done():
                item.done.set_result(None)
        log.debug(
            "ocpp flush messages=%d readings=%d batches=%d events=%d dead_letters=%d",
            len(pending),
            readings_count,
            batches,
            events,
            letters,
        )


def _report_control_end(task: asyncio.Task[None]) -> None:
    # The charge points' telemetry goes on without the control path; say so loudly.
    if not task.cancelled() and task.exception() is not None:
        log.error("ocpp control stopped: %r; commands are no longer applied", task.exception())


def _select_subprotocol(connection: ServerConnection, subprotocols: Any) -> Subprotocol | None:
    """Our preferred OCPP version among those offered; None (then a close) if none."""
    for name in SUBPROTOCOLS:
        if name in subprotocols:
            return Subprotocol(name)
    return None


def _excerpt(raw: str | bytes) -> str | bytes:
    return raw[:_EXCERPT_CHARS]


__all__ = [
    "COMPONENT",
    "MEASURAND_MAP",
    "SUBPROTOCOLS",
    "ChargePointConfig",
    "ChargePointSession",
    "ChargingLimitAnswer",
    "ConnectorState",
    "FrameError",
    "OcppConfig",
    "OcppConnector",
    "OcppConnectorError",
    "OcppControlConfig",
    "OcppStats",
    "Outcome",
    "Rejection",
    "Sample",
    "charge_point_id_from_path",
    "frame_error",
    "hash_id_token",
    "parse_meter_value",
    "transaction_id_16",
]
