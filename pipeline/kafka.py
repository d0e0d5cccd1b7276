"""Kafka plumbing shared by connectors, sinks and commands: clients, topics, lag.

Everything here speaks aiokafka directly; Faust is configured from the same
settings in :mod:`pipeline.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
)

from pipeline import topics
from pipeline.backoff import Backoff
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


ONE_SHOT_START_TIMEOUT_S = 30.0
"""The longest a one-shot command (``record``, ``ingest tou``, ``demo``) waits for the
broker: someone is waiting for its answer, and a typo in WATTSTREAM_BROKER should not
look like a hang."""
START_RETRY_INITIAL_S = 0.5
"""First delay between attempts: a broker starting beside the worker answers within it."""
ATTEMPT_TIMEOUT_S = 5.0
"""One attempt's connect and metadata request; a blackholed address costs this much."""


class BrokerWaitStopped(Exception):
    """SIGINT or SIGTERM arrived while a command was waiting for the broker."""

    retriable = False


def start_timeout_s(settings: Settings, *, long_running: bool) -> float | None:
    """How long a command waits for the broker at start-up; None: as long as it takes.

    Long-running commands (worker, connectors, replay) wait ``kafka.start_timeout_s``
    (0: without limit); one-shot ones at most :data:`ONE_SHOT_START_TIMEOUT_S`.
    """
    configured = settings.kafka.start_timeout_s or None
    if long_running:
        return configured
    return min(configured, ONE_SHOT_START_TIMEOUT_S) if configured else ONE_SHOT_START_TIMEOUT_S


async def wait_for_broker_at_start(settings: Settings, *, long_running: bool) -> None:
    """:func:`wait_for_broker` for a command starting up, ended by SIGINT or SIGTERM.

    Raises :class:`BrokerWaitStopped` on a signal (a clean stop, not an error), and
    ConnectionError when the wait of :func:`start_timeout_s` is over. The handlers are
    removed afterwards, so the command can install its own.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signalled: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        signalled.append(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        await wait_for_broker(settings, start_timeout_s(settings, long_running=long_running))
    except asyncio.CancelledError:
        if not signalled:
            raise
        task.uncancel()
        raise BrokerWaitStopped(
            f"stopped by {signalled[0].name} while waiting for the Kafka broker "
            f"{bootstrap_servers(settings)!r}"
        ) from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def wait_for_broker(
    settings: Settings, timeout_s: float | None = ONE_SHOT_START_TIMEOUT_S
) -> None:
    """Wait until the cluster answers a metadata request; ``timeout_s`` None: no limit.

    Attempts follow a capped exponential backoff with jitter (0.5 s up to
    ``kafka.start_retry_max_s``). Each failed one logs a single WARNING line: the
    address, why it failed, the next delay and the setting to check, never a stack
    trace, as a broker that is not up yet is an expected condition. When ``timeout_s``
    is over, raises ConnectionError with the address and the last error.
    """
    address = bootstrap_servers(settings)
    loop = asyncio.get_running_loop()
    started = loop.time()
    backoff = Backoff(
        START_RETRY_INITIAL_S, max(START_RETRY_INITIAL_S, settings.kafka.start_retry_max_s)
    )
    limit = (
        "without a time limit (WATTSTREAM_KAFKA_START_TIMEOUT_S)"
        if timeout_s is None
        else f"at most {timeout_s:g} s"
    )
    attempt = 0
    # aiokafka logs every failed connect as an ERROR, with a traceback for some; while we
    # wait, the one line per attempt below is what the operator needs.
    with _quiet("aiokafka"):
        while True:
            attempt += 1
            attempt_s = ATTEMPT_TIMEOUT_S
            if timeout_s is not None:  # the last attempt ends near the deadline
                attempt_s = min(attempt_s, max(started + timeout_s - loop.time(), 0.1))
            try:
                await _probe(settings, attempt_s)
            except _BrokerNotAnswering as error:
                reason = str(error)
            else:
                if attempt > 1:
                    log.info(
                        "Kafka broker %r answered (attempt %d, after %.1f s)",
                        address,
                        attempt,
                        loop.time() - started,
                    )
                return
            waited_s = loop.time() - started
            if timeout_s is not None and waited_s >= timeout_s:
                raise ConnectionError(
                    f"Kafka broker {address!r} did not answer within {timeout_s:.0f} s "
                    f"({reason}); check WATTSTREAM_BROKER"
                    + (
                        ", or WATTSTREAM_KAFKA_START_TIMEOUT_S (0 waits without limit)"
                        if settings.kafka.start_timeout_s
                        else ""
                    )
                )
            delay_s = backoff.next_delay_s()
            if timeout_s is not None:
                delay_s = min(delay_s, max(timeout_s - waited_s, 0.0))
            log.warning(
                "Kafka broker %r not answering (%s): attempt %d after %.1f s, next in %.1f s, "
                "waiting %s; check WATTSTREAM_BROKER",
                address,
                reason,
                attempt,
                waited_s,
                delay_s,
                limit,
            )
            await asyncio.sleep(delay_s)


class _BrokerNotAnswering(Exception):
    """One attempt failed in a way that waiting may fix; the message says how."""


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _addresses(bootstrap: str) -> list[tuple[str, int]]:
    addresses = []
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        if not host:  # no port given: Kafka's default
            host, port = port, "9092"
        addresses.append((host.strip("[]"), int(port) if port.isdigit() else 9092))
    return addresses


def _reason(error: BaseException) -> str:
    """Why a connection failed, in words: aiokafka only says "Unable to bootstrap"."""
    if isinstance(error, socket.gaierror):
        return f"unknown host ({error.strerror})"
    if isinstance(error, TimeoutError):
        return "no answer (timed out)"
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno).lower()
    return f"{type(error).__name__}: {error}"


async def broker_accepts(settings: Settings, timeout_s: float) -> str | None:
    """None if a bootstrap address accepts a TCP connection, else why none did."""
    failures = []
    for host, port in _addresses(bootstrap_servers(settings)):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (OSError, TimeoutError) as error:
            failures.append(f"{host}:{port}: {_reason(error)}")
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None
    return failures[0].split(": ", 1)[1] if len(failures) == 1 else "; ".join(failures)


async def _probe(settings: Settings, timeout_s: float) -> None:
    """One attempt: a TCP connect to each bootstrap address until one accepts, then a
    metadata request. Raises :class:`_BrokerNotAnswering`, or ConnectionError for an
    answer that retrying will not change."""
    failure = await broker_accepts(settings, timeout_s)
    if failure is not None:
        raise _BrokerNotAnswering(failure)
    admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(_list_topics(admin), timeout_s + 1)
    except (KafkaConnectionError, KafkaTimeoutError, OSError, TimeoutError) as error:
        raise _BrokerNotAnswering(_reason(error)) from None
    except KafkaError as error:
        if error.retriable:
            raise _BrokerNotAnswering(_reason(error)) from None
        raise ConnectionError(
            f"Kafka broker {bootstrap_servers(settings)!r} answered {type(error).__name__}: "
            f"{error}; check the kafka settings (WATTSTREAM_KAFKA_*)"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _list_topics(admin: AIOKafkaAdminClient) -> None:
    await admin.start()
    await admin.list_topics()


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
    return await read_topic(settings, settings.topic(spec), timeout_s)


async def read_topic(
    settings: Settings, name: str, timeout_s: float = 60.0
) -> list[tuple[bytes | None, bytes]]:
    """:func:`read_all` of a topic by its full name (one outside the registry, such as
    a Faust table's changelog)."""
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
