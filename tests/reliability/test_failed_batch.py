"""A batch whose processing fails is not committed: the worker that reads the partition
next processes it again, and nothing it would have sent is lost.

Faust's ``take_events`` acknowledges every event of a batch when the batch is left, also
when the agent raised in it; an acknowledged offset is committed (at the latest when the
crashing app stops). A step that raises on one message (a bug that input triggers, or a
broken environment) would then have the offsets of every message of its batch committed
with their outputs never sent. The shared site agent marks such a batch as not done.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from pipeline import codec, kafka, streams, topics
from pipeline.app import create_app
from pipeline.local import EmbeddedBroker
from pipeline.schemas import Alert, MeterReading, Severity, TelemetryBatch
from pipeline.settings import Settings
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.reliability

SITE = "plant"
T0 = datetime(2025, 4, 7, tzinfo=UTC)
BATCHES = 6
POISON = 3


def _batch(n: int) -> TelemetryBatch:
    return TelemetryBatch(
        batch_id=f"b{n}",
        site=SITE,
        source="test",
        readings=[MeterReading(device="m", ts=T0 + timedelta(minutes=n), power_kw=1.0)],
    )


def _app(settings: Settings, fail_on: str | None, seen: list[str]) -> object:
    """The worker's app plus a step that alerts on every batch, and raises on ``fail_on``."""
    app = create_app(settings)

    def step(site: str, batch: TelemetryBatch) -> list[Alert]:
        seen.append(batch.batch_id)
        if batch.batch_id == fail_on:
            raise RuntimeError("a bug this batch triggers")
        return [
            Alert(
                alert_id=f"seen-{batch.batch_id}",
                site=site,
                alert_type="test",
                severity=Severity.INFO,
                subject="seen",
                message=batch.batch_id,
                start=batch.readings[0].ts,
            )
        ]

    streams.site_agent(app, settings, "tests.boom", [SITE], telemetry=step)
    return app


async def _send_batches(settings: Settings) -> None:
    await kafka.ensure_topics(settings)
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for n in range(BATCHES):
            await producer.send_and_wait(
                settings.topic(topics.TELEMETRY), codec.encode(_batch(n)), key=SITE.encode()
            )
    finally:
        await producer.stop()


async def _committed(settings: Settings) -> int:
    lag = await kafka.group_lag(settings, settings.app_id, [settings.topic(topics.TELEMETRY)])
    return sum(lag.committed.values())


async def test_a_batch_that_raises_is_processed_again_after_the_restart(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        partitions=1,
        sites=[{"id": SITE, "market": "M", "detection": {"enabled": False}}],
        kafka={"one_record_per_batch": True},
    )
    await _send_batches(settings)
    seen: list[str] = []
    app = _app(settings, fail_on=f"b{POISON}", seen=seen)
    await app.start()  # type: ignore[attr-defined]
    try:
        for _ in range(400):
            if app.crash_reason is not None:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.1)
        assert isinstance(app.crash_reason, RuntimeError)  # type: ignore[attr-defined]
    finally:
        await app.stop()  # type: ignore[attr-defined]
    assert f"b{POISON}" in seen
    # The failed batch began at or before the poison: nothing from there on is committed.
    assert await _committed(settings) <= POISON

    # Started again (the bug fixed), the worker reads the batch again and sends it all.
    seen_again: list[str] = []
    app = _app(settings, fail_on=None, seen=seen_again)
    await app.start()  # type: ignore[attr-defined]
    try:
        await kafka.wait_until_drained(
            settings,
            {settings.app_id: [settings.topic(topics.TELEMETRY)]},
            timeout_s=60,
            failed=lambda: app.crash_reason,  # type: ignore[attr-defined]
        )
    finally:
        await app.stop()  # type: ignore[attr-defined]
    assert f"b{POISON}" in seen_again and seen_again[-1] == f"b{BATCHES - 1}"
    alerts = {
        codec.decode(Alert, value).alert_id
        for _, value in await kafka.read_all(settings, topics.ALERTS)
    }
    assert alerts == {f"seen-b{n}" for n in range(BATCHES)}
    assert await _committed(settings) == BATCHES
