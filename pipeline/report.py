"""Summaries of what the pipeline decided, for the terminal and ``--json``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeline.schemas import (
    Action,
    Alert,
    AlertStatus,
    CertificateAction,
    CertificateEvent,
    Decision,
    EmissionsRecord,
)
from processors.carbon import daily_clean_share_pct


@dataclass
class DecisionSummary:
    decisions: int = 0
    by_action: Counter[str] = field(default_factory=Counter)
    energy_charged_kwh: float = 0.0
    """Bought from the grid to charge. [kWh]"""
    energy_discharged_kwh: float = 0.0
    """Sold to the grid from discharge. [kWh]"""
    revenue: float = 0.0
    """Expected net revenue: sales minus purchases, in ``currency``."""
    currency: str = "EUR"
    by_site: dict[str, DecisionSummary] = field(default_factory=dict)

    def add(self, decision: Decision) -> None:
        self.decisions += 1
        self.by_action[decision.action.value] += 1
        if decision.action is Action.CHARGE:
            self.energy_charged_kwh += -decision.grid_energy_kwh
        elif decision.action is Action.DISCHARGE:
            self.energy_discharged_kwh += decision.grid_energy_kwh
        self.revenue += decision.expected_revenue
        self.currency = decision.currency

    def as_dict(self) -> dict[str, object]:
        result: dict[str, object] = {
            "decisions": self.decisions,
            "by_action": {action.value: self.by_action.get(action.value, 0) for action in Action},
            "energy_charged_kwh": round(self.energy_charged_kwh, 3),
            "energy_discharged_kwh": round(self.energy_discharged_kwh, 3),
            "revenue": round(self.revenue, 2),
            "currency": self.currency,
        }
        if self.by_site:
            result["by_site"] = {site: s.as_dict() for site, s in sorted(self.by_site.items())}
        return result


def summarize(decisions: Iterable[Decision]) -> DecisionSummary:
    total = DecisionSummary()
    for decision in decisions:
        total.add(decision)
        total.by_site.setdefault(decision.site, DecisionSummary()).add(decision)
    return total


@dataclass
class SiteCarbon:
    """A site's Scope 2 over the records read, and its certificate ledger's events."""

    hours: int = 0
    consumption_kwh: float = 0.0
    grid_kwh: float = 0.0
    location_based_kg_co2: float = 0.0
    market_based_kg_co2: float = 0.0
    clean_kwh: float = 0.0
    minted_mwh: float = 0.0
    burned_mwh: float = 0.0
    expired_mwh: float = 0.0
    follow_sun_windows: int = 0
    daily_clean_share_pct: dict[str, float] = field(default_factory=dict)
    """Hourly-matched clean share per UTC day (ISO date), weighted by consumption. [%]"""

    @property
    def clean_share_pct(self) -> float:
        """Hourly-matched (24/7) clean share over the whole period. [%]"""
        return 100.0 * self.clean_kwh / self.consumption_kwh if self.consumption_kwh else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "hours": self.hours,
            "consumption_kwh": round(self.consumption_kwh, 3),
            "grid_kwh": round(self.grid_kwh, 3),
            "location_based_kg_co2": round(self.location_based_kg_co2, 3),
            "market_based_kg_co2": round(self.market_based_kg_co2, 3),
            "clean_share_pct": round(self.clean_share_pct, 2),
            "certificates_minted_mwh": round(self.minted_mwh, 6),
            "certificates_burned_mwh": round(self.burned_mwh, 6),
            "certificates_expired_mwh": round(self.expired_mwh, 6),
            "follow_sun_windows": self.follow_sun_windows,
            "daily_clean_share_pct": {
                day: round(share, 2) for day, share in self.daily_clean_share_pct.items()
            },
        }


def summarize_carbon(
    records: Iterable[EmissionsRecord],
    certificate_events: Iterable[CertificateEvent],
    alerts: Iterable[Alert] = (),
) -> dict[str, SiteCarbon]:
    """Per site: Scope 2 totals, certificate energy by action, follow-the-sun windows.

    Records and events are counted once per id: the topics are at-least-once.
    """
    sites: dict[str, SiteCarbon] = {}
    by_site: dict[str, list[EmissionsRecord]] = {}
    seen: set[str] = set()
    for record in records:
        if record.record_id in seen:
            continue
        seen.add(record.record_id)
        site = sites.setdefault(record.site, SiteCarbon())
        load_kwh = record.grid_energy_kwh + record.solar_energy_kwh + record.battery_energy_kwh
        site.hours += 1
        site.consumption_kwh += load_kwh
        site.grid_kwh += record.grid_energy_kwh
        site.location_based_kg_co2 += record.location_based_kg_co2
        site.market_based_kg_co2 += record.market_based_kg_co2
        site.clean_kwh += load_kwh * record.clean_share_pct / 100.0
        by_site.setdefault(record.site, []).append(record)
    for site_id, site_records in by_site.items():
        sites[site_id].daily_clean_share_pct = {
            day.isoformat(): share for day, share in daily_clean_share_pct(site_records).items()
        }
    for event in certificate_events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        site = sites.setdefault(event.site, SiteCarbon())
        if event.action is CertificateAction.MINT:
            site.minted_mwh += event.energy_mwh
        elif event.action is CertificateAction.BURN:
            site.burned_mwh += event.energy_mwh
        else:
            site.expired_mwh += event.energy_mwh
    windows = {
        (a.site, a.alert_id)
        for a in alerts
        if a.alert_type == "follow_the_sun" and a.status is AlertStatus.FIRING
    }
    for site_id, _ in windows:
        sites.setdefault(site_id, SiteCarbon()).follow_sun_windows += 1
    return dict(sorted(sites.items()))
