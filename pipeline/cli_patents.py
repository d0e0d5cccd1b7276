"""``wattstream patents score|publish SOURCE...``: the deep-tech patent watch by hand.

``score`` reads patent publications (USPTO bulk XML, EPO OPS XML, WIPO ST.36 XML; files
or http(s) URLs) and prints each one's validity score, market class, the watchlists it
matched and the factors behind the score, with no broker. ``publish`` sends them to the
patents topic, where the worker's patent watch (``[patents]``) scores them and raises
alerts; documents that cannot be read go to the dead-letter topic with their reason.
Either way a malformed document is reported and the others are processed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ingest.patents import ParseResult
    from pipeline.cli import Context

EXIT_USAGE = 2
DEFAULT_SITE = "deeptech"
"""The alerts' site when the settings have no ``[patents]`` section."""


def _read(sources: tuple[str, ...]) -> list[ParseResult]:
    from ingest.patents import fetch_url, parse_file

    results = []
    for source in sources:
        try:
            if source.startswith(("http://", "https://")):
                results.append(fetch_url(source))
            else:
                results.append(parse_file(Path(source)))
        except OSError as error:
            click.echo(f"wattstream: {source}: cannot read: {error}", err=True)
            sys.exit(EXIT_USAGE)
    for result in results:
        for problem in result.errors:
            click.echo(f"wattstream: skipped {problem}", err=True)
    return results


@click.group("patents")
def patents_group() -> None:
    """The deep-tech patent watch: score publications, or publish them for the worker."""


_SOURCES = click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")


@patents_group.command("score")
@_SOURCES
@click.option("--json", "as_json", is_flag=True, help="One JSON object per patent per line.")
@click.pass_obj
def score_command(obj: Context, sources: tuple[str, ...], as_json: bool) -> None:
    """Score each patent in SOURCE... (files or URLs) with the [patents] settings."""
    from pipeline.settings import SettingsError
    from processors.patents import PatentWatchSettings, alert_for, score, watch_settings

    try:
        watch = watch_settings(obj.settings()) or PatentWatchSettings(site=DEFAULT_SITE)
    except SettingsError as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(EXIT_USAGE)
    rows: list[dict[str, Any]] = []
    for result in _read(sources):
        for patent in result.patents:
            scored = score(patent, watch)
            alert = alert_for(patent, scored, watch)
            rows.append(
                {
                    "patent_id": patent.patent_id,
                    "office": patent.office.value,
                    "title": patent.title,
                    "publication_date": patent.publication_date.isoformat(),
                    "watchlists": scored.watchlists,
                    "validity": scored.validity,
                    "market": scored.market,
                    "red_flags": scored.red_flags,
                    "alert": alert is not None,
                    "factors": {
                        f.name: {"points": f.points, "reason": f.reason} for f in scored.factors
                    },
                    "source": patent.source,
                }
            )
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    console = Console(width=140) if not sys.stdout.isatty() else Console()
    table = Table(title=f"{len(rows)} patents", title_justify="left")
    for column in ("patent", "title", "watchlists", "validity", "class", "alert", "main factors"):
        table.add_column(column, overflow="fold")
    for row in rows:
        main = sorted(
            ((name, f["points"]) for name, f in row["factors"].items() if f["points"]),
            key=lambda item: -abs(item[1]),
        )[:3]
        table.add_row(
            row["patent_id"],
            row["title"][:60],
            ", ".join(row["watchlists"]) or "-",
            f"{row['validity']:g}",
            row["market"],
            "yes" if row["alert"] else "-",
            ", ".join(f"{name} {points:+g}" for name, points in main),
        )
    console.print(table)


@patents_group.command("publish")
@_SOURCES
@click.pass_obj
def publish_command(obj: Context, sources: tuple[str, ...]) -> None:
    """Send the patents in SOURCE... to the patents topic (bad documents: dead letters)."""
    from ingest.patents import publish
    from pipeline import kafka
    from pipeline.cli import setup_logging

    settings = obj.settings()
    setup_logging("WARNING", settings=settings)
    if settings.embedded_broker:
        click.echo(
            "wattstream: publishing needs a broker: set WATTSTREAM_BROKER "
            "(or run `wattstream broker` in another terminal)",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    results = _read(sources)

    async def run() -> Any:
        await kafka.wait_for_broker_at_start(settings, long_running=False)
        await kafka.ensure_topics(settings)
        return await publish(settings, results)

    try:
        stats = asyncio.run(run())
    except (ConnectionError, kafka.BrokerWaitStopped) as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(1)
    click.echo(
        f"published {stats.patents_sent} patents to {settings.topic_prefix}wattstream.patents; "
        f"{stats.dead_lettered} documents dead-lettered"
    )
