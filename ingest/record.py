"""Record Kafka topics into a Parquet file that ``wattstream replay`` sends back.

Two output formats, chosen per file:

* **raw** (the default): one row per Kafka record, in the order it was read,
  with the columns of ``RECORD_SCHEMA``: ``topic`` (the registry name without
  the deployment's prefix, e.g. ``wattstream.telemetry``, so a recording made
  under one prefix replays into another), ``partition``, ``offset``,
  ``timestamp_ms`` (the Kafka record timestamp), ``key`` and ``value`` (the
  bytes as they were, binary). Works for every topic, and a replay re-sends the
  same keys and values in the same order per partition.
* **flat** (``flatten=True``, telemetry only): the long reading format that
  :mod:`ingest.replay` reads from any file: ``time`` (UTC), ``site``,
  ``device``, ``kind`` and one column per reading field. Loses the batching
  and the batch ids, keeps every reading; meant for analysis in polars/pandas
  and for editing a capture before replaying it.

Example raw row::

    {"topic": "wattstream.telemetry", "partition": 1, "offset": 41,
     "timestamp_ms": 1744003200123, "key": b"turin-home",
     "value": b'{"schema_version":1,"batch_id":"bat-5d0c...",...}'}

A capture stops at ``max_records``, after ``duration_s``, when ``to_end`` is
set and every partition reached the end offset it had at the start, or when
:meth:`Recorder.stop` is called (Ctrl-C in the CLI); in every case what was
read so far is written. The file is written to a temporary name and renamed,
so a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from aiokafka import TopicPartition

from pipeline import codec, kafka, topics
from pipeline.settings import Settings

log = logging.getLogger(__name__)

RECORD_SCHEMA: dict[str, pl.DataType] = {
    "topic": pl.String(),
    "partition": pl.Int32(),
    "offset": pl.Int64(),
    "timestamp_ms": pl.Int64(),
    "key": pl.Binary(),
    "value": pl.Binary(),
}


class RecordError(ValueError):
    """The capture cannot start (unknown topic, flatten of a non-telemetry topic)."""

    retriable = False


def resolve_topics(settings: Settings, names: Sequence[str]) -> list[topics.TopicSpec]:
    """Registry specs for topic names given bare (``telemetry``), registry or full names."""
    if not names:
        raise RecordError("give at least one --topic")
    specs: list[topics.TopicSpec] = []
    for name in names:
        try:
            spec = topics.by_name(name, settings.topic_prefix)
        except KeyError:
            try:
                spec = topics.by_name(f"wattstream.{name}", settings.topic_prefix)
            except KeyError as error:
                raise RecordError(str(error.args[0])) from None
        if spec not in specs:
            specs.append(spec)
    return specs


def is_recording(path: Path) -> bool:
    """True if ``path`` is a raw recording (Parquet with the ``RECORD_SCHEMA`` columns)."""
    if path.suffix.lower() != ".parquet" or not path.is_file():
        return False
    try:
        columns = pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError):
        return False
    return set(RECORD_SCHEMA) <= set(columns)


def read_recording(path: Path) -> pl.DataFrame:
    """A raw recording's rows, cast to ``RECORD_SCHEMA``, in file order."""
    return pl.read_parquet(path, columns=list(RECORD_SCHEMA)).cast(RECORD_SCHEMA)  # type: ignore[arg-type]


def records_frame(rows: Iterable[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=RECORD_SCHEMA)


def flatten_telemetry(values: Iterable[bytes]) -> tuple[pl.DataFrame, int]:
    """Telemetry batch values as the long reading format; returns (frame, undecodable count).

    Readings that do not validate are left out (and counted), as a consumer would.
    """
    rows: list[dict[str, Any]] = []
    bad = 0
    for value in values:
        batch, rejected = codec.decode_telemetry(value)
        bad += len(rejected)
        if batch is None:
            continue
        for reading in batch.readings:
            data = reading.model_dump(exclude_none=True)
            rows.append({"time": data.pop("ts"), "site": batch.site, **data})
    if not rows:
        return pl.DataFrame(
            schema={
                "time": pl.Datetime("us", "UTC"),
                "site": pl.String,
                "device": pl.String,
                "kind": pl.String,
            }
        ), bad
    # Kinds have different fields: let polars fill the union of columns with nulls.
    frame = pl.DataFrame(rows, infer_schema_length=None)
    leading = ["time", "site", "device", "kind"]
    return frame.select(leading + [c for c in frame.columns if c not in leading]), bad


def write_parquet(frame: pl.DataFrame, out: Path) -> None:
    """Write atomically: a temporary file renamed over ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    frame.write_parquet(partial, compression="zstd")
    partial.replace(out)


@dataclass
class RecordStats:
    records: int = 0
    per_topic: dict[str, int] = field(default_factory=dict)
    rows_written: int = 0
    """Rows in the file: records (raw) or readings (flat)."""
    bad_readings: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = ""
    """Why the capture ended: max_records, duration, end, or stop."""


ProgressCallback = Callable[[RecordStats], None]


class Recorder:
    """Captures topics from a broker into a Parquet file; no consumer group, no commits."""

    def __init__(
        self,
        settings: Settings,
        topic_names: Sequence[str],
        out: Path,
        *,
        from_beginning: bool = False,
        to_end: bool = False,
        max_records: int | None = None,
        duration_s: float | None = None,
        flatten: bool = False,
        on_progress: ProgressCallback | None = None,
        progress_interval_s: float = 2.0,
    ) -> None:
        # Everything is checked here, before any network work.
        self.specs = resolve_topics(settings, topic_names)
        if flatten and self.specs != [topics.TELEMETRY]:
            raise RecordError("--flatten records the telemetry topic only (one --topic telemetry)")
        if max_records is not None and max_records < 1:
            raise RecordError("max_records must be at least 1")
        if duration_s is not None and duration_s <= 0:
            raise RecordError("duration_s must be positive")
        if out.suffix.lower() != ".parquet":
            raise RecordError(f"{out}: the output must be a .parquet file")
        self.settings = settings
        self.out = out
        self.from_beginning = from_beginning
        self.to_end = to_end
        self.max_records = max_records
        self.duration_s = duration_s
        self.flatten = flatten
        self.on_progress = on_progress
        self.progress_interval_s = progress_interval_s
        self.stats = RecordStats(per_topic={spec.name: 0 for spec in self.specs})
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Stop the capture soon; :meth:`run` then writes what it has. Safe from a signal."""
        self._stop.set()

    async def run(self) -> RecordStats:
        started = time.monotonic()
        names = {self.settings.topic(spec): spec for spec in self.specs}
        ends = await kafka.end_offsets(self.settings, names)
        missing = sorted(set(names) - {tp.topic for tp in ends})
        if missing:
            raise RecordError(f"topics not on the broker: {missing} (run `wattstream worker` once)")
        rows: list[dict[str, Any]] = []
        reader = kafka.consumer(self.settings, group_id=None)
        await reader.start()
        try:
            partitions = list(ends)
            reader.assign(partitions)
            if self.from_beginning:
                await reader.seek_to_beginning(*partitions)
            else:
                await reader.seek_to_end(*partitions)
            await self._consume(reader, names, ends, rows, started)
        finally:
            await reader.stop()
            self._write(rows)
            self.stats.elapsed_s = time.monotonic() - started
            self._progress()
        log.info(
            "record out=%s records=%d rows=%d stopped_by=%s elapsed_s=%.1f",
            self.out,
            self.stats.records,
            self.stats.rows_written,
            self.stats.stopped_by,
            self.stats.elapsed_s,
        )
        return self.stats

    async def _consume(
        self,
        reader: Any,
        names: dict[str, topics.TopicSpec],
        ends: dict[TopicPartition, int],
        rows: list[dict[str, Any]],
        started: float,
    ) -> None:
        # Partitions still short of the end offsets they had when we started.
        remaining = {tp for tp, end in ends.items() if end > 0} if self.from_beginning else set()
        last_progress = started
        while True:
            if self._stop.is_set():
                self.stats.stopped_by = "stop"
                return
            if self.to_end and not remaining:
                self.stats.stopped_by = "end"
                return
            now = time.monotonic()
            if self.duration_s is not None and now - started >= self.duration_s:
                self.stats.stopped_by = "duration"
                return
            if now - last_progress >= self.progress_interval_s:
                last_progress = now
                self._progress()
            # Short polls so Ctrl-C and the duration are noticed within 0.5 s.
            batches = await reader.getmany(timeout_ms=500, max_records=1000)
            for tp, messages in batches.items():
                spec = names[tp.topic]
                for message in messages:
                    rows.append(
                        {
                            "topic": spec.name,
                            "partition": tp.partition,
                            "offset": message.offset,
                            "timestamp_ms": message.timestamp,
                            "key": message.key,
                            "value": message.value,
                        }
                    )
                    self.stats.records += 1
                    self.stats.per_topic[spec.name] += 1
                    if self.max_records is not None and self.stats.records >= self.max_records:
                        self.stats.stopped_by = "max_records"
                        return
                if messages and messages[-1].offset + 1 >= ends.get(tp, 0):
                    remaining.discard(tp)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self.flatten:
            frame, self.stats.bad_readings = flatten_telemetry(row["value"] for row in rows)
        else:
            frame = records_frame(rows)
        write_parquet(frame, self.out)
        self.stats.rows_written = frame.height

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.stats)
