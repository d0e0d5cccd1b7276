"""Scoring alerts from files against labelled windows (``evaluate-detectors --labels``).

Labels: a CSV with ``device,kind,start,end,label`` (times ISO 8601 with a UTC offset;
``label`` one of the detectors' labels). Alerts: JSON lines as ``wattstream detect
--json`` prints them (``device``, ``label``, ``start``...; other keys are ignored).
The matching and the scores are the synthetic harness's (:func:`processors.scoring.
score`): an alert matches a window of the same device and label when it starts inside
it or within ``tolerance`` after its start; an alert that matches no window is a false
positive; a window is found when an alert matches it (several alerts in one window are
one find, and none of them is a false positive); the delay is from the window's start to
the first matching alert's start.
"""

from __future__ import annotations

import csv
import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from processors.scoring import DetectedEvent, LabelledWindow

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


class ScoringInputError(ValueError):
    """A labels or alerts file that cannot be scored; the message names file and row."""


def parse_duration(text: str) -> timedelta:
    """``30m``, ``2h``, ``90s``, ``1d`` (also ``min``)."""
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a duration like 30m, 2h, 90s or 1d")
    return timedelta(seconds=float(found.group(1)) * _UNIT_S[found.group(2)])


def _instant(value: str | None, where: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value).strip())
    except ValueError:
        raise ScoringInputError(f"{where}: {name} {value!r} is not ISO 8601") from None
    if moment.tzinfo is None:
        raise ScoringInputError(f"{where}: {name} {value!r} has no UTC offset")
    return moment


def read_labels(path: Path) -> list[LabelledWindow]:
    from processors.anomaly import LABELS
    from processors.scoring import LabelledWindow

    windows = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"device", "start", "end", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ScoringInputError(f"{path}: missing column(s) {sorted(missing)}")
        for number, row in enumerate(reader, start=1):
            where = f"{path}: row {number}"
            label = (row.get("label") or "").strip()
            if label not in LABELS:
                raise ScoringInputError(
                    f"{where}: unknown label {label!r}; one of {', '.join(LABELS)}"
                )
            start = _instant(row.get("start"), where, "start")
            end = _instant(row.get("end"), where, "end")
            if end < start:
                raise ScoringInputError(f"{where}: end is before start")
            windows.append(LabelledWindow(str(row["device"]).strip(), label, start, end))
    return windows


def read_alerts(path: Path) -> list[DetectedEvent]:
    from processors.scoring import DetectedEvent

    events = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            alert = json.loads(line)
        except json.JSONDecodeError as error:
            raise ScoringInputError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(alert, dict) or not {"device", "label", "start"} <= set(alert):
            raise ScoringInputError(f"{where}: an alert needs device, label and start")
        start = _instant(alert["start"], where, "start")
        events.append(DetectedEvent(str(alert["device"]), str(alert["label"]), start, start))
    return events
