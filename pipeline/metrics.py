"""What a worker exports to Prometheus, and its health and readiness, on one port.

``[metrics] port`` (``WATTSTREAM_METRICS_PORT``) starts :class:`MetricsServer` in a
worker: ``/metrics`` (Prometheus text format), ``/healthz`` (the process answers) and
``/readyz`` (every readiness check passes: the broker answers, the agents have their
partitions, the sinks' last writes succeeded; 503 with the failing checks otherwise).

The metrics follow Prometheus' conventions (base units, ``_total`` counters,
``_seconds`` histograms) and live in the process-wide ``prometheus_client`` registry, so
the process and Python collectors come with them. Counters the code already keeps
(the sinks' :class:`~sinks.influx.SinkStats` and webhook statistics) are read at scrape
time by collectors, not counted twice. Plain Python: no Faust import.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline import kafka
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# Counters' *_created samples double the series for a timestamp nobody queries.
disable_created_metrics()

READINGS = Counter(
    "wattstream_readings", "Readings the agents took from a topic (inside its batches).", ["topic"]
)
MESSAGES = Counter(
    "wattstream_messages",
    "Kafka messages the agents consumed (direction in) or produced (out), per topic.",
    ["topic", "direction"],
)
AGENT_SECONDS = Histogram(
    "wattstream_agent_processing_seconds",
    "Time an agent took over one batch of messages, outputs delivered.",
    ["agent"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DEAD_LETTERS = Counter(
    "wattstream_dead_letters",
    "Records sent to the dead-letter topic, by the component that rejected them and why "
    "(the error type: the reason text itself is in the letter).",
    ["component", "reason"],
)
CONSUMER_LAG = Gauge(
    "wattstream_consumer_lag",
    "Messages of a partition not yet committed by a consumer group (end offset - committed).",
    ["group", "topic", "partition"],
)
DEVICE_POLL_SECONDS = Histogram(
    "wattstream_device_poll_seconds",
    "Time one poll of one device took (answered or not).",
    ["connector"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
READY = Gauge("wattstream_ready", "1 while every readiness check passes, else 0.")


@contextlib.contextmanager
def timed(agent: str) -> Iterator[None]:
    """Observe the enclosed block's duration in ``wattstream_agent_processing_seconds``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        AGENT_SECONDS.labels(agent).observe(time.perf_counter() - started)


# --- collectors over statistics the code keeps anyway ------------------------------


class InfluxStats(Protocol):
    points_written: int
    points_retried: int
    points_dropped: int
    retries: int
    records_consumed: int
    overflow_records: int
    last_error: str | None


class SinkState(Protocol):
    """What :class:`SinkCollector` reads from a sink at each scrape."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> InfluxStats: ...

    def buffered_points(self) -> int: ...


class SinkCollector(Collector):
    """``wattstream_sink_*`` of the sinks running in this process, read when scraped."""

    def __init__(self) -> None:
        self.sinks: list[SinkState] = []

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        points = CounterMetricFamily(
            "wattstream_sink_points",
            "Points a sink wrote, handed to a retried write, or dropped (refused by the "
            "server or undecodable).",
            labels=["sink", "outcome"],
        )
        retries = CounterMetricFamily(
            "wattstream_sink_retries", "Writes a sink retried.", labels=["sink"]
        )
        records = CounterMetricFamily(
            "wattstream_sink_records", "Records a sink consumed from Kafka.", labels=["sink"]
        )
        overflow = CounterMetricFamily(
            "wattstream_sink_overflow_records",
            "Records read while the buffer was full and put back into Kafka (read again).",
            labels=["sink"],
        )
        buffered = GaugeMetricFamily(
            "wattstream_sink_buffer_points",
            "Points waiting to be written (buffered and in flight).",
            labels=["sink"],
        )
        up = GaugeMetricFamily(
            "wattstream_sink_up", "1 if the sink's last write succeeded, else 0.", labels=["sink"]
        )
        for sink in self.sinks:
            stats = sink.stats
            points.add_metric([sink.name, "written"], stats.points_written)
            points.add_metric([sink.name, "retried"], stats.points_retried)
            points.add_metric([sink.name, "dropped"], stats.points_dropped)
            retries.add_metric([sink.name], stats.retries)
            records.add_metric([sink.name], stats.records_consumed)
            overflow.add_metric([sink.name], stats.overflow_records)
            buffered.add_metric([sink.name], sink.buffered_points())
            up.add_metric([sink.name], 0.0 if stats.last_error else 1.0)
        yield from (points, retries, records, overflow, buffered, up)

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        return iter(())  # dynamic: never checked against other collectors' names


class WebhookState(Protocol):
    sent: int
    retries: int
    dead_lettered: int
    suppressed: int


class WebhookCollector(Collector):
    """``wattstream_webhook_deliveries_total`` of the webhook sinks in this process."""

    def __init__(self) -> None:
        self.stats: list[WebhookState] = []

    def collect(self) -> Iterator[CounterMetricFamily]:
        deliveries = CounterMetricFamily(
            "wattstream_webhook_deliveries",
            "Alert deliveries by outcome: delivered, retried (an attempt that failed and "
            "was tried again), failed (dead-lettered), suppressed (filtered or cooling down).",
            labels=["outcome"],
        )
        for outcome, attribute in (
            ("delivered", "sent"),
            ("retried", "retries"),
            ("failed", "dead_lettered"),
            ("suppressed", "suppressed"),
        ):
            deliveries.add_metric([outcome], sum(getattr(s, attribute) for s in self.stats))
        yield deliveries

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())


class ConnectorCollector(Collector):
    """What the connectors running in this process read, produced and did, from the
    statistics they keep: device messages in and readings out (MQTT, OCPP, Modbus), dead
    letters, polls (``polls_ok``... of Modbus), commands (``sent``, ``dry_run``... of the
    control connector and of the OCPP control path), and the price and carbon feeds'
    polls, messages sent, rejections and last answer (``polls_answered``...)."""

    POLL_FIELDS = (("ok", "polls_ok"), ("error", "polls_failed"))
    COMMAND_FIELDS = ("sent", "dry_run", "rejected", "failed", "rate_limited", "skipped")

    def __init__(self) -> None:
        self.connectors: dict[str, Any] = {}
        """Their statistics, by connector name (``modbus``, ``control``...)."""

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        polls = CounterMetricFamily(
            "wattstream_device_polls",
            "Polls of devices by outcome: ok (answered), error.",
            labels=["connector", "outcome"],
        )
        offline = GaugeMetricFamily(
            "wattstream_devices_offline",
            "Devices a connector cannot reach now.",
            labels=["connector"],
        )
        commands = CounterMetricFamily(
            "wattstream_commands",
            "Commands to devices by outcome: sent, dry_run (control not enabled), rejected "
            "(unknown device, out of bounds), failed, rate_limited, skipped (superseded).",
            labels=["connector", "outcome"],
        )
        received = CounterMetricFamily(
            "wattstream_connector_messages_received",
            "Messages from devices (MQTT messages, OCPP frames) a connector received.",
            labels=["connector"],
        )
        readings = CounterMetricFamily(
            "wattstream_connector_readings",
            "Readings a connector produced to the telemetry topic.",
            labels=["connector"],
        )
        batches = CounterMetricFamily(
            "wattstream_connector_batches",
            "Telemetry messages (batches of readings) a connector produced.",
            labels=["connector"],
        )
        letters = CounterMetricFamily(
            "wattstream_connector_dead_letters",
            "Records a connector sent to the dead-letter topic.",
            labels=["connector"],
        )
        feed_polls = CounterMetricFamily(
            "wattstream_feed_polls",
            "Polls of a price or carbon source by outcome: ok (it answered, also with "
            "'not published yet'), error (unavailable, or Kafka; retried with backoff).",
            labels=["connector", "outcome"],
        )
        feed_sent = CounterMetricFamily(
            "wattstream_feed_messages_sent",
            "New prices or intensities a feed sent (ones already sent are skipped).",
            labels=["connector"],
        )
        feed_rejected = CounterMetricFamily(
            "wattstream_feed_rejected",
            "What a feed dead-lettered: whole documents and single rows.",
            labels=["connector", "what"],
        )
        feed_answered = GaugeMetricFamily(
            "wattstream_feed_last_answer_timestamp_seconds",
            "When the source last answered a poll (Unix time): alert on time() minus it.",
            labels=["connector"],
        )
        for name, stats in self.connectors.items():
            if hasattr(stats, "polls_answered"):
                feed_polls.add_metric([name, "ok"], stats.polls_answered)
                feed_polls.add_metric([name, "error"], stats.fetch_errors)
                feed_sent.add_metric([name], stats.sent)
                feed_rejected.add_metric([name, "document"], stats.bad_documents)
                feed_rejected.add_metric([name, "row"], stats.bad_rows)
                if stats.last_answered_unix_s is not None:
                    feed_answered.add_metric([name], stats.last_answered_unix_s)
            for family, attribute in (
                (received, "messages_received"),
                (received, "frames_received"),
                (readings, "readings_produced"),
                (batches, "batches_produced"),
                (letters, "dead_lettered"),
            ):
                if hasattr(stats, attribute):
                    family.add_metric([name], getattr(stats, attribute))
            if hasattr(stats, "polls_ok"):
                for outcome, attribute in self.POLL_FIELDS:
                    polls.add_metric([name, outcome], getattr(stats, attribute))
                offline.add_metric([name], stats.devices_offline)
            if hasattr(stats, "dry_run"):
                for outcome in self.COMMAND_FIELDS:
                    commands.add_metric([name, outcome], getattr(stats, outcome))
        yield from (polls, offline, commands, received, readings, batches, letters)
        yield from (feed_polls, feed_sent, feed_rejected, feed_answered)

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        return iter(())


SINKS = SinkCollector()
WEBHOOKS = WebhookCollector()
CONNECTORS = ConnectorCollector()
REGISTRY.register(SINKS)
REGISTRY.register(WEBHOOKS)
REGISTRY.register(CONNECTORS)


# --- readiness and the HTTP endpoint -------------------------------------------------


@dataclass
class Readiness:
    """Named checks (async callables answering None when ready, else why not in one
    line); ready when each answers None within ``timeout_s``."""

    timeout_s: float = 2.0
    checks: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def add(self, name: str, check: Callable[[], Any]) -> None:
        self.checks[name] = check

    async def run(self) -> dict[str, str | None]:
        """Each check's verdict: None (ready) or why not."""

        async def one(check: Callable[[], Any]) -> str | None:
            try:
                return await asyncio.wait_for(check(), timeout=self.timeout_s)
            except TimeoutError:
                return f"no answer within {self.timeout_s:g} s"
            except Exception as error:  # noqa: BLE001 - a failing check is an answer, not a crash
                return f"{type(error).__name__}: {error}"

        names = list(self.checks)
        verdicts = await asyncio.gather(*(one(self.checks[n]) for n in names))
        return dict(zip(names, verdicts, strict=True))


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0: a free one)."""

    def __init__(self, host: str, port: int, readiness: Readiness | None = None) -> None:
        self.host = host
        self.port = port
        self.readiness = readiness or Readiness()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("metrics, /healthz and /readyz on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        # Readiness is a gauge too: scrape it fresh, so an alert on it is never stale.
        await self._ready()
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self) -> tuple[bool, dict[str, str | None]]:
        verdicts = await self.readiness.run()
        ready = all(v is None for v in verdicts.values())
        READY.set(1.0 if ready else 0.0)
        return ready, verdicts

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready, verdicts = await self._ready()
        body = {"ready": ready, "checks": {n: v or "ok" for n, v in verdicts.items()}}
        return web.Response(
            status=200 if ready else 503,
            text=json.dumps(body),
            content_type="application/json",
        )


def broker_check(settings: Settings) -> Callable[[], Awaitable[str | None]]:
    """The readiness check every process with a Kafka client has: a bootstrap broker
    accepts connections."""

    async def broker() -> str | None:
        return await kafka.broker_accepts(settings, timeout_s=1.0)

    return broker


def probe(url: str = "http://127.0.0.1:9464/readyz", timeout_s: float = 5.0) -> None:
    """Exit 0 if ``url`` answers 200, else 1 with why: a container's health check (the
    worker image has Python, not curl)."""
    import sys
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - a configured http URL
            sys.exit(0 if response.status == 200 else 1)
    except urllib.error.HTTPError as error:
        sys.stderr.write(f"{url}: {error.code} {error.read().decode(errors='replace')}\n")
    except OSError as error:
        sys.stderr.write(f"{url}: {error}\n")
    sys.exit(1)


__all__ = [
    "AGENT_SECONDS",
    "CONNECTORS",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "DEVICE_POLL_SECONDS",
    "MESSAGES",
    "READINGS",
    "READY",
    "SINKS",
    "WEBHOOKS",
    "MetricsServer",
    "Readiness",
    "broker_check",
    "probe",
    "timed",
]
