"""The ``wattstream`` command.

Every command takes ``--config FILE.toml`` (or ``WATTSTREAM_CONFIG``); settings
errors end the command with exit code 2 and a message naming the setting.
Commands that report something take ``--json`` for scripts and tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from pipeline import logs, schemas, topics
from pipeline.cli_backtest import backtest
from pipeline.cli_certificates import certificates
from pipeline.cli_dashboards import dashboards_group
from pipeline.cli_detect import detect
from pipeline.cli_detectors import evaluate_detectors
from pipeline.cli_ingest import ingest_group
from pipeline.cli_patents import patents_group
from pipeline.cli_status import status
from pipeline.settings import Settings, SettingsError, load_settings

log = logging.getLogger("wattstream")

EXIT_USAGE = 2
DEFAULT_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


class Context:
    def __init__(self, config: Path | None) -> None:
        self.config = config

    def settings(self, **overrides: Any) -> Settings:
        try:
            return load_settings(self.config, **overrides)
        except SettingsError as error:
            click.echo(f"wattstream: {error}", err=True)
            sys.exit(EXIT_USAGE)


def setup_logging(level: str, file: Path | None = None, settings: Settings | None = None) -> None:
    """Records to stderr or ``file``: text on a terminal, JSON lines otherwise (see
    :mod:`pipeline.logs`), with the settings' secrets masked."""
    logs.setup_logging(
        level,
        file,
        log_format=settings.log_format if settings is not None else "auto",
        secrets=settings.secret_values() if settings is not None else (),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="WATTSTREAM_CONFIG",
    help="TOML settings file (env WATTSTREAM_CONFIG). Environment variables override it.",
)
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """wattstream: stream-processing telemetry pipeline for energy assets."""
    ctx.obj = Context(config)


# --- demo -------------------------------------------------------------------------------


@main.command()
@click.option(
    "--telemetry",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=DEFAULT_SAMPLE / "telemetry.parquet",
    show_default=True,
    help="Telemetry file to replay (CSV or Parquet, long format).",
)
@click.option(
    "--prices",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=DEFAULT_SAMPLE / "prices.csv",
    show_default=True,
    help="Price file to replay.",
)
@click.option(
    "--carbon",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=DEFAULT_SAMPLE / "carbon.csv",
    show_default=True,
    help="Carbon intensity (or generation mix) file for the sites' zone.",
)
@click.option(
    "--ev/--no-ev",
    "ev_charging",
    default=True,
    show_default=True,
    help="End with the fleet's EVs charging over OCPP (simulated charge points).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
def demo(
    obj: Context, telemetry: Path, prices: Path, carbon: Path, ev_charging: bool, as_json: bool
) -> None:
    """Run the whole pipeline on the bundled sample and print a summary.

    With no WATTSTREAM_BROKER it starts the embedded broker. Points go to
    InfluxDB when WATTSTREAM_INFLUX_URL is set, otherwise to a line-protocol file.
    """
    from pipeline.demo import influx_target, run_demo
    from pipeline.terminal import DemoProgress, print_demo_result

    if obj.config is None and (DEFAULT_SAMPLE / "wattstream.toml").is_file():
        obj.config = DEFAULT_SAMPLE / "wattstream.toml"
    settings = obj.settings()
    setup_logging(settings.log_level, file=Path("out/demo.log"), settings=settings)
    if not as_json:
        click.echo(
            f"wattstream demo: {telemetry.name} + {prices.name} + {carbon.name}"
            f" -> {influx_target(settings)}"
        )
        click.echo("logs: out/demo.log")
    try:
        with DemoProgress(enabled=not as_json) as progress:
            result = run_demo(
                settings,
                telemetry,
                prices,
                on_progress=progress.update,
                carbon_path=carbon,
                ev_charging=ev_charging,
            )
    except SettingsError as error:  # a site's processor section, checked as the app is built
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(EXIT_USAGE)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        print_demo_result(result)


# --- worker and broker ------------------------------------------------------------------


@main.command()
@click.option(
    "--sinks/--no-sinks",
    default=True,
    show_default=True,
    help="Also run the sinks (InfluxDB, webhooks). --no-sinks runs the agents only, so "
    "agents and sinks can be scaled apart: the sinks then run in other workers.",
)
@click.pass_obj
def worker(obj: Context, sinks: bool) -> None:
    """Run the Faust agents and sinks until stopped (SIGTERM or Ctrl-C).

    With no WATTSTREAM_BROKER it starts the embedded in-memory broker first. A
    configured broker that does not answer yet is waited for, with a warning per
    attempt, for as long as WATTSTREAM_KAFKA_START_TIMEOUT_S says (0: no limit).
    """
    from faust.worker import Worker

    from pipeline import kafka
    from pipeline.app import create_app
    from pipeline.local import EmbeddedBroker, with_embedded_broker

    settings = obj.settings()
    setup_logging(settings.log_level, settings=settings)
    _check_paths(settings, sinks)
    broker = None
    if settings.embedded_broker:
        broker = EmbeddedBroker().start()
        settings = with_embedded_broker(settings, broker)
        log.warning("no WATTSTREAM_BROKER set: started the embedded broker at %s", broker.bootstrap)
    try:
        # Building the app validates the sites' processor sections (no network yet): a
        # bad one must stop start-up now, not after a long wait for the broker.
        try:
            app = create_app(settings, with_sinks=sinks)
        except SettingsError as error:
            click.echo(f"wattstream: {error}", err=True)
            sys.exit(EXIT_USAGE)
        try:
            asyncio.run(_prepare_broker(settings))
        except kafka.BrokerWaitStopped as error:
            click.echo(f"wattstream: {error}", err=True)
            sys.exit(0)
        except (ConnectionError, kafka.TopicMismatchError) as error:
            click.echo(f"wattstream: {error}", err=True)
            sys.exit(1)
        log.info(
            "worker %s starting: broker %s%s",
            settings.app_id,
            kafka.bootstrap_servers(settings),
            "" if sinks else ", agents only (--no-sinks)",
        )
        # Our logging (JSON lines off a terminal, batch ids, secrets masked), not mode's.
        faust_worker = Worker(
            app,
            loglevel=settings.log_level,
            quiet=True,
            redirect_stdouts=False,
            override_logging=False,
        )
        # Faust's terminal spinner, at WARNING and above, sets the root logger to DEBUG so
        # that it spins for every record: every debug line of aiokafka was then built and
        # dropped, a tenth of a busy worker's time.
        faust_worker.spinner = None
        faust_worker.execute_from_commandline()
    finally:
        if broker is not None:
            broker.stop()


def _check_paths(settings: Settings, sinks: bool) -> None:
    """The worker's directories can be made: else exit 2 naming the setting, no traceback."""
    paths = [("data_dir", settings.data_dir)]
    if sinks and settings.influx.url is None:
        paths.append(("influx.file", settings.influx.file.parent))
    for name, path in paths:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            variable = "WATTSTREAM_" + name.replace(".", "_").upper()
            click.echo(
                f"wattstream: invalid settings:\n  {name} (env {variable}): cannot create "
                f"directory {str(path)!r}: {error.strerror or error}",
                err=True,
            )
            sys.exit(EXIT_USAGE)


async def _prepare_broker(settings: Settings) -> None:
    from pipeline import kafka

    await kafka.wait_for_broker_at_start(settings, long_running=True)
    created = await kafka.ensure_topics(settings)
    if created:
        log.info("created topics: %s", ", ".join(created))


@main.command()
@click.option("--port", type=int, default=9092, show_default=True, help="Port on 127.0.0.1.")
def broker(port: int) -> None:
    """Run the embedded Kafka-compatible broker (in memory) in the foreground."""
    from pipeline.local import EmbeddedBroker

    with EmbeddedBroker(port=port) as embedded:
        click.echo(
            f"embedded broker listening on {embedded.bootstrap} (pid {embedded.pid}); "
            "Ctrl-C stops it"
        )
        # Only the embedded broker turns the end-offset workaround on by itself.
        click.echo(
            f"use it with: export WATTSTREAM_BROKER={embedded.bootstrap} "
            "WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH=true"
        )
        stop = asyncio.Event()

        async def wait() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()

        asyncio.run(wait())


# --- replay -----------------------------------------------------------------------------


def _speed(_ctx: click.Context, _param: click.Parameter, value: str) -> float | None:
    """Parse --speed before anything connects: a typo must not wait for a broker first."""
    if value == "max":
        return None
    try:
        speed = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'max'") from None
    if speed <= 0:
        raise click.BadParameter("must be positive")
    return speed


@main.command()
@click.argument(
    "telemetry", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=False
)
@click.option("--prices", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--market", help="Market of the price file when it has no market column.")
@click.option(
    "--speed",
    default="max",
    show_default=True,
    callback=_speed,
    help="Event-time speed-up factor, or 'max'.",
)
@click.option(
    "--rebase-time",
    is_flag=True,
    help="Shift every event time by one delta so the first event is now.",
)
@click.option(
    "--loop",
    is_flag=True,
    help="Repeat until stopped (Ctrl-C), each round shifted by the file's span.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def replay(
    obj: Context,
    telemetry: Path | None,
    prices: Path | None,
    market: str | None,
    speed: float | None,
    rebase_time: bool,
    loop: bool,
    as_json: bool,
) -> None:
    """Replay a telemetry file (and a price file), or a recording made by
    `wattstream record`, into the configured broker."""
    from ingest.replay import Replay, ReplayFileError
    from pipeline import kafka

    if telemetry is None and prices is None:
        raise click.UsageError("give a TELEMETRY file, --prices FILE, or both")
    settings = obj.settings()
    setup_logging(settings.log_level, settings=settings)
    _require_broker(settings, "replay")
    replayer = Replay(
        settings,
        telemetry,
        prices,
        market=market,
        speed=speed,
        rebase_time=rebase_time,
        loop=loop,
    )

    async def run() -> Any:
        # Long-running (--loop, or a paced file): it waits for a late broker like a worker.
        await kafka.wait_for_broker_at_start(settings, long_running=True)
        _stop_on_signals(replayer.stop)
        await kafka.ensure_topics(settings)
        return await replayer.run()

    try:
        stats = asyncio.run(run())
    except kafka.BrokerWaitStopped as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(0)
    except (ReplayFileError, ConnectionError, kafka.TopicMismatchError) as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(1)
    result = {
        "readings_sent": stats.readings_sent,
        "batches_sent": stats.batches_sent,
        "prices_sent": stats.prices_sent,
        "bad_rows": stats.bad_rows,
        "elapsed_s": round(stats.elapsed_s, 3),
    }
    if stats.records_sent:
        result["records_sent"] = stats.records_sent
    if loop:
        result["rounds"] = stats.rounds
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in result.items()))
        for sample in stats.bad_row_samples:
            click.echo(f"  bad {sample}", err=True)


def _require_broker(settings: Settings, command: str) -> None:
    if settings.embedded_broker:
        click.echo(
            f"wattstream: {command} needs a broker: set WATTSTREAM_BROKER "
            "(or run `wattstream broker` in another terminal, or `wattstream demo`)",
            err=True,
        )
        sys.exit(EXIT_USAGE)


def _stop_on_signals(stop: Any) -> None:
    """Ctrl-C and SIGTERM call ``stop`` (a clean end) instead of raising mid-write."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


# --- record -----------------------------------------------------------------------------


@main.command()
@click.option(
    "--topic",
    "topic_names",
    multiple=True,
    required=True,
    help="Topic to capture, by registry name (telemetry, prices, ...) or full name; repeatable.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Parquet file to write.",
)
@click.option("--from-beginning", is_flag=True, help="Start at the oldest retained record.")
@click.option(
    "--to-end",
    is_flag=True,
    help="Stop once every partition reached the end offset it had when the capture began.",
)
@click.option("--max-records", type=click.IntRange(min=1), help="Stop after this many records.")
@click.option(
    "--duration-s",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop after this many seconds.",
)
@click.option(
    "--flatten",
    is_flag=True,
    help="Telemetry only: write readings in the long format (time, site, device, kind, "
    "fields) instead of raw records.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def record(
    obj: Context,
    topic_names: tuple[str, ...],
    out: Path,
    from_beginning: bool,
    to_end: bool,
    max_records: int | None,
    duration_s: float | None,
    flatten: bool,
    as_json: bool,
) -> None:
    """Capture topics into a Parquet file, until a limit or Ctrl-C (which keeps what was read).

    The raw format (one row per Kafka record: topic, partition, offset,
    timestamp_ms, key, value) replays with `wattstream replay FILE`.
    """
    from ingest.record import Recorder, RecordError, RecordStats
    from pipeline import kafka

    settings = obj.settings()
    setup_logging(settings.log_level, settings=settings)
    _require_broker(settings, "record")

    def progress(stats: RecordStats) -> None:
        if not as_json:
            counts = " ".join(f"{name}={n}" for name, n in stats.per_topic.items())
            click.echo(f"recording... records={stats.records} {counts}", err=True)

    try:
        recorder = Recorder(
            settings,
            topic_names,
            out,
            from_beginning=from_beginning,
            to_end=to_end,
            max_records=max_records,
            duration_s=duration_s,
            flatten=flatten,
            on_progress=progress,
        )
    except RecordError as error:
        raise click.UsageError(str(error)) from None

    async def run() -> RecordStats:
        await kafka.wait_for_broker_at_start(settings, long_running=False)
        _stop_on_signals(recorder.stop)
        # A live capture of a topic nobody created yet would otherwise fail; creating
        # it is what the worker and replay do too.
        await kafka.ensure_topics(settings, recorder.specs)
        return await recorder.run()

    try:
        stats = asyncio.run(run())
    except kafka.BrokerWaitStopped as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(0)
    except (ConnectionError, RecordError, kafka.TopicMismatchError) as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(1)
    result = {
        "out": str(out),
        "records": stats.records,
        "rows_written": stats.rows_written,
        "per_topic": stats.per_topic,
        "stopped_by": stats.stopped_by,
        "elapsed_s": round(stats.elapsed_s, 3),
    }
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in result.items() if k != "per_topic"))


# --- simulate ---------------------------------------------------------------------------


@main.group("simulate")
def simulate_group() -> None:
    """Device simulators: MQTT telemetry, SunSpec over Modbus, OCPP charge points."""


def _simulator_options(function: Any) -> Any:
    """Options every MQTT simulator takes (pacing, where to publish)."""
    for option in reversed(
        [
            click.option("--url", default="mqtt://localhost:1883", show_default=True),
            click.option("--site", help="Site id in the topics."),
            click.option(
                "--topic",
                default="sites/{site}/{kind}/{device}",
                show_default=True,
                help="Topic pattern.",
            ),
            click.option(
                "--speed",
                type=float,
                default=60.0,
                show_default=True,
                help="Simulated seconds per wall-clock second.",
            ),
            click.option(
                "--step-s",
                type=float,
                help="Simulated seconds between two readings of a device.",
            ),
            click.option(
                "--duration-s",
                type=float,
                help="Simulated seconds to cover (default: until Ctrl-C).",
            ),
            click.option(
                "--start",
                type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M%z"]),
                help="First simulated instant with its UTC offset (default: now).",
            ),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        ]
    ):
        function = option(function)
    return function


def _publisher_config(**values: Any) -> Any:
    """A PublisherConfig from CLI values; a bad value exits 2 before any network work."""
    from pydantic import ValidationError

    from ingest.simulators.mqtt_publisher import PublisherConfig

    try:
        return PublisherConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as error:
        raise click.UsageError(_validation_message(error)) from None


def _validation_message(error: Any) -> str:
    return "; ".join(
        f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
        if e["loc"]
        else e["msg"]
        for e in error.errors()
    )


def _run_simulation(
    source: Any, config: Any, as_json: bool, extra: dict[str, Any] | None = None
) -> None:
    from ingest.simulators.mqtt_publisher import SimulationStats, run_simulation

    stop = asyncio.Event()

    def progress(stats: SimulationStats) -> None:
        if not as_json and stats.steps % 10 == 1:
            click.echo(f"simulated {stats.last_ts} readings={stats.readings_published}", err=True)

    async def run() -> SimulationStats:
        _stop_on_signals(stop.set)
        return await run_simulation(source, config, stop=stop, on_step=progress)

    try:
        stats = asyncio.run(run())
    except ConnectionError as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(1)
    result = {
        "steps": stats.steps,
        "readings_published": stats.readings_published,
        "messages_acked": stats.messages_acked,
        "first_ts": stats.first_ts.isoformat() if stats.first_ts else None,
        "last_ts": stats.last_ts.isoformat() if stats.last_ts else None,
        **(extra or {}),
    }
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in result.items()))


@simulate_group.command("mqtt")
@_simulator_options
@click.option("--homes", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--evs", type=click.IntRange(min=0), default=1, show_default=True)
@click.option(
    "--annual-kwh",
    type=click.FloatRange(min=0),
    default=3500.0,
    show_default=True,
    help="Yearly consumption per home.",
)
@click.option(
    "--pv-kwp",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Rooftop PV per home (0: none).",
)
def simulate_mqtt(
    url: str,
    site: str | None,
    topic: str,
    speed: float,
    step_s: float | None,
    duration_s: float | None,
    start: Any,
    seed: int,
    as_json: bool,
    homes: int,
    evs: int,
    annual_kwh: float,
    pv_kwp: float,
) -> None:
    """Publish households (H25 load, PV) and EVs as JSON on MQTT, paced by --speed."""
    from pydantic import ValidationError

    from ingest.simulators.mqtt_publisher import FleetConfig, HomeFleet

    setup_logging("WARNING")
    try:
        fleet = FleetConfig(homes=homes, evs=evs, annual_kwh=annual_kwh, pv_kwp=pv_kwp)
    except ValidationError as error:
        raise click.UsageError(_validation_message(error)) from None
    config = _publisher_config(
        url=url,
        site=site or "sim-home",
        topic=topic,
        speed=speed,
        step_s=step_s,
        duration_s=duration_s,
        start=start,
        seed=seed,
    )
    _run_simulation(HomeFleet(fleet, seed=seed).readings_at, config, as_json)


@simulate_group.command("fusion")
@_simulator_options
@click.option(
    "--scenario",
    type=click.Choice(["nominal", "quench", "disruption", "runaway"]),
    default="nominal",
    show_default=True,
    help="A nominal shot, or one with a labelled fault.",
)
@click.option(
    "--shot-s",
    type=click.FloatRange(min=60),
    default=600.0,
    show_default=True,
    help="Simulated length of the shot (at least 60 s).",
)
def simulate_fusion(
    url: str,
    site: str | None,
    topic: str,
    speed: float,
    step_s: float | None,
    duration_s: float | None,
    start: Any,
    seed: int,
    as_json: bool,
    scenario: str,
    shot_s: float,
) -> None:
    """Publish one tokamak shot (kind `fusion`) on MQTT; the fault onset goes to stderr."""
    from datetime import UTC, datetime

    from ingest.simulators.fusion import fusion_series, fusion_source

    step = step_s if step_s is not None else 1.0
    config = _publisher_config(
        url=url,
        site=site or "sim-fusion",
        topic=topic,
        speed=speed,
        step_s=step,
        # One shot; --duration-s may cut it short.
        duration_s=min(duration_s, shot_s) if duration_s is not None else shot_s,
        start=start,
        seed=seed,
    )
    try:
        series = fusion_series(scenario, config.start or datetime.now(UTC), shot_s, step, seed=seed)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    setup_logging("WARNING")
    if series.fault_onset is not None:
        click.echo(f"{scenario}: fault onset at {series.fault_onset.isoformat()}", err=True)
    config = config.model_copy(update={"start": series.readings[0].ts})
    onset = series.fault_onset.isoformat() if series.fault_onset else None
    _run_simulation(
        fusion_source(series), config, as_json, {"scenario": scenario, "fault_onset": onset}
    )


@simulate_group.command("sunspec")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=5020, show_default=True)
@click.option("--pv-peak-kw", type=click.FloatRange(min=0), default=6.0, show_default=True)
@click.option(
    "--battery-capacity-kwh", type=click.FloatRange(min=0.1), default=10.0, show_default=True
)
@click.option("--site", default="sim-site", show_default=True, help="Site id in the sample config.")
def simulate_sunspec(
    host: str, port: int, pv_peak_kw: float, battery_capacity_kwh: float, site: str
) -> None:
    """Serve a SunSpec inverter (unit 1), battery (unit 2) and meter (unit 3) over Modbus TCP.

    A household on the simulators' realistic profiles: PV from pvlib's TMY3
    weather through PVWatts, load from demandlib's BDEW H25 profile, and a
    self-consumption battery between them; the meter sees the rest. Values follow
    the clock. Prints the `[[modbus.devices]]` of a connector config that reads
    them. Ctrl-C stops it.
    """
    from datetime import datetime

    from ingest.simulators import profiles
    from ingest.simulators import sunspec_server as sim

    array = profiles.PvArray(kwp=pv_peak_kw, inverter_kw=pv_peak_kw * 0.92)
    capacity_wh = battery_capacity_kwh * 1000
    battery_limit_w = capacity_wh / 2  # a 0.5 C battery

    def pv_w(now: datetime) -> float:
        return profiles.pv_power_kw(now, array) * 1000

    def load_w(now: datetime) -> float:
        return profiles.household_load_kw("home-1", now) * 1000

    def battery_power_w(now: datetime) -> float:
        # Self-consumption: cover the deficit, soak up the surplus (positive = discharge).
        # The simulated SoC clamps at 0..100 %; the point is realistic register traffic.
        return max(-battery_limit_w, min(battery_limit_w, load_w(now) - pv_w(now)))

    def inverter_profile(now: datetime, dt_s: float) -> dict[int, dict[str, float]]:
        return {103: {"W": round(pv_w(now))}}

    def meter_profile(now: datetime, dt_s: float) -> dict[int, dict[str, float]]:
        return {203: {"W": round(load_w(now) - pv_w(now) - battery_power_w(now))}}

    devices = [
        sim.inverter(1, profile=inverter_profile),
        sim.battery(
            2,
            capacity_wh=capacity_wh,
            profile=sim.battery_profile(battery_power_w, capacity_wh, 50.0),
        ),
        sim.meter(3, profile=meter_profile),
    ]
    server = sim.SunSpecServer(devices, host=host, port=port)
    setup_logging("WARNING")

    async def serve() -> None:
        await server.start()
        for unit_id, device, kind in (
            (1, "pv-1", "solar"),
            (2, "battery-1", "battery"),
            (3, "meter-1", "meter"),
        ):
            click.echo(
                f'[[modbus.devices]]\nhost = "{host}"\nport = {port}\nunit_id = {unit_id}\n'
                f'site = "{site}"\ndevice = "{device}"\nkind = "{kind}"\n'
            )
        click.echo(f"SunSpec simulator on {host}:{port}; Ctrl-C stops it", err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(serve())


@simulate_group.command("ocpp")
@click.option("--url", default="ws://127.0.0.1:9000/ocpp", show_default=True)
@click.option("--charge-points", type=click.IntRange(1, 10_000), default=2, show_default=True)
@click.option(
    "--protocol", type=click.Choice(["mixed", "1.6", "2.0.1"]), default="mixed", show_default=True
)
@click.option("--id-prefix", default="SIM-CP-", show_default=True)
@click.option("--password-env", help="Variable holding the charge points' HTTP Basic password.")
@click.option("--tls-cafile", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--interval-s", type=float, default=60.0, show_default=True)
@click.option("--speed", type=float, default=60.0, show_default=True)
@click.option("--duration-s", type=float, help="Simulated seconds (default: until Ctrl-C).")
@click.option("--vehicles", type=click.IntRange(min=1), help="Vehicles per charge point.")
@click.option("--gap-s", type=float, default=1800.0, show_default=True)
@click.option("--dwell-s", type=float, default=14400.0, show_default=True)
@click.option("--connect-timeout-s", type=float, help="Give up on a CSMS silent this long.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def simulate_ocpp(password_env: str | None, as_json: bool, **options: Any) -> None:
    """EV charge points (OCPP 1.6 and 2.0.1 clients) charging cars against a CSMS."""
    import os

    from pydantic import ValidationError

    from ingest.simulators.ocpp import ChargePointFleet, OcppSimulatorConfig, fleet_summary

    if password_env is not None and not os.environ.get(password_env):
        raise click.UsageError(f"--password-env: the variable {password_env!r} is not set")
    password = os.environ[password_env] if password_env else None
    try:
        config = OcppSimulatorConfig(
            password=password, **{k: v for k, v in options.items() if v is not None}
        )
    except ValidationError as error:
        raise click.UsageError(_validation_message(error)) from None
    setup_logging("WARNING")

    async def run() -> dict[str, Any]:
        stop = asyncio.Event()
        _stop_on_signals(stop.set)
        return fleet_summary(await ChargePointFleet(config).run(stop=stop))

    summary = asyncio.run(run())
    click.echo(json.dumps(summary) if as_json else " ".join(f"{k}={v}" for k, v in summary.items()))
    if summary["failed"]:
        sys.exit(1)


# --- schemas, topics, config ------------------------------------------------------------


@main.group()
def schemas_group() -> None:
    """Message schemas."""


main.add_command(schemas_group, name="schemas")
main.add_command(ingest_group)
main.add_command(dashboards_group)
main.add_command(backtest)
main.add_command(evaluate_detectors)
main.add_command(certificates)
main.add_command(detect)
main.add_command(status)
main.add_command(patents_group)


@schemas_group.command("export")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def schemas_export(directory: Path) -> None:
    """Write the JSON Schema of every message to DIRECTORY/<Message>.schema.json."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, schema in schemas.json_schemas().items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        click.echo(str(path))


@main.command("topics")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def topics_command(obj: Context, as_json: bool) -> None:
    """List the topics of this deployment: name, key, schema, partitions, retention."""
    settings = obj.settings()
    rows = [
        {
            "name": settings.topic(spec),
            "key": spec.key,
            "schema": spec.value_schema.__name__,
            "partitions": spec.partition_count(settings.partitions),
            "retention_ms": spec.retention_ms,
            "internal": spec.internal,
            "description": spec.description,
        }
        for spec in topics.ALL_TOPICS
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(
            f"{row['name']:<32} key={row['key']:<12} {row['schema']:<17} "
            f"partitions={row['partitions']:<3} {row['description']}"
        )


@main.group("config")
def config_group() -> None:
    """Settings."""


@config_group.command("show")
@click.pass_obj
def config_show(obj: Context) -> None:
    """Print the effective settings as JSON, secrets masked."""
    click.echo(json.dumps(obj.settings().redacted(), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
