"""``wattstream ingest ...``: run one connector until stopped.

Each connector has its own TOML file (``ingest/<name>.sample.toml`` shows
every key with its default), like an input plugin's configuration; the
deployment settings (broker, topics) come from ``--config`` / ``WATTSTREAM_*``
as for every command. A connector configuration error exits 2 and names the
key. A broker that does not answer is waited for, one warning line per attempt,
without limit unless ``WATTSTREAM_KAFKA_START_TIMEOUT_S`` sets one (then it exits
1 with one clear line); ``ingest tou``, a one-shot publish, waits at most 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol
from zoneinfo import ZoneInfo

import click
from pydantic import ValidationError

from pipeline import codec, kafka, topics
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.cli import Context

EXIT_USAGE = 2


class Connector(Protocol):
    async def start(self) -> None: ...
    async def run(self) -> None: ...
    async def stop(self) -> None: ...


def _config_error(path: Path, table: str, error: Exception) -> NoReturn:
    if isinstance(error, ValidationError):
        lines = [
            f"  {table}.{'.'.join(str(p) for p in item['loc'])}: {item['msg']}"
            for item in error.errors()
        ]
        message = "\n".join(lines)
    else:
        message = f"  {error}"
    click.echo(f"wattstream: invalid connector config {path}:\n{message}", err=True)
    sys.exit(EXIT_USAGE)


def run_connector(
    obj: Context, path: Path, table: str, build: Callable[[Settings, Path, str], Connector]
) -> None:
    from pipeline.cli import setup_logging

    settings = obj.settings()
    setup_logging(settings.log_level, settings=settings)
    if settings.embedded_broker:
        click.echo(
            "wattstream: connectors need a broker: set WATTSTREAM_BROKER "
            "(or run `wattstream broker` in another terminal)",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    try:
        connector = build(settings, path, table)
    except (ValidationError, ValueError, tomllib.TOMLDecodeError, OSError) as error:
        _config_error(path, table, error)
    try:
        asyncio.run(_serve(settings, connector))
    except kafka.BrokerWaitStopped as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(0)
    except (ConnectionError, kafka.TopicMismatchError) as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(1)


def connector_name(connector: Connector) -> str:
    """``modbus`` for a ModbusConnector, ``prices`` for a PriceFeed: the metrics' label."""
    name = type(connector).__name__
    for suffix in ("Connector", "Feed"):
        name = name.removesuffix(suffix)
    return name.lower() or "connector"


async def _serve(settings: Settings, connector: Connector) -> None:
    from pipeline import metrics

    await kafka.wait_for_broker_at_start(settings, long_running=True)
    await kafka.ensure_topics(settings)
    server = None
    if settings.metrics.port is not None:
        readiness = metrics.Readiness()
        readiness.add("broker", metrics.broker_check(settings))
        server = metrics.MetricsServer(settings.metrics.host, settings.metrics.port, readiness)
        await server.start()
    stats = getattr(connector, "stats", None)
    if stats is not None:
        metrics.CONNECTORS.connectors[connector_name(connector)] = stats
    await connector.start()
    task = asyncio.create_task(connector.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await connector.stop()
        if server is not None:
            await server.stop()


@click.group("ingest")
def ingest_group() -> None:
    """Run a connector: device, price or carbon data into Kafka, until stopped."""


def _config_argument(function: Any) -> Any:
    return click.argument(
        "connector_config", type=click.Path(path_type=Path, exists=True, dir_okay=False)
    )(function)


@ingest_group.command("prices")
@_config_argument
@click.option("--table", default="prices", show_default=True, help="TOML table to read.")
@click.pass_obj
def ingest_prices(obj: Context, connector_config: Path, table: str) -> None:
    """Poll a price file or URL (CSV, JSON, ENTSO-E XML) into the prices topic."""
    from ingest.prices import PriceFeed, PriceFeedConfig

    run_connector(
        obj, connector_config, table, lambda s, p, t: PriceFeed(s, PriceFeedConfig.from_toml(p, t))
    )


@ingest_group.command("carbon")
@_config_argument
@click.option("--table", default="carbon", show_default=True, help="TOML table to read.")
@click.pass_obj
def ingest_carbon(obj: Context, connector_config: Path, table: str) -> None:
    """Poll a carbon-intensity or generation-mix file or URL into the carbon topic."""
    from ingest.carbon import CarbonFeed, CarbonFeedConfig

    run_connector(
        obj,
        connector_config,
        table,
        lambda s, p, t: CarbonFeed(s, CarbonFeedConfig.from_toml(p, t)),
    )


@ingest_group.command("mqtt")
@_config_argument
@click.option("--table", default="mqtt", show_default=True, help="TOML table to read.")
@click.pass_obj
def ingest_mqtt(obj: Context, connector_config: Path, table: str) -> None:
    """Subscribe to device telemetry over MQTT into the telemetry topic."""
    from ingest.mqtt import MqttConfig, MqttConnector

    run_connector(
        obj, connector_config, table, lambda s, p, t: MqttConnector(s, MqttConfig.from_toml(p, t))
    )


@ingest_group.command("ocpp")
@_config_argument
@click.option("--table", default="ocpp", show_default=True, help="TOML table to read.")
@click.pass_obj
def ingest_ocpp(obj: Context, connector_config: Path, table: str) -> None:
    """Serve EV charge points as an OCPP 1.6 / 2.0.1 central system into the telemetry
    and ev-sessions topics."""
    from ingest.ocpp import OcppConfig, OcppConnector

    run_connector(
        obj, connector_config, table, lambda s, p, t: OcppConnector(s, OcppConfig.from_toml(p, t))
    )


@ingest_group.command("tou")
@_config_argument
@click.option("--table", default="tou", show_default=True, help="TOML table to read.")
@click.option("--days", type=click.IntRange(1, 3660), default=7, show_default=True)
@click.option(
    "--first-day",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    help="Local date of the first day (default: today in the tariff's time zone).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ingest_tou(
    obj: Context,
    connector_config: Path,
    table: str,
    days: int,
    first_day: datetime | None,
    as_json: bool,
) -> None:
    """Publish a time-of-use tariff's prices for DAYS days to the prices topic.

    A tariff is known in advance, so its ticks are published at once (published_at
    = now); run it again (e.g. daily) to extend the horizon.
    """
    from ingest.prices import TouSchedule, tou_ticks

    settings = obj.settings()
    if settings.embedded_broker:
        click.echo("wattstream: publishing needs a broker: set WATTSTREAM_BROKER", err=True)
        sys.exit(EXIT_USAGE)
    try:
        with connector_config.open("rb") as file:
            schedule = TouSchedule.model_validate(tomllib.load(file).get(table, {}))
    except (ValidationError, tomllib.TOMLDecodeError) as error:
        _config_error(connector_config, table, error)
    now = datetime.now(UTC)
    start = first_day.date() if first_day else now.astimezone(ZoneInfo(schedule.time_zone)).date()
    ticks = tou_ticks(schedule, start, start + timedelta(days=days - 1), published_at=now)

    async def publish() -> None:
        await kafka.wait_for_broker_at_start(settings, long_running=False)
        await kafka.ensure_topics(settings)
        producer = kafka.producer(settings)
        await producer.start()
        try:
            for tick in ticks:
                await producer.send(
                    settings.topic(topics.PRICES), codec.encode(tick), key=tick.market.encode()
                )
            await producer.flush()
        finally:
            await producer.stop()

    try:
        asyncio.run(publish())
    except kafka.BrokerWaitStopped as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(0)
    except (ConnectionError, kafka.TopicMismatchError) as error:
        click.echo(f"wattstream: {error}", err=True)
        sys.exit(1)
    summary = {"market": schedule.market, "ticks": len(ticks), "first": ticks[0].start.isoformat()}
    click.echo(json.dumps(summary) if as_json else " ".join(f"{k}={v}" for k, v in summary.items()))


@ingest_group.command("modbus")
@_config_argument
@click.option("--table", default="modbus", show_default=True, help="TOML table to read.")
@click.pass_obj
def ingest_modbus(obj: Context, connector_config: Path, table: str) -> None:
    """Poll SunSpec devices over Modbus TCP into the telemetry topic (offline alerts too)."""
    from ingest.modbus import ModbusConfig, ModbusConnector

    run_connector(
        obj,
        connector_config,
        table,
        lambda s, p, t: ModbusConnector(s, ModbusConfig.from_toml(p, t)),
    )


@ingest_group.command("control")
@_config_argument
@click.option("--table", default="control", show_default=True, help="TOML table to read.")
@click.pass_obj
def ingest_control(obj: Context, connector_config: Path, table: str) -> None:
    """Apply commands as Modbus writes / MQTT publishes (dry-run unless enabled), audited."""
    from ingest.control import ControlConfig, ControlConnector

    run_connector(
        obj,
        connector_config,
        table,
        lambda s, p, t: ControlConnector(s, ControlConfig.from_toml(p, t)),
    )
