"""The webhook sink against real local HTTP servers: signed, retried, slow, refused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from pipeline import codec, kafka, logs, topics
from pipeline.local import EmbeddedBroker
from pipeline.schemas import Alert, DeadLetter
from pipeline.settings import Settings
from sinks.webhook import DELIVERY_HEADER, SIGNATURE_HEADER, WebhookSink, verify
from tests.conftest import SettingsFactory
from tests.integration.test_influx_sink import eventually, http_server
from tests.unit.sinks.test_webhook import alert

pytestmark = pytest.mark.integration

SECRET = "webhook-test-secret"


@contextlib.asynccontextmanager
async def running(sink: WebhookSink) -> AsyncIterator[None]:
    task = asyncio.create_task(sink.run())
    try:
        yield
    finally:
        await sink.stop()
        await task


async def settings_for(
    make_settings: SettingsFactory, broker: EmbeddedBroker, url: str, **webhook: Any
) -> Settings:
    settings = make_settings(
        broker=broker.bootstrap,
        kafka={"one_record_per_batch": True},
        webhook={
            "url": url,
            "secret": SECRET,
            "retry_initial_s": 0.1,
            "retry_max_s": 0.3,
            "timeout_s": 1.0,
            "cooldown_s": 0,
            **webhook,
        },
    )
    await kafka.ensure_topics(settings)
    return settings


async def produce(settings: Settings, alerts: list[Alert | bytes]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for item in alerts:
            value = item if isinstance(item, bytes) else codec.encode(item)
            await producer.send(settings.topic(topics.ALERTS), value, key=b"s")
        await producer.flush()
    finally:
        await producer.stop()


async def committed(settings: Settings, sink: WebhookSink) -> bool:
    lag = await kafka.group_lag(settings, sink.group_id, [sink.topic])
    return lag.total == 0 and sum(lag.end.values()) > 0


Handler = Callable[[web.Request], Awaitable[web.Response]]


async def test_signed_posts_one_per_event_verified_by_the_receiver(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    received: list[tuple[bool, str, dict[str, Any]]] = []

    async def receiver(request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify(SECRET.encode(), request.headers[SIGNATURE_HEADER], body)
        received.append((ok, request.headers[DELIVERY_HEADER], orjson.loads(body)))
        return web.Response(status=204)

    async with http_server(receiver) as url:
        settings = await settings_for(make_settings, kafka_broker, url)
        firing, other = alert("a-1"), alert("a-2", alert_type="anomaly")
        resolved = alert("a-1", status="resolved", end=firing.start)
        # The firing event twice (a producer retry): one webhook.
        await produce(settings, [firing, firing, other, resolved])
        sink = WebhookSink(settings)
        async with running(sink):
            await eventually(lambda: committed(settings, sink))
    assert all(ok for ok, _, _ in received)
    assert [(b["alert_id"], b["status"]) for _, _, b in received] == [
        ("a-1", "firing"),
        ("a-2", "firing"),
        ("a-1", "resolved"),
    ]
    assert len({delivery for _, delivery, _ in received}) == 3
    assert sink.stats.sent == 3 and sink.stats.suppressed == 1


async def test_the_url_path_never_reaches_the_log(
    kafka_broker: EmbeddedBroker,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def receiver(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async with http_server(receiver) as url:
        secret_url = f"{url}/services/T000/B000/XXXXSECRETXXXX"
        settings = await settings_for(make_settings, kafka_broker, secret_url)
        await produce(settings, [alert("a-1")])
        sink = WebhookSink(settings)
        with caplog.at_level("DEBUG", logger="sinks.webhook"):
            async with running(sink):
                await eventually(lambda: committed(settings, sink))
    assert sink.stats.sent == 1
    assert "XXXXSECRETXXXX" not in caplog.text and SECRET not in caplog.text
    assert "127.0.0.1" in caplog.text


async def test_a_receiver_failing_for_a_while_gets_it_in_the_end(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    attempts: list[float] = []

    async def flaky(request: web.Request) -> web.Response:
        attempts.append(asyncio.get_running_loop().time())
        return web.Response(status=503 if len(attempts) <= 3 else 200)

    async with http_server(flaky) as url:
        settings = await settings_for(make_settings, kafka_broker, url)
        await produce(settings, [alert("a-1")])
        sink = WebhookSink(settings)
        with batch_ids_logged("sinks.webhook") as tagged:
            async with running(sink):
                await eventually(lambda: committed(settings, sink))
    assert len(attempts) == 4 and sink.stats.sent == 1 and sink.stats.retries == 3
    assert sink.stats.dead_lettered == 0
    # Each retry warning names the alert's record, as the agents' lines name their batch.
    retries = [batch for message, batch in tagged if "attempt" in message]
    assert len(retries) == 3 and len(set(retries)) == 1, tagged
    topic, partition, offset = (retries[0] or "").rsplit("/", 2)
    assert (topic, partition.isdigit(), offset) == (settings.topic(topics.ALERTS), True, "0")


@contextlib.contextmanager
def batch_ids_logged(logger_name: str) -> Iterator[list[tuple[str, str | None]]]:
    """(message, batch id) of each record the logger emits meanwhile."""
    tagged: list[tuple[str, str | None]] = []

    class Tagged(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            tagged.append((record.getMessage(), logs.BATCH_ID.get()))

    logger, handler = logging.getLogger(logger_name), Tagged()
    logger.addHandler(handler)
    try:
        yield tagged
    finally:
        logger.removeHandler(handler)


async def test_a_slow_receiver_times_out_and_is_retried(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    calls = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(2.0)  # past the 1 s timeout
        return web.Response(status=200)

    async with http_server(slow) as url:
        settings = await settings_for(make_settings, kafka_broker, url)
        await produce(settings, [alert("a-1")])
        sink = WebhookSink(settings)
        async with running(sink):
            await eventually(lambda: committed(settings, sink))
    assert calls == 2 and sink.stats.sent == 1
    assert "TimeoutError" in (sink.stats.last_error or "")
    assert sink.failing() is None  # delivered again: ready again, the error kept for stats


async def test_permanent_failures_are_dead_lettered_and_the_stream_goes_on(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    async def picky(request: web.Request) -> web.Response:
        alert_id = orjson.loads(await request.read())["alert_id"]
        status = {"refused": 400, "down": 503}.get(alert_id, 200)
        return web.Response(status=status, text="nope")

    async with http_server(picky) as url:
        settings = await settings_for(make_settings, kafka_broker, url, max_attempts=3)
        await produce(settings, [alert("refused"), b"{not json", alert("down"), alert("fine")])
        sink = WebhookSink(settings)
        async with running(sink):
            await eventually(lambda: committed(settings, sink))
    letters = [
        codec.decode(DeadLetter, v) for _, v in await kafka.read_all(settings, topics.DEAD_LETTERS)
    ]
    reasons = sorted(letter.reason for letter in letters)
    assert len(letters) == 3 and sink.stats.dead_lettered == 3
    assert any(r.startswith("webhook refused: 400") for r in reasons)
    assert any(r.startswith("webhook failed 3 times, last: 503") for r in reasons)
    assert any(r.startswith("not an alert") for r in reasons)
    assert all(letter.component == "sinks.webhook" for letter in letters)
    assert sink.stats.sent == 1  # "fine" still went out after the failures
