"""Running a Faust worker in a test: start it, produce its input, wait until it is read, stop."""

from __future__ import annotations

from collections.abc import Sequence

import faust

from pipeline import kafka
from pipeline.settings import Settings


async def run_worker(
    app: faust.App,
    settings: Settings,
    records: Sequence[tuple[str, str, bytes]],
    drained: Sequence[str],
    timeout_s: float = 40.0,
) -> None:
    """Start ``app``, send ``records`` (topic, key, value) in order, wait until its group
    has read the ``drained`` topics to their end, stop it (also when the wait fails)."""
    await app.start()
    try:
        producer = kafka.producer(settings)
        await producer.start()
        try:
            for topic, key, value in records:
                await producer.send_and_wait(topic, value, key=key.encode())
        finally:
            await producer.stop()
        await kafka.wait_until_drained(
            settings,
            {settings.app_id: list(drained)},
            timeout_s=timeout_s,
            failed=lambda: app.crash_reason,
        )
    finally:
        await app.stop()
