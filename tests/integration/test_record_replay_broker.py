"""Record topics from the embedded broker and replay them into another deployment:
the same keys and values in the same order, then in shifted rounds with --loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.record import Recorder, RecordError, read_recording
from ingest.replay import Replay
from pipeline import codec, kafka, topics
from pipeline.local import EmbeddedBroker
from pipeline.schemas import HomeReading, PriceTick, TelemetryBatch
from pipeline.settings import Settings
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration

T0 = datetime(2025, 4, 7, tzinfo=UTC)


async def deployment(kafka_broker: EmbeddedBroker, make_settings: SettingsFactory) -> Settings:
    """Settings with a prefix of their own: a second deployment on the same broker."""
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        kafka={"one_record_per_batch": True},
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
    )
    await kafka.ensure_topics(settings)
    return settings


def by_key(records: list[tuple[bytes | None, bytes]]) -> dict[bytes | None, list[bytes]]:
    """Values per key in topic order: a key's partition order is its order."""
    out: dict[bytes | None, list[bytes]] = defaultdict(list)
    for key, value in records:
        out[key].append(value)
    return dict(out)


async def produce_sample(settings: Settings) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for minute in range(6):
            for site in ("turin", "milan", "rome"):
                batch = TelemetryBatch(
                    batch_id=f"bat-{site}-{minute}",
                    site=site,
                    source="test",
                    readings=[
                        HomeReading(
                            device="h1", ts=T0 + timedelta(minutes=minute), power_kw=minute / 10
                        )
                    ],
                )
                await producer.send_and_wait(
                    settings.topic(topics.TELEMETRY), codec.encode(batch), key=site.encode()
                )
        tick = PriceTick(
            market="IT-NORD", start=T0, end=T0 + timedelta(hours=1), price_per_kwh=0.12
        )
        await producer.send_and_wait(
            settings.topic(topics.PRICES), codec.encode(tick), key=b"IT-NORD"
        )
    finally:
        await producer.stop()


async def test_a_recording_replays_the_same_keys_and_values_in_order(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    source = await deployment(kafka_broker, make_settings)
    await produce_sample(source)
    out = tmp_path / "capture.parquet"
    stats = await Recorder(
        source, ["telemetry", "prices"], out, from_beginning=True, to_end=True
    ).run()
    assert stats.records == 19 and stats.stopped_by == "end"
    assert stats.per_topic == {topics.TELEMETRY.name: 18, topics.PRICES.name: 1}
    assert read_recording(out).height == 19

    target = await deployment(kafka_broker, make_settings)
    replayed = await Replay(target, out).run()
    assert replayed.records_sent == 19 and replayed.batches_sent == 18
    for spec in (topics.TELEMETRY, topics.PRICES):
        original = await kafka.read_all(source, spec)
        again = await kafka.read_all(target, spec)
        assert by_key(again) == by_key(original)

    # --loop: round 1 follows round 0, shifted by the span plus a step, with new ids.
    looped = await deployment(kafka_broker, make_settings)
    stats2 = await Replay(looped, out, loop=True, max_rounds=2).run()
    assert stats2.rounds == 2 and stats2.records_sent == 38
    turin = [
        codec.decode(TelemetryBatch, value)
        for key, value in await kafka.read_all(looped, topics.TELEMETRY)
        if key == b"turin"
    ]
    times = [b.readings[0].ts for b in turin]
    assert times == [T0 + timedelta(minutes=m) for m in range(12)]
    assert len({b.batch_id for b in turin}) == 12


async def test_a_capture_stops_at_max_records_and_writes_what_it_read(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    source = await deployment(kafka_broker, make_settings)
    await produce_sample(source)
    out = tmp_path / "flat.parquet"
    stats = await Recorder(
        source, ["telemetry"], out, from_beginning=True, max_records=5, flatten=True
    ).run()
    assert stats.stopped_by == "max_records" and stats.records == 5 and stats.rows_written == 5


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    env = {
        **clean,
        "WATTSTREAM_BROKER": str(settings.broker),
        "WATTSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "WATTSTREAM_PARTITIONS": str(settings.partitions),
        "WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH": "true",
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_record_and_replay_commands(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    source = await deployment(kafka_broker, make_settings)
    await produce_sample(source)
    out = tmp_path / "cli.parquet"
    recorded = cli(
        source, "record", "--topic", "telemetry", "--out", str(out), "--from-beginning",
        "--to-end", "--json",
    )  # fmt: skip
    assert recorded.returncode == 0, recorded.stderr
    assert json.loads(recorded.stdout)["records"] == 18

    target = await deployment(kafka_broker, make_settings)
    replayed = cli(target, "replay", str(out), "--rebase-time", "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["records_sent"] == 18
    batches = [
        codec.decode(TelemetryBatch, value)
        for _, value in await kafka.read_all(target, topics.TELEMETRY)
    ]
    first = min(r.ts for b in batches for r in b.readings)
    # Rebased: the first reading is "now" (the replay ran moments ago).
    assert abs((datetime.now(UTC) - first).total_seconds()) < 120


async def test_a_live_capture_records_new_records_until_stopped(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    source = await deployment(kafka_broker, make_settings)
    out = tmp_path / "live.parquet"
    recorder = Recorder(source, ["telemetry"], out, progress_interval_s=0.1)
    task = asyncio.create_task(recorder.run())
    await asyncio.sleep(2.0)  # positioned at the end before anything is produced
    await produce_sample(source)
    deadline = asyncio.get_running_loop().time() + 30
    while recorder.stats.records < 18:
        assert asyncio.get_running_loop().time() < deadline, recorder.stats
        await asyncio.sleep(0.1)
    recorder.stop()
    stats = await task
    assert stats.stopped_by == "stop" and read_recording(out).height == 18


def test_ctrl_c_ends_a_capture_and_writes_the_file(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap)
    out = tmp_path / "interrupted.parquet"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "record", "--topic", "telemetry", "--out", str(out),
         "--json"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")},
            "WATTSTREAM_BROKER": str(settings.broker),
            "WATTSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        },
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(4.0)  # past start-up: imports, broker check, consumer assignment
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert json.loads(stdout)["stopped_by"] == "stop"
    assert read_recording(out).height == 0


async def test_recording_a_topic_that_does_not_exist_says_so(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:12]}."
    )
    with pytest.raises(RecordError, match="not on the broker"):
        await Recorder(settings, ["telemetry"], tmp_path / "none.parquet").run()
    assert not (tmp_path / "none.parquet").exists()


async def test_ctrl_c_ends_a_replay_loop_cleanly(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    source = await deployment(kafka_broker, make_settings)
    await produce_sample(source)
    out = tmp_path / "loop.parquet"
    await Recorder(source, ["telemetry"], out, from_beginning=True, to_end=True).run()
    target = await deployment(kafka_broker, make_settings)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.cli", "replay", str(out), "--loop", "--speed", "600",
        "--json",
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")},
            "WATTSTREAM_BROKER": str(target.broker),
            "WATTSTREAM_TOPIC_PREFIX": target.topic_prefix,
            "WATTSTREAM_PARTITIONS": str(target.partitions),
            "WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH": "true",
        },
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        # At 600x a 5-minute file takes 0.5 s a round: several rounds in 5 s.
        await asyncio.sleep(5.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode == 0, stderr.decode()
    summary = json.loads(stdout)
    assert summary["rounds"] >= 2
    batches = [
        codec.decode(TelemetryBatch, value)
        for _, value in await kafka.read_all(target, topics.TELEMETRY)
    ]
    assert len({b.batch_id for b in batches}) == len(batches) == summary["records_sent"]
