"""Energy prices into Kafka: CSV / JSON tables, ENTSO-E day-ahead XML, time-of-use tariffs.

Sources and their units (every tick leaves here per kWh, timestamps in UTC):

* CSV or JSON tables, from a file or an HTTP(S) URL: ``time`` (interval start,
  ISO 8601 *with* a UTC offset), ``price_per_kwh`` [currency/kWh] or
  ``price_per_mwh`` [currency/MWh, divided by 1000], optional ``market``,
  ``end`` (default: start plus the market's smallest step between starts, so
  hourly and 15-minute tables both work and a gap does not stretch a tick),
  ``published_at`` (default: the interval start) and ``currency`` (default
  EUR). JSON is a list of such objects or ``{"market": ..., "prices": [...]}``.
* ENTSO-E ``Publication_MarketDocument`` XML [currency/MWh], see :mod:`ingest.entsoe`.
* Time-of-use tariffs generated from a :class:`TouSchedule` [currency/kWh].

Negative prices are kept: they are real. A bad row is rejected with its row
number (1-based, header excluded) and the rest of the table is used.

:class:`PriceFeed` polls a URL or re-reads a file every ``poll_interval_s``,
sends ticks it has not sent before (same market, start and price) to the
prices topic keyed by market, and dead-letters bad documents and rows (the
same bad bytes once, however often they are polled). An unreachable source,
HTTP 429/5xx/404 or a Kafka error is retried with capped exponential backoff
and jitter; HTTP 401/403 stops the feed with :class:`SourceRefused`, since
only a configuration change can fix it. Credentials in the URL query (ENTSO-E's
``securityToken``) are masked in logs and dead letters.

Example tick (key ``IT-NORD``)::

    {"schema_version": 1, "market": "IT-NORD", "start": "2025-04-07T00:00:00Z",
     "end": "2025-04-07T00:15:00Z", "price_per_kwh": -0.0042, "currency": "EUR",
     "price_kind": "day_ahead", "published_at": "2025-04-06T11:00:00Z"}

Delivery: at least once. A tick is remembered as sent only once the broker
acknowledged it, so a failure re-sends it; a restart re-sends the current
document (consumers key on market and start, so a duplicate is harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import itertools
import logging
import re
import time as clock
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Generic, Literal, Self, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
import orjson
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ingest.config import TomlConfig
from ingest.entsoe import DocumentError, NoDataError, parse_day_ahead
from pipeline import codec, kafka, topics
from pipeline.backoff import Backoff
from pipeline.codec import DecodeError, Rejected
from pipeline.schemas import Identifier, Message, PriceKind, PriceTick, dead_letter
from pipeline.settings import Settings

log = logging.getLogger(__name__)

COMPONENT = "ingest.prices"

# Where a CSV row's cells beyond the header go (csv.DictReader would key them by None,
# which neither sorts with the column names nor encodes as JSON): the row is rejected.
EXTRA_CELLS = "(cells beyond the header)"

# Price columns -> divisor to a price per kWh. The first one present in a row wins.
PRICE_COLUMNS: dict[str, float] = {
    "price_per_kwh": 1.0,  # currency/kWh, as on the wire
    "price_per_mwh": 1000.0,  # currency/MWh (exchanges, ENTSO-E) -> /1000
}

Format = Literal["auto", "csv", "json", "entsoe"]
M = TypeVar("M", bound=Message)


# --- tables: CSV and JSON ------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed(Generic[M]):
    """What a document yielded: valid messages, and rejected rows with their reasons."""

    messages: list[M]
    rejected: list[Rejected] = field(default_factory=list)


def sniff_format(raw: bytes) -> Literal["csv", "json", "entsoe"]:
    """Guess a document's format from its first bytes: ``<`` XML, ``[``/``{`` JSON, else CSV."""
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"<":
        return "entsoe"
    if head in (b"[", b"{"):
        return "json"
    return "csv"


def table_rows(raw: bytes, fmt: Literal["csv", "json"], list_key: str) -> list[dict[str, Any]]:
    """Rows of a CSV or JSON table as dicts; JSON ``{..., list_key: [...]}`` lends its
    other top-level keys (e.g. ``market``) to every row that lacks them."""
    if fmt == "csv":
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise DocumentError(f"CSV is not UTF-8: {error}", "UnicodeDecodeError") from None
        reader = csv.DictReader(io.StringIO(text), restkey=EXTRA_CELLS)
        try:
            if not reader.fieldnames:
                raise DocumentError("CSV has no header row")
            # Empty cells mean "absent", like a missing JSON key (empty cells past the
            # header too: a trailing comma).
            return [
                {k: v for k, v in row.items() if v not in (None, "") and not _blanks(v)}
                for row in reader
            ]
        except csv.Error as error:  # e.g. a cell longer than the csv module's field limit
            raise DocumentError(f"malformed CSV: {error}", "CSVError") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise DocumentError(f"not JSON: {error}", "JSONDecodeError") from None
    if isinstance(data, dict):
        defaults = {k: v for k, v in data.items() if k != list_key}
        data = data.get(list_key)
        if not isinstance(data, list):
            raise DocumentError(f"JSON object needs a {list_key!r} list")
        return [{**defaults, **row} if isinstance(row, dict) else row for row in data]
    if not isinstance(data, list):
        raise DocumentError(f"JSON must be a list of rows or an object with {list_key!r}")
    return data


def _blanks(value: Any) -> bool:
    return isinstance(value, list) and not any(value)


def parse_instant(value: Any, name: str, naive_zone: tzinfo | None = None) -> datetime:
    """A timezone-aware instant in UTC from ISO 8601 text.

    Naive times are refused, unless ``naive_zone`` says which clock they are on
    (a history file exported without offsets).
    """
    if not isinstance(value, str):
        raise ValueError(f"{name} must be ISO 8601 text, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{name} {value!r} is not ISO 8601") from None
    if parsed.tzinfo is None:
        if naive_zone is None:
            raise ValueError(f"{name} {value!r} has no UTC offset")
        parsed = parsed.replace(tzinfo=naive_zone)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first instant in UTC
        raise ValueError(f"{name} {value!r} is out of range in UTC") from None


def fill_ends(starts: Sequence[datetime]) -> list[datetime | None]:
    """Default interval ends: start + the smallest step between distinct starts; None if
    there is a single start (its length is unknowable) or the end would be after 9999."""
    ordered = sorted(set(starts))
    steps = [b - a for a, b in itertools.pairwise(ordered)]
    if not steps:
        return [None] * len(starts)
    step = min(steps)
    last = datetime.max.replace(tzinfo=UTC) - step
    return [s + step if s <= last else None for s in starts]


def parse_prices(
    raw: bytes,
    fmt: Format = "auto",
    *,
    market: str | None = None,
    price_kind: PriceKind = PriceKind.DAY_AHEAD,
    naive_zone: tzinfo | None = None,
) -> Parsed[PriceTick]:
    """Ticks of a price document (CSV, JSON or ENTSO-E XML), sorted by market and start.

    Bad rows are returned as rejected with their row number; a document that is
    unusable as a whole raises :class:`DocumentError` (or :class:`NoDataError`).
    Times without a UTC offset are rejected unless ``naive_zone`` is given.
    """
    fmt = sniff_format(raw) if fmt == "auto" else fmt
    if fmt == "entsoe":
        return Parsed(parse_day_ahead(raw, price_kind=price_kind))
    rows = table_rows(raw, fmt, "prices")
    if not rows:
        raise DocumentError(f"{fmt.upper()} document has no price rows")
    # Across all rows: a blank cell is an absent key, and a history may start with holes.
    columns: set[str] = set().union(*(row for row in rows if isinstance(row, dict)))
    columns.discard(EXTRA_CELLS)
    if "time" not in columns or not any(c in columns for c in PRICE_COLUMNS):
        raise DocumentError(
            f"rows have keys {sorted(columns)}; prices need 'time' and one of "
            f"{sorted(PRICE_COLUMNS)}"
        )

    rejected: list[tuple[int, Rejected]] = []
    good: list[tuple[int, dict[str, Any], datetime]] = []
    for number, row in enumerate(rows, start=1):
        try:
            check_row(row)
            good.append((number, row, parse_instant(row.get("time"), "time", naive_zone)))
        except ValueError as error:
            rejected.append((number, bad_row(number, row, str(error))))

    by_market: dict[str, list[tuple[int, dict[str, Any], datetime]]] = {}
    for number, row, start in good:
        row_market = row.get("market", market)
        if row_market is None:
            rejected.append((number, bad_row(number, row, "no market (column or feed config)")))
            continue
        by_market.setdefault(str(row_market), []).append((number, row, start))

    ticks: list[PriceTick] = []
    for market_id, entries in by_market.items():
        ends = fill_ends([start for _, _, start in entries])
        for (number, row, start), default_end in zip(entries, ends, strict=True):
            try:
                ticks.append(_tick(row, market_id, start, default_end, price_kind, naive_zone))
            except (ValueError, ValidationError) as error:
                reason = codec.describe(error) if isinstance(error, ValidationError) else str(error)
                rejected.append((number, bad_row(number, row, reason)))
    return Parsed(
        sorted(ticks, key=lambda t: (t.market, t.start)),
        [bad for _, bad in sorted(rejected, key=lambda item: item[0])],
    )


def _tick(
    row: dict[str, Any],
    market: str,
    start: datetime,
    default_end: datetime | None,
    price_kind: PriceKind,
    naive_zone: tzinfo | None = None,
) -> PriceTick:
    column = next((c for c in PRICE_COLUMNS if row.get(c) is not None), None)
    if column is None:
        raise ValueError(f"no price ({' or '.join(PRICE_COLUMNS)})")
    # Rounded so /1000 does not turn 89.42 into 0.08942000000000001 on the wire.
    price = round(cell_number(row, column) / PRICE_COLUMNS[column], 10)
    end = parse_instant(row["end"], "end", naive_zone) if "end" in row else default_end
    if end is None:
        raise ValueError("needs an 'end' (a single price, or one ending after 9999, has none)")
    published = row.get("published_at")
    return PriceTick(
        market=market,
        start=start,
        end=end,
        price_per_kwh=price,
        currency=str(row.get("currency", "EUR")),
        price_kind=price_kind,
        # A price is known no later than its interval starts: a safe default for strategies.
        published_at=(parse_instant(published, "published_at", naive_zone) if published else start),
    )


def check_row(row: Any) -> None:
    """Raise ValueError for a table row that is not an object or has cells beyond the header."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {row!r}")
    if EXTRA_CELLS in row:
        raise ValueError(f"more cells than the header: {row[EXTRA_CELLS]!r} beyond it")


def cell_number(row: dict[str, Any], name: str) -> float:
    """A row's cell as a float: a number, or text that is one (JSON ``true`` is not)."""
    value = row[name]
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None


def bad_row(number: int, row: Any, reason: str) -> Rejected:
    """A rejected table row: its JSON, and a reason that starts with its row number."""
    return Rejected(orjson.dumps(row, default=str), f"row {number}: {reason}", "BadRow")


def read_price_file(
    path: Path,
    *,
    market: str | None = None,
    fmt: Format = "auto",
    naive_zone: tzinfo | None = None,
) -> Parsed[PriceTick]:
    """Read a CSV, JSON or ENTSO-E XML price file (see :func:`parse_prices`)."""
    by_suffix: dict[str, Format] = {".csv": "csv", ".json": "json", ".xml": "entsoe"}
    if fmt == "auto":
        fmt = by_suffix.get(path.suffix.lower(), "auto")
    return parse_prices(path.read_bytes(), fmt, market=market, naive_zone=naive_zone)


# --- time-of-use tariffs -------------------------------------------------------------------

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_GROUPS = {
    "all": frozenset(range(7)),
    "weekdays": frozenset(range(5)),
    "weekends": frozenset({5, 6}),
}
_MINUTES_PER_DAY = 24 * 60


def _clock_minutes(text: str) -> int:
    """Minutes after local midnight of ``HH:MM``; ``24:00`` is the end of the day."""
    try:
        hours_text, minutes_text = text.split(":")
        hours, minutes = int(hours_text), int(minutes_text)
    except ValueError:
        raise ValueError(f"{text!r} is not HH:MM") from None
    if not (0 <= minutes < 60 and 0 <= hours * 60 + minutes <= _MINUTES_PER_DAY):
        raise ValueError(f"{text!r} is not a clock time between 00:00 and 24:00")
    return hours * 60 + minutes


class TouPeriod(BaseModel):
    """One rate of a tariff, on some days between two local clock times.

    ``end`` before ``start`` wraps past midnight on the same listed day:
    ``22:00``-``06:00`` on weekdays covers 00:00-06:00 and 22:00-24:00 of
    Monday to Friday.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    rate_per_kwh: float
    """Price of energy in this period. [currency/kWh]"""
    start: str = "00:00"
    """Local clock time, HH:MM."""
    end: str = "24:00"
    """Local clock time, HH:MM, exclusive; 24:00 is midnight at the end of the day."""
    days: list[str] = Field(default_factory=lambda: ["all"])
    """``all``, ``weekdays``, ``weekends`` or day names ``mon`` .. ``sun``."""

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        _clock_minutes(value)
        return value

    @field_validator("days")
    @classmethod
    def _known_days(cls, value: list[str]) -> list[str]:
        unknown = [d for d in value if d.lower() not in _DAY_GROUPS and d.lower() not in _WEEKDAYS]
        if unknown or not value:
            raise ValueError(
                f"unknown days {unknown}; use {sorted(_DAY_GROUPS)} or {list(_WEEKDAYS)}"
            )
        return value

    @property
    def weekdays(self) -> frozenset[int]:
        days: set[int] = set()
        for day in self.days:
            day = day.lower()
            days |= _DAY_GROUPS[day] if day in _DAY_GROUPS else {_WEEKDAYS.index(day)}
        return frozenset(days)

    def minute_ranges(self) -> list[tuple[int, int]]:
        """[start, end) minute ranges of one day, the wrap past midnight split in two."""
        start, end = _clock_minutes(self.start), _clock_minutes(self.end)
        if start == end:
            raise ValueError(f"period {self.name!r}: start and end are both {self.start}")
        if start < end:
            return [(start, end)]
        return [(0, end), (start, _MINUTES_PER_DAY)] if end else [(start, _MINUTES_PER_DAY)]


class TouSchedule(BaseModel):
    """A time-of-use tariff: every minute of every weekday has exactly one period."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    market: Identifier
    """Market id of the generated ticks, e.g. ``be-residential-tou``."""
    time_zone: str = "Europe/Brussels"
    """IANA zone of the periods' clock times; DST days have 23 or 25 hours."""
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    resolution_min: Literal[15, 60] = 60
    """Length of a generated tick. [min]"""
    periods: list[TouPeriod] = Field(min_length=1)

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"time_zone {value!r} is not an IANA time zone") from None
        return value

    @model_validator(mode="after")
    def _covers_every_minute_once(self) -> Self:
        # One owner per slot of the week; the slot is the tick resolution, so every
        # generated tick lies inside exactly one period.
        step = self.resolution_min
        owner: list[list[str | None]] = [[None] * (_MINUTES_PER_DAY // step) for _ in range(7)]
        for period in self.periods:
            for lo, hi in period.minute_ranges():
                if lo % step or hi % step:
                    raise ValueError(
                        f"period {period.name!r}: {period.start}-{period.end} is not on "
                        f"{step}-minute boundaries (resolution_min)"
                    )
                for day in sorted(period.weekdays):
                    for slot in range(lo // step, hi // step):
                        if owner[day][slot] is not None:
                            raise ValueError(
                                f"period {period.name!r} overlaps {owner[day][slot]!r} on "
                                f"{_WEEKDAYS[day]} at {_clock(slot * step)}"
                            )
                        owner[day][slot] = period.name
        for day, slots in enumerate(owner):
            if None in slots:
                first = slots.index(None)
                last = first
                while last + 1 < len(slots) and slots[last + 1] is None:
                    last += 1
                raise ValueError(
                    f"no period covers {_WEEKDAYS[day]} {_clock(first * step)}-"
                    f"{_clock((last + 1) * step)}"
                )
        return self

    def period_at(self, local: datetime) -> TouPeriod:
        """The period whose clock range holds a local wall time."""
        minute = local.hour * 60 + local.minute
        for period in self.periods:
            if local.weekday() in period.weekdays and any(
                lo <= minute < hi for lo, hi in period.minute_ranges()
            ):
                return period
        raise AssertionError("unreachable: the validator checked that every minute is covered")


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def tou_ticks(
    schedule: TouSchedule, first_day: date, last_day: date, *, published_at: datetime | None = None
) -> list[PriceTick]:
    """Ticks of a tariff from local midnight of ``first_day`` to the end of ``last_day``.

    Steps are taken in UTC and each is looked up by its local wall time, so a
    spring-forward day has 23 hourly ticks and a fall-back day 25 (the repeated
    hour at its rate, twice). ``published_at`` defaults to each tick's start.
    """
    if last_day < first_day:
        raise ValueError(f"last_day {last_day} is before first_day {first_day}")
    zone = ZoneInfo(schedule.time_zone)
    at = datetime.combine(first_day, time(), zone).astimezone(UTC)
    stop = datetime.combine(last_day + timedelta(days=1), time(), zone).astimezone(UTC)
    step = timedelta(minutes=schedule.resolution_min)
    ticks = []
    while at < stop:
        period = schedule.period_at(at.astimezone(zone))
        ticks.append(
            PriceTick(
                market=schedule.market,
                start=at,
                end=at + step,
                price_per_kwh=period.rate_per_kwh,
                currency=schedule.currency,
                price_kind=PriceKind.TOU,
                published_at=published_at or at,
            )
        )
        at += step
    return ticks


# --- the connector -------------------------------------------------------------------------


class FeedConfig(TomlConfig):
    """Where a feed reads and how it retries. Validated at construction, no network calls."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(min_length=1)
    """An ``http://``/``https://`` URL polled with GET, or a file path re-read each poll."""
    format: Format = "auto"
    """``auto`` sniffs the first bytes: ``<`` ENTSO-E XML, ``[``/``{`` JSON, else CSV."""
    poll_interval_s: Annotated[float, Field(gt=0)] = 900.0
    """15 min: day-ahead prices change once a day; a spot feed can poll faster."""
    request_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    reconnect_initial_s: Annotated[float, Field(gt=0)] = 1.0
    reconnect_max_s: Annotated[float, Field(gt=0)] = 300.0
    """Backoff ceiling while the source is unreachable (Telegraf max_reconnect_interval)."""
    max_document_bytes: Annotated[int, Field(ge=1024)] = 20_000_000
    """A year of 15-minute ENTSO-E prices for one zone is a few MB; far more is a wrong URL."""
    remember_max: Annotated[int, Field(ge=1)] = 200_000
    """Sent keys kept for de-duplication (over 5 years of one market's 15-minute ticks)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra HTTP headers, e.g. an API key (not masked in the config's repr)."""

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if "://" in self.source and not self.is_url:
            raise ValueError(f"source must be http(s):// or a file path, got {self.source!r}")
        if self.reconnect_initial_s > self.reconnect_max_s:
            raise ValueError("reconnect_initial_s must not exceed reconnect_max_s")
        return self


class PriceFeedConfig(FeedConfig):
    """A price feed: a URL or file of CSV, JSON or ENTSO-E XML (see the module docstring)."""

    market: Identifier | None = None
    """Market of CSV/JSON rows without a ``market`` column (ENTSO-E documents name theirs)."""
    price_kind: PriceKind = PriceKind.DAY_AHEAD


@dataclass
class FeedStats:
    """What a feed did since it started (read by ``/metrics`` at scrape time)."""

    polls: int = 0
    polls_answered: int = 0
    """Polls the source answered: with data (sent, dead-lettered) or "not published yet"."""
    last_answered_unix_s: float | None = None
    """When the source last answered [s since the epoch]: how stale the feed is."""
    sent: int = 0
    duplicates: int = 0
    bad_documents: int = 0
    bad_rows: int = 0
    fetch_errors: int = 0
    """Polls that failed: the source unavailable, or Kafka (retried with backoff)."""
    last_error: str | None = None


class SourceUnavailable(Exception):
    """The source did not answer usefully this time (network, 5xx, 429); retry later."""

    retriable = True


class SourceRefused(Exception):
    """The source refuses our credentials (HTTP 401/403): a configuration error."""

    retriable = False


# Query parameters that carry credentials, e.g. ENTSO-E's securityToken.
_SECRET_PARAMS = re.compile(r"(?i)((?:token|key|secret|password|securitytoken)[^=&]*=)[^&]*")


def redact_url(source: str) -> str:
    """A URL with the values of credential-like query parameters replaced by ``***``."""
    return _SECRET_PARAMS.sub(r"\1***", source)


class Feed(Generic[M]):
    """Poll a source, parse it, send new messages to a topic, dead-letter the bad ones."""

    spec: topics.TopicSpec
    component: str

    def __init__(self, settings: Settings, config: FeedConfig) -> None:
        self.settings = settings
        self.config = config
        self.stats = FeedStats()
        self._sent: OrderedDict[Hashable, None] = OrderedDict()
        self._producer: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._backoff_delays = Backoff(config.reconnect_initial_s, config.reconnect_max_s)

    # subclasses say how a document becomes messages and what identifies one
    def parse(self, raw: bytes) -> Parsed[M]:
        raise NotImplementedError

    def key(self, message: M) -> str:
        raise NotImplementedError

    def identity(self, message: M) -> Hashable:
        raise NotImplementedError

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._stopping.clear()
        producer = kafka.producer(self.settings)
        await producer.start()
        self._producer = producer
        if self.config.is_url:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.request_timeout_s),
                headers=self.config.headers,
            )

    async def stop(self) -> None:
        """Stop polling, flush and close; safe to call twice."""
        self._stopping.set()
        task = self._run_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            # The loop notices the stop event at its next wait; an HTTP request in
            # flight gets its own timeout, after which it is cancelled.
            await asyncio.wait({task}, timeout=self.config.request_timeout_s)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def run(self) -> None:
        """Poll until cancelled or stopped; raises :class:`SourceRefused` on HTTP 401/403."""
        await self.start()
        self._run_task = asyncio.current_task()
        while not self._stopping.is_set():
            delay_s = await self.poll_once()
            await self._sleep(delay_s)

    async def poll_once(self) -> float:
        """One fetch-parse-send cycle; returns how long to wait before the next one. [s]

        Raises :class:`SourceRefused` when the source refuses our credentials:
        retrying cannot help, the configuration must change.
        """
        self.stats.polls += 1
        try:
            raw = await self._fetch()
        except SourceUnavailable as error:
            return self._backoff(str(error))
        try:
            try:
                parsed = self.parse(raw)
            except NoDataError as error:
                # Not a broken document: the data is not published yet.
                log.info("%s: %s", self.source_label, error.reason)
            except DecodeError as error:
                # The same bad bytes polled again are one problem, dead-lettered once.
                if await self._dead_letter_once(raw, error.reason, error.error_type):
                    self.stats.bad_documents += 1
            else:
                for rejected in parsed.rejected:
                    if await self._dead_letter_once(
                        rejected.raw, rejected.reason, rejected.error_type
                    ):
                        self.stats.bad_rows += 1
                await self._send_new(parsed.messages)
        except KafkaError as error:
            # Nothing is remembered as sent until acknowledged: the next poll re-sends.
            return self._backoff(f"Kafka: {error}")
        self.stats.polls_answered += 1
        self.stats.last_answered_unix_s = clock.time()
        self._backoff_delays.reset()
        return self.config.poll_interval_s

    def _backoff(self, reason: str) -> float:
        self.stats.fetch_errors += 1
        self.stats.last_error = reason
        delay_s = self._backoff_delays.next_delay_s()
        log.warning("%s: %s; retrying in %.1f s", self.source_label, reason, delay_s)
        return delay_s

    async def _sleep(self, delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)

    async def _fetch(self) -> bytes:
        if not self.config.is_url:
            return self._read_file()
        if self._session is None:
            raise RuntimeError("feed not started")
        limit = self.config.max_document_bytes
        try:
            async with self._session.get(self.config.source) as response:
                if response.status in (401, 403):
                    body = (await response.content.read(200)).decode("utf-8", "replace")
                    raise SourceRefused(
                        f"{self.source_label}: HTTP {response.status} {body!r}; "
                        "check the credentials in source or headers"
                    )
                if response.status >= 400:
                    # 429 and 5xx are transient; a 404 before publication is normal too.
                    raise SourceUnavailable(f"HTTP {response.status} from {self.source_label}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(65_536):
                    size += len(chunk)
                    if size > limit:
                        raise SourceUnavailable(
                            f"{self.source_label}: document larger than {limit} bytes "
                            "(max_document_bytes)"
                        )
                    chunks.append(chunk)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise SourceUnavailable(f"{type(error).__name__}: {error}") from None
        return b"".join(chunks)

    def _read_file(self) -> bytes:
        # Blocking read on purpose: price files are small, and a worker thread
        # would outlive the event loop in tests.
        try:
            return Path(self.config.source).read_bytes()
        except OSError as error:
            raise SourceUnavailable(f"cannot read {self.source_label}: {error}") from None

    async def _send_new(self, messages: list[M]) -> None:
        fresh = [m for m in messages if self.identity(m) not in self._sent]
        self.stats.duplicates += len(messages) - len(fresh)
        if not fresh:
            return
        topic = self.settings.topic(self.spec)
        pending = [
            await self._producer.send(topic, codec.encode(m), key=self.key(m).encode())
            for m in fresh
        ]
        await asyncio.gather(*pending)
        for message in fresh:
            self._remember(self.identity(message))
        self.stats.sent += len(fresh)
        log.info(
            "source=%s sent=%d duplicates_skipped=%d",
            self.source_label,
            len(fresh),
            len(messages) - len(fresh),
        )

    def _remember(self, identity: Hashable) -> None:
        self._sent[identity] = None
        while len(self._sent) > self.config.remember_max:
            self._sent.popitem(last=False)

    async def _dead_letter_once(self, raw: bytes, reason: str, error_type: str) -> bool:
        """Dead-letter bad input unless the same bytes were already; True if sent now."""
        identity = ("dead-letter", hashlib.sha256(raw).digest(), reason)
        self.stats.last_error = reason
        if identity in self._sent:
            return False
        topic = self.settings.topic(self.spec)
        log.warning("%s: %s (dead-lettered); starts %r", self.source_label, reason, raw[:120])
        letter = dead_letter(
            raw=raw,
            reason=f"{self.source_label}: {reason}",
            error_type=error_type,
            component=self.component,
            source_topic=topic,
        )
        dlq = self.settings.topic(topics.DEAD_LETTERS)
        await (await self._producer.send(dlq, codec.encode(letter), key=topic.encode()))
        self._remember(identity)
        return True

    @property
    def source_label(self) -> str:
        """The source as logs and dead letters show it: secrets in the URL query masked."""
        return redact_url(self.config.source)


class PriceFeed(Feed[PriceTick]):
    """Polls a price URL or file and sends new :class:`PriceTick` s to the prices topic."""

    spec = topics.PRICES
    component = COMPONENT

    def __init__(self, settings: Settings, config: PriceFeedConfig) -> None:
        super().__init__(settings, config)
        self.config: PriceFeedConfig = config

    def parse(self, raw: bytes) -> Parsed[PriceTick]:
        return parse_prices(
            raw, self.config.format, market=self.config.market, price_kind=self.config.price_kind
        )

    def key(self, message: PriceTick) -> str:
        return message.market

    def identity(self, message: PriceTick) -> Hashable:
        # A corrected price for the same interval is new information and is sent.
        return (message.market, message.start, message.price_per_kwh)
