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

A raw recording made by ``wattstream record`` (see :mod:`ingest.record`) is
replayed record by record instead: each record goes back to its registry topic
under this deployment's prefix with the same key and value, partition by
partition in recorded offset order (to the recorded partition when the topic
has it), merged across partitions by the record timestamps, which also pace it.

Time shifting (``rebase_time``, ``loop``):

* ``rebase_time`` shifts every event time by one delta so that the first event
  is now: readings' ``ts``, price ``start``/``end``/``published_at``, carbon
  ``start``/``end``. Other topics of a recording (decisions, alerts, ...) are
  derived data, which the pipeline recomputes, and are sent unchanged.
* ``loop`` repeats the file until stopped (or ``max_rounds``), shifting round
  ``n`` by ``n`` periods, where the period is the file's event-time span plus
  its smallest step between distinct event times: round ``n + 1`` starts one
  step after round ``n`` ended, so timestamps keep increasing with the same
  rhythm. A shifted batch gets a new deterministic id made from its round and
  shift: round ``n`` of a replay always gets the same ids, and rounds never
  share one (a downstream de-duplication would drop them otherwise).
* Pacing (``speed``) restarts at each round's first event.

Delivery: at least once; batch ids are deterministic, so a replay sent twice
produces the same decisions and points.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import polars.selectors as cs
from pydantic import TypeAdapter, ValidationError

from ingest.prices import read_price_file
from ingest.record import is_recording, read_recording
from pipeline import codec, kafka, topics
from pipeline.codec import DecodeError
from pipeline.schemas import (
    READING_ADAPTER,
    READING_MODELS,
    CarbonIntensity,
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
# Value columns: the reading fields of any kind, and the kinds that have each.
_KINDS_OF_FIELD: dict[str, list[str]] = {}
for _kind, _fields in KIND_FIELDS.items():
    for _name in _fields:
        _KINDS_OF_FIELD.setdefault(_name, []).append(_kind)
# Number fields: a CSV cell is text, and "1.5" there is the number 1.5 (a JSON "1.5" is not).
_NUMBER_FIELDS = frozenset(
    name
    for model in READING_MODELS.values()
    for name, prop in model.model_json_schema()["properties"].items()
    if "number" in {variant.get("type") for variant in prop.get("anyOf", [prop])}
)
# The instants a reading's ts can hold (Python's datetime, years 1 to 9999, in UTC).
_FIRST_INSTANT = datetime.min.replace(tzinfo=UTC)
_LAST_INSTANT = datetime.max.replace(tzinfo=UTC)


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
    """Its first reading's time (epoch ms): where it goes in the merged timeline."""
    value: bytes
    readings: int
    last_event_ms: int
    """Its last reading's time (epoch ms)."""


@dataclass
class ReplayStats:
    readings_sent: int = 0
    batches_sent: int = 0
    prices_sent: int = 0
    bad_rows: int = 0
    readings_total: int = 0
    elapsed_s: float = 0.0
    rounds: int = 0
    records_sent: int = 0
    """Records of a raw recording sent (every topic)."""
    last_event_ms: int | None = None
    """Event time of the latest telemetry batch sent (epoch ms), after any rebase."""
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
        f"column {column.name!r} has type {column.dtype}; expected ISO 8601 text or timestamps"
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
    _check_columns(path, frame)
    try:
        frame = frame.with_row_index("_row", offset=1).with_columns(
            _utc_time(frame["time"], "_ts"),
            pl.col("site").cast(pl.String),
            pl.col("device").cast(pl.String),
            pl.col("kind").cast(pl.String),
        )
    except pl.exceptions.PolarsError as error:  # e.g. a list column of sites
        first_line = str(error).strip().splitlines()[0]
        raise ReplayFileError(f"{path}: site, device and kind must be text: {first_line}") from None
    # A number column with a cell that is not a number is read as text: each of its
    # cells is parsed here, and one that is not a number is its row's problem.
    text_numbers = [n for n in _NUMBER_FIELDS if frame.schema.get(n) == pl.String]
    frame = frame.with_columns(pl.col(n).alias(f"_text_{n}") for n in text_numbers).with_columns(
        pl.col(n).str.strip_chars().cast(pl.Float64, strict=False) for n in text_numbers
    )
    problem = (
        pl.when(pl.col("_ts").is_null())
        .then(pl.lit("time missing, unparseable, or without a UTC offset"))
        .when(~pl.col("_ts").is_between(_FIRST_INSTANT, _LAST_INSTANT))
        .then(pl.lit("time out of range (years 1 to 9999 in UTC)"))
        .when(pl.col("site").is_null() | (pl.col("site") == ""))
        .then(pl.lit("site missing"))
        .when(~pl.col("site").str.contains(r"^[A-Za-z0-9_.:\-]{1,200}$"))
        .then(pl.lit("site is not an id (1 to 200 of A-Z a-z 0-9 _ . : -)"))
        .when(pl.col("device").is_null() | (pl.col("device") == ""))
        .then(pl.lit("device missing"))
        # is_in gives null for a null kind (an empty cell), which would pass as valid.
        .when(pl.col("kind").is_null() | ~pl.col("kind").is_in(list(READING_MODELS)))
        .then(pl.lit(f"kind missing or not one of {sorted(READING_MODELS)}"))
    )
    for name in text_numbers:
        problem = problem.when(
            pl.col("kind").is_in(_KINDS_OF_FIELD[name])
            & pl.col(f"_text_{name}").is_not_null()
            & pl.col(name).is_null()
        ).then(pl.format(f"{name} is not a number (got {{}})", pl.col(f"_text_{name}")))
    # NaN and infinities are rejected (README); the JSON encoding would make them null,
    # i.e. a missing optional value, so they are caught here, in the kind's own fields.
    for name, kinds in _KINDS_OF_FIELD.items():
        if name in frame.columns and frame.schema[name].is_float():
            problem = problem.when(pl.col("kind").is_in(kinds) & ~pl.col(name).is_finite()).then(
                pl.lit(f"{name} is not a finite number (NaN and infinities are rejected)")
            )
    frame = frame.with_columns(problem.otherwise(None).alias("_problem"))
    # A bad row's dead letter shows its cells as they were in the file.
    bad = _printable(
        frame.filter(pl.col("_problem").is_not_null())
        .drop("_ts")
        .with_columns(pl.col(f"_text_{n}").alias(n) for n in text_numbers)
    )
    bad_rows = [
        BadRow(row["_row"], f"row {row['_row']}: {row['_problem']}", _row_json(row))
        for row in bad.to_dicts()
    ]
    good = (
        frame.filter(pl.col("_problem").is_null())
        .drop("_problem", *(f"_text_{n}" for n in text_numbers))
        .sort("_ts", maintain_order=True)
    )
    return good, bad_rows


def _check_columns(path: Path, frame: pl.DataFrame) -> None:
    """Refuse columns this reader cannot replay: names it uses itself, ids and values of
    types that are not text or numbers (a Binary value would crash the JSON encoder, a
    date far out of range the conversion of an id to text)."""
    reserved = [c for c in frame.columns if c.startswith("_")]
    if reserved:
        raise ReplayFileError(f"{path}: column names starting with '_' are reserved: {reserved}")
    for name in ("site", "device", "kind", *_KINDS_OF_FIELD):
        dtype = frame.schema.get(name)
        if dtype is None or dtype.is_numeric() or dtype in _VALUE_TYPES:
            continue
        raise ReplayFileError(
            f"{path}: column {name!r} has type {dtype}; ids and reading values are text, "
            "numbers or booleans"
        )


def _printable(frame: pl.DataFrame) -> pl.DataFrame:
    """Temporal columns as text, for the dead letters of bad rows (Python cannot hold a
    year 10000). polars panics on a value outside its own range (+-262,000 years): then
    the raw numbers are shown instead."""
    try:
        return frame.with_columns(cs.temporal().cast(pl.String))
    except pl.exceptions.PanicException:
        return frame.with_columns(cs.temporal().to_physical())


_VALUE_TYPES = (pl.Boolean, pl.String, pl.Null, pl.Categorical)


def _row_json(row: dict[str, Any]) -> bytes:
    cleaned = {k: v for k, v in row.items() if not k.startswith("_")}
    return orjson.dumps(cleaned, default=str)


def _readings_of(chunk: pl.DataFrame) -> list[tuple[int, dict[str, Any]]]:
    """(row number, reading dict) for each row, with only its kind's non-null fields."""
    value_columns = [c for c in chunk.columns if c in _KINDS_OF_FIELD]
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
    frame: pl.DataFrame,
    source: str,
    replay: ReplaySettings,
    *,
    round_: int = 0,
    shift_ms: int = 0,
) -> list[Iterator[tuple[OutgoingBatch | None, list[BadRow]]]]:
    """One lazy iterator per site, each yielding that site's batches in event-time order.

    ``shift_ms`` moves every reading's time; a shifted or repeated (``round_`` > 0)
    batch gets an id of its own, see :func:`batch_id_salt`.
    """
    if shift_ms:
        frame = frame.with_columns(pl.col("_ts") + pl.duration(milliseconds=shift_ms))
    frame = _with_reading_json(frame)
    salt = batch_id_salt(round_, shift_ms)
    return [
        _batches_of_site(str(site), rows, source, replay, salt)
        for (site,), rows in frame.group_by("site", maintain_order=True)
    ]


def _batches_of_site(
    site: str,
    rows: pl.DataFrame,
    source: str,
    replay: ReplaySettings,
    salt: tuple[int, ...] = (),
) -> Iterator[tuple[OutgoingBatch | None, list[BadRow]]]:
    window_ms = replay.batch_window_s * 1000  # may be inf: size alone bounds the batch
    times_ms = rows["_ts"].dt.epoch("ms").to_list()
    start = 0
    while start < rows.height:
        end = start + 1
        limit = min(rows.height, start + replay.batch_max_readings)
        while end < limit and times_ms[end] - times_ms[start] < window_ms:
            end += 1
        yield _validated_batch(
            site, rows.slice(start, end - start), source, (times_ms[start], times_ms[end - 1]), salt
        )
        start = end


def _with_reading_json(frame: pl.DataFrame) -> pl.DataFrame:
    """Add ``_json``: each row's reading as JSON, encoded column-wise for the whole file.

    One polars expression per kind (each kind has its own fields) instead of a
    Python dict per reading: this is what makes a replay fast.
    """
    if frame.height == 0:
        return frame.with_columns(pl.lit(None, dtype=pl.String).alias("_json"))
    ts = pl.col("_ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ").alias("ts")
    encoded = pl.lit(None, dtype=pl.String)
    for kind in frame["kind"].unique().to_list():
        fields = [name for name in KIND_FIELDS[kind] if name in frame.columns]
        reading = pl.struct(pl.col("device"), ts, pl.col("kind"), *fields).struct.json_encode()
        encoded = pl.when(pl.col("kind") == kind).then(reading).otherwise(encoded)
    return frame.with_columns(encoded.alias("_json"))


def _batch_json(site: str, chunk: pl.DataFrame, source: str, batch_id: str) -> bytes:
    head = orjson.dumps({"schema_version": 1, "batch_id": batch_id, "site": site, "source": source})
    return head[:-1] + b',"readings":[' + ",".join(chunk["_json"]).encode() + b"]}"


def _validated_batch(
    site: str,
    chunk: pl.DataFrame,
    source: str,
    span_ms: tuple[int, int],
    salt: tuple[int, ...] = (),
) -> tuple[OutgoingBatch | None, list[BadRow]]:
    """``span_ms``: the chunk's first and last reading times (epoch ms)."""
    first_row = int(chunk["_row"][0])
    batch_id = stable_id("bat", source, site, first_row, *salt)
    raw = _batch_json(site, chunk, source, batch_id)
    try:
        # One validation in Rust of exactly the bytes that will be sent.
        TelemetryBatch.model_validate_json(raw)
        return OutgoingBatch(site, span_ms[0], raw, chunk.height, span_ms[1]), []
    except ValidationError:
        pass  # some row is bad: the row-by-row path below names it and keeps the rest
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
    batch = TelemetryBatch(
        batch_id=batch_id,
        site=site,
        source=source,
        readings=readings,
    )
    return OutgoingBatch(site, span_ms[0], codec.encode(batch), len(readings), span_ms[1]), bad


# --- time shifting (pure) ---------------------------------------------------------------


def batch_id_salt(round_: int, shift_ms: int) -> tuple[int, ...]:
    """What a shifted batch's id adds to its parts: nothing for an unshifted first round,
    so a plain replay keeps the ids it always had."""
    return () if round_ == 0 and shift_ms == 0 else (round_, shift_ms)


def rebase_shift_ms(first_event_ms: int, now: datetime) -> int:
    """The shift that moves the first event to ``now``. [ms]"""
    return int(now.timestamp() * 1000) - first_event_ms


def loop_period_ms(event_times_ms: Iterable[int]) -> int:
    """How far each loop round is shifted from the previous one. [ms]

    The span from the first to the last event plus the smallest step between
    distinct event times, so round n + 1 begins one step after round n ended.
    A file with a single instant repeats every second.
    """
    times = sorted(set(event_times_ms))
    if not times:
        return 1000
    steps = [b - a for a, b in itertools.pairwise(times)]
    return times[-1] - times[0] + (min(steps) if steps else 1000)


def round_shift_ms(round_: int, rebase_ms: int, period_ms: int) -> int:
    """Total shift of loop round ``round_`` (0-based). [ms]"""
    return rebase_ms + round_ * period_ms


def shift_batch(batch: TelemetryBatch, shift_ms: int, round_: int = 0) -> TelemetryBatch:
    """A batch with every reading moved by ``shift_ms`` and, when shifted or repeated,
    a new deterministic id derived from the old id, the round and the shift."""
    salt = batch_id_salt(round_, shift_ms)
    if not salt:
        return batch
    delta = timedelta(milliseconds=shift_ms)
    return batch.model_copy(
        update={
            "batch_id": stable_id("bat", batch.batch_id, *salt),
            "readings": [r.model_copy(update={"ts": r.ts + delta}) for r in batch.readings],
        }
    )


def shift_price(tick: PriceTick, shift_ms: int) -> PriceTick:
    """A price tick with its interval and publication moved by ``shift_ms``."""
    if not shift_ms:
        return tick
    delta = timedelta(milliseconds=shift_ms)
    published = tick.published_at + delta if tick.published_at is not None else None
    return tick.model_copy(
        update={"start": tick.start + delta, "end": tick.end + delta, "published_at": published}
    )


def shift_carbon(record: CarbonIntensity, shift_ms: int) -> CarbonIntensity:
    if not shift_ms:
        return record
    delta = timedelta(milliseconds=shift_ms)
    return record.model_copy(update={"start": record.start + delta, "end": record.end + delta})


def _tick_ms(tick: PriceTick) -> int:
    return int((tick.published_at or tick.start).timestamp() * 1000)


def record_event_times_ms(topic: str, value: bytes) -> list[int]:
    """Event times in a recorded value: readings' ts, a price's publication, a carbon
    interval's start; none for other topics or a value that does not decode. [ms]"""
    try:
        if topic == topics.TELEMETRY.name:
            batch = codec.decode(TelemetryBatch, value)
            return [int(r.ts.timestamp() * 1000) for r in batch.readings]
        if topic == topics.PRICES.name:
            return [_tick_ms(codec.decode(PriceTick, value))]
        if topic == topics.CARBON.name:
            return [int(codec.decode(CarbonIntensity, value).start.timestamp() * 1000)]
    except DecodeError:
        return []
    return []


def shift_record_value(topic: str, value: bytes, shift_ms: int, round_: int) -> bytes:
    """A recorded value re-timed for a shifted round; the same bytes when nothing moves,
    for other topics, and for a value that does not decode (it is replayed as it was)."""
    if not batch_id_salt(round_, shift_ms):
        return value
    try:
        if topic == topics.TELEMETRY.name:
            return codec.encode(shift_batch(codec.decode(TelemetryBatch, value), shift_ms, round_))
        if topic == topics.PRICES.name:
            return codec.encode(shift_price(codec.decode(PriceTick, value), shift_ms))
        if topic == topics.CARBON.name:
            return codec.encode(shift_carbon(codec.decode(CarbonIntensity, value), shift_ms))
    except DecodeError:
        return value
    return value


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


def _recording_order(records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each (topic, partition) in recorded offset order, merged across them by timestamp.

    A partition's own order is never changed, even where its timestamps go backwards
    (a producer may set them): that order is what consumers of the partition saw.
    """
    by_partition: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        by_partition.setdefault((record["topic"], record["partition"]), []).append(record)
    streams = [sorted(rows, key=lambda r: r["offset"]) for rows in by_partition.values()]
    yield from heapq.merge(*streams, key=lambda r: r["timestamp_ms"])


class Replay:
    """Sends a telemetry file and a price file (or a raw recording) to Kafka, paced or
    as fast as possible, once, or in rounds with ``loop``."""

    def __init__(
        self,
        settings: Settings,
        telemetry_path: Path | None,
        prices_path: Path | None = None,
        *,
        market: str | None = None,
        speed: float | None = None,
        on_progress: ProgressCallback | None = None,
        rebase_time: bool = False,
        loop: bool = False,
        max_rounds: int | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be positive or None (as fast as possible), got {speed}")
        if max_rounds is not None and max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, got {max_rounds}")
        self.settings = settings
        self.telemetry_path = telemetry_path
        self.prices_path = prices_path
        self.market = market
        self.speed = speed
        self.on_progress = on_progress
        self.rebase_time = rebase_time
        # Without loop there is exactly one round.
        self.max_rounds = max_rounds if loop else 1
        self.now = now
        self.stats = ReplayStats()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """End the replay after the record being sent (a loop otherwise never ends)."""
        self._stop.set()

    def _more_rounds(self, round_: int) -> bool:
        if self._stop.is_set():
            return False
        return self.max_rounds is None or round_ < self.max_rounds

    def _batching(self) -> ReplaySettings:
        """Batch limits for this replay: the event-time window only matters when paced.

        At full speed nothing waits for a batch to fill, so batches are bounded by
        size alone: fewer, larger messages are what makes a replay fast.
        """
        if self.speed is None:
            return self.settings.replay.model_copy(update={"batch_window_s": float("inf")})
        return self.settings.replay

    async def run(self) -> ReplayStats:
        started = time.monotonic()
        if self.telemetry_path is not None and is_recording(self.telemetry_path):
            if self.prices_path is not None:
                raise ReplayFileError(
                    f"{self.telemetry_path} is a recording (it holds its own prices, if any): "
                    "replay it without --prices"
                )
            await self._run_recording(self.telemetry_path)
        else:
            await self._run_files()
        self.stats.elapsed_s = time.monotonic() - started
        self._progress()
        return self.stats

    async def _run_files(self) -> None:
        frame, bad_rows = (
            read_telemetry(self.telemetry_path) if self.telemetry_path else (pl.DataFrame(), [])
        )
        ticks, bad_price_rows = (
            read_prices(self.prices_path, self.market) if self.prices_path else ([], [])
        )
        self.stats.readings_total = frame.height
        source = f"replay:{self.telemetry_path.name}" if self.telemetry_path else "replay"
        event_times = [_tick_ms(t) for t in ticks]
        if frame.height:
            event_times += frame["_ts"].dt.epoch("ms").unique().to_list()
        rebase_ms = (
            rebase_shift_ms(min(event_times), self.now()) if self.rebase_time and event_times else 0
        )
        period_ms = loop_period_ms(event_times)
        producer = kafka.producer(self.settings)
        await producer.start()
        try:
            await self._send_bad_rows(producer, bad_rows, self.telemetry_path, topics.TELEMETRY)
            await self._send_bad_rows(producer, bad_price_rows, self.prices_path, topics.PRICES)
            round_ = 0
            while self._more_rounds(round_):
                shift_ms = round_shift_ms(round_, rebase_ms, period_ms)
                shifted = [shift_price(t, shift_ms) for t in ticks]
                await self._send_timeline(producer, frame, shifted, source, round_, shift_ms)
                round_ += 1
                self.stats.rounds = round_
            await producer.flush()
        finally:
            await producer.stop()

    def _timeline(
        self,
        frame: pl.DataFrame,
        ticks: list[PriceTick],
        source: str,
        round_: int = 0,
        shift_ms: int = 0,
    ) -> Iterator[tuple[int, int, PriceTick | tuple[OutgoingBatch | None, list[BadRow]]]]:
        """Price ticks (at publication) and every site's batches, merged lazily by event time.

        At equal times prices come first (second key 0), so a price published at
        an instant is known to the readings of that instant.
        """
        streams: list[Iterator[tuple[int, int, Any]]] = [((_tick_ms(t), 0, t) for t in ticks)]
        if frame.height:
            for batches in site_batches(
                frame, source, self._batching(), round_=round_, shift_ms=shift_ms
            ):
                streams.append((self._event_ms(item), 1, item) for item in batches)
        yield from heapq.merge(*streams, key=lambda event: (event[0], event[1]))

    @staticmethod
    def _event_ms(item: tuple[OutgoingBatch | None, list[BadRow]]) -> int:
        batch, _bad_rows = item
        # A chunk whose rows were all bad has no batch; its place in time does not matter.
        return batch.event_time_ms if batch is not None else 0

    async def _pace(self, event_ms: int, clock: list[float]) -> None:
        """Sleep until ``event_ms`` is due; ``clock`` holds [first event ms, wall start]."""
        if self.speed is None:
            return
        if not clock:
            clock.extend((float(event_ms), time.monotonic()))
        due_s = (event_ms - clock[0]) / 1000 / self.speed
        delay_s = due_s - (time.monotonic() - clock[1])
        if delay_s > 0:
            # Wake early on stop(): a slow replay must not hold Ctrl-C for minutes.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay_s)

    async def _send_timeline(
        self,
        producer: Any,
        frame: pl.DataFrame,
        ticks: list[PriceTick],
        source: str,
        round_: int = 0,
        shift_ms: int = 0,
    ) -> None:
        telemetry_topic = self.settings.topic(topics.TELEMETRY)
        prices_topic = self.settings.topic(topics.PRICES)
        clock: list[float] = []
        pending: list[asyncio.Future[Any]] = []
        for event_ms, _, item in self._timeline(frame, ticks, source, round_, shift_ms):
            await self._pace(event_ms, clock)
            if self._stop.is_set():
                break
            if isinstance(item, PriceTick):
                pending.append(
                    await producer.send(prices_topic, codec.encode(item), key=item.market.encode())
                )
                self.stats.prices_sent += 1
                continue
            batch, bad = item
            if round_ == 0:  # a bad row is dead-lettered once, not once per round
                await self._send_bad_rows(producer, bad, self.telemetry_path, topics.TELEMETRY)
            if batch is not None:
                pending.append(
                    await producer.send(telemetry_topic, batch.value, key=batch.site.encode())
                )
                self.stats.readings_sent += batch.readings
                self.stats.batches_sent += 1
                if self.stats.last_event_ms is None or batch.last_event_ms > (
                    self.stats.last_event_ms
                ):
                    self.stats.last_event_ms = batch.last_event_ms
            if len(pending) >= 256:
                await asyncio.gather(*pending)
                pending.clear()
                self._progress()
        await asyncio.gather(*pending)

    async def _run_recording(self, path: Path) -> None:
        try:
            frame = read_recording(path)
        except (pl.exceptions.PolarsError, OSError) as error:
            raise ReplayFileError(f"{path}: cannot read the recording: {error}") from None
        unknown = sorted(set(frame["topic"].to_list()) - {spec.name for spec in topics.ALL_TOPICS})
        if unknown:
            raise ReplayFileError(f"{path}: topics not in the registry: {unknown}")
        records = frame.to_dicts()
        event_times: list[int] = []
        if self.rebase_time or self.max_rounds != 1:
            for record in records:
                event_times += record_event_times_ms(record["topic"], record["value"])
        rebase_ms = (
            rebase_shift_ms(min(event_times), self.now()) if self.rebase_time and event_times else 0
        )
        period_ms = loop_period_ms(event_times)
        producer = kafka.producer(self.settings)
        await producer.start()
        try:
            partitions = {
                spec.name: len(await producer.partitions_for(self.settings.topic(spec)))
                for spec in topics.ALL_TOPICS
                if spec.name in set(frame["topic"].to_list())
            }
            round_ = 0
            while self._more_rounds(round_):
                shift_ms = round_shift_ms(round_, rebase_ms, period_ms)
                await self._send_records(producer, records, partitions, round_, shift_ms)
                round_ += 1
                self.stats.rounds = round_
            await producer.flush()
        finally:
            await producer.stop()

    async def _send_records(
        self,
        producer: Any,
        records: list[dict[str, Any]],
        partitions: dict[str, int],
        round_: int,
        shift_ms: int,
    ) -> None:
        clock: list[float] = []
        pending: list[asyncio.Future[Any]] = []
        for record in _recording_order(records):
            await self._pace(record["timestamp_ms"], clock)
            if self._stop.is_set():
                break
            name = record["topic"]
            spec = topics.by_name(name)
            # The recorded partition keeps each partition's order exactly; a target topic
            # with fewer partitions falls back to the key, which keeps each key's order.
            partition = record["partition"] if record["partition"] < partitions[name] else None
            value = shift_record_value(name, record["value"], shift_ms, round_)
            pending.append(
                await producer.send(
                    self.settings.topic(spec), value, key=record["key"], partition=partition
                )
            )
            self.stats.records_sent += 1
            if name == topics.TELEMETRY.name:
                self.stats.batches_sent += 1
            elif name == topics.PRICES.name:
                self.stats.prices_sent += 1
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
