"""``wattstream status``: a running deployment on one screen (or ``--json``).

Topics and their offsets, consumer groups and their lag, dead letters by reason and,
with ``--metrics-url`` (env ``WATTSTREAM_METRICS_URL``), the sinks' state from the
worker's Prometheus endpoint. See :mod:`pipeline.status`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from pipeline import kafka
from pipeline.status import BrokerUnreachableError, DeploymentStatus, collect_status

if TYPE_CHECKING:
    from pipeline.cli import Context

EXIT_UNREACHABLE = 1


@click.command("status")
@click.option(
    "--metrics-url",
    metavar="URL",
    help="The worker's Prometheus endpoint, e.g. http://127.0.0.1:9464/metrics "
    "(default: the metrics.url setting, env WATTSTREAM_METRICS_URL); without one, no "
    "sinks are shown.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the broker (and the metrics endpoint).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def status(obj: Context, metrics_url: str | None, timeout_s: float, as_json: bool) -> None:
    """Topics, consumer groups and their lag, dead letters and sinks of a deployment."""
    settings = obj.settings()
    if metrics_url is None:
        metrics_url = settings.metrics.url
    try:
        # The broker wait logs a warning per attempt, for long-running commands; within
        # a few seconds' timeout the one error line below says the same.
        with kafka._quiet("pipeline.kafka"):
            result = asyncio.run(
                collect_status(settings, metrics_url=metrics_url, timeout_s=timeout_s)
            )
    except BrokerUnreachableError as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
        return
    print_status(result)


def print_status(result: DeploymentStatus) -> None:
    # A fixed width when piped: rich would otherwise wrap the tables at 80 columns.
    console = Console(width=120) if not sys.stdout.isatty() else Console()
    console.print(
        f"[bold]wattstream status[/bold] of {result.broker} at "
        f"{result.collected_at:%Y-%m-%d %H:%M:%S} UTC"
    )
    console.print(_topics_table(result))
    console.print(_groups_table(result))
    console.print(_dead_letters_table(result))
    if result.metrics is not None:
        if result.metrics.error is not None:
            console.print(f"[red]sinks: {result.metrics.error}[/red] ({result.metrics.url})")
        else:
            console.print(_sinks_table(result))
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def _topics_table(result: DeploymentStatus) -> Table:
    table = Table(title="topics", title_justify="left")
    for column in ("topic", "partitions", "messages", "end offsets by partition"):
        table.add_column(column, justify="left" if column.startswith(("topic", "end")) else "right")
    for topic in result.topics:
        if not topic.exists:
            table.add_row(topic.name, "[red]missing[/red]", "-", "-")
            continue
        table.add_row(
            topic.name,
            str(len(topic.partitions)),
            f"{topic.messages:,}",
            " ".join(f"{p.partition}:{p.end}" for p in topic.partitions),
        )
    return table


def _groups_table(result: DeploymentStatus) -> Table:
    table = Table(title="consumer groups", title_justify="left")
    for column in ("group", "state", "topic", "partition", "committed", "end", "lag"):
        table.add_column(
            column, justify="right" if column in ("committed", "end", "lag") else "left"
        )
    for group in result.groups:
        state = group.state or "?"
        if group.members is not None:
            state += f", {group.members} member{'' if group.members == 1 else 's'}"
        if not group.partitions:
            table.add_row(group.group, state, "-", "-", "no commit", "-", "-")
            continue
        for i, part in enumerate(group.partitions):
            table.add_row(
                group.group if i == 0 else "",
                state if i == 0 else "",
                part.topic,
                str(part.partition),
                "no commit" if part.committed is None else str(part.committed),
                str(part.end),
                f"[red]{part.lag}[/red]" if part.lag else "0",
            )
        table.add_row("", "", "[bold]total[/bold]", "", "", "", f"[bold]{group.lag}[/bold]")
    return table


def _dead_letters_table(result: DeploymentStatus) -> Table:
    dead = result.dead_letters
    title = f"dead letters: {dead.total:,}"
    if not dead.complete:
        title += f" of {dead.expected:,} (read timed out)"
    table = Table(title=title, title_justify="left")
    for column in ("component", "error type", "count", "source topics", "example reason"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for group in dead.groups:
        table.add_row(
            group.component,
            group.error_type,
            f"{group.count:,}",
            ", ".join(group.source_topics) or "-",
            group.example_reason.splitlines()[0][:80] if group.example_reason else "-",
        )
    return table


def _sinks_table(result: DeploymentStatus) -> Table:
    assert result.metrics is not None
    ready = result.metrics.ready
    title = "sinks" + ("" if ready is None else f" (worker {'ready' if ready else 'NOT ready'})")
    table = Table(title=title, title_justify="left")
    for column in ("sink", "up", "buffered", "written", "retried", "dropped"):
        table.add_column(column, justify="left" if column in ("sink", "up") else "right")

    def number(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    for sink in result.metrics.sinks:
        up = "-" if sink.up is None else ("yes" if sink.up else "[red]down[/red]")
        dropped = number(sink.dropped)
        table.add_row(
            sink.sink,
            up,
            number(sink.buffered_points),
            number(sink.written),
            number(sink.retried),
            f"[red]{dropped}[/red]" if sink.dropped else dropped,
        )
    return table
