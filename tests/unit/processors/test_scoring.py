"""Scoring alerts against labelled windows, and the synthetic harness that uses it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pipeline.detector_eval import LABELS, HarnessConfig, evaluate
from processors.scoring import DetectedEvent, LabelledWindow, score

T0 = datetime(2025, 1, 1, tzinfo=UTC)
MIN = timedelta(minutes=1)


def window(label: str = "spike", start: int = 0, end: int = 0, device: str = "d") -> LabelledWindow:
    return LabelledWindow(device, label, T0 + start * MIN, T0 + end * MIN)


def event(
    label: str = "spike", start: int = 0, detected: int = 0, device: str = "d"
) -> DetectedEvent:
    return DetectedEvent(device, label, T0 + start * MIN, T0 + detected * MIN)


def test_an_alert_inside_or_within_tolerance_after_the_start_matches() -> None:
    windows = [window(start=100, end=100)]
    inside_tolerance = score([event(start=129, detected=130)], windows, timedelta(minutes=30))
    assert inside_tolerance["spike"].f1 == 1.0
    assert inside_tolerance["spike"].median_delay_s == 30 * 60
    too_late = score([event(start=131, detected=131)], windows, timedelta(minutes=30))
    assert too_late["spike"].precision == 0.0 and too_late["spike"].recall == 0.0
    before = score([event(start=99, detected=100)], windows)
    assert before["spike"].matched_alerts == 0


def test_label_and_device_must_agree_and_extra_alerts_are_false_positives() -> None:
    windows = [window("drop", 0, 60), window("stuck", 0, 60, device="e")]
    events = [
        event("drop", 10, 10),
        event("drop", 20, 25),  # a second alert in the same window still matches
        event("stuck", 10, 12),  # right label, wrong device
        event("spike", 5, 5),  # no such window
    ]
    scores = score(events, windows, labels=["drop", "stuck", "spike"])
    assert (scores["drop"].precision, scores["drop"].recall) == (1.0, 1.0)
    assert scores["drop"].median_delay_s == 10 * 60  # the earliest detection counts
    assert (scores["stuck"].precision, scores["stuck"].recall) == (0.0, 0.0)
    assert scores["spike"].alerts == 1 and scores["spike"].precision == 0.0
    assert scores["spike"].recall == 1.0  # no window to miss


def test_delay_counts_from_when_the_fault_can_show() -> None:
    exposed = LabelledWindow("d", "vampire", T0, T0 + 600 * MIN, exposed_at=T0 + 300 * MIN)
    scores = score([event("vampire", 310, 320)], [exposed])
    assert scores["vampire"].median_delay_s == 20 * 60


@pytest.fixture(scope="module")
def small_run() -> object:
    return evaluate(HarnessConfig(homes=2, weeks=3.5, seed=7))


def test_the_harness_injects_every_kind_and_is_deterministic(small_run: object) -> None:
    again = evaluate(HarnessConfig(homes=2, weeks=3.5, seed=7))
    assert small_run.scores == again.scores  # type: ignore[attr-defined]
    assert small_run.by_size == again.by_size  # type: ignore[attr-defined]
    scores = small_run.scores  # type: ignore[attr-defined]
    assert set(scores) == set(LABELS)
    assert sum(s.windows for s in scores.values()) >= 8
    assert small_run.readings == 2 * int(3.5 * 7 * 288)  # type: ignore[attr-defined]


def test_the_detectors_find_dropouts_in_the_harness(small_run: object) -> None:
    """A dropout to zero or 10 % is unmistakable in household data: all found, no noise."""
    drop = small_run.scores["drop"]  # type: ignore[attr-defined]
    assert drop.windows > 0 and drop.recall == 1.0
    assert drop.precision >= 0.8
