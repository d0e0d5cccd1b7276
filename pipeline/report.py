"""Summaries of what the pipeline decided, for the terminal and ``--json``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeline.schemas import Action, Decision


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
