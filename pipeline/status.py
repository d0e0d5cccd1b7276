"""``wattstream status``: what a running deployment holds, read from its broker and worker.

Topics (partitions, offsets), consumer groups and their lag, dead letters counted by
(component, error type), and the sinks' state from the worker's Prometheus endpoint.
Plain async functions and dataclasses; :mod:`pipeline.cli_status` prints them.

Nothing here joins a consumer group or writes to the broker: the status of a
deployment must not disturb it (a joining member would trigger a rebalance).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from pipeline import kafka, topics
from pipeline.settings import Settings

UNDECODABLE = "undecodable"
"""The error type under which a dead letter that is not a JSON object is counted."""
REASON_EXAMPLE_MAX_CHARS = 500
"""Reasons may quote a whole record; one screen needs the first lines only."""

SINK_UP = "wattstream_sink_up"
SINK_BUFFER = "wattstream_sink_buffer_points"
SINK_POINTS = "wattstream_sink_points_total"
READY = "wattstream_ready"
OUTCOMES = ("written", "retried", "dropped")


class BrokerUnreachableError(ConnectionError):
    """The broker did not answer in time; the message names its address."""


@dataclass(frozen=True)
class PartitionStatus:
    partition: int
    beginning: int
    end: int

    @property
    def messages(self) -> int:
        return max(0, self.end - self.beginning)


@dataclass(frozen=True)
class TopicStatus:
    name: str
    exists: bool
    expected_partitions: int
    partitions: tuple[PartitionStatus, ...] = ()

    @property
    def messages(self) -> int:
        return sum(p.messages for p in self.partitions)

    @property
    def end(self) -> int:
        return sum(p.end for p in self.partitions)


@dataclass(frozen=True)
class GroupPartitionStatus:
    topic: str
    partition: int
    committed: int | None
    """None: the group has committed nothing on this partition ("no commit")."""
    end: int
    lag: int
    """``end - committed``, or ``end - beginning`` without a commit."""


@dataclass(frozen=True)
class GroupStatus:
    group: str
    state: str | None
    """As the broker describes it (Stable, Empty...); None when it would not say."""
    members: int | None
    partitions: tuple[GroupPartitionStatus, ...] = ()

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)


@dataclass(frozen=True)
class DeadLetterGroup:
    component: str
    error_type: str
    count: int
    example_reason: str
    source_topics: tuple[str, ...]


@dataclass(frozen=True)
class DeadLetterSummary:
    topic: str
    total: int
    """Records read (from the beginning to the end offsets captured at the start)."""
    expected: int
    """Records between the beginning and end offsets: ``total`` is less when the read
    timed out (``complete`` False)."""
    complete: bool
    groups: tuple[DeadLetterGroup, ...] = ()


@dataclass(frozen=True)
class SinkStatus:
    sink: str
    up: bool | None
    buffered_points: int | None
    written: int | None
    retried: int | None
    dropped: int | None


@dataclass(frozen=True)
class MetricsStatus:
    url: str
    error: str | None = None
    """``metrics unreachable: <reason>`` when the endpoint did not answer; then no sinks."""
    ready: bool | None = None
    sinks: tuple[SinkStatus, ...] = ()

    @property
    def reachable(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class DeploymentStatus:
    broker: str
    collected_at: datetime
    topics: tuple[TopicStatus, ...]
    groups: tuple[GroupStatus, ...]
    dead_letters: DeadLetterSummary
    metrics: MetricsStatus | None = None
    warnings: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the dataclass fields plus the derived totals."""
        data: dict[str, Any] = dataclasses.asdict(self)
        data["collected_at"] = self.collected_at.isoformat()
        for topic, out in zip(self.topics, data["topics"], strict=True):
            out["messages"] = topic.messages
            for part, part_out in zip(topic.partitions, out["partitions"], strict=True):
                part_out["messages"] = part.messages
        for group, out in zip(self.groups, data["groups"], strict=True):
            out["lag"] = group.lag
        if self.metrics is not None:
            data["metrics"]["reachable"] = self.metrics.reachable
        return data


async def collect_status(
    settings: Settings, *, metrics_url: str | None = None, timeout_s: float = 5.0
) -> DeploymentStatus:
    """Everything ``wattstream status`` shows, from the broker (and the worker's metrics).

    Raises :class:`BrokerUnreachableError` when the broker does not answer within
    ``timeout_s``. The dead-letter read is bounded by ``timeout_s`` too; a read cut
    short is reported as incomplete, not raised. An unreachable metrics endpoint is
    an entry of the result.
    """
    address = _address(settings)
    try:
        await kafka.wait_for_broker(settings, timeout_s)
    except ConnectionError as error:
        raise BrokerUnreachableError(str(error)) from None
    metrics_task = (
        asyncio.create_task(collect_metrics(metrics_url, timeout_s=timeout_s))
        if metrics_url
        else None
    )
    try:
        try:
            topic_states, group_states, warnings = await asyncio.wait_for(
                _collect_broker(settings), timeout_s * 3
            )
        except (TimeoutError, KafkaError, OSError) as error:
            raise BrokerUnreachableError(
                f"Kafka broker {address!r} stopped answering while reading the status "
                f"({type(error).__name__}: {error or 'timed out'}); check WATTSTREAM_BROKER"
            ) from None
        dead = await read_dead_letters(settings, topic_states, timeout_s=timeout_s)
        metrics = await metrics_task if metrics_task is not None else None
    finally:
        if metrics_task is not None and not metrics_task.done():
            metrics_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await metrics_task
    return DeploymentStatus(
        broker=address,
        collected_at=datetime.now(UTC),
        topics=topic_states,
        groups=group_states,
        dead_letters=dead,
        metrics=metrics,
        warnings=tuple(warnings),
    )


def _address(settings: Settings) -> str:
    try:
        return kafka.bootstrap_servers(settings)
    except RuntimeError:
        # The embedded broker lives inside a worker process and dies with it: there
        # is no address to ask unless the operator names one.
        raise BrokerUnreachableError(
            "no broker configured: set WATTSTREAM_BROKER (or `broker` in --config) to the "
            "deployment's Kafka bootstrap address"
        ) from None


async def _collect_broker(
    settings: Settings,
) -> tuple[tuple[TopicStatus, ...], tuple[GroupStatus, ...], list[str]]:
    warnings: list[str] = []
    admin = AIOKafkaAdminClient(**kafka.client_kwargs(settings))
    await admin.start()
    try:
        # list_topics, not describe_topics, decides existence: a metadata request for
        # a missing topic auto-creates it on brokers that allow it (tansu does).
        existing = set(await admin.list_topics())
        names = [settings.topic(spec) for spec in topics.ALL_TOPICS]
        present = [name for name in names if name in existing]
        described = await admin.describe_topics(present) if present else []
        partitions = {
            t["topic"]: sorted(p["partition"] for p in t["partitions"]) for t in described
        }
        group_ids = await _group_ids(admin, settings, warnings)
        described_groups = await _describe_groups(admin, group_ids, warnings)
    finally:
        await admin.close()

    tps = [TopicPartition(name, p) for name in present for p in partitions.get(name, [])]
    async with kafka.running(kafka.consumer(settings, group_id=None)) as probe:
        ends: dict[TopicPartition, int] = dict(await probe.end_offsets(tps)) if tps else {}
        starts: dict[TopicPartition, int] = dict(await probe.beginning_offsets(tps)) if tps else {}
    topic_states = tuple(
        TopicStatus(
            name=settings.topic(spec),
            exists=settings.topic(spec) in existing,
            expected_partitions=spec.partition_count(settings.partitions),
            partitions=tuple(
                PartitionStatus(p, starts[tp], ends[tp])
                for p in partitions.get(settings.topic(spec), [])
                if (tp := TopicPartition(settings.topic(spec), p)) in ends
            ),
        )
        for spec in topics.ALL_TOPICS
    )
    for topic in topic_states:
        if topic.exists and len(topic.partitions) != topic.expected_partitions:
            warnings.append(
                f"{topic.name} has {len(topic.partitions)} partitions, expected "
                f"{topic.expected_partitions} (WATTSTREAM_PARTITIONS)"
            )

    group_states = []
    for group in group_ids:
        committed = await _committed(settings, group, tps)
        if not committed and group != settings.app_id:
            continue  # a group of another application on a shared cluster
        state, members = described_groups.get(group, (None, None))
        group_states.append(
            GroupStatus(
                group=group,
                state=state,
                members=members,
                partitions=_group_partitions(committed, starts, ends),
            )
        )
    return topic_states, tuple(group_states), warnings


async def _group_ids(
    admin: AIOKafkaAdminClient, settings: Settings, warnings: list[str]
) -> list[str]:
    try:
        listed = await admin.list_consumer_groups()
    except KafkaError as error:
        warnings.append(f"could not list consumer groups ({type(error).__name__}: {error})")
        listed = []
    ids = sorted({str(entry[0]) for entry in listed} - {settings.app_id})
    return [settings.app_id, *ids]


async def _describe_groups(
    admin: AIOKafkaAdminClient, group_ids: list[str], warnings: list[str]
) -> dict[str, tuple[str | None, int | None]]:
    """State and member count of each group, one request per group: the embedded broker
    answers a DescribeGroups of several groups with a response aiokafka cannot decode."""
    described: dict[str, tuple[str | None, int | None]] = {}
    failed: list[str] = []
    # A failed decode is logged by aiokafka as an ERROR with a traceback; the warning
    # in the result says what the operator needs.
    with kafka._quiet("aiokafka"):
        for group_id in group_ids:
            try:
                responses = await admin.describe_consumer_groups([group_id])
            except KafkaError as error:
                failed.append(f"{group_id} ({type(error).__name__})")
                continue
            for response in responses:
                for entry in response.groups:
                    error_code, group, state, *_, members = entry
                    if error_code == 0:
                        described[str(group)] = (str(state) or None, len(members))
    if failed:
        warnings.append("could not describe consumer groups: " + ", ".join(failed))
    return described


async def _committed(
    settings: Settings, group: str, tps: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """The group's commits on the partitions, read without joining the group.

    aiokafka's admin OffsetFetch cannot decode the embedded broker's answer, the
    consumer's can (see :func:`pipeline.kafka.group_lag`). One request for all
    partitions through the coordinator: ``committed()`` costs a round trip each.
    """
    if not tps:
        return {}
    async with kafka.running(kafka.consumer(settings, group_id=group)) as reader:
        offsets = await _fetch_committed(reader, tps)
    return {tp: offset for tp, offset in offsets.items() if offset is not None and offset >= 0}


async def _fetch_committed(
    reader: AIOKafkaConsumer, tps: list[TopicPartition]
) -> dict[TopicPartition, int | None]:
    coordinator = getattr(reader, "_coordinator", None)
    if coordinator is not None and hasattr(coordinator, "fetch_committed_offsets"):
        answer = await coordinator.fetch_committed_offsets(tps)
        return {tp: answer[tp].offset if tp in answer else None for tp in tps}
    return {tp: await reader.committed(tp) for tp in tps}


def _group_partitions(
    committed: Mapping[TopicPartition, int],
    starts: Mapping[TopicPartition, int],
    ends: Mapping[TopicPartition, int],
) -> tuple[GroupPartitionStatus, ...]:
    """Every partition of each topic the group has committed on, with its lag.

    The broker only says which partitions a group committed; a partition of the same
    topic without a commit is one the group reads too, and will read from the start.
    """
    group_topics = {tp.topic for tp in committed}
    rows = []
    for tp in sorted(ends, key=lambda tp: (tp.topic, tp.partition)):
        if tp.topic not in group_topics:
            continue
        offset = committed.get(tp)
        lag = ends[tp] - (offset if offset is not None else starts.get(tp, 0))
        rows.append(GroupPartitionStatus(tp.topic, tp.partition, offset, ends[tp], max(0, lag)))
    return tuple(rows)


async def read_dead_letters(
    settings: Settings, topic_states: Iterable[TopicStatus], *, timeout_s: float
) -> DeadLetterSummary:
    """Count the dead-letter topic's records by (component, error type), one read.

    Reads from the beginning to the end offsets in ``topic_states`` (captured before),
    so letters arriving meanwhile do not keep it reading; stops at ``timeout_s``.
    """
    name = settings.topic(topics.DEAD_LETTERS)
    state = next((t for t in topic_states if t.name == name), None)
    ends = {
        TopicPartition(name, p.partition): p.end
        for p in (state.partitions if state else ())
        if p.end > p.beginning
    }
    expected = sum(p.messages for p in state.partitions) if state else 0
    counts: dict[tuple[str, str], int] = {}
    examples: dict[tuple[str, str], str] = {}
    sources: dict[tuple[str, str], set[str]] = {}
    total = 0
    complete = True
    if ends:
        async with kafka.running(kafka.consumer(settings, group_id=None)) as reader:
            reader.assign(list(ends))
            await reader.seek_to_beginning(*ends)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            remaining = set(ends)
            while remaining:
                left_s = deadline - loop.time()
                if left_s <= 0:
                    complete = False
                    break
                batches = await reader.getmany(
                    *remaining, timeout_ms=int(min(left_s, 1.0) * 1000) or 1
                )
                for tp, messages in batches.items():
                    for message in messages:
                        if message.offset >= ends[tp]:
                            continue
                        total += 1
                        component, error_type, reason, source = _classify(message.value)
                        key = (component, error_type)
                        counts[key] = counts.get(key, 0) + 1
                        examples.setdefault(key, reason[:REASON_EXAMPLE_MAX_CHARS])
                        if source:
                            sources.setdefault(key, set()).add(source)
                for tp in list(remaining):
                    # The position, not the last offset seen: compaction leaves gaps.
                    if await reader.position(tp) >= ends[tp]:
                        remaining.discard(tp)
    groups = tuple(
        DeadLetterGroup(
            component=component,
            error_type=error_type,
            count=count,
            example_reason=examples[(component, error_type)],
            source_topics=tuple(sorted(sources.get((component, error_type), ()))),
        )
        for (component, error_type), count in sorted(
            counts.items(), key=lambda item: (-item[1], item[0])
        )
    )
    return DeadLetterSummary(
        topic=name, total=total, expected=expected, complete=complete, groups=groups
    )


def _classify(value: bytes | None) -> tuple[str, str, str, str | None]:
    """(component, error type, reason, source topic) of one dead letter's value.

    Lenient on purpose: a letter written by an older or newer wattstream still counts
    under the fields it has, rather than as undecodable.
    """
    try:
        letter = orjson.loads(value or b"")
    except orjson.JSONDecodeError as error:
        return "unknown", UNDECODABLE, f"not JSON: {error}", None
    if not isinstance(letter, dict):
        return "unknown", UNDECODABLE, f"not a JSON object: {type(letter).__name__}", None
    source = letter.get("source_topic")
    return (
        str(letter.get("component") or "unknown"),
        str(letter.get("error_type") or "unknown"),
        str(letter.get("reason") or ""),
        str(source) if source else None,
    )


async def collect_metrics(url: str, *, timeout_s: float = 5.0) -> MetricsStatus:
    """The sinks' state from a worker's Prometheus text endpoint; never raises for it."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(url) as response,
        ):
            if response.status != 200:
                return MetricsStatus(url, error=f"metrics unreachable: HTTP {response.status}")
            text = await response.text()
    except TimeoutError:
        return MetricsStatus(url, error=f"metrics unreachable: no answer within {timeout_s:g} s")
    except aiohttp.ClientConnectorError as error:
        reason = kafka._reason(error.os_error)
        return MetricsStatus(url, error=f"metrics unreachable: {error.host}:{error.port}: {reason}")
    except (aiohttp.ClientError, OSError, ValueError) as error:
        return MetricsStatus(url, error=f"metrics unreachable: {_describe(error)}")
    try:
        return parse_metrics(url, text)
    except ValueError as error:
        return MetricsStatus(url, error=f"metrics unreachable: not Prometheus text ({error})")


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def parse_metrics(url: str, text: str) -> MetricsStatus:
    """The sinks' figures in a Prometheus text exposition (see the module's names)."""
    up: dict[str, bool] = {}
    buffered: dict[str, int] = {}
    points: dict[str, dict[str, int]] = {}
    ready: bool | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sink = sample.labels.get("sink")
            if sample.name == READY:
                ready = sample.value >= 1
            elif sink is None:
                continue
            elif sample.name == SINK_UP:
                up[sink] = sample.value >= 1
            elif sample.name == SINK_BUFFER:
                buffered[sink] = int(sample.value)
            elif sample.name == SINK_POINTS:
                outcome = sample.labels.get("outcome", "")
                by_outcome = points.setdefault(sink, {})
                by_outcome[outcome] = by_outcome.get(outcome, 0) + int(sample.value)
    sinks = tuple(
        SinkStatus(
            sink=sink,
            up=up.get(sink),
            buffered_points=buffered.get(sink),
            # A labelled counter shows an outcome only once it happened: absent is 0.
            written=points[sink].get("written", 0) if sink in points else None,
            retried=points[sink].get("retried", 0) if sink in points else None,
            dropped=points[sink].get("dropped", 0) if sink in points else None,
        )
        for sink in sorted(set(up) | set(buffered) | set(points))
    )
    return MetricsStatus(url, ready=ready, sinks=sinks)
