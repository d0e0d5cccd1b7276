"""Simulated EV charge points: real OCPP clients (1.6 and 2.0.1) with cars that charge.

A fleet is ``charge_points`` charge points, half speaking OCPP 1.6-J and half 2.0.1
(``protocol = "mixed"``, the default; or all one version), each a real ``ocpp``
package client over WebSocket at ``<url>/<id>`` (ids ``<id_prefix>001``, ...), with
HTTP Basic authentication when ``password`` is set (user = the charge point id), as a
charger configured for security profile 1 would.

Time is simulated, paced ``speed`` times faster than the wall clock, in steps of
``interval_s``. Each charge point boots (BootNotification, StatusNotification
Available), then serves vehicles one after the other. A vehicle arrives after a gap
(``gap_s`` x 0.5-1.5) with a state of charge of 15-60 %, a battery of 40-85 kWh, an
on-board charger of 7.4, 11 or 22 kW and a departure time (``dwell_s`` x 0.8-1.2 later);
at arrival the charge point reports the plug-in and starts a transaction with an RFID
tag (1.6: StatusNotification Preparing, StartTransaction, StatusNotification Charging;
2.0.1: StatusNotification Occupied, TransactionEvent Started with the Transaction.Begin
register). Every step while plugged in it reports the power it draws (W), its energy
register (Wh) and the car's SoC (%) (1.6: MeterValues; 2.0.1: TransactionEvent
Updated), and at departure it stops the transaction with the final register and reason
EVDisconnected, then reports Available.

The power is min(car's charger, ``charger_max_kw``, the charging profile's limit), 0 once
the car reaches its target SoC (80-100 %). Both versions accept SetChargingProfile
(TxProfile on the connector's transaction, TxDefaultProfile, ChargePointMaxProfile on
connector 0; limits in W or A, A being per phase at ``voltage_v`` over the period's
number of phases, 3 by default) and ClearChargingProfile (by id or criteria), which
restores the default: a limit holds from the next step on. TxProfiles end with their
transaction.

Like a real charger, a charge point that loses its connection reconnects (with backoff)
without booting again and sends what it could not send meanwhile, in order, when it is
back: its open transaction goes on. What each charge point reported is kept
(``reports``, ``transactions``) so tests can compare it with what reached Kafka.

Example (1.6, a 3-phase 16 A limit in A): ``[2,"...","MeterValues",{"connectorId":1,
"transactionId":1290394,"meterValue":[{"timestamp":"2026-06-21T18:01:00+00:00",
"sampledValue":[{"value":"11040.0","measurand":"Power.Active.Import","unit":"W"},
{"value":"1284022","measurand":"Energy.Active.Import.Register","unit":"Wh"},
{"value":"43.1","measurand":"SoC","unit":"Percent","location":"EV"}]}]}]``
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import ssl
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from ocpp.exceptions import InternalError
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v16 import enums as enums16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from ocpp.v201 import enums as enums201
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, model_validator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.headers import build_authorization_basic
from websockets.typing import Subprotocol

from pipeline.backoff import Backoff

log = logging.getLogger(__name__)

Version = Literal["1.6", "2.0.1"]
_SUBPROTOCOL: dict[str, Subprotocol] = {
    "1.6": Subprotocol("ocpp1.6"),
    "2.0.1": Subprotocol("ocpp2.0.1"),
}
# HTTP statuses that no retry can fix: wrong password, unknown charge point.
_FATAL_STATUSES = frozenset({401, 403, 404})
# A charging profile period's default phase count (OCPP: 3 when absent).
_DEFAULT_PHASES = 3
_CONNECTOR = 1
# How long a stopped charge point may take to finish the message it is sending.
_STOP_GRACE_S = 2.0


class OcppSimulatorConfig(BaseModel):
    """A fleet of simulated charge points; checked with no network calls."""

    # Errors must not echo what was given: it holds the password.
    model_config = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False, hide_input_in_errors=True
    )

    url: str = "ws://127.0.0.1:9000/ocpp"
    """The CSMS's URL; each charge point appends ``/<its id>``."""
    charge_points: int = Field(default=2, ge=1, le=10_000)
    protocol: Literal["mixed", "1.6", "2.0.1"] = "mixed"
    """"mixed": the first half 1.6, the rest 2.0.1."""
    id_prefix: str = Field(default="SIM-CP-", pattern=r"^[A-Za-z0-9._\-]{0,40}$")
    password: SecretStr | None = None
    """HTTP Basic password of every simulated charge point (security profile 1)."""
    tls_cafile: Path | None = None
    """For wss:// (security profile 2): the CA (or self-signed certificate) that
    verifies the CSMS; None: the system's."""
    interval_s: float = Field(default=60.0, gt=0)
    """Simulated time between two meter value reports of a charge point. [s]"""
    speed: float = Field(default=60.0, gt=0, le=1_000_000)
    """Simulated seconds per wall-clock second. [-]"""
    start: AwareDatetime | None = None
    """First simulated instant; None is now."""
    duration_s: float | None = Field(default=None, gt=0)
    """Simulated time to cover; None runs until ``vehicles`` are served or stopped. [s]"""
    vehicles: int | None = Field(default=None, ge=1)
    """Vehicles each charge point serves before it stops; None: no limit."""
    gap_s: float = Field(default=1800.0, ge=0)
    """Mean idle time before each vehicle arrives. [s]"""
    dwell_s: float = Field(default=4 * 3600.0, gt=0)
    """Mean time a vehicle stays plugged in. [s]"""
    charger_max_kw: float = Field(default=11.0, gt=0)
    """The charge point's rating (3-phase 16 A). [kW]"""
    voltage_v: float = Field(default=230.0, gt=0)
    """Phase-to-neutral voltage, to turn a limit in A into power. [V]"""
    seed: int = 0
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    response_timeout_s: float = Field(default=30.0, gt=0)
    """How long a charge point waits for the CSMS's answer before sending again. [s]"""
    retry_interval_s: float = Field(default=5.0, gt=0)
    """Wall-clock wait before resending a message the CSMS answered InternalError. [s]"""
    connect_timeout_s: float | None = Field(default=None, gt=0)
    """Give up on a CSMS that has not accepted the first connection within this (wall
    clock); None keeps trying, as a charger does. [s]"""

    @model_validator(mode="after")
    def _consistent(self) -> OcppSimulatorConfig:
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"url {self.url!r} must be ws://host[:port]/path or wss://...")
        if parts.username or parts.password:
            raise ValueError("url must not hold credentials: use password")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.tls_cafile is not None and parts.scheme != "wss":
            raise ValueError("tls_cafile needs a wss:// url")
        self.ssl_context()
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("wss://"):
            return None
        try:
            return ssl.create_default_context(cafile=self.tls_cafile)
        except (ssl.SSLError, OSError) as error:
            raise ValueError(f"tls_cafile: cannot load {str(self.tls_cafile)!r}: {error}") from None

    def charge_point_ids(self) -> list[str]:
        width = max(3, len(str(self.charge_points)))
        return [f"{self.id_prefix}{i:0{width}d}" for i in range(1, self.charge_points + 1)]

    def version_of(self, index: int) -> Version:
        """The protocol of the charge point at ``index`` (0-based)."""
        if self.protocol != "mixed":
            return self.protocol
        return "1.6" if index < self.charge_points // 2 else "2.0.1"


@dataclass(frozen=True)
class Vehicle:
    arrival: datetime
    departure: datetime
    arrival_soc_pct: float
    target_soc_pct: float
    capacity_kwh: float
    max_power_kw: float
    """The car's on-board charger. [kW]"""
    id_tag: str
    """Its driver's RFID card: a 4-byte UID in hex."""


def make_vehicle(
    charge_point_id: str, index: int, after: datetime, config: OcppSimulatorConfig
) -> Vehicle:
    """The ``index``-th vehicle of a charge point, arriving after ``after``: seeded, so a
    run is reproducible."""
    rng = random.Random(f"{config.seed}/{charge_point_id}/{index}")  # noqa: S311 - simulation
    arrival = after + timedelta(seconds=config.gap_s * rng.uniform(0.5, 1.5))
    return Vehicle(
        arrival=arrival,
        departure=arrival + timedelta(seconds=config.dwell_s * rng.uniform(0.8, 1.2)),
        arrival_soc_pct=round(rng.uniform(15.0, 60.0), 1),
        target_soc_pct=round(rng.uniform(80.0, 100.0), 1),
        capacity_kwh=round(rng.uniform(40.0, 85.0), 1),
        max_power_kw=rng.choice((7.4, 11.0, 22.0)),
        id_tag=f"{rng.getrandbits(32):08X}",
    )


@dataclass(frozen=True)
class Profile:
    """An installed charging profile, reduced to what decides the power."""

    profile_id: int
    connector_id: int
    purpose: str
    stack_level: int
    kind: str
    unit: str
    periods: tuple[tuple[float, float, int], ...]
    """(start_period_s, limit, number_phases), by start."""
    start_schedule: datetime | None = None
    duration_s: float | None = None
    transaction_id: str | None = None

    def limit_w(
        self, now: datetime, transaction_start: datetime | None, voltage_v: float
    ) -> float | None:
        """The limit in force at ``now``, in W; None outside the schedule."""
        origin = self.start_schedule if self.kind != "Relative" else transaction_start
        if origin is None:
            origin = now
        elapsed_s = (now - origin).total_seconds()
        if elapsed_s < 0 or (self.duration_s is not None and elapsed_s >= self.duration_s):
            return None
        current = None
        for start_s, limit, phases in self.periods:
            if start_s <= elapsed_s:
                current = (limit, phases)
        if current is None:
            return None
        limit, phases = current
        return limit if self.unit == "W" else limit * voltage_v * phases


def parse_profile(connector_id: int, profile: Mapping[str, Any]) -> Profile:
    """A profile from SetChargingProfile's snake_case payload (1.6 or 2.0.1); raises
    ValueError (KeyError) for one we cannot follow."""
    schedule = profile["charging_schedule"]
    if isinstance(schedule, list):  # 2.0.1: a list of schedules; we follow the first
        schedule = schedule[0]
    periods = tuple(
        sorted(
            (
                float(p["start_period"]),
                float(p["limit"]),  # 1.6 limits arrive as Decimal
                int(p.get("number_phases") or _DEFAULT_PHASES),
            )
            for p in schedule["charging_schedule_period"]
        )
    )
    unit = str(schedule["charging_rate_unit"])
    if unit not in ("W", "A"):
        raise ValueError(f"charging rate unit {unit!r}")
    start = schedule.get("start_schedule")
    transaction_id = profile.get("transaction_id")
    return Profile(
        profile_id=int(profile.get("charging_profile_id", profile.get("id"))),
        connector_id=connector_id,
        purpose=str(profile["charging_profile_purpose"]),
        stack_level=int(profile["stack_level"]),
        kind=str(profile["charging_profile_kind"]),
        unit=unit,
        periods=periods,
        start_schedule=datetime.fromisoformat(start) if start else None,
        duration_s=float(schedule["duration"]) if schedule.get("duration") else None,
        transaction_id=None if transaction_id is None else str(transaction_id),
    )


@dataclass(frozen=True)
class Report:
    """One meter value report, as sent."""

    ts: datetime
    transaction_id: str
    power_w: float
    register_wh: int
    soc_pct: float


@dataclass
class TransactionRecord:
    transaction_id: str
    id_tag: str
    start: datetime
    meter_start_wh: int
    stop: datetime | None = None
    meter_stop_wh: int | None = None


class ChargePointRefused(ConnectionError):
    """The CSMS refused the handshake (wrong password, unknown id): retrying cannot help."""

    def __init__(self, charge_point_id: str, status: int) -> None:
        super().__init__(
            f"charge point {charge_point_id}: the CSMS refused the connection (HTTP {status})"
        )
        self.status = status


class SimulatedChargePoint:
    """One charge point with one connector, its cars, and its connection to the CSMS."""

    def __init__(self, charge_point_id: str, version: Version, config: OcppSimulatorConfig) -> None:
        self.id = charge_point_id
        self.version = version
        self.config = config
        rng = random.Random(f"{config.seed}/{charge_point_id}/meter")  # noqa: S311 - simulation
        self.register_wh = rng.randrange(1_000_000, 5_000_000)
        """The energy meter: a charger is rarely new. [Wh]"""
        self.profiles: dict[int, Profile] = {}
        self.reports: list[Report] = []
        self.transactions: list[TransactionRecord] = []
        self.connects = 0
        self.messages_sent = 0
        self.vehicle: Vehicle | None = None
        self.soc_pct = 0.0
        self.power_w = 0.0
        self._transaction: TransactionRecord | None = None
        self._link: Any = None
        self._connected = asyncio.Event()
        self._fatal: BaseException | None = None
        self._fatal_event = asyncio.Event()
        self._hold_until = 0.0
        self._stopping = False
        self._connection_task: asyncio.Task[None] | None = None
        self._ssl = config.ssl_context()

    # -- connection --

    async def connect(self) -> None:
        """Connect (retrying in the background) and wait for the first connection; raises
        ChargePointRefused when the CSMS refuses us, ConnectionError when it does not
        answer within ``connect_timeout_s``."""
        if self._connection_task is None:
            self._connection_task = asyncio.create_task(
                self._stay_connected(), name=f"ocpp-sim-{self.id}"
            )
        try:
            await asyncio.wait_for(self._wait_connected(), self.config.connect_timeout_s)
        except TimeoutError:
            raise ConnectionError(
                f"charge point {self.id}: no connection to {self.config.url} "
                f"within {self.config.connect_timeout_s} s"
            ) from None

    async def _wait_connected(self) -> None:
        if self._connected.is_set():
            return
        waiters = {
            asyncio.ensure_future(self._connected.wait()),
            asyncio.ensure_future(self._fatal_event.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._fatal is not None and not self._connected.is_set():
            raise self._fatal

    async def _stay_connected(self) -> None:
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        loop = asyncio.get_running_loop()
        headers = {}
        if self.config.password is not None:
            headers["Authorization"] = build_authorization_basic(
                self.id, self.config.password.get_secret_value()
            )
        while not self._stopping:
            delay_s = self._hold_until - loop.time()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            try:
                connection = await connect(
                    f"{self.config.url.rstrip('/')}/{self.id}",
                    subprotocols=[_SUBPROTOCOL[self.version]],
                    additional_headers=headers,
                    ssl=self._ssl,
                    open_timeout=10,
                )
            except InvalidStatus as error:
                status = error.response.status_code
                if status in _FATAL_STATUSES:
                    self._fail(ChargePointRefused(self.id, status))
                    return
                log.warning("ocpp sim %s: handshake refused (HTTP %d); retrying", self.id, status)
                await asyncio.sleep(backoff.next_delay_s())
                continue
            except ssl.SSLCertVerificationError as error:
                self._fail(
                    ConnectionError(f"charge point {self.id}: the CSMS's certificate: {error}")
                )
                return
            except (OSError, TimeoutError, InvalidHandshake) as error:
                log.info("ocpp sim %s: cannot connect (%s); retrying", self.id, error)
                await asyncio.sleep(backoff.next_delay_s())
                continue
            if connection.subprotocol != _SUBPROTOCOL[self.version]:
                await connection.close()
                self._fail(
                    ConnectionError(
                        f"charge point {self.id}: the CSMS does not speak OCPP {self.version}"
                    )
                )
                return
            await self._serve(connection)
            backoff.reset()
            if not self._stopping:
                await asyncio.sleep(backoff.next_delay_s())

    async def _serve(self, connection: ClientConnection) -> None:
        link_class = _SimLink16 if self.version == "1.6" else _SimLink201
        link = link_class(self.id, connection, self.config.response_timeout_s)
        link.sim = self
        self._link = link
        self.connects += 1
        self._connected.set()
        try:
            await link.start()
        except ConnectionClosed:
            pass
        finally:
            self._connected.clear()
            self._link = None

    def _fail(self, error: BaseException) -> None:
        log.error("ocpp sim %s: %s", self.id, error)
        self._fatal = error
        self._fatal_event.set()

    async def drop(self, offline_s: float = 0.0) -> None:
        """Lose the connection abruptly (no close handshake), as a network failure does,
        and stay offline at least ``offline_s`` (wall clock); then reconnect."""
        self._hold_until = asyncio.get_running_loop().time() + offline_s
        link = self._link
        if link is not None:
            link._connection.transport.abort()

    async def close(self) -> None:
        self._stopping = True
        link = self._link
        if link is not None:
            await link._connection.close()
        task, self._connection_task = self._connection_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def call(self, request: Any) -> Any:
        """Send a request and return the answer, resending (as chargers do with
        transaction messages) after a lost connection, a timeout or an InternalError."""
        while True:
            await self._wait_connected()
            link = self._link
            if link is None:
                continue
            answer = asyncio.ensure_future(link.call(request, suppress=False))
            closed = asyncio.ensure_future(link._connection.wait_closed())
            await asyncio.wait({answer, closed}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if not answer.done():
                answer.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await answer
                continue  # lost the connection: send it again once back
            try:
                result = answer.result()
            except (ConnectionClosed, TimeoutError):
                continue
            except InternalError:
                await asyncio.sleep(self.config.retry_interval_s)
                continue
            self.messages_sent += 1
            return result

    # -- charging profiles (charge-point side) --

    def set_profile(self, connector_id: int, payload: Mapping[str, Any]) -> str:
        """Install a profile: Accepted, or Rejected for one we cannot apply."""
        try:
            profile = parse_profile(connector_id, payload)
        except (KeyError, ValueError, TypeError, IndexError) as error:
            log.info("ocpp sim %s: rejected a charging profile: %r", self.id, error)
            return "Rejected"
        if profile.purpose == "ChargePointMaxProfile" and connector_id != 0:
            return "Rejected"
        if profile.purpose == "TxProfile":
            open_tx = self._transaction
            if connector_id != _CONNECTOR or open_tx is None:
                return "Rejected"  # 1.6 and 2.0.1: a TxProfile needs a transaction
            if (
                profile.transaction_id is not None
                and profile.transaction_id != open_tx.transaction_id
            ):
                return "Rejected"
        # The same id, or the same purpose and stack level on the connector, is replaced.
        for other in list(self.profiles.values()):
            if other.profile_id == profile.profile_id or (
                other.connector_id == connector_id
                and other.purpose == profile.purpose
                and other.stack_level == profile.stack_level
            ):
                del self.profiles[other.profile_id]
        self.profiles[profile.profile_id] = profile
        return "Accepted"

    def clear_profiles(
        self,
        *,
        profile_id: int | None = None,
        connector_id: int | None = None,
        purpose: str | None = None,
        stack_level: int | None = None,
    ) -> str:
        """Remove matching profiles: Accepted, or Unknown when none matched."""
        matching = [
            p
            for p in self.profiles.values()
            if (profile_id is None or p.profile_id == profile_id)
            and (connector_id is None or p.connector_id == connector_id)
            and (purpose is None or p.purpose == purpose)
            and (stack_level is None or p.stack_level == stack_level)
        ]
        for profile in matching:
            del self.profiles[profile.profile_id]
        return "Accepted" if matching else "Unknown"

    def limit_w(self, now: datetime) -> float:
        """The power the profiles allow now: the TxProfile (else TxDefaultProfile) of
        the highest stack level in force, capped by any ChargePointMaxProfile. [W]"""
        start = self._transaction.start if self._transaction else None
        by_purpose: dict[str, list[tuple[int, float]]] = {}
        for profile in self.profiles.values():
            limit = profile.limit_w(now, start, self.config.voltage_v)
            if limit is not None:
                by_purpose.setdefault(profile.purpose, []).append((profile.stack_level, limit))
        limit_w = math.inf
        for purpose in ("TxProfile", "TxDefaultProfile"):
            if by_purpose.get(purpose):
                limit_w = max(by_purpose[purpose])[1]
                break
        for _, cap in by_purpose.get("ChargePointMaxProfile", []):
            limit_w = min(limit_w, cap)
        return limit_w

    # -- the simulation --

    async def run(
        self, *, stop: asyncio.Event | None = None, clock_start: datetime | None = None
    ) -> None:
        """Boot, serve vehicles until the config's end or ``stop``, then disconnect.

        ``stop`` ends the run at the next step. One blocked then is cancelled: at once
        while disconnected (connecting, or waiting to resend), after ``_STOP_GRACE_S``
        while a message is on its way.
        """
        stop = stop or asyncio.Event()
        simulation = asyncio.ensure_future(self._simulate(stop, clock_start))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({simulation, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not simulation.done() and self._connected.is_set():
                await asyncio.wait({simulation}, timeout=_STOP_GRACE_S)
            if not simulation.done():
                simulation.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await simulation
                return
            simulation.result()  # its error, if any
        finally:
            stopped.cancel()
            simulation.cancel()
            await self.close()

    async def _simulate(self, stop: asyncio.Event, clock_start: datetime | None) -> None:
        config = self.config
        start = clock_start or config.start or datetime.now(UTC)
        loop = asyncio.get_running_loop()
        wall_start = loop.time()
        await self.connect()
        await self._boot(start)
        served = 0
        self.vehicle = None
        upcoming = make_vehicle(self.id, served, start, config)
        step = 0
        while not stop.is_set():
            offset_s = step * config.interval_s
            if config.duration_s is not None and offset_s >= config.duration_s:
                break
            delay_s = wall_start + offset_s / config.speed - loop.time()
            if delay_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay_s)
                if stop.is_set():
                    break
            now = start + timedelta(seconds=offset_s)
            if self.vehicle is None and now >= upcoming.arrival:
                await self._arrive(upcoming, now)
            elif self.vehicle is not None and now >= self.vehicle.departure:
                await self._depart(now)
                served += 1
                if config.vehicles is not None and served >= config.vehicles:
                    break
                upcoming = make_vehicle(self.id, served, now, config)
            elif self.vehicle is not None:
                await self._charge(now)
            step += 1

    def _advance(self, now: datetime) -> None:
        """Energy of the last step at the power reported then; the power from now on."""
        vehicle = self.vehicle
        assert vehicle is not None
        energy_wh = round(self.power_w * self.config.interval_s / 3600)
        self.register_wh += energy_wh
        # 92 % from grid to battery: on-board charger and battery losses.
        self.soc_pct = min(100.0, self.soc_pct + energy_wh * 0.92 / (vehicle.capacity_kwh * 10))
        if self.soc_pct >= vehicle.target_soc_pct:
            self.power_w = 0.0
        else:
            self.power_w = round(
                min(
                    vehicle.max_power_kw * 1000,
                    self.config.charger_max_kw * 1000,
                    self.limit_w(now),
                ),
                1,
            )

    def _record(self, now: datetime) -> None:
        assert self._transaction is not None
        self.reports.append(
            Report(
                now,
                self._transaction.transaction_id,
                self.power_w,
                self.register_wh,
                round(self.soc_pct, 1),
            )
        )

    async def _boot(self, now: datetime) -> None:
        if self.version == "1.6":
            await self.call(
                call16.BootNotification(
                    charge_point_model="wattstream-sim", charge_point_vendor="wattstream"
                )
            )
            await self.call(
                call16.StatusNotification(
                    connector_id=_CONNECTOR,
                    error_code="NoError",
                    status="Available",
                    timestamp=_iso(now),
                )
            )
        else:
            await self.call(
                call201.BootNotification(
                    charging_station={"model": "wattstream-sim", "vendor_name": "wattstream"},
                    reason="PowerUp",
                )
            )
            await self.call(
                call201.StatusNotification(
                    timestamp=_iso(now),
                    connector_status="Available",
                    evse_id=_CONNECTOR,
                    connector_id=1,
                )
            )

    async def _arrive(self, vehicle: Vehicle, now: datetime) -> None:
        self.vehicle = vehicle
        self.soc_pct = vehicle.arrival_soc_pct
        self.power_w = 0.0
        if self.version == "1.6":
            await self.call(
                call16.StatusNotification(
                    connector_id=_CONNECTOR,
                    error_code="NoError",
                    status="Preparing",
                    timestamp=_iso(now),
                )
            )
            answer = await self.call(
                call16.StartTransaction(
                    connector_id=_CONNECTOR,
                    id_tag=vehicle.id_tag,
                    meter_start=self.register_wh,
                    timestamp=_iso(now),
                )
            )
            transaction_id = str(answer.transaction_id)
        else:
            # 2.0.1: the charge point names its transactions (at most 36 characters).
            transaction_id = str(
                uuid.uuid5(uuid.NAMESPACE_URL, f"{self.id}/{len(self.transactions)}/{now}")
            )
        self._transaction = TransactionRecord(transaction_id, vehicle.id_tag, now, self.register_wh)
        self.transactions.append(self._transaction)
        self._advance_power(now)
        if self.version == "1.6":
            await self.call(
                call16.StatusNotification(
                    connector_id=_CONNECTOR,
                    error_code="NoError",
                    status="Charging",
                    timestamp=_iso(now),
                )
            )
        else:
            await self.call(
                call201.StatusNotification(
                    timestamp=_iso(now),
                    connector_status="Occupied",
                    evse_id=_CONNECTOR,
                    connector_id=1,
                )
            )
            await self.call(
                call201.TransactionEvent(
                    event_type="Started",
                    timestamp=_iso(now),
                    trigger_reason="CablePluggedIn",
                    seq_no=0,
                    transaction_info={
                        "transaction_id": transaction_id,
                        "charging_state": "Charging",
                    },
                    evse={"id": _CONNECTOR, "connector_id": 1},
                    id_token={"id_token": vehicle.id_tag, "type": "ISO14443"},
                    meter_value=[self._meter_value(now, "Transaction.Begin", register_only=True)],
                )
            )

    def _advance_power(self, now: datetime) -> None:
        """The power at plug-in: no energy yet."""
        vehicle = self.vehicle
        assert vehicle is not None
        charging = self.soc_pct < vehicle.target_soc_pct
        self.power_w = (
            round(
                min(
                    vehicle.max_power_kw * 1000,
                    self.config.charger_max_kw * 1000,
                    self.limit_w(now),
                ),
                1,
            )
            if charging
            else 0.0
        )

    async def _charge(self, now: datetime) -> None:
        self._advance(now)
        self._record(now)
        assert self._transaction is not None
        if self.version == "1.6":
            await self.call(
                call16.MeterValues(
                    connector_id=_CONNECTOR,
                    transaction_id=int(self._transaction.transaction_id),
                    meter_value=[self._meter_value(now, "Sample.Periodic")],
                )
            )
        else:
            await self.call(
                call201.TransactionEvent(
                    event_type="Updated",
                    timestamp=_iso(now),
                    trigger_reason="MeterValuePeriodic",
                    seq_no=len(self.reports),
                    transaction_info={
                        "transaction_id": self._transaction.transaction_id,
                        "charging_state": "Charging" if self.power_w > 0 else "SuspendedEV",
                    },
                    meter_value=[self._meter_value(now, "Sample.Periodic")],
                )
            )

    async def _depart(self, now: datetime) -> None:
        self._advance(now)
        transaction = self._transaction
        assert transaction is not None
        transaction.stop = now
        transaction.meter_stop_wh = self.register_wh
        if self.version == "1.6":
            await self.call(
                call16.StopTransaction(
                    meter_stop=self.register_wh,
                    timestamp=_iso(now),
                    transaction_id=int(transaction.transaction_id),
                    reason="EVDisconnected",
                    id_tag=transaction.id_tag,
                )
            )
            await self.call(
                call16.StatusNotification(
                    connector_id=_CONNECTOR,
                    error_code="NoError",
                    status="Available",
                    timestamp=_iso(now),
                )
            )
        else:
            await self.call(
                call201.TransactionEvent(
                    event_type="Ended",
                    timestamp=_iso(now),
                    trigger_reason="EVDeparted",
                    seq_no=len(self.reports) + 1,
                    transaction_info={
                        "transaction_id": transaction.transaction_id,
                        "charging_state": "Idle",
                        "stopped_reason": "EVDisconnected",
                    },
                    meter_value=[self._meter_value(now, "Transaction.End", register_only=True)],
                )
            )
            await self.call(
                call201.StatusNotification(
                    timestamp=_iso(now),
                    connector_status="Available",
                    evse_id=_CONNECTOR,
                    connector_id=1,
                )
            )
        # TxProfiles end with their transaction (OCPP: "SHOULD be deleted").
        self.clear_profiles(connector_id=_CONNECTOR, purpose="TxProfile")
        self._transaction = None
        self.vehicle = None
        self.power_w = 0.0

    def _meter_value(
        self, now: datetime, context: str, *, register_only: bool = False
    ) -> dict[str, Any]:
        values: list[tuple[str, float | int, str, str | None]] = [
            ("Energy.Active.Import.Register", self.register_wh, "Wh", None)
        ]
        if not register_only:
            values = [
                ("Power.Active.Import", self.power_w, "W", None),
                *values,
                ("SoC", round(self.soc_pct, 1), "Percent", "EV"),
            ]
        sampled = []
        for measurand, value, unit, location in values:
            item: dict[str, Any] = {"measurand": measurand, "context": context}
            if self.version == "1.6":
                item.update(value=str(value), unit=unit)
            else:
                item.update(value=value, unit_of_measure={"unit": unit})
            if location is not None:
                item["location"] = location
            sampled.append(item)
        return {"timestamp": _iso(now), "sampled_value": sampled}


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


class _SimLink16(ChargePoint16):
    """The charge-point end of a 1.6 connection: what the CSMS may ask of it."""

    sim: SimulatedChargePoint

    @on(enums16.Action.set_charging_profile)
    async def on_set_charging_profile(
        self, connector_id: int, cs_charging_profiles: dict[str, Any]
    ) -> Any:
        return result16.SetChargingProfile(
            status=self.sim.set_profile(connector_id, cs_charging_profiles)
        )

    @on(enums16.Action.clear_charging_profile)
    async def on_clear_charging_profile(
        self,
        id: int | None = None,
        connector_id: int | None = None,
        charging_profile_purpose: str | None = None,
        stack_level: int | None = None,
    ) -> Any:
        status = self.sim.clear_profiles(
            profile_id=id,
            connector_id=connector_id,
            purpose=charging_profile_purpose,
            stack_level=stack_level,
        )
        return result16.ClearChargingProfile(status=status)


class _SimLink201(ChargePoint201):
    """The charge-point end of a 2.0.1 connection: what the CSMS may ask of it."""

    sim: SimulatedChargePoint

    @on(enums201.Action.set_charging_profile)
    async def on_set_charging_profile(
        self, evse_id: int, charging_profile: dict[str, Any], **kwargs: Any
    ) -> Any:
        return result201.SetChargingProfile(status=self.sim.set_profile(evse_id, charging_profile))

    @on(enums201.Action.clear_charging_profile)
    async def on_clear_charging_profile(
        self,
        charging_profile_id: int | None = None,
        charging_profile_criteria: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        criteria = charging_profile_criteria or {}
        status = self.sim.clear_profiles(
            profile_id=charging_profile_id,
            connector_id=criteria.get("evse_id"),
            purpose=criteria.get("charging_profile_purpose"),
            stack_level=criteria.get("stack_level"),
        )
        return result201.ClearChargingProfile(status=status)


@dataclass
class FleetStats:
    charge_points: int = 0
    connects: int = 0
    messages_sent: int = 0
    transactions_started: int = 0
    transactions_stopped: int = 0
    failed: list[str] = field(default_factory=list)
    """Charge points that could not run (refused, CSMS unreachable), with why."""


class ChargePointFleet:
    """The simulated charge points of one config; :meth:`run` runs them all at once."""

    def __init__(self, config: OcppSimulatorConfig) -> None:
        self.config = config
        self.charge_points = [
            SimulatedChargePoint(charge_point_id, config.version_of(index), config)
            for index, charge_point_id in enumerate(config.charge_point_ids())
        ]

    def by_id(self, charge_point_id: str) -> SimulatedChargePoint:
        return next(cp for cp in self.charge_points if cp.id == charge_point_id)

    async def run(
        self,
        *,
        stop: asyncio.Event | None = None,
        on_done: Callable[[SimulatedChargePoint], None] | None = None,
    ) -> FleetStats:
        """Run every charge point (one task each) on one simulated clock until each is
        done or ``stop`` is set; one that cannot connect is reported, the others go on."""
        start = self.config.start or datetime.now(UTC)
        stats = FleetStats(charge_points=len(self.charge_points))

        async def one(cp: SimulatedChargePoint) -> None:
            try:
                await cp.run(stop=stop, clock_start=start)
            except ConnectionError as error:  # ChargePointRefused too
                stats.failed.append(str(error))
            if on_done is not None:
                on_done(cp)

        await asyncio.gather(*(one(cp) for cp in self.charge_points))
        for cp in self.charge_points:
            stats.connects += cp.connects
            stats.messages_sent += cp.messages_sent
            stats.transactions_started += len(cp.transactions)
            stats.transactions_stopped += sum(1 for t in cp.transactions if t.stop is not None)
        return stats


def fleet_summary(stats: FleetStats) -> dict[str, Any]:
    """The stats as JSON-able data (``wattstream simulate ocpp --json``)."""
    return dataclasses.asdict(stats)


__all__ = [
    "ChargePointFleet",
    "ChargePointRefused",
    "FleetStats",
    "OcppSimulatorConfig",
    "Profile",
    "Report",
    "SimulatedChargePoint",
    "TransactionRecord",
    "Vehicle",
    "fleet_summary",
    "make_vehicle",
    "parse_profile",
]
