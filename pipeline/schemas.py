"""Every message wattstream puts on Kafka, as pydantic v2 models.

Contract (see docs/nomenclature.md for every quantity):

* JSON on the wire, one ``schema_version`` per message; a consumer rejects a
  version it does not know (dead letter) instead of guessing.
* Timestamps are timezone-aware and normalised to UTC; a naive timestamp is
  rejected because its instant is ambiguous.
* Units are in field names (``power_kw``, ``soc_pct``, ``price_per_kwh``).
  Money amounts are in the message's ``currency`` (ISO 4217).
* Floats must be finite JSON numbers: NaN, infinities, booleans and numeric strings
  are rejected, so a broken sensor value never reaches a decision or InfluxDB.
* A field keeps one type forever (InfluxDB rejects a field whose type changes),
  so quantities that could ever be fractional are floats from the start.

Sign conventions: battery ``power_kw`` is positive when discharging; meter
``power_kw`` is positive when importing from the grid; solar, home and
generator power are >= 0; EV ``power_kw`` is positive when charging the car
(negative is vehicle-to-grid).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta, timezone
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeAlias

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic_core import TzInfo

SCHEMA_VERSION: Literal[1] = 1


def _to_utc(value: datetime) -> datetime:
    # A fixed zero offset (how pydantic parses "Z" and "+00:00") is kept as it is: a
    # conversion per reading costs more than the rest of its timestamp's validation. A
    # zone (zoneinfo) is converted even at offset 0: its arithmetic is wall-clock time.
    if type(value.tzinfo) in _FIXED_OFFSETS and value.utcoffset() == _ZERO:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00+01:00 or 9999-12-31T23:59-01:00: no such instant in UTC. A
        # ValueError becomes a ValidationError; an OverflowError would escape the decoder.
        raise ValueError(f"{value.isoformat()} is out of range in UTC") from None


_ZERO = timedelta(0)
_FIXED_OFFSETS = (TzInfo, timezone)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A timezone-aware instant, normalised to UTC; naive datetimes are rejected."""

Real = Annotated[float, Strict()]
"""A finite number from a JSON number: true/false and numeric strings are not numbers.

Pydantic's lax mode would read ``true`` as 1.0 and ``"1.5"`` as 1.5; a sensor that
sends either is broken, and its reading is dead-lettered rather than guessed at.
"""

Percent = Annotated[Real, Field(ge=0.0, le=100.0)]
NonNegative = Annotated[Real, Field(ge=0.0)]
Identifier = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$")]
"""Site, device and market ids: they become Kafka keys and InfluxDB tags."""


def stable_id(prefix: str, *parts: object) -> str:
    """A deterministic id: the same inputs give the same id on every run.

    Replays and restarts therefore write the same InfluxDB points and send no
    duplicate webhook. 20 hex chars (80 bits) keep collisions negligible for
    any realistic number of decisions.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return f"{prefix}-{digest[:20]}"


class Message(BaseModel):
    """Base of every wire message: frozen, strict about unknown fields, finite floats."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    schema_version: Literal[1] = SCHEMA_VERSION


class Kind(StrEnum):
    BATTERY = "battery"
    SOLAR = "solar"
    METER = "meter"
    HOME = "home"
    GENERATOR = "generator"
    EV = "ev"
    FUSION = "fusion"


# --- readings -----------------------------------------------------------------


class _Reading(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    device: Identifier
    ts: UtcDatetime


class BatteryReading(_Reading):
    kind: Literal["battery"] = "battery"
    power_kw: Real
    """Positive discharging, negative charging. [kW]"""
    soc_pct: Percent
    """State of charge. [%]"""
    voltage_v: Real | None = None
    temperature_c: Real | None = None


class SolarReading(_Reading):
    kind: Literal["solar"] = "solar"
    power_kw: NonNegative
    """AC generation. [kW]"""
    irradiance_w_m2: NonNegative | None = None
    """Plane-of-array irradiance. [W/m2]"""
    temp_air_c: Real | None = None
    temp_module_c: Real | None = None


class MeterReading(_Reading):
    kind: Literal["meter"] = "meter"
    power_kw: Real
    """Grid connection point: positive import, negative export. [kW]"""
    import_energy_kwh: NonNegative | None = None
    """Cumulative imported energy register. [kWh]"""
    export_energy_kwh: NonNegative | None = None
    voltage_v: Real | None = None
    frequency_hz: Real | None = None


class HomeReading(_Reading):
    kind: Literal["home"] = "home"
    power_kw: NonNegative
    """Household consumption. [kW]"""


class GeneratorReading(_Reading):
    kind: Literal["generator"] = "generator"
    power_kw: NonNegative
    running: bool
    fuel_pct: Percent | None = None


class EvReading(_Reading):
    kind: Literal["ev"] = "ev"
    power_kw: Real
    """Positive charging the vehicle, negative vehicle-to-grid. [kW]"""
    soc_pct: Percent | None = None
    plugged_in: bool
    energy_kwh: NonNegative | None = None
    """Energy delivered in the current session. [kWh]"""


class FusionReading(_Reading):
    kind: Literal["fusion"] = "fusion"
    plasma_temp_kev: NonNegative
    confinement_stability: Annotated[Real, Field(ge=0.0, le=1.0)]
    """1 = fully stable magnetic confinement, 0 = lost. [-]"""
    q_factor: NonNegative
    """Fusion gain: fusion power out over heating power in. [-]"""
    magnetic_field_t: NonNegative | None = None


Reading: TypeAlias = Annotated[
    BatteryReading
    | SolarReading
    | MeterReading
    | HomeReading
    | GeneratorReading
    | EvReading
    | FusionReading,
    Field(discriminator="kind"),
]
READING_ADAPTER: TypeAdapter[Reading] = TypeAdapter(Reading)

READING_MODELS: dict[str, type[_Reading]] = {
    "battery": BatteryReading,
    "solar": SolarReading,
    "meter": MeterReading,
    "home": HomeReading,
    "generator": GeneratorReading,
    "ev": EvReading,
    "fusion": FusionReading,
}


class TelemetryBatch(Message):
    """Many readings of one site (a poll cycle, an MQTT burst, a replay chunk).

    Kafka key: ``site``. Batching is what makes a worker fast: Faust's cost is
    per message, not per reading.
    """

    batch_id: Identifier
    site: Identifier
    source: str = Field(min_length=1, max_length=200)
    """The connector that produced the batch, e.g. ``replay:telemetry.parquet``."""
    readings: list[Reading] = Field(min_length=1)


# --- market and grid ---------------------------------------------------------------


class PriceKind(StrEnum):
    DAY_AHEAD = "day_ahead"
    SPOT = "spot"
    INTRADAY = "intraday"
    IMBALANCE = "imbalance"
    TOU = "tou"


class PriceTick(Message):
    """The price of one delivery interval of one market. Kafka key: ``market``.

    Negative prices are valid (they happen when renewables flood the grid).
    """

    market: Identifier
    start: UtcDatetime
    end: UtcDatetime
    price_per_kwh: Real
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    price_kind: PriceKind = PriceKind.DAY_AHEAD
    published_at: UtcDatetime | None = None
    """When the price became known; strategies must not see it earlier."""

    @model_validator(mode="after")
    def _interval_is_positive(self) -> PriceTick:
        if self.end <= self.start:
            raise ValueError(
                f"end {self.end.isoformat()} must be after start {self.start.isoformat()}"
            )
        return self


class CarbonIntensity(Message):
    """Average grid carbon intensity of one interval of one zone. Kafka key: ``zone``."""

    zone: Identifier
    start: UtcDatetime
    end: UtcDatetime
    co2_g_per_kwh: NonNegative
    renewable_share_pct: Percent | None = None
    source: str = "unknown"


# --- decisions and their consequences -------------------------------------------------


class Action(StrEnum):
    CHARGE = "CHARGE"
    DISCHARGE = "DISCHARGE"
    HOLD = "HOLD"


class Decision(Message):
    """What a strategy decided for one battery for one price interval. Kafka key: ``site``."""

    decision_id: str
    site: Identifier
    device: Identifier
    strategy: str
    action: Action
    power_kw: Real
    """Setpoint: positive discharge, negative charge, 0 for HOLD. [kW]"""
    grid_energy_kwh: Real
    """Energy at the grid side over the interval: positive sold, negative bought. [kWh]"""
    price_per_kwh: Real
    currency: str = "EUR"
    expected_revenue: Real
    """grid_energy_kwh x price_per_kwh, in ``currency``; negative is a cost."""
    soc_pct: Percent
    """Measured state of charge the decision was based on. [%]"""
    expected_soc_pct: Percent
    """State of charge at the end of the interval if the setpoint is followed. [%]"""
    decided_at: UtcDatetime
    """Event time of the reading the decision was based on."""
    valid_from: UtcDatetime
    valid_until: UtcDatetime
    reason: str
    binding: list[str] = Field(default_factory=list)
    """Constraints that limited the decision, e.g. ``max_charge_kw``, ``soc_max_pct``."""


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class AlertStatus(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


class Alert(Message):
    """Kafka key: ``site``. One ``alert_id`` per incident: start and resolve share it."""

    alert_id: str
    site: Identifier
    device: Identifier | None = None
    alert_type: str
    """What was detected, e.g. ``device_offline``, ``scram``, ``vampire_load``."""
    severity: Severity
    status: AlertStatus = AlertStatus.FIRING
    subject: str
    message: str
    start: UtcDatetime
    end: UtcDatetime | None = None
    observed: Real | None = None
    expected: Real | None = None
    details: dict[str, float | str | bool] = Field(default_factory=dict)


class SourceFlow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    source: str
    """``solar``, ``battery``, ``grid``, ``generator``."""
    power_kw: NonNegative


class Allocation(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    consumer: str
    priority: int
    requested_kw: NonNegative
    allocated_kw: NonNegative
    sources: list[SourceFlow] = Field(default_factory=list)


class AllocationPlan(Message):
    """Who gets which energy in one interval at one site. Kafka key: ``site``."""

    plan_id: str
    site: Identifier
    start: UtcDatetime
    end: UtcDatetime
    sources: list[SourceFlow]
    allocations: list[Allocation]
    currency: str = "EUR"
    grid_cost: Real
    export_revenue: Real
    net_cost: Real
    baseline_net_cost: Real
    """Net cost of the same interval with no optimisation."""
    saving: Real


class EmissionsRecord(Message):
    """Scope 2 emissions of one site for one hour. Kafka key: ``site``."""

    record_id: str
    site: Identifier
    start: UtcDatetime
    end: UtcDatetime
    grid_energy_kwh: NonNegative
    solar_energy_kwh: NonNegative
    battery_energy_kwh: NonNegative
    grid_co2_g_per_kwh: NonNegative
    location_based_kg_co2: NonNegative
    market_based_kg_co2: NonNegative
    clean_share_pct: Percent


class CertificateAction(StrEnum):
    MINT = "MINT"
    BURN = "BURN"
    EXPIRE = "EXPIRE"


class CertificateEvent(Message):
    """One event of the guarantee-of-origin ledger. Kafka key: ``site``."""

    event_id: str
    certificate_id: str
    action: CertificateAction
    site: Identifier
    device: Identifier | None = None
    hour_start: UtcDatetime
    energy_mwh: NonNegative = 1.0
    claimed_by: str | None = None
    at: UtcDatetime


class Command(Message):
    """An instruction to a device. Kafka key: ``site``.

    Dry-run unless the control path is explicitly enabled; bounded by the
    device's limits before it is sent.
    """

    command_id: str
    site: Identifier
    device: Identifier
    action: str
    """``set_power``, ``shed``, ``restore``, ``scram``, ``start_job``, ``stop_job``."""
    setpoint_kw: Real | None = None
    reason: str
    issued_at: UtcDatetime
    valid_until: UtcDatetime | None = None
    dry_run: bool = True
    source_id: str | None = None
    """The decision or alert that caused the command."""


_RAW_MAX_BYTES = 900_000
"""Longest a dead letter's ``raw`` may be, JSON-encoded. [bytes]"""


class DeadLetter(Message):
    """A record that could not be used, with why. Kafka key: the source topic.

    ``raw`` holds the original bytes (decoded as UTF-8 with ``backslashreplace``
    so any input survives a JSON round trip), so nothing is lost and the record
    can be repaired and re-sent.
    """

    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    key: str | None = None
    raw: str
    reason: str
    error_type: str
    component: str
    """The part of wattstream that rejected it, e.g. ``processors.arbitrage``."""
    received_at: UtcDatetime

    @field_validator("raw")
    @classmethod
    def _bounded(cls, value: str) -> str:
        # A dead letter must itself fit in a Kafka message (1 MB default). The bound is on
        # the encoded bytes, not the characters: a quote or a control character is 2 or 6
        # bytes in JSON, so 900,000 of them would be a 1.8 or 5.4 MB letter.
        value = value[:_RAW_MAX_BYTES]
        size = len(orjson.dumps(value))
        while size > _RAW_MAX_BYTES:
            value = value[: len(value) * _RAW_MAX_BYTES // size]
            size = len(orjson.dumps(value))
        return value


def dead_letter(
    *,
    raw: bytes | str | None,
    reason: str,
    error_type: str,
    component: str,
    source_topic: str,
    key: bytes | str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    now: datetime | None = None,
) -> DeadLetter:
    """Build a DeadLetter from whatever was received, never failing itself."""

    def text(value: bytes | str) -> str:
        return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value

    return DeadLetter(
        source_topic=source_topic,
        source_partition=partition,
        source_offset=offset,
        key=None if key is None else text(key),
        raw="" if raw is None else text(raw),  # None: a Kafka tombstone's value
        reason=reason[:2000],
        error_type=error_type,
        component=component,
        received_at=now or datetime.now(UTC),
    )


# --- EV charging sessions (OCPP) -----------------------------------------------------------


class SessionEventType(StrEnum):
    PLUGGED_IN = "plugged_in"
    STARTED = "started"
    STOPPED = "stopped"
    UNPLUGGED = "unplugged"


class ChargingSessionEvent(Message):
    """One event of an EV charging session at an OCPP charge point. Kafka key: ``site``.

    ``event_id`` is derived from the charge point, connector, transaction, event type
    and instant (``stable_id``), so a message the charge point sends again (OCPP
    retries transaction messages) gives the same event, not a second one.
    """

    event_id: str
    site: Identifier
    device: Identifier
    charge_point_id: str = Field(min_length=1, max_length=48)
    """The charge point's OCPP identity (the last segment of its WebSocket URL)."""
    connector_id: int = Field(ge=0)
    """OCPP 1.6 ``connectorId``; OCPP 2.0.1 ``evse.id``."""
    transaction_id: str | None = None
    """OCPP 1.6: the integer the central system assigned; 2.0.1: the charge point's id."""
    event_type: SessionEventType
    ocpp_version: Literal["1.6", "2.0.1"]
    id_token_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    """Pseudonym of the id token (RFID UID, contract id): the first 16 hex digits of
    its HMAC-SHA256 under the CSMS's ``id_token_hash_key``, or of its SHA-256 without
    one. The token itself is personal data and is never stored."""
    energy_kwh: NonNegative | None = None
    """Energy delivered in the session up to the event; at ``stopped``, the session's
    total. None when the session's start register is unknown. [kWh]"""
    import_energy_kwh: NonNegative | None = None
    """The charge point's energy register at the event, if known. [kWh]"""
    stop_reason: str | None = None
    """``stopped`` only: OCPP's reason, e.g. ``EVDisconnected``, ``Local``, ``Remote``."""
    ts: UtcDatetime


ALL_MESSAGES: tuple[type[Message], ...] = (
    TelemetryBatch,
    PriceTick,
    CarbonIntensity,
    Decision,
    Alert,
    AllocationPlan,
    EmissionsRecord,
    CertificateEvent,
    Command,
    DeadLetter,
    ChargingSessionEvent,
)


class PatentOffice(StrEnum):
    USPTO = "USPTO"
    EPO = "EPO"
    WIPO = "WIPO"


class Patent(Message):
    """A patent publication (a grant or a published application) as its office
    published it. Kafka key: ``patent_id``.

    ``patent_id`` is the DOCDB-style ``COUNTRY-NUMBER-KIND`` (``US-11289658-B2``,
    ``EP-3712345-A1``, ``WO-2021123456-A1``): the same document has the same id
    whichever office's format it came in. Classes are written without spaces
    (``G21B1/05``), as CPC and IPC symbols are compared.
    """

    patent_id: Identifier
    office: PatentOffice
    """Whose format the record came in (a WO document may come from the EPO too)."""
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
    doc_number: Annotated[str, Field(min_length=1, max_length=40)]
    kind: Annotated[str, Field(pattern=r"^[A-Z][0-9A-Z]?$")]
    """Kind code: B1/B2 a US grant, A1 an application with search report..."""
    title: Annotated[str, Field(min_length=1)]
    abstract: str = ""
    claims: list[str] = Field(default_factory=list)
    """The claims' texts, in order (full-text formats only; OPS bibliographic data has none)."""
    cpc: list[str] = Field(default_factory=list)
    ipc: list[str] = Field(default_factory=list)
    applicants: list[str] = Field(default_factory=list)
    inventors: list[str] = Field(default_factory=list)
    publication_date: date
    filing_date: date | None = None
    priority_date: date | None = None
    citations: list[str] = Field(default_factory=list)
    """Patent documents cited (``COUNTRY-NUMBER[-KIND]`` as the record gives them)."""
    non_patent_citations: Annotated[int, Field(ge=0)] = 0
    """Citations of papers and other literature: a sign of engagement with the science."""
    language: str | None = None
    source: Annotated[str, Field(min_length=1)]
    """The file or URL the record was read from."""


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every message, by model name, for consumers in other languages."""
    return {model.__name__: model.model_json_schema(mode="serialization") for model in ALL_MESSAGES}
