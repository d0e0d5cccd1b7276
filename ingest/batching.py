"""Telemetry batches of the live connectors (Modbus, MQTT, OCPP): a site's readings in
batches of at most ``max_readings``, each with an id derived from its readings, so a
redelivered burst (a connector restarted before Kafka acknowledged it) gets the same id
and downstream writes are idempotent."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from pipeline.schemas import Reading, TelemetryBatch, stable_id


def batch_id(source: str, site: str, readings: Sequence[Reading]) -> str:
    """Derived from the readings' identities: the same readings give the same id."""
    return stable_id(
        "bat", source, site, *(f"{r.kind}/{r.device}/{r.ts.isoformat()}" for r in readings)
    )


def site_batches(
    source: str,
    readings_by_site: Mapping[str, Sequence[Reading]],
    max_readings: int | None = None,
) -> Iterator[TelemetryBatch]:
    """Each site's readings, in order, as batches of at most ``max_readings`` (None: one
    batch per site)."""
    for site, readings in readings_by_site.items():
        size = max_readings or max(len(readings), 1)
        for start in range(0, len(readings), size):
            chunk = list(readings[start : start + size])
            yield TelemetryBatch(
                batch_id=batch_id(source, site, chunk), site=site, source=source, readings=chunk
            )
