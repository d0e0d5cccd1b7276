"""Faust glue shared by processors: raw topics, decoding events, dead letters.

Faust acks an event even when the agent raises, so an agent must never raise
on bad input: it decodes with these helpers, which dead-letter what cannot be
used (with the reason and the original bytes) and let the stream go on.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import faust
import mode
from pydantic import BaseModel

from pipeline import codec, topics
from pipeline.schemas import (
    Alert,
    CarbonIntensity,
    CertificateEvent,
    Command,
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


class TableState(Generic[S]):
    """A table of per-key state objects, stored as JSON, parsed only when they changed.

    Every message still writes its key's JSON (the changelog is what a restarted or a
    new worker recovers from), but parsing it back for the next message is skipped while
    the table holds the very value this worker wrote: a memory store gives back the
    object it was given, so identity proves nothing replaced it (a changelog recovery
    after a rebalance, a restart). A RocksDB store returns a fresh object on every read,
    and then the value is parsed as before.
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
        self._parsed: dict[str, tuple[Any, S]] = {}

    def get(self, key: str) -> S:
        stored = self.table.get(key)
        cached = self._parsed.get(key)
        if cached is not None and stored is not None and cached[0] is stored:
            return cached[1]
        state = self.parse(stored)
        self._parsed[key] = (stored, state)
        return state

    def put(self, key: str, state: S) -> None:
        value = self.dump(state)
        self.table[key] = value
        self._parsed[key] = (value, state)


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

    async def fan_out(stream: Any) -> None:
        async for event in stream.events():
            message = await decode_event(model, event, dlq)
            if message is None:
                continue
            value = codec.encode(message)
            for site in sites_for(message):
                await target_topic.send(key=site.encode(), value=value)

    app.agent(source_topic, name=name, supervisor_strategy=AGENT_SUPERVISOR)(fan_out)


OUTPUT_TOPICS: dict[type[BaseModel], topics.TopicSpec] = {
    Alert: topics.ALERTS,
    Command: topics.COMMANDS,
    EmissionsRecord: topics.EMISSIONS,
    CertificateEvent: topics.CERTIFICATES,
}
"""Where a site agent's outputs go, by message type."""

SiteOutput = Alert | Command | EmissionsRecord | CertificateEvent
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
    """The steps of one app's site agents, fed by one Faust agent."""

    steps: list[_Steps] = field(default_factory=list)


_SITE_STEPS: weakref.WeakKeyDictionary[faust.App, _SiteSteps] = weakref.WeakKeyDictionary()


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

    A step is the processor's engine, with its table reads and writes (Faust tables are
    read and written synchronously); ``name`` names the processor. Every site agent of
    an app shares one Faust agent over the three co-partitioned topics: a batch is decoded
    once, then given to each step in the order they were registered, and a site's
    readings, intensities and prices reach its steps in one stream, in their order on
    the partition. Undecodable telemetry is skipped: the arbitrage agent reads the same
    records and dead-letters them once (intensities and prices were validated by their
    fan-out).
    """
    registry = _SITE_STEPS.get(app)
    if registry is None:
        registry = _SITE_STEPS[app] = _SiteSteps()
        _register_site_agent(app, settings, registry)
    registry.steps.append(_Steps(name, frozenset(sites), telemetry, carbon, prices))


def _register_site_agent(app: faust.App, settings: Settings, registry: _SiteSteps) -> None:
    source = raw_topic(app, settings, topics.TELEMETRY, topics.SITE_CARBON, topics.SITE_PRICES)
    carbon_topic = settings.topic(topics.SITE_CARBON)
    prices_topic = settings.topic(topics.SITE_PRICES)
    outputs = {kind: raw_topic(app, settings, spec) for kind, spec in OUTPUT_TOPICS.items()}

    # Intensities and prices come from our own fan-outs (validated there), by topic.
    internal: dict[str, tuple[type[BaseModel], Callable[[_Steps], Any]]] = {
        carbon_topic: (CarbonIntensity, lambda steps: steps.carbon),
        prices_topic: (PriceTick, lambda steps: steps.prices),
    }

    def run_steps(message: Any, site: str) -> list[SiteOutput]:
        out: list[SiteOutput] = []
        steps = [s for s in registry.steps if site in s.sites]
        if message.topic in internal:
            model, handler_of = internal[message.topic]
            handlers = [h for s in steps if (h := handler_of(s)) is not None]
            value = _decode_internal(model, message) if handlers else None
            if value is not None:
                for handler in handlers:
                    out.extend(handler(site, value))
            return out
        telemetry_steps = [s.telemetry for s in steps if s.telemetry is not None]
        if not telemetry_steps:
            return out
        batch, _ = codec.decode_telemetry(message.value)
        if batch is None or batch.site != site:
            return out  # dead-lettered by the arbitrage agent
        for telemetry_step in telemetry_steps:
            out.extend(telemetry_step(site, batch))
        return out

    async def site_agents(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            site = (message.key or b"").decode("utf-8", "replace")
            for item in run_steps(message, site):
                await outputs[type(item)].send(key=site.encode(), value=codec.encode(item))

    app.agent(source, name=f"{__name__}.site_agents", supervisor_strategy=AGENT_SUPERVISOR)(
        site_agents
    )


def _decode_internal(model: type[M], message: Any) -> M | None:
    """Decode a record of an internal fan-out topic (validated when it was fanned out)."""
    try:
        return codec.decode(model, message.value)
    except codec.DecodeError as error:
        log.error("skipped an invalid record on %s: %s", message.topic, error.reason)
        return None
