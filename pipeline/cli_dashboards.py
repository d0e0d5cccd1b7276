"""``wattstream dashboards ...``: put the shipped Grafana dashboards where they are used.

``push`` uploads them to a running Grafana through its HTTP API (grafana-client),
into one folder, overwriting earlier copies by uid; ``export`` writes them to a
directory, e.g. for a Grafana that provisions dashboards from files.

The Grafana token is read only from ``WATTSTREAM_GRAFANA_TOKEN``, never from an
option: options end up in shell history and process listings. It is never printed.
Exit codes: 2 for a usage error (no token), 1 when Grafana refuses or is unreachable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from pipeline.dashboards import (
    DEFAULT_DIR,
    DEFAULT_FOLDER_TITLE,
    Dashboard,
    DashboardError,
    PushResult,
    export,
    load_dashboards,
    push,
)

TOKEN_ENV = "WATTSTREAM_GRAFANA_TOKEN"  # noqa: S105 - the variable's name, not a token
EXIT_FAILED = 1
EXIT_USAGE = 2


def _load(directory: Path | None) -> list[Dashboard]:
    try:
        return load_dashboards(directory)
    except DashboardError as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(EXIT_USAGE)


@click.group("dashboards")
def dashboards_group() -> None:
    """Grafana dashboards (deploy/grafana/dashboards): push to a Grafana, or export."""


_DASHBOARDS_OPTION = click.option(
    "--dashboards",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help=f"Directory of dashboard JSON files [default: {DEFAULT_DIR}].",
)


@dashboards_group.command("push")
@click.option(
    "--grafana-url",
    required=True,
    help="Grafana's base URL, e.g. https://grafana.example.net or http://localhost:3000.",
)
@click.option(
    "--folder",
    "folder_title",
    default=DEFAULT_FOLDER_TITLE,
    show_default=True,
    help="Title of the folder the dashboards go into (its uid is fixed).",
)
@_DASHBOARDS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def push_command(
    grafana_url: str, folder_title: str, directory: Path | None, as_json: bool
) -> None:
    """Create or update every dashboard in a Grafana folder; pushing again updates them.

    The token comes from the environment variable WATTSTREAM_GRAFANA_TOKEN: a
    service-account token whose role may write dashboards and folders (Editor).
    """
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        click.echo(
            f"wattstream: set {TOKEN_ENV} to a Grafana service-account token (Editor role); "
            "it is read only from the environment",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    dashboards = _load(directory)

    def report(result: PushResult) -> None:
        if not as_json:
            verb = "created" if result.created else "updated"
            click.echo(f"{verb} {result.title!r} (uid {result.uid}, version {result.version})")

    if not as_json:
        click.echo(
            f"pushing {len(dashboards)} dashboards to {grafana_url}, folder {folder_title!r}"
        )
    try:
        results = push(grafana_url, token, folder_title, dashboards, on_result=report)
    except DashboardError as error:
        hint = f"; check {TOKEN_ENV}" if "refused the token" in str(error) else ""
        click.echo(f"wattstream: {error}{hint}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "uid": r.uid,
                        "title": r.title,
                        "version": r.version,
                        "url": r.url,
                        "created": r.created,
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    else:
        created = sum(r.created for r in results)
        click.echo(f"done: {created} created, {len(results) - created} updated")


@dashboards_group.command("export")
@click.argument("destination", type=click.Path(path_type=Path, file_okay=False))
@_DASHBOARDS_OPTION
def export_command(destination: Path, directory: Path | None) -> None:
    """Write the dashboards to DESTINATION as provisioning JSON (id null, sorted keys)."""
    for path in export(destination, _load(directory)):
        click.echo(str(path))
