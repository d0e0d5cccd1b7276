"""Scope 2, certificates and follow-the-sun on the real embedded broker, across a restart
and a replayed stretch of telemetry.

One plant with a meter and a PV array, in zone Z and market M. Six hours of intensities
and prices go to the carbon and prices topics (keyed by zone and market: the fan-out
agents re-key them by site); then six hours of five-minute readings go to workers built
by ``create_app``: the first four hours to one, then hours three to six (hour three a
second time, as a replay would send it) to a new worker that resumes from the tables.
What lands on the emissions and certificates topics must be what the plain-Python engines
give over the same data, with no certificate minted or burned twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline import codec, kafka, topics
from pipeline.app import agent_input_topics, create_app
from pipeline.local import EmbeddedBroker
from pipeline.schemas import (
    Alert,
    CarbonIntensity,
    CertificateAction,
    CertificateEvent,
    Command,
    DeadLetter,
    EmissionsRecord,
    MeterReading,
    PriceTick,
    Reading,
    SolarReading,
    TelemetryBatch,
)
from pipeline.settings import Settings
from processors.carbon import CarbonEngine, carbon_settings, certify_with_ledger
from processors.certificates import CertificateLedger, apply, balance, certificate_settings, totals
from tests.conftest import SettingsFactory
from tests.workers import run_worker

pytestmark = pytest.mark.integration

SITE, ZONE, MARKET = "plant", "Z", "M"
T0 = datetime(2025, 6, 2, 6, tzinfo=UTC)
HOUR = timedelta(hours=1)
STEP = timedelta(minutes=5)
# Hours 2 and 3 are clean (70 % renewable) and cheap (0.04): one follow-the-sun window.
SHARES = [30.0, 35.0, 70.0, 72.0, 40.0, 30.0]
PRICES = [0.12, 0.10, 0.04, 0.03, 0.11, 0.15]


def readings(first_hour: int, last_hour: int) -> list[Reading]:
    """Meter and PV every 5 min from ``first_hour`` to ``last_hour`` (inclusive, at :00)."""
    out: list[Reading] = []
    ts = T0 + first_hour * HOUR
    while ts <= T0 + last_hour * HOUR:
        k = int((ts - T0) / STEP)
        solar_kw = 2.0 + 0.5 * (k % 7)  # some kWh every hour
        load_kw = 4.0 + 0.25 * (k % 5)
        out += [
            MeterReading(device="meter-1", ts=ts, power_kw=load_kw - solar_kw),
            SolarReading(device="pv-1", ts=ts, power_kw=solar_kw, irradiance_w_m2=500.0),
        ]
        ts += STEP
    return out


def batches(items: list[Reading], size: int = 24) -> list[TelemetryBatch]:
    return [
        TelemetryBatch(
            batch_id=f"b-{int(items[i].ts.timestamp())}",
            site=SITE,
            source="test",
            readings=items[i : i + size],
        )
        for i in range(0, len(items), size)
    ]


def grid() -> tuple[list[CarbonIntensity], list[PriceTick]]:
    intensities = [
        CarbonIntensity(
            zone=ZONE,
            start=T0 + h * HOUR,
            end=T0 + (h + 1) * HOUR,
            co2_g_per_kwh=400.0 - 3 * share,
            renewable_share_pct=share,
        )
        for h, share in enumerate(SHARES)
    ]
    ticks = [
        PriceTick(market=MARKET, start=T0 + h * HOUR, end=T0 + (h + 1) * HOUR, price_per_kwh=p)
        for h, p in enumerate(PRICES)
    ]
    return intensities, ticks


def site_settings(make_settings: SettingsFactory, broker: EmbeddedBroker) -> Settings:
    return make_settings(
        broker=broker.bootstrap,
        sites=[
            {
                "id": SITE,
                "market": MARKET,
                "detection": {"enabled": False},
                "carbon": {"zone": ZONE, "residual_mix_co2_g_per_kwh": 450.0},
                "certificates": {"unit_kwh": 1.0},
                "follow_sun": {
                    "jobs": [{"device": "shredder", "power_kw": 15.0, "min_run_min": 60}],
                    "max_price_per_kwh": 0.05,
                },
            }
        ],
        kafka={"one_record_per_batch": True, "session_timeout_s": 2, "heartbeat_interval_s": 0.5},
    )


async def run(settings: Settings, records: list[tuple[str, str, bytes]]) -> None:
    await run_worker(create_app(settings), settings, records, agent_input_topics(settings))


def telemetry_records(settings: Settings, sent: list[TelemetryBatch]) -> list[Any]:
    return [(settings.topic(topics.TELEMETRY), SITE, codec.encode(b)) for b in sent]


async def read(settings: Settings, spec: topics.TopicSpec, model: type[Any]) -> list[Any]:
    return [codec.decode(model, value) for _, value in await kafka.read_all(settings, spec)]


async def test_scope2_and_certificates_survive_a_restart_and_a_replayed_stretch(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = site_settings(make_settings, kafka_broker)
    await kafka.ensure_topics(settings)
    intensities, ticks = grid()
    feeds: list[tuple[str, str, bytes]] = [
        (settings.topic(topics.CARBON), ZONE, codec.encode(i)) for i in intensities
    ]
    feeds += [(settings.topic(topics.PRICES), MARKET, codec.encode(t)) for t in ticks]
    # An intensity that is not one: dead-lettered with its reason, the stream goes on.
    feeds.append((settings.topic(topics.CARBON), ZONE, b'{"zone": "Z", "co2_g_per_kwh": -5}'))
    await run(settings, feeds)
    await run(settings, telemetry_records(settings, batches(readings(0, 4))))
    # A new worker; hour 3 comes again (a replay overlapping what was processed).
    await run(settings, telemetry_records(settings, batches(readings(3, 6))))

    records = await read(settings, topics.EMISSIONS, EmissionsRecord)
    events = await read(settings, topics.CERTIFICATES, CertificateEvent)
    commands = await read(settings, topics.COMMANDS, Command)
    alerts = await read(settings, topics.ALERTS, Alert)
    letters = await read(settings, topics.DEAD_LETTERS, DeadLetter)

    # The same code over the same data, in one piece and with no broker.
    site = settings.sites[0]
    book = CertificateLedger(SITE)
    want_events: list[CertificateEvent] = []
    engine = CarbonEngine(
        SITE,
        carbon_settings(site),  # type: ignore[arg-type]
        certify=certify_with_ledger(
            lambda: book,
            certificate_settings(site),  # type: ignore[arg-type]
            SITE,
            want_events,
        ),
    )
    want: list[EmissionsRecord] = []
    for intensity in intensities:
        want += engine.add_intensity(intensity)
    want += engine.add_readings(readings(0, 6))
    assert [r.start for r in want] == [T0 + h * HOUR for h in range(6)]

    unique = {r.record_id: r for r in records}
    assert sorted(unique.values(), key=lambda r: r.start) == want
    assert {e.event_id: e for e in events} == {e.event_id: e for e in want_events}
    # Each certificate minted once and burned at most once; the ledger balances.
    by_certificate = Counter(
        (e.certificate_id, e.action) for e in {e.event_id: e for e in events}.values()
    )
    assert max(by_certificate.values()) == 1
    assert by_certificate.keys() >= {(e.certificate_id, CertificateAction.MINT) for e in events}
    ledger = CertificateLedger(SITE)
    for event in events:
        apply(ledger, event)
    sums = totals(ledger)
    assert sums.minted_mwh > 0 and sums.burned_mwh > 0
    assert sums.minted_mwh == pytest.approx(sums.burned_mwh + balance(ledger) + sums.expired_mwh)
    # Uncovered grid energy counts at the residual mix (450 g/kWh); in hours where more
    # certificates were burned than the solar the plant consumed, less than that.
    at_residual = [r.grid_energy_kwh * 0.450 for r in want]
    market = [r.market_based_kg_co2 for r in want]
    assert all(m <= a + 1e-9 for m, a in zip(market, at_residual, strict=True))
    assert any(m < a - 1e-6 for m, a in zip(market, at_residual, strict=True))

    # Follow-the-sun: one window, hours 2-3; the shredder starts at 2:00, stops at 4:00.
    shredder = sorted({(c.action, c.issued_at, c.dry_run) for c in commands})
    assert shredder == [
        ("start_job", T0 + 2 * HOUR, True),
        ("stop_job", T0 + 4 * HOUR, True),
    ]
    assert {(a.alert_type, a.status.value) for a in alerts} == {
        ("follow_the_sun", "firing"),
        ("follow_the_sun", "resolved"),
    }
    assert [letter.source_topic for letter in letters] == [settings.topic(topics.CARBON)]
    assert "co2_g_per_kwh" in letters[0].reason

    # `wattstream certificates` rebuilds the same ledger from the topic.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    env.update(
        WATTSTREAM_BROKER=str(settings.broker), WATTSTREAM_TOPIC_PREFIX=settings.topic_prefix
    )
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline.cli",
        "certificates",
        "--json",
        "--by",
        "day",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=60)
    assert cli.returncode == 0, stderr.decode()
    report = json.loads(stdout)[SITE]
    assert report["balance_mwh"] == pytest.approx(balance(ledger), abs=1e-6)
    (day,) = report["periods"]
    assert day["start"] == T0.replace(hour=0).isoformat()
    assert (day["minted_mwh"], day["burned_mwh"]) == pytest.approx(
        (sums.minted_mwh, sums.burned_mwh), abs=1e-6
    )
    assert report["certificates"]["burned"] == by_certificate_count(events, CertificateAction.BURN)


def by_certificate_count(events: list[CertificateEvent], action: CertificateAction) -> int:
    return len({e.certificate_id for e in events if e.action is action})
