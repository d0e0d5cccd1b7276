"""Recording files and the pure time shifting behind `replay --rebase-time --loop`."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from ingest.record import (
    Recorder,
    RecordError,
    flatten_telemetry,
    is_recording,
    read_recording,
    records_frame,
    resolve_topics,
    write_parquet,
)
from ingest.replay import (
    _recording_order,
    loop_period_ms,
    read_telemetry,
    rebase_shift_ms,
    record_event_times_ms,
    round_shift_ms,
    shift_batch,
    shift_price,
    shift_record_value,
    site_batches,
)
from pipeline import codec, topics
from pipeline.schemas import (
    BatteryReading,
    HomeReading,
    PriceTick,
    TelemetryBatch,
)
from pipeline.settings import ReplaySettings, Settings, load_settings

T0 = datetime(2025, 4, 7, tzinfo=UTC)
MINUTE_MS = 60_000


def batch(batch_id: str = "bat-1", minutes: tuple[int, ...] = (0, 1)) -> TelemetryBatch:
    return TelemetryBatch(
        batch_id=batch_id,
        site="s1",
        source="test",
        readings=[
            HomeReading(device="h1", ts=T0 + timedelta(minutes=m), power_kw=0.5 + m)
            for m in minutes
        ],
    )


def tick(hour: int = 0) -> PriceTick:
    start = T0 + timedelta(hours=hour)
    return PriceTick(
        market="IT-NORD",
        start=start,
        end=start + timedelta(hours=1),
        price_per_kwh=0.1,
        published_at=start - timedelta(hours=12),
    )


@pytest.fixture
def settings() -> Settings:
    return load_settings(None, topic_prefix="x.")


# --- rebase -------------------------------------------------------------------------------


def test_rebase_moves_the_first_event_to_now() -> None:
    now = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    shift_ms = rebase_shift_ms(int(T0.timestamp() * 1000), now)
    shifted = shift_batch(batch(), shift_ms)
    assert shifted.readings[0].ts == now
    # Every reading moves by the same delta: the spacing is kept.
    assert shifted.readings[1].ts - shifted.readings[0].ts == timedelta(minutes=1)


def test_rebase_shifts_a_price_interval_and_its_publication_together() -> None:
    shifted = shift_price(tick(), 3_600_000)
    original = tick()
    assert shifted.start == original.start + timedelta(hours=1)
    assert shifted.end == original.end + timedelta(hours=1)
    assert shifted.published_at == original.published_at + timedelta(hours=1)  # type: ignore[operator]


def test_a_price_without_publication_time_stays_without_one() -> None:
    plain = tick().model_copy(update={"published_at": None})
    assert shift_price(plain, 1000).published_at is None


def test_an_unshifted_first_round_keeps_the_batch_and_its_id() -> None:
    original = batch()
    assert shift_batch(original, 0, 0) is original
    value = codec.encode(original)
    assert shift_record_value(topics.TELEMETRY.name, value, 0, 0) is value


# --- loop ---------------------------------------------------------------------------------


def test_loop_period_is_the_span_plus_one_step() -> None:
    times = [0, MINUTE_MS, 2 * MINUTE_MS, 2 * MINUTE_MS]  # duplicates do not make a 0 step
    assert loop_period_ms(times) == 3 * MINUTE_MS


@pytest.mark.parametrize(("times", "period_ms"), [([], 1000), ([5], 1000)])
def test_loop_period_of_an_empty_or_single_instant_file(times: list[int], period_ms: int) -> None:
    assert loop_period_ms(times) == period_ms


def test_loop_rounds_keep_timestamps_increasing_with_distinct_ids() -> None:
    original = batch(minutes=(0, 1, 2))
    period_ms = loop_period_ms(int(r.ts.timestamp() * 1000) for r in original.readings)  # 3 minutes
    rounds = [shift_batch(original, round_shift_ms(n, 0, period_ms), n) for n in range(3)]
    times = [r.ts for b in rounds for r in b.readings]
    assert times == sorted(times) and len(set(times)) == 9
    assert times[3] - times[2] == timedelta(minutes=1)  # the rhythm continues across rounds
    assert len({b.batch_id for b in rounds}) == 3
    assert rounds[0].batch_id == original.batch_id
    # Deterministic: round 2 gets the same id on every run.
    again = shift_batch(original, round_shift_ms(2, 0, period_ms), 2)
    assert again.batch_id == rounds[2].batch_id


def test_loop_after_rebase_adds_the_periods_to_the_rebase() -> None:
    assert round_shift_ms(0, 500, 60_000) == 500
    assert round_shift_ms(3, 500, 60_000) == 180_500


def test_a_rebased_first_round_gets_a_new_id() -> None:
    # Same readings at other times must not be dropped as duplicates downstream.
    assert shift_batch(batch(), 1000, 0).batch_id != batch().batch_id


def test_shifted_file_batches_move_their_readings_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "time,site,device,kind,power_kw\n"
        "2025-04-07T00:00:00Z,s1,h1,home,1.0\n"
        "2025-04-07T00:01:00Z,s1,h1,home,2.0\n"
    )
    frame, _ = read_telemetry(path)
    ((plain, _),) = list(site_batches(frame, "replay:t.csv", ReplaySettings())[0])
    ((moved, _),) = list(
        site_batches(frame, "replay:t.csv", ReplaySettings(), round_=1, shift_ms=120_000)[0]
    )
    assert plain is not None and moved is not None
    assert moved.event_time_ms == plain.event_time_ms + 120_000
    a, b = codec.decode(TelemetryBatch, plain.value), codec.decode(TelemetryBatch, moved.value)
    assert [r.ts + timedelta(minutes=2) for r in a.readings] == [r.ts for r in b.readings]
    assert a.batch_id != b.batch_id


def test_recorded_values_shift_by_topic_and_others_pass_unchanged() -> None:
    price = codec.encode(tick())
    moved = codec.decode(PriceTick, shift_record_value(topics.PRICES.name, price, 1000, 1))
    assert moved.start == tick().start + timedelta(seconds=1)
    other = b'{"anything": 1}'
    assert shift_record_value(topics.DECISIONS.name, other, 1000, 1) is other
    garbage = b"not json"
    assert shift_record_value(topics.TELEMETRY.name, garbage, 1000, 1) is garbage


def test_event_times_of_recorded_values() -> None:
    t0_ms = int(T0.timestamp() * 1000)
    assert record_event_times_ms(topics.TELEMETRY.name, codec.encode(batch())) == [
        t0_ms,
        t0_ms + MINUTE_MS,
    ]
    assert record_event_times_ms(topics.PRICES.name, codec.encode(tick())) == [
        t0_ms - 12 * 3_600_000
    ]
    assert record_event_times_ms(topics.TELEMETRY.name, b"{") == []


# --- recording files ----------------------------------------------------------------------


def test_recording_order_keeps_each_partition_in_offset_order() -> None:
    rows = [
        {"topic": "t", "partition": 0, "offset": 1, "timestamp_ms": 5},
        {"topic": "t", "partition": 0, "offset": 0, "timestamp_ms": 9},  # clock went back
        {"topic": "t", "partition": 1, "offset": 0, "timestamp_ms": 7},
    ]
    order = [(r["partition"], r["offset"]) for r in _recording_order(rows)]
    assert [o for p, o in order if p == 0] == [0, 1]
    assert len(order) == 3


def test_a_raw_recording_round_trips_and_is_recognised(tmp_path: Path) -> None:
    out = tmp_path / "cap.parquet"
    rows = [
        {
            "topic": topics.TELEMETRY.name,
            "partition": 1,
            "offset": 7,
            "timestamp_ms": 1,
            "key": b"s1",
            "value": codec.encode(batch()),
        },
        {
            "topic": topics.PRICES.name,
            "partition": 0,
            "offset": 0,
            "timestamp_ms": 2,
            "key": None,
            "value": b"{}",
        },
    ]
    write_parquet(records_frame(rows), out)
    assert is_recording(out)
    assert read_recording(out).to_dicts() == rows
    assert not list(tmp_path.glob(".*partial"))


def test_a_long_format_file_is_not_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pl.DataFrame({"time": [T0], "site": ["s"], "device": ["d"], "kind": ["home"]}).write_parquet(
        path
    )
    assert not is_recording(path)
    assert not is_recording(tmp_path / "missing.parquet")


def test_flattened_telemetry_replays_as_a_long_format_file(tmp_path: Path) -> None:
    mixed = TelemetryBatch(
        batch_id="b",
        site="s1",
        source="test",
        readings=[
            HomeReading(device="h1", ts=T0, power_kw=0.5),
            BatteryReading(device="b1", ts=T0, power_kw=-1.0, soc_pct=50.0),
        ],
    )
    frame, bad = flatten_telemetry([codec.encode(mixed), b"garbage"])
    assert bad == 1
    assert frame.columns[:4] == ["time", "site", "device", "kind"]
    path = tmp_path / "flat.parquet"
    write_parquet(frame, path)
    good, bad_rows = read_telemetry(path)
    assert bad_rows == [] and good.height == 2
    assert good.filter(pl.col("kind") == "battery")["soc_pct"].to_list() == [50.0]


def test_flatten_of_nothing_is_an_empty_long_format_frame() -> None:
    frame, bad = flatten_telemetry([])
    assert (frame.height, bad) == (0, 0) and "time" in frame.columns


# --- recorder options (checked before any network work) -----------------------------------


def test_topics_resolve_by_short_registry_or_full_name(settings: Settings) -> None:
    specs = resolve_topics(settings, ["telemetry", "wattstream.prices", "x.wattstream.carbon"])
    assert specs == [topics.TELEMETRY, topics.PRICES, topics.CARBON]
    assert resolve_topics(settings, ["telemetry", "telemetry"]) == [topics.TELEMETRY]


@pytest.mark.parametrize(
    ("names", "kwargs", "message"),
    [
        (["nope"], {}, "unknown topic"),
        ([], {}, "at least one"),
        (["prices"], {"flatten": True}, "telemetry topic only"),
        (["telemetry"], {"max_records": 0}, "max_records"),
        (["telemetry"], {"duration_s": 0.0}, "duration_s"),
    ],
)
def test_bad_recorder_options_fail_at_construction(
    settings: Settings, tmp_path: Path, names: list[str], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(RecordError, match=message):
        Recorder(settings, names, tmp_path / "o.parquet", **kwargs)  # type: ignore[arg-type]


def test_the_output_must_be_parquet(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="parquet"):
        Recorder(settings, ["telemetry"], tmp_path / "o.csv")


def test_record_error_is_not_retriable() -> None:
    assert RecordError.retriable is False


# --- the commands: bad options fail before any network work -------------------------------


def wattstream(*args: str, broker: str = "127.0.0.1:1") -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**clean, "WATTSTREAM_BROKER": broker},  # port 1: nothing answers there
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--topic", "nope", "--out", "o.parquet"), "unknown topic"),
        (("--topic", "prices", "--out", "o.parquet", "--flatten"), "telemetry topic only"),
        (("--topic", "telemetry", "--out", "o.csv"), "parquet"),
        (("--topic", "telemetry", "--out", "o.parquet", "--max-records", "0"), "max-records"),
    ],
)
def test_record_rejects_bad_options_with_exit_2(args: tuple[str, ...], message: str) -> None:
    result = wattstream("record", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
