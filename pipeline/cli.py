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

from pipeline import schemas, topics
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


def _setup_logging(level: str, file: Path | None = None) -> None:
    handlers: list[logging.Handler] = []
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
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
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
def demo(obj: Context, telemetry: Path, prices: Path, as_json: bool) -> None:
    """Run the whole pipeline on the bundled sample and print a summary.

    With no WATTSTREAM_BROKER it starts the embedded broker. Points go to
    InfluxDB when WATTSTREAM_INFLUX_URL is set, otherwise to a line-protocol file.
    """
    from pipeline.demo import influx_target, run_demo
    from pipeline.terminal import DemoProgress, print_demo_result

    if obj.config is None and (DEFAULT_SAMPLE / "wattstream.toml").is_file():
        obj.config = DEFAULT_SAMPLE / "wattstream.toml"
    settings = obj.settings()
    _setup_logging(settings.log_level, file=Path("out/demo.log"))
    if not as_json:
        click.echo(
            f"wattstream demo: {telemetry.name} + {prices.name} -> {influx_target(settings)}"
        )
        click.echo("logs: out/demo.log")
    with DemoProgress(enabled=not as_json) as progress:
        result = run_demo(settings, telemetry, prices, on_progress=progress.update)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        print_demo_result(result)


# --- worker and broker ------------------------------------------------------------------


@main.command()
@click.pass_obj
def worker(obj: Context) -> None:
    """Run the Faust agents and sinks until stopped (SIGTERM or Ctrl-C).

    With no WATTSTREAM_BROKER it starts the embedded in-memory broker first.
    """
    from faust.worker import Worker

    from pipeline import kafka
    from pipeline.app import create_app
    from pipeline.local import EmbeddedBroker, with_embedded_broker

    settings = obj.settings()
    _setup_logging(settings.log_level)
    broker = None
    if settings.embedded_broker:
        broker = EmbeddedBroker().start()
        settings = with_embedded_broker(settings, broker)
        log.warning("no WATTSTREAM_BROKER set: started the embedded broker at %s", broker.bootstrap)
    try:
        try:
            asyncio.run(_prepare_broker(settings))
        except (ConnectionError, kafka.TopicMismatchError) as error:
            click.echo(f"wattstream: {error}", err=True)
            sys.exit(1)
        app = create_app(settings, with_sinks=True)
        log.info(
            "worker %s starting: broker %s", settings.app_id, kafka.bootstrap_servers(settings)
        )
        Worker(
            app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False
        ).execute_from_commandline()
    finally:
        if broker is not None:
            broker.stop()


async def _prepare_broker(settings: Settings) -> None:
    from pipeline import kafka

    await kafka.wait_for_broker(settings)
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
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def replay(
    obj: Context,
    telemetry: Path | None,
    prices: Path | None,
    market: str | None,
    speed: float | None,
    as_json: bool,
) -> None:
    """Replay a telemetry file (and a price file) into the configured broker."""
    from ingest.replay import Replay, ReplayFileError
    from pipeline import kafka

    if telemetry is None and prices is None:
        raise click.UsageError("give a TELEMETRY file, --prices FILE, or both")
    settings = obj.settings()
    _setup_logging(settings.log_level)
    if settings.embedded_broker:
        click.echo(
            "wattstream: replay needs a broker: set WATTSTREAM_BROKER "
            "(or run `wattstream broker` in another terminal, or `wattstream demo`)",
            err=True,
        )
        sys.exit(EXIT_USAGE)

    async def run() -> Any:
        await kafka.wait_for_broker(settings)
        await kafka.ensure_topics(settings)
        return await Replay(settings, telemetry, prices, market=market, speed=speed).run()

    try:
        stats = asyncio.run(run())
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
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in result.items()))
        for sample in stats.bad_row_samples:
            click.echo(f"  bad {sample}", err=True)


# --- schemas, topics, config ------------------------------------------------------------


@main.group()
def schemas_group() -> None:
    """Message schemas."""


main.add_command(schemas_group, name="schemas")


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
