"""``evaluate-detectors --labels --alerts``: alerts from files scored against windows."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.alert_scoring import ScoringInputError, parse_duration, read_alerts, read_labels
from pipeline.cli import main

LABELS = """device,kind,start,end,label
a,home,2025-01-01T10:00:00+00:00,2025-01-01T10:10:00+00:00,spike
b,home,2025-01-01T12:00:00+00:00,2025-01-01T12:05:00+00:00,spike
a,home,2025-01-02T00:00:00+00:00,2025-01-02T03:00:00+00:00,drop
"""


def alert(device: str, label: str, start: str) -> str:
    return json.dumps({"device": device, "label": label, "start": start, "severity": "warning"})


ALERTS = [
    alert("a", "spike", "2025-01-01T10:05:00+00:00"),  # inside: found, delay 5 min
    alert("a", "spike", "2025-01-01T10:25:00+00:00"),  # after its end, within 30 min: same find
    alert("b", "spike", "2025-01-01T12:45:00+00:00"),  # 45 min after the start: a false alarm
    alert("a", "drop", "2025-01-02T01:00:00+00:00"),  # inside: found, delay 60 min
    alert("b", "drop", "2025-01-02T01:00:00+00:00"),  # another device's window: a false alarm
]


def files(tmp_path: Path) -> tuple[Path, Path]:
    labels, alerts = tmp_path / "labels.csv", tmp_path / "alerts.jsonl"
    labels.write_text(LABELS)
    alerts.write_text("\n".join(ALERTS) + "\n")
    return labels, alerts


def test_durations() -> None:
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("1d") == timedelta(days=1)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_scores_per_label_follow_the_matching_rule(tmp_path: Path) -> None:
    labels, alerts = files(tmp_path)
    result = CliRunner().invoke(
        main, ["evaluate-detectors", "--labels", str(labels), "--alerts", str(alerts), "--json"]
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["labels"]
    spike, drop = scores["spike"], scores["drop"]
    assert (spike["alerts"], spike["matched_alerts"]) == (3, 2)
    assert (spike["windows"], spike["found_windows"]) == (2, 1)
    assert spike["precision"] == pytest.approx(2 / 3, abs=1e-4) and spike["recall"] == 0.5
    assert spike["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5), abs=1e-4)
    assert spike["median_delay_s"] == 300
    assert (drop["precision"], drop["recall"], drop["median_delay_s"]) == (0.5, 1.0, 3600)
    # A tolerance of 1 h takes b's late alert in.
    wider = CliRunner().invoke(
        main,
        ["evaluate-detectors", "--labels", str(labels), "--alerts", str(alerts), "--json",
         "--tolerance", "1h"],
    )  # fmt: skip
    assert json.loads(wider.stdout)["labels"]["spike"]["recall"] == 1.0
    table = CliRunner().invoke(
        main, ["evaluate-detectors", "--labels", str(labels), "--alerts", str(alerts)]
    )
    assert table.exit_code == 0 and "5 alerts against 3 labelled windows" in table.stdout


def test_bad_inputs_name_the_row_or_line_and_both_files_are_needed(tmp_path: Path) -> None:
    labels, alerts = files(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text(LABELS + "a,home,2025-01-03T00:00:00+00:00,2025-01-03T01:00:00+00:00,fire\n")
    with pytest.raises(ScoringInputError, match="row 4: unknown label 'fire'"):
        read_labels(bad)
    bad.write_text("device,kind,start,end,label\na,home,2025-01-03T00:00,2025-01-03T01:00,spike\n")
    with pytest.raises(ScoringInputError, match="row 1: start '2025-01-03T00:00' has no UTC"):
        read_labels(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(ALERTS[0] + "\n{not json\n")
    with pytest.raises(ScoringInputError, match="line 2: not JSON"):
        read_alerts(broken)
    one = CliRunner().invoke(main, ["evaluate-detectors", "--labels", str(labels)])
    assert one.exit_code == 2 and "give both --labels and --alerts" in one.stderr
    code = CliRunner().invoke(
        main, ["evaluate-detectors", "--labels", str(bad), "--alerts", str(alerts)]
    )
    assert code.exit_code == 2 and "row 1" in code.stderr
