"""``wattstream status`` against the embedded broker and a real Prometheus endpoint:
exact offsets, commits, lag and dead-letter counts, the same numbers in ``--json``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiokafka import TopicPartition
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from pipeline import kafka, schemas, topics
from pipeline.cli import main
from pipeline.local import EmbeddedBroker, free_port
from pipeline.settings import Settings
from pipeline.status import UNDECODABLE, BrokerUnreachableError, DeploymentStatus, collect_status
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration

TELEMETRY_PER_PARTITION = {0: 5, 1: 3}
OTHER_GROUP = "status-reader"
OTHER_GROUP_COMMITS = {0: 3}
"""Partition 1 has no commit: its lag is everything on it."""
WORKER_COMMITS = {0: 5, 1: 1}
VALIDATION_LETTERS = 3
DECODE_LETTERS = 2


@dataclass(frozen=True)
class Seeded:
    settings: Settings
    telemetry: str
    dead_letters: str


def deployment(kafka_broker: EmbeddedBroker, make_settings: SettingsFactory) -> Settings:
    # One record per batch: tansu's end offsets are wrong after a multi-record batch.
    return make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})


async def seed(settings: Settings) -> Seeded:
    """Topics, telemetry on known partitions, dead letters of two kinds, two groups' commits."""
    await kafka.ensure_topics(settings)
    telemetry = settings.topic(topics.TELEMETRY)
    letters = settings.topic(topics.DEAD_LETTERS)
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for partition, count in TELEMETRY_PER_PARTITION.items():
            for i in range(count):
                await producer.send_and_wait(
                    telemetry, b'{"readings": []}', key=f"site-{i}".encode(), partition=partition
                )
        for i in range(VALIDATION_LETTERS):
            letter = schemas.dead_letter(
                raw=b'{"kind": "battery"}',
                reason=f"soc_pct: field required (record {i})",
                error_type="ValidationError",
                component="processors.arbitrage",
                source_topic=telemetry,
            )
            await producer.send_and_wait(letters, letter.model_dump_json().encode())
        for _ in range(DECODE_LETTERS):
            letter = schemas.dead_letter(
                raw=b"{not json",
                reason="Expecting property name enclosed in double quotes",
                error_type="JSONDecodeError",
                component="ingest.mqtt",
                source_topic="mqtt:site/1/meter",
            )
            await producer.send_and_wait(letters, letter.model_dump_json().encode())
        await producer.send_and_wait(letters, b"\xff\xfe not a dead letter")
    finally:
        await producer.stop()
    for group, commits in ((OTHER_GROUP, OTHER_GROUP_COMMITS), (settings.app_id, WORKER_COMMITS)):
        async with kafka.running(kafka.consumer(settings, group_id=group)) as committer:
            committer.assign([TopicPartition(telemetry, p) for p in commits])
            await committer.commit({TopicPartition(telemetry, p): o for p, o in commits.items()})
    return Seeded(settings, telemetry, letters)


def check_numbers(status: dict[str, Any], seeded: Seeded) -> None:
    """The exact figures of :func:`seed`, from :meth:`DeploymentStatus.as_json`."""
    by_topic = {t["name"]: t for t in status["topics"]}
    assert set(by_topic) == {seeded.settings.topic(spec) for spec in topics.ALL_TOPICS}
    assert all(t["exists"] for t in by_topic.values())
    telemetry = by_topic[seeded.telemetry]
    assert {p["partition"]: p["end"] for p in telemetry["partitions"]} == TELEMETRY_PER_PARTITION
    assert telemetry["messages"] == 8
    assert by_topic[seeded.dead_letters]["messages"] == VALIDATION_LETTERS + DECODE_LETTERS + 1
    assert by_topic[seeded.settings.topic(topics.PRICES)]["messages"] == 0

    groups = {g["group"]: g for g in status["groups"]}
    assert set(groups) == {seeded.settings.app_id, OTHER_GROUP}
    other = {(p["topic"], p["partition"]): p for p in groups[OTHER_GROUP]["partitions"]}
    assert other == {
        (seeded.telemetry, 0): {
            "topic": seeded.telemetry,
            "partition": 0,
            "committed": 3,
            "end": 5,
            "lag": 2,
        },
        (seeded.telemetry, 1): {
            "topic": seeded.telemetry,
            "partition": 1,
            "committed": None,
            "end": 3,
            "lag": 3,
        },
    }
    assert groups[OTHER_GROUP]["lag"] == 5
    worker = {
        p["partition"]: (p["committed"], p["lag"])
        for p in groups[seeded.settings.app_id]["partitions"]
    }
    assert worker == {0: (5, 0), 1: (1, 2)}
    assert groups[seeded.settings.app_id]["lag"] == 2

    dead = status["dead_letters"]
    assert dead["complete"] and dead["total"] == dead["expected"] == 6
    counts = {(g["component"], g["error_type"]): g["count"] for g in dead["groups"]}
    assert counts == {
        ("processors.arbitrage", "ValidationError"): VALIDATION_LETTERS,
        ("ingest.mqtt", "JSONDecodeError"): DECODE_LETTERS,
        ("unknown", UNDECODABLE): 1,
    }
    examples = {g["error_type"]: g for g in dead["groups"]}
    assert examples["ValidationError"]["example_reason"] == "soc_pct: field required (record 0)"
    assert examples["ValidationError"]["source_topics"] == [seeded.telemetry]


@pytest.fixture
async def metrics_url() -> AsyncIterator[str]:
    """A real HTTP endpoint serving the worker's sink metrics in Prometheus text."""
    registry = CollectorRegistry()
    up = Gauge("wattstream_sink_up", "sink up", ["sink"], registry=registry)
    buffered = Gauge("wattstream_sink_buffer_points", "buffered", ["sink"], registry=registry)
    points = Counter("wattstream_sink_points", "points", ["sink", "outcome"], registry=registry)
    ready = Gauge("wattstream_ready", "ready", registry=registry)
    up.labels("influx").set(1)
    up.labels("webhook").set(0)
    buffered.labels("influx").set(120)
    buffered.labels("webhook").set(0)
    points.labels("influx", "written").inc(5000)
    points.labels("influx", "retried").inc(40)
    points.labels("webhook", "written").inc(7)
    points.labels("webhook", "dropped").inc(2)
    ready.set(1)

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        await runner.cleanup()


async def test_status_reports_exact_offsets_lag_dead_letters_and_sinks(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, metrics_url: str
) -> None:
    seeded = await seed(deployment(kafka_broker, make_settings))
    status = await collect_status(seeded.settings, metrics_url=metrics_url, timeout_s=5)
    assert isinstance(status, DeploymentStatus)
    check_numbers(json.loads(json.dumps(status.as_json())), seeded)
    assert status.warnings == ()
    assert {(g.group, g.state, g.members) for g in status.groups} == {
        (seeded.settings.app_id, "Empty", 0),
        (OTHER_GROUP, "Empty", 0),
    }

    assert status.metrics is not None and status.metrics.error is None
    assert status.metrics.ready is True
    sinks = {s.sink: s for s in status.metrics.sinks}
    assert set(sinks) == {"influx", "webhook"}
    influx, webhook = sinks["influx"], sinks["webhook"]
    assert (influx.up, influx.buffered_points) == (True, 120)
    assert (influx.written, influx.retried, influx.dropped) == (5000, 40, 0)
    assert (webhook.up, webhook.buffered_points) == (False, 0)
    assert (webhook.written, webhook.retried, webhook.dropped) == (7, 0, 2)


async def test_missing_topics_and_an_unreachable_metrics_url_are_reported(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = deployment(kafka_broker, make_settings)
    port = free_port()
    status = await collect_status(
        settings, metrics_url=f"http://127.0.0.1:{port}/metrics", timeout_s=3
    )
    assert [t.exists for t in status.topics] == [False] * len(topics.ALL_TOPICS)
    assert all(t.partitions == () for t in status.topics)
    assert [g.group for g in status.groups] == [settings.app_id]
    assert status.groups[0].partitions == ()
    assert status.dead_letters.total == 0 and status.dead_letters.complete
    assert status.metrics is not None and status.metrics.sinks == ()
    assert status.metrics.error is not None
    assert status.metrics.error == f"metrics unreachable: 127.0.0.1:{port}: connection refused"
    # Asking about missing topics must not create them (tansu creates on metadata).
    again = await collect_status(settings, timeout_s=3)
    assert not any(t.exists for t in again.topics)


async def test_a_broker_that_does_not_answer_is_a_connection_error(
    make_settings: SettingsFactory,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(BrokerUnreachableError, match=address) as caught:
        await collect_status(make_settings(broker=address), timeout_s=1)
    assert isinstance(caught.value, ConnectionError)


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "WATTSTREAM_BROKER": kafka.bootstrap_servers(settings),
        "WATTSTREAM_APP_ID": settings.app_id,
        "WATTSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "WATTSTREAM_PARTITIONS": str(settings.partitions),
    }


# Sync tests: the command runs its own event loop (asyncio.run).
def test_the_command_prints_the_same_numbers_as_json_and_as_tables(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    seeded = asyncio.run(seed(deployment(kafka_broker, make_settings)))
    runner = CliRunner()
    result = runner.invoke(main, ["status", "--json"], env=cli_env(seeded.settings))
    assert result.exit_code == 0, result.output
    check_numbers(json.loads(result.stdout), seeded)

    nowhere = f"http://127.0.0.1:{free_port()}/metrics"
    env = {**cli_env(seeded.settings), "WATTSTREAM_METRICS_URL": nowhere}
    screen = runner.invoke(main, ["status", "--timeout", "3"], env=env)
    assert screen.exit_code == 0, screen.output
    for text in (seeded.telemetry, OTHER_GROUP, "no commit", "ValidationError", UNDECODABLE):
        assert text in screen.stdout
    assert "metrics unreachable: " in screen.stdout


def test_the_command_exits_1_when_the_broker_does_not_answer(
    make_settings: SettingsFactory,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    settings = make_settings(broker=address)
    result = CliRunner().invoke(main, ["status", "--timeout", "1"], env=cli_env(settings))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("wattstream: ")
    assert address in result.stderr
