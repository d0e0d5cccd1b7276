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
import gzip
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from pydantic import BaseModel

from pipeline import codec, kafka, topics
from pipeline.backoff import Backoff
from pipeline.schemas import TelemetryBatch
from pipeline.settings import InfluxSettings, Settings
from sinks.lineprotocol import LINES_BY_SCHEMA

log = logging.getLogger(__name__)

DEFAULT_TOPICS = (topics.TELEMETRY, topics.PRICES, topics.DECISIONS)


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
    async def write(self, lines: Sequence[bytes]) -> None: ...
    async def close(self) -> None: ...


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from InfluxDB; fall back to our backoff


class HttpWriter:
    """POSTs line protocol to InfluxDB's v1 ``/write`` or v2 ``/api/v2/write``."""

    def __init__(self, influx: InfluxSettings) -> None:
        assert influx.url is not None
        self.influx = influx
        self.base_url = influx.url.rstrip("/")
        self.target = f"{self.base_url} ({influx.api})"
        self._session: aiohttp.ClientSession | None = None

    def _write_request(self) -> tuple[str, dict[str, str], dict[str, str]]:
        influx = self.influx
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if influx.api == "v1":
            params = {"db": influx.database, "precision": "ms"}
            if influx.retention_policy:
                params["rp"] = influx.retention_policy
            if influx.username and influx.password:
                params["u"] = influx.username
                params["p"] = influx.password.get_secret_value()
            return f"{self.base_url}/write", params, headers
        params = {"org": influx.org, "bucket": influx.bucket, "precision": "ms"}
        if influx.token:
            headers["Authorization"] = f"Token {influx.token.get_secret_value()}"
        return f"{self.base_url}/api/v2/write", params, headers

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
        if self.influx.api == "v1" and self.influx.create_database:
            await self._create_database()

    async def _create_database(self) -> None:
        assert self._session is not None
        _, params, _ = self._write_request()
        query = {"q": f'CREATE DATABASE "{self.influx.database}"'}
        query.update({k: v for k, v in params.items() if k in ("u", "p")})
        async with self._session.post(f"{self.base_url}/query", params=query) as response:
            if response.status in (401, 403):
                raise SinkError(
                    f"{self.target}: not allowed to create database ({response.status})"
                )
            if response.status >= 300:
                log.warning("influx sink: CREATE DATABASE answered %d", response.status)

    async def write(self, lines: Sequence[bytes]) -> None:
        if self._session is None:
            await self.start()
        assert self._session is not None
        url, params, headers = self._write_request()
        body = b"\n".join(lines)
        if self.influx.gzip:
            body = gzip.compress(body, compresslevel=1)  # fast: the network is not the bottleneck
            headers = {**headers, "Content-Encoding": "gzip"}
        try:
            async with self._session.post(
                url, params=params, data=body, headers=headers
            ) as response:
                if response.status < 300:
                    return
                text = (await response.text())[:500]
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as error:
            raise RetriableWriteError(f"{self.target}: {type(error).__name__}: {error}") from None
        if status in (401, 403):
            raise SinkError(
                f"{self.target}: write refused with {status} (check credentials): {text}"
            )
        if status in (400, 413, 422):
            raise RejectedPointsError(f"{self.target}: {status}: {text}")
        if status == 404 and self.influx.api == "v1" and "database not found" in text:
            # Created at start-up unless create_database is off: a setting to fix, not a retry.
            raise SinkError(f"{self.target}: {text}; create it or set influx.create_database")
        raise RetriableWriteError(f"{self.target}: {status}: {text}", retry_after)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class LineProtocolFileWriter:
    """Appends line protocol to a file; fsync before returning, so a commit after it is safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.target = f"file {path}"

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    async def write(self, lines: Sequence[bytes]) -> None:
        await asyncio.to_thread(self._append, b"".join(line + b"\n" for line in lines))

    def _append(self, data: bytes) -> None:
        with self.path.open("ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    async def close(self) -> None:
        return None


def make_writer(influx: InfluxSettings) -> Writer:
    return HttpWriter(influx) if influx.url else LineProtocolFileWriter(influx.file)


@dataclass
class SinkStats:
    records_consumed: int = 0
    points_written: int = 0
    batches_written: int = 0
    retries: int = 0
    points_dropped: int = 0
    """Points the server refused (400/422) plus records that did not decode."""
    last_error: str | None = None


class InfluxSink:
    """Consumes ``specs`` topics and writes their messages as points; see the module doc."""

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
        self._lines: list[bytes] = []
        self._offsets: dict[TopicPartition, int] = {}
        self._oldest_s: float | None = None
        self._started = False
        self._running = False
        self._run_exited = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closed = False
        self._failed = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.writer.start()
        self._consumer = kafka.consumer(self.settings, *self.topic_names, group_id=self.group_id)
        await self._consumer.start()
        log.info(
            "influx sink: group %s, topics %s -> %s",
            self.group_id,
            self.topic_names,
            self.writer.target,
        )

    async def run(self) -> None:
        """Consume, write and commit until :meth:`stop` (or cancellation), then flush."""
        await self.start()
        self._running = True
        try:
            flush_interval_ms = int(self.influx.flush_interval_s * 1000)
            while not self._stopping.is_set():
                records = await self._consumer.getmany(
                    timeout_ms=flush_interval_ms, max_records=self.influx.batch_size_points
                )
                for tp, messages in records.items():
                    for message in messages:
                        self._take(message.topic, message.value)
                        self._offsets[tp] = message.offset + 1
                if self._due():
                    await self._flush()
            await self._flush()
        except SinkError:
            self._failed = True  # nothing more is written; the offsets stay uncommitted
            raise
        finally:
            self._running = False
            self._run_exited.set()

    def _take(self, topic: str, value: bytes | None) -> None:
        self.stats.records_consumed += 1
        self._oldest_s = self._oldest_s or time.monotonic()
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
            return
        self._lines.extend(LINES_BY_SCHEMA[schema](message))

    def _due(self) -> bool:
        if not self._offsets:
            return False
        if len(self._lines) >= self.influx.batch_size_points:
            return True
        return (
            self._oldest_s is not None
            and time.monotonic() - self._oldest_s >= self.influx.flush_interval_s
        )

    async def _flush(self) -> None:
        lines, offsets = self._lines, self._offsets
        if not offsets:
            return
        if lines:
            started = time.monotonic()
            retries_before = self.stats.retries
            if not await self._write_until_done(lines):
                return  # stopped during an outage: the offsets stay uncommitted
            log.info(
                "influx flush points=%d elapsed_ms=%.1f retries=%d target=%s",
                len(lines),
                (time.monotonic() - started) * 1000,
                self.stats.retries - retries_before,
                self.writer.target,
            )
        await self._commit(offsets)
        self._lines, self._offsets, self._oldest_s = [], {}, None

    async def _write_until_done(self, lines: list[bytes]) -> bool:
        """Write, retrying until written or refused (True), or until the sink stops (False)."""
        backoff = Backoff(self.influx.retry_initial_s, self.influx.retry_max_s)
        paused: set[TopicPartition] = set()
        try:
            while True:
                try:
                    await self.writer.write(lines)
                    self.stats.points_written += len(lines)
                    self.stats.batches_written += 1
                    self.stats.last_error = None
                    return True
                except RejectedPointsError as error:
                    self.stats.points_dropped += len(lines)
                    self.stats.last_error = str(error)
                    log.error(
                        "influx sink: dropped %d points the server refused: %s", len(lines), error
                    )
                    return True
                except RetriableWriteError as error:
                    self.stats.retries += 1
                    self.stats.last_error = str(error)
                    if not paused:
                        paused = set(self._consumer.assignment())
                        self._consumer.pause(*paused)
                    wait_s = error.retry_after_s
                    if wait_s is None:
                        wait_s = backoff.next_delay_s()
                    log.warning(
                        "influx sink: write failed (%s); %d points held, offsets uncommitted, "
                        "retry in %.1f s",
                        error,
                        len(lines),
                        wait_s,
                    )
                    if not await self._idle(wait_s):
                        return False
        finally:
            if paused:
                self._consumer.resume(*(tp for tp in paused if tp in self._consumer.assignment()))

    async def _idle(self, seconds: float) -> bool:
        """Wait while staying in the consumer group; False if the sink is stopping.

        Polling keeps the consumer's poll timer fresh (a consumer that does not
        poll for max_poll_interval is thrown out of the group). Partitions are
        paused, but a rebalance can hand us new, unpaused ones: whatever they
        return is put back (seek) and paused, never skipped.
        """
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stopping.is_set():
                return False
            records = await self._consumer.getmany(timeout_ms=int(min(remaining, 0.5) * 1000))
            for tp, messages in records.items():
                if messages:
                    self._consumer.seek(tp, messages[0].offset)
                    self._consumer.pause(tp)
        return not self._stopping.is_set()

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
                await self._flush()
        finally:
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
