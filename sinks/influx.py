"""InfluxDB sink: Kafka topics -> line protocol -> InfluxDB (v1 or v2 API) or a file.

Kafka is the durable buffer. The sink reads with its own consumer group and
commits offsets only after the points of those records were written. While
InfluxDB is unreachable it pauses its partitions (no more fetching: the
backlog waits in Kafka, bounded by the topic's retention, not by our memory),
retries with capped exponential backoff plus jitter, honouring
``Retry-After``, and resumes where it stopped. Nothing is lost in an outage;
after a crash the uncommitted records are written again, which is harmless
because every point's timestamp comes from its message.

Outcomes of a failed write (after Telegraf's InfluxDB output):

* 400 / 422: the points can never be written: logged as "dropped" with the
  server's reason, counted, committed (poison data must not stop the stream);
* 429 / 5xx / connection errors / timeouts: retried until they succeed;
* 401 / 403: :class:`SinkError` (not retriable): a setting is wrong.

The HTTP write is a POST of line protocol (aiohttp), not influxdb-client's
write API: that API buffers in memory and retries on its own, then drops,
while this sink must know the outcome of each write to decide what to commit.
The line protocol itself is influxdb-client's (see :mod:`sinks.lineprotocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import aiohttp
import polars as pl
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from influxdb_client import WritePrecision
from influxdb_client.client.exceptions import InfluxDBError
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.rest import ApiException
from pydantic import BaseModel

from pipeline import codec, kafka, metrics, topics
from pipeline.backoff import Backoff
from pipeline.schemas import TelemetryBatch
from pipeline.settings import InfluxSettings, Settings
from sinks.columnar import encode_telemetry
from sinks.lineprotocol import LINES_BY_SCHEMA, point_line

log = logging.getLogger(__name__)

DEFAULT_TOPICS = (
    topics.TELEMETRY,
    topics.PRICES,
    topics.CARBON,
    topics.DECISIONS,
    topics.ALERTS,
    topics.ALLOCATIONS,
    topics.EMISSIONS,
    topics.CERTIFICATES,
    topics.COMMANDS,
    topics.EV_SESSIONS,
    topics.PATENTS,
)
"""Every topic with a line-protocol mapping: what Grafana's dashboards read."""


_POLL_AT_LEAST_EVERY_S = 10.0


class SinkError(Exception):
    """A failure retrying cannot fix (bad credentials, a missing database)."""

    retriable = False


class RetriableWriteError(Exception):
    retriable = True

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RejectedPointsError(Exception):
    """The server refused the points themselves (400/422): retrying cannot help."""

    retriable = False


class Writer(Protocol):
    target: str

    async def start(self) -> None: ...
    async def write(self, body: bytes) -> None: ...
    async def close(self) -> None: ...


def _retry_after(value: str | float | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from InfluxDB; fall back to our backoff


def _raise_for_status(
    target: str, status: int, text: str, retry_after_s: float | None, api: str
) -> None:
    """Turn a failed write's answer into the exception that says what to do about it."""
    if status in (401, 403):
        raise SinkError(f"{target}: write refused with {status} (check credentials): {text}")
    if status in (400, 413, 422):
        raise RejectedPointsError(f"{target}: {status}: {text}")
    if status == 404 and api == "v1" and "database not found" in text:
        # Created at start-up unless create_database is off: a setting to fix, not a retry.
        raise SinkError(f"{target}: {text}; create it or set influx.create_database")
    if status == 404:
        raise SinkError(f"{target}: {status} (wrong URL or API version?): {text}")
    raise RetriableWriteError(f"{target}: {status}: {text}", retry_after_s)


class V1Writer:
    """POSTs line protocol to InfluxDB 1.x's ``/write`` (database, retention policy, user).

    InfluxDB 1.x before 1.8 has no v2 write API, and influxdb-client speaks only
    that one, so this path is a plain HTTP POST (aiohttp).
    """

    def __init__(self, influx: InfluxSettings) -> None:
        assert influx.url is not None
        self.influx = influx
        self.base_url = influx.url.rstrip("/")
        self.target = f"{self.base_url} (v1)"
        self._session: aiohttp.ClientSession | None = None

    def _auth(self) -> dict[str, str]:
        if self.influx.username and self.influx.password:
            return {"u": self.influx.username, "p": self.influx.password.get_secret_value()}
        return {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.influx.timeout_s)
        )
        try:
            async with self._session.get(f"{self.base_url}/ping") as response:
                version = response.headers.get("X-Influxdb-Version", "unknown")
                log.info("influx sink: %s answers, version %s", self.target, version)
        except (aiohttp.ClientError, TimeoutError) as error:
            # Not fatal: the sink retries writes until the server is there.
            log.warning("influx sink: %s not reachable yet (%s); will retry", self.target, error)
            return
        if self.influx.create_database:
            await self._create_database()

    async def _create_database(self) -> None:
        assert self._session is not None
        query = {"q": f'CREATE DATABASE "{self.influx.database}"', **self._auth()}
        async with self._session.post(f"{self.base_url}/query", params=query) as response:
            if response.status in (401, 403):
                raise SinkError(
                    f"{self.target}: not allowed to create database ({response.status})"
                )
            if response.status >= 300:
                log.warning("influx sink: CREATE DATABASE answered %d", response.status)

    async def write(self, body: bytes) -> None:
        if self._session is None:
            await self.start()
        assert self._session is not None
        params = {"db": self.influx.database, "precision": "ns", **self._auth()}
        if self.influx.retention_policy:
            params["rp"] = self.influx.retention_policy
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self.influx.gzip:
            # Level 1: several times faster than the default 9 and nearly as small.
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        try:
            async with self._session.post(
                f"{self.base_url}/write", params=params, data=body, headers=headers
            ) as response:
                if response.status < 300:
                    return
                text = (await response.text())[:500]
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as error:
            raise RetriableWriteError(f"{self.target}: {type(error).__name__}: {error}") from None
        _raise_for_status(self.target, status, text, retry_after, "v1")

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class V2Writer:
    """influxdb-client's async v2 write API: InfluxDB 2.x, 3.x, 1.8+ and compatible servers.

    ``WriteApiAsync`` sends each call as one request and raises on failure, so
    the sink knows the outcome of every write (its batching ``WriteApi`` would
    retry and drop on its own, out of the sink's sight).
    """

    def __init__(self, influx: InfluxSettings) -> None:
        assert influx.url is not None
        self.influx = influx
        self.target = f"{influx.url.rstrip('/')} (v2, bucket {influx.bucket})"
        self._client: InfluxDBClientAsync | None = None

    def _connect(self) -> InfluxDBClientAsync:
        token = self.influx.token.get_secret_value() if self.influx.token else ""
        return InfluxDBClientAsync(
            url=self.influx.url,
            token=token,
            org=self.influx.org,
            timeout=int(self.influx.timeout_s * 1000),
            enable_gzip=self.influx.gzip,
        )

    async def start(self) -> None:
        self._client = self._connect()
        try:
            version = await self._client.version()
            log.info("influx sink: %s answers, version %s", self.target, version)
        except (aiohttp.ClientError, TimeoutError, InfluxDBError) as error:
            log.warning("influx sink: %s not reachable yet (%s); will retry", self.target, error)

    async def write(self, body: bytes) -> None:
        if self._client is None:
            await self.start()
        assert self._client is not None
        try:
            await self._client.write_api().write(
                bucket=self.influx.bucket,
                org=self.influx.org,
                record=body,
                # WritePrecision holds str constants; the library's annotation says otherwise.
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]
            )
        except ApiException as error:
            text = str(error.message or error.body or error.reason)[:500]
            _raise_for_status(
                self.target, error.status or 0, text, _retry_after(error.retry_after), "v2"
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise RetriableWriteError(f"{self.target}: {type(error).__name__}: {error}") from None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class LineProtocolFileWriter:
    """Appends line protocol to a file; fsync before returning, so a commit after it is safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.target = f"file {path}"

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    async def write(self, body: bytes) -> None:
        await asyncio.to_thread(self._append, body + b"\n")

    def _append(self, data: bytes) -> None:
        with self.path.open("ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    async def close(self) -> None:
        return None


def make_writer(influx: InfluxSettings) -> Writer:
    if influx.url is None:
        return LineProtocolFileWriter(influx.file)
    return V1Writer(influx) if influx.api == "v1" else V2Writer(influx)


@dataclass
class SinkStats:
    records_consumed: int = 0
    points_written: int = 0
    batches_written: int = 0
    retries: int = 0
    points_retried: int = 0
    """Points of writes that failed and were tried again (once per failed attempt)."""
    points_dropped: int = 0
    """Points the server refused (400/422) plus records that did not decode."""
    overflow_records: int = 0
    """Records read while the buffer was full and put back into Kafka (read again
    later: nothing is lost, but the sink is behind)."""
    last_error: str | None = None

    def line(self, group_id: str, time_ns: int) -> bytes:
        """These counters as a point of ``wattstream_sink``, written with the data."""
        return point_line(
            "wattstream_sink",
            {"sink": "influx", "group": group_id},
            {
                "records_consumed": self.records_consumed,
                "points_written": self.points_written,
                "batches_written": self.batches_written,
                "retries": self.retries,
                "points_dropped": self.points_dropped,
                "overflow_records": self.overflow_records,
            },
            time_ns,
        )


@dataclass
class _Buffer:
    """Line protocol waiting to be written, and the offsets to commit once it is."""

    chunks: list[bytes] = field(default_factory=list)
    points: int = 0
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    oldest_s: float | None = None


class InfluxSink:
    """Consumes ``specs`` topics and writes their messages as points; see the module doc.

    The in-memory buffer holds at most ``influx.buffer_points`` points (one
    record bigger than that is taken alone). What does not fit is put back:
    the consumer seeks to it and pauses until a write succeeds, so it stays in
    Kafka, counted in ``overflow_records``, never dropped. During an outage the
    sink keeps reading into the buffer until it is full, then stops reading.
    """

    def __init__(
        self,
        settings: Settings,
        specs: Sequence[topics.TopicSpec] = DEFAULT_TOPICS,
        group_id: str | None = None,
        writer: Writer | None = None,
    ) -> None:
        self.settings = settings
        self.influx = settings.influx
        self.group_id = group_id or f"{settings.app_id}-sink-influx"
        self.schemas: dict[str, type[BaseModel]] = {
            settings.topic(spec): spec.value_schema for spec in specs
        }
        for spec in specs:
            if spec.value_schema not in LINES_BY_SCHEMA:
                raise ValueError(f"no line-protocol mapping for topic {spec.name}")
        self.topic_names = list(self.schemas)
        self.writer = writer or make_writer(self.influx)
        self.stats = SinkStats()
        # Made in start(): aiokafka binds a consumer to the running event loop.
        self._consumer: AIOKafkaConsumer = None
        self._buffer = _Buffer()
        self._in_flight_points = 0
        self._writing: asyncio.Task[bool] | None = None
        self._last_poll_s = 0.0
        self._writing_buffer = _Buffer()
        self._writing_started_s = 0.0
        self._retries_before = 0
        self._paused: set[TopicPartition] = set()
        self._points_per_record: float | None = None
        """Measured (moving average): sizes polls to fit the buffer and a batch."""
        self._started = False
        self._running = False
        self._run_exited = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closed = False
        self._failed = False
        self._abandoned = False
        """A write was given up at stop: no later offset may be committed past it."""

    name = "influx"

    def failing(self) -> str | None:
        """Why the last write failed (None once one succeeded): what readiness reports."""
        return self.stats.last_error

    def buffered_points(self) -> int:
        """Points waiting to be written: buffered, and in the write in flight."""
        return self._buffer.points + self._in_flight_points

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        metrics.SINKS.sinks.append(self)
        await self.writer.start()
        self._consumer = kafka.consumer(self.settings, *self.topic_names, group_id=self.group_id)
        await self._consumer.start()
        log.info(
            "influx sink: group %s, topics %s -> %s (batch %d points, buffer %d points)",
            self.group_id,
            self.topic_names,
            self.writer.target,
            self.influx.batch_size_points,
            self.influx.buffer_points,
        )

    async def run(self) -> None:
        """Consume, write and commit until :meth:`stop` (or cancellation), then flush.

        One write is in flight while the next batch is read and encoded, so
        encoding and InfluxDB's work overlap; offsets are committed in order,
        each after its own write.
        """
        await self.start()
        self._running = True
        try:
            while not self._stopping.is_set():
                if self._writing is not None and self._full() and not self._poll_overdue():
                    # Full: reading now would only put records back. Wait for the write.
                    await asyncio.wait({self._writing}, timeout=0.5)
                else:
                    # While a write is in flight, poll briefly so its end is noticed soon.
                    writing = self._writing is not None
                    await self._poll(timeout_s=0.05 if writing else self.influx.flush_interval_s)
                await self._reap()
                if self._writing is None and self._due():
                    self._start_write()
            await self._drain()
        except SinkError:
            self._failed = True  # nothing more is written; the offsets stay uncommitted
            raise
        finally:
            if self._writing is not None and not self._writing.done():
                self._writing.cancel()  # cancelled run: its offsets stay uncommitted
            self._running = False
            self._run_exited.set()

    def _room(self) -> int:
        return self.influx.buffer_points - self._buffer.points - self._in_flight_points

    def _full(self) -> bool:
        """No room for another record of the usual size."""
        return self._room() < max(1.0, self._points_per_record or 1.0)

    def _poll_overdue(self) -> bool:
        """A consumer that does not poll for max_poll_interval (5 min) is thrown out of
        its group; during a long outage poll now and then, putting back what is read."""
        return time.monotonic() - self._last_poll_s > _POLL_AT_LEAST_EVERY_S

    async def _poll(self, timeout_s: float) -> None:
        self._last_poll_s = time.monotonic()
        # About a batch, and never more than fits (more would only be put back):
        # batch-sized polls let the next batch be encoded while one is written.
        wanted = min(self._room(), self.influx.batch_size_points)
        per_record = self._points_per_record or 1.0
        records = await self._consumer.getmany(
            timeout_ms=int(timeout_s * 1000),
            max_records=max(1, min(10_000, round(wanted / per_record))),
        )
        polled = [message for messages in records.values() for message in messages]
        if polled:
            self._take(polled)

    def _take(self, polled: list[ConsumerRecord]) -> None:
        """Encode what fits into the buffer; put the rest back into Kafka."""
        lines_of, points_of, columnar = self._encode(polled)
        room = self._room()
        taken_points = 0
        cut = len(polled)
        for index, points in enumerate(points_of):
            holding = self._buffer.points + self._in_flight_points + taken_points
            if taken_points + points > room and (index > 0 or holding > 0):
                cut = index
                break
            taken_points += points
        if cut < len(polled):
            self._put_back(polled[cut:])
        if taken_points:
            measured = taken_points / cut
            previous = self._points_per_record
            self._points_per_record = (
                measured if previous is None else 0.8 * previous + 0.2 * measured
            )

        buffer = self._buffer
        if columnar is not None:
            records, lines = columnar
            if cut < len(polled):
                lines = lines.filter(records < cut)
            if lines.len():
                buffer.chunks.append("\n".join(lines.to_list()).encode())
        for index in range(cut):
            if lines_of.get(index):
                buffer.chunks.append(b"\n".join(lines_of[index]))
        for message in polled[:cut]:
            buffer.offsets[TopicPartition(message.topic, message.partition)] = message.offset + 1
        buffer.points += taken_points
        if cut:
            buffer.oldest_s = buffer.oldest_s or time.monotonic()
        self.stats.records_consumed += cut

    def _encode(
        self, polled: list[ConsumerRecord]
    ) -> tuple[dict[int, list[bytes]], list[int], tuple[pl.Series, pl.Series] | None]:
        """Lines of each record: telemetry in bulk (columnar), the rest one by one."""
        telemetry = [i for i, m in enumerate(polled) if self.schemas[m.topic] is TelemetryBatch]
        one_by_one = [
            i for i, m in enumerate(polled) if self.schemas[m.topic] is not TelemetryBatch
        ]
        points_of = [0] * len(polled)
        columnar: tuple[pl.Series, pl.Series] | None = None
        if telemetry:
            encoded = encode_telemetry([polled[i].value for i in telemetry])
            # Record numbers in the encoder's list -> positions in ``polled``.
            records = pl.Series(telemetry, dtype=pl.Int64).gather(encoded.records)
            for record, count in records.value_counts().iter_rows():
                points_of[record] = count
            columnar = (records, encoded.lines)
            one_by_one.extend(telemetry[j] for j in encoded.slow)
        lines_of: dict[int, list[bytes]] = {}
        for index in one_by_one:
            message = polled[index]
            lines_of[index] = self._lines_one_by_one(message.topic, message.value)
            points_of[index] = len(lines_of[index])
        return lines_of, points_of, columnar

    def _lines_one_by_one(self, topic: str, value: bytes | None) -> list[bytes]:
        schema = self.schemas[topic]
        try:
            if schema is TelemetryBatch:
                batch, _rejected = codec.decode_telemetry(value or b"")
                if batch is None:
                    raise codec.DecodeError("no valid readings")
                # Bad readings are dead-lettered by the processors; the good ones are stored.
                message: BaseModel = batch
            else:
                message = codec.decode(schema, value or b"")
        except codec.DecodeError as error:
            self.stats.points_dropped += 1
            log.warning(
                "influx sink: dropped a record of %s that does not decode: %s", topic, error.reason
            )
            return []
        return LINES_BY_SCHEMA[schema](message)

    def _put_back(self, messages: list[ConsumerRecord]) -> None:
        first: dict[TopicPartition, int] = {}
        for message in messages:
            tp = TopicPartition(message.topic, message.partition)
            first.setdefault(tp, message.offset)
        for tp, offset in first.items():
            self._consumer.seek(tp, offset)
        newly_paused = not self._paused
        self._consumer.pause(*first)
        self._paused.update(first)
        self.stats.overflow_records += len(messages)
        # Once per pause, not per poll: an outage would otherwise log every few seconds.
        log.log(
            logging.WARNING if newly_paused else logging.DEBUG,
            "influx sink: buffer full (%d points); %d records left in Kafka, reading paused "
            "until the next write (overflow so far: %d records)",
            self.influx.buffer_points,
            len(messages),
            self.stats.overflow_records,
        )

    def _due(self) -> bool:
        buffer = self._buffer
        if not buffer.offsets:
            return False
        if buffer.points >= self.influx.batch_size_points or self._full():
            return True
        return (
            buffer.oldest_s is not None
            and time.monotonic() - buffer.oldest_s >= self.influx.flush_interval_s
        )

    def _start_write(self) -> None:
        """Hand the buffer to a write task; new records gather in a fresh buffer meanwhile."""
        if self._abandoned or not self._buffer.offsets:
            return
        buffer, self._buffer = self._buffer, _Buffer()
        self._in_flight_points = buffer.points
        self._writing = asyncio.create_task(self._write_until_done(buffer))
        self._writing_buffer = buffer
        self._writing_started_s = time.monotonic()
        self._retries_before = self.stats.retries

    async def _reap(self, wait: bool = False) -> None:
        """If the write in flight has ended (or ``wait``), commit its offsets."""
        task = self._writing
        if task is None or not (wait or task.done()):
            return
        buffer = self._writing_buffer
        try:
            written = await task  # SinkError propagates: a setting is wrong
        finally:
            self._writing = None
            self._in_flight_points = 0
        if not written:
            # Stopped during an outage: these offsets stay uncommitted, and so
            # must every later one (committing those would skip these records).
            self._abandoned = True
            return
        log.info(
            "influx flush points=%d elapsed_ms=%.1f retries=%d target=%s",
            buffer.points,
            (time.monotonic() - self._writing_started_s) * 1000,
            self.stats.retries - self._retries_before,
            self.writer.target,
        )
        await self._commit(buffer.offsets)
        self._resume()

    async def _drain(self) -> None:
        """At stop: finish the write in flight, then write (once) what is buffered."""
        await self._reap(wait=True)
        self._start_write()
        await self._reap(wait=True)

    async def _write_until_done(self, buffer: _Buffer) -> bool:
        """Write, retrying until written or refused (True), or until the sink stops (False)."""
        if not buffer.chunks:
            return True  # records without points (undecodable, counted): just commit
        backoff = Backoff(self.influx.retry_initial_s, self.influx.retry_max_s)
        while True:
            stats_line = self.stats.line(self.group_id, time.time_ns())
            try:
                await self.writer.write(b"\n".join([*buffer.chunks, stats_line]))
                self.stats.points_written += buffer.points
                self.stats.batches_written += 1
                self.stats.last_error = None
                return True
            except RejectedPointsError as error:
                self.stats.points_dropped += buffer.points
                self.stats.last_error = str(error)
                log.error(
                    "influx sink: dropped %d points the server refused: %s", buffer.points, error
                )
                return True
            except RetriableWriteError as error:
                self.stats.retries += 1
                self.stats.points_retried += buffer.points
                self.stats.last_error = str(error)
                wait_s = error.retry_after_s
                if wait_s is None:
                    wait_s = backoff.next_delay_s()
                log.warning(
                    "influx sink: write failed (%s); %d points held, offsets uncommitted, "
                    "retry in %.1f s",
                    error,
                    buffer.points,
                    wait_s,
                )
                # Meanwhile run() keeps reading into the buffer until it is full,
                # which also keeps the consumer in its group.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=wait_s)
                if self._stopping.is_set():
                    return False

    def _resume(self) -> None:
        if self._paused:
            assigned = self._consumer.assignment()
            self._consumer.resume(*(tp for tp in self._paused if tp in assigned))
            self._paused.clear()

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        assigned = self._consumer.assignment()
        mine = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        try:
            await self._consumer.commit(mine)
        except (CommitFailedError, IllegalStateError) as error:
            # A rebalance took the partitions: their new owner writes them again
            # (same timestamps, so no duplicate points).
            log.warning("influx sink: commit skipped after a rebalance: %s", error)

    async def stop(self) -> None:
        """Flush what is buffered (if the server answers), commit, close. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        try:
            if self._running:
                await self._run_exited.wait()  # run() does the final flush itself
            elif self._started and not self._failed:
                await self._drain()
        finally:
            if self in metrics.SINKS.sinks:
                metrics.SINKS.sinks.remove(self)
            if self._started:
                await self._consumer.stop()
            await self.writer.close()

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
