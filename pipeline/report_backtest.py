"""A self-contained HTML report of a backtest: prices, state of charge, actions, revenue.

matplotlib SVG inlined in the page, as the demo report does, so it opens
anywhere with nothing to load.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from matplotlib.figure import Figure

from processors.backtest import BacktestResult

_COLOURS = {
    "threshold": "#e9c46a",
    "optimal": "#2a9d8f",
    "mpc": "#e76f51",
    "perfect foresight": "#264653",
}
_FORESIGHT = {
    "day-ahead": "Each strategy decides with the prices published by then (day-ahead: "
    "today's, and tomorrow's after the auction).",
    "none": "No price is known ahead: each decision sees the prices up to and including "
    "its own interval, nothing after.",
}


# Intervals drawn in the price, state-of-charge and power charts: a year of quarter-hours
# would be a page of tens of megabytes in which no single decision can be seen.
MAX_DETAIL_INTERVALS = 14 * 96
# Points of the cumulative revenue line, which covers the whole history.
MAX_REVENUE_POINTS = 4000


def _chart(result: BacktestResult) -> str:
    runs = {**result.strategies, "perfect foresight": result.bound}
    capacity = result.battery.capacity_kwh
    first = max(0, len(result.starts) - MAX_DETAIL_INTERVALS)
    times = result.starts[first:]
    stride = max(1, len(result.starts) // MAX_REVENUE_POINTS)
    figure = Figure(figsize=(11, 12), layout="constrained")
    price_axes, soc_axes, power_axes, revenue_axes = figure.subplots(4, 1)
    power_axes.sharex(price_axes)
    soc_axes.sharex(price_axes)
    price_axes.step(
        times, result.prices_per_kwh[first:], where="post", color="#264653", linewidth=0.8
    )
    price_axes.set_ylabel("price [/kWh]")
    price_axes.axhline(0, color="#999", linewidth=0.5)
    if first:
        price_axes.set_title(f"the last {len(times):,} of {len(result.starts):,} intervals")
    for name, run in runs.items():
        colour = _COLOURS.get(name, "#6c757d")
        soc_axes.plot(
            times,
            [100 * s / capacity for s in run.stored_kwh[first:]],
            color=colour,
            linewidth=0.8,
        )
        power_axes.step(times, run.power_kw[first:], where="post", color=colour, linewidth=0.6)
        revenue_axes.plot(
            result.starts[::stride], run.cumulative_revenue[::stride], color=colour, label=name
        )
    soc_axes.set_ylabel("state of charge [%]")
    soc_axes.set_ylim(0, 100)
    power_axes.set_ylabel("grid power [kW]\n+ sold, - bought")
    revenue_axes.set_ylabel("cumulative revenue\n(whole history)")
    revenue_axes.legend(loc="upper left")
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def write_backtest_report(result: BacktestResult, path: Path) -> Path:
    summary = result.to_json()
    bound = result.bound.revenue
    rows = []
    for name, run in [*result.strategies.items(), ("perfect foresight", result.bound)]:
        share = f"{run.revenue / bound:.1%}" if bound > 1e-9 else "-"
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{run.revenue:,.2f}</td><td>{share}</td>"
            f"<td>{run.energy_bought_kwh:,.0f}</td><td>{run.energy_sold_kwh:,.0f}</td>"
            f"<td>{run.equivalent_cycles:,.1f}</td></tr>"
        )
    battery = result.battery
    forecast = ""
    if result.forecast_mae_by_horizon:
        cells = "".join(
            f"<td>{'-' if v is None else f'{v:.4f}'}</td>"
            for v in result.forecast_mae_by_horizon.values()
        )
        heads = "".join(f"<th>{html.escape(k)}</th>" for k in result.forecast_mae_by_horizon)
        forecast = (
            "<h2>The mpc forecaster</h2><p>Mean absolute error of its price forecasts "
            "(per kWh), by how far ahead they were made; learnt from past prices only.</p>"
            f"<table><tr>{heads}</tr><tr>{cells}</tr></table>"
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wattstream backtest</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }} th {{ border-bottom: 1px solid #999; }}
svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>Backtest</h1>
<p>{summary["intervals"]} prices over {result.hours:,.0f} h ({html.escape(str(summary["first"]))}
to {html.escape(str(summary["last"]))}); battery {battery.capacity_kwh:g} kWh,
{battery.max_charge_kw:g}/{battery.max_discharge_kw:g} kW, round trip
{battery.round_trip_efficiency:.0%}; foresight <b>{html.escape(result.foresight)}</b>.
{_FORESIGHT.get(result.foresight, "")} The perfect-foresight optimum knows every price
and is the bound none can beat.
Revenue is grid cash flow: energy sold minus energy bought, at each interval's price.</p>
<table><tr><th>strategy</th><th>revenue</th><th>of bound</th><th>bought kWh</th>
<th>sold kWh</th><th>cycles</th></tr>{"".join(rows)}</table>
{forecast}
{_chart(result)}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
