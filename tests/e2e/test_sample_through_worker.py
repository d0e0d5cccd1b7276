"""The bundled sample through a real `wattstream worker` process into a real InfluxDB.

The worker and the replay are the installed commands, run as subprocesses with
settings from the environment, as an operator would run them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from pipeline import codec, kafka, topics
from pipeline.app import agent_input_topics
from pipeline.local import EmbeddedBroker
from pipeline.schemas import DeadLetter
from pipeline.settings import Settings
from tests.conftest import SAMPLE_CONFIG, SettingsFactory
from tests.expectations import expected_decisions
from tests.servers import InfluxDB1
from tests.workers import until_done_or_dead

pytestmark = pytest.mark.e2e

SAMPLE = SAMPLE_CONFIG.parent
WATTSTREAM = [sys.executable, "-m", "pipeline.cli"]


def environment(settings: Settings, influxdb: InfluxDB1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    env.update(
        WATTSTREAM_CONFIG=str(SAMPLE_CONFIG),
        WATTSTREAM_BROKER=str(settings.broker),
        WATTSTREAM_APP_ID=settings.app_id,
        WATTSTREAM_TOPIC_PREFIX=settings.topic_prefix,
        WATTSTREAM_PARTITIONS=str(settings.partitions),
        WATTSTREAM_STORE="memory",
        WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH="true",
        WATTSTREAM_KAFKA_FETCH_MAX_WAIT_MS="10",
        WATTSTREAM_INFLUX_URL=influxdb.url,
        WATTSTREAM_INFLUX_DATABASE=settings.influx.database,
        WATTSTREAM_INFLUX_FLUSH_INTERVAL_S="0.5",
    )
    return env


@pytest.fixture
def settings(kafka_broker: EmbeddedBroker, make_settings: SettingsFactory) -> Settings:
    base = make_settings(SAMPLE_CONFIG, broker=kafka_broker.bootstrap)
    database = base.app_id.replace("-", "_")
    return make_settings(
        SAMPLE_CONFIG,
        broker=kafka_broker.bootstrap,
        app_id=base.app_id,
        partitions=base.partitions,
        kafka={"one_record_per_batch": True},
        influx={"database": database},
    )


@pytest.fixture
def worker(
    settings: Settings, influxdb: InfluxDB1, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        [*WATTSTREAM, "worker"],
        env=environment(settings, influxdb),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()
    log.close()


async def test_sample_replay_stores_exactly_the_rule_decisions_and_dead_letters_bad_input(
    settings: Settings,
    influxdb: InfluxDB1,
    worker: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    await kafka.wait_for_broker(settings)
    await kafka.ensure_topics(settings)

    # Bad input first: a record that is not JSON, and a batch with one bad reading among good ones.
    good = {"kind": "meter", "device": "meter-9", "ts": "2025-04-07T00:00:30Z", "power_kw": 1.25}
    bad = {"kind": "solar", "device": "pv-9", "ts": "2025-04-07T00:00:31Z", "power_kw": -3.0}
    partly_bad = orjson.dumps(
        {
            "schema_version": 1,
            "batch_id": "mixed",
            "site": "turin-home",
            "source": "test",
            "readings": [good, bad],
        }
    )
    producer = kafka.producer(settings)
    await producer.start()
    telemetry_topic = settings.topic(topics.TELEMETRY)
    await producer.send_and_wait(telemetry_topic, b"\x00not json at all", key=b"turin-home")
    await producer.send_and_wait(telemetry_topic, partly_bad, key=b"turin-home")
    await producer.stop()

    replay = await asyncio.create_subprocess_exec(
        *WATTSTREAM,
        "replay",
        str(SAMPLE / "telemetry.parquet"),
        "--prices",
        str(SAMPLE / "prices.csv"),
        "--json",
        env=environment(settings, influxdb),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(replay.communicate(), timeout=120)
    assert replay.returncode == 0
    sent = orjson.loads(stdout)
    assert sent["readings_sent"] == 90_720 and sent["prices_sent"] == 168

    drained = kafka.wait_until_drained(
        settings,
        {
            settings.app_id: agent_input_topics(settings),
            f"{settings.app_id}-sink-influx": [
                telemetry_topic,
                settings.topic(topics.PRICES),
                settings.topic(topics.DECISIONS),
            ],
        },
        timeout_s=180,
    )
    await until_done_or_dead(drained, worker, tmp_path / "worker.log")

    database = settings.influx.database
    stored = influxdb.rows(
        "SELECT action, power_kw, grid_energy_kwh, price_per_kwh, soc_pct, decision_id "
        "FROM decision GROUP BY site, device, strategy ORDER BY time",
        database,
    )
    expected = expected_decisions(settings, SAMPLE / "telemetry.parquet", SAMPLE / "prices.csv")
    assert len(expected) == 3 * 7 * 24

    def ms(value: datetime) -> int:
        return int(value.timestamp() * 1000)

    got = sorted(
        (r["site"], r["time"], r["action"], r["power_kw"], r["grid_energy_kwh"], r["decision_id"])
        for r in stored
    )
    want = sorted(
        (d.site, ms(d.valid_from), d.action.value, d.power_kw, d.grid_energy_kwh, d.decision_id)
        for d in expected
    )
    assert got == want
    assert {row[2] for row in got} == {"CHARGE", "DISCHARGE", "HOLD"}

    # Every reading is stored too, plus the good reading of the partly bad batch.
    counts = {
        kind: influxdb.rows(f"SELECT count(power_kw) FROM {kind}", database)[0]["count"]  # noqa: S608
        for kind in ("battery", "solar", "meter")
    }
    assert counts == {"battery": 30_240, "solar": 30_240, "meter": 30_240 + 1}

    letters = [
        codec.decode(DeadLetter, value)
        for _, value in await kafka.read_all(settings, topics.DEAD_LETTERS)
    ]
    by_type = sorted((letter.error_type, letter.source_topic) for letter in letters)
    assert by_type == [("JSONDecodeError", telemetry_topic), ("ValidationError", telemetry_topic)]
    rejected_reading = next(letter for letter in letters if letter.error_type == "ValidationError")
    assert "reading 1" in rejected_reading.reason and "power_kw" in rejected_reading.reason

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log, log[-3000:]
