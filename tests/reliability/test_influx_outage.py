"""InfluxDB stopped for 30 s under a live stream: every point is stored afterwards, and with
a buffer smaller than the outage the overflow is counted and stays in Kafka (moved from
tests/integration/test_influx_sink.py, whose fixtures and helpers it uses)."""

from __future__ import annotations

import asyncio

import pytest

from pipeline import codec, kafka, topics
from pipeline.settings import Settings
from sinks.influx import InfluxSink
from tests.integration.test_influx_sink import (
    eventually,
    fully_committed,
    running,
    telemetry,
)
from tests.servers import InfluxDB1

OUTAGE_S = 30.0

pytestmark = pytest.mark.reliability


async def test_a_30_s_influxdb_outage_mid_stream_loses_nothing_and_counts_overflow(
    settings_v1: Settings, influxdb: InfluxDB1
) -> None:
    """A producer keeps streaming while InfluxDB is down for 30 s.

    The buffer holds 25 points (records carry 10): during the outage it fills,
    the rest stays in Kafka and is counted as overflow; afterwards every point
    is in InfluxDB and every offset is committed.
    """
    settings = settings_v1.model_copy(
        update={
            "influx": settings_v1.influx.model_copy(
                update={"batch_size_points": 20, "buffer_points": 25, "retry_max_s": 2.0}
            )
        }
    )
    database = settings.influx.database
    sink = InfluxSink(settings, specs=(topics.TELEMETRY,))
    sent = 0
    streaming = asyncio.Event()
    streaming.set()

    async def stream() -> None:
        nonlocal sent
        producer = kafka.producer(settings)
        await producer.start()
        try:
            while streaming.is_set():
                batch = telemetry(sent)
                await producer.send_and_wait(
                    settings.topic(topics.TELEMETRY), codec.encode(batch), key=b"s1"
                )
                sent += 1
                await asyncio.sleep(0.1)
        finally:
            await producer.stop()

    async with running(sink):
        streamer = asyncio.create_task(stream())
        await eventually(lambda: sink.stats.points_written >= 30)
        influxdb.stop()
        outage_started = asyncio.get_running_loop().time()
        try:
            await eventually(lambda: sink.stats.retries >= 2)
            lag = await kafka.group_lag(settings, sink.group_id, sink.topic_names)
            assert lag.total > 0, "nothing may be committed while InfluxDB is down"
            await asyncio.sleep(OUTAGE_S - (asyncio.get_running_loop().time() - outage_started))
            written_during_outage = sink.stats.points_written
        finally:
            influxdb.start()
        await asyncio.sleep(2)
        streaming.clear()
        await streamer
        await eventually(lambda: sink.stats.points_written == sent * 10, timeout_s=60)
        await eventually(lambda: fully_committed(settings, sink))

    assert sent > 250, "the stream kept going through the outage"
    assert len(influxdb.rows("SELECT * FROM meter", database)) == sent * 10
    assert written_during_outage < sent * 10
    assert sink.stats.overflow_records > 0, "a 25-point buffer must overflow in 30 s"
    assert sink.stats.points_dropped == 0
