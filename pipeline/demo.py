"""``wattstream demo``: the whole path on one machine, with nothing to set up.

embedded broker -> the zone's carbon intensity (a generation-mix file, through the
carbon feed) and a replay of the bundled sample (telemetry + prices) -> every agent
(Faust, in this process) -> decisions, alerts, emissions, certificates... -> then the
night after the sample, EV charging over OCPP (:mod:`pipeline.demo_ev`: simulated
charge points, the CSMS, the fleet agent's setpoints as charging profiles) ->
InfluxDB sink (a server if ``WATTSTREAM_INFLUX_URL`` is set, else a
line-protocol file) -> a summary read back from the decisions topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import codec, kafka, topics
from pipeline.app import agent_input_topics, create_app
from pipeline.demo_ev import EvChargingResult, run_ev_charging, stage_start, task_error
from pipeline.local import EmbeddedBroker, with_embedded_broker
from pipeline.report import DecisionSummary, SiteCarbon, summarize, summarize_carbon
from pipeline.report_html import write_report
from pipeline.schemas import Alert, CertificateEvent, Decision, EmissionsRecord
from pipeline.settings import Settings
from sinks.influx import InfluxSink

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "data" / "sample"


@dataclass
class DemoResult:
    summary: DecisionSummary
    readings_replayed: int
    bad_rows: int
    prices_replayed: int
    intensities_sent: int
    points_written: int
    dead_letters: int
    influx_target: str
    elapsed_s: float
    broker: str
    report_path: Path | None = None
    carbon: dict[str, SiteCarbon] = field(default_factory=dict)
    ev_charging: EvChargingResult | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "readings_replayed": self.readings_replayed,
            "bad_rows": self.bad_rows,
            "prices_replayed": self.prices_replayed,
            "intensities_sent": self.intensities_sent,
            "points_written": self.points_written,
            "dead_letters": self.dead_letters,
            "influx_target": self.influx_target,
            "elapsed_s": round(self.elapsed_s, 2),
            "report": str(self.report_path) if self.report_path else None,
            "summary": self.summary.as_dict(),
            "carbon": {site: c.as_dict() for site, c in self.carbon.items()},
            "ev_charging": self.ev_charging.as_dict() if self.ev_charging else None,
        }


@dataclass
class Progress:
    """What the demo shows while it runs."""

    stage: str = "starting"
    readings_sent: int = 0
    readings_total: int = 0
    points_written: int = 0


ProgressCallback = Callable[[Progress], None]


def influx_target(settings: Settings) -> str:
    influx = settings.influx
    if influx.url:
        where = f"db {influx.database}" if influx.api == "v1" else f"bucket {influx.bucket}"
        return f"InfluxDB {influx.url} ({influx.api}, {where})"
    return f"line-protocol file {influx.file}"


async def run_pipeline(
    settings: Settings,
    telemetry_path: Path,
    prices_path: Path | None,
    on_progress: ProgressCallback | None = None,
    drain_timeout_s: float = 300.0,
    report_dir: Path | None = None,
    carbon_path: Path | None = None,
    ev_charging: bool = True,
) -> DemoResult:
    """Run replay, agents and sink against ``settings.broker`` until everything is stored.

    ``ev_charging``: then the EV stage (:mod:`pipeline.demo_ev`), if a site has a fleet.
    """
    # The demo composes every part; importing the connectors here keeps `pipeline` free of
    # an import-time dependency on `ingest`.
    from ingest.carbon import CarbonFeed, CarbonFeedConfig
    from ingest.replay import Replay

    started = time.monotonic()
    progress = Progress()

    def report(stage: str | None = None) -> None:
        if stage:
            progress.stage = stage
        if on_progress:
            on_progress(progress)

    report("connecting to the broker")
    await kafka.wait_for_broker(settings)
    await kafka.ensure_topics(settings)
    app = create_app(settings)
    sink = InfluxSink(settings)
    report("starting agents (consumer group join takes a few seconds)")
    await app.start()
    sink_task = asyncio.create_task(sink.run(), name="influx-sink")
    try:

        def on_replay(stats: Any) -> None:
            progress.readings_sent = stats.readings_sent
            progress.readings_total = stats.readings_total
            progress.points_written = sink.stats.points_written
            report()

        intensities_sent = 0
        if carbon_path is not None:
            # Intensities first: they are forecasts published ahead, as the day-ahead prices
            # are, so follow-the-sun can judge each hour when the replay reaches it.
            report("sending the grid's carbon intensity")
            async with CarbonFeed(settings, CarbonFeedConfig(source=str(carbon_path))) as feed:
                await feed.poll_once()
            if feed.stats.last_error:
                raise RuntimeError(f"carbon file {carbon_path}: {feed.stats.last_error}")
            intensities_sent = feed.stats.sent
            # At full replay speed telemetry would otherwise race days of event time past
            # intensities still in the fan-out, and hours would be filled with the last
            # known intensity (the live stream has them hours ahead).
            await kafka.wait_until_drained(
                settings,
                {
                    settings.app_id: [
                        settings.topic(topics.CARBON),
                        settings.topic(topics.SITE_CARBON),
                    ]
                },
                timeout_s=drain_timeout_s,
                failed=lambda: app.crash_reason,
            )

        report("replaying the sample")
        replay = Replay(settings, telemetry_path, prices_path, on_progress=on_replay)
        replay_stats = await replay.run()

        ev_result = None
        if ev_charging:
            report("waiting for the agents to reach the end of the sample")
            # The night after the sample: the depot's readings must stay in event order.
            await kafka.wait_until_drained(
                settings,
                {settings.app_id: [settings.topic(topics.TELEMETRY)]},
                timeout_s=drain_timeout_s,
                failed=lambda: app.crash_reason,
            )
            ev_result = await run_ev_charging(
                settings,
                stage_start(replay_stats.last_event_ms),
                group_id=settings.app_id,
                failed=lambda: app.crash_reason or task_error(sink_task),
                on_stage=report,
                drain_timeout_s=drain_timeout_s,
            )

        report("waiting for agents and sink to catch up")
        watcher = asyncio.create_task(_watch_sink(sink, progress, report))
        try:
            await kafka.wait_until_drained(
                settings,
                {
                    settings.app_id: agent_input_topics(settings),
                    sink.group_id: sink.topic_names,
                },
                timeout_s=drain_timeout_s,
                failed=lambda: app.crash_reason or task_error(sink_task),
            )
        finally:
            watcher.cancel()
        await sink.stop()
        await sink_task
    finally:
        if not sink_task.done():
            sink_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sink_task
        await app.stop()

    report("summarising")
    decisions = [
        codec.decode(Decision, value)
        for _, value in await kafka.read_all(settings, topics.DECISIONS)
    ]
    dead_letters = len(await kafka.read_all(settings, topics.DEAD_LETTERS))
    carbon = summarize_carbon(
        [
            codec.decode(EmissionsRecord, value)
            for _, value in await kafka.read_all(settings, topics.EMISSIONS)
        ],
        [
            codec.decode(CertificateEvent, value)
            for _, value in await kafka.read_all(settings, topics.CERTIFICATES)
        ],
        [codec.decode(Alert, value) for _, value in await kafka.read_all(settings, topics.ALERTS)],
    )
    report_path = write_report(decisions, report_dir / "report.html") if report_dir else None
    return DemoResult(
        summary=summarize(decisions),
        readings_replayed=replay_stats.readings_sent,
        bad_rows=replay_stats.bad_rows,
        prices_replayed=replay_stats.prices_sent,
        intensities_sent=intensities_sent,
        points_written=sink.stats.points_written,
        dead_letters=dead_letters,
        influx_target=influx_target(settings),
        elapsed_s=time.monotonic() - started,
        broker=str(settings.broker),
        report_path=report_path,
        carbon=carbon,
        ev_charging=ev_result,
    )


async def _watch_sink(sink: InfluxSink, progress: Progress, report: Callable[[], None]) -> None:
    while True:
        progress.points_written = sink.stats.points_written
        report()
        await asyncio.sleep(0.25)


def run_demo(
    settings: Settings,
    telemetry_path: Path,
    prices_path: Path | None,
    on_progress: ProgressCallback | None = None,
    report_dir: Path | None = Path("out"),
    carbon_path: Path | None = None,
    ev_charging: bool = True,
) -> DemoResult:
    """The demo, starting the embedded broker when no broker is configured."""

    def pipeline(on: Settings) -> DemoResult:
        return asyncio.run(
            run_pipeline(
                on,
                telemetry_path,
                prices_path,
                on_progress,
                report_dir=report_dir,
                carbon_path=carbon_path,
                ev_charging=ev_charging,
            )
        )

    if not settings.embedded_broker:
        return pipeline(settings)
    with EmbeddedBroker() as broker:
        return pipeline(with_embedded_broker(settings, broker))
