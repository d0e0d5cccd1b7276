"""The detectors' agent on the real embedded broker: the stream raises what the file run does,
also when the worker is replaced halfway.

One home, five days of five-minute readings with a spike, a frozen meter and a dropout
injected on the fifth day, goes through workers built by ``create_app``: the first four
days to one, the fifth to a new one that takes the baselines up from the checkpoint
table. The alerts on the alerts topic must be the incidents :class:`SiteDetection`
raises over the same batches, in order, including each injected fault.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import codec, kafka, topics
from pipeline.app import agent_input_topics, create_app
from pipeline.detect import detect_file, incidents_of
from pipeline.local import EmbeddedBroker
from pipeline.schemas import Alert, AlertStatus, HomeReading, TelemetryBatch
from pipeline.settings import Settings
from processors.detection import SiteDetection, detection_settings
from tests.conftest import SettingsFactory
from tests.workers import run_worker

pytestmark = pytest.mark.integration

SITE = "flat"
START = datetime(2025, 3, 3, tzinfo=UTC)
STEP = timedelta(minutes=5)
PER_DAY = 288
SPIKE_AT = 4 * PER_DAY + 20
STUCK_AT = 4 * PER_DAY + 60
DROP_AT = 4 * PER_DAY + 120


def home_readings() -> list[HomeReading]:
    rng = np.random.default_rng(5)
    values = []
    for k in range(5 * PER_DAY):
        hour = k * 5 / 60
        values.append(
            max(
                0.05,
                (1 + 0.3 * math.sin(2 * math.pi * hour / 24)) * (1 + 0.05 * rng.standard_normal()),
            )
        )
    values[SPIKE_AT] += 8.0
    for k in range(STUCK_AT + 1, STUCK_AT + 12):
        values[k] = values[STUCK_AT]
    for k in range(DROP_AT, DROP_AT + 6):
        values[k] = 0.0
    return [
        HomeReading(device="meter-a", ts=START + k * STEP, power_kw=v) for k, v in enumerate(values)
    ]


def batches(readings: list[HomeReading], size: int = 48) -> list[TelemetryBatch]:
    return [
        TelemetryBatch(batch_id=f"b{n}", site=SITE, source="test", readings=readings[i : i + size])
        for n, i in enumerate(range(0, len(readings), size))
    ]


async def run_batches(settings: Settings, sent: list[TelemetryBatch]) -> None:
    """A worker as ``create_app`` builds it reads ``sent``, then stops."""
    records = [(settings.topic(topics.TELEMETRY), SITE, codec.encode(b)) for b in sent]
    await run_worker(create_app(settings), settings, records, agent_input_topics(settings))


async def test_the_agent_raises_what_the_detectors_raise_across_a_restart(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    """Four days to a first worker, the fifth (with the faults) to a new one: without the
    checkpoint the new worker would be warming up (24 h) and see nothing."""
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        sites=[{"id": SITE, "market": "M", "detection": {"kinds": ["home"]}}],
        # Two worker starts: a 2 s session makes each group join take ~1 s on this broker.
        kafka={"one_record_per_batch": True, "session_timeout_s": 2, "heartbeat_interval_s": 0.5},
    )
    sent = batches(home_readings())
    cut = 4 * PER_DAY // 48
    await kafka.ensure_topics(settings)
    await run_batches(settings, sent[:cut])
    await run_batches(settings, sent[cut:])

    got = [codec.decode(Alert, v) for _, v in await kafka.read_all(settings, topics.ALERTS)]
    fired = {(a.alert_type, a.start) for a in got if a.status is AlertStatus.FIRING}
    assert ("spike", START + SPIKE_AT * STEP) in fired
    assert ("stuck", START + (STUCK_AT + 1) * STEP) in fired
    assert ("drop", START + DROP_AT * STEP) in fired
    # The same incidents as one worker reading it all (the checkpoint is the state at its
    # last write, so values may differ in the last digits; what was found may not).
    engine = SiteDetection(SITE, detection_settings(settings.sites[0]))
    want: list[Alert] = []
    for batch in sent:
        want += engine.on_readings(batch.readings)
    assert [(a.alert_id, a.alert_type, a.status) for a in got] == [
        (a.alert_id, a.alert_type, a.status) for a in want
    ]
    # `wattstream detect` over the same readings as a file finds the same incidents,
    # from start to end, as the stream did.
    readings = home_readings()
    path = tmp_path / "flat.csv"
    pl.DataFrame(
        {
            "time": [r.ts.isoformat() for r in readings],
            "site": SITE,
            "device": [r.device for r in readings],
            "kind": "home",
            "power_kw": [r.power_kw for r in readings],
        }
    ).write_csv(path)
    from_file = detect_file(path, settings=settings).incidents
    from_stream = incidents_of(got)
    assert len(from_stream) >= 3
    assert [(i.alert_id, i.label, i.start, i.end) for i in from_file] == [
        (i.alert_id, i.label, i.start, i.end) for i in from_stream
    ]
