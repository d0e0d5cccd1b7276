"""A Modbus device stops answering: an offline alert, backoff, and recovery when it returns,
while the other devices keep being polled on time (moved from
tests/integration/test_modbus_connector.py, whose helpers it uses)."""

from __future__ import annotations

import asyncio
import time

import pytest

from ingest.modbus import ModbusConfig, ModbusConnector
from ingest.simulators.sunspec_server import SunSpecServer, inverter, meter
from pipeline import kafka
from pipeline.local import EmbeddedBroker
from pipeline.schemas import AlertStatus
from tests.conftest import SettingsFactory
from tests.integration.test_modbus_connector import alerts, batches, device, eventually

pytestmark = pytest.mark.reliability


async def test_offline_alert_and_recovery_while_other_device_keeps_polling(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    flaky = SunSpecServer([inverter(unit_id=1, power_w=800.0)])
    steady = SunSpecServer([meter(unit_id=1, power_w=300.0)])
    config = ModbusConfig(
        devices=[
            device(flaky, 1, site="site-a", device="pv-flaky", kind="solar", poll_interval_s=0.2),
            device(steady, 1, site="site-a", device="grid", kind="meter", poll_interval_s=0.2),
        ],
        request_timeout_s=0.5,
        offline_after_failures=2,
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
    )
    async with flaky, steady, ModbusConnector(settings, config) as connector:
        runner = asyncio.create_task(connector.run())
        try:
            pv = connector.device_state("site-a", "pv-flaky")
            grid = connector.device_state("site-a", "grid")
            await eventually(lambda: pv.polls > 0 and grid.polls > 0)

            await flaky.stop()

            async def firing() -> bool:
                return any(a.status == AlertStatus.FIRING for a in await alerts(settings))

            await eventually(firing)
            assert connector.stats.devices_offline == 1
            # While pv-flaky is offline, the meter is still polled at its 0.2 s rate.
            polls_before, t0 = grid.polls, time.monotonic()
            await eventually(lambda: grid.polls >= polls_before + 5, timeout_s=5.0)
            elapsed_s = time.monotonic() - t0
            assert elapsed_s < 5 * 0.2 * 2.5, f"meter polls slowed down: {elapsed_s:.2f} s"

            await flaky.start()

            async def resolved() -> bool:
                return any(a.status == AlertStatus.RESOLVED for a in await alerts(settings))

            await eventually(resolved)
            resumed_after = connector.stats.polls_ok

            async def pv_readings_again() -> bool:
                return connector.stats.polls_ok > resumed_after + 2 and pv.outage_start is None

            await eventually(pv_readings_again)
        finally:
            await connector.stop()
            await runner
    sent = await alerts(settings)
    assert [a.status for a in sent] == [AlertStatus.FIRING, AlertStatus.RESOLVED]
    assert sent[0].alert_id == sent[1].alert_id
    assert sent[0].alert_type == "device_offline" and sent[0].severity == "warning"
    assert sent[0].device == "pv-flaky" and sent[1].end is not None
    assert connector.stats.devices_offline == 0
    # Readings of pv-flaky arrived both before the outage and after it ended.
    pv_times = [r.ts for b in await batches(settings) for r in b.readings if r.device == "pv-flaky"]
    assert min(pv_times) < sent[0].start < sent[1].end < max(pv_times)
