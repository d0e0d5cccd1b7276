"""`wattstream ingest ...` as a subprocess: a connector run by its command until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import codec, kafka, topics
from pipeline.local import EmbeddedBroker, free_port
from pipeline.schemas import PriceTick
from tests.conftest import REPO, SettingsFactory
from tests.workers import metrics_page

pytestmark = pytest.mark.integration

WATTSTREAM = [sys.executable, "-m", "pipeline.cli"]


def env_for(**values: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    return {**clean, **values}


async def test_ingest_prices_runs_the_feed_until_sigterm(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    prices = tmp_path / "prices.csv"
    prices.write_text(
        "time,market,price_per_mwh\n2025-04-07T00:00:00Z,IT-NORD,91.5\n"
        "2025-04-07T01:00:00Z,IT-NORD,-3.25\n2025-04-07T02:00:00Z,IT-NORD,cheap\n"
    )
    config = tmp_path / "prices.toml"
    config.write_text(f'[prices]\nsource = "{prices}"\npoll_interval_s = 0.5\n')
    metrics_port = free_port()
    started_unix_s = time.time()
    process = await asyncio.create_subprocess_exec(
        *WATTSTREAM,
        "ingest",
        "prices",
        str(config),
        env=env_for(
            WATTSTREAM_BROKER=kafka_broker.bootstrap,
            WATTSTREAM_TOPIC_PREFIX=settings.topic_prefix,
            WATTSTREAM_PARTITIONS=str(settings.partitions),
            WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH="true",
            WATTSTREAM_METRICS_PORT=str(metrics_port),
        ),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = asyncio.get_running_loop().time() + 60
        ticks: list[PriceTick] = []
        while len(ticks) < 2:
            assert asyncio.get_running_loop().time() < deadline, "no ticks within 60 s"
            await asyncio.sleep(0.5)
            if process.returncode is not None:
                break
            records = await kafka.read_all(settings, topics.PRICES)
            ticks = [codec.decode(PriceTick, value) for _, value in records]
        assert [t.price_per_kwh for t in ticks] == [0.0915, -0.00325]
        await asyncio.sleep(1.5)  # more polls of the same file must not re-send
        assert len(await kafka.read_all(settings, topics.PRICES)) == 2
        # The feed's /metrics: every poll answered, two ticks sent once, the bad row
        # dead-lettered once however often it was read, and when the file last answered.
        page = await asyncio.to_thread(metrics_page, f"http://127.0.0.1:{metrics_port}/metrics")
        assert page[("wattstream_feed_polls_total", ("price", "ok"))] >= 3
        assert page[("wattstream_feed_polls_total", ("price", "error"))] == 0
        assert page[("wattstream_feed_messages_sent_total", ("price",))] == 2
        assert page[("wattstream_feed_rejected_total", ("price", "row"))] == 1
        assert page[("wattstream_feed_rejected_total", ("price", "document"))] == 0
        answered_unix_s = page[("wattstream_feed_last_answer_timestamp_seconds", ("price",))]
        assert started_unix_s < answered_unix_s <= time.time()
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert b"Traceback" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_a_bad_connector_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "mqtt.toml"
    config.write_text('[mqtt]\nurl = "mqtt://127.0.0.1:1883"\npersistent_session = true\n')
    result = subprocess.run(
        [*WATTSTREAM, "ingest", "mqtt", str(config)],
        env=env_for(WATTSTREAM_BROKER="127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "client_id" in result.stderr
    assert "Traceback" not in result.stderr


async def test_ingest_tou_publishes_the_sample_tariff_across_a_dst_change(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    sample = REPO / "ingest" / "prices.sample.toml"
    process = await asyncio.create_subprocess_exec(
        *WATTSTREAM,
        "ingest",
        "tou",
        str(sample),
        "--first-day",
        "2025-03-30",  # spring forward in Europe/Brussels: a 23-hour day
        "--days",
        "2",
        "--json",
        env=env_for(
            WATTSTREAM_BROKER=kafka_broker.bootstrap,
            WATTSTREAM_TOPIC_PREFIX=settings.topic_prefix,
            WATTSTREAM_PARTITIONS=str(settings.partitions),
            WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH="true",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    ticks = [codec.decode(PriceTick, v) for _, v in await kafka.read_all(settings, topics.PRICES)]
    assert len(ticks) == 23 + 24
    assert {t.price_kind.value for t in ticks} == {"tou"}
    assert ticks[0].start.isoformat() == "2025-03-29T23:00:00+00:00"  # local midnight, CET
    assert len({t.price_per_kwh for t in ticks}) >= 2  # more than one period's rate


async def test_simulate_sunspec_then_ingest_modbus_puts_all_three_devices_in_kafka(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    from pipeline.schemas import TelemetryBatch

    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    port = free_port()
    metrics_port = free_port()
    simulator = await asyncio.create_subprocess_exec(
        *WATTSTREAM, "simulate", "sunspec", "--port", str(port), "--site", "sim-home",
        env=env_for(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    connector = None
    try:
        assert simulator.stdout is not None
        devices = b""
        while devices.count(b"[[modbus.devices]]") < 3 or not devices.endswith(b"\n\n"):
            line = await asyncio.wait_for(simulator.stdout.readline(), timeout=30)
            assert line, "the simulator exited before printing its devices"
            devices += line
        config = tmp_path / "modbus.toml"
        config.write_text(
            "[modbus]\n\n"
            + devices.decode().replace(
                "[[modbus.devices]]", "[[modbus.devices]]\npoll_interval_s = 0.2"
            )
        )
        connector = await asyncio.create_subprocess_exec(
            *WATTSTREAM, "ingest", "modbus", str(config),
            env=env_for(
                WATTSTREAM_BROKER=kafka_broker.bootstrap,
                WATTSTREAM_TOPIC_PREFIX=settings.topic_prefix,
                WATTSTREAM_PARTITIONS=str(settings.partitions),
                WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH="true",
                WATTSTREAM_METRICS_PORT=str(metrics_port),
            ),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        kinds: dict[str, object] = {}
        deadline = asyncio.get_running_loop().time() + 60
        while len(kinds) < 3:
            assert asyncio.get_running_loop().time() < deadline, f"only {sorted(kinds)} arrived"
            assert connector.returncode is None, "the connector exited"
            await asyncio.sleep(0.5)
            for _, value in await kafka.read_all(settings, topics.TELEMETRY):
                batch = codec.decode(TelemetryBatch, value)
                assert batch.site == "sim-home"
                kinds.update({reading.kind: reading for reading in batch.readings})
        battery = kinds["battery"]
        assert 0 <= battery.soc_pct <= 100  # type: ignore[attr-defined]
        assert kinds["solar"].power_kw >= 0  # type: ignore[attr-defined]
        # The connector's /metrics: every device answered, each poll timed, none offline.
        page = await asyncio.to_thread(metrics_page, f"http://127.0.0.1:{metrics_port}/metrics")
        assert page[("wattstream_device_polls_total", ("modbus", "ok"))] >= 3
        assert page[("wattstream_device_polls_total", ("modbus", "error"))] == 0
        assert page[("wattstream_devices_offline", ("modbus",))] == 0
        assert page[("wattstream_device_poll_seconds_count", ("modbus",))] >= 3
        connector.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(connector.communicate(), timeout=30)
        assert connector.returncode == 0, stderr.decode()[-2000:]
    finally:
        for process in (connector, simulator):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), timeout=10)
                except TimeoutError:
                    process.kill()
                    await process.wait()
    assert simulator.returncode == 0
