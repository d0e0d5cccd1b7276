"""A self-contained HTML report of the decisions: a summary table and charts per site.

Charts are matplotlib SVG inlined in the page, so the file opens anywhere with
nothing to load from the network.
"""

from __future__ import annotations

import html
import io
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from itertools import accumulate
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.report import DecisionSummary, summarize
from pipeline.schemas import Action, Decision

ACTION_COLOURS = {Action.CHARGE: "#2a9d8f", Action.DISCHARGE: "#e76f51", Action.HOLD: "#adb5bd"}


def _site_chart(decisions: list[Decision]) -> str:
    times: list[datetime] = [d.valid_from for d in decisions]
    figure = Figure(figsize=(11, 6.5), layout="constrained")
    price_axes, energy_axes, revenue_axes = figure.subplots(3, 1, sharex=True)

    price_axes.step(times, [d.price_per_kwh for d in decisions], where="post", color="#264653")
    price_axes.set_ylabel(f"price [{decisions[0].currency}/kWh]")
    price_axes.axhline(0, color="#999", linewidth=0.5)

    widths = [(d.valid_until - d.valid_from) * 0.9 for d in decisions]
    energy_axes.bar(
        times,
        [d.grid_energy_kwh for d in decisions],
        width=widths,  # timedelta widths: matplotlib converts them on a date axis
        align="edge",
        color=[ACTION_COLOURS[d.action] for d in decisions],
    )
    energy_axes.set_ylabel("grid energy [kWh]\n+ sold, - bought")
    soc_axes = energy_axes.twinx()
    soc_axes.plot(times, [d.soc_pct for d in decisions], color="#6c757d", linewidth=1)
    soc_axes.set_ylabel("measured SoC [%]")
    soc_axes.set_ylim(0, 100)

    revenue_axes.plot(
        times, list(accumulate(d.expected_revenue for d in decisions)), color="#264653"
    )
    revenue_axes.set_ylabel(f"cumulative expected\nrevenue [{decisions[0].currency}]")
    revenue_axes.axhline(0, color="#999", linewidth=0.5)

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def _table(summary: DecisionSummary) -> str:
    rows = []
    for site, s in [*sorted(summary.by_site.items()), ("total", summary)]:
        cells = [
            html.escape(site),
            str(s.decisions),
            *(str(s.by_action.get(a.value, 0)) for a in Action),
            f"{s.energy_charged_kwh:,.1f}",
            f"{s.energy_discharged_kwh:,.1f}",
            f"{s.revenue:,.2f}",
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = (
        "<tr><th>site</th><th>decisions</th><th>CHARGE</th><th>DISCHARGE</th><th>HOLD</th>"
        f"<th>charged kWh</th><th>discharged kWh</th><th>revenue {summary.currency}</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def write_report(decisions: Iterable[Decision], path: Path, title: str = "wattstream demo") -> Path:
    """Write the report; return its path."""
    by_site: dict[str, list[Decision]] = defaultdict(list)
    ordered = sorted(decisions, key=lambda d: (d.site, d.device, d.valid_from))
    for decision in ordered:
        by_site[f"{decision.site} / {decision.device}"].append(decision)
    sections = "".join(
        f"<h2>{html.escape(name)}</h2>{_site_chart(items)}" for name, items in by_site.items()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }} tr:last-child {{ font-weight: bold; }}
th {{ border-bottom: 1px solid #999; }} svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Threshold arbitrage decisions, one per battery per price interval. Bars: grid energy of
each decision (green charge, orange discharge, grey hold); line: the state of charge the
telemetry reported. Revenue is the sum of each decision's expected value (grid energy x
price), not a simulated battery trajectory.</p>
{_table(summarize(ordered))}
{sections}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
