"""Faust glue shared by processors: raw topics, decoding events, dead letters.

Faust acks an event even when the agent raises, so an agent must never raise
on bad input: it decodes with these helpers, which dead-letter what cannot be
used (with the reason and the original bytes) and let the stream go on.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import faust
import faust.streams as faust_streams
import mode
from pydantic import BaseModel

from pipeline import codec, logs, metrics, topics
from pipeline.schemas import (
    Alert,
    AllocationPlan,
    CarbonIntensity,
    CertificateEvent,
    Command,
    Decision,
    EmissionsRecord,
    PriceTick,
    TelemetryBatch,
    dead_letter,
)
from pipeline.settings import Settings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# Bad input never raises in an agent (it is dead-lettered), so an exception is a
# bug or a broken environment. Faust's default restarts the actor's coroutine or
# leaves it dead while the worker runs on: a silent stall. Crashing the worker
# instead makes the process supervisor restart it, and it resumes from the last
# committed offsets (at least once; ids are deterministic).
AGENT_SUPERVISOR = mode.CrashingSupervisor


def raw_topic(app: faust.App, settings: Settings, *specs: topics.TopicSpec) -> faust.TopicT:
    """A Faust channel over one or more registry topics, delivering raw bytes.

    Raw bytes, because decoding is ours: a record that does not decode must be
    dead-lettered with its bytes, not crash Faust's deserializer.
    """
    partition_counts = {spec.partition_count(settings.partitions) for spec in specs}
    assert len(partition_counts) == 1, "a channel's topics must be co-partitioned"
    return app.topic(
        *(settings.topic(spec) for spec in specs),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partition_counts.pop(),
    )


class DeadLetters:
    """Sends rejected records to the dead-letter topic, with the reason and the raw bytes."""

    def __init__(self, app: faust.App, settings: Settings, component: str) -> None:
        self.topic = raw_topic(app, settings, topics.DEAD_LETTERS)
        self.component = component

    async def reject(
        self,
        event: Any,
        reason: str,
        error_type: str,
        raw: bytes | None = None,
    ) -> None:
        message = event.message
        letter = dead_letter(
            raw=message.value if raw is None else raw,
            reason=reason,
            error_type=error_type,
            component=self.component,
            source_topic=message.topic,
            key=message.key,
            partition=message.partition,
            offset=message.offset,
        )
        metrics.DEAD_LETTERS.labels(self.component, error_type).inc()
        log.warning(
            "dead-lettered record from %s[%d]@%d: %s",
            message.topic,
            message.partition,
            message.offset,
            reason,
        )
        await self.topic.send(key=message.topic.encode(), value=codec.encode(letter))


async def decode_event(model: type[M], event: Any, dlq: DeadLetters) -> M | None:
    try:
        return codec.decode(model, event.message.value)
    except codec.DecodeError as error:
        await dlq.reject(event, error.reason, error.error_type)
        return None


async def decode_telemetry_event(event: Any, dlq: DeadLetters) -> TelemetryBatch | None:
    batch, rejected = codec.decode_telemetry(event.message.value)
    for part in rejected:
        await dlq.reject(event, part.reason, part.error_type, raw=part.raw)
    return batch


S = TypeVar("S")

# The shared site agent takes the messages waiting on its partitions in batches of up
# to this many, waiting at most BATCH_WITHIN_S for a batch to fill. Table writes are
# made once per batch (a site's state once, however many of its messages the batch
# held): when a worker catches up on a backlog, state is serialised and logged once
# per batch instead of once per message. When traffic is light the wait bounds the
# delay a batch adds to an alert (SCRAM has its own agent and never waits).
BATCH_MAX_MESSAGES = 500
BATCH_WITHIN_S = 0.01


@contextmanager
def committed_only_when_done(events: Sequence[Any]) -> Iterator[None]:
    """Leave ``events`` uncommitted unless the block finishes.

    Faust's ``take_events`` acknowledges every event of a batch when the batch is left,
    also when its processing raised or was cancelled (a stop or a crash mid-batch), and
    an acknowledged offset is committed: the events whose outputs were never sent would
    be lost. A message Faust believes acknowledged is not acknowledged again, and its
    offset is never marked safe to commit, so marking the batch's messages so keeps the
    partition's commits before the batch; the worker that reads the partition next
    (this one after a restart, or another) processes the batch again.
    """
    try:
        yield
    except BaseException:
        for event in events:
            event.message.acked = True
        raise


async def delivered(sends: Sequence[Awaitable[Any]]) -> None:
    """Wait until the broker has acknowledged every send (what ``Topic.send`` returned)."""
    if sends:
        await asyncio.gather(*sends)


class Flushable(Protocol):
    def flush(self) -> None: ...


@contextmanager
def acting_for(event: Any) -> Iterator[None]:
    """Make ``event`` Faust's current event: a table write goes to the changelog
    partition of the current event, and the shared agent's writes are made after its
    batch, outside Faust's own iteration. Faust has no public setter for it. None (no
    stream, as in a unit test's plain dict) leaves the current event as it is."""
    if event is None:
        yield
        return
    token = faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


class BufferedTable:
    """A Faust table whose writes are held until the end of the agent's batch.

    Reads see the held writes. :meth:`flush` (called by the shared site agent after
    each batch, before its outputs are sent and its messages acknowledged) writes each
    key's latest value to the table, which logs it to the changelog once, in the
    partition of the message that last changed it.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self._held: dict[str, tuple[Any, Any]] = {}

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._held:
            return self._held[key][1]
        return self.table.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self._held[key] = (faust.current_event(), value)

    def flush(self) -> None:
        for key, (event, value) in self._held.items():
            with acting_for(event):
                self.table[key] = value
        self._held.clear()


class TableState(Generic[S]):
    """A table of per-key state objects, stored as JSON, parsed once per ownership.

    :meth:`put` holds the state object; :meth:`flush` (once per batch of messages, see
    :class:`BufferedTable`) dumps each held state and writes it, so a state changed by
    many messages of a batch is serialised once. A key's stored value is parsed on its
    first read and the object is kept: while this worker owns the key's partition, only
    its own writes change the value, so the kept object is the value. A rebalance can
    change that (the partition moves, a changelog recovery rewrites the store), so
    :meth:`forget` drops every kept object when partitions are revoked and when the
    table has been recovered (see :func:`site_state`). Either store works the same: a
    RocksDB store, which returns a fresh copy on every read, is not parsed per message.
    """

    def __init__(
        self,
        table: Any,
        parse: Callable[[Any], S],
        dump: Callable[[S], Any],
    ) -> None:
        self.table = table
        self.parse = parse
        self.dump = dump
        self._parsed: dict[str, S] = {}
        self._held: dict[str, tuple[Any, S]] = {}

    def get(self, key: str) -> S:
        held = self._held.get(key)
        if held is not None:
            return held[1]
        if key in self._parsed:
            return self._parsed[key]
        state = self._parsed[key] = self.parse(self.table.get(key))
        return state

    def put(self, key: str, state: S) -> None:
        self._held[key] = (faust.current_event(), state)

    def flush(self) -> None:
        for key, (event, state) in self._held.items():
            value = self.dump(state)
            with acting_for(event):
                self.table[key] = value
            self._parsed[key] = state
        self._held.clear()

    def forget(self) -> None:
        """Drop the parsed objects: the next read of each key parses what the table holds."""
        self._parsed.clear()


def site_table(app: faust.App, settings: Settings, name: str, help: str) -> BufferedTable:
    """A per-site table ``{app_id}-{name}`` written once per batch of the shared site agent."""
    table = BufferedTable(_site_faust_table(app, settings, name, help))
    _site_registry(app, settings).tables.append(table)
    return table


def site_state(
    app: faust.App,
    settings: Settings,
    name: str,
    help: str,
    parse: Callable[[Any], S],
    dump: Callable[[S], Any],
) -> TableState[S]:
    """Per-site state objects in the table ``{app_id}-{name}``, see :class:`TableState`."""
    table = _site_faust_table(app, settings, name, help)
    states = TableState(table, parse, dump)

    async def forget_recovered() -> None:
        states.forget()

    table.on_recover(forget_recovered)
    _site_registry(app, settings).tables.append(states)
    return states


def _site_faust_table(app: faust.App, settings: Settings, name: str, help: str) -> Any:
    return app.Table(
        f"{settings.app_id}-{name}", default=None, partitions=settings.partitions, help=help
    )


def fan_out_agent(
    app: faust.App,
    settings: Settings,
    name: str,
    source: topics.TopicSpec,
    target: topics.TopicSpec,
    model: type[M],
    sites_for: Callable[[M], Sequence[str]],
) -> None:
    """Re-key each message of ``source`` onto ``target`` once per site ``sites_for`` names.

    ``source`` is keyed by market or zone, telemetry by site: the copies on a site-keyed
    ``target`` (co-partitioned with telemetry) let one worker see a site's readings and
    its grid in one stream, and keep the site's state in one table partition. What does
    not decode is dead-lettered here, once.
    """
    source_topic = raw_topic(app, settings, source)
    target_topic = raw_topic(app, settings, target)
    dlq = DeadLetters(app, settings, component=name.rsplit(".", 1)[0])

    source_name = settings.topic(source)
    target_name = settings.topic(target)
    consumed = metrics.MESSAGES.labels(source_name, "in")
    produced = metrics.MESSAGES.labels(target_name, "out")

    async def fan_out(stream: Any) -> None:
        async for event in stream.events():
            consumed.inc()
            with metrics.timed(name), logs.batch(logs.batch_id(event.message)):
                message = await decode_event(model, event, dlq)
                if message is None:
                    continue
                value = codec.encode(message)
                for site in sites_for(message):
                    await target_topic.send(key=site.encode(), value=value)
                    produced.inc()

    app.agent(source_topic, name=name, supervisor_strategy=AGENT_SUPERVISOR)(fan_out)


OUTPUT_TOPICS: dict[type[BaseModel], topics.TopicSpec] = {
    Alert: topics.ALERTS,
    Command: topics.COMMANDS,
    Decision: topics.DECISIONS,
    AllocationPlan: topics.ALLOCATIONS,
    EmissionsRecord: topics.EMISSIONS,
    CertificateEvent: topics.CERTIFICATES,
}
"""Where a site agent's outputs go, by message type."""

SiteOutput = Alert | Command | Decision | AllocationPlan | EmissionsRecord | CertificateEvent
SiteStep = Callable[[str, TelemetryBatch], Sequence[SiteOutput]]
CarbonStep = Callable[[str, CarbonIntensity], Sequence[SiteOutput]]
PriceStep = Callable[[str, PriceTick], Sequence[SiteOutput]]


@dataclass(frozen=True)
class _Steps:
    name: str
    sites: frozenset[str]
    telemetry: SiteStep | None
    carbon: CarbonStep | None
    prices: PriceStep | None


@dataclass
class _SiteSteps:
    """The steps of one app's site agents, fed by one Faust agent, and their tables."""

    steps: list[_Steps] = field(default_factory=list)
    tables: list[Flushable] = field(default_factory=list)

    def handlers(self, site: str, kind: type[SiteInput]) -> list[Callable[..., Any]]:
        """The steps of ``site`` that take inputs of ``kind``, in registration order."""
        handler_of = _HANDLER_OF[kind]
        return [h for s in self.steps if site in s.sites and (h := handler_of(s)) is not None]

    def run(self, site: str, item: SiteInput) -> list[SiteOutput]:
        """Give ``item`` to every step of ``site`` that takes it; what they return, in order."""
        out: list[SiteOutput] = []
        for handler in self.handlers(site, type(item)):
            out.extend(handler(site, item))
        return out


SiteInput = TelemetryBatch | PriceTick | CarbonIntensity
_HANDLER_OF: dict[type[SiteInput], Callable[[_Steps], Callable[..., Any] | None]] = {
    TelemetryBatch: lambda steps: steps.telemetry,
    PriceTick: lambda steps: steps.prices,
    CarbonIntensity: lambda steps: steps.carbon,
}


_SITE_STEPS: weakref.WeakKeyDictionary[faust.App, _SiteSteps] = weakref.WeakKeyDictionary()


def _site_registry(app: faust.App, settings: Settings) -> _SiteSteps:
    registry = _SITE_STEPS.get(app)
    if registry is None:
        registry = _SITE_STEPS[app] = _SiteSteps()
        _register_site_agent(app, settings, registry)

        def forget_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
            # At the start of a rebalance: what this worker parsed may be another's next.
            for table in registry.tables:
                if isinstance(table, TableState):
                    table.forget()

        app.on_partitions_revoked.connect(forget_revoked)
    return registry


def shared_site_agent(app: faust.App, settings: Settings) -> None:
    """Register the shared site agent (once per app), even if no processor adds a step:
    it is the one that dead-letters telemetry that does not decode."""
    _site_registry(app, settings)


def site_telemetry_agent(
    app: faust.App,
    settings: Settings,
    name: str,
    sites: Collection[str],
    step: SiteStep,
) -> None:
    """Feed each telemetry batch of ``sites`` to ``step`` and send what it returns (alerts
    to the alerts topic, commands to the commands topic...), in order. See :func:`site_agent`.
    """
    site_agent(app, settings, name, sites, telemetry=step)


def site_agent(
    app: faust.App,
    settings: Settings,
    name: str,
    sites: Collection[str],
    *,
    telemetry: SiteStep | None = None,
    carbon: CarbonStep | None = None,
    prices: PriceStep | None = None,
) -> None:
    """Feed a site's telemetry batches, carbon intensities (``site-carbon``) and price ticks
    (``site-prices``) to the given steps, and send what they return to ``OUTPUT_TOPICS``.

    A step is the processor's engine, with its table reads and writes (tables made by
    :func:`site_table` or :func:`site_state`, written once per batch); ``name`` names
    the processor. Every site agent of an app shares one Faust agent over the three
    co-partitioned topics: a telemetry batch is decoded once (what does not decode, or
    names another site than its key, is dead-lettered there), then given to each step
    in the order they were registered, and a site's readings, intensities and prices
    reach its steps in one stream, in their order on the partition. Intensities and
    prices were validated by their fan-out.
    """
    registry = _site_registry(app, settings)
    registry.steps.append(_Steps(name, frozenset(sites), telemetry, carbon, prices))


def _register_site_agent(app: faust.App, settings: Settings, registry: _SiteSteps) -> None:
    source = raw_topic(app, settings, topics.TELEMETRY, topics.SITE_CARBON, topics.SITE_PRICES)
    carbon_topic = settings.topic(topics.SITE_CARBON)
    prices_topic = settings.topic(topics.SITE_PRICES)
    outputs = {kind: raw_topic(app, settings, spec) for kind, spec in OUTPUT_TOPICS.items()}
    dlq = DeadLetters(app, settings, component=f"{__name__}.site_agents")

    # Intensities and prices come from our own fan-outs (validated there), by topic.
    internal: dict[str, type[CarbonIntensity | PriceTick]] = {
        carbon_topic: CarbonIntensity,
        prices_topic: PriceTick,
    }

    def run_internal(message: Any, site: str) -> list[SiteOutput]:
        model = internal[message.topic]
        if not registry.handlers(site, model):
            return []  # not decoded: no step of this site takes it
        value = _decode_internal(model, message)
        return [] if value is None else registry.run(site, value)

    async def run_telemetry(event: Any, site: str) -> list[SiteOutput]:
        batch = await decode_telemetry_event(event, dlq)
        if batch is None:
            return []
        metrics.READINGS.labels(event.message.topic).inc(len(batch.readings))
        if batch.site != site:
            await dlq.reject(
                event, f"batch site {batch.site!r} != Kafka key {site!r}", "KeyMismatch"
            )
            return []
        return registry.run(site, batch)

    agent_name = f"{__name__}.site_agents"

    async def site_agents(stream: Any) -> None:
        async for events in stream.take_events(BATCH_MAX_MESSAGES, within=BATCH_WITHIN_S):
            with (
                committed_only_when_done(events),
                metrics.timed(agent_name),
                logs.batch(logs.batch_id(events[0].message) if events else None),
            ):
                sends: list[tuple[bytes, SiteOutput]] = []
                for event in events:
                    message = event.message
                    metrics.MESSAGES.labels(message.topic, "in").inc()
                    site = (message.key or b"").decode("utf-8", "replace")
                    with acting_for(event):
                        if message.topic in internal:
                            out = run_internal(message, site)
                        else:
                            out = await run_telemetry(event, site)
                    key = site.encode()
                    sends.extend((key, item) for item in out)
                # Outputs, delivered, before the state that says they were made: a crash
                # between the two replays the batch on the older state, which makes them
                # again (same ids). The other way round, the replay would find them made
                # and they would never be sent. The messages are committed after both.
                await delivered(
                    [
                        await outputs[type(item)].send(key=key, value=codec.encode(item))
                        for key, item in sends
                    ]
                )
                for item_type, count in Counter(type(item) for _, item in sends).items():
                    out_topic = settings.topic(OUTPUT_TOPICS[item_type])
                    metrics.MESSAGES.labels(out_topic, "out").inc(count)
                for table in registry.tables:
                    table.flush()

    app.agent(source, name=agent_name, supervisor_strategy=AGENT_SUPERVISOR)(site_agents)


def _decode_internal(model: type[M], message: Any) -> M | None:
    """Decode a record of an internal fan-out topic (validated when it was fanned out)."""
    try:
        return codec.decode(model, message.value)
    except codec.DecodeError as error:
        log.error("skipped an invalid record on %s: %s", message.topic, error.reason)
        return None
