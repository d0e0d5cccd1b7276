"""Terminal output for humans: live progress and summary tables (rich)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, Self

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from pipeline.demo import DemoResult
    from pipeline.demo import Progress as DemoState
    from pipeline.demo_ev import EvChargingResult

# Off a terminal (CI logs, pipes) rich assumes 80 columns and truncates the table.
console = Console() if sys.stdout.isatty() else Console(width=120)


class DemoProgress:
    """A live progress display of the demo; a no-op when disabled (``--json``)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self._replay = self._progress.add_task("readings sent", total=None, note="")
        self._sink = self._progress.add_task("points written", total=None, note="")

    def update(self, state: DemoState) -> None:
        self._progress.update(
            self._replay,
            completed=state.readings_sent,
            total=state.readings_total or None,
            note=state.stage,
        )
        self._progress.update(self._sink, completed=state.points_written, note="")

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()


def print_demo_result(result: DemoResult) -> None:
    summary = result.summary
    table = Table(title="Arbitrage decisions (threshold strategy)", title_justify="left")
    for column in (
        "site",
        "decisions",
        "CHARGE",
        "DISCHARGE",
        "HOLD",
        "charged kWh",
        "discharged kWh",
    ):
        table.add_column(column, justify="right" if column != "site" else "left")
    table.add_column(f"revenue {summary.currency}", justify="right")
    for site, per_site in sorted(summary.by_site.items()):
        table.add_row(
            site,
            str(per_site.decisions),
            *(str(per_site.by_action.get(a, 0)) for a in ("CHARGE", "DISCHARGE", "HOLD")),
            f"{per_site.energy_charged_kwh:,.1f}",
            f"{per_site.energy_discharged_kwh:,.1f}",
            f"{per_site.revenue:,.2f}",
        )
    table.add_section()
    table.add_row(
        "[bold]total",
        f"[bold]{summary.decisions}",
        *(f"[bold]{summary.by_action.get(a, 0)}" for a in ("CHARGE", "DISCHARGE", "HOLD")),
        f"[bold]{summary.energy_charged_kwh:,.1f}",
        f"[bold]{summary.energy_discharged_kwh:,.1f}",
        f"[bold]{summary.revenue:,.2f}",
    )
    console.print(table)
    if result.carbon:
        console.print(_carbon_table(result))
    if result.ev_charging is not None:
        console.print(_ev_table(result.ev_charging))
    console.print(
        f"readings replayed {result.readings_replayed:,} (bad rows {result.bad_rows}), "
        f"prices {result.prices_replayed}, dead letters {result.dead_letters}, "
        f"points written {result.points_written:,} to {result.influx_target}, "
        f"in {result.elapsed_s:.1f} s"
    )
    if result.report_path is not None:
        console.print(f"report with charts: {result.report_path}")


def _carbon_table(result: DemoResult) -> Table:
    table = Table(
        title="Scope 2 (location- and market-based), 24/7 clean share, certificates",
        title_justify="left",
    )
    for column in (
        "site",
        "hours",
        "consumed kWh",
        "from grid kWh",
        "location kg CO2",
        "market kg CO2",
        "clean %",
        "certs minted MWh",
        "burned MWh",
        "follow-the-sun windows",
    ):
        table.add_column(column, justify="right" if column != "site" else "left")
    for site, c in result.carbon.items():
        table.add_row(
            site,
            str(c.hours),
            f"{c.consumption_kwh:,.1f}",
            f"{c.grid_kwh:,.1f}",
            f"{c.location_based_kg_co2:,.1f}",
            f"{c.market_based_kg_co2:,.1f}",
            f"{c.clean_share_pct:.1f}",
            f"{c.minted_mwh:.3f}",
            f"{c.burned_mwh:.3f}",
            str(c.follow_sun_windows),
        )
    return table


def _ev_table(ev: EvChargingResult) -> Table:
    local = f"{ev.start:%Y-%m-%d %H:%M} UTC"
    table = Table(
        title=f"EV charging over OCPP from {local}: fleet setpoints -> charging profiles "
        f"(the setpoints of one step at most {ev.peak_setpoints_kw:.1f} kW together)",
        title_justify="left",
    )
    for column in (
        "charge point",
        "OCPP",
        "vehicle",
        "sessions",
        "kWh",
        "setpoints",
        "profiles sent",
        "not applied",
        "mean limit kW",
        "reports within limit",
    ):
        table.add_column(
            column, justify="left" if column in ("charge point", "vehicle") else "right"
        )
    for c in ev.chargers:
        table.add_row(
            c.charge_point_id,
            c.protocol,
            c.vehicle_id,
            str(c.sessions),
            f"{c.energy_kwh:,.1f}",
            str(c.setpoints),
            str(c.profiles_sent),
            str(c.not_applied),
            "-" if c.mean_limit_kw is None else f"{c.mean_limit_kw:.1f}",
            f"{c.reports_under_limit}/{c.reports_checked}",
        )
    return table
