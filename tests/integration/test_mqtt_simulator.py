"""The household simulator publishing to a real Mosquitto, read by the real MQTT
connector into the embedded Kafka broker: plausible home and EV readings arrive."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest

from ingest.mqtt import MqttConfig, MqttConnector
from ingest.simulators.fusion import fusion_series, fusion_source, safety_violations
from ingest.simulators.mqtt_publisher import (
    FleetConfig,
    HomeFleet,
    PublisherConfig,
    run_simulation,
)
from pipeline import codec, kafka, topics
from pipeline.local import EmbeddedBroker
from pipeline.schemas import EvReading, HomeReading, SolarReading, TelemetryBatch
from tests.conftest import SettingsFactory
from tests.servers import Mosquitto

pytestmark = pytest.mark.integration


async def test_simulated_homes_and_evs_flow_through_the_connector(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, mosquitto: Mosquitto
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    root = f"t{uuid.uuid4().hex[:10]}"
    connector = MqttConnector(
        settings,
        MqttConfig(
            url=mosquitto.url,
            client_id=f"ingest-{root}",
            topics=(f"{root}/{{site}}/{{kind}}/{{device}}",),
            batch_max_wait_s=0.2,
        ),
    )
    await connector.start()
    task = asyncio.create_task(connector.run())
    try:
        # 30 simulated minutes at 1,800x: one wall second, 10 steps of 3 minutes, over
        # the evening when the cars arrive.
        stats = await run_simulation(
            HomeFleet(FleetConfig(homes=3, evs=2), seed=5).readings_at,
            PublisherConfig(
                url=mosquitto.url,
                site="sim",
                topic=f"{root}/{{site}}/{{kind}}/{{device}}",
                speed=1_800.0,
                step_s=180.0,
                duration_s=1_800.0,
                start=datetime(2026, 6, 22, 17, 0, tzinfo=UTC),
                seed=5,
            ),
        )
        assert stats.steps == 10 and stats.readings_published == 10 * (3 + 3 + 2)
        assert stats.messages_acked == stats.readings_published
        deadline = asyncio.get_running_loop().time() + 30
        while connector.stats.readings_produced < stats.readings_published:
            assert asyncio.get_running_loop().time() < deadline, connector.stats
            await asyncio.sleep(0.1)
    finally:
        await connector.stop()
        await task

    readings = [
        reading
        for _, value in await kafka.read_all(settings, topics.TELEMETRY)
        for reading in codec.decode(TelemetryBatch, value).readings
    ]
    assert connector.stats.dead_lettered == 0
    homes = [r for r in readings if isinstance(r, HomeReading)]
    evs = [r for r in readings if isinstance(r, EvReading)]
    solar = [r for r in readings if isinstance(r, SolarReading)]
    assert len(homes) == 30 and len(evs) == 20 and len(solar) == 30
    assert {r.device for r in homes} == {"home-1", "home-2", "home-3"}
    assert all(0.0 <= r.power_kw <= 15.0 for r in homes)
    assert all(r.soc_pct is not None and 0.0 <= r.soc_pct <= 100.0 for r in evs)
    assert all(isinstance(r.plugged_in, bool) for r in evs)
    assert all(r.ts.tzinfo is not None and r.ts.year == 2026 for r in readings)


def test_the_simulate_mqtt_command_publishes_and_stops(mosquitto: Mosquitto) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "simulate", "mqtt", "--url", mosquitto.url,
         "--site", f"t{uuid.uuid4().hex[:8]}", "--homes", "2", "--evs", "1",
         "--speed", "6000", "--duration-s", "600", "--start", "2026-06-22T17:00:00+0000",
         "--json"],
        env=clean, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 10 and summary["readings_published"] == 10 * (2 + 2 + 1)
    assert summary["messages_acked"] == summary["readings_published"]
    assert summary["first_ts"] == "2026-06-22T17:00:00+00:00"


async def test_a_simulated_quench_reaches_kafka_and_crosses_the_safe_bands(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, mosquitto: Mosquitto
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    root = f"t{uuid.uuid4().hex[:10]}"
    connector = MqttConnector(
        settings,
        MqttConfig(
            url=mosquitto.url,
            client_id=f"ingest-{root}",
            topics=(f"{root}/{{site}}/{{kind}}/{{device}}",),
            batch_max_wait_s=0.2,
        ),
    )
    start = datetime(2026, 1, 15, 9, tzinfo=UTC)
    series = fusion_series("quench", start, duration_s=120, step_s=1.0, seed=2)
    assert series.fault_onset is not None
    await connector.start()
    task = asyncio.create_task(connector.run())
    try:
        stats = await run_simulation(
            fusion_source(series),
            PublisherConfig(
                url=mosquitto.url,
                site="tokamak",
                topic=f"{root}/{{site}}/{{kind}}/{{device}}",
                speed=240.0,
                step_s=1.0,
                duration_s=120.0,
                start=start,
            ),
        )
        assert stats.readings_published == 120
        deadline = asyncio.get_running_loop().time() + 30
        while connector.stats.readings_produced < 120:
            assert asyncio.get_running_loop().time() < deadline, connector.stats
            await asyncio.sleep(0.1)
    finally:
        await connector.stop()
        await task

    received = sorted(
        (
            reading
            for _, value in await kafka.read_all(settings, topics.TELEMETRY)
            for reading in codec.decode(TelemetryBatch, value).readings
        ),
        key=lambda r: r.ts,
    )
    assert received == series.readings  # every value survives MQTT and Kafka unchanged
    crossed = [r.ts for r in received if safety_violations(r)]  # type: ignore[arg-type]
    assert crossed and crossed[0] > series.fault_onset


def test_the_simulate_fusion_command_reports_the_fault_onset(mosquitto: Mosquitto) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "simulate", "fusion", "--url", mosquitto.url,
         "--site", f"t{uuid.uuid4().hex[:8]}", "--scenario", "disruption", "--shot-s", "60",
         "--step-s", "2", "--speed", "600", "--start", "2026-01-15T09:00:00+0000", "--json"],
        env=clean, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["scenario"] == "disruption" and summary["readings_published"] == 30
    assert summary["messages_acked"] == 30
    assert summary["fault_onset"].startswith("2026-01-15T09:00:")
    assert "fault onset at" in result.stderr
