"""``wattstream evaluate-detectors``: the detectors' precision, recall, F1 and delay.

Synthetic mode (the default): labelled faults injected into realistic household
series (:mod:`pipeline.detector_eval`), run through the same detectors the
stream runs, scored per label. No broker.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from pipeline.detector_eval import HarnessConfig, HarnessResult, evaluate, format_delay

if TYPE_CHECKING:
    from processors.scoring import LabelScore

EXIT_USAGE = 2


def result_json(result: HarnessResult) -> dict[str, Any]:
    return {
        "labels": {label: _score_json(s) for label, s in result.scores.items()},
        "recall_by_size": {
            f"{label} {size}": {"found": found, "windows": total}
            for (label, size), (found, total) in sorted(result.by_size.items())
        },
        "readings": result.readings,
        "detect_s": round(result.detect_s, 3),
    }


@click.command("evaluate-detectors")
@click.option("--homes", type=click.IntRange(1, 100), default=6, show_default=True)
@click.option(
    "--weeks",
    type=click.FloatRange(min=3.0),
    default=6.0,
    show_default=True,
    help="Length of each series; the first two weeks are clean (learning).",
)
@click.option("--step-min", type=click.IntRange(1, 60), default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Score files instead: labelled windows (CSV: device,kind,start,end,label).",
)
@click.option(
    "--alerts",
    "alerts_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="With --labels: the alerts (JSON lines, as `wattstream detect --json` prints).",
)
@click.option(
    "--tolerance",
    default="30m",
    show_default=True,
    help="With --labels: how long after a window's start an alert still matches it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def evaluate_detectors(
    homes: int,
    weeks: float,
    step_min: int,
    seed: int,
    labels_path: Path | None,
    alerts_path: Path | None,
    tolerance: str,
    as_json: bool,
) -> None:
    """Score the detectors on labelled faults injected into realistic series, or (with
    --labels and --alerts) score alerts from a file against labelled windows."""
    if (labels_path is None) != (alerts_path is None):
        raise click.UsageError("give both --labels and --alerts, or neither")
    if labels_path is not None and alerts_path is not None:
        _score_files(labels_path, alerts_path, tolerance, as_json)
        return
    console = Console(stderr=True)
    config = HarnessConfig(homes=homes, weeks=weeks, step_min=step_min, seed=seed)
    result = evaluate(config, progress=None if as_json else console.log)
    if as_json:
        sys.stdout.write(json.dumps(result_json(result), indent=2) + "\n")
        return
    table = Table(title=f"Detectors on {homes} homes x {weeks:g} weeks at {step_min}-min steps")
    for column in ("label", "windows", "found", "alerts", "precision", "recall", "F1", "delay"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, s in result.scores.items():
        table.add_row(
            label,
            str(s.windows),
            str(s.found_windows),
            str(s.alerts),
            f"{s.precision:.2f}",
            f"{s.recall:.2f}",
            f"{s.f1:.2f}",
            format_delay(s.median_delay_s),
        )
    sizes = Table(title="Recall by fault size")
    for column in ("label", "size", "found"):
        sizes.add_column(column)
    for (label, size), (found, total) in sorted(result.by_size.items()):
        sizes.add_row(label, size, f"{found}/{total}")
    out = Console()
    out.print(table)
    out.print(sizes)
    out.print(
        f"{result.readings:,} readings through the detectors in {result.detect_s:.2f} s "
        f"({result.readings / max(result.detect_s, 1e-9):,.0f} readings/s)"
    )


def _score_files(labels_path: Path, alerts_path: Path, tolerance: str, as_json: bool) -> None:
    from pipeline.alert_scoring import ScoringInputError, parse_duration, read_alerts, read_labels
    from processors.scoring import score

    try:
        window = parse_duration(tolerance)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--tolerance") from None
    try:
        windows, events = read_labels(labels_path), read_alerts(alerts_path)
    except ScoringInputError as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(EXIT_USAGE)
    scores = score(events, windows, window)
    if as_json:
        payload = {
            "tolerance_s": window.total_seconds(),
            "labels": {label: _score_json(s) for label, s in scores.items()},
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    table = Table(title=f"{len(events)} alerts against {len(windows)} labelled windows")
    for column in ("label", "windows", "found", "alerts", "precision", "recall", "F1", "delay"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, s in scores.items():
        table.add_row(
            label,
            str(s.windows),
            str(s.found_windows),
            str(s.alerts),
            f"{s.precision:.2f}",
            f"{s.recall:.2f}",
            f"{s.f1:.2f}",
            format_delay(s.median_delay_s),
        )
    Console().print(table)


def _score_json(s: LabelScore) -> dict[str, Any]:
    return {
        "precision": round(s.precision, 4),
        "recall": round(s.recall, 4),
        "f1": round(s.f1, 4),
        "alerts": s.alerts,
        "matched_alerts": s.matched_alerts,
        "windows": s.windows,
        "found_windows": s.found_windows,
        "median_delay_s": s.median_delay_s,
    }
