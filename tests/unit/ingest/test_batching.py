"""Live connectors' telemetry batches: chunked per site, ids from the readings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ingest.batching import site_batches
from pipeline.schemas import HomeReading, Reading

T0 = datetime(2025, 4, 7, tzinfo=UTC)


def readings(count: int, device: str = "h") -> list[Reading]:
    return [
        HomeReading(device=device, ts=T0 + timedelta(minutes=m), power_kw=1.0) for m in range(count)
    ]


def test_a_sites_readings_are_chunked_in_order_and_the_same_readings_get_the_same_id() -> None:
    batches = list(site_batches("mqtt:x", {"s1": readings(5), "s2": readings(2)}, 2))
    assert [(b.site, len(b.readings)) for b in batches] == [
        ("s1", 2),
        ("s1", 2),
        ("s1", 1),
        ("s2", 2),
    ]
    assert [r.ts for b in batches[:3] for r in b.readings] == [r.ts for r in readings(5)]
    again = list(site_batches("mqtt:x", {"s1": readings(5), "s2": readings(2)}, 2))
    assert [b.batch_id for b in again] == [b.batch_id for b in batches]
    assert len({b.batch_id for b in batches}) == 4
    other = list(site_batches("mqtt:x", {"s1": readings(5, device="h2")}, 2))
    assert other[0].batch_id != batches[0].batch_id


def test_without_a_limit_a_site_is_one_batch() -> None:
    (batch,) = site_batches("modbus:x", {"s1": readings(700)})
    assert len(batch.readings) == 700
