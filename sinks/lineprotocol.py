"""Messages -> InfluxDB line protocol, one small function per message type.

The schema (documented in the README, read by the Grafana dashboards): one
measurement per thing measured, low-cardinality tags (site, device and
kind-like labels), values as fields, and the timestamp taken from the message,
so writing a message twice stores one point. Timestamps are in nanoseconds
(the sink writes ``precision=ns``).

Events that can share a millisecond (alerts, certificate events, commands)
get a sub-millisecond offset derived from their own id, so two events are two
points while the same event written twice is still one.

Serialisation is influxdb-client's ``Point``: escaping and number formats are
the library's, not ours. (Telemetry, the bulk of the volume, also has a
columnar encoder, :mod:`sinks.columnar`, checked against this one.)

Floats are written as floats even when whole (``5.0``, never ``5i``):
InfluxDB rejects a field whose type changes between writes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from influxdb_client import Point, WritePrecision
from pydantic import BaseModel

from pipeline.schemas import (
    Alert,
    AlertStatus,
    AllocationPlan,
    CarbonIntensity,
    CertificateEvent,
    ChargingSessionEvent,
    Command,
    Decision,
    EmissionsRecord,
    Patent,
    PriceTick,
    SourceFlow,
    TelemetryBatch,
)

READING_ENVELOPE = frozenset({"kind", "device", "ts"})
"""Reading attributes that are the measurement, a tag and the timestamp, not fields."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_NS_PER_MS = 1_000_000


def epoch_ns(ts: datetime) -> int:
    """Nanoseconds since the epoch, exactly (datetimes hold microseconds).

    influxdb-client's ``Point.time(datetime)`` goes through a float and
    truncates: about one whole-millisecond timestamp in eight comes out 1 ms
    early, and a point's timestamp is its identity. Integer arithmetic is exact.
    """
    return (ts - _EPOCH) // _US * 1000


def event_ns(ts: datetime, event_id: str) -> int:
    """``ts`` plus a deterministic sub-millisecond offset taken from ``event_id``."""
    return epoch_ns(ts) + zlib.crc32(event_id.encode()) % _NS_PER_MS


def point_line(
    measurement: str, tags: Mapping[str, str | None], fields: Mapping[str, Any], time_ns: int
) -> bytes:
    point = Point(measurement)
    for key, tag in tags.items():
        if tag is not None:
            point.tag(key, tag)
    for key, value in fields.items():
        if value is None:
            continue
        # bool is an int subclass: keep it boolean; every other number becomes a float.
        point.field(key, value if isinstance(value, bool | str) else float(value))
    point.time(time_ns, WritePrecision.NS)
    return point.to_line_protocol().encode()


def telemetry_lines(batch: TelemetryBatch) -> list[bytes]:
    lines = []
    for reading in batch.readings:
        fields = {
            name: getattr(reading, name)
            for name in type(reading).model_fields
            if name not in READING_ENVELOPE
        }
        lines.append(
            point_line(
                reading.kind,
                {"site": batch.site, "device": reading.device},
                fields,
                epoch_ns(reading.ts),
            )
        )
    return lines


def decision_lines(decision: Decision) -> list[bytes]:
    return [
        point_line(
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
            epoch_ns(decision.valid_from),
        )
    ]


def price_lines(tick: PriceTick) -> list[bytes]:
    return [
        point_line(
            "price",
            {"market": tick.market, "price_kind": tick.price_kind.value, "currency": tick.currency},
            {"price_per_kwh": tick.price_per_kwh},
            epoch_ns(tick.start),
        )
    ]


def carbon_lines(intensity: CarbonIntensity) -> list[bytes]:
    return [
        point_line(
            "carbon_intensity",
            {"zone": intensity.zone, "source": intensity.source},
            {
                "co2_g_per_kwh": intensity.co2_g_per_kwh,
                "renewable_share_pct": intensity.renewable_share_pct,
            },
            epoch_ns(intensity.start),
        )
    ]


def alert_lines(alert: Alert) -> list[bytes]:
    # A resolved alert is a point at its end, so a panel shows when it fired and when it cleared.
    at = alert.end if alert.status is AlertStatus.RESOLVED and alert.end else alert.start
    numeric_details = {
        f"detail_{key}": value
        for key, value in alert.details.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    return [
        point_line(
            "alert",
            {
                "site": alert.site,
                "device": alert.device,
                "alert_type": alert.alert_type,
                "severity": alert.severity.value,
                "status": alert.status.value,
            },
            {
                "alert_id": alert.alert_id,
                "subject": alert.subject,
                "message": alert.message,
                "observed": alert.observed,
                "expected": alert.expected,
                **numeric_details,
            },
            event_ns(at, f"{alert.alert_id}/{alert.status.value}"),
        )
    ]


def _flows_kw(flows: list[SourceFlow]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for flow in flows:
        key = f"{flow.source}_kw"
        totals[key] = totals.get(key, 0.0) + flow.power_kw
    return totals


def allocation_lines(plan: AllocationPlan) -> list[bytes]:
    time_ns = epoch_ns(plan.start)
    lines = [
        point_line(
            "allocation_plan",
            {"site": plan.site, "currency": plan.currency},
            {
                "grid_cost": plan.grid_cost,
                "export_revenue": plan.export_revenue,
                "net_cost": plan.net_cost,
                "baseline_net_cost": plan.baseline_net_cost,
                "saving": plan.saving,
                "plan_id": plan.plan_id,
                **_flows_kw(plan.sources),
            },
            time_ns,
        )
    ]
    for allocation in plan.allocations:
        lines.append(
            point_line(
                "allocation",
                {
                    "site": plan.site,
                    "consumer": allocation.consumer,
                    "priority": str(allocation.priority),
                },
                {
                    "requested_kw": allocation.requested_kw,
                    "allocated_kw": allocation.allocated_kw,
                    "unserved_kw": allocation.requested_kw - allocation.allocated_kw,
                    **_flows_kw(allocation.sources),
                },
                time_ns,
            )
        )
    return lines


def emissions_lines(record: EmissionsRecord) -> list[bytes]:
    return [
        point_line(
            "emissions",
            {"site": record.site},
            {
                "grid_energy_kwh": record.grid_energy_kwh,
                "solar_energy_kwh": record.solar_energy_kwh,
                "battery_energy_kwh": record.battery_energy_kwh,
                "grid_co2_g_per_kwh": record.grid_co2_g_per_kwh,
                "location_based_kg_co2": record.location_based_kg_co2,
                "market_based_kg_co2": record.market_based_kg_co2,
                "clean_share_pct": record.clean_share_pct,
            },
            epoch_ns(record.start),
        )
    ]


def certificate_lines(event: CertificateEvent) -> list[bytes]:
    return [
        point_line(
            "certificate",
            {"site": event.site, "device": event.device, "action": event.action.value},
            {
                "energy_mwh": event.energy_mwh,
                "certificate_id": event.certificate_id,
                "claimed_by": event.claimed_by,
                "hour_start": event.hour_start.isoformat(),
            },
            event_ns(event.at, event.event_id),
        )
    ]


def command_lines(command: Command) -> list[bytes]:
    return [
        point_line(
            "command",
            {
                "site": command.site,
                "device": command.device,
                "action": command.action,
                "dry_run": "true" if command.dry_run else "false",
            },
            {
                "setpoint_kw": command.setpoint_kw,
                "command_id": command.command_id,
                "reason": command.reason,
                "source_id": command.source_id,
            },
            event_ns(command.issued_at, command.command_id),
        )
    ]


def session_lines(event: ChargingSessionEvent) -> list[bytes]:
    return [
        point_line(
            "ev_session",
            {
                "site": event.site,
                "device": event.device,
                "charge_point_id": event.charge_point_id,
                "event_type": event.event_type.value,
            },
            {
                "energy_kwh": event.energy_kwh,
                "import_energy_kwh": event.import_energy_kwh,
                "event_id": event.event_id,
                "transaction_id": event.transaction_id,
                "stop_reason": event.stop_reason,
                "id_token_hash": event.id_token_hash,
            },
            event_ns(event.ts, event.event_id),
        )
    ]


def patent_lines(patent: Patent) -> list[bytes]:
    """A ``patent`` point at its publication date (00:00 UTC): what the watch has read."""
    published = datetime(
        patent.publication_date.year,
        patent.publication_date.month,
        patent.publication_date.day,
        tzinfo=UTC,
    )
    return [
        point_line(
            "patent",
            {"office": patent.office.value, "country": patent.country, "kind": patent.kind},
            {
                "patent_id": patent.patent_id,
                "title": patent.title,
                "cpc": " ".join(patent.cpc),
                "applicants": "; ".join(patent.applicants),
                "claims": len(patent.claims),
                "citations": len(patent.citations),
                "non_patent_citations": patent.non_patent_citations,
            },
            event_ns(published, patent.patent_id),
        )
    ]


LINES_BY_SCHEMA: dict[type[BaseModel], Callable[[Any], list[bytes]]] = {
    TelemetryBatch: telemetry_lines,
    PriceTick: price_lines,
    CarbonIntensity: carbon_lines,
    Decision: decision_lines,
    Alert: alert_lines,
    AllocationPlan: allocation_lines,
    EmissionsRecord: emissions_lines,
    CertificateEvent: certificate_lines,
    Command: command_lines,
    ChargingSessionEvent: session_lines,
    Patent: patent_lines,
}
