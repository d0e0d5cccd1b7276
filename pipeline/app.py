"""The Faust application factory.

``create_app(settings)`` builds the app and registers each processor explicitly:
no autodiscovery, no import-time side effects, so a test can build as many
apps as it likes with different settings.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Protocol

import faust
import mode
from aiokafka.errors import KafkaError

from pipeline import commits, kafka, metrics, streams, topics
from pipeline.settings import Settings
from processors import (
    allocation,
    arbitrage,
    carbon,
    curtailment,
    detection,
    fleet,
    follow_sun,
    island,
    patents,
    prices,
    scram,
    solar,
)
from sinks.influx import InfluxSink
from sinks.webhook import WebhookSink

log = logging.getLogger(__name__)


def faust_config(settings: Settings) -> dict[str, Any]:
    """Faust settings derived from ours (also used by tests and benchmarks)."""
    kafka_settings = settings.kafka
    config: dict[str, Any] = {
        "broker": f"kafka://{kafka.bootstrap_servers(settings)}",
        "store": "rocksdb://" if settings.store == "rocksdb" else "memory://",
        "datadir": str(settings.data_dir),
        "topic_partitions": settings.partitions,
        "topic_replication_factor": kafka_settings.replication_factor,
        "broker_session_timeout": kafka_settings.session_timeout_s,
        "broker_heartbeat_interval": kafka_settings.heartbeat_interval_s,
        "broker_rebalance_timeout": kafka_settings.rebalance_timeout_s,
        "broker_commit_interval": kafka_settings.commit_interval_s,
        "consumer_auto_offset_reset": "earliest",
        "consumer_max_fetch_size": kafka_settings.max_message_bytes,
        "producer_max_request_size": kafka_settings.max_message_bytes,
        "producer_acks": -1,
        # At-least-once plus deterministic ids; exactly-once needs transactions,
        # which the embedded broker does not support.
        "processing_guarantee": "at_least_once",
        "stream_wait_empty": False,
        "web_enabled": False,
        "table_standby_replicas": 0,
    }
    if settings.single_record_batches:
        config["producer_max_batch_size"] = 1
    if kafka_settings.security_protocol != "PLAINTEXT":
        config["broker_credentials"] = _credentials(settings)
    return config


def _credentials(settings: Settings) -> object:
    kafka_settings = settings.kafka
    client = kafka.client_kwargs(settings)
    if kafka_settings.security_protocol.startswith("SASL"):
        assert kafka_settings.sasl_password is not None
        return faust.SASLCredentials(
            username=kafka_settings.sasl_username,
            password=kafka_settings.sasl_password.get_secret_value(),
            mechanism=kafka_settings.sasl_mechanism,
            ssl_context=client.get("ssl_context"),
        )
    return faust.SSLCredentials(client["ssl_context"])


_FETCH_MAX_WAIT_MS: weakref.WeakKeyDictionary[faust.App, int] = weakref.WeakKeyDictionary()


def fetch_max_wait_ms(settings: Settings) -> int:
    """The worker consumer's fetch wait: the setting, or Kafka's default (500 ms).

    :func:`pipeline.local.with_embedded_broker` sets 10 ms for the embedded broker."""
    configured = settings.kafka.fetch_max_wait_ms
    return 500 if configured is None else configured


def _install_fetch_wait_hook() -> None:
    """Faust passes ``fetch_max_wait_ms=1500`` to aiokafka with no setting to change it:
    give each app's consumer the wait recorded for that app (once per process)."""
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    if getattr(thread, "_wattstream_fetch_wait", False):
        return
    original = thread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        wait_ms = _FETCH_MAX_WAIT_MS.get(self.app)
        if wait_ms is not None:
            consumer._fetch_max_wait_ms = wait_ms  # read by consumer.start() for its Fetcher
        return consumer

    thread._create_worker_consumer = create  # type: ignore[method-assign]
    thread._wattstream_fetch_wait = True  # type: ignore[attr-defined]


def use_fetch_wait(app: faust.App, settings: Settings) -> None:
    """Give ``app``'s worker consumer the configured fetch wait (see :func:`fetch_max_wait_ms`)."""
    _install_fetch_wait_hook()
    _FETCH_MAX_WAIT_MS[app] = fetch_max_wait_ms(settings)


def agent_input_topics(settings: Settings) -> list[str]:
    """The topics the worker's agents consume (its consumer group is ``app_id``)."""
    specs = [topics.TELEMETRY, topics.SITE_PRICES, topics.PRICES, topics.SITE_CARBON, topics.CARBON]
    if settings.patents is not None:
        specs.append(topics.PATENTS)
    return [settings.topic(spec) for spec in specs]


class Sink(Protocol):
    def failing(self) -> str | None: ...
    async def start(self) -> None: ...
    async def run(self) -> None: ...
    async def stop(self) -> None: ...


class SinkService(mode.Service):
    """Runs a sink beside the agents of a worker, and stops it (final flush) with the worker."""

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sink = sink

    async def on_start(self) -> None:
        await self.sink.start()
        self.add_future(self.sink.run())

    async def on_stop(self) -> None:
        await self.sink.stop()


class MetricsService(mode.Service):
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` (``[metrics] port``) beside the
    agents, and measures the consumer groups' lag every ``lag_interval_s``.

    Ready means: a bootstrap broker accepts connections, the worker's consumer has
    partitions assigned, and every sink's last write succeeded.
    """

    def __init__(
        self, app: faust.App, settings: Settings, sinks: list[Sink], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.settings = settings
        self.sinks = sinks
        assert settings.metrics.port is not None
        readiness = metrics.Readiness()
        readiness.add("broker", metrics.broker_check(settings))
        readiness.add("partitions", self._partitions)
        for sink in sinks:
            readiness.add(f"sink {sink_name(sink)}", self._sink_check(sink))
        self.server = metrics.MetricsServer(settings.metrics.host, settings.metrics.port, readiness)
        self.groups = [settings.app_id] + [group_of(sink) for sink in sinks]

    async def _partitions(self) -> str | None:
        consumer = self.app.consumer
        assigned = consumer.assignment() if consumer is not None else set()
        return None if assigned else "no partitions assigned (yet)"

    @staticmethod
    def _sink_check(sink: Sink) -> Any:
        async def check() -> str | None:
            error = sink.failing()
            return None if error is None else f"last write failed: {error}"

        return check

    async def on_start(self) -> None:
        await self.server.start()
        self.add_future(self._measure_lag())

    async def on_stop(self) -> None:
        await self.server.stop()

    async def _measure_lag(self) -> None:
        topic_names = [self.settings.topic(spec) for spec in topics.ALL_TOPICS if not spec.internal]
        while not self.should_stop:
            for group in self.groups:
                try:
                    lag = await kafka.group_lag(self.settings, group, topic_names)
                except (KafkaError, OSError, TimeoutError) as error:  # readiness says so
                    log.debug("lag of %s not measured: %s", group, error)
                    continue
                for tp, end in lag.end.items():
                    if tp in lag.committed or group == self.settings.app_id:
                        behind = max(0, end - lag.committed.get(tp, 0))
                        metrics.CONSUMER_LAG.labels(group, tp.topic, str(tp.partition)).set(behind)
            await self.sleep(self.settings.metrics.lag_interval_s)


def sink_name(sink: Sink) -> str:
    return str(getattr(sink, "name", type(sink).__name__))


def group_of(sink: Sink) -> str:
    return str(getattr(sink, "group_id", ""))


def create_app(settings: Settings, *, with_sinks: bool = False) -> faust.App:
    """The Faust app with every processor; ``with_sinks`` also runs the InfluxDB sink in it."""
    # Faust creates its data directory without parents; a worker started outside
    # the repository would crash on "out/state".
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(settings.app_id, **faust_config(settings))
    use_fetch_wait(app, settings)
    # At least once across restarts: Faust must neither commit over a message it has
    # not acknowledged nor stop committing for good after its recovery drops some.
    commits.guard_head_of_commits()
    commits.keep_undelivered_unread()
    commits.keep_queued_while_flowing(app)
    commits.flush_producer_buffer_fully()
    commits.reread_dropped(app)
    # One agent feeds every per-site processor below; it also dead-letters bad telemetry,
    # so it runs even when no site has a processor that uses it.
    streams.shared_site_agent(app, settings)
    prices.register(app, settings)
    arbitrage.register(app, settings)
    # Site agents: only sites with the matching section get work; a bad section
    # fails here, at start-up, naming the setting.
    allocation.register(app, settings)
    fleet.register(app, settings)
    island.register(app, settings)
    curtailment.register(app, settings)
    # Detectors: every site is watched with default settings unless its section says otherwise.
    detection.register(app, settings)
    solar.register(app, settings)
    # Every site's fusion readings get SCRAM protection (defaults without a [sites.fusion]
    # section; only `enabled = false` turns it off).
    scram.register(app, settings)
    # Scope 2 and certificates for sites with [sites.carbon] (and the carbon fan-out for
    # every zone in use); follow-the-sun for sites with [sites.follow_sun].
    carbon.register(app, settings)
    follow_sun.register(app, settings)
    # The deep-tech patent watch, with a [patents] section.
    patents.register(app, settings)
    sinks: list[Sink] = []
    if with_sinks:
        sinks.append(InfluxSink(settings))
        if settings.webhook.url is not None:
            sinks.append(WebhookSink(settings))
    for sink in sinks:
        app.service(SinkService(sink))  # type: ignore[arg-type]
    if settings.metrics.port is not None:
        app.service(MetricsService(app, settings, sinks))  # type: ignore[arg-type]
    return app
