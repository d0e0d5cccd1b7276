"""The solar efficiency agent on the real embedded broker, across a worker restart.

Five days of 5-minute PV telemetry for one site (the array, an array the section does
not know, a battery) go through ``processors.solar.register`` in a Faust app built
here (pipeline/app.py is not ours to edit). On day 4 a 35 % loss starts at 10:00 and
is repaired at 13:00. The worker is stopped after day 3 and a new one (same app id,
memory store) takes over: its table state comes back from the changelog, so the
learned normal survives and the loss is still caught. What the agent sends must be
exactly what the plain engine gives for the same batches, in order: the agent is thin.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
import numpy as np
import pytest

from pipeline import codec, kafka, topics
from pipeline.app import faust_config
from pipeline.local import EmbeddedBroker
from pipeline.schemas import (
    Alert,
    AlertStatus,
    BatteryReading,
    Reading,
    SolarReading,
    TelemetryBatch,
)
from pipeline.settings import Settings, SettingsError
from processors import solar
from tests.conftest import SettingsFactory
from tests.workers import run_worker

pytestmark = pytest.mark.integration

SITE = "sunny"
START = datetime(2025, 6, 2, tzinfo=UTC)
DAYS = 5
ONSET = START + timedelta(days=3, hours=10)
REPAIRED = ONSET + timedelta(hours=3)
SOLAR: dict[str, Any] = {
    "arrays": [{"device": "pv-1", "kwp": 8.0, "inverter_kw": 7.5, "tilt_deg": 25.0}],
}


def readings() -> list[Reading]:
    array = solar.SolarSettings.model_validate(SOLAR).arrays[0]
    rng = np.random.default_rng(7)
    out: list[Reading] = []
    for k in range(DAYS * 24 * 12):
        ts = START + timedelta(minutes=5 * k)
        hours = ts.hour + ts.minute / 60.0
        g = max(0.0, 850.0 * math.sin(math.pi * (hours - 6.0) / 12.0)) if 6 <= hours <= 18 else 0.0
        factor = 0.65 if ONSET <= ts < REPAIRED else 1.0
        power_kw = solar.expected_ac_kw_one(array, g, 22.0) * factor * (1 + 0.01 * rng.normal())
        out += [
            SolarReading(
                device="pv-1",
                ts=ts,
                power_kw=max(0.0, power_kw),
                irradiance_w_m2=g,
                temp_air_c=22.0,
            ),
            # Not in the section: ignored, and it must not disturb pv-1.
            SolarReading(device="pv-x", ts=ts, power_kw=0.0, irradiance_w_m2=g),
            BatteryReading(device="bat", ts=ts, power_kw=0.0, soc_pct=50.0),
        ]
    return out


def batches(all_readings: list[Reading], size: int = 300) -> list[TelemetryBatch]:
    return [
        TelemetryBatch(
            batch_id=f"b{n}", site=SITE, source="test", readings=all_readings[i : i + size]
        )
        for n, i in enumerate(range(0, len(all_readings), size))
    ]


def expected(settings: Settings, sent: list[TelemetryBatch]) -> list[Alert]:
    cfg = solar.solar_settings(settings.sites[0])
    assert cfg is not None
    engine = solar.SiteSolar(SITE, cfg)
    states: dict[str, Any] = {}
    out: list[Alert] = []
    for batch in sent:
        new, alerts = engine.step(
            states, [r for r in batch.readings if isinstance(r, SolarReading)]
        )
        states.update(new)
        out += alerts
    return out


async def run_batches(settings: Settings, sent: list[TelemetryBatch]) -> None:
    """Start a worker, send ``sent``, wait until it has processed them all, stop it."""
    app = faust.App(settings.app_id, **faust_config(settings))
    solar.register(app, settings)
    records = [(settings.topic(topics.TELEMETRY), SITE, codec.encode(b)) for b in sent]
    await run_worker(app, settings, records, [settings.topic(topics.TELEMETRY)], timeout_s=30)


async def test_solar_agent_alerts_like_the_engine_across_a_restart(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        sites=[{"id": SITE, "market": "M", "solar": SOLAR}],
        # Two worker starts: a 2 s session makes each group join take ~1 s on this broker.
        kafka={"one_record_per_batch": True, "session_timeout_s": 2, "heartbeat_interval_s": 0.5},
    )
    sent = batches(readings())
    cut = next(i for i, b in enumerate(sent) if b.readings[0].ts >= START + timedelta(days=3))
    await kafka.ensure_topics(settings)
    await run_batches(settings, sent[:cut])
    await run_batches(settings, sent[cut:])  # a new worker: state from the changelog

    alerts = [codec.decode(Alert, v) for _, v in await kafka.read_all(settings, topics.ALERTS)]
    assert alerts == expected(settings, sent)
    assert [(a.status, a.device, a.start) for a in alerts] == [
        (AlertStatus.FIRING, "pv-1", ONSET),
        (AlertStatus.RESOLVED, "pv-1", ONSET),
    ]
    firing, resolved = alerts
    assert firing.alert_id == resolved.alert_id
    detected = datetime.fromisoformat(str(firing.details["detected_at"]))
    assert detected - ONSET <= timedelta(minutes=15)
    assert firing.details["cause"] == "sudden"
    assert resolved.end is not None and REPAIRED <= resolved.end <= REPAIRED + timedelta(hours=1)
    assert all(a.alert_type == solar.ALERT_TYPE and a.site == SITE for a in alerts)


def test_a_bad_solar_section_fails_at_registration_naming_the_setting(
    make_settings: SettingsFactory,
) -> None:
    bad = {"arrays": [{"device": "pv-1", "kwp": 0}]}
    settings = make_settings(
        broker="127.0.0.1:1", sites=[{"id": SITE, "market": "M", "solar": bad}]
    )
    app = faust.App(settings.app_id, **faust_config(settings))
    with pytest.raises(SettingsError, match=r"sites\[sunny\]\.solar\.arrays\[0\]\.kwp"):
        solar.register(app, settings)
