"""Poll SunSpec devices over Modbus TCP and produce their readings to Kafka.

Each configured device is discovered once per connection: the ``SunS`` marker is
looked for at 40000, then 0, then 50000 (or only at ``base_address`` when set), and
the model chain is walked (``ID``, ``L``, skip ``L`` registers) up to the end marker
``0xFFFF``. Supported models are then read and decoded by :mod:`ingest.sunspec`
(definitions from the SunSpec JSON files shipped by pysunspec2):

* common model 1 (logged at discovery: manufacturer, model, serial);
* inverters 101-103 (integer + scale factor) and 111-113 (float32);
* meters 201-204; storage 124; battery 802.

Points become our readings through ``FIELD_MAP`` below (units and signs in its
comments). Every device has its own task and schedule, so a slow or dead device
never delays another. Readings are grouped per site into ``TelemetryBatch``
messages (key: site) at most ``batch_max_wait_s`` after the first one waits.

Failures:

* A device that does not answer (connection refused, timeout, closed socket, busy)
  is a failed poll. After ``offline_after_failures`` consecutive failures it is
  offline: a ``device_offline`` ``Alert`` (severity warning) goes to the alerts topic,
  and it is retried with capped exponential backoff plus jitter
  (``reconnect_min_s`` .. ``reconnect_max_s``). When it answers again a ``resolved``
  alert with the same ``alert_id`` (derived from site, device and outage start) is sent.
* A Modbus exception "illegal address" (or "illegal function") for a model is a
  configuration or device-map problem that no retry fixes: it is logged and
  dead-lettered once, that model is dropped from the device's polls, and the device
  is not reported offline. A device with no SunSpec map at all is dead-lettered once
  and rediscovered every ``reconnect_max_s`` (a firmware update may add one).
* A block that does not decode (bad length, id mismatch) is dead-lettered with a raw
  excerpt; the device's other models and the other devices go on.

Example output message (key ``turin-home``)::

    {"schema_version": 1, "batch_id": "bat-5c2e...", "site": "turin-home",
     "source": "modbus:wattstream-modbus",
     "readings": [{"device": "pv-1", "ts": "2026-11-23T11:00:00.125000Z",
                   "kind": "solar", "power_kw": 1.5},
                  {"device": "grid", "ts": "2026-11-23T11:00:00.131000Z",
                   "kind": "meter", "power_kw": -1.2, "import_energy_kwh": 1000.0,
                   "export_energy_kwh": 500.0, "voltage_v": 230.0,
                   "frequency_hz": 50.0}]}

Delivery guarantee: at most once per poll, at least once per produced batch.
A reading exists only in memory between the poll and Kafka's ack; a crash in
that window loses that poll (the next one replaces it, as polled values are
state, not events). Produce failures are retried with backoff and the batch keeps
its id, so a duplicate is harmless downstream. Alerts are produced at least once
with deterministic ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from ingest import sunspec
from ingest.batching import site_batches
from ingest.config import TomlConfig, check_unique_devices
from ingest.running import gather_until_stopped
from pipeline import codec, kafka, metrics, topics
from pipeline.backoff import Backoff
from pipeline.schemas import (
    READING_MODELS,
    Alert,
    AlertStatus,
    Identifier,
    Reading,
    Severity,
    dead_letter,
    stable_id,
)
from pipeline.settings import Settings

log = logging.getLogger(__name__)

COMPONENT = "ingest.modbus"

INVERTER_MODELS = (101, 102, 103, 111, 112, 113)
METER_MODELS = (201, 202, 203, 204)
STORAGE_MODELS = (124, 802)
SUPPORTED_MODELS = frozenset((1, *INVERTER_MODELS, *METER_MODELS, *STORAGE_MODELS))

# Modbus exception codes that say the request can never succeed as asked.
_ILLEGAL_FUNCTION = 1
_ILLEGAL_ADDRESS = 2
_PERMANENT_EXCEPTIONS = frozenset({_ILLEGAL_FUNCTION, _ILLEGAL_ADDRESS})
# A Modbus read returns at most 125 registers (the PDU is 253 bytes).
_MAX_READ_REGISTERS = 125
_EXCERPT_REGISTERS = 16


@dataclass(frozen=True)
class FieldRule:
    """``reading[field] = point * scale``; the first rule giving a value wins a field."""

    kind: Literal["solar", "battery", "meter"]
    models: tuple[int, ...]
    point: str
    field: str
    scale: float = 1.0


# SunSpec point [unit] -> our field [unit]. Order matters: for one field, earlier rules
# win when they have a value (not None).
FIELD_MAP: tuple[FieldRule, ...] = (
    # --- solar: PV inverter ---
    # Inverter W [W], AC output -> power_kw [kW] (/1000). Clamped at >= 0 (an
    # inverter draws a few W at night; our solar power is generation only).
    FieldRule("solar", INVERTER_MODELS, "W", "power_kw", 0.001),
    # --- meter: grid connection point ---
    # Meter W [W] -> power_kw [kW] (/1000). SunSpec meter models follow the load
    # (consumer) reference: W is positive when real power flows from the grid into
    # the site, i.e. importing, which is also our convention, so the sign is kept.
    # The model JSON itself states no sign: a meter installed the other way round
    # (some vendors' feed-in meters) is configured with `invert_power = true`.
    FieldRule("meter", METER_MODELS, "W", "power_kw", 0.001),
    # TotWhImp / TotWhExp [Wh] accumulators -> import/export_energy_kwh [kWh] (/1000).
    FieldRule("meter", METER_MODELS, "TotWhImp", "import_energy_kwh", 0.001),
    FieldRule("meter", METER_MODELS, "TotWhExp", "export_energy_kwh", 0.001),
    # PhV [V] average line-to-neutral voltage -> voltage_v [V]; phase A when absent.
    FieldRule("meter", METER_MODELS, "PhV", "voltage_v"),
    FieldRule("meter", METER_MODELS, "PhVphA", "voltage_v"),
    # Hz [Hz] -> frequency_hz [Hz].
    FieldRule("meter", METER_MODELS, "Hz", "frequency_hz"),
    # --- battery ---
    # 802 SoC [% of WHRtg] -> soc_pct [%]; 124 ChaState [% of AhrRtg] when no 802.
    FieldRule("battery", (802,), "SoC", "soc_pct"),
    FieldRule("battery", (124,), "ChaState", "soc_pct"),
    # Power: the battery inverter's AC W [W] -> power_kw [kW] (/1000). An inverter's W
    # is positive when it outputs power, i.e. the battery discharges: our convention.
    # Model 802 W [W] (DC) is the fallback; its JSON states no sign, and we read it
    # with the same "positive = out of the battery" convention (`invert_power` flips).
    FieldRule("battery", INVERTER_MODELS, "W", "power_kw", 0.001),
    FieldRule("battery", (802,), "W", "power_kw", 0.001),
    # 802 V [V] external battery voltage -> voltage_v [V]; 124 InBatV [V] otherwise.
    FieldRule("battery", (802,), "V", "voltage_v"),
    FieldRule("battery", (124,), "InBatV", "voltage_v"),
)

# The models a device of each kind needs read on every poll.
_POLLED_MODELS: dict[str, frozenset[int]] = {
    kind: frozenset(m for rule in FIELD_MAP if rule.kind == kind for m in rule.models)
    for kind in ("solar", "battery", "meter")
}


def map_reading(
    kind: Literal["solar", "battery", "meter"],
    device: str,
    ts: datetime,
    models: dict[int, dict[str, sunspec.Value]],
    invert_power: bool = False,
) -> Reading:
    """One of our readings from decoded models (pure). Raises ValueError (pydantic's
    ValidationError included) when a required field has no value."""
    fields: dict[str, Any] = {}
    for rule in FIELD_MAP:
        if rule.kind != kind or rule.field in fields:
            continue
        for model_id in rule.models:
            value = models.get(model_id, {}).get(rule.point)
            if isinstance(value, int | float):
                fields[rule.field] = value * rule.scale
                break
    if "power_kw" in fields:
        if invert_power:
            fields["power_kw"] = -fields["power_kw"]
        if kind == "solar":
            fields["power_kw"] = max(0.0, fields["power_kw"])
    model = READING_MODELS[kind]
    reading: Reading = model.model_validate(  # type: ignore[assignment]
        {"device": device, "ts": ts, "kind": kind, **fields}
    )
    return reading


# --- configuration ------------------------------------------------------------------


class ModbusDevice(BaseModel):
    """One SunSpec device behind a Modbus TCP address and unit id."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65_535)
    unit_id: int = Field(default=1, ge=0, le=255)
    """Modbus unit id (pymodbus ``device_id=``); 1 for most TCP devices."""
    site: Identifier
    device: Identifier
    """Our device id: the reading's ``device``."""
    kind: Literal["solar", "battery", "meter"]
    poll_interval_s: float = Field(default=5.0, gt=0, le=3600)
    """Time between poll starts. [s]"""
    base_address: int | None = Field(default=None, ge=0, le=65_534)
    """Where ``SunS`` is; None tries 40000, 0 and 50000 in that order."""
    invert_power: bool = False
    """Flip the sign of power_kw, for a device that reports the opposite convention."""


class ModbusConfig(TomlConfig):
    """Settings of one Modbus connector; validated at construction, no network calls.

    >>> ModbusConfig(devices=[{"host": "10.0.0.5", "site": "turin-home",
    ...                        "device": "pv-1", "kind": "solar"}])
    """

    toml_table: ClassVar[str | None] = "modbus"

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(default="wattstream-modbus", min_length=1, max_length=100)
    """Names the connector in the batches' ``source`` (``modbus:<name>``)."""
    devices: tuple[ModbusDevice, ...] = Field(min_length=1)
    request_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """One Modbus request; a healthy device on a LAN answers in milliseconds. [s]"""
    offline_after_failures: int = Field(default=2, ge=1, le=100)
    """Consecutive failed polls before a device-offline alert: 2 rides out one lost
    packet without paging anyone. [polls]"""
    reconnect_min_s: float = Field(default=1.0, gt=0)
    """First retry delay of an offline device. [s]"""
    reconnect_max_s: float = Field(default=60.0, gt=0)
    """Retry backoff ceiling (Telegraf max_reconnect_interval). [s]"""
    batch_max_wait_s: float = Field(default=0.5, gt=0, le=60)
    """Longest a reading waits in memory before it is produced. [s]"""
    produce_retry_max_s: float = Field(default=30.0, gt=0)
    """Backoff ceiling between attempts to produce while Kafka fails. [s]"""

    @model_validator(mode="after")
    def _consistent(self) -> ModbusConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        check_unique_devices(self.devices)
        return self

    @property
    def source(self) -> str:
        return f"modbus:{self.name}"


# --- errors -------------------------------------------------------------------------


class DeviceUnreachable(Exception):
    """No answer, a closed connection or a busy device: retrying can succeed."""

    retriable = True


class ModbusRequestError(Exception):
    """A Modbus exception response that no retry fixes (illegal address/function)."""

    retriable = False

    def __init__(self, address: int, count: int, code: int) -> None:
        super().__init__(f"Modbus exception {code} reading {count} registers at {address}")
        self.address = address
        self.code = code


# --- the connector ------------------------------------------------------------------


@dataclass
class ModbusStats:
    polls_ok: int = 0
    polls_failed: int = 0
    registers_read: int = 0
    readings_produced: int = 0
    batches_produced: int = 0
    alerts_sent: int = 0
    dead_lettered: int = 0
    devices_offline: int = 0
    last_error: str | None = None


@dataclass
class _DeviceState:
    config: ModbusDevice
    client: AsyncModbusTcpClient | None = None
    models: list[sunspec.ModelHeader] | None = None
    consecutive_failures: int = 0
    first_failure_at: datetime | None = None
    outage_start: datetime | None = None
    alert_id: str | None = None
    dead_lettered: set[str] = field(default_factory=set)
    rediscover_at: float = 0.0
    """Loop time before which a device without a usable SunSpec map is left alone."""
    polls: int = 0


class ModbusConnector:
    """Polls every configured device on its own schedule; ``async with`` works.

    ``start()`` connects the Kafka producer; ``run()`` polls until ``stop()``.
    """

    def __init__(
        self,
        settings: Settings,
        config: ModbusConfig,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.config = config
        self.stats = ModbusStats()
        self._clock = clock
        self._devices = [_DeviceState(d) for d in config.devices]
        self._producer: AIOKafkaProducer | None = None
        self._pending: dict[str, list[Reading]] = defaultdict(list)
        self._pending_event = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Jitter only spreads retries out; it needs no cryptographic quality.
        self._random = random.Random()  # noqa: S311
        self._telemetry_topic = settings.topic(topics.TELEMETRY)
        self._alerts_topic = settings.topic(topics.ALERTS)
        self._dead_letter_topic = settings.topic(topics.DEAD_LETTERS)

    def device_state(self, site: str, device: str) -> _DeviceState:
        return next(s for s in self._devices if (s.config.site, s.config.device) == (site, device))

    # -- lifecycle --

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._stop_requested.clear()
        producer = kafka.producer(self.settings)
        await producer.start()
        self._producer = producer

    async def run(self) -> None:
        """Poll until ``stop()``; each device in its own task."""
        if self._producer is None:
            await self.start()
        self._tasks = [
            asyncio.create_task(self._poll_device(state), name=f"modbus-{state.config.device}")
            for state in self._devices
        ]
        self._tasks.append(asyncio.create_task(self._flusher(), name="modbus-flusher"))
        await gather_until_stopped(self._tasks, self._stop_requested)

    async def stop(self) -> None:
        """Stop polling, produce what is pending, close connections; safe to call twice."""
        self._stop_requested.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for state in self._devices:
            self._disconnect(state)
        producer = self._producer
        if producer is None:
            return
        with contextlib.suppress(KafkaError):
            await self._flush()
        self._producer = None
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

    # -- per-device polling --

    async def _poll_device(self, state: _DeviceState) -> None:
        loop = asyncio.get_running_loop()
        interval_s = state.config.poll_interval_s
        next_at = loop.time()
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s, self._random)
        poll_seconds = metrics.DEVICE_POLL_SECONDS.labels("modbus")
        while not self._stop_requested.is_set():
            with poll_seconds.time():
                ok = await self._poll_once(state)
            if ok or state.outage_start is None:
                backoff.reset()
                # Fixed rate: the schedule does not drift by the poll's own duration;
                # a poll that overran skips the slots it missed instead of bursting.
                next_at += interval_s
                if next_at < loop.time():
                    next_at = loop.time() + interval_s
                delay_s = next_at - loop.time()
            else:
                # Offline: capped exponential backoff with jitter, so many devices
                # that dropped together do not retry in lockstep.
                delay_s = backoff.next_delay_s()
                next_at = loop.time() + delay_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), max(delay_s, 0.0))

    async def _poll_once(self, state: _DeviceState) -> bool:
        """One poll; True when the device answered (whatever it answered)."""
        device = state.config
        loop = asyncio.get_running_loop()
        if state.models is None and loop.time() < state.rediscover_at:
            return True  # no usable map last time: not worth asking every poll
        try:
            if state.client is None or not state.client.connected:
                await self._connect(state)
            if state.models is None:
                state.models = await self._discover(state)
            decoded: dict[int, dict[str, sunspec.Value]] = {}
            for header in list(state.models):
                if header.model_id not in _POLLED_MODELS[device.kind]:
                    continue
                try:
                    registers = await self._read(state, header.address, header.length + 2)
                except ModbusRequestError as error:
                    self._reject(state, f"model {header.model_id}", str(error), [], "illegal")
                    state.models.remove(header)
                    continue
                try:
                    decoded[header.model_id] = sunspec.decode_model(header.model_id, registers)
                except sunspec.SunSpecError as error:
                    self._reject(state, f"model {header.model_id}", str(error), registers, "decode")
        except DeviceUnreachable as error:
            self._disconnect(state)
            state.models = None  # the device may come back with another map (firmware)
            await self._failed(state, error)
            return False
        except (ModbusRequestError, sunspec.SunSpecError) as error:
            # No usable SunSpec map: a configuration (or firmware) problem, not an
            # outage. Look again every reconnect_max_s: a firmware update may add one.
            error_type = "illegal" if isinstance(error, ModbusRequestError) else "chain"
            self._reject(state, "discovery", str(error), [], error_type)
            state.models = None
            state.rediscover_at = loop.time() + self.config.reconnect_max_s
            await self._answered(state)
            return True
        await self._answered(state)
        if not decoded:
            return True
        try:
            reading = map_reading(
                device.kind, device.device, self._now(), decoded, device.invert_power
            )
        except (ValidationError, ValueError) as error:
            excerpt = {m: {k: v for k, v in d.items() if v is not None} for m, d in decoded.items()}
            self._reject(state, "mapping", str(error)[:500], [], "mapping", str(excerpt))
            return True
        self._pending[device.site].append(reading)
        self._pending_event.set()
        return True

    async def _connect(self, state: _DeviceState) -> None:
        self._disconnect(state)
        device = state.config
        # Our own backoff and offline logic decide when to retry: pymodbus' automatic
        # reconnect (reconnect_delay=0 disables it) and request retries would hide an
        # outage from us and delay other requests on this connection.
        client = AsyncModbusTcpClient(
            device.host,
            port=device.port,
            timeout=self.config.request_timeout_s,
            retries=0,
            reconnect_delay=0,
        )
        state.client = client
        try:
            connected = await asyncio.wait_for(client.connect(), self.config.request_timeout_s)
        except (TimeoutError, OSError, ModbusException) as error:
            raise DeviceUnreachable(f"connect {device.host}:{device.port}: {error!r}") from error
        if not connected:
            raise DeviceUnreachable(f"connect {device.host}:{device.port} failed")

    def _disconnect(self, state: _DeviceState) -> None:
        client, state.client = state.client, None
        if client is not None:
            client.close()

    async def _read(self, state: _DeviceState, address: int, count: int) -> list[int]:
        """Holding registers ``address .. address+count-1``, in reads of <= 125."""
        assert state.client is not None
        words: list[int] = []
        while count > 0:
            chunk = min(count, _MAX_READ_REGISTERS)
            try:
                response = await state.client.read_holding_registers(
                    address, count=chunk, device_id=state.config.unit_id
                )
            except (ModbusException, OSError, TimeoutError) as error:
                raise DeviceUnreachable(f"read {chunk} at {address}: {error!r}") from error
            if response.isError():
                code = getattr(response, "exception_code", 0)
                if code in _PERMANENT_EXCEPTIONS:
                    raise ModbusRequestError(address, chunk, code)
                # Busy, gateway errors: the device (or its gateway) may answer next time.
                raise DeviceUnreachable(f"Modbus exception {code} reading {chunk} at {address}")
            if len(response.registers) != chunk:
                raise DeviceUnreachable(
                    f"asked {chunk} registers at {address}, got {len(response.registers)}"
                )
            words.extend(response.registers)
            self.stats.registers_read += chunk
            address += chunk
            count -= chunk
        return words

    async def _discover(self, state: _DeviceState) -> list[sunspec.ModelHeader]:
        device = state.config
        bases = (
            (device.base_address,) if device.base_address is not None else sunspec.BASE_ADDRESSES
        )
        last: ModbusRequestError | sunspec.SunSpecError | None = None
        for base in bases:
            try:
                marker = await self._read(state, base, 2)
            except ModbusRequestError as error:
                last = error
                continue
            if tuple(marker) != sunspec.SUNS_MARKER:
                last = sunspec.SunSpecError(f"no SunS marker at {base}: {marker}")
                continue
            headers: list[sunspec.ModelHeader] = []
            address = base + 2
            while True:
                model_id, length = await self._read(state, address, 2)
                header = sunspec.next_header(address, model_id, length, len(headers))
                if header is None:
                    break
                headers.append(header)
                address = header.end
            if common := next((h for h in headers if h.model_id == 1), None):
                block = await self._read(state, common.address, common.length + 2)
                info = sunspec.decode_model(1, block)
                log.info(
                    "modbus %s/%s: SunSpec at %d, %s %s serial %s, models %s",
                    device.site,
                    device.device,
                    base,
                    info.get("Mn"),
                    info.get("Md"),
                    info.get("SN"),
                    [h.model_id for h in headers],
                )
            if not any(h.model_id in _POLLED_MODELS[device.kind] for h in headers):
                raise sunspec.SunSpecError(
                    f"no model for a {device.kind} among {[h.model_id for h in headers]}; "
                    f"expected one of {sorted(_POLLED_MODELS[device.kind])}"
                )
            return [h for h in headers if h.model_id in SUPPORTED_MODELS]
        assert last is not None
        raise last

    # -- outcomes --

    async def _answered(self, state: _DeviceState) -> None:
        self.stats.polls_ok += 1
        state.polls += 1
        state.consecutive_failures = 0
        if state.outage_start is None:
            return
        device = state.config
        start, state.outage_start = state.outage_start, None
        alert_id, state.alert_id = state.alert_id, None
        self.stats.devices_offline -= 1
        now = self._now()
        log.info("modbus %s/%s answers again (offline since %s)", device.site, device.device, start)
        await self._send_alert(
            Alert(
                alert_id=alert_id or _alert_id(device, start),
                site=device.site,
                device=device.device,
                alert_type="device_offline",
                severity=Severity.WARNING,
                status=AlertStatus.RESOLVED,
                subject=f"{device.device} is back online",
                message=f"Modbus device {device.host}:{device.port} unit {device.unit_id} "
                f"answers again after {(now - start).total_seconds():.0f} s",
                start=start,
                end=now,
            )
        )

    async def _failed(self, state: _DeviceState, error: Exception) -> None:
        device = state.config
        self.stats.polls_failed += 1
        self.stats.last_error = f"{device.site}/{device.device}: {error}"
        state.consecutive_failures += 1
        if state.consecutive_failures == 1:
            state.first_failure_at = self._now()
        if state.outage_start is not None:
            log.debug("modbus %s/%s still offline: %s", device.site, device.device, error)
            return
        if state.consecutive_failures < self.config.offline_after_failures:
            log.info("modbus %s/%s poll failed: %s", device.site, device.device, error)
            return
        # The outage starts at the first failed poll, which fixes the alert's id.
        start = state.first_failure_at or self._now()
        state.outage_start = start
        state.alert_id = _alert_id(device, start)
        self.stats.devices_offline += 1
        log.warning("modbus %s/%s offline: %s", device.site, device.device, error)
        await self._send_alert(
            Alert(
                alert_id=state.alert_id,
                site=device.site,
                device=device.device,
                alert_type="device_offline",
                severity=Severity.WARNING,
                subject=f"{device.device} is offline",
                message=f"Modbus device {device.host}:{device.port} unit {device.unit_id} "
                f"did not answer {state.consecutive_failures} polls: {error}",
                start=start,
                details={"host": device.host, "port": device.port, "unit_id": device.unit_id},
            )
        )

    def _reject(
        self,
        state: _DeviceState,
        what: str,
        reason: str,
        registers: Sequence[int],
        error_type: str,
        raw: str | None = None,
    ) -> None:
        """Log and dead-letter a problem once per device and cause (it repeats every poll)."""
        device = state.config
        key = f"{what}:{error_type}"
        if key in state.dead_lettered:
            return
        state.dead_lettered.add(key)
        excerpt = raw if raw is not None else str(list(registers[:_EXCERPT_REGISTERS]))
        log.warning(
            "modbus %s/%s %s: %s; registers %s (dead-lettered)",
            device.site,
            device.device,
            what,
            reason,
            excerpt,
        )
        letter = dead_letter(
            raw=excerpt,
            reason=f"{device.site}/{device.device} {what}: {reason}",
            error_type=error_type,
            component=COMPONENT,
            source_topic=f"modbus://{device.host}:{device.port}/{device.unit_id}",
            key=device.device,
            now=self._now(),
        )
        self.stats.dead_lettered += 1
        if self._producer is not None:
            task = asyncio.create_task(self._send(self._dead_letter_topic, letter, device.site))
            task.add_done_callback(_log_failure)

    async def _send_alert(self, alert: Alert) -> None:
        await self._send(self._alerts_topic, alert, alert.site)
        self.stats.alerts_sent += 1

    async def _send(self, topic: str, message: Any, key: str) -> None:
        """Produce one message, retrying with backoff while Kafka fails (until stop)."""
        delay_s = 0.5
        while True:
            producer = self._producer
            if producer is None:
                return
            try:
                await (await producer.send(topic, codec.encode(message), key=key.encode()))
                return
            except KafkaError as error:
                self.stats.last_error = f"kafka: {error!r}"
                log.warning("modbus: producing to %s failed (%r); retrying", topic, error)
            if self._stop_requested.is_set():
                return
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, self.config.produce_retry_max_s)

    # -- batching --

    async def _flusher(self) -> None:
        while not self._stop_requested.is_set():
            await self._pending_event.wait()
            # Wait a little so readings of the same site polled together share a batch.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), self.config.batch_max_wait_s)
            self._pending_event.clear()
            await self._flush_retrying()

    async def _flush_retrying(self) -> None:
        delay_s = 0.5
        while self._pending:
            try:
                await self._flush()
                return
            except KafkaError as error:
                self.stats.last_error = f"kafka: {error!r}"
                log.warning("modbus: producing batches failed (%r); retrying", error)
            if self._stop_requested.is_set():
                return
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, self.config.produce_retry_max_s)

    async def _flush(self) -> None:
        if not self._pending or self._producer is None:
            return
        pending = {site: list(readings) for site, readings in self._pending.items()}
        futures = []
        for batch in site_batches(self.config.source, pending):
            futures.append(
                await self._producer.send(
                    self._telemetry_topic, codec.encode(batch), key=batch.site.encode()
                )
            )
        await asyncio.gather(*futures)
        for site, readings in pending.items():
            # Readings added while we awaited Kafka stay for the next flush.
            del self._pending[site][: len(readings)]
            if not self._pending[site]:
                del self._pending[site]
            self.stats.batches_produced += 1
            self.stats.readings_produced += len(readings)

    def _now(self) -> datetime:
        return self._clock()


def _alert_id(device: ModbusDevice, outage_start: datetime) -> str:
    return stable_id(
        "alert", "device_offline", device.site, device.device, outage_start.isoformat()
    )


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("modbus: dead letter not produced: %r", error)


__all__ = [
    "FIELD_MAP",
    "DeviceUnreachable",
    "FieldRule",
    "ModbusConfig",
    "ModbusConnector",
    "ModbusDevice",
    "ModbusRequestError",
    "ModbusStats",
    "map_reading",
]
