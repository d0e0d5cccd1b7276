"""``wattstream backtest``: every arbitrage strategy over a price history, against the bound.

No broker: the strategies' decision code runs over the file directly (see
:mod:`processors.backtest`). The file is read strictly (:mod:`ingest.price_history`:
true instants across DST, one step, gaps kept as gaps). The result is a table and a
self-contained HTML report, or JSON with ``--json``.
"""

from __future__ import annotations

import json
import sys
from datetime import time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from ingest.price_history import PriceHistoryError, load_price_history
from pipeline.report_backtest import write_backtest_report
from processors.backtest import FORESIGHTS, STRATEGIES, Publication, run_backtest
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
    "--foresight",
    type=click.Choice(FORESIGHTS),
    default="day-ahead",
    show_default=True,
    help="What a decision knows: day-ahead = the prices published by then (the file's "
    "published_at, or the auction at --publication-time the day before); none = the "
    "prices up to and including its own interval only.",
)
@click.option(
    "--market-timezone",
    default="Europe/Brussels",
    show_default=True,
    callback=_zone,
    help="Time zone of the market's delivery days (day-ahead publication).",
)
@click.option(
    "--publication-time",
    default="13:00",
    show_default=True,
    callback=_clock,
    help="When the day before's auction publishes a day's prices (when the file does not say).",
)
@click.option(
    "--timezone",
    "time_zone",
    default=None,
    callback=lambda ctx, param, value: None if value is None else _zone(ctx, param, value),
    help="The clock of times written without a UTC offset (required for such files); the "
    "autumn hour that occurs twice and the spring hour that does not exist are handled.",
)
@click.option(
    "--mpc-horizon-h",
    type=click.FloatRange(min=1),
    default=48.0,
    show_default=True,
    help="How far ahead the mpc strategy plans (known prices, then its forecast). [h]",
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
    foresight: str,
    market_timezone: str,
    publication_time: time,
    time_zone: str | None,
    mpc_horizon_h: float,
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
        history = load_price_history(prices_path, timezone=time_zone)
    except (PriceHistoryError, OSError) as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(EXIT_USAGE)
    points, skipped = history.points, history.skipped
    if skipped:
        click.echo(f"skipped {len(skipped)} rows with no price, e.g. {skipped[0]}", err=True)
    if history.gaps:
        missing = sum(g.missing_intervals for g in history.gaps)
        first = history.gaps[0]
        click.echo(
            f"warning: {len(history.gaps)} gaps ({missing:,} intervals without a price, "
            f"e.g. {first.start:%Y-%m-%d %H:%M} to {first.end:%Y-%m-%d %H:%M} UTC): "
            "nothing is traded in them, no price is invented",
            err=True,
        )
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
        publication=Publication(market_timezone, publication_time),
        charge_below_price_per_kwh=charge_below,
        discharge_above_price_per_kwh=discharge_above,
        progress=progress,
        foresight=foresight,  # type: ignore[arg-type]  # click.Choice(FORESIGHTS)
        mpc_horizon_h=mpc_horizon_h,
    )
    summary = result.to_json()
    summary["skipped_rows"] = len(skipped)
    summary["gaps"] = [
        {"start": g.start.isoformat(), "end": g.end.isoformat(), "missing": g.missing_intervals}
        for g in history.gaps
    ]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo("", err=True)
    bound = result.bound.revenue
    click.echo(
        f"{len(points):,} prices every {history.step / timedelta(minutes=1):g} min, "
        f"{result.hours:,.0f} h, {points[0].start:%Y-%m-%d} .. {points[-1].start:%Y-%m-%d}; "
        f"battery {capacity_kwh:g} kWh / {power_kw:g} kW, round trip "
        f"{round_trip_efficiency:.0%}; foresight {foresight}"
    )
    click.echo(
        f"{'strategy':<20}{'revenue':>14}{'of bound':>10}{'charged kWh':>13}"
        f"{'discharged kWh':>16}{'cycles':>9}"
    )
    for name, item in [*result.strategies.items(), ("perfect foresight", result.bound)]:
        share = f"{item.revenue / bound:.1%}" if bound > 1e-9 else "-"
        click.echo(
            f"{name:<20}{item.revenue:>14,.2f}{share:>10}{item.energy_bought_kwh:>13,.0f}"
            f"{item.energy_sold_kwh:>16,.0f}{item.equivalent_cycles:>9.1f}"
        )
    if result.forecast_mae_by_horizon:
        errors = ", ".join(
            f"{k} {'-' if v is None else f'{v:.4f}'}"
            for k, v in result.forecast_mae_by_horizon.items()
        )
        click.echo(f"mpc forecast mean absolute error per kWh by horizon: {errors}")
    click.echo(f"report: {write_backtest_report(result, report)}")
