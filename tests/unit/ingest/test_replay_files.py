"""Replay input files: parsing, bad rows with row numbers, batching and event-time order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import polars as pl
import pytest

from ingest.replay import ReplayFileError, read_prices, read_telemetry, site_batches
from pipeline import codec
from pipeline.schemas import TelemetryBatch
from pipeline.settings import ReplaySettings

HEADER = "time,site,device,kind,power_kw,soc_pct,irradiance_w_m2\n"


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_rows_become_readings_of_their_kind(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER
        + "2025-04-07T00:01:00Z,s1,pv,solar,3.5,,800\n"
        + "2025-04-07T02:00:00+02:00,s1,bat,battery,-1.0,55.5,\n",
    )
    frame, bad = read_telemetry(path)
    assert bad == []
    ((batch, rejected),) = list(site_batches(frame, "replay:t.csv", ReplaySettings())[0])
    assert rejected == [] and batch is not None
    decoded = codec.decode(TelemetryBatch, batch.value)
    battery, solar = decoded.readings  # sorted by time: 00:00Z comes before 00:01Z
    assert battery.kind == "battery" and battery.soc_pct == 55.5
    assert battery.ts == datetime(2025, 4, 7, tzinfo=UTC)
    assert solar.kind == "solar" and solar.irradiance_w_m2 == 800.0
    # A column the kind does not have (soc_pct for solar) is not put on the reading.
    assert "soc_pct" not in orjson.loads(batch.value)["readings"][1]


def test_bad_rows_are_reported_with_row_numbers_and_the_rest_kept(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER
        + "2025-04-07T00:00:00Z,s1,bat,battery,1.0,50,\n"  # row 1: fine
        + "2025-04-07T00:01:00,s1,bat,battery,1.0,50,\n"  # row 2: naive time
        + "2025-04-07T00:02:00Z,s1,bat,toaster,1.0,50,\n"  # row 3: unknown kind
        + "2025-04-07T00:03:00Z,s1,bat,battery,1.0,150,\n"  # row 4: soc out of range
        + "2025-04-07T00:04:00Z,,bat,battery,1.0,50,\n"  # row 5: no site
        + "2025-04-07T00:05:00Z,s1,bat,battery,2.0,51,\n",  # row 6: fine
    )
    frame, bad = read_telemetry(path)
    assert [(b.row, "UTC offset" in b.reason) for b in bad][:1] == [(2, True)]
    assert [b.row for b in bad] == [2, 3, 5]
    ((batch, rejected),) = list(site_batches(frame, "src", ReplaySettings())[0])
    assert [r.row for r in rejected] == [4]
    assert "soc_pct" in rejected[0].reason
    assert batch is not None and batch.readings == 2


def test_a_number_column_with_text_in_it_keeps_its_numbers(tmp_path: Path) -> None:
    # One cell that is not a number makes polars read the column as text: the other
    # cells are still the numbers they say (a CSV has no types), that row is bad.
    path = write(
        tmp_path,
        HEADER
        + "2025-04-07T00:00:00Z,s1,bat,battery, 1.5 ,50,\n"
        + "2025-04-07T00:01:00Z,s1,bat,battery,fast,50,\n"
        + "2025-04-07T00:02:00Z,s1,bat,battery,-2e1,50,\n",
    )
    frame, bad = read_telemetry(path)
    assert [(b.row, b.reason) for b in bad] == [(2, "row 2: power_kw is not a number (got fast)")]
    assert orjson.loads(bad[0].raw)["power_kw"] == "fast"  # the dead letter shows the cell
    ((batch, rejected),) = list(site_batches(frame, "src", ReplaySettings())[0])
    assert rejected == [] and batch is not None
    decoded = codec.decode(TelemetryBatch, batch.value)
    assert [r.power_kw for r in decoded.readings] == [1.5, -20.0]  # type: ignore[union-attr]


def test_missing_required_column_fails_with_its_name(tmp_path: Path) -> None:
    path = write(tmp_path, "time,site,kind,power_kw\n2025-04-07T00:00:00Z,s1,meter,1\n")
    with pytest.raises(ReplayFileError, match="device"):
        read_telemetry(path)


def test_unsupported_file_type(tmp_path: Path) -> None:
    with pytest.raises(ReplayFileError, match="unsupported"):
        read_telemetry(write(tmp_path, "{}", name="t.json"))


def test_parquet_with_naive_timestamps_is_rejected_row_by_row(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pl.DataFrame(
        {
            "time": [datetime(2025, 4, 7)],  # noqa: DTZ001 - the point of the test
            "site": ["s1"],
            "device": ["m"],
            "kind": ["meter"],
            "power_kw": [1.0],
        }
    ).write_parquet(path)
    frame, bad = read_telemetry(path)
    assert frame.height == 0 and [b.row for b in bad] == [1]


def test_batches_respect_size_and_event_time_window(tmp_path: Path) -> None:
    start = datetime(2025, 4, 7, tzinfo=UTC)
    lines = [f"{(start + timedelta(minutes=m)).isoformat()},s1,m,meter,1.0,,\n" for m in range(100)]
    frame, _ = read_telemetry(write(tmp_path, HEADER + "".join(lines)))
    by_size = [b for b, _ in site_batches(frame, "src", ReplaySettings(batch_max_readings=30))[0]]
    assert [b.readings for b in by_size if b] == [30, 30, 30, 10]
    by_window = [b for b, _ in site_batches(frame, "src", ReplaySettings(batch_window_s=600))[0]]
    assert [b.readings for b in by_window if b] == [10] * 10


def test_prices_infer_interval_ends_and_default_publication(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "time,price_per_kwh\n2025-04-07T00:00:00Z,0.10\n2025-04-07T01:00:00Z,-0.02\n",
    )
    (first, second), bad = read_prices(path, market="IT-NORD")
    assert bad == []
    assert first.end == second.start
    assert second.end - second.start == timedelta(hours=1)
    assert second.price_per_kwh == -0.02
    assert first.published_at == first.start  # no column: known when delivery starts


def test_prices_without_market_need_one(tmp_path: Path) -> None:
    with pytest.raises(ReplayFileError, match="--market"):
        read_prices(write(tmp_path, "time,price_per_kwh\n2025-04-07T00:00:00Z,0.1\n"))


def test_bad_price_rows_are_reported_with_row_numbers_and_the_rest_kept(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "time,market,price_per_kwh\n"
        "2025-04-07T00:00:00Z,M,0.1\n"
        "2025-04-07T01:00:00,M,0.1\n"  # row 2: naive time
        "2025-04-07T02:00:00Z,M,cheap\n"  # row 3: not a number
        "2025-04-07T03:00:00Z,M,0.3\n",
    )
    ticks, bad = read_prices(path)
    assert [t.price_per_kwh for t in ticks] == [0.1, 0.3]
    assert [b.row for b in bad] == [2, 3]
    assert "UTC offset" in bad[0].reason and "not a number" in bad[1].reason


def test_a_price_file_with_no_usable_row_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReplayFileError, match="no usable price rows"):
        read_prices(write(tmp_path, "time,market,price_per_kwh\n2025-04-07T00:00:00,M,0.1\n"))
