"""``wattstream certificates``: each site's guarantee-of-origin ledger, from its topic.

The ledger is rebuilt from every event on the certificates topic (applied idempotently,
so duplicates from a replay or a restart count once): the active balance per site, and
the energy minted, burned and expired per day or month.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from pipeline import codec, kafka, topics
from pipeline.schemas import CertificateEvent
from processors.certificates import (
    CertificateStatus,
    balance,
    ledgers_from_events,
    period_starts,
    summaries,
)

if TYPE_CHECKING:
    from pipeline.cli import Context


def ledger_report(
    events: list[CertificateEvent], sites: tuple[str, ...], by: str
) -> dict[str, Any]:
    """Per site: balance, certificate counts by status, and minted/burned/expired per period."""
    report: dict[str, Any] = {}
    for site, ledger in ledgers_from_events(events).items():
        if sites and site not in sites:
            continue
        statuses = [status for status, _ in ledger.statuses().values()]
        instants = [e.hour_start for e in ledger.events] + [e.at for e in ledger.events]
        # Periods up to and including the last instant (summary's intervals are half-open).
        bounds = period_starts(min(instants), max(instants) + timedelta(microseconds=1), by)
        periods = []
        for start, part in zip(bounds, summaries(ledger, bounds), strict=False):
            if part.minted_mwh or part.burned_mwh or part.expired_mwh:
                periods.append(
                    {
                        "start": start.isoformat(),
                        "minted_mwh": round(part.minted_mwh, 6),
                        "burned_mwh": round(part.burned_mwh, 6),
                        "expired_mwh": round(part.expired_mwh, 6),
                    }
                )
        report[site] = {
            "balance_mwh": round(balance(ledger), 6),
            "certificates": {s.value: statuses.count(s) for s in CertificateStatus},
            "periods": periods,
        }
    return report


@click.command("certificates")
@click.option("--site", "sites", multiple=True, help="Only these sites (repeatable).")
@click.option(
    "--by",
    type=click.Choice(["day", "month"]),
    default="day",
    show_default=True,
    help="Period of the minted/burned/expired totals (UTC).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def certificates(obj: Context, sites: tuple[str, ...], by: str, as_json: bool) -> None:
    """Each site's guarantee-of-origin ledger, rebuilt from the certificates topic."""
    settings = obj.settings()
    if settings.embedded_broker:
        click.echo(
            "wattstream: certificates reads the certificates topic of a running broker: set "
            "WATTSTREAM_BROKER (the embedded broker keeps nothing between runs)",
            err=True,
        )
        sys.exit(2)
    records = asyncio.run(kafka.read_all(settings, topics.CERTIFICATES))
    events = [codec.decode(CertificateEvent, value) for _, value in records]
    report = ledger_report(events, sites, by)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    console = Console()
    if not report:
        console.print("no certificate events" + (f" for {', '.join(sites)}" if sites else ""))
        return
    for site, entry in report.items():
        counts = ", ".join(f"{n} {status}" for status, n in entry["certificates"].items() if n)
        table = Table(
            title=f"{site}: balance {entry['balance_mwh']:g} MWh ({counts})", title_justify="left"
        )
        for column in (by, "minted MWh", "burned MWh", "expired MWh"):
            table.add_column(column, justify="left" if column == by else "right")
        for period in entry["periods"]:
            start = datetime.fromisoformat(period["start"]).astimezone(UTC)
            table.add_row(
                start.strftime("%Y-%m-%d" if by == "day" else "%Y-%m"),
                f"{period['minted_mwh']:g}",
                f"{period['burned_mwh']:g}",
                f"{period['expired_mwh']:g}",
            )
        console.print(table)
