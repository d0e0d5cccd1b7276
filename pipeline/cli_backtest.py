"""``wattstream backtest``: every arbitrage strategy over a price history, against the bound.

No broker: the strategies' decision code runs over the file directly (see
:mod:`processors.backtest`). The result is a table and a self-contained HTML
report, or JSON with ``--json``.
"""

from __future__ import annotations

import json
import sys
from datetime import time
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from ingest.prices import DocumentError, read_price_file
from pipeline.report_backtest import write_backtest_report
from processors.backtest import STRATEGIES, PricePoint, Publication, run_backtest
from processors.optimal import BatteryModel

EXIT_USAGE = 2


def _clock(_ctx: click.Context, _param: click.Parameter, value: str) -> time:
    try:
        return time.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a clock time like 13:00") from None


def _zone(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise click.BadParameter(f"unknown time zone {value!r}") from None
    return value


def read_history(path: Path, naive_zone: str = "UTC") -> tuple[list[PricePoint], list[str]]:
    """Price points of the file, sorted; and why each skipped row was skipped.

    Rows with a blank price are skipped (a history has holes); so is any other
    row that cannot be a price, with its row number in the reason. Times without
    a UTC offset are read on the clock of ``naive_zone``.
    """
    parsed = read_price_file(path, market="history", naive_zone=ZoneInfo(naive_zone))
    ticks = sorted(parsed.messages, key=lambda t: t.start)
    # A price is stored with published_at = start when the file does not say:
    # then the day-ahead publication model applies (Publication).
    explicit = any(t.published_at is not None and t.published_at != t.start for t in ticks)
    points: list[PricePoint] = []
    for tick in ticks:
        if points and tick.start == points[-1].start:
            continue  # a repeated hour (e.g. a DST artefact in the source): first one wins
        points.append(
            PricePoint(tick.start, tick.price_per_kwh, tick.published_at if explicit else None)
        )
    return points, [r.reason for r in parsed.rejected]


@click.command()
@click.option(
    "--prices",
    "prices_path",
    required=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="CSV (time, price_per_kwh; optional published_at), JSON or ENTSO-E XML.",
)
@click.option("--capacity-kwh", type=click.FloatRange(min=0, min_open=True), required=True)
@click.option(
    "--power-kw",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    help="Charge and discharge limit.",
)
@click.option(
    "--round-trip-efficiency",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.9,
    show_default=True,
)
@click.option("--initial-soc-pct", type=click.FloatRange(0, 100), default=50.0, show_default=True)
@click.option("--soc-min-pct", type=click.FloatRange(0, 100), default=0.0, show_default=True)
@click.option("--soc-max-pct", type=click.FloatRange(0, 100), default=100.0, show_default=True)
@click.option(
    "--degradation-cost-per-kwh",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Wear cost per kWh discharged, in the price's currency (optimal strategy and bound).",
)
@click.option(
    "--charge-below",
    type=float,
    help="Threshold rule: charge below this price (default: the past week's 30th percentile).",
)
@click.option(
    "--discharge-above",
    type=float,
    help="Threshold rule: discharge above this price (default: the past week's 70th percentile).",
)
@click.option(
    "--strategy",
    "strategies",
    type=click.Choice(STRATEGIES),
    multiple=True,
    help="Strategies to run (default: all).",
)
@click.option(
    "--timezone",
    "time_zone",
    default="Europe/Brussels",
    show_default=True,
    callback=_zone,
    help="Time zone of the market's delivery days.",
)
@click.option(
    "--publication-time",
    default="13:00",
    show_default=True,
    callback=_clock,
    help="When the day before's auction publishes a day's prices (when the file does not say).",
)
@click.option(
    "--naive-time-zone",
    default="UTC",
    show_default=True,
    callback=_zone,
    help="The clock of times written without a UTC offset.",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("out/backtest.html"),
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON, no report.")
def backtest(
    prices_path: Path,
    capacity_kwh: float,
    power_kw: float,
    round_trip_efficiency: float,
    initial_soc_pct: float,
    soc_min_pct: float,
    soc_max_pct: float,
    degradation_cost_per_kwh: float,
    charge_below: float | None,
    discharge_above: float | None,
    strategies: tuple[str, ...],
    time_zone: str,
    publication_time: time,
    naive_time_zone: str,
    report: Path,
    as_json: bool,
) -> None:
    """Run the arbitrage strategies over a price history and the perfect-foresight bound."""
    if not soc_min_pct < soc_max_pct:
        raise click.BadParameter(
            f"--soc-min-pct ({soc_min_pct}) must be below --soc-max-pct ({soc_max_pct})"
        )
    if (charge_below is None) != (discharge_above is None):
        raise click.BadParameter("give both --charge-below and --discharge-above, or neither")
    if charge_below is not None and discharge_above is not None and charge_below >= discharge_above:
        raise click.BadParameter("--charge-below must be below --discharge-above")
    try:
        points, skipped = read_history(prices_path, naive_time_zone)
    except (DocumentError, OSError) as error:
        click.echo(f"wattstream: {prices_path}: {error}", err=True)
        sys.exit(EXIT_USAGE)
    if not points:
        click.echo(f"wattstream: {prices_path}: no usable prices", err=True)
        sys.exit(EXIT_USAGE)
    if skipped:
        click.echo(f"skipped {len(skipped)} rows, e.g. {skipped[0]}", err=True)
    battery = BatteryModel(
        capacity_kwh=capacity_kwh,
        max_charge_kw=power_kw,
        max_discharge_kw=power_kw,
        round_trip_efficiency=round_trip_efficiency,
        floor_kwh=capacity_kwh * soc_min_pct / 100,
        ceiling_kwh=capacity_kwh * soc_max_pct / 100,
        degradation_cost_per_kwh=degradation_cost_per_kwh,
    )

    def progress(strategy: str, done: int, total: int) -> None:
        if not as_json and sys.stderr.isatty():
            click.echo(f"\r{strategy}: {done:,}/{total:,} intervals", nl=False, err=True)

    result = run_backtest(
        points,
        battery,
        initial_soc_pct=initial_soc_pct,
        strategies=strategies or STRATEGIES,
        publication=Publication(time_zone, publication_time),
        charge_below_price_per_kwh=charge_below,
        discharge_above_price_per_kwh=discharge_above,
        progress=progress,
    )
    summary = result.to_json()
    summary["skipped_rows"] = len(skipped)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo("", err=True)
    bound = result.bound.revenue
    click.echo(
        f"{len(points):,} prices, {result.hours:,.0f} h, {points[0].start:%Y-%m-%d} .. "
        f"{points[-1].start:%Y-%m-%d}; battery {capacity_kwh:g} kWh / {power_kw:g} kW, "
        f"round trip {round_trip_efficiency:.0%}"
    )
    click.echo(f"{'strategy':<20}{'revenue':>14}{'of bound':>10}{'cycles':>9}")
    for name, item in result.strategies.items():
        share = f"{item.revenue / bound:.1%}" if bound > 1e-9 else "-"
        click.echo(f"{name:<20}{item.revenue:>14,.2f}{share:>10}{item.equivalent_cycles:>9.1f}")
    click.echo(
        f"{'perfect foresight':<20}{bound:>14,.2f}{'100.0%':>10}"
        f"{result.bound.equivalent_cycles:>9.1f}"
    )
    click.echo(f"report: {write_backtest_report(result, report)}")
