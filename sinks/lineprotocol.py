"""Messages -> InfluxDB line protocol, one small function per message type.

Schema (documented in the README): measurement per thing measured, low-
cardinality tags (site, device, kind-like labels), values as fields, and the
timestamp taken from the message, so writing a message twice stores one point.
Serialisation is influxdb-client's ``Point``: escaping and number formats are
the library's, not ours.

Floats are written as floats even when whole (``5.0``, never ``5i``):
InfluxDB rejects a field whose type changes between writes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from influxdb_client import Point, WritePrecision
from pydantic import BaseModel

from pipeline.schemas import Decision, PriceTick, TelemetryBatch

_READING_ENVELOPE = {"kind", "device", "ts"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(ts: datetime) -> int:
    """Milliseconds since the epoch, exactly.

    influxdb-client's ``Point.time(datetime, MS)`` goes through a float and
    truncates: about one whole-millisecond timestamp in eight comes out 1 ms
    early, and a point's timestamp is its identity. Integer arithmetic is exact.
    """
    return (ts - _EPOCH) // _MS


def _point(measurement: str, tags: dict[str, str], fields: dict[str, Any], ts: datetime) -> bytes:
    point = Point(measurement)
    for key, value in tags.items():
        point.tag(key, value)
    for key, value in fields.items():
        if value is None:
            continue
        # bool is an int subclass: keep it boolean; every other number becomes a float.
        point.field(key, value if isinstance(value, bool | str) else float(value))
    point.time(epoch_ms(ts), WritePrecision.MS)
    return point.to_line_protocol().encode()


def telemetry_lines(batch: TelemetryBatch) -> list[bytes]:
    lines = []
    for reading in batch.readings:
        fields = {
            name: getattr(reading, name)
            for name in type(reading).model_fields
            if name not in _READING_ENVELOPE
        }
        lines.append(
            _point(reading.kind, {"site": batch.site, "device": reading.device}, fields, reading.ts)
        )
    return lines


def decision_lines(decision: Decision) -> list[bytes]:
    return [
        _point(
            "decision",
            {
                "site": decision.site,
                "device": decision.device,
                "strategy": decision.strategy,
                "action": decision.action.value,
            },
            {
                "power_kw": decision.power_kw,
                "grid_energy_kwh": decision.grid_energy_kwh,
                "price_per_kwh": decision.price_per_kwh,
                "expected_revenue": decision.expected_revenue,
                "soc_pct": decision.soc_pct,
                "expected_soc_pct": decision.expected_soc_pct,
                "decision_id": decision.decision_id,
                "reason": decision.reason,
            },
            decision.valid_from,
        )
    ]


def price_lines(tick: PriceTick) -> list[bytes]:
    return [
        _point(
            "price",
            {"market": tick.market, "price_kind": tick.price_kind.value, "currency": tick.currency},
            {"price_per_kwh": tick.price_per_kwh},
            tick.start,
        )
    ]


LINES_BY_SCHEMA: dict[type[BaseModel], Callable[[Any], list[bytes]]] = {
    TelemetryBatch: telemetry_lines,
    Decision: decision_lines,
    PriceTick: price_lines,
}
