"""A backtest's price history, read strictly: every price at its true instant, or an error.

Formats: CSV or JSON tables (``time``, ``price_per_kwh`` or ``price_per_mwh``
[currency/MWh, divided by 1000], optional ``published_at`` and ``market``; the
columns of :mod:`ingest.prices`), Parquet with the same columns, and ENTSO-E
XML (always UTC, via :func:`ingest.prices.parse_prices`). Rows are numbered as
:mod:`ingest.prices` numbers them: 1-based, header excluded; an ENTSO-E
document's points are numbered in time order. An ``end`` column is ignored:
the step is inferred.

Time:

* A time with a UTC offset (or ``Z``) is taken as given.
* A naive time needs ``timezone`` (``--timezone``, an IANA zone), else the load
  fails naming the first such row. Local times are localized in file order:
  a local time the clock skips when summer time starts is an error; a local
  time that occurs twice when summer time ends is the earlier instant (summer
  time) unless the row before it is in the same repeated stretch and either
  already is the later instant or has a local time at or after this one (the
  clock went back by the DST shift): then it is the later instant (winter
  time). So a correct autumn file lists the repeated hour (or quarter-hours)
  twice, summer time first; a file that lists it once has a one-hour gap.
  ``published_at`` is localized the same way, except that a repeated local
  time is refused (which of the two is unknowable).
* The same instant twice is an error naming both rows.
* Instants must increase in file order: time going backwards (other than the
  autumn repeat above) is an error naming both rows.

Step: the most common difference between consecutive instants (the smallest
of the most common, on a tie), which must be 5, 15, 30 or 60 minutes. Every
difference must be a multiple of it, else the file "mixes steps". A single
difference of k > 1 steps is a gap of k - 1 missing intervals. Two or more
consecutive differences that are not one step are a stretch at another
resolution (hourly rows in a 15-minute file, or the reverse) and also "mix
steps": so two holes in a row, with a single priced row between them, cannot be
told from a change of resolution and are refused too; list holes as rows with
a blank price to keep them apart.

Gaps: missing intervals and rows with a time but no usable price (blank, or
not a finite number; such rows are in ``skipped`` with their row number) are
holes, listed in ``gaps`` and never filled: no price is invented for them. A
row without a usable time, or with cells beyond the header, is an error.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ingest.entsoe import DocumentError
from ingest.prices import PRICE_COLUMNS, check_row, sniff_format, table_rows
from ingest.prices import parse_prices as parse_prices_document
from processors.backtest import PricePoint

log = logging.getLogger(__name__)

STEPS = tuple(timedelta(minutes=m) for m in (5, 15, 30, 60))
"""Resolutions a history may have."""


class PriceHistoryError(ValueError):
    """A price history that cannot be read honestly; the message names the rows."""


@dataclass(frozen=True)
class Gap:
    """A hole in the history: ``[start, end)`` has no price."""

    start: datetime
    end: datetime
    missing_intervals: int
    after_row: int
    """Number of the last row with a price before the hole; 0 if the history starts with it."""


@dataclass(frozen=True)
class PriceHistory:
    points: list[PricePoint]
    """Sorted by start, unique UTC starts, only rows with a price."""
    step: timedelta
    """The inferred resolution."""
    gaps: list[Gap]
    """Holes (missing rows or blank prices), never filled."""
    skipped: list[str]
    """Why each skipped row was skipped, starting ``row N:``."""


@dataclass(frozen=True)
class _Row:
    number: int
    start: datetime  # UTC
    price_per_kwh: float | None  # None: a hole
    published_at: datetime | None


def load_price_history(
    path: Path, *, timezone: str | None = None, market: str | None = None
) -> PriceHistory:
    """The price history in ``path`` (see the module docstring for the rules).

    ``timezone`` is the IANA zone of naive times. ``market`` selects the rows of
    one market (rows without a ``market`` are taken as that market); without it
    the file must hold a single market. Raises :class:`PriceHistoryError`.
    """
    zone: ZoneInfo | None = None
    if timezone is not None:
        try:
            zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise PriceHistoryError(
                f"--timezone {timezone!r} is not an IANA time zone (e.g. Europe/Brussels)"
            ) from None
    try:
        rows, skipped, unit = _read(path, zone, market)
    except DocumentError as error:
        raise PriceHistoryError(f"{path}: {error.reason}") from None
    except PriceHistoryError as error:
        raise PriceHistoryError(f"{path}: {error}") from None
    history = _check_time(rows, skipped, unit, path)
    if history.gaps or history.skipped:
        log.warning(
            "%s: %d gap(s), %d missing interval(s) of %s, %d row(s) skipped; not filled",
            path,
            len(history.gaps),
            sum(gap.missing_intervals for gap in history.gaps),
            history.step,
            len(history.skipped),
        )
    return history


# --- reading -------------------------------------------------------------------------------


def _read(
    path: Path, zone: ZoneInfo | None, market: str | None
) -> tuple[list[_Row], list[str], str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import polars as pl

        try:
            table: list[Any] = pl.read_parquet(path).to_dicts()
        except (OSError, pl.exceptions.PolarsError) as error:
            raise PriceHistoryError(f"not a readable Parquet file: {error}") from None
        return (*_table(table, zone, market), "row")
    raw = path.read_bytes()
    fmt = {".csv": "csv", ".json": "json", ".xml": "entsoe"}.get(suffix) or sniff_format(raw)
    if fmt == "entsoe":
        return _entsoe(raw, market), [], "point"
    return (
        *_table(table_rows(raw, "csv" if fmt == "csv" else "json", "prices"), zone, market),
        "row",
    )


def _entsoe(raw: bytes, market: str | None) -> list[_Row]:
    ticks = parse_prices_document(raw, "entsoe").messages
    _single_market([t.market for t in ticks], market, "points")
    chosen = sorted(
        (t for t in ticks if market is None or t.market == market), key=lambda t: t.start
    )
    return [
        _Row(number, tick.start, tick.price_per_kwh, tick.published_at)
        for number, tick in enumerate(chosen, start=1)
    ]


def _single_market(markets: Iterable[str], market: str | None, what: str) -> None:
    names = sorted(set(markets))
    if market is None and len(names) > 1:
        raise PriceHistoryError(f"{what} of several markets {names}; choose one")
    if market is not None and names and market not in names:
        raise PriceHistoryError(f"no {what} of market {market!r}; the file holds {names}")


def _table(
    table: list[Any], zone: ZoneInfo | None, market: str | None
) -> tuple[list[_Row], list[str]]:
    if not table:
        raise PriceHistoryError("no price rows")
    columns: set[str] = set().union(*(row for row in table if isinstance(row, dict)))
    if "time" in columns and not columns & set(PRICE_COLUMNS):
        raise PriceHistoryError(
            f"no row has a price: every {' or '.join(PRICE_COLUMNS)} cell is blank or missing"
        )
    if "time" not in columns:
        raise PriceHistoryError(
            f"rows have columns {sorted(columns)}; a price history needs 'time' and one of "
            f"{sorted(PRICE_COLUMNS)}"
        )
    numbered: list[tuple[int, dict[str, Any]]] = []
    for number, row in enumerate(table, start=1):
        try:
            check_row(row)
        except ValueError as error:
            raise PriceHistoryError(f"row {number}: {error}") from None
        numbered.append((number, {k: v for k, v in row.items() if not _blank(v)}))
    _single_market((str(r["market"]) for _, r in numbered if "market" in r), market, "rows")
    if market is not None:
        numbered = [(n, r) for n, r in numbered if str(r.get("market", market)) == market]

    rows: list[_Row] = []
    skipped: list[str] = []
    clock = _Clock(zone)
    for number, row in numbered:
        try:
            start = clock.localize(row.get("time"), "time")
            published = row.get("published_at")
            published_at = None if published is None else _instant(published, zone)
        except ValueError as error:
            raise PriceHistoryError(f"row {number}: {error}") from None
        try:
            price: float | None = _price(row)
        except ValueError as error:
            skipped.append(f"row {number}: {error}")
            price = None
        rows.append(_Row(number, start, price, published_at))
    return rows, skipped


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)  # Parquet/polars null-ish


def _price(row: dict[str, Any]) -> float:
    column = next((c for c in PRICE_COLUMNS if c in row), None)
    if column is None:
        raise ValueError(f"no price ({' or '.join(PRICE_COLUMNS)})")
    value = row[column]
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{column} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{column} {value!r} is not a finite number")
    # Rounded as ingest.prices does, so /1000 does not turn 89.42 into 0.08942000000000001.
    return round(number / PRICE_COLUMNS[column], 10)


def _parse(value: Any, name: str) -> datetime:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{name} must be ISO 8601 text, got {value!r}")
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{name} {value!r} is not ISO 8601") from None


def _utc(moment: datetime, value: Any, name: str) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{name} {value!r} is out of range in UTC") from None


def _no_offset(value: Any, name: str) -> ValueError:
    return ValueError(
        f"{name} {value!r} has no UTC offset; pass --timezone with the IANA zone of the "
        "file's clock (e.g. --timezone Europe/Brussels)"
    )


def _exists(local: datetime, zone: ZoneInfo) -> bool:
    aware = local.replace(tzinfo=zone)
    return aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == local


def _repeated(local: datetime, zone: ZoneInfo) -> bool:
    """Whether the local time occurs twice (the autumn hour)."""
    earlier, later = local.replace(tzinfo=zone, fold=0), local.replace(tzinfo=zone, fold=1)
    return earlier.utcoffset() != later.utcoffset() and _exists(local, zone)


def _skipped(value: Any, name: str, zone: ZoneInfo) -> ValueError:
    return ValueError(
        f"{name} {value!r} does not exist in {zone.key} (the clock skips it when summer time "
        "starts)"
    )


def _instant(value: Any, zone: ZoneInfo | None) -> datetime:
    """``published_at`` in UTC: a repeated local time is refused, not guessed."""
    moment = _parse(value, "published_at")
    if moment.tzinfo is None:
        if zone is None:
            raise _no_offset(value, "published_at")
        if not _exists(moment, zone):
            raise _skipped(value, "published_at", zone)
        if _repeated(moment, zone):
            raise ValueError(
                f"published_at {value!r} occurs twice in {zone.key} (summer time ends); "
                "give it a UTC offset"
            )
        moment = moment.replace(tzinfo=zone)
    return _utc(moment, value, "published_at")


class _Clock:
    """Localizes the row times of one file in order (see the module docstring)."""

    def __init__(self, zone: ZoneInfo | None) -> None:
        self.zone = zone
        self._previous: datetime | None = None  # the previous row's local time, with its fold

    def localize(self, value: Any, name: str) -> datetime:
        moment = _parse(value, name)
        zone = self.zone
        if moment.tzinfo is None:
            if zone is None:
                raise _no_offset(value, name)
            if not _exists(moment, zone):
                raise _skipped(value, name, zone)
            moment = moment.replace(tzinfo=zone, fold=self._fold(moment, zone))
        instant = _utc(moment, value, name)
        if zone is not None:
            self._previous = instant.astimezone(zone)
        return instant

    def _fold(self, local: datetime, zone: ZoneInfo) -> int:
        previous = self._previous
        if previous is None or not _repeated(local, zone):
            return 0
        wall = previous.replace(tzinfo=None, fold=0)
        # The same repeated stretch: the previous row is a repeated local time too, and
        # close (the stretch is as long as the DST shift, at most an hour or two).
        if not _repeated(wall, zone) or abs(local - wall) > timedelta(hours=3):
            return 0
        return 1 if previous.fold == 1 or local <= wall else 0


# --- time checks ---------------------------------------------------------------------------


def _check_time(rows: list[_Row], skipped: list[str], unit: str, path: Path) -> PriceHistory:
    if len(rows) < 2:
        raise PriceHistoryError(
            f"{path}: {len(rows)} {unit}(s) with a time; the step needs at least two"
        )
    seen: dict[datetime, int] = {}
    for row in rows:
        if row.start in seen:
            raise PriceHistoryError(
                f"{path}: {unit}s {seen[row.start]} and {row.number} are both "
                f"{_iso(row.start)}: duplicate instants"
            )
        seen[row.start] = row.number
    for before, after in itertools.pairwise(rows):
        if after.start < before.start:
            raise PriceHistoryError(
                f"{path}: {unit} {after.number} ({_iso(after.start)}) is before {unit} "
                f"{before.number} ({_iso(before.start)}): rows out of order"
            )

    diffs = [after.start - before.start for before, after in itertools.pairwise(rows)]
    counts = Counter(diffs)
    most = max(counts.values())
    step = min(d for d, n in counts.items() if n == most)
    if step not in STEPS:
        raise PriceHistoryError(
            f"{path}: the most common step between {unit}s is {step}; a price history needs "
            "5, 15, 30 or 60 minutes"
        )
    for index, diff in enumerate(diffs):
        if diff % step:
            raise PriceHistoryError(
                f"{path}: mixes steps: {unit}s {rows[index].number} and "
                f"{rows[index + 1].number} are {diff} apart, not a multiple of the step {step}"
            )
    index = 0
    while index < len(diffs):
        end = index
        while end < len(diffs) and diffs[end] != step:
            end += 1
        if end - index >= 2:
            raise PriceHistoryError(
                f"{path}: mixes steps: {unit}s {rows[index].number} to {rows[end].number} "
                f"are {sorted({str(d) for d in diffs[index:end]})} apart, while the step "
                f"(the most common) is {step}"
            )
        index = end + 1

    points: list[PricePoint] = []
    gaps: list[Gap] = []
    hole: datetime | None = None  # start of the open gap
    last_priced = 0
    previous: _Row | None = None
    for row in rows:
        if previous is not None and row.start - previous.start > step and hole is None:
            hole = previous.start + step
        if row.price_per_kwh is None:
            hole = row.start if hole is None else hole
        else:
            if hole is not None:
                gaps.append(Gap(hole, row.start, (row.start - hole) // step, last_priced))
                hole = None
            points.append(PricePoint(row.start, row.price_per_kwh, row.published_at))
            last_priced = row.number
        previous = row
    if hole is not None and previous is not None:
        end_time = previous.start + step
        gaps.append(Gap(hole, end_time, (end_time - hole) // step, last_priced))
    if not points:
        raise PriceHistoryError(f"{path}: no {unit} has a price")
    return PriceHistory(points, step, gaps, skipped)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
