"""Alert incidents shared by every detector: deterministic ids, firing and resolved events.

An incident is one stretch of time during which a condition holds on a device
(a stuck sensor, a vampire load, a SCRAM). Its id is derived from what
identifies it in the data (site, device, type and the instant it began), never
from the wall clock, so a replay or a restarted worker raises the same alert
id and the webhook sink sends it once. The firing event and the resolved
event share the id; the resolved one carries ``end``.

Plain Python, no Faust import.
"""

from __future__ import annotations

from datetime import datetime

from pipeline.schemas import Alert, AlertStatus, Severity, stable_id

DetailValue = float | str | bool


def incident_id(site: str, device: str | None, alert_type: str, start: datetime) -> str:
    """The id of the incident of ``alert_type`` on ``device`` that began at ``start``."""
    return stable_id("alert", site, device or "", alert_type, start.isoformat())


def firing(
    *,
    site: str,
    device: str | None,
    alert_type: str,
    severity: Severity,
    subject: str,
    message: str,
    start: datetime,
    observed: float | None = None,
    expected: float | None = None,
    details: dict[str, DetailValue] | None = None,
) -> Alert:
    """The event that opens an incident."""
    return Alert(
        alert_id=incident_id(site, device, alert_type, start),
        site=site,
        device=device,
        alert_type=alert_type,
        severity=severity,
        status=AlertStatus.FIRING,
        subject=subject,
        message=message,
        start=start,
        observed=observed,
        expected=expected,
        details=details or {},
    )


def resolved(alert: Alert, end: datetime, details: dict[str, DetailValue] | None = None) -> Alert:
    """The event that closes ``alert``'s incident at ``end`` (same id, status resolved)."""
    merged = {**alert.details, **(details or {})}
    return alert.model_copy(update={"status": AlertStatus.RESOLVED, "end": end, "details": merged})
