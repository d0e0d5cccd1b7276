"""The "wattstream internals" dashboard against a real Prometheus scraping a real worker:
every panel's PromQL, expanded as Grafana does, returns data over the run."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import timedelta
from pathlib import Path

import pytest

from ingest.replay import Replay
from pipeline import kafka, topics
from pipeline.app import agent_input_topics
from pipeline.dashboards import (
    INTERNALS_DIR,
    expand_promql,
    load_dashboards,
    promql_queries,
)
from pipeline.local import EmbeddedBroker, free_port
from tests.conftest import SettingsFactory
from tests.integration.test_arbitrage_agent import arbitrage_worker, write_inputs
from tests.integration.test_worker_metrics import BAD_RECORDS, metrics_environment
from tests.servers import Prometheus
from tests.workers import wattstream_process

pytestmark = pytest.mark.integration

RATE_INTERVAL = timedelta(seconds=5)
"""Grafana's $__rate_interval for a 1 s scrape: four scrapes and a margin."""


async def test_every_internals_panel_query_returns_data_from_prometheus(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    (dashboard,) = load_dashboards(INTERNALS_DIR)
    queries = promql_queries(dashboard)
    assert len(queries) >= 12
    settings, config = await arbitrage_worker(make_settings, kafka_broker, tmp_path)
    port = free_port("127.0.0.1")
    prometheus = Prometheus([f"127.0.0.1:{port}"]).start()
    log = tmp_path / "worker.log"
    started_s = time.time()
    try:
        env = metrics_environment(settings, config, port)
        env["WATTSTREAM_INFLUX_FLUSH_INTERVAL_S"] = "0.2"
        with wattstream_process(env, log, "worker") as worker:
            while prometheus.value("wattstream_ready") != 1.0:
                assert worker.poll() is None, log.read_text()[-3000:]
                assert time.time() - started_s < 90, "the worker never became ready"
                await asyncio.sleep(0.5)
            telemetry_file, prices_file = write_inputs(tmp_path)
            # Four rounds a few seconds apart: the rates have samples to differ over.
            for _ in range(4):
                await Replay(settings, telemetry_file, prices_file).run()
                await asyncio.sleep(2)
            producer = kafka.producer(settings)
            await producer.start()
            try:
                for value in BAD_RECORDS:
                    await producer.send_and_wait(
                        settings.topic(topics.TELEMETRY), value, key=b"site-0"
                    )
            finally:
                await producer.stop()
            await kafka.wait_until_drained(
                settings,
                {
                    settings.app_id: agent_input_topics(settings),
                    f"{settings.app_id}-sink-influx": [settings.topic(topics.TELEMETRY)],
                },
                timeout_s=120,
            )
            await asyncio.sleep(3)  # the last scrapes
            assert worker.poll() is None, log.read_text()[-3000:]
            span = timedelta(seconds=time.time() - started_s)
            empty = []
            for query in queries:
                promql = expand_promql(query.text, RATE_INTERVAL, span)
                series = prometheus.query_range(promql, started_s, time.time())
                values = [float(v) for s in series for _, v in s["values"]]
                if not any(math.isfinite(v) and v > 0 for v in values):
                    empty.append(f"{query.label}: {promql} -> {len(series)} series")
            # No webhook is configured and InfluxDB never stalled: these may be zero all
            # along (the sink test of test_worker_metrics.py sees its buffer fill), but
            # their series must be there, as zeros.
            allowed_zero = {"Consumer lag by group", "Webhook deliveries per second", "Sink buffer"}
            assert {e.split(" / ")[1][7:-1] for e in empty} <= allowed_zero, "\n".join(empty)
            for title in allowed_zero:
                (query,) = [q for q in queries if q.title == title]
                promql = expand_promql(query.text, RATE_INTERVAL, span)
                assert prometheus.query_range(promql, started_s, time.time()), promql
    finally:
        prometheus.close()
