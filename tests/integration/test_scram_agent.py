"""The SCRAM agent on the real embedded broker, with a real Faust worker that restarts.

Two sites: ``reactor-site`` with a ``[sites.fusion]`` section (live commands) and
``lab-2`` without one (protected with the defaults, dry-run). Telemetry is the
reactor simulator's shots plus a synthetic sustained instability, mixed with
battery batches and an unparseable record that merely mentions fusion.

The worker is stopped in the middle of two incidents and a new one takes over,
recovering the agent's table from its changelog: the open quench incident must
not SCRAM a second time (it resolves under the same id), and the instability
clock started before the restart must still count. What the agent sends must be
exactly what the plain detector gives for the same input, in order.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import faust
import pytest

from ingest.simulators.fusion import Scenario, fusion_series
from pipeline import codec, kafka, topics
from pipeline.app import faust_config
from pipeline.local import EmbeddedBroker
from pipeline.schemas import (
    Alert,
    AlertStatus,
    BatteryReading,
    Command,
    FusionReading,
    Reading,
    Severity,
    TelemetryBatch,
)
from pipeline.settings import Settings, SettingsError
from processors import scram
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration

START = datetime(2025, 3, 1, tzinfo=UTC)
SITE, OTHER = "reactor-site", "lab-2"
SITES: list[dict[str, Any]] = [
    {"id": SITE, "market": "M", "fusion": {"commands": "live", "resolve_after_s": 5.0}},
    {"id": OTHER, "market": "M"},  # no fusion section: the defaults still protect it
]


def app_with_scram(settings: Settings) -> faust.App:
    """A worker with only the SCRAM agent (pipeline.app.create_app will register it too)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(settings.app_id, **faust_config(settings))
    scram.register(app, settings)
    return app


def shots() -> tuple[dict[str, list[FusionReading]], datetime]:
    """Each site's fusion readings (1 Hz), and the event time at which the worker restarts."""
    quench = fusion_series(Scenario.QUENCH, START, 600.0, 1.0, seed=7, device="tok-1")
    assert quench.fault_onset is not None
    onset = quench.fault_onset
    # tok-2: a steady plasma whose stability sits at 0.79 (below the 0.8 warning level)
    # from the quench onset for 4 s: unstable once 2 s have passed, i.e. after the restart.
    steady = {"plasma_temp_kev": 15.0, "q_factor": 0.6, "magnetic_field_t": 5.3}
    tok2 = [
        FusionReading(
            device="tok-2",
            ts=START + timedelta(seconds=s),
            confinement_stability=0.79
            if onset <= START + timedelta(seconds=s) < onset + timedelta(seconds=4)
            else 0.93,
            **steady,
        )
        for s in range(600)
    ]
    disruption = fusion_series(Scenario.DISRUPTION, START, 600.0, 1.0, seed=4, device="tok-9")
    restart_at = onset + timedelta(seconds=1.5)
    return {SITE: quench.readings + tok2, OTHER: disruption.readings}, restart_at


def batches(site: str, readings: list[Reading], tag: str) -> list[TelemetryBatch]:
    ordered = sorted(readings, key=lambda r: r.ts)
    return [
        TelemetryBatch(
            batch_id=f"{site}-{tag}-{n}", site=site, source="test", readings=ordered[i : i + 20]
        )
        for n, i in enumerate(range(0, len(ordered), 20))
    ]


def phases() -> list[list[tuple[str, bytes]]]:
    """(key, value) records before and after the restart."""
    by_site, restart_at = shots()
    out: list[list[tuple[str, bytes]]] = []
    for tag, keep in (("a", lambda r: r.ts < restart_at), ("b", lambda r: r.ts >= restart_at)):
        records = [
            (site, codec.encode(batch))
            for site, readings in by_site.items()
            for batch in batches(site, [r for r in readings if keep(r)], tag)
        ]
        # Telemetry the agent must skip: a battery batch, and bytes that only mention fusion.
        battery = BatteryReading(device="bat", ts=restart_at, power_kw=1.0, soc_pct=50.0)
        records.append(
            (
                SITE,
                codec.encode(
                    TelemetryBatch(batch_id=f"bat-{tag}", site=SITE, source="t", readings=[battery])
                ),
            )
        )
        records.append((SITE, b'{"not": "a batch", "kind": "fusion"'))
        out.append(records)
    return out


def expected(settings: Settings, records: list[tuple[str, bytes]]) -> dict[str, list[Any]]:
    """What the plain detector gives per site, one batch after another."""
    detectors = scram.Detectors(settings)
    states: dict[str, scram.SiteScramState] = {}
    out: dict[str, list[Any]] = {}
    for key, value in records:
        site, readings = scram.parse_fusion(value)
        if not readings or site is None:
            continue
        detector = detectors.get(site)
        assert detector is not None
        state = states.setdefault(key, scram.SiteScramState())
        out.setdefault(site, []).extend(detector.on_readings(state, readings))
    return out


async def run_worker(settings: Settings, records: list[tuple[str, bytes]]) -> None:
    app = app_with_scram(settings)
    await app.start()
    try:
        producer = kafka.producer(settings)
        await producer.start()
        try:
            for key, value in records:
                await producer.send_and_wait(
                    settings.topic(topics.TELEMETRY), value, key=key.encode()
                )
        finally:
            await producer.stop()
        await kafka.wait_until_drained(
            settings,
            {settings.app_id: [settings.topic(topics.TELEMETRY)]},
            timeout_s=30,
            settle_s=0.5,
            failed=lambda: app.crash_reason,
        )
        assert app.crash_reason is None
    finally:
        await app.stop()


async def test_scram_agent_matches_the_detector_and_survives_a_restart(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        sites=SITES,
        # The embedded broker's end offsets are only right with one record per batch,
        # and table recovery depends on them. Short sessions: a join takes ~half of it.
        kafka={
            "one_record_per_batch": True,
            "session_timeout_s": 2.0,
            "heartbeat_interval_s": 0.5,
            "rebalance_timeout_s": 2.0,
        },
    )
    await kafka.ensure_topics(settings)
    before, after = phases()
    await run_worker(settings, before)
    mid_alerts = [codec.decode(Alert, v) for _, v in await kafka.read_all(settings, topics.ALERTS)]
    await run_worker(settings, after)  # a new worker: its table comes from the changelog

    alerts = [codec.decode(Alert, v) for _, v in await kafka.read_all(settings, topics.ALERTS)]
    commands = [
        codec.decode(Command, v) for _, v in await kafka.read_all(settings, topics.COMMANDS)
    ]
    want = expected(settings, before + after)
    for site in (SITE, OTHER):
        assert [a for a in alerts if a.site == site] == [
            a for a in want[site] if isinstance(a, Alert)
        ]
        assert [c for c in commands if c.site == site] == [
            c for c in want[site] if isinstance(c, Command)
        ]

    # One SCRAM per incident, each resolved under its own id.
    by_device = {
        device: [(a.status, a.alert_id) for a in alerts if a.device == device]
        for device in ("tok-1", "tok-2", "tok-9")
    }
    for device, events in by_device.items():
        assert [status for status, _ in events] == [
            AlertStatus.FIRING,
            AlertStatus.RESOLVED,
        ], device
        assert events[0][1] == events[1][1]
    assert all(a.severity is Severity.CRITICAL and a.alert_type == "scram" for a in alerts)

    # The restart split two incidents: the quench fired before it and resolved after it
    # (no second SCRAM from the new worker); the instability fired after it, counted from
    # a clock that started before it.
    assert [(a.device, a.status) for a in mid_alerts] == [("tok-1", AlertStatus.FIRING)]
    (unstable,) = [a for a in alerts if a.device == "tok-2" and a.status is AlertStatus.FIRING]
    assert unstable.details["rules"] == "unstable_sustained"
    _, restart_at = shots()
    assert datetime.fromisoformat(str(unstable.details["unstable_since_ts"])) < restart_at
    assert unstable.start > restart_at

    # Live commands where the site says so; the unconfigured site's are dry-run.
    assert sorted((c.device, c.dry_run, c.action) for c in commands) == [
        ("tok-1", False, "scram"),
        ("tok-2", False, "scram"),
        ("tok-9", True, "scram"),
    ]


def test_a_bad_fusion_section_fails_at_start_up_naming_the_setting(
    make_settings: SettingsFactory,
) -> None:
    bad = [{"id": SITE, "market": "M", "fusion": {"temp_max_kev": 0}}]
    settings = make_settings(broker="127.0.0.1:1", sites=bad)
    with pytest.raises(SettingsError, match=r"sites\[reactor-site\]\.fusion\.temp_max_kev"):
        app_with_scram(settings)
