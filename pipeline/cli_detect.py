"""``wattstream detect FILE``: the detectors over a telemetry file, with no broker.

See :mod:`pipeline.detect`. Prints a table of the incidents and a summary per device,
or with ``--json`` one JSON object per incident per line (``device``, ``label``,
``start``, ``end``, ``severity``, ``expected``, ``observed``...), the input of
``wattstream evaluate-detectors --alerts``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pipeline.detect import DETECTORS, DetectFileError, DetectResult, detect_file
from pipeline.settings import SettingsError, load_settings

EXIT_USAGE = 2


def _detectors(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in chosen if name not in DETECTORS]
    if unknown or not chosen:
        raise click.BadParameter(f"{value!r}: choose from {','.join(DETECTORS)}")
    return chosen


@click.command("detect")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--detectors",
    default=",".join(DETECTORS),
    show_default=True,
    callback=_detectors,
    help="Comma-separated: anomaly (spike, drop, level_shift, stuck, high_consumption), "
    "vampire, solar (needs the arrays of [sites.solar] in --config).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="wattstream.toml whose [[sites]] give the detection settings and PV arrays "
    "(default: the detectors' defaults, no PV arrays).",
)
@click.option("--timezone", help="The IANA zone of times written without a UTC offset.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per incident per line.")
def detect(
    file: Path,
    detectors: tuple[str, ...],
    config_path: Path | None,
    timezone: str | None,
    as_json: bool,
) -> None:
    """Run the streaming detectors over FILE (CSV or Parquet, long format)."""
    console = Console(stderr=True)
    try:
        settings = load_settings(config_path) if config_path is not None else None
    except SettingsError as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(EXIT_USAGE)
    # A bar on a terminal (stderr: stdout may be piped JSON); nothing in a script's logs.
    bar = Progress(
        TextColumn(f"{file.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("readings"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with bar:
        task = bar.add_task("detect", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = detect_file(
                file, settings=settings, detectors=detectors, timezone=timezone, progress=progress
            )
        except (DetectFileError, SettingsError) as error:
            bar.stop()
            click.echo(f"wattstream: {error}", err=True)
            sys.exit(EXIT_USAGE)
    if as_json:
        for incident in result.incidents:
            click.echo(json.dumps(incident.as_json()))
        return
    _print(result)


def _print(result: DetectResult) -> None:
    console = Console(width=120) if not sys.stdout.isatty() else Console()
    table = Table(title=f"{len(result.incidents)} incidents", title_justify="left")
    for column in ("device", "label", "start", "end", "severity", "expected", "observed"):
        table.add_column(column)
    for i in result.incidents:
        table.add_row(
            i.device if i.site == "file" else f"{i.site}/{i.device}",
            i.label,
            f"{i.start:%Y-%m-%d %H:%M}",
            "open" if i.end is None else f"{i.end:%Y-%m-%d %H:%M}",
            i.severity,
            "-" if i.expected is None else f"{i.expected:.3f}",
            "-" if i.observed is None else f"{i.observed:.3f}",
        )
    console.print(table)
    devices = Table(title="per device", title_justify="left")
    for column in ("device", "kind", "readings", "from", "to", "step", "gaps", "incidents"):
        devices.add_column(column)
    for d in result.devices:
        devices.add_row(
            d.device if d.site == "file" else f"{d.site}/{d.device}",
            d.kind,
            f"{d.readings:,}",
            "-" if d.first is None else f"{d.first:%Y-%m-%d %H:%M}",
            "-" if d.last is None else f"{d.last:%Y-%m-%d %H:%M}",
            "-" if d.step is None else str(d.step),
            str(d.gaps),
            ", ".join(f"{label} {n}" for label, n in sorted(d.incidents.items())) or "-",
        )
    console.print(devices)
    console.print(
        f"{result.rows:,} readings; {result.duplicates} duplicates dropped, "
        f"{result.without_power} rows without power skipped"
    )
