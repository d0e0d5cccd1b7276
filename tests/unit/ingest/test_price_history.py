"""A backtest's price history: offsets, DST in local files, steps, duplicates, gaps."""

from __future__ import annotations

import itertools
import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import polars as pl
import pytest

from ingest.price_history import Gap, PriceHistory, PriceHistoryError, load_price_history
from processors.backtest import PricePoint

HOUR = timedelta(hours=1)
QUARTER = timedelta(minutes=15)
CASES = Path(__file__).parent / "entsoe_cases"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def write_csv(tmp_path: Path, times: list[str], *, header: str = "time,price_per_kwh") -> Path:
    """A CSV whose row N (1-based, header excluded) has price N/100 at the N-th time."""
    lines = [header] + [f"{t},{n / 100}" for n, t in enumerate(times, start=1)]
    path = tmp_path / "prices.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def local_day(day: str, step: timedelta, skip: tuple[str, str] | None = None) -> list[str]:
    """Naive local times of one day at ``step``, without the [skip) clock stretch."""
    start = datetime.fromisoformat(day)
    times = []
    at = start
    while at < start + timedelta(days=1):
        text = at.strftime("%H:%M")
        if skip is None or not skip[0] <= text < skip[1]:
            times.append(at.isoformat())
        at += step
    return times


def autumn_day(step: timedelta) -> list[str]:
    """2025-10-26 in Brussels as a correct local file lists it: 02:00-02:59 twice."""
    times = local_day("2025-10-26", step)
    repeated = [t for t in times if "T02:" in t]
    at = times.index(repeated[-1]) + 1
    return times[:at] + repeated + times[at:]


def assert_contiguous(history: PriceHistory, step: timedelta) -> None:
    starts = [p.start for p in history.points]
    assert all(b - a == step for a, b in itertools.pairwise(starts))
    assert history.step == step
    assert history.gaps == []
    assert history.skipped == []


def error_of(path: Path, **kwargs: str) -> str:
    with pytest.raises(PriceHistoryError) as caught:
        load_price_history(path, **kwargs)
    return str(caught.value)


# --- offsets -------------------------------------------------------------------------------


def test_offsets_are_taken_as_given_across_dst(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        [
            "2025-03-30T00:00:00+01:00",
            "2025-03-30T01:00:00+01:00",
            "2025-03-30T03:00:00+02:00",
            "2025-03-30T02:00:00Z",
        ],
    )
    history = load_price_history(path)
    assert history.points == [
        PricePoint(utc("2025-03-29T23:00"), 0.01),
        PricePoint(utc("2025-03-30T00:00"), 0.02),
        PricePoint(utc("2025-03-30T01:00"), 0.03),
        PricePoint(utc("2025-03-30T02:00"), 0.04),
    ]
    assert_contiguous(history, HOUR)


def test_offsets_win_over_the_timezone_in_autumn(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        ["2025-10-26T02:00:00+02:00", "2025-10-26T02:00:00+01:00", "2025-10-26T03:00:00+01:00"],
    )
    history = load_price_history(path, timezone="Europe/Brussels")
    assert [p.start for p in history.points] == [
        utc("2025-10-26T00:00"),
        utc("2025-10-26T01:00"),
        utc("2025-10-26T02:00"),
    ]
    assert_contiguous(history, HOUR)


# --- naive local times and DST -------------------------------------------------------------


@pytest.mark.parametrize(("step", "rows"), [(HOUR, 23), (QUARTER, 92)])
def test_spring_day_in_local_time_has_no_gap(tmp_path: Path, step: timedelta, rows: int) -> None:
    times = local_day("2025-03-30", step, skip=("02:00", "03:00"))
    assert len(times) == rows
    history = load_price_history(write_csv(tmp_path, times), timezone="Europe/Brussels")
    assert len(history.points) == rows
    assert history.points[0].start == utc("2025-03-29T23:00")
    assert history.points[-1].start == utc("2025-03-30T22:00") - step
    # 01:45 (or 01:00) CET is followed by 03:00 CEST: one step in UTC.
    after = next(i for i, t in enumerate(times) if t.endswith("T03:00:00"))
    assert history.points[after - 1].start == utc("2025-03-30T01:00") - step
    assert history.points[after].start == utc("2025-03-30T01:00")
    assert_contiguous(history, step)


@pytest.mark.parametrize(("step", "rows"), [(HOUR, 25), (QUARTER, 100)])
def test_autumn_day_in_local_time_lists_the_repeated_hour_twice(
    tmp_path: Path, step: timedelta, rows: int
) -> None:
    times = autumn_day(step)
    assert len(times) == rows
    history = load_price_history(write_csv(tmp_path, times), timezone="Europe/Brussels")
    starts = [p.start for p in history.points]
    assert len(set(starts)) == rows
    assert starts == [utc("2025-10-25T22:00") + n * step for n in range(rows)]
    # The first 02:00 is summer time (00:00Z), the second winter time (01:00Z).
    first, second = (i for i, t in enumerate(times) if t.endswith("T02:00:00"))
    assert (starts[first], starts[second]) == (utc("2025-10-26T00:00"), utc("2025-10-26T01:00"))
    assert [p.price_per_kwh for p in history.points] == [n / 100 for n in range(1, rows + 1)]
    assert_contiguous(history, step)


def test_autumn_hour_listed_once_is_a_one_hour_gap(tmp_path: Path) -> None:
    times = local_day("2025-10-26", HOUR)
    assert len(times) == 24
    history = load_price_history(write_csv(tmp_path, times), timezone="Europe/Brussels")
    assert len(history.points) == 24
    assert history.points[2].start == utc("2025-10-26T00:00")  # 02:00 taken as summer time
    assert history.points[3].start == utc("2025-10-26T02:00")  # 03:00 CET
    assert history.gaps == [Gap(utc("2025-10-26T01:00"), utc("2025-10-26T02:00"), 1, 3)]
    assert history.skipped == []


def test_autumn_quarter_hours_listed_once_are_a_one_hour_gap(tmp_path: Path) -> None:
    times = local_day("2025-10-26", QUARTER)[:12]  # 00:00 to 02:45 local, once
    path = tmp_path / "prices.csv"
    path.write_text("time,price_per_kwh\n2025-10-25T23:45,\n" + "".join(f"{t},1\n" for t in times))
    history = load_price_history(path, timezone="Europe/Brussels")
    assert len(history.points) == 12
    assert history.points[-1].start == utc("2025-10-26T00:45")  # 02:45 summer time
    # The leading blank row is a gap before any price (after_row 0).
    assert history.gaps == [Gap(utc("2025-10-25T21:45"), utc("2025-10-25T22:00"), 1, 0)]
    assert history.skipped == ["row 1: no price (price_per_kwh or price_per_mwh)"]
    with_tail = path.read_text() + "2025-10-26T03:00,2\n"  # row 14
    path.write_text(with_tail)
    history = load_price_history(path, timezone="Europe/Brussels")
    assert history.points[-1] == PricePoint(utc("2025-10-26T02:00"), 2.0)
    assert history.gaps[1:] == [Gap(utc("2025-10-26T01:00"), utc("2025-10-26T02:00"), 4, 13)]


def test_autumn_hour_listed_three_times_is_a_duplicate(tmp_path: Path) -> None:
    times = ["2025-10-26T01:00", "2025-10-26T02:00", "2025-10-26T02:00", "2025-10-26T02:00"]
    message = error_of(write_csv(tmp_path, times), timezone="Europe/Brussels")
    assert "rows 3 and 4 are both 2025-10-26T01:00:00Z" in message


def test_naive_time_without_timezone_names_the_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["2025-01-01T00:00:00Z", "2025-01-01T01:00:00", "2025-01-01T02:00"])
    message = error_of(path)
    assert message.startswith(f"{path}: row 2: time '2025-01-01T01:00:00' has no UTC offset")
    assert "--timezone" in message


def test_local_time_skipped_in_spring_names_the_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["2025-03-30T01:00", "2025-03-30T02:30", "2025-03-30T03:00"])
    message = error_of(path, timezone="Europe/Brussels")
    assert message == (
        f"{path}: row 2: time '2025-03-30T02:30' does not exist in Europe/Brussels "
        "(the clock skips it when summer time starts)"
    )


def test_unknown_timezone(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["2025-01-01T00:00", "2025-01-01T01:00"])
    assert "'Mars/Olympus' is not an IANA time zone" in error_of(path, timezone="Mars/Olympus")


# --- duplicates, order, steps --------------------------------------------------------------


def test_same_instant_twice_names_both_rows(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        ["2025-01-01T00:00Z", "2025-01-01T01:00Z", "2025-01-01T02:00Z", "2025-01-01T02:00+01:00"],
    )
    assert error_of(path) == (
        f"{path}: rows 2 and 4 are both 2025-01-01T01:00:00Z: duplicate instants"
    )


def test_rows_out_of_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["2025-01-01T00:00Z", "2025-01-01T02:00Z", "2025-01-01T01:00Z"])
    assert error_of(path) == (
        f"{path}: row 3 (2025-01-01T01:00:00Z) is before row 2 (2025-01-01T02:00:00Z): "
        "rows out of order"
    )


def test_hourly_then_quarter_hourly_mixes_steps(tmp_path: Path) -> None:
    hourly = [f"2025-01-01T{h:02d}:00Z" for h in range(6)]  # rows 1-6
    quarters = [f"2025-01-01T{5 + (m // 60):02d}:{m % 60:02d}Z" for m in range(15, 135, 15)]
    path = write_csv(tmp_path, hourly + quarters)  # rows 7-14
    assert error_of(path) == (
        f"{path}: mixes steps: rows 1 to 6 are ['1:00:00'] apart, while the step "
        "(the most common) is 0:15:00"
    )


def test_stretch_of_hourly_rows_in_a_quarter_hourly_file(tmp_path: Path) -> None:
    first = utc("2025-01-01T00:00")
    starts = [first + n * QUARTER for n in range(8)]  # rows 1-8
    starts += [starts[-1] + n * HOUR for n in (1, 2, 3)]  # rows 9-11
    starts += [starts[-1] + n * QUARTER for n in range(1, 9)]  # rows 12-19
    path = write_csv(tmp_path, [s.isoformat() for s in starts])
    assert error_of(path) == (
        f"{path}: mixes steps: rows 8 to 11 are ['1:00:00'] apart, while the step "
        "(the most common) is 0:15:00"
    )


def test_difference_that_is_no_multiple_of_the_step(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        ["2025-01-01T00:00Z", "2025-01-01T00:15Z", "2025-01-01T00:30Z", "2025-01-01T00:50Z"],
    )
    assert error_of(path) == (
        f"{path}: mixes steps: rows 3 and 4 are 0:20:00 apart, not a multiple of the step 0:15:00"
    )


def test_step_must_be_a_market_resolution(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["2025-01-01T00:00Z", "2025-01-01T00:10Z", "2025-01-01T00:20Z"])
    assert "the most common step between rows is 0:10:00" in error_of(path)


# --- gaps ----------------------------------------------------------------------------------


def test_missing_rows_are_a_gap_never_filled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_csv(
        tmp_path,
        ["2025-01-01T00:00Z", "2025-01-01T01:00Z", "2025-01-01T04:00Z", "2025-01-01T05:00Z"],
    )
    with caplog.at_level(logging.WARNING, logger="ingest.price_history"):
        history = load_price_history(path)
    assert [p.start for p in history.points] == [
        utc("2025-01-01T00:00"),
        utc("2025-01-01T01:00"),
        utc("2025-01-01T04:00"),
        utc("2025-01-01T05:00"),
    ]
    assert history.step == HOUR
    assert history.gaps == [Gap(utc("2025-01-01T02:00"), utc("2025-01-01T04:00"), 2, 2)]
    assert history.skipped == []
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 1 gap(s), 2 missing interval(s) of 1:00:00, 0 row(s) skipped; not filled"
    ]


def test_blank_prices_are_skipped_and_are_gaps(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(
        "time,price_per_kwh\n"
        "2025-01-01T00:00Z,0.1\n"
        "2025-01-01T01:00Z,\n"
        "2025-01-01T02:00Z,  \n"
        "2025-01-01T03:00Z,0.4\n"
        "2025-01-01T05:00Z,n/a\n"
        "2025-01-01T06:00Z,0.7\n"
        "2025-01-01T07:00Z,\n"
    )
    history = load_price_history(path)
    assert history.points == [
        PricePoint(utc("2025-01-01T00:00"), 0.1),
        PricePoint(utc("2025-01-01T03:00"), 0.4),
        PricePoint(utc("2025-01-01T06:00"), 0.7),
    ]
    assert history.gaps == [
        Gap(utc("2025-01-01T01:00"), utc("2025-01-01T03:00"), 2, 1),
        Gap(utc("2025-01-01T04:00"), utc("2025-01-01T06:00"), 2, 4),
        Gap(utc("2025-01-01T07:00"), utc("2025-01-01T08:00"), 1, 6),
    ]
    assert history.skipped == [
        "row 2: no price (price_per_kwh or price_per_mwh)",
        "row 3: no price (price_per_kwh or price_per_mwh)",
        "row 5: price_per_kwh 'n/a' is not a number",
        "row 7: no price (price_per_kwh or price_per_mwh)",
    ]


# --- units, published_at, formats ----------------------------------------------------------


def test_price_per_mwh_and_published_at(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(
        "time,price_per_mwh,published_at\n"
        "2025-10-26T01:00,89.42,2025-10-25T13:00\n"
        "2025-10-26T02:00,-5.1,2025-10-25T11:00:00Z\n"
        "2025-10-26T02:00,0,\n"
    )
    history = load_price_history(path, timezone="Europe/Brussels")
    assert history.points == [
        PricePoint(utc("2025-10-25T23:00"), 0.08942, utc("2025-10-25T11:00")),
        PricePoint(utc("2025-10-26T00:00"), -0.0051, utc("2025-10-25T11:00")),
        PricePoint(utc("2025-10-26T01:00"), 0.0, None),
    ]
    assert_contiguous(history, HOUR)


def test_published_at_in_the_repeated_hour_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(
        "time,price_per_kwh,published_at\n"
        "2025-10-26T05:00Z,0.1,2025-10-26T02:30\n"
        "2025-10-26T06:00Z,0.1,\n"
    )
    message = error_of(path, timezone="Europe/Brussels")
    assert message == (
        f"{path}: row 1: published_at '2025-10-26T02:30' occurs twice in Europe/Brussels "
        "(summer time ends); give it a UTC offset"
    )


def test_json_in_local_time(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    rows = [
        {"time": "2025-10-26T01:00", "price_per_kwh": 0.1},
        {"time": "2025-10-26T02:00", "price_per_kwh": 0.2},
        {"time": "2025-10-26T02:00", "price_per_kwh": None},
        {"time": "2025-10-26T03:00", "price_per_kwh": "0.4"},
    ]
    path.write_bytes(orjson.dumps({"market": "BE", "prices": rows}))
    history = load_price_history(path, timezone="Europe/Brussels")
    assert history.points == [
        PricePoint(utc("2025-10-25T23:00"), 0.1),
        PricePoint(utc("2025-10-26T00:00"), 0.2),
        PricePoint(utc("2025-10-26T02:00"), 0.4),
    ]
    assert history.step == HOUR
    # The second 02:00 (winter time) has no price: a gap, not the summer price again.
    assert history.gaps == [Gap(utc("2025-10-26T01:00"), utc("2025-10-26T02:00"), 1, 2)]
    assert history.skipped == ["row 3: no price (price_per_kwh or price_per_mwh)"]


def test_entsoe_xml_is_utc(tmp_path: Path) -> None:
    history = load_price_history(CASES / "a01_hourly_de_lu" / "document.xml")
    published = utc("2025-04-06T11:02:13")
    assert history.points == [
        PricePoint(utc("2025-04-06T22:00"), 0.08942, published),
        PricePoint(utc("2025-04-06T23:00"), -0.0051, published),
        PricePoint(utc("2025-04-07T00:00"), 0.0, published),
    ]
    assert_contiguous(history, HOUR)


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "prices.parquet"
    pl.DataFrame(
        {
            "time": [utc("2025-01-01T00:00"), utc("2025-01-01T00:15"), utc("2025-01-01T00:45")],
            "price_per_kwh": [0.1, None, 0.3],
        }
    ).write_parquet(path)
    history = load_price_history(path)
    assert history.points == [
        PricePoint(utc("2025-01-01T00:00"), 0.1),
        PricePoint(utc("2025-01-01T00:45"), 0.3),
    ]
    assert history.step == QUARTER
    assert history.gaps == [Gap(utc("2025-01-01T00:15"), utc("2025-01-01T00:45"), 2, 1)]


def test_several_markets_need_a_choice(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(
        "time,market,price_per_kwh\n"
        "2025-01-01T00:00Z,BE,0.1\n"
        "2025-01-01T00:00Z,NL,0.2\n"
        "2025-01-01T01:00Z,BE,0.3\n"
        "2025-01-01T01:00Z,NL,0.4\n"
    )
    assert error_of(path) == f"{path}: rows of several markets ['BE', 'NL']; choose one"
    history = load_price_history(path, market="NL")
    assert history.points == [
        PricePoint(utc("2025-01-01T00:00"), 0.2),
        PricePoint(utc("2025-01-01T01:00"), 0.4),
    ]
    assert re.search("no rows of market 'FR'", error_of(path, market="FR"))
