"""A worker's ``/metrics``, ``/healthz`` and ``/readyz``, as a real Prometheus and a
load balancer see them: counters equal to what was sent, readiness that follows the
broker, a sink outage in its gauges and counters."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.e2e import worker_environment
from ingest.replay import Replay
from pipeline import kafka, topics
from pipeline.app import agent_input_topics
from pipeline.local import EmbeddedBroker, free_port
from pipeline.settings import Settings
from tests.conftest import SettingsFactory
from tests.integration.test_arbitrage_agent import HOURS, arbitrage_worker, write_inputs
from tests.servers import InfluxDB1, Prometheus
from tests.workers import metrics_page, wattstream_process

pytestmark = pytest.mark.integration

BAD_RECORDS = [b"not json", b'{"site": "site-0"}', b"\xff\xfe"]
"""Undecodable telemetry: each is one dead letter."""


def get(url: str) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a GET (any status; 0 while nothing listens)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our loopback URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except urllib.error.URLError:
        return 0, {}


async def eventually(
    probe: Callable[[], Any], expected: Any, what: str, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    seen: Any = None
    while time.monotonic() < deadline:
        seen = probe()
        if seen == expected:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what}: {seen!r} after {timeout_s} s, expected {expected!r}")


def metrics_environment(settings: Settings, config: Path, port: int) -> dict[str, str]:
    env = worker_environment(settings, config, log_level="INFO")
    env["WATTSTREAM_METRICS_PORT"] = str(port)
    env["WATTSTREAM_METRICS_LAG_INTERVAL_S"] = "1"
    return env


async def test_prometheus_scrapes_the_readings_and_dead_letters_a_worker_processed(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings, config = await arbitrage_worker(make_settings, kafka_broker, tmp_path)
    telemetry_file, prices_file = write_inputs(tmp_path)
    sent = await Replay(settings, telemetry_file, prices_file).run()
    assert sent.readings_sent == 3 * 2 * HOURS * 12  # three sites, two devices, 5-min steps
    telemetry = settings.topic(topics.TELEMETRY)
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for value in BAD_RECORDS:
            await producer.send_and_wait(telemetry, value, key=b"site-0")
    finally:
        await producer.stop()

    port = free_port("127.0.0.1")
    prometheus = Prometheus([f"127.0.0.1:{port}"]).start()
    log = tmp_path / "worker.log"
    try:
        env = metrics_environment(settings, config, port)
        with wattstream_process(env, log, "worker", "--no-sinks") as worker:
            await kafka.wait_until_drained(
                settings, {settings.app_id: agent_input_topics(settings)}, timeout_s=120
            )
            assert worker.poll() is None, log.read_text()[-3000:]
            readings = f'sum(wattstream_readings_total{{topic="{telemetry}"}})'
            await eventually(lambda: prometheus.value(readings), sent.readings_sent, readings)
            assert prometheus.value("sum(wattstream_dead_letters_total)") == len(BAD_RECORDS)
            by_reason = {
                r["metric"]["reason"]: float(r["value"][1])
                for r in prometheus.query("wattstream_dead_letters_total")
            }
            assert sum(by_reason.values()) == len(BAD_RECORDS) and len(by_reason) >= 2
            consumed = f'sum(wattstream_messages_total{{topic="{telemetry}",direction="in"}})'
            assert prometheus.value(consumed) == sent.batches_sent + len(BAD_RECORDS)
            # A decision and a command per site and hour went out.
            produced = 'sum(wattstream_messages_total{direction="out"})'
            assert (prometheus.value(produced) or 0) >= 2 * 3 * HOURS
            agent = 'sum(wattstream_agent_processing_seconds_count{agent=~".*site_agents"})'
            assert (prometheus.value(agent) or 0) >= 1
            lag = f'sum(wattstream_consumer_lag{{group="{settings.app_id}",topic="{telemetry}"}})'
            await eventually(lambda: prometheus.value(lag), 0.0, lag)
            assert prometheus.value("wattstream_ready") == 1.0
            assert prometheus.target_health() == ["up"]
    finally:
        prometheus.close()
    text = log.read_text()
    assert "Traceback" not in text
    # Not a terminal: one JSON object per line, batches named by their first message.
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert len(records) > 10 and all(
        {"time", "level", "logger", "message"} <= r.keys() for r in records
    )
    dead_lettered = [r for r in records if r["message"].startswith("dead-lettered record")]
    assert len(dead_lettered) == len(BAD_RECORDS)
    assert all(str(r["batch"]).startswith(f"{telemetry}/") for r in dead_lettered)


async def test_readyz_follows_the_broker_away_and_back(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    broker = EmbeddedBroker().start()
    try:
        settings = make_settings(broker=broker.bootstrap, kafka={"one_record_per_batch": True})
        config = tmp_path / "no-sites.toml"
        config.write_text("# no sites: the agents every deployment has\n")
        await kafka.ensure_topics(settings)
        port = free_port("127.0.0.1")
        base = f"http://127.0.0.1:{port}"
        log = tmp_path / "worker.log"
        env = metrics_environment(settings, config, port)
        with wattstream_process(env, log, "worker", "--no-sinks") as worker:
            await eventually(lambda: get(f"{base}/readyz")[0], 200, "/readyz", timeout_s=90)
            assert get(f"{base}/healthz") == (200, {"status": "ok"})
            broker.stop()
            await eventually(lambda: get(f"{base}/readyz")[0], 503, "/readyz without a broker")
            _, body = get(f"{base}/readyz")
            assert body["ready"] is False and body["checks"]["broker"] != "ok"
            assert get(f"{base}/healthz")[0] == 200  # alive, only not ready
            broker.start()
            await eventually(lambda: get(f"{base}/readyz")[0], 200, "/readyz with the broker back")
            assert worker.poll() is None, log.read_text()[-3000:]
    finally:
        broker.close()


async def test_a_sink_outage_shows_in_its_gauges_and_counters(
    kafka_broker: EmbeddedBroker,
    make_settings: SettingsFactory,
    tmp_path: Path,
) -> None:
    influx = InfluxDB1().start()
    try:
        settings, config = await arbitrage_worker(
            make_settings,
            kafka_broker,
            tmp_path,
            influx={"url": influx.url, "database": "metrics", "retry_max_s": 1.0},
        )
        port = free_port("127.0.0.1")
        base = f"http://127.0.0.1:{port}"
        log = tmp_path / "worker.log"
        env = metrics_environment(settings, config, port)
        env["WATTSTREAM_INFLUX_URL"] = influx.url
        env["WATTSTREAM_INFLUX_DATABASE"] = "metrics"
        env["WATTSTREAM_INFLUX_RETRY_MAX_S"] = "1"
        env["WATTSTREAM_INFLUX_FLUSH_INTERVAL_S"] = "0.2"
        telemetry_file, prices_file = write_inputs(tmp_path)
        with wattstream_process(env, log, "worker") as worker:
            await eventually(lambda: get(f"{base}/readyz")[0], 200, "/readyz", timeout_s=90)
            influx.stop()
            await Replay(settings, telemetry_file, prices_file).run()

            def sink() -> dict[str, float]:
                return scrape_sink(f"{base}/metrics")

            await eventually(lambda: sink().get("up"), 0.0, "sink up during the outage")
            during = sink()
            assert during["retried"] > 0 and during["retries"] >= 1
            assert during["buffered"] > 0
            status, body = get(f"{base}/readyz")
            assert status == 503 and body["checks"]["sink influx"].startswith("last write failed")
            influx.start()
            await eventually(lambda: sink().get("up"), 1.0, "sink up after the outage")
            await eventually(lambda: sink().get("buffered"), 0.0, "buffer emptied")
            after = sink()
            assert after["written"] >= during["buffered"]
            assert after["dropped"] == 0
            assert get(f"{base}/readyz")[0] == 200
            assert worker.poll() is None, log.read_text()[-3000:]
    finally:
        influx.close()


def scrape_sink(url: str) -> dict[str, float]:
    """The influx sink's numbers from a /metrics page (those it has yet)."""
    names: dict[tuple[str, tuple[str, ...]], str] = {
        ("wattstream_sink_up", ("influx",)): "up",
        ("wattstream_sink_buffer_points", ("influx",)): "buffered",
        ("wattstream_sink_retries_total", ("influx",)): "retries",
        **{
            ("wattstream_sink_points_total", (outcome, "influx")): outcome
            for outcome in ("written", "retried", "dropped")
        },
    }
    page = metrics_page(url)
    return {short: page[key] for key, short in names.items() if key in page}
