"""The InfluxDB sink against real servers: InfluxDB 1.6.7 (v1), VictoriaMetrics (v2),
real local HTTP servers for error answers, and an outage in the middle of a stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pipeline import codec, kafka, topics
from pipeline.local import EmbeddedBroker
from pipeline.schemas import Decision, MeterReading, TelemetryBatch
from pipeline.settings import Settings
from sinks.influx import InfluxSink, SinkError
from tests.conftest import SettingsFactory
from tests.servers import InfluxDB1, VictoriaMetrics

pytestmark = pytest.mark.integration

T0 = datetime(2025, 4, 7, tzinfo=UTC)


def meter_readings(batch: TelemetryBatch) -> list[MeterReading]:
    return [r for r in batch.readings if isinstance(r, MeterReading)]


def telemetry(n: int, site: str = "s1") -> TelemetryBatch:
    return TelemetryBatch.model_validate(
        {
            "batch_id": f"b{n}",
            "site": site,
            "source": "test",
            "readings": [
                {
                    "kind": "meter",
                    "device": "m1",
                    "ts": T0 + timedelta(minutes=n * 10 + i),
                    "power_kw": n + i / 10,
                }
                for i in range(10)
            ],
        }
    )


def decision(hour: int) -> Decision:
    start = T0 + timedelta(hours=hour)
    return Decision(
        decision_id=f"dec-{hour}",
        site="s1",
        device="bat",
        strategy="threshold",
        action="DISCHARGE" if hour % 2 else "CHARGE",
        power_kw=4.0 if hour % 2 else -4.0,
        grid_energy_kwh=4.0 if hour % 2 else -4.0,
        price_per_kwh=0.1 + hour / 100,
        expected_revenue=0.4,
        soc_pct=50.0,
        expected_soc_pct=60.0,
        decided_at=start,
        valid_from=start,
        valid_until=start + timedelta(hours=1),
        reason="test",
    )


async def produce(settings: Settings, spec: topics.TopicSpec, messages: list[Any]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for message in messages:
            key = getattr(message, "site", "k").encode()
            await producer.send(settings.topic(spec), codec.encode(message), key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        outcome = check()
        if isinstance(outcome, Awaitable):
            outcome = await outcome
        if outcome:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def running(sink: InfluxSink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sink.run())
    try:
        yield task
    finally:
        await sink.stop()
        await task


async def fully_committed(settings: Settings, sink: InfluxSink) -> bool:
    lag = await kafka.group_lag(settings, sink.group_id, sink.topic_names)
    return lag.total == 0 and sum(lag.end.values()) > 0


@pytest.fixture
async def settings_v1(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, influxdb: InfluxDB1
) -> Settings:
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        kafka={"one_record_per_batch": True},
        influx={"url": influxdb.url, "api": "v1", "flush_interval_s": 0.2, "retry_initial_s": 0.2},
    )
    settings = settings.model_copy(
        update={
            "influx": settings.influx.model_copy(
                update={"database": settings.app_id.replace("-", "_")}
            )
        }
    )
    await kafka.ensure_topics(settings)
    return settings


async def test_v1_points_read_back_equal_points_written_and_rewrites_are_idempotent(
    settings_v1: Settings, influxdb: InfluxDB1
) -> None:
    database = settings_v1.influx.database
    await produce(settings_v1, topics.TELEMETRY, [telemetry(n) for n in range(5)])
    await produce(settings_v1, topics.DECISIONS, [decision(h) for h in range(6)])
    sink = InfluxSink(settings_v1)
    async with running(sink):
        await eventually(lambda: sink.stats.points_written == 5 * 10 + 6)
        await eventually(lambda: fully_committed(settings_v1, sink))

    meters = influxdb.rows("SELECT power_kw, device, site FROM meter ORDER BY time", database)
    expected = [
        {"time": int(r.ts.timestamp() * 1000), "power_kw": r.power_kw, "device": "m1", "site": "s1"}
        for n in range(5)
        for r in meter_readings(telemetry(n))
    ]
    assert meters == expected
    decisions = influxdb.rows("SELECT * FROM decision ORDER BY time", database)
    assert [(d["action"], d["power_kw"], d["decision_id"]) for d in decisions] == [
        (decision(h).action.value, decision(h).power_kw, f"dec-{h}") for h in range(6)
    ]

    # A second sink (new group) writes the same records again: same timestamps, same points.
    again = InfluxSink(settings_v1, group_id=sink.group_id + "-again")
    async with running(again):
        await eventually(lambda: again.stats.points_written == 56)
    assert len(influxdb.rows("SELECT * FROM meter", database)) == 50
    assert len(influxdb.rows("SELECT * FROM decision", database)) == 6


async def test_v2_write_api_against_victoria_metrics(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, victoria_metrics: VictoriaMetrics
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        kafka={"one_record_per_batch": True},
        influx={
            "url": victoria_metrics.url,
            "api": "v2",
            "token": "not-checked-by-vm",
            "flush_interval_s": 0.2,
        },
    )
    await kafka.ensure_topics(settings)
    site = settings.app_id  # unique per test: VictoriaMetrics is shared by the session
    await produce(settings, topics.TELEMETRY, [telemetry(n, site=site) for n in range(3)])
    sink = InfluxSink(settings, specs=(topics.TELEMETRY,))
    async with running(sink):
        await eventually(lambda: sink.stats.points_written == 30)
    (series,) = victoria_metrics.export(f'meter_power_kw{{site="{site}"}}')
    assert series["metric"]["device"] == "m1"
    expected = sorted(
        (int(r.ts.timestamp() * 1000), r.power_kw)
        for n in range(3)
        for r in meter_readings(telemetry(n))
    )
    assert sorted(zip(series["timestamps"], series["values"], strict=True)) == expected


async def test_line_protocol_file_when_no_url(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        kafka={"one_record_per_batch": True},
        influx={"file": tmp_path / "out" / "points.lp", "flush_interval_s": 0.2},
    )
    await kafka.ensure_topics(settings)
    await produce(settings, topics.DECISIONS, [decision(h) for h in range(4)])
    sink = InfluxSink(settings)
    async with running(sink):
        await eventually(lambda: fully_committed(settings, sink))
    lines = (tmp_path / "out" / "points.lp").read_text().splitlines()
    data = [line for line in lines if not line.startswith("wattstream_sink,")]
    assert len(data) == 4 and all(line.startswith("decision,") for line in data)
    # The sink's own counters travel with each write (as counted before it).
    (counters,) = [line for line in lines if line.startswith("wattstream_sink,")]
    assert "records_consumed=4" in counters and "points_written=0" in counters


# --- error answers, from real local HTTP servers ---------------------------------------------


@contextlib.asynccontextmanager
async def http_server(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def settings_for(make_settings: SettingsFactory, broker: EmbeddedBroker, url: str) -> Settings:
    return make_settings(
        broker=broker.bootstrap,
        kafka={"one_record_per_batch": True},
        influx={
            "url": url,
            "flush_interval_s": 0.2,
            "retry_initial_s": 0.1,
            "create_database": False,
        },
    )


async def test_400_drops_the_batch_and_commits(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/write":
            return web.Response(status=400, text='{"error":"field type conflict"}')
        return web.Response(status=204)

    async with http_server(handler) as url:
        settings = settings_for(make_settings, kafka_broker, url)
        await kafka.ensure_topics(settings)
        await produce(settings, topics.DECISIONS, [decision(0), decision(1)])
        sink = InfluxSink(settings, specs=(topics.DECISIONS,))
        async with running(sink):
            await eventually(lambda: fully_committed(settings, sink))
        assert sink.stats.points_dropped == 2 and sink.stats.points_written == 0
        assert "field type conflict" in (sink.stats.last_error or "")


async def test_503_is_retried_honouring_retry_after(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    attempts: list[float] = []
    bodies: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        if request.path != "/write":
            return web.Response(status=204)
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) <= 2:
            return web.Response(status=503, headers={"Retry-After": "1"})
        # aiohttp decompresses the body itself when Content-Encoding says gzip.
        bodies.append(
            request.headers.get("Content-Encoding", "").encode() + b"|" + await request.read()
        )
        return web.Response(status=204)

    async with http_server(handler) as url:
        settings = settings_for(make_settings, kafka_broker, url)
        await kafka.ensure_topics(settings)
        await produce(settings, topics.DECISIONS, [decision(0)])
        sink = InfluxSink(settings, specs=(topics.DECISIONS,))
        async with running(sink):
            await eventually(lambda: sink.stats.points_written == 1)
            await eventually(lambda: fully_committed(settings, sink))
    assert sink.stats.retries == 2
    # Retry-After: 1 means at least a second between attempts (our own backoff is 0.1 s).
    assert attempts[1] - attempts[0] >= 0.95 and attempts[2] - attempts[1] >= 0.95
    assert bodies[0].startswith(b"gzip|decision,")


async def test_401_fails_fast_with_a_clear_error(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=401 if request.path == "/write" else 204, text="unauthorized")

    async with http_server(handler) as url:
        settings = settings_for(make_settings, kafka_broker, url)
        await kafka.ensure_topics(settings)
        await produce(settings, topics.DECISIONS, [decision(0)])
        sink = InfluxSink(settings, specs=(topics.DECISIONS,))
        with pytest.raises(SinkError, match="401"):
            await asyncio.wait_for(sink.run(), timeout=30)
        lag = await kafka.group_lag(settings, sink.group_id, sink.topic_names)
        await sink.stop()
    assert lag.total == 1, "a refused write commits nothing"
