"""Webhook signatures and the alert filter (severity, de-duplication, cooldown)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from pipeline.schemas import Alert
from pipeline.settings import WebhookSettings
from sinks.webhook import AlertFilter, payload, sign, verify

SECRET = b"s3cret"
T0 = datetime(2025, 4, 7, 12, tzinfo=UTC)


def alert(alert_id: str, minute: int = 0, **overrides: object) -> Alert:
    values: dict[str, object] = {
        "alert_id": alert_id,
        "site": "s",
        "device": "d",
        "alert_type": "vampire_load",
        "severity": "warning",
        "subject": "Vampire load",
        "message": "0.4 kW at night",
        "start": T0 + timedelta(minutes=minute),
    }
    values.update(overrides)
    return Alert.model_validate(values)


def test_a_signature_verifies_and_any_change_breaks_it() -> None:
    body = b'{"alert_id":"a"}'
    header = sign(SECRET, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert verify(SECRET, header, body, now_s=1_700_000_010)
    assert not verify(SECRET, header, body + b" ", now_s=1_700_000_010)
    assert not verify(b"other", header, body, now_s=1_700_000_010)
    assert not verify(SECRET, header, body, now_s=1_700_000_000 + 301)  # a replay, too late
    assert not verify(SECRET, "garbage", body)


def test_below_min_severity_is_not_sent() -> None:
    flt = AlertFilter(WebhookSettings(min_severity="critical"))
    assert flt.decide(alert("a")) == "below min_severity"
    assert flt.decide(alert("b", severity="critical")) is None


def test_each_event_is_sent_once_and_the_resolution_after_it() -> None:
    flt = AlertFilter(WebhookSettings())
    firing = alert("a")
    assert flt.decide(firing) is None
    flt.delivered(firing)
    assert flt.decide(firing) == "duplicate"
    resolved = alert("a", status="resolved", end=T0 + timedelta(minutes=5))
    assert flt.decide(resolved) is None


def test_cooldown_suppresses_a_storm_and_the_resolutions_of_what_it_suppressed() -> None:
    flt = AlertFilter(WebhookSettings(cooldown_s=600))
    assert flt.decide(alert("a", minute=0)) is None
    assert flt.decide(alert("b", minute=5)) == "cooldown (600 s)"
    resolved_b = alert("b", minute=5, status="resolved", end=T0 + timedelta(minutes=7))
    assert flt.decide(resolved_b) == "its firing was suppressed"
    assert flt.decide(alert("c", minute=11)) is None  # cooldown over
    assert flt.decide(alert("d", minute=12, device="other")) is None  # another device
    assert AlertFilter(WebhookSettings(cooldown_s=0)).decide(alert("e")) is None


def test_slack_template_is_one_line_of_text() -> None:
    body = orjson.loads(payload(alert("a", severity="critical", alert_type="scram"), "slack"))
    assert body == {"text": ":rotating_light: [CRITICAL] Vampire load (s/d): 0.4 kW at night"}
    assert orjson.loads(payload(alert("a"), "json"))["alert_id"] == "a"
