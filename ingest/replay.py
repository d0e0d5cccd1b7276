"""Replay recorded telemetry and prices from files into Kafka, in event-time order.

Input files (CSV or Parquet, read with polars):

* telemetry, long format, one row per reading: ``time`` (ISO 8601 with a UTC
  offset, or a timezone-aware timestamp), ``site``, ``device``, ``kind``
  (battery, solar, meter, home, generator, ev, fusion) and value columns named
  like the reading fields with their units (``power_kw``, ``soc_pct``, ...).
  Columns that a kind does not have are ignored for that kind.
* prices: ``time`` (interval start), ``price_per_kwh``, optional ``market``
  (else ``--market``), ``published_at`` (when the price became known; default:
  the interval start) and ``end`` (default: the next interval's start).

Readings are grouped per site into batches (at most ``batch_max_readings``
readings and ``batch_window_s`` of event time), keyed by site. Each price tick
is sent when the replay clock reaches its ``published_at``, so a strategy never
sees a price before it was published.

A bad row (missing or naive time, unknown kind, a value out of range) is
reported with its row number (1-based, header excluded), dead-lettered with the
reason, and the rest is replayed.

Example telemetry message value (key ``turin-home``)::

    {"schema_version": 1, "batch_id": "bat-5d0c...", "site": "turin-home",
     "source": "replay:telemetry.parquet",
     "readings": [{"device": "battery-1", "ts": "2025-04-07T00:00:00Z",
                   "kind": "battery", "power_kw": -1.2, "soc_pct": 48.5}, ...]}

Delivery: at least once; batch ids are deterministic, so a replay sent twice
produces the same decisions and points.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from pydantic import TypeAdapter, ValidationError

from ingest.prices import read_price_file
from pipeline import codec, kafka, topics
from pipeline.codec import DecodeError
from pipeline.schemas import (
    READING_ADAPTER,
    READING_MODELS,
    PriceTick,
    Reading,
    TelemetryBatch,
    dead_letter,
    stable_id,
)
from pipeline.settings import ReplaySettings, Settings

log = logging.getLogger(__name__)

COMPONENT = "ingest.replay"
REQUIRED_TELEMETRY_COLUMNS = ("time", "site", "device", "kind")
_READINGS = TypeAdapter(list[Reading])
# Fields every reading has; the rest of a kind's fields come from value columns.
_ENVELOPE_FIELDS = {"kind", "device", "ts"}
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    kind: tuple(name for name in model.model_fields if name not in _ENVELOPE_FIELDS)
    for kind, model in READING_MODELS.items()
}


class ReplayFileError(ValueError):
    """The file as a whole cannot be replayed (unreadable, or a required column is missing)."""

    retriable = False


@dataclass(frozen=True)
class BadRow:
    row: int
    """1-based row number in the file, header excluded."""
    reason: str
    raw: bytes


@dataclass(frozen=True)
class OutgoingBatch:
    site: str
    event_time_ms: int
    value: bytes
    readings: int


@dataclass
class ReplayStats:
    readings_sent: int = 0
    batches_sent: int = 0
    prices_sent: int = 0
    bad_rows: int = 0
    readings_total: int = 0
    elapsed_s: float = 0.0
    bad_row_samples: list[str] = field(default_factory=list)


def _read_table(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise ReplayFileError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".parquet":
            return pl.read_parquet(path)
        if path.suffix.lower() == ".csv":
            return pl.read_csv(path, infer_schema_length=10_000, try_parse_dates=False)
    except (pl.exceptions.PolarsError, OSError) as error:
        raise ReplayFileError(f"{path}: cannot read: {error}") from None
    raise ReplayFileError(f"{path}: unsupported file type {path.suffix!r} (use .csv or .parquet)")


def _utc_time(column: pl.Series, name: str) -> pl.Series:
    """Parse a time column to UTC; unparseable or naive values become null."""
    if column.dtype == pl.String:
        # %+ is ISO 8601 / RFC 3339 *with* an offset: naive strings do not parse.
        return column.str.to_datetime(format="%+", time_zone="UTC", strict=False).alias(name)
    if isinstance(column.dtype, pl.Datetime):
        if column.dtype.time_zone is None:
            return pl.Series(name, [None] * len(column), dtype=pl.Datetime("us", "UTC"))
        return column.dt.convert_time_zone("UTC").alias(name)
    raise ReplayFileError(
        f"column {name!r} has type {column.dtype}; expected ISO 8601 text or timestamps"
    )


def read_telemetry(path: Path) -> tuple[pl.DataFrame, list[BadRow]]:
    """Read a telemetry file; return its valid rows sorted by time and the bad rows."""
    frame = _read_table(path)
    missing = [c for c in REQUIRED_TELEMETRY_COLUMNS if c not in frame.columns]
    if missing:
        raise ReplayFileError(
            f"{path}: missing column(s) {missing}; "
            f"telemetry needs {list(REQUIRED_TELEMETRY_COLUMNS)}"
        )
    frame = frame.with_row_index("_row", offset=1).with_columns(
        _utc_time(frame["time"], "_ts"),
        pl.col("site").cast(pl.String),
        pl.col("device").cast(pl.String),
        pl.col("kind").cast(pl.String),
    )
    problem = (
        pl.when(pl.col("_ts").is_null())
        .then(pl.lit("time missing, unparseable, or without a UTC offset"))
        .when(pl.col("site").is_null() | (pl.col("site") == ""))
        .then(pl.lit("site missing"))
        .when(pl.col("device").is_null() | (pl.col("device") == ""))
        .then(pl.lit("device missing"))
        .when(~pl.col("kind").is_in(list(READING_MODELS)))
        .then(pl.lit(f"kind missing or not one of {sorted(READING_MODELS)}"))
        .otherwise(None)
        .alias("_problem")
    )
    frame = frame.with_columns(problem)
    bad = frame.filter(pl.col("_problem").is_not_null())
    bad_rows = [
        BadRow(row["_row"], f"row {row['_row']}: {row['_problem']}", _row_json(row))
        for row in bad.drop("_ts").to_dicts()
    ]
    good = (
        frame.filter(pl.col("_problem").is_null()).drop("_problem").sort("_ts", maintain_order=True)
    )
    return good, bad_rows


def _row_json(row: dict[str, Any]) -> bytes:
    cleaned = {k: v for k, v in row.items() if not k.startswith("_")}
    return orjson.dumps(cleaned, default=str)


def _readings_of(chunk: pl.DataFrame) -> list[tuple[int, dict[str, Any]]]:
    """(row number, reading dict) for each row, with only its kind's non-null fields."""
    value_columns = [
        c for c in chunk.columns if not c.startswith("_") and c not in REQUIRED_TELEMETRY_COLUMNS
    ]
    records = chunk.select(["_row", "_ts", "device", "kind", *value_columns]).to_dicts()
    out = []
    for record in records:
        kind = record["kind"]
        reading = {"kind": kind, "device": record["device"], "ts": record["_ts"]}
        for name in KIND_FIELDS[kind]:
            value = record.get(name)
            if value is not None:
                reading[name] = value
        out.append((record["_row"], reading))
    return out


def site_batches(
    frame: pl.DataFrame, source: str, replay: ReplaySettings
) -> list[Iterator[tuple[OutgoingBatch | None, list[BadRow]]]]:
    """One lazy iterator per site, each yielding that site's batches in event-time order."""
    return [
        _batches_of_site(str(site), rows, source, replay)
        for (site,), rows in frame.group_by("site", maintain_order=True)
    ]


def _batches_of_site(
    site: str, rows: pl.DataFrame, source: str, replay: ReplaySettings
) -> Iterator[tuple[OutgoingBatch | None, list[BadRow]]]:
    window_ms = int(replay.batch_window_s * 1000)
    times_ms = rows["_ts"].dt.epoch("ms").to_list()
    start = 0
    while start < rows.height:
        end = start + 1
        limit = min(rows.height, start + replay.batch_max_readings)
        while end < limit and times_ms[end] - times_ms[start] < window_ms:
            end += 1
        yield _validated_batch(site, rows.slice(start, end - start), source, times_ms[start])
        start = end


def _validated_batch(
    site: str, chunk: pl.DataFrame, source: str, event_time_ms: int
) -> tuple[OutgoingBatch | None, list[BadRow]]:
    rows = _readings_of(chunk)
    bad: list[BadRow] = []
    try:
        readings = _READINGS.validate_python([reading for _, reading in rows])
    except ValidationError:
        # Rare path: validate row by row to name each bad row, keep the rest.
        readings = []
        for row, reading in rows:
            try:
                readings.append(READING_ADAPTER.validate_python(reading))
            except ValidationError as error:
                reason = f"row {row}: {codec.describe(error)}"
                bad.append(BadRow(row, reason, orjson.dumps(reading, default=str)))
    if not readings:
        return None, bad
    first_row = rows[0][0]
    batch = TelemetryBatch(
        batch_id=stable_id("bat", source, site, first_row),
        site=site,
        source=source,
        readings=readings,
    )
    return OutgoingBatch(site, event_time_ms, codec.encode(batch), len(readings)), bad


def read_prices(path: Path, market: str | None = None) -> tuple[list[PriceTick], list[BadRow]]:
    """A price file's ticks (see :func:`ingest.prices.read_price_file`) and its bad rows.

    Bad rows are replayed as dead letters like bad telemetry rows; a file with
    no usable row at all is an error, since replaying it would decide nothing.
    """
    if not path.is_file():
        raise ReplayFileError(f"{path}: no such file")
    try:
        parsed = read_price_file(path, market=market)
    except DecodeError as error:
        raise ReplayFileError(f"{path}: {error.reason}") from None
    bad = [BadRow(_row_number(r.reason), r.reason, r.raw) for r in parsed.rejected]
    if not parsed.messages:
        reasons = "; ".join(b.reason for b in bad[:3])
        hint = " (a file without a market column needs --market)" if market is None else ""
        raise ReplayFileError(f"{path}: no usable price rows{hint}: {reasons}")
    return parsed.messages, bad


def _row_number(reason: str) -> int:
    # ingest.prices words every row rejection "row N: why".
    return int(reason.split(":", 1)[0].removeprefix("row "))


ProgressCallback = Callable[[ReplayStats], None]


class Replay:
    """Sends a telemetry file and a price file to Kafka, paced or as fast as possible."""

    def __init__(
        self,
        settings: Settings,
        telemetry_path: Path | None,
        prices_path: Path | None = None,
        *,
        market: str | None = None,
        speed: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be positive or None (as fast as possible), got {speed}")
        self.settings = settings
        self.telemetry_path = telemetry_path
        self.prices_path = prices_path
        self.market = market
        self.speed = speed
        self.on_progress = on_progress
        self.stats = ReplayStats()

    async def run(self) -> ReplayStats:
        started = time.monotonic()
        frame, bad_rows = (
            read_telemetry(self.telemetry_path) if self.telemetry_path else (pl.DataFrame(), [])
        )
        ticks, bad_price_rows = (
            read_prices(self.prices_path, self.market) if self.prices_path else ([], [])
        )
        self.stats.readings_total = frame.height
        source = f"replay:{self.telemetry_path.name}" if self.telemetry_path else "replay"
        producer = kafka.producer(self.settings)
        await producer.start()
        try:
            await self._send_bad_rows(producer, bad_rows, self.telemetry_path, topics.TELEMETRY)
            await self._send_bad_rows(producer, bad_price_rows, self.prices_path, topics.PRICES)
            await self._send_timeline(producer, frame, ticks, source)
            await producer.flush()
        finally:
            await producer.stop()
        self.stats.elapsed_s = time.monotonic() - started
        self._progress()
        return self.stats

    def _timeline(
        self, frame: pl.DataFrame, ticks: list[PriceTick], source: str
    ) -> Iterator[tuple[int, int, PriceTick | tuple[OutgoingBatch | None, list[BadRow]]]]:
        """Price ticks (at publication) and every site's batches, merged lazily by event time.

        At equal times prices come first (second key 0), so a price published at
        an instant is known to the readings of that instant.
        """
        streams: list[Iterator[tuple[int, int, Any]]] = [
            ((int((t.published_at or t.start).timestamp() * 1000), 0, t) for t in ticks)
        ]
        if frame.height:
            for batches in site_batches(frame, source, self.settings.replay):
                streams.append((self._event_ms(item), 1, item) for item in batches)
        yield from heapq.merge(*streams, key=lambda event: (event[0], event[1]))

    @staticmethod
    def _event_ms(item: tuple[OutgoingBatch | None, list[BadRow]]) -> int:
        batch, _bad_rows = item
        # A chunk whose rows were all bad has no batch; its place in time does not matter.
        return batch.event_time_ms if batch is not None else 0

    async def _send_timeline(
        self, producer: Any, frame: pl.DataFrame, ticks: list[PriceTick], source: str
    ) -> None:
        telemetry_topic = self.settings.topic(topics.TELEMETRY)
        prices_topic = self.settings.topic(topics.PRICES)
        first_event_ms: int | None = None
        wall_start = time.monotonic()
        pending: list[asyncio.Future[Any]] = []
        for event_ms, _, item in self._timeline(frame, ticks, source):
            if self.speed is not None:
                first_event_ms = event_ms if first_event_ms is None else first_event_ms
                due_s = (event_ms - first_event_ms) / 1000 / self.speed
                delay_s = due_s - (time.monotonic() - wall_start)
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
            if isinstance(item, PriceTick):
                pending.append(
                    await producer.send(prices_topic, codec.encode(item), key=item.market.encode())
                )
                self.stats.prices_sent += 1
                continue
            batch, bad = item
            await self._send_bad_rows(producer, bad, self.telemetry_path, topics.TELEMETRY)
            if batch is not None:
                pending.append(
                    await producer.send(telemetry_topic, batch.value, key=batch.site.encode())
                )
                self.stats.readings_sent += batch.readings
                self.stats.batches_sent += 1
            if len(pending) >= 256:
                await asyncio.gather(*pending)
                pending.clear()
                self._progress()
        await asyncio.gather(*pending)

    async def _send_bad_rows(
        self, producer: Any, bad_rows: list[BadRow], path: Path | None, target: topics.TopicSpec
    ) -> None:
        """Dead-letter a file's bad rows, with the topic they were meant for."""
        dlq_topic = self.settings.topic(topics.DEAD_LETTERS)
        target_topic = self.settings.topic(target)
        for bad in bad_rows:
            letter = dead_letter(
                raw=bad.raw,
                reason=f"{path}: {bad.reason}",
                error_type="BadRow",
                component=COMPONENT,
                source_topic=target_topic,
            )
            await producer.send(dlq_topic, codec.encode(letter), key=target_topic.encode())
            self.stats.bad_rows += 1
            if len(self.stats.bad_row_samples) < 20:
                self.stats.bad_row_samples.append(f"{path}: {bad.reason}")
            log.warning("%s: %s (dead-lettered)", path, bad.reason)

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.stats)
