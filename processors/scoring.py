"""Detector accuracy: alerts against labelled fault windows.

An alert **matches** a labelled window of the same device and label when it
starts inside the window, or within ``tolerance`` after the window's start (a
fault one reading long still has a chance). A window is **found** when at least
one alert matches it; its **detection delay** is from the window's start (or
``exposed_at``, when the fault can only show later, e.g. a vampire load that
begins at noon shows in the night's idle hours) to the earliest matching
alert's detection. Alerts that match no window are false positives.

Per label: precision = matching alerts / alerts, recall = found windows /
windows, F1 their harmonic mean, and the median delay of found windows.

Plain Python (no Faust import).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class LabelledWindow:
    device: str
    label: str
    start: datetime
    end: datetime
    size: str = ""
    """How strong the fault is (``x5 std``, ``0.1 kW``), for per-size recall."""
    exposed_at: datetime | None = None
    """When the fault first becomes observable, if later than ``start``."""


@dataclass(frozen=True)
class DetectedEvent:
    device: str
    label: str
    start: datetime
    detected_at: datetime


@dataclass(frozen=True)
class LabelScore:
    label: str
    alerts: int
    matched_alerts: int
    windows: int
    found_windows: int
    median_delay_s: float | None

    @property
    def precision(self) -> float:
        return self.matched_alerts / self.alerts if self.alerts else 1.0

    @property
    def recall(self) -> float:
        return self.found_windows / self.windows if self.windows else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def matches(event: DetectedEvent, window: LabelledWindow, tolerance: timedelta) -> bool:
    if event.device != window.device or event.label != window.label:
        return False
    return window.start <= event.start <= max(window.end, window.start + tolerance)


def score(
    events: Iterable[DetectedEvent],
    windows: Iterable[LabelledWindow],
    tolerance: timedelta = timedelta(minutes=30),
    labels: Iterable[str] | None = None,
) -> dict[str, LabelScore]:
    """Per-label precision, recall, F1 and median delay of ``events`` against ``windows``."""
    event_list = list(events)
    window_list = list(windows)
    by_key: dict[tuple[str, str], list[LabelledWindow]] = {}
    for window in window_list:
        by_key.setdefault((window.device, window.label), []).append(window)
    chosen = sorted(
        set(labels)
        if labels is not None
        else {w.label for w in window_list} | {e.label for e in event_list}
    )
    matched_alerts = dict.fromkeys(chosen, 0)
    alert_counts = dict.fromkeys(chosen, 0)
    first_detection: dict[LabelledWindow, datetime] = {}
    for event in event_list:
        if event.label not in alert_counts:
            continue
        alert_counts[event.label] += 1
        hit = False
        for window in by_key.get((event.device, event.label), ()):
            if matches(event, window, tolerance):
                hit = True
                seen = first_detection.get(window)
                if seen is None or event.detected_at < seen:
                    first_detection[window] = event.detected_at
        matched_alerts[event.label] += hit
    out = {}
    for label in chosen:
        label_windows = [w for w in window_list if w.label == label]
        delays = [
            max(0.0, (first_detection[w] - (w.exposed_at or w.start)).total_seconds())
            for w in label_windows
            if w in first_detection
        ]
        out[label] = LabelScore(
            label=label,
            alerts=alert_counts[label],
            matched_alerts=matched_alerts[label],
            windows=len(label_windows),
            found_windows=sum(1 for w in label_windows if w in first_detection),
            median_delay_s=statistics.median(delays) if delays else None,
        )
    return out


def recall_by_size(
    events: Iterable[DetectedEvent],
    windows: Iterable[LabelledWindow],
    tolerance: timedelta = timedelta(minutes=30),
) -> dict[tuple[str, str], tuple[int, int]]:
    """(found, total) windows per (label, size)."""
    event_list = list(events)
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for window in windows:
        found = any(matches(e, window, tolerance) for e in event_list)
        hits, total = out.get((window.label, window.size), (0, 0))
        out[(window.label, window.size)] = (hits + found, total + 1)
    return out
