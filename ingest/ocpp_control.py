"""The control path for OCPP charge points: ``Command`` messages become charging profiles.

When its config has ``[ocpp.control]``, the CSMS (:mod:`ingest.ocpp`, the same process,
so it holds the live connections) consumes the ``commands`` topic in its own consumer
group and, for each command whose (``site``, ``device``) is a connector of one of its
charge points (``ChargePointConfig.device`` / ``device_for(n)``; an auto-registered one
once it has connected), does what ``ingest/control.py`` does for Modbus and MQTT
devices, with its functions (:func:`ingest.control.expiry`,
:func:`~ingest.control.audit_record`, :class:`~ingest.control.RateLimit`):

* ``set_power`` -> a TxProfile ``SetChargingProfile`` of ``setpoint_kw``, clamped to
  0 .. the charge point's ``max_power_kw`` (the clamp is audited). A negative setpoint
  (vehicle-to-grid discharge) is *rejected*: a TxProfile limits charging only, and
  discharging needs OCPP 2.1 / ISO 15118-20, which this CSMS does not speak;
* ``shed`` and ``scram`` -> a 0 kW limit, applied at once whatever the rate limit
  (control.py's ``SAFETY_ACTIONS``); the car stays plugged in, drawing nothing;
* ``restore`` -> ``ClearChargingProfile`` of our profile: the charge point returns
  to its own default;
* other actions (``start_job``, ``stop_job``) are *rejected*; a command past its
  ``valid_until`` (or older than ``max_command_age_s``) is *skipped*.

Dry-run is the default: a profile is sent only when ``enabled = true`` and the command
is not marked ``dry_run`` (unless ``respect_command_dry_run = false``). Each command gets
exactly one audit record on ``audit_topic`` (control.py's format: ``sent: ... | <reason>``)
with the charge point's answer: ``sent`` when it answered Accepted; ``failed`` when it
answered otherwise (Rejected, NotSupported), a CALLERROR or nothing in
``response_timeout_s`` (``dry_run`` false: the request went out), or when it is not
connected or has no open transaction (``dry_run`` true: nothing was sent). A failed
command is not retried: a setpoint is state, and the fleet scheduler sends the next one
within its step.

Commands for devices that are not this CSMS's are *ignored*, not audited: the control
connector (or another CSMS) owns them, and one audit per command is the contract. For
the same reason a command that does not decode is logged and counted but not
dead-lettered here (the control connector dead-letters it). The control connector, in
turn, audits a device it does not know as *rejected* by default: run it with
``unknown_devices = "ignore"`` (``ControlConfig``) next to this CSMS, or an OCPP
command gets a ``rejected`` audit from there as well as ours.

Example audit record (key ``turin-home``)::

    {"command_id": "cmd-1f0c...", "site": "turin-home", "device": "wallbox-1",
     "action": "set_power", "setpoint_kw": 11.0,
     "reason": "sent: clamped from 20 to 11 kW; SetChargingProfile 11000 W on CP-001
                connector 1 (OCPP 2.0.1): Accepted | charge 20.00 kW: urgency 1/3 ...",
     "dry_run": false, ...}

Delivery guarantee: at least once, per command, as control.py: a command's offset is
committed only after its audit record (or, for a command of another connector's device,
its being passed over) is settled; a crash replays it (a profile with the same id
replaces itself: idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from ingest.control import (
    SAFETY_ACTIONS,
    AuditedOffsets,
    CommandRef,
    Outcome,
    RateLimit,
    Verdict,
    audit_outcome,
    audit_record,
    audit_topic_spec,
    expiry,
)
from ingest.ocpp import ChargePointConfig, OcppConnector, OcppConnectorError, OcppControlConfig
from pipeline import codec, kafka, topics
from pipeline.backoff import Backoff
from pipeline.schemas import Command
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# Actions that become a 0 kW limit: a charger's safe state (the car stays plugged in).
_ZERO_ACTIONS = SAFETY_ACTIONS
_SUPPORTED = frozenset({"set_power", "restore", *_ZERO_ACTIONS})


@dataclass(frozen=True)
class ChargerTarget:
    """One connector (1.6) / EVSE (2.0.1) of a charge point: where a device's commands go."""

    charge_point_id: str
    connector_id: int
    config: ChargePointConfig


@dataclass(frozen=True)
class OcppPlan:
    """What to do with a valid command: a limit (None: clear ours), and whether to send it."""

    command: Command
    target: ChargerTarget
    limit_kw: float | None
    """After clamping to 0 .. max_power_kw; None: ClearChargingProfile. [kW]"""
    requested_kw: float | None
    dry_run: bool
    dry_run_why: str = ""

    def clamp_note(self) -> str:
        if self.requested_kw is None or self.limit_kw == self.requested_kw:
            return ""
        return f"clamped from {self.requested_kw:g} to {self.limit_kw:g} kW"

    def describe(self) -> str:
        where = f"{self.target.charge_point_id} connector {self.target.connector_id}"
        if self.limit_kw is None:
            return f"ClearChargingProfile on {where}"
        return f"SetChargingProfile {self.limit_kw:g} kW on {where}"


def plan_ocpp_command(
    command: Command, target: ChargerTarget, config: OcppControlConfig, now: datetime
) -> OcppPlan | Verdict:
    """Validate and clamp one command for a charger (pure): a plan to apply, or why not."""
    name = f"{command.site}/{command.device}"
    if command.action not in _SUPPORTED:
        return Verdict(
            Outcome.REJECTED,
            f"action {command.action!r} is not supported for OCPP charge point {name} "
            f"(supported: {', '.join(sorted(_SUPPORTED))})",
        )
    if (why := expiry(command, now, config.max_command_age_s)) is not None:
        return Verdict(Outcome.SKIPPED, why)
    requested: float | None
    if command.action in _ZERO_ACTIONS:
        requested = 0.0  # the safe state, whatever the command says
    elif command.action == "restore":
        requested = None
    else:
        if command.setpoint_kw is None:
            return Verdict(Outcome.REJECTED, "action 'set_power' needs a setpoint_kw")
        requested = float(command.setpoint_kw)
        if requested < 0:
            return Verdict(
                Outcome.REJECTED,
                f"setpoint {requested:g} kW is a discharge (V2G), which a charging "
                "profile cannot ask for (OCPP 1.6 / 2.0.1 limit charging only)",
            )
    dry_run_why = ""
    if not config.enabled:
        dry_run_why = "control is not enabled"
    elif config.respect_command_dry_run and command.dry_run:
        dry_run_why = "the command is marked dry_run"
    return OcppPlan(
        command=command,
        target=target,
        limit_kw=None if requested is None else min(requested, target.config.max_power_kw),
        requested_kw=requested,
        dry_run=bool(dry_run_why),
        dry_run_why=dry_run_why,
    )


@dataclass
class OcppControlStats:
    commands: int = 0
    """Every command read, ours or not."""
    ignored: int = 0
    """Commands for devices that are not ours (no audit), and undecodable ones."""
    undecodable: int = 0
    sent: int = 0
    dry_run: int = 0
    rate_limited: int = 0
    rejected: int = 0
    skipped: int = 0
    failed: int = 0
    clamped: int = 0
    audited: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class _Pending:
    plan: OcppPlan
    ref: CommandRef


@dataclass
class _ChargerState:
    limit: RateLimit[_Pending]
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class OcppCommandConsumer:
    """Commands topic -> charging profiles on ``csms``'s live connections, audited.

    Started and stopped by :class:`ingest.ocpp.OcppConnector` when its config has
    ``control``; ``run()`` until ``stop()``.
    """

    def __init__(
        self,
        csms: OcppConnector,
        config: OcppControlConfig,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.csms = csms
        self.settings: Settings = csms.settings
        self.config = config
        self.stats = OcppControlStats()
        self._clock = clock
        self.audit_spec = audit_topic_spec(config.audit_topic)
        self.group_id = config.group_id or f"{self.settings.app_id}.ocpp-control"
        self._commands_topic = self.settings.topic(topics.COMMANDS)
        self._audit_topic = self.settings.topic(self.audit_spec)
        self._targets: dict[tuple[str, str], ChargerTarget] = {
            (cp.site, cp.device_for(n)): ChargerTarget(cp_id, n, cp)
            for cp_id, cp in csms.config.charge_points.items()
            for n in sorted({1, *cp.connector_devices})
        }
        self._chargers: dict[tuple[str, int], _ChargerState] = {}
        self._offsets = AuditedOffsets()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._stop_requested = asyncio.Event()
        self._started = False

    def target(self, site: str, device: str) -> ChargerTarget | None:
        """The connector a command's (site, device) names, or None: not ours."""
        known = self._targets.get((site, device))
        if known is not None:
            return known
        cfg = self.csms.config
        # An auto-registered charge point's device is its id; only one that has
        # connected is ours (others of that site may be any connector's devices).
        if cfg.auto_register and site == cfg.auto_register_site and device in self.csms.sessions:
            return ChargerTarget(device, 1, self.csms.sessions[device].config)
        return None

    # -- lifecycle --

    async def start(self) -> None:
        if self._started:
            return
        await kafka.ensure_topics(self.settings, [topics.COMMANDS, self.audit_spec])
        producer = kafka.producer(self.settings)
        await producer.start()
        # A command's latency is mostly this wait on a broker that holds a fetch for it
        # (the embedded one): the setting when given, aiokafka's 500 ms otherwise.
        wait_ms = self.settings.kafka.fetch_max_wait_ms
        consumer = kafka.consumer(
            self.settings,
            self._commands_topic,
            group_id=self.group_id,
            **({} if wait_ms is None else {"fetch_max_wait_ms": wait_ms}),
        )
        try:
            await consumer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        self._started = True
        log.info(
            "ocpp control: %d charger devices, %s, group %s, audit to %s",
            len(self._targets),
            "ENABLED" if self.config.enabled else "dry-run",
            self.group_id,
            self._audit_topic,
        )

    async def run(self) -> None:
        """Handle commands until ``stop()``; each connector applies its own in its task."""
        await self.start()
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
                log.warning("ocpp control: commit failed (%r); retrying", error)

    async def stop(self) -> None:
        """Stop, commit what is audited, close Kafka; safe twice. Commands still waiting
        for their rate limit are neither applied nor committed: the next run gets them."""
        self._stop_requested.set()
        tasks = [s.task for s in self._chargers.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        assigned = set(consumer.assignment())
        self._offsets.forget(assigned)
        positions = self._offsets.to_commit(assigned)
        if positions:
            await consumer.commit(positions)
            self._offsets.committed.update(positions)

    # -- handling --

    async def _handle(self, record: ConsumerRecord[bytes, bytes], ref: CommandRef) -> None:
        self.stats.commands += 1
        try:
            command = codec.decode(Command, record.value or b"")
        except codec.DecodeError as error:
            # Not dead-lettered here: the control connector does, once (module docstring).
            log.warning(
                "ocpp control: command at %s/%d does not decode (%s); ignored",
                ref.partition.partition,
                ref.offset,
                error.reason,
            )
            self.stats.undecodable += 1
            self.stats.ignored += 1
            self._offsets.resolved(ref)
            return
        target = self.target(command.site, command.device)
        if target is None:
            self.stats.ignored += 1
            self._offsets.resolved(ref)
            return
        result = plan_ocpp_command(command, target, self.config, self._clock())
        if isinstance(result, Verdict):
            log.info(
                "ocpp control %s/%s %s %s: %s",
                command.site,
                command.device,
                command.command_id,
                result.outcome.value,
                result.detail,
            )
            await self._audit(audit_record(command, result.outcome, result.detail), ref)
            return
        key = (target.charge_point_id, target.connector_id)
        state = self._chargers.get(key)
        if state is None:
            state = self._chargers[key] = _ChargerState(RateLimit(self.config.min_interval_s))
            state.task = asyncio.create_task(
                self._charger_worker(state), name=f"ocpp-control-{key[0]}/{key[1]}"
            )
        replaced = state.limit.offer(_Pending(result, ref), urgent=command.action in SAFETY_ACTIONS)
        state.wakeup.set()
        if replaced is not None:
            interval = f"min_interval_s = {self.config.min_interval_s:g}"
            detail = f"superseded by {command.command_id} within {interval}"
            if replaced.plan.command is command:
                detail = "held back: a pending safety action is not superseded"
            await self._finish(replaced.plan, replaced.ref, Outcome.RATE_LIMITED, detail)

    async def _charger_worker(self, state: _ChargerState) -> None:
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
                await self._apply(pending)

    async def _apply(self, pending: _Pending) -> None:
        plan, command, target = pending.plan, pending.plan.command, pending.plan.target
        name = f"{command.site}/{command.device}"
        if (why := expiry(command, self._clock(), self.config.max_command_age_s)) is not None:
            await self._finish(plan, pending.ref, Outcome.SKIPPED, why)  # waited out the limit
            return
        what = plan.describe()
        if plan.dry_run:
            log.info("ocpp control dry-run %s %s: would %s", name, command.command_id, what)
            detail = f"would {what} ({plan.dry_run_why})"
            await self._finish(plan, pending.ref, Outcome.DRY_RUN, detail)
            return
        cp_id = target.charge_point_id
        # Checked first so that the audit can say nothing was sent (dry_run true).
        if not self.csms.connected(cp_id):
            detail = f"{what}: charge point {cp_id!r} is not connected"
            await self._finish(plan, pending.ref, Outcome.FAILED, detail)
            return
        session = self.csms.sessions.get(cp_id)
        if plan.limit_kw is not None and (
            session is None or session.open_transaction(target.connector_id) is None
        ):
            detail = f"{what}: no open transaction (a TxProfile applies to one)"
            await self._finish(plan, pending.ref, Outcome.FAILED, detail)
            return
        try:
            answer = await self.csms.set_charging_limit(
                cp_id, plan.limit_kw, connector_id=target.connector_id
            )
        except (OcppConnectorError, ValueError) as error:
            # The charge point may have gone (or ended its transaction) since the checks
            # above: the audit says whether the request went out.
            sent = isinstance(error, OcppConnectorError) and error.sent
            self.stats.last_error = f"{name}: {error}"
            log.warning("ocpp control %s %s: %s", name, command.command_id, error)
            await self._finish(plan, pending.ref, Outcome.FAILED, f"{what}: {error}", sent=sent)
            return
        version = session.version if session is not None else "?"
        sent_as = (
            f"{answer.limit:g} {answer.charging_rate_unit}" if answer.limit is not None else ""
        )
        action = "ClearChargingProfile" if plan.limit_kw is None else "SetChargingProfile"
        detail = (
            f"{action} {sent_as + ' ' if sent_as else ''}on {cp_id} connector "
            f"{target.connector_id} (OCPP {version}): {answer.status}"
        )
        log.info("ocpp control %s %s: %s", name, command.command_id, detail)
        # A clear with nothing of ours installed (Unknown) leaves the charger as asked.
        ok = answer.accepted or (plan.limit_kw is None and answer.status == "Unknown")
        await self._finish(
            plan, pending.ref, Outcome.SENT if ok else Outcome.FAILED, detail, sent=True
        )

    async def _finish(
        self, plan: OcppPlan, ref: CommandRef, outcome: Outcome, detail: str, *, sent: bool = False
    ) -> None:
        note = plan.clamp_note()
        if note:
            self.stats.clamped += 1
        text = "; ".join(part for part in (note, detail) if part)
        await self._audit(
            audit_record(plan.command, outcome, text, setpoint_kw=plan.limit_kw, sent=sent), ref
        )

    async def _audit(self, record: Command, ref: CommandRef) -> None:
        """Produce the audit record; the command's offset is released once Kafka has it."""
        backoff = Backoff(
            min(0.5, self.config.produce_retry_max_s), self.config.produce_retry_max_s
        )
        while not self._stop_requested.is_set() and self._producer is not None:
            try:
                value = codec.encode(record)
                await (
                    await self._producer.send(self._audit_topic, value, key=record.site.encode())
                )
            except KafkaError as error:
                self.stats.last_error = f"kafka: {error!r}"
                log.warning("ocpp control: producing an audit failed (%r); retrying", error)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), backoff.next_delay_s())
                continue
            counter = audit_outcome(record).value.replace("-", "_")
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            self.stats.audited += 1
            self._offsets.resolved(ref)
            return


__all__ = [
    "ChargerTarget",
    "OcppCommandConsumer",
    "OcppControlStats",
    "OcppPlan",
    "plan_ocpp_command",
]
