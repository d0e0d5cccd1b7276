"""PriceFeed against a real local HTTP server and the real embedded broker: a document,
a malformed one, a revised one, and an outage of the server in between."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web

from ingest.prices import PriceFeed, PriceFeedConfig, SourceRefused
from pipeline import kafka, topics
from pipeline.local import EmbeddedBroker
from pipeline.schemas import DeadLetter, PriceTick
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration

DAY_START = datetime(2025, 4, 6, 22, tzinfo=UTC)
MALFORMED = b"<Publication_MarketDocument>\n  <type>A44</type>\n  <TimeSeries>\n</Publication>\n"


def day_ahead_document(prices_per_mwh: list[float]) -> bytes:
    """A minimal A44 document for DE-LU, hourly, one price per hour from DAY_START."""
    end = DAY_START + timedelta(hours=len(prices_per_mwh))
    points = "".join(
        f"<Point><position>{i}</position><price.amount>{p}</price.amount></Point>"
        for i, p in enumerate(prices_per_mwh, start=1)
    )
    interval = f"<start>{DAY_START:%Y-%m-%dT%H:%MZ}</start><end>{end:%Y-%m-%dT%H:%MZ}</end>"
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        "<Publication_MarketDocument "
        'xmlns="urn:iec62325.351:tc57wg16:451-3:publicationdocument:7:3">'
        "<mRID>doc</mRID><type>A44</type><createdDateTime>2025-04-06T11:00:00Z</createdDateTime>"
        f"<period.timeInterval>{interval}</period.timeInterval>"
        "<TimeSeries><mRID>1</mRID>"
        '<in_Domain.mRID codingScheme="A01">10Y1001A1001A82H</in_Domain.mRID>'
        "<currency_Unit.name>EUR</currency_Unit.name>"
        "<price_Measure_Unit.name>MWH</price_Measure_Unit.name><curveType>A01</curveType>"
        f"<Period><timeInterval>{interval}</timeInterval><resolution>PT60M</resolution>"
        f"{points}</Period></TimeSeries></Publication_MarketDocument>"
    ).encode()


class PriceServer:
    """A real aiohttp server whose answer the test changes, and which can go away."""

    def __init__(self) -> None:
        self.body = b""
        self.status = 200
        self.requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handler(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(status=self.status, body=self.body, content_type="application/xml")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api", self._handler)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        # Port 0 the first time; the same port again after an outage.
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


@contextlib.asynccontextmanager
async def price_server() -> AsyncIterator[PriceServer]:
    server = PriceServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


async def test_feed_survives_bad_documents_and_outages_without_duplicates(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    config = PriceFeedConfig(
        poll_interval_s=0.2,
        reconnect_initial_s=0.2,
        reconnect_max_s=1.0,
        request_timeout_s=5.0,
        source="http://placeholder.invalid/",  # replaced below once the port is known
    )
    async with price_server() as server:
        config = config.model_copy(update={"source": server.url})
        server.body = day_ahead_document([89.42, -5.1, 0.0])
        async with PriceFeed(settings, config) as feed:
            task = asyncio.create_task(feed.run())

            await eventually(lambda: feed.stats.sent == 3, "first document sent")
            polls = server.requests
            await eventually(lambda: server.requests >= polls + 2, "polled again")
            assert feed.stats.sent == 3 and feed.stats.duplicates >= 3

            server.body = MALFORMED
            await eventually(lambda: feed.stats.bad_documents >= 1, "malformed dead-lettered")
            polls = server.requests
            await eventually(lambda: server.requests >= polls + 2, "malformed polled again")

            # The revised document repeats the first three hours and adds two.
            server.body = day_ahead_document([89.42, -5.1, 0.0, 120.0, 130.5])
            await eventually(lambda: feed.stats.sent == 5, "new hours sent")

            # The server goes away: the feed retries with growing delays and lives on.
            await server.stop()
            errors = feed.stats.fetch_errors
            await eventually(lambda: feed.stats.fetch_errors >= errors + 3, "retried", 20)
            assert not task.done()
            assert "ClientConnectorError" in (feed.stats.last_error or "")

            server.body = day_ahead_document([89.42, -5.1, 0.0, 120.0, 130.5, 99.0])
            await server.start()
            await eventually(lambda: feed.stats.sent == 6, "sent after the outage")

            await feed.stop()
            await task  # stop() ends run() cleanly
            bad_documents = feed.stats.bad_documents

    prices = [
        PriceTick.model_validate_json(v) for _, v in await kafka.read_all(settings, topics.PRICES)
    ]
    keys = {k for k, _ in await kafka.read_all(settings, topics.PRICES)}
    assert keys == {b"DE-LU"}
    assert [(t.start - DAY_START, t.price_per_kwh) for t in prices] == [
        (timedelta(hours=0), 0.08942),
        (timedelta(hours=1), -0.0051),
        (timedelta(hours=2), 0.0),
        (timedelta(hours=3), 0.12),
        (timedelta(hours=4), 0.1305),
        (timedelta(hours=5), 0.099),
    ]
    assert all(t.market == "DE-LU" and t.end - t.start == timedelta(hours=1) for t in prices)

    letters = [
        DeadLetter.model_validate_json(v)
        for _, v in await kafka.read_all(settings, topics.DEAD_LETTERS)
    ]
    # The malformed document was polled several times before the revision: one letter.
    assert bad_documents == 1
    (letter,) = letters
    assert letter.raw == MALFORMED.decode()
    assert letter.reason.startswith(server.url) and "malformed XML at line 4" in letter.reason
    assert letter.error_type == "XMLSyntaxError" and letter.component == "ingest.prices"
    assert letter.source_topic == settings.topic(topics.PRICES)


async def test_stop_is_safe_twice_and_run_ends_when_cancelled(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    async with price_server() as server:
        server.body = day_ahead_document([1.0])
        feed = PriceFeed(settings, PriceFeedConfig(source=server.url, poll_interval_s=60))
        task = asyncio.create_task(feed.run())
        await eventually(lambda: feed.stats.sent == 1, "sent")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await feed.stop()
        await feed.stop()


async def test_refused_credentials_stop_the_feed_with_a_clear_error_and_no_token_in_it(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    async with price_server() as server:
        server.status, server.body = 401, b"Unauthorized"
        config = PriceFeedConfig(source=server.url + "?documentType=A44&securityToken=s3cret")
        async with PriceFeed(settings, config) as feed:
            with pytest.raises(SourceRefused, match="HTTP 401") as caught:
                await asyncio.wait_for(feed.run(), timeout=30)
    assert "s3cret" not in str(caught.value) and "securityToken=***" in str(caught.value)
    assert server.requests == 1 and not caught.value.retriable
