"""The webhook receiver fails for 30 s (500s and time-outs) while alerts keep coming:
afterwards every alert has been delivered, exactly one accepted delivery per alert event,
each request with a valid signature. A real aiohttp server, the embedded broker."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
import pytest
from aiohttp import web

from pipeline.local import EmbeddedBroker
from sinks.webhook import DELIVERY_HEADER, SIGNATURE_HEADER, WebhookSink, verify
from tests.conftest import SettingsFactory
from tests.integration.test_influx_sink import eventually, http_server
from tests.integration.test_webhook_sink import SECRET, committed, produce, running, settings_for
from tests.unit.sinks.test_webhook import alert

pytestmark = pytest.mark.reliability

OUTAGE_S = 30.0
TIMEOUT_S = 1.0


async def test_a_30_s_receiver_outage_delivers_every_alert_once_signed(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    loop = asyncio.get_running_loop()
    outage_ends = loop.time() + OUTAGE_S
    requests = 0
    bad_signatures = 0
    accepted: Counter[str] = Counter()
    alert_ids: dict[str, tuple[str, str]] = {}

    async def receiver(request: web.Request) -> web.Response:
        nonlocal requests, bad_signatures
        requests += 1
        body = await request.read()
        if not verify(SECRET.encode(), request.headers.get(SIGNATURE_HEADER, ""), body):
            bad_signatures += 1
            return web.Response(status=401)
        if loop.time() < outage_ends:
            if requests % 2:
                return web.Response(status=500, text="down")
            await asyncio.sleep(TIMEOUT_S * 2)  # past the sink's time-out
            return web.Response(status=503)
        delivery = request.headers[DELIVERY_HEADER]
        accepted[delivery] += 1
        sent = orjson.loads(body)
        alert_ids[delivery] = (sent["alert_id"], sent["status"])
        return web.Response(status=200)

    firing = [alert(f"a-{n}", minute=n) for n in range(6)]
    resolved = [
        alert(a.alert_id, minute=n, status="resolved", end=a.start) for n, a in enumerate(firing)
    ]
    async with http_server(receiver) as url:
        settings = await settings_for(
            make_settings,
            kafka_broker,
            url,
            timeout_s=TIMEOUT_S,
            retry_initial_s=0.5,
            retry_max_s=4.0,
            max_attempts=30,
        )
        sink = WebhookSink(settings)
        async with running(sink):
            await produce(settings, list(firing[:3]))
            await asyncio.sleep(OUTAGE_S / 3)
            await produce(settings, [*firing[3:], *resolved[:3]])
            await asyncio.sleep(OUTAGE_S / 3)
            await produce(settings, list(resolved[3:]))
            await eventually(lambda: committed(settings, sink), timeout_s=OUTAGE_S + 60)

    events = {(a.alert_id, a.status.value) for a in [*firing, *resolved]}
    assert set(alert_ids.values()) == events, "every alert event was delivered"
    assert all(count == 1 for count in accepted.values()), accepted
    assert len(accepted) == len(events) == 12
    assert bad_signatures == 0
    assert requests > len(events), "the outage made the sink retry"
    assert sink.stats.dead_lettered == 0 and sink.stats.sent == 12
