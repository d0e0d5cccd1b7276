"""A worker killed with SIGKILL in the middle of a replay, then started again, stores
exactly what an uninterrupted worker stores from the same input.

Two runs of the bundled sample (two rounds of its telemetry, prices and intensities,
every agent the sample configures), each on
topics and an app of its own, into one real InfluxDB (a database each):

* the reference: one ``wattstream worker`` from start to end;
* the crash: a worker killed (``kill -9``: no shutdown, no last commit) once its group
  has committed part of the telemetry, then a new worker process of the same app.

Afterwards every output topic holds the same set of messages (at least once: a message
may be on its topic twice after the crash, but never with other content, since ids and
timestamps come from the data), and InfluxDB holds the same points. The tables are kept
in memory (``store = "memory"``), so the second worker can only have its state from the
tables' changelogs: that is what recovers it. This test found the faults of Faust that
pipeline/commits.py works around (messages dropped by its recovery, commits over a
missing message, commits before the state they cover was written); when the runs differ
it keeps both runs' topics under its tmp_path ("evidence").

The sample's settings wait for a missing carbon intensity 30 days instead of one. A
worker catching up on a backlog reads a site's readings far ahead of the intensities
its own fan-out re-keys for the site (README, "Reliability"); an hour whose intensity
has not come is filled with the last one after that wait of the site's event time, so
over a two-week backlog the default day would make the output depend on which topic
the worker read first, crash or no crash.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from benchmarks.e2e import _load as load_sample
from benchmarks.e2e import worker_environment
from pipeline import kafka, topics
from pipeline.app import agent_input_topics
from pipeline.local import EmbeddedBroker, stop_process
from pipeline.settings import Settings
from tests.conftest import SAMPLE_CONFIG, SettingsFactory
from tests.servers import InfluxDB1
from tests.workers import start_wattstream, until_done_or_dead

pytestmark = pytest.mark.reliability

SAMPLE = SAMPLE_CONFIG.parent
REPO = SAMPLE_CONFIG.parents[2]
ROUNDS = 2
OUTPUTS = (
    topics.DECISIONS,
    topics.ALERTS,
    topics.COMMANDS,
    topics.ALLOCATIONS,
    topics.EMISSIONS,
    topics.CERTIFICATES,
)


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "wattstream.toml"
    sample = SAMPLE_CONFIG.read_text()
    assert sample.count("[sites.carbon]\n") == 3
    config.write_text(
        sample.replace("[sites.carbon]\n", "[sites.carbon]\n  intensity_wait_s = 2_592_000.0\n")
    )
    return config


def _settings(
    make_settings: SettingsFactory, broker: EmbeddedBroker, config: Path, name: str
) -> Settings:
    base = make_settings(config, broker=broker.bootstrap)
    return make_settings(
        config,
        broker=broker.bootstrap,
        app_id=f"{base.app_id}-{name}",
        topic_prefix=f"{base.topic_prefix}{name}.",
        kafka={"one_record_per_batch": True},
        influx={"database": f"{base.app_id}_{name}".replace("-", "_")},
    )


def _start_worker(
    settings: Settings, config: Path, influxdb: InfluxDB1, log: Path
) -> subprocess.Popen[bytes]:
    env = worker_environment(settings, config, log_level="INFO")
    env.pop("WATTSTREAM_INFLUX_FILE")
    env.update(
        WATTSTREAM_INFLUX_URL=influxdb.url,
        WATTSTREAM_INFLUX_DATABASE=settings.influx.database,
        WATTSTREAM_INFLUX_FLUSH_INTERVAL_S="0.5",
    )
    return start_wattstream(env, log, "worker")


def _groups(settings: Settings) -> dict[str, list[str]]:
    return {
        settings.app_id: agent_input_topics(settings),
        f"{settings.app_id}-sink-influx": [
            settings.topic(spec) for spec in (topics.TELEMETRY, topics.PRICES, *OUTPUTS)
        ],
    }


async def _drain(settings: Settings, worker: subprocess.Popen[bytes], log: Path) -> None:
    drained = kafka.wait_until_drained(settings, _groups(settings), timeout_s=150)
    try:
        await until_done_or_dead(drained, worker, log)
    except TimeoutError:
        behind = {}
        for group, names in _groups(settings).items():
            lag = await kafka.group_lag(settings, group, names)
            behind[group] = {
                f"{tp.topic}[{tp.partition}]": (lag.committed.get(tp), end)
                for tp, end in lag.end.items()
                if end > lag.committed.get(tp, 0)
            }
        output = log.read_text()[-3000:]  # noqa: ASYNC240 - test failure path only
        pytest.fail(f"not drained, (committed, end) by group: {behind}\n{output}")


async def _run_until_drained(
    settings: Settings, config: Path, influxdb: InfluxDB1, log: Path
) -> None:
    worker = _start_worker(settings, config, influxdb, log)
    try:
        await _drain(settings, worker, log)
    finally:
        stop_process(worker, timeout_s=60)


async def _committed_fraction(settings: Settings) -> float:
    telemetry = settings.topic(topics.TELEMETRY)
    lag = await kafka.group_lag(settings, settings.app_id, [telemetry])
    total = sum(lag.end.values())
    return sum(lag.committed.values()) / total if total else 0.0


async def _outputs(settings: Settings) -> dict[str, Counter[bytes]]:
    """Each output topic's messages, canonical JSON, with how often each is there."""
    out = {}
    for spec in OUTPUTS:
        values = [value for _, value in await kafka.read_all(settings, spec)]
        out[spec.name] = Counter(
            orjson.dumps(orjson.loads(v), option=orjson.OPT_SORT_KEYS) for v in values
        )
    return out


async def _keep_evidence(tmp_path: Path, *runs: Settings) -> None:
    """Both runs' topics and table changelogs, to tmp_path/evidence: what a failed
    comparison needs (a changelog shows which state the restarted worker came back
    with, and where it lost or gained something)."""
    evidence = tmp_path / "evidence"
    evidence.mkdir(exist_ok=True)
    for settings in runs:
        run = settings.app_id.rsplit("-", 1)[-1]
        for spec in (*OUTPUTS, topics.SITE_CARBON, topics.SITE_PRICES, topics.CARBON):
            records = await kafka.read_all(settings, spec)
            lines = [
                orjson.dumps({"key": (k or b"").decode(), "value": orjson.loads(v)})
                for k, v in records
            ]
            (evidence / f"{run}.{spec.name}.jsonl").write_bytes(b"\n".join(lines))
        async with kafka.running(kafka.consumer(settings, group_id=None)) as probe:
            names = await probe.topics()
        for name in sorted(n for n in names if n.startswith(settings.app_id)):
            records = await kafka.read_topic(settings, name)
            lines = [
                orjson.dumps({"key": (k or b"").decode(), "value": (v or b"").decode()})
                for k, v in records
            ]
            (evidence / f"{run}.{name.replace(settings.app_id + '-', '')}.jsonl").write_bytes(
                b"\n".join(lines)
            )


def _points(influxdb: InfluxDB1, database: str) -> dict[str, list[tuple[tuple[str, str], ...]]]:
    # The sink's own counters (wattstream_sink: records read, overflow) are about the run,
    # not the data: a restarted sink reads some records twice.
    measurements = [
        row["name"]
        for row in influxdb.rows("SHOW MEASUREMENTS", database)
        if "name" in row and row["name"] != "wattstream_sink"
    ]
    points = {}
    for name in measurements:
        rows = influxdb.rows(f'SELECT * FROM "{name}" GROUP BY *', database)  # noqa: S608
        points[name] = sorted(tuple(sorted((k, repr(v)) for k, v in r.items())) for r in rows)
    return points


async def test_kill_9_mid_replay_then_restart_stores_what_an_uninterrupted_run_stores(
    kafka_broker: EmbeddedBroker,
    make_settings: SettingsFactory,
    influxdb: InfluxDB1,
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    reference = _settings(make_settings, kafka_broker, config, "reference")
    crashed = _settings(make_settings, kafka_broker, config, "crashed")
    # The sample's intensities and ROUNDS replays of its telemetry and prices, as the
    # end-to-end benchmark loads them.
    readings = await load_sample(reference, rounds=ROUNDS)
    assert readings == await load_sample(crashed, rounds=ROUNDS) == ROUNDS * 90_720

    await _run_until_drained(reference, config, influxdb, tmp_path / "reference.log")

    log = tmp_path / "crashed.log"
    worker = _start_worker(crashed, config, influxdb, log)
    try:
        deadline = time.monotonic() + 180
        fraction = 0.0
        while fraction < 0.2:
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker committed no telemetry in time"
            await asyncio.sleep(0.1)
            fraction = await _committed_fraction(crashed)
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop_process(worker, timeout_s=10)
    assert 0.2 <= fraction < 1.0, f"killed at {fraction:.0%} of the telemetry committed"
    killed_at = fraction

    log = tmp_path / "restarted.log"
    await _run_until_drained(crashed, config, influxdb, log)
    restarted_log = log.read_text()
    # The memory store starts empty: the state came back from the changelogs.
    assert "detection-state" in restarted_log and "Recovery" in restarted_log, restarted_log[-3000:]

    want, got = await _outputs(reference), await _outputs(crashed)
    # Duplicates are allowed (at least once): the evidence, tens of MB, only for a real
    # difference.
    if any(set(want[name]) != set(got[name]) for name in want):
        await _keep_evidence(tmp_path, reference, crashed)
    made = {name: len(messages) for name, messages in want.items()}
    assert all(made.values()), f"the reference run made none of some outputs: {made}"
    for name in want:
        extra, missing = set(got[name]) - set(want[name]), set(want[name]) - set(got[name])
        assert not extra and not missing, (
            f"{name} after the crash at {killed_at:.0%}: {len(extra)} extra, "
            f"{len(missing)} missing; extra: {sorted(extra)[:5]}; missing: {sorted(missing)[:5]}"
        )
    assert _points(influxdb, crashed.influx.database) == _points(
        influxdb, reference.influx.database
    )
