"""Kafka plumbing shared by connectors, sinks and commands: clients, topics, lag.

Everything here speaks aiokafka directly; Faust is configured from the same
settings in :mod:`pipeline.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from pipeline import topics
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def bootstrap_servers(settings: Settings) -> str:
    if settings.broker is None:
        raise RuntimeError("no broker configured: start the embedded broker first (pipeline.local)")
    return settings.broker.removeprefix("kafka://")


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection and security options every aiokafka client takes."""
    kafka = settings.kafka
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None
        )
        if kafka.ssl_certfile:
            context.load_cert_chain(
                str(kafka.ssl_certfile), str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None
            )
        kwargs["ssl_context"] = context
    if kafka.security_protocol.startswith("SASL"):
        assert kafka.sasl_password is not None  # checked by KafkaSettings
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        kwargs["sasl_plain_username"] = kafka.sasl_username
        kwargs["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return kwargs


def producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """A producer for wattstream's messages: acks from all replicas, no idempotence.

    Idempotent producers fail on the embedded broker, and at-least-once delivery
    with deterministic ids is the design anyway: a duplicate is harmless.
    """
    kwargs: dict[str, Any] = {
        **client_kwargs(settings),
        "acks": "all",
        "enable_idempotence": False,
        "linger_ms": 5,
        "max_request_size": settings.kafka.max_message_bytes,
        "compression_type": None,
    }
    if settings.single_record_batches:
        # A batch always takes its first record, so 1 byte means one record per batch.
        kwargs["max_batch_size"] = 1
    else:
        kwargs["max_batch_size"] = 1_048_576
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


def consumer(
    settings: Settings, *topic_names: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    kwargs: dict[str, Any] = {
        **client_kwargs(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": int(settings.kafka.session_timeout_s * 1000),
        "heartbeat_interval_ms": int(settings.kafka.heartbeat_interval_s * 1000),
        "max_partition_fetch_bytes": settings.kafka.max_message_bytes,
        "fetch_max_bytes": max(52_428_800, settings.kafka.max_message_bytes),
    }
    kwargs.update(overrides)
    return AIOKafkaConsumer(*topic_names, **kwargs)


async def ensure_topics(
    settings: Settings, specs: Iterable[topics.TopicSpec] = topics.ALL_TOPICS
) -> list[str]:
    """Create every topic with its partitions and retention; existing ones are kept.

    Topics must exist with the right partition count before Faust starts, or its
    agents crash later with PartitionsMismatch against their changelogs, while the
    worker keeps running. So an existing topic with another partition count stops
    start-up here with a :class:`TopicMismatchError` naming the setting.
    Returns the names created.
    """
    specs = list(specs)
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        await _check_partitions(
            admin, settings, [s for s in specs if settings.topic(s) in existing]
        )
        new = [
            NewTopic(
                name=settings.topic(spec),
                num_partitions=spec.partition_count(settings.partitions),
                replication_factor=settings.kafka.replication_factor,
                topic_configs=spec.configs(),
            )
            for spec in specs
            if settings.topic(spec) not in existing
        ]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                log.debug("topics created concurrently by another process")
        return [topic.name for topic in new]
    finally:
        await admin.close()


class TopicMismatchError(RuntimeError):
    """An existing topic does not match the settings; retrying will not help."""

    retriable = False


async def _check_partitions(
    admin: AIOKafkaAdminClient, settings: Settings, specs: list[topics.TopicSpec]
) -> None:
    if not specs:
        return
    described = await admin.describe_topics([settings.topic(spec) for spec in specs])
    actual = {topic["topic"]: len(topic["partitions"]) for topic in described}
    wrong = [
        f"{settings.topic(spec)} has {actual.get(settings.topic(spec))} partitions, "
        f"expected {spec.partition_count(settings.partitions)}"
        for spec in specs
        if actual.get(settings.topic(spec)) != spec.partition_count(settings.partitions)
    ]
    if wrong:
        raise TopicMismatchError(
            "existing topics do not match the settings: "
            + "; ".join(wrong)
            + ". Site-keyed topics take `partitions` (WATTSTREAM_PARTITIONS), which must "
            "equal the count the topics were created with (or use a new topic_prefix)."
        )


async def wait_for_broker(settings: Settings, timeout_s: float = 30.0) -> None:
    """Wait until the cluster answers a metadata request, retrying with backoff.

    Raises ConnectionError with the address tried, never a stack trace of
    retries, when it does not answer in time.
    """
    # aiokafka logs every failed connect as an ERROR; while we wait, the one
    # clear message below is what the operator needs.
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)
    try:
        last_error = await _probe_until_answered(settings, timeout_s)
    finally:
        aiokafka_log.setLevel(level)
    if last_error is not None:
        raise ConnectionError(
            f"Kafka broker {bootstrap_servers(settings)!r} did not answer within "
            f"{timeout_s:.0f} s ({last_error}); check WATTSTREAM_BROKER"
        )


async def _probe_until_answered(settings: Settings, timeout_s: float) -> Exception | None:
    """None once the broker answers; the last error if it never did in ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay_s = 0.1
    last_error: Exception = TimeoutError("no attempt finished")
    while loop.time() < deadline:
        admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=5000)
        try:
            await admin.start()
            await admin.list_topics()
            return None
        except (KafkaConnectionError, OSError) as error:
            last_error = error
        finally:
            await admin.close()
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 2.0)
    return last_error


@dataclass(frozen=True)
class GroupLag:
    group: str
    committed: Mapping[TopicPartition, int]
    end: Mapping[TopicPartition, int]

    @property
    def total(self) -> int:
        return sum(max(0, end - self.committed.get(tp, 0)) for tp, end in self.end.items())


@contextlib.asynccontextmanager
async def running(probe: AIOKafkaConsumer) -> AsyncIterator[AIOKafkaConsumer]:
    """A started short-lived consumer, stopped on exit.

    The yield after start() lets aiokafka's background task begin: stopped before
    it ever ran, the consumer's close() raises CancelledError (aiokafka 0.14).
    """
    await probe.start()
    try:
        await asyncio.sleep(0)
        yield probe
    finally:
        await probe.stop()


async def end_offsets(settings: Settings, topic_names: Iterable[str]) -> dict[TopicPartition, int]:
    """End offsets of every partition of the topics; a topic that does not exist has none."""
    async with running(consumer(settings, group_id=None)) as probe:
        partitions = [
            TopicPartition(name, p)
            for name in topic_names
            for p in sorted(probe.partitions_for_topic(name) or await _partitions(probe, name))
        ]
        return dict(await probe.end_offsets(partitions)) if partitions else {}


async def _partitions(probe: AIOKafkaConsumer, name: str) -> set[int]:
    await probe._client.force_metadata_update()
    return probe.partitions_for_topic(name) or set()


async def group_lag(settings: Settings, group: str, topic_names: Iterable[str]) -> GroupLag:
    """Committed offsets of a consumer group against the topics' end offsets.

    Reads the commits through a consumer of the group that never subscribes (so
    it does not join or disturb the group): aiokafka's admin OffsetFetch cannot
    decode the embedded broker's answer, the consumer's request can.
    """
    ends = await end_offsets(settings, list(topic_names))
    committed = {}
    async with running(consumer(settings, group_id=group)) as reader:
        for tp in ends:
            offset = await reader.committed(tp)
            if offset is not None and offset >= 0:
                committed[tp] = offset
    return GroupLag(group=group, committed=committed, end=ends)


async def read_all(
    settings: Settings, spec: topics.TopicSpec, timeout_s: float = 60.0
) -> list[tuple[bytes | None, bytes]]:
    """Every (key, value) on a topic from the beginning to its current end, no group.

    For summaries and tests; a consumer that must keep up uses a group instead.
    A topic that does not exist (yet) reads as empty.
    """
    name = settings.topic(spec)
    ends = await end_offsets(settings, [name])
    remaining = {tp for tp, end in ends.items() if end > 0}
    records: list[tuple[bytes | None, bytes]] = []
    if not remaining:
        return records
    async with running(consumer(settings, group_id=None)) as reader:
        reader.assign(list(ends))
        await reader.seek_to_beginning(*ends)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while remaining:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{name}: could not read to the end offsets {ends}")
            batches = await reader.getmany(*remaining, timeout_ms=1000)
            for tp, messages in batches.items():
                records.extend((m.key, m.value) for m in messages if m.offset < ends[tp])
                if messages and messages[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
    return records


async def wait_until_drained(
    settings: Settings,
    groups: Mapping[str, Iterable[str]],
    *,
    timeout_s: float,
    settle_s: float = 1.5,
    failed: Callable[[], BaseException | None] = lambda: None,
) -> None:
    """Wait until every group has committed everything on its topics, and it stays so.

    "Stays so" (two checks ``settle_s`` apart) because a processor commits its
    input before the sink has seen the outputs it produced. ``failed`` returns
    the error of a consumer that died meanwhile, which is raised at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    quiet_checks = 0
    while True:
        if (error := failed()) is not None:
            raise RuntimeError(f"a consumer failed while draining: {error!r}") from error
        lags = [await group_lag(settings, group, names) for group, names in groups.items()]
        quiet_checks = quiet_checks + 1 if all(lag.total == 0 for lag in lags) else 0
        if quiet_checks >= 2:
            return
        if loop.time() > deadline:
            behind = {lag.group: lag.total for lag in lags if lag.total}
            raise TimeoutError(f"consumers still behind after {timeout_s:.0f} s: {behind}")
        await asyncio.sleep(settle_s)
