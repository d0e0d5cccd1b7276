"""End-to-end throughput of one worker, against the floors measured in the same run.

Set-up, all on this machine: the embedded broker (tansu); the bundled sample replayed
``ROUNDS`` times (each round a week later, so state moves on) with its prices and the
zone's generation mix, all on Kafka before anything is timed; then:

* ``raw_consume_msgs_per_s``: a bare aiokafka consumer (no group) reading the telemetry
  topic from the beginning to its end: what Python can read from this broker at all;
* ``e2e_readings_per_s``: ``wattstream worker`` in its own process, on the sample's
  settings (every agent the sample configures, and the InfluxDB sink to a line-protocol
  file), from its first commit to both its agents' and its sink's groups having read
  everything (the agents' every input: prices, intensities and the worker's own
  fan-outs too). The readings before the first commit are left out, so the consumer
  group's join (seconds on this broker) is not counted as processing time;
* ``e2e_agents_only_readings_per_s``: the same with ``wattstream worker --no-sinks``
  (the agents without the InfluxDB sink), on a fresh copy of the load;
* ``e2e_tail_after_telemetry_s``: how long, after all the telemetry was read, the
  agents still worked on prices and intensities (and the readings that waited for them);
* ``faust_per_event_msgs_per_s``: a Faust agent that iterates one event at a time over
  messages of one reading each (what a design without batches gets), on the same broker;
* ``e2e_worker_rss_mb``: the worker's peak resident memory in that run (the sample's few
  devices; ``worker_rss_mb``, for 100,000 devices, is :mod:`benchmarks.memory`'s).

Run: ``python -m benchmarks e2e``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import polars as pl

from ingest.carbon import CarbonFeed, CarbonFeedConfig, parse_carbon
from ingest.replay import Replay, loop_period_ms, read_prices, read_telemetry, shift_carbon
from pipeline import codec, kafka, topics
from pipeline.app import agent_input_topics
from pipeline.local import EmbeddedBroker, die_with_parent, stop_process
from pipeline.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
ROUNDS = 3
PARTITIONS = 8
NAIVE_MESSAGES = 20_000
SCALE_OUT_COPIES = 3


def _overrides(broker: EmbeddedBroker, data_dir: Path) -> dict[str, Any]:
    return {
        "app_id": f"bench-e2e-{uuid.uuid4().hex[:8]}",
        "broker": broker.bootstrap,
        "topic_prefix": f"bench-{uuid.uuid4().hex[:8]}.",
        "partitions": PARTITIONS,
        "store": "memory",
        "data_dir": str(data_dir / "state"),
        "influx": {"file": str(data_dir / "influx.lp")},
        "kafka": {"one_record_per_batch": True, "fetch_max_wait_ms": 10},
    }


def sample_period_ms() -> int:
    """How far the replay shifts each round of the sample (its prices' and readings' span)."""
    ticks, _ = read_prices(SAMPLE / "prices.csv")
    frame, _ = read_telemetry(SAMPLE / "telemetry.parquet")
    return loop_period_ms(
        [int((t.published_at or t.start).timestamp() * 1000) for t in ticks]
        + frame["_ts"].dt.epoch("ms").unique().to_list()
    )


def worker_environment(
    settings: Settings, config: Path = SAMPLE / "wattstream.toml", log_level: str = "WARNING"
) -> dict[str, str]:
    """The environment of a ``wattstream worker`` process on ``config`` with ``settings``'
    deployment (broker, topics, store, data and line-protocol paths): none of the
    caller's own ``WATTSTREAM_*`` variables, and the embedded broker's Kafka settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    env.update(
        WATTSTREAM_CONFIG=str(config),
        WATTSTREAM_APP_ID=settings.app_id,
        WATTSTREAM_BROKER=kafka.bootstrap_servers(settings),
        WATTSTREAM_TOPIC_PREFIX=settings.topic_prefix,
        WATTSTREAM_PARTITIONS=str(settings.partitions),
        WATTSTREAM_STORE=settings.store,
        WATTSTREAM_DATA_DIR=str(settings.data_dir),
        WATTSTREAM_INFLUX_FILE=str(settings.influx.file),
        WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH="true",
        WATTSTREAM_KAFKA_FETCH_MAX_WAIT_MS="10",
        WATTSTREAM_LOG_LEVEL=log_level,
    )
    return env


async def _load(
    settings: Settings, telemetry: Path = SAMPLE / "telemetry.parquet", rounds: int = ROUNDS
) -> int:
    """Everything on Kafka before timing: intensities, then ``rounds`` replays of the sample."""
    await kafka.ensure_topics(settings)
    async with CarbonFeed(settings, CarbonFeedConfig(source=str(SAMPLE / "carbon.csv"))) as feed:
        await feed.poll_once()
    # The later rounds' intensities, shifted like the replay shifts its rounds.
    intensities = parse_carbon((SAMPLE / "carbon.csv").read_bytes()).messages
    period_ms = sample_period_ms()
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for round_ in range(1, rounds):
            for intensity in intensities:
                shifted = shift_carbon(intensity, round_ * period_ms)
                await producer.send(
                    settings.topic(topics.CARBON), codec.encode(shifted), key=shifted.zone.encode()
                )
        await producer.flush()
    finally:
        await producer.stop()
    replay = Replay(
        settings,
        telemetry,
        SAMPLE / "prices.csv",
        loop=True,
        max_rounds=rounds,
    )
    stats = await replay.run()
    return stats.readings_sent


async def _raw_consume(settings: Settings) -> tuple[float, int]:
    """(messages per second, messages) of a bare consumer reading the telemetry topic."""
    name = settings.topic(topics.TELEMETRY)
    ends = await kafka.end_offsets(settings, [name])
    total = sum(ends.values())
    reader = kafka.consumer(settings, group_id=None)
    await reader.start()
    try:
        reader.assign(list(ends))
        await reader.seek_to_beginning(*ends)
        remaining = {tp for tp, end in ends.items() if end > 0}
        started = time.perf_counter()
        count = 0
        while remaining:
            batches = await reader.getmany(*remaining, timeout_ms=1000, max_records=10_000)
            for tp, messages in batches.items():
                count += len(messages)
                if messages and messages[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
        elapsed = time.perf_counter() - started
    finally:
        await reader.stop()
    assert count == total, (count, total)
    return total / elapsed, total


class Drained(NamedTuple):
    first_s: float
    """When the agents' group first committed telemetry (perf_counter)."""
    telemetry_s: float
    """When it had committed all the telemetry."""
    done_s: float
    """When every group watched had committed everything on its topics."""
    consumed_at_first: float
    """The fraction of the telemetry already consumed at ``first_s``."""

    def readings_per_s(self, readings: int) -> float:
        """The rate of the readings consumed after the first commit (the group's join,
        seconds on this broker, is not processing time)."""
        return readings * (1 - self.consumed_at_first) / (self.done_s - self.first_s)


def worker_groups(settings: Settings, with_sink: bool = True) -> dict[str, list[str]]:
    """A worker's consumer groups and what they read: the agents' every input (the prices
    and intensities, and the fan-outs' ``site-prices`` and ``site-carbon`` that the worker
    writes itself), and the sink's telemetry (``with_sink``)."""
    groups = {settings.app_id: agent_input_topics(settings)}
    if with_sink:
        groups[f"{settings.app_id}-sink-influx"] = [settings.topic(topics.TELEMETRY)]
    return groups


async def watch_drained(
    settings: Settings,
    processes: list[subprocess.Popen[bytes]],
    timeout_s: float,
    groups: dict[str, list[str]],
) -> Drained:
    """Follow the consumer groups until each has committed everything on its topics.

    Until then decisions and points are still being made. The first group's progress on
    the telemetry times the run (its first commit, all its telemetry read).
    """
    telemetry = settings.topic(topics.TELEMETRY)
    deadline = time.monotonic() + timeout_s
    first: tuple[float, float] | None = None
    telemetry_s: float | None = None
    while True:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("the telemetry was not drained in time")
        now = time.perf_counter()
        lags = [await kafka.group_lag(settings, g, names) for g, names in groups.items()]
        ends = {tp: end for tp, end in lags[0].end.items() if tp.topic == telemetry}
        total = sum(ends.values())
        consumed = sum(min(lags[0].committed.get(tp, 0), end) for tp, end in ends.items())
        if first is None and consumed > 0:
            first = (now, consumed / total)
        if telemetry_s is None and consumed == total:
            telemetry_s = now
        if first is not None and telemetry_s is not None and all(lag.total == 0 for lag in lags):
            return Drained(first[0], telemetry_s, now, first[1])
        await asyncio.sleep(0.2)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _e2e(
    settings: Settings,
    readings: int,
    workers: int = 1,
    config: Path = SAMPLE / "wattstream.toml",
    sinks: bool = True,
) -> dict[str, float]:
    """Run ``workers`` workers of one app (one consumer group) until they have read it all
    (``sinks``: each also runs the InfluxDB sink, as ``wattstream worker`` does)."""
    work_dir = settings.data_dir.parent
    processes: list[subprocess.Popen[bytes]] = []
    logs = [work_dir / f"worker-{n}.log" for n in range(workers)]
    try:
        for n, log in enumerate(logs):
            env = worker_environment(settings, config)
            # Each worker its own line-protocol file (their sinks share one consumer group).
            env["WATTSTREAM_INFLUX_FILE"] = f"{settings.influx.file}.{n}"
            env["WATTSTREAM_DATA_DIR"] = f"{settings.data_dir}-{n}"
            # The worker's log goes to a file: a pipe nobody reads blocks it once full.
            with log.open("wb") as log_file:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "pipeline.cli", "worker"]
                        + ([] if sinks else ["--no-sinks"]),
                        env=env,
                        cwd=work_dir,
                        stdout=subprocess.DEVNULL,
                        stderr=log_file,
                        preexec_fn=die_with_parent,
                    )
                )
        drained = asyncio.run(
            watch_drained(settings, processes, 900, worker_groups(settings, with_sink=sinks))
        )
        rss_mb = max(_peak_rss_mb(worker.pid) for worker in processes)
    finally:
        for worker in processes:
            stop_process(worker, timeout_s=60)
    for worker, log in zip(processes, logs, strict=True):
        if worker.returncode not in (0, -15):
            raise RuntimeError(f"worker failed: {log.read_text(errors='replace')[-2000:]}")
    return {
        "e2e_readings_per_s": drained.readings_per_s(readings),
        "worker_rss_mb": rss_mb,
        "tail_s": drained.done_s - drained.telemetry_s,
    }


async def _faust_per_event(settings: Settings) -> float:
    """Messages per second of a Faust agent iterating single-reading messages one by one."""
    import faust

    from pipeline.app import faust_config, use_fetch_wait

    name = f"{settings.topic_prefix}naive-per-reading"
    producer = kafka.producer(settings)
    await producer.start()
    try:
        t0 = datetime(2025, 4, 7, tzinfo=UTC)
        pending = []
        for n in range(NAIVE_MESSAGES):
            reading = {
                "kind": "meter",
                "device": f"m{n % 100}",
                "ts": (t0 + timedelta(seconds=n)).isoformat(),
                "power_kw": 1.0,
            }
            value = orjson.dumps({"site": f"s{n % 50}", "reading": reading})
            pending.append(await producer.send(name, value, key=f"s{n % 50}".encode()))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()

    app = faust.App(f"{settings.app_id}-naive", **faust_config(settings))
    use_fetch_wait(app, settings)
    source = app.topic(name, value_serializer="raw", partitions=PARTITIONS)
    done = asyncio.Event()
    seen = 0
    started = 0.0

    @app.agent(source)
    async def per_event(stream: Any) -> None:
        nonlocal seen, started
        async for value in stream:
            if seen == 0:
                started = time.perf_counter()
            orjson.loads(value)
            seen += 1
            if seen == NAIVE_MESSAGES:
                done.set()

    await app.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed = time.perf_counter() - started
    finally:
        await app.stop()
    return (NAIVE_MESSAGES - 1) / elapsed


def bench_e2e() -> dict[str, float]:
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        overrides = _overrides(broker, Path(tmp))
        settings = load_settings(**overrides)
        readings = asyncio.run(_load(settings))
        raw_msgs_per_s, messages = asyncio.run(_raw_consume(settings))
        out = _e2e(settings, readings)
        # The same worker without its InfluxDB sink (``--no-sinks``), on topics of its own
        # (the fan-outs' would hold the first run's copies): what the sink's second read
        # and encoding of the telemetry costs the worker.
        agents_dir = Path(tmp) / "agents-only"
        agents_dir.mkdir()
        agents_settings = load_settings(**_overrides(broker, agents_dir))
        asyncio.run(_load(agents_settings))
        agents = _e2e(agents_settings, readings, sinks=False)
        naive = asyncio.run(_faust_per_event(load_settings(**_overrides(broker, Path(tmp)))))
    return {
        "e2e_readings_per_s": out["e2e_readings_per_s"],
        # The sample's few devices; ``worker_rss_mb`` (100,000 devices) is benchmarks.memory's.
        "e2e_worker_rss_mb": out["worker_rss_mb"],
        # From all the telemetry read to every price and intensity decided on.
        "e2e_tail_after_telemetry_s": out["tail_s"],
        "e2e_agents_only_readings_per_s": agents["e2e_readings_per_s"],
        "raw_consume_msgs_per_s": raw_msgs_per_s,
        "raw_consume_readings_per_s": raw_msgs_per_s * readings / messages,
        "faust_per_event_msgs_per_s": naive,
        "e2e_readings": float(readings),
        "e2e_vs_raw_consume_readings": out["e2e_readings_per_s"]
        / (raw_msgs_per_s * readings / messages),
        "e2e_vs_faust_per_event": out["e2e_readings_per_s"] / naive,
    }


def _copied_sites(config: str, copies: int) -> str:
    """The sample's settings with every site (its ``[[sites]]`` block) ``copies`` times,
    as ``<id>-0`` ... ``<id>-<copies - 1>``."""
    head, *blocks = config.split("[[sites]]\n")
    copied = []
    for block in blocks:
        site = re.search(r'^id = "([^"]+)"$', block, re.MULTILINE)
        assert site is not None, "a [[sites]] block without an id"
        for n in range(copies):
            copied.append(block.replace(site.group(0), f'id = "{site.group(1)}-{n}"', 1))
    return head + "".join(f"[[sites]]\n{block}" for block in copied)


def _copied_telemetry(source: Path, target: Path, copies: int) -> None:
    frame = pl.read_parquet(source)
    pl.concat([frame.with_columns(pl.col("site") + f"-{n}") for n in range(copies)]).write_parquet(
        target
    )


def bench_scale_out() -> dict[str, float]:
    """One worker against two (one consumer group) on topics of ``PARTITIONS`` partitions.

    The sample's three sites are copied ``SCALE_OUT_COPIES`` times (so that the keys
    spread over the partitions); each run has a topic prefix and an app id of its own.
    """
    results: dict[str, float] = {}
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "wattstream.toml"
        config.write_text(_copied_sites((SAMPLE / "wattstream.toml").read_text(), SCALE_OUT_COPIES))
        telemetry = Path(tmp) / "telemetry.parquet"
        _copied_telemetry(SAMPLE / "telemetry.parquet", telemetry, SCALE_OUT_COPIES)
        for workers in (1, 2):
            run_dir = Path(tmp) / f"workers-{workers}"
            run_dir.mkdir()
            overrides = _overrides(broker, run_dir)
            settings = load_settings(config, **overrides)
            readings = asyncio.run(_load(settings, telemetry, rounds=1))
            out = _e2e(settings, readings, workers=workers, config=config)
            results[f"scale_out_{workers}_worker_readings_per_s"] = out["e2e_readings_per_s"]
            results[f"scale_out_{workers}_worker_tail_after_telemetry_s"] = out["tail_s"]
    results["scale_out_2_vs_1_worker"] = (
        results["scale_out_2_worker_readings_per_s"] / results["scale_out_1_worker_readings_per_s"]
    )
    return results


if __name__ == "__main__":
    for key, value in bench_e2e().items():
        print(f"{key:<32} {value:>14,.1f}")
