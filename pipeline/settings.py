"""wattstream's settings: one pydantic-settings model, from the environment and a TOML file.

Precedence, highest first: explicit overrides in code, environment variables
``WATTSTREAM_<AREA>_<FIELD>`` (for example ``WATTSTREAM_INFLUX_URL``), the TOML
file given by ``--config`` or ``WATTSTREAM_CONFIG``, then the defaults below.
Lists such as ``sites`` are best written in TOML; from the environment they
take JSON.

Every invalid value fails at start-up with a :class:`SettingsError` that
names the setting (its TOML path, e.g. ``sites[0].batteries[0].capacity_kwh``),
its environment variable and the accepted values; an unknown key in the file
and an unknown ``WATTSTREAM_*`` variable are errors too, so a typo is never
silently ignored. Secrets are ``SecretStr``: they print as ``**********``,
never reach a log and are never echoed by an error; :meth:`Settings.redacted`
also masks credentials in URLs (a webhook URL's path, which often is its key).
"""

from __future__ import annotations

import difflib
import os
import re
import ssl
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar, get_args
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as SourceError

from pipeline.schemas import Identifier
from pipeline.topics import TopicSpec

M = TypeVar("M", bound=BaseModel)

ENV_PREFIX = "WATTSTREAM_"
CONFIG_ENV = "WATTSTREAM_CONFIG"
OTHER_VARIABLES = frozenset(
    {
        CONFIG_ENV,
        # `wattstream dashboards push`'s token, read by that command only.
        "WATTSTREAM_GRAFANA_TOKEN",
        # deploy/compose.yaml's own variables (deploy/.env.example), not settings.
        "WATTSTREAM_WORKERS",
        "WATTSTREAM_CONFIG_FILE",
    }
)
"""``WATTSTREAM_*`` variables that are not settings: every other one must be a setting."""
MASK = "**********"

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Pct = Annotated[float, Field(ge=0, le=100)]


class _Area(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Area):
    """Client settings for any Kafka-compatible cluster (``WATTSTREAM_KAFKA_*``)."""

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    """A secret: from ``WATTSTREAM_KAFKA_SASL_PASSWORD`` or the file, never shown."""
    ssl_cafile: Path | None = None
    """CA bundle (PEM) that verifies the brokers; None: the system's. With SSL or
    SASL_SSL each TLS file set is loaded at start-up, so a missing or bad one stops
    the command naming it (paths are those of the machine that runs it)."""
    ssl_certfile: Path | None = None
    """Client certificate (PEM) for mutual TLS."""
    ssl_keyfile: Path | None = None
    """The client certificate's key, if not inside ``ssl_certfile``; needs ``ssl_certfile``."""
    session_timeout_s: PositiveFloat = 6.0
    """6 s is real Kafka's smallest allowed session (group.min.session.timeout.ms),
    and on the embedded broker a group join takes about half of it: with client
    defaults the first join takes ~30 s there."""
    heartbeat_interval_s: PositiveFloat = 1.0
    rebalance_timeout_s: PositiveFloat = 6.0
    commit_interval_s: PositiveFloat = 1.0
    """How often a worker commits processed offsets; a crash replays at most this much."""
    one_record_per_batch: bool | None = None
    """Send one record per produce batch. The embedded broker (tansu) reports wrong
    end offsets after multi-record batches, which breaks table recovery and lag;
    ``None`` turns it on for the embedded broker only. Readings are batched inside
    each record, so the cost is small."""
    max_message_bytes: Annotated[int, Field(ge=100_000)] = 4_000_000
    replication_factor: Annotated[int, Field(ge=1)] = 1
    fetch_max_wait_ms: Annotated[int, Field(ge=1, le=30_000)] | None = None
    """How long a worker's fetch may wait at the broker for data. ``None``: 500 ms, Kafka's
    own default (a real cluster answers as soon as data arrives); the embedded broker
    gets 10 ms, as it holds a waiting fetch for much of its wait even when records
    arrive, so each agent hop would cost up to the whole wait (Faust's fixed 1500 ms
    made a replay crawl there). Use 10 for any tansu broker."""
    start_timeout_s: Annotated[float, Field(ge=0)] = 0.0
    """How long a long-running command (``wattstream worker``, ``wattstream ingest ...``
    connectors, ``wattstream replay``) waits for the broker at start-up before it exits
    with code 1 (``WATTSTREAM_KAFKA_START_TIMEOUT_S``). 0, the default, waits as long as
    it takes: a broker that is late (started after the workers, restarting) is an
    expected condition, not a crash, and a supervisor restarting the process in a loop
    would only add noise. One-shot commands (``record``, ``ingest tou``, ``demo``) wait at
    most 30 s, or this if it is shorter. [s]"""
    start_retry_max_s: PositiveFloat = 10.0
    """Backoff ceiling while waiting for the broker at start-up: attempts start 0.5 s
    apart and double up to this, with jitter; so a broker that comes up is used within
    about this long. [s]"""

    @model_validator(mode="after")
    def _tls_files(self) -> Self:
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError(
                "kafka.ssl_keyfile needs kafka.ssl_certfile (WATTSTREAM_KAFKA_SSL_CERTFILE)"
            )
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            return self
        # Load the files now, as the clients will: a missing or bad PEM must stop start-up
        # naming the setting, not crash the first connection with an ssl traceback.
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(
                    f"kafka.{name} (WATTSTREAM_KAFKA_{name.upper()}): no such file {str(path)!r}"
                )
        try:
            context = ssl.create_default_context(cafile=self.ssl_cafile)
        except (ssl.SSLError, OSError) as error:
            raise ValueError(
                f"kafka.ssl_cafile (WATTSTREAM_KAFKA_SSL_CAFILE): cannot load "
                f"{str(self.ssl_cafile)!r}: {error}"
            ) from None
        if self.ssl_certfile is not None:
            try:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            except (ssl.SSLError, OSError) as error:
                raise ValueError(
                    "kafka.ssl_certfile / kafka.ssl_keyfile (WATTSTREAM_KAFKA_SSL_CERTFILE / "
                    f"..._KEYFILE): cannot load {str(self.ssl_certfile)!r}: {error}"
                ) from None
        return self

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> Self:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"kafka.security_protocol={self.security_protocol} requires "
                "kafka.sasl_username and kafka.sasl_password"
            )
        return self


class InfluxSettings(_Area):
    """InfluxDB sink (``WATTSTREAM_INFLUX_*``). With no ``url``, points go to ``file``."""

    url: str | None = None
    api: Literal["v1", "v2"] = "v1"
    """v1: ``/write`` with database and retention policy (InfluxDB 1.x);
    v2: ``/api/v2/write`` with org, bucket and token (InfluxDB 2.x, 3.x, 1.8+)."""
    database: str = "wattstream"
    retention_policy: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    """v1: the user's password; a secret, never shown."""
    org: str = "wattstream"
    bucket: str = "wattstream"
    token: SecretStr | None = None
    """v2: the API token; a secret, never shown."""
    create_database: bool = True
    """v1 only: ``CREATE DATABASE`` at start-up (idempotent); off for read-only users."""
    file: Path = Path("out/influx.lp")
    """Where line protocol goes when no ``url`` is set."""
    batch_size_points: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    """A write is sent when this many points are buffered (or every flush_interval_s)."""
    buffer_points: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    """Most points held in memory, also while InfluxDB is down; what does not fit
    stays in Kafka (uncommitted) and is counted as overflow, never dropped."""
    flush_interval_s: PositiveFloat = 1.0
    timeout_s: PositiveFloat = 10.0
    retry_initial_s: PositiveFloat = 0.5
    retry_max_s: PositiveFloat = 30.0
    """Backoff ceiling while InfluxDB is unreachable; offsets stay uncommitted meanwhile."""
    gzip: bool = True

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str | None) -> str | None:
        if url is None:
            return url
        check_url(url)
        if urlsplit(url).password is not None:
            # The sink logs its URL; credentials have settings of their own, kept secret.
            raise ValueError(
                "a password in the URL would be logged; use influx.username and "
                "influx.password (or influx.token) instead"
            )
        return url

    @model_validator(mode="after")
    def _buffer_holds_a_batch(self) -> Self:
        if self.buffer_points < self.batch_size_points:
            raise ValueError(
                f"influx.buffer_points ({self.buffer_points}) must be at least "
                f"influx.batch_size_points ({self.batch_size_points})"
            )
        return self


class BatteryConfig(_Area):
    """One battery and the limits every strategy must respect."""

    device: Identifier
    capacity_kwh: PositiveFloat
    max_charge_kw: PositiveFloat
    max_discharge_kw: PositiveFloat
    round_trip_efficiency: Fraction = 0.9
    """AC to AC; split evenly (square root) between charge and discharge."""
    soc_min_pct: Pct = 10.0
    soc_max_pct: Pct = 95.0
    reserve_pct: Pct = 20.0
    """Kept for backup power: arbitrage never discharges below it."""
    strategy: Literal["threshold", "optimal", "mpc"] = "threshold"
    """``threshold``: the price rule below; ``optimal``: a rolling-horizon linear
    program over the prices published so far (see processors/optimal.py); ``mpc``: the
    same program over 48 hours, the known prices and a forecast after them, re-planned
    at every decision (processors/mpc.py)."""
    charge_below_price_per_kwh: float | None = None
    """Threshold strategy: charge below this price (required for it)."""
    discharge_above_price_per_kwh: float | None = None
    """Threshold strategy: discharge above this price (required for it)."""
    degradation_cost_per_kwh: Annotated[float, Field(ge=0.0)] = 0.0
    """Optimal and mpc strategies: wear cost per kWh discharged, in the price's currency."""
    commands: Literal["off", "dry_run", "live"] = "dry_run"
    """What each decision sends to the device: ``off`` nothing; ``dry_run`` a command
    marked dry-run (audited, never applied); ``live`` a command the control
    connector applies, if it is enabled too (two keys)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check_soc_range(self.device, self.soc_min_pct, self.soc_max_pct)
        if not self.reserve_pct <= self.soc_max_pct:
            raise ValueError(
                f"battery {self.device}: reserve_pct ({self.reserve_pct}) must not exceed "
                f"soc_max_pct ({self.soc_max_pct})"
            )
        low, high = self.charge_below_price_per_kwh, self.discharge_above_price_per_kwh
        if self.strategy == "threshold" and (low is None or high is None):
            raise ValueError(
                f"battery {self.device}: strategy threshold needs charge_below_price_per_kwh "
                "and discharge_above_price_per_kwh"
            )
        if low is not None and high is not None and not low < high:
            raise ValueError(
                f"battery {self.device}: charge_below_price_per_kwh "
                f"({self.charge_below_price_per_kwh}) must be below "
                f"discharge_above_price_per_kwh ({self.discharge_above_price_per_kwh})"
            )
        return self


class SiteConfig(_Area):
    id: Identifier
    market: Identifier
    """The price market (bidding zone) whose prices apply to this site."""
    batteries: list[BatteryConfig] = Field(default_factory=list)
    # The sections below belong to processors (allocation, fleet, island, detectors), which
    # own their models: pipeline never imports processors, so here they are plain
    # tables, and each processor's ``register`` validates its own at start-up with a
    # SettingsError naming the setting (``sites[turin-home].allocation.limits...``).
    # A site without a section gets no work from that agent.
    allocation: dict[str, Any] | None = None
    """``[sites.allocation]``: see processors/allocation.py (AllocationSettings)."""
    fleet: dict[str, Any] | None = None
    """``[sites.fleet]``: see processors/fleet.py (FleetSettings)."""
    island: dict[str, Any] | None = None
    """``[sites.island]``: see processors/island.py (IslandSettings)."""
    detection: dict[str, Any] | None = None
    """``[sites.detection]``: see processors/anomaly.py (DetectionSettings). Unlike the
    other sections, anomaly detection runs on every site; this only changes its settings."""
    solar: dict[str, Any] | None = None
    """``[sites.solar]``: see processors/solar.py (SolarSettings): the PV arrays' specification."""
    curtailment: dict[str, Any] | None = None
    """``[sites.curtailment]``: see processors/curtailment.py (CurtailmentSettings)."""
    fusion: dict[str, Any] | None = None
    """``[sites.fusion]``: see processors/scram.py (ScramSettings)."""
    carbon: dict[str, Any] | None = None
    """``[sites.carbon]``: see processors/carbon.py (CarbonSettings): the carbon zone
    (not the price ``market``), the residual mix, device roles."""
    certificates: dict[str, Any] | None = None
    """``[sites.certificates]``: see processors/certificates.py (CertificateSettings):
    guarantees of origin for on-site solar (validity, which devices mint)."""
    follow_sun: dict[str, Any] | None = None
    """``[sites.follow_sun]``: see processors/follow_sun.py (FollowSunSettings)."""

    @field_validator("batteries")
    @classmethod
    def _unique_devices(cls, batteries: list[BatteryConfig]) -> list[BatteryConfig]:
        devices = [b.device for b in batteries]
        duplicates = repeated(devices)
        if duplicates:
            raise ValueError(f"duplicate battery devices {duplicates}")
        return batteries


class MetricsSettings(_Area):
    """Prometheus metrics and health checks of a worker (``WATTSTREAM_METRICS_*``)."""

    port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """``/metrics``, ``/healthz`` and ``/readyz`` on this port; None: not served (every
    worker on a host needs its own port); 0: a free one, logged."""
    host: str = "127.0.0.1"
    """The address to listen on: ``0.0.0.0`` in a container, for Prometheus to reach."""
    lag_interval_s: PositiveFloat = 15.0
    """How often the consumer groups' lag is measured (an offset fetch per partition)."""
    url: str | None = None
    """Where a running worker serves ``/metrics``, for ``wattstream status`` to read its
    sinks' state (e.g. ``http://worker:9464/metrics``)."""


class WebhookSettings(_Area):
    """Alert webhooks (``WATTSTREAM_WEBHOOK_*``). With no ``url``, no webhook is sent."""

    url: str | None = None
    """Where alerts are POSTed. Often a secret itself (Slack's carry their key in the
    path): ``config show`` prints only its scheme and host, and so does the sink's log."""
    secret: SecretStr | None = None
    """HMAC-SHA256 key of the signature header; required with a URL. A secret, never shown."""
    min_severity: Literal["info", "warning", "critical"] = "warning"
    cooldown_s: Annotated[float, Field(ge=0.0)] = 300.0
    """A new alert of the same type on the same device within this time is not sent
    (its resolution is); 0 sends every one."""
    timeout_s: PositiveFloat = 10.0
    retry_initial_s: PositiveFloat = 1.0
    retry_max_s: PositiveFloat = 60.0
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 8
    """Attempts before a delivery is given up and dead-lettered."""
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 100
    """Alerts read ahead of delivery at most; the rest waits in Kafka."""
    template: Literal["json", "slack"] = "json"
    """``json``: the alert as it is on the topic; ``slack``: ``{"text": ...}`` for chat."""

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str | None) -> str | None:
        if url is not None:
            check_url(url)
        return url

    @model_validator(mode="after")
    def _signed(self) -> Self:
        if self.url is not None and (self.secret is None or not self.secret.get_secret_value()):
            raise ValueError("webhook.url needs webhook.secret (WATTSTREAM_WEBHOOK_SECRET)")
        return self


class ReplaySettings(_Area):
    """Replay connector (``WATTSTREAM_REPLAY_*``)."""

    batch_max_readings: Annotated[int, Field(ge=1, le=100_000)] = 2_000
    """Readings per Kafka message at most; bigger batches amortise per-message cost."""
    batch_window_s: PositiveFloat = 3600.0
    """Event-time span of one batch at most, so a paced replay is not delayed by batching."""


_config_file: ContextVar[Path | None] = ContextVar("wattstream_config_file", default=None)


class Settings(BaseSettings):
    """Everything a wattstream process can be told."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        # WATTSTREAM_INFLUX_RETRY_MAX_S -> influx.retry_max_s: split at the first "_" only.
        env_nested_max_split=1,
        # An empty variable means unset (compose passes ${VAR:-} for optional secrets
        # and paths; an empty ssl_cafile would otherwise become the path ".").
        env_ignore_empty=True,
        frozen=True,
        extra="forbid",
    )

    app_id: Identifier = "wattstream"
    """Faust application id: consumer group and changelog names derive from it."""
    broker: str | None = None
    """``host:port[,host:port]`` of a Kafka-compatible cluster. None: start the embedded broker."""
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9._\-]*$")] = ""
    partitions: Annotated[int, Field(ge=1, le=1024)] = 8
    """Partitions of every site-keyed topic; the most workers that can share the load."""
    store: Literal["memory", "rocksdb"] = "rocksdb"
    """Faust table store. rocksdb survives restarts without a full changelog replay."""
    data_dir: Path = Path("out/state")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "text", "json"] = "auto"
    """``auto``: readable lines on a terminal, one JSON object per record otherwise."""
    kafka: KafkaSettings = KafkaSettings()
    influx: InfluxSettings = InfluxSettings()
    replay: ReplaySettings = ReplaySettings()
    webhook: WebhookSettings = WebhookSettings()
    metrics: MetricsSettings = MetricsSettings()
    patents: dict[str, Any] | None = None
    """``[patents]``: the deep-tech patent watch (its alerts' site, watchlists, the score
    to alert from); validated by ``processors/patents.py`` at start-up. None: off."""
    sites: list[SiteConfig] = Field(default_factory=list)

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, sites: list[SiteConfig]) -> list[SiteConfig]:
        ids = [s.id for s in sites]
        duplicates = repeated(ids)
        if duplicates:
            raise ValueError(f"duplicate site ids {duplicates}")
        return sites

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            _SecretFiles(settings_cls, env_settings),
        ]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def embedded_broker(self) -> bool:
        return self.broker is None

    @property
    def single_record_batches(self) -> bool:
        if self.kafka.one_record_per_batch is None:
            return self.embedded_broker
        return self.kafka.one_record_per_batch

    def topic(self, spec: TopicSpec) -> str:
        """The full name of a registry topic in this deployment."""
        return spec.full_name(self.topic_prefix)

    def secret_values(self) -> list[str]:
        """Every secret the settings hold, in clear: for the logs to mask, never to show."""
        values = [
            secret.get_secret_value()
            for secret in (
                self.kafka.sasl_password,
                self.influx.password,
                self.influx.token,
                self.webhook.secret,
            )
            if secret is not None
        ]
        if self.webhook.url is not None:
            values.append(self.webhook.url)  # a Slack URL carries its key in the path
        return values

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-able data, secrets masked: safe to log or print.

        ``SecretStr`` fields dump as ``**********``; URLs lose any password, the
        query values that look like keys, and, for the webhook, everything after the host.
        """
        data = self.model_dump(mode="json")
        if self.influx.url is not None:
            data["influx"]["url"] = mask_url(self.influx.url)
        if self.webhook.url is not None:
            data["webhook"]["url"] = mask_url(self.webhook.url, keep_path=False)
        if self.broker is not None:
            data["broker"] = mask_url(self.broker)
        return data


class SettingsError(Exception):
    """Invalid settings; the message names each setting, its env var and what is accepted."""

    retriable = False


def _env_name(loc: tuple[int | str, ...]) -> str:
    head = [str(part) for part in loc if not isinstance(part, int)]
    if not head:
        return ENV_PREFIX.rstrip("_")
    if head[0] in ("sites",):
        return f"{ENV_PREFIX}SITES (JSON) or [[sites]] in the TOML file"
    return ENV_PREFIX + "_".join(head[:2]).upper()


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, also inside ``list[...]`` or ``... | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for inner in get_args(annotation):
        if (model := _model_in(inner)) is not None:
            return model
    return None


def _field_at(loc: tuple[int | str, ...]) -> tuple[type[BaseModel] | None, str | None]:
    """The model that holds the setting at ``loc`` and the setting's name (None: no such)."""
    model: type[BaseModel] | None = Settings
    names = [part for part in loc if isinstance(part, str)]
    for name in names[:-1]:
        field = model.model_fields.get(name) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return model, names[-1] if names else None


def _is_secret(loc: tuple[int | str, ...]) -> bool:
    model, name = _field_at(loc)
    field = model.model_fields.get(name) if model is not None and name is not None else None
    return field is not None and SecretStr in (field.annotation, *get_args(field.annotation))


def _shown_input(item: Any) -> str:
    """``; got <value>`` for an error, or nothing where the value must not be echoed."""
    loc, value = tuple(item["loc"]), item.get("input")
    if item["type"] in ("missing", "extra_forbidden") or isinstance(value, dict | list):
        # An unknown key may be a misspelt secret: its name is what matters.
        return ""
    if _is_secret(loc) or loc == ("webhook", "url"):
        return f"; got {MASK}"
    if loc in (("influx", "url"), ("broker",)) and isinstance(value, str):
        return f"; got {mask_url(value)!r}"
    return f"; got {value!r}"


def _suggestion(loc: tuple[int | str, ...]) -> str:
    model, name = _field_at(loc)
    if model is None or name is None:
        return ""
    close = difflib.get_close_matches(name, list(model.model_fields), n=1)
    return f" (did you mean {setting_path((*loc[:-1], close[0]))}?)" if close else ""


def _describe_item(item: Any) -> str:
    loc = tuple(item["loc"])
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        message = "unknown setting" + _suggestion(loc)
    setting = setting_path(loc)
    if item["type"] == "value_error" and isinstance(item.get("input"), dict):
        # A check across a section's settings: its message names them.
        return f"  {setting}: {message}"
    return f"  {setting} (env {_env_name(loc)}): {message}{_shown_input(item)}"


def _describe(error: ValidationError) -> str:
    return "invalid settings:\n" + "\n".join(_describe_item(item) for item in error.errors())


def env_setting(variable: str) -> tuple[str, ...] | None:
    """The setting a ``WATTSTREAM_*`` variable sets, split as the environment source
    splits it (at the first ``_`` after the area); None if it sets none."""
    if not variable.upper().startswith(ENV_PREFIX):
        return None
    key = variable[len(ENV_PREFIX) :].lower()
    if key in Settings.model_fields:
        return (key,)
    area, _, name = key.partition("_")
    field = Settings.model_fields.get(area)
    model = _model_in(field.annotation) if field is not None else None
    if model is not None and area != "sites" and name in model.model_fields:
        return (area, name)
    return None


SECRET_FILE_SUFFIX = "_FILE"  # noqa: S105 - a variable-name suffix, not a password


def secret_file_variables() -> list[tuple[str, str, str]]:
    """(section, field, variable) of every secret that may come from a file: the
    variable ``WATTSTREAM_<SECTION>_<FIELD>_FILE`` names the file (Docker and Kubernetes
    secrets are files; the value is its text, a trailing newline removed)."""
    out = []
    for area in _section_names():
        model = _model_in(Settings.model_fields[area].annotation)
        assert model is not None
        for name in model.model_fields:
            if _is_secret((area, name)):
                out.append((area, name, f"{ENV_PREFIX}{area}_{name}{SECRET_FILE_SUFFIX}".upper()))
    return out


class _SecretFiles(PydanticBaseSettingsSource):
    """The environment, with each secret's ``..._FILE`` variable replaced by the file's text."""

    def __init__(self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ does the work

    def __call__(self) -> dict[str, Any]:
        data = self.env()
        environ = {name.upper(): value for name, value in os.environ.items()}
        for area, name, variable in secret_file_variables():
            section = data.get(area)
            if isinstance(section, dict):
                section.pop(f"{name}{SECRET_FILE_SUFFIX}".lower(), None)
            path = environ.get(variable, "")
            if not path:
                continue
            direct = variable.removesuffix(SECRET_FILE_SUFFIX)
            if environ.get(direct):
                raise SettingsError(f"invalid settings:\n  {direct} and {variable}: set only one")
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as error:
                raise SettingsError(
                    f"invalid settings:\n  {area}.{name} (env {variable}): cannot read the "
                    f"secret file {path!r}: {error.strerror}"
                ) from None
            if not isinstance(section, dict):
                section = data[area] = {}
            section[name] = text.rstrip("\r\n")
        return data


def _section_names() -> list[str]:
    """The sections set field by field from the environment (``sites`` takes JSON)."""
    return [
        name
        for name, field in Settings.model_fields.items()
        if name != "sites" and _model_in(field.annotation) is not None
    ]


def _env_names() -> list[str]:
    """Every variable that sets something, for "did you mean"."""
    names = [ENV_PREFIX + name.upper() for name in Settings.model_fields]
    for area in _section_names():
        model = _model_in(Settings.model_fields[area].annotation)
        assert model is not None
        names += [f"{ENV_PREFIX}{area}_{name}".upper() for name in model.model_fields]
    return names


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line per ``WATTSTREAM_*`` variable that sets nothing: a typo must not pass unseen.

    The environment source ignores such variables, except those under a section
    (``WATTSTREAM_INFLUX_URLL``), which the section's model already reports."""
    sections = {ENV_PREFIX + name.upper() + "_" for name in _section_names()}
    lines = []
    for variable in sorted(environ):
        upper = variable.upper()
        if (
            upper.startswith(ENV_PREFIX)
            and environ[variable] != ""  # an empty variable counts as unset
            and upper not in OTHER_VARIABLES
            and not upper.startswith(tuple(sections))
            and env_setting(variable) is None
        ):
            close = difflib.get_close_matches(variable.upper(), _env_names(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"  {variable}: not a wattstream setting{hint}")
    return lines


def _source_error(error: SourceError) -> str:
    """A value the environment source could not parse (JSON of a list or a section)."""
    field = re.search(r'field "([^"]+)"', str(error))
    name = field.group(1) if field else "?"
    cause = f": {error.__cause__}" if error.__cause__ is not None else ""
    return f"invalid settings:\n  {name} (env {ENV_PREFIX}{name.upper()}): not valid JSON{cause}"


def check_url(url: str) -> None:
    """An http(s) URL with a host, or a ValueError that does not echo it (it may hold a key)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host")


_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?[^/?#@]*@")
_SECRET_QUERY = re.compile(
    r"(?i)((?:^|[&;])[^=&;]*(?:token|key|secret|passw|pwd|sig|auth|credential)[^=&;]*=)[^&;]*"
)


def mask_url(url: str, *, keep_path: bool = True) -> str:
    """``url`` safe to print: no user or password, query values that look like keys masked;
    with ``keep_path=False`` only ``scheme://host[:port]`` (and a mask for the rest)."""
    text = _USERINFO.sub(lambda match: (match.group(1) or "") + MASK + "@", url, count=1)
    if not keep_path:
        parts = urlsplit(text)
        rest = f"/{MASK}" if parts.path.strip("/") or parts.query or parts.fragment else ""
        host = parts.netloc.rsplit("@", 1)[-1]
        return f"{parts.scheme}://{host}{rest}" if parts.scheme and host else MASK
    base, mark, query = text.partition("?")
    return base + mark + _SECRET_QUERY.sub(lambda match: match.group(1) + MASK, query)


def repeated(values: Iterable[str]) -> list[str]:
    """The values that occur more than once, sorted: what a "must be unique" error names."""
    return sorted(value for value, count in Counter(values).items() if count > 1)


def check_soc_range(device: str, soc_min_pct: float, soc_max_pct: float) -> None:
    """A battery's state-of-charge window must not be empty (raises for a settings model)."""
    if not soc_min_pct < soc_max_pct:
        raise ValueError(
            f"battery {device}: soc_min_pct ({soc_min_pct}) must be below "
            f"soc_max_pct ({soc_max_pct})"
        )


def time_zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``, or a ValueError a settings model shows against the setting."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name like 'Europe/Rome')") from None


def setting_path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    """A validation error's location as a setting name: ``consumers[0].priority``."""
    text = prefix
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(settings)"


def validate_section(model: type[M], where: str, data: Any) -> M:
    """Validate a plain settings section with its owner's model, at start-up.

    ``where`` names the section, e.g. ``sites[turin-home].allocation``; the
    :class:`SettingsError` names every bad setting under it.
    """
    try:
        return model.model_validate(data)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            got = item.get("input")
            shown = "" if item["type"] == "missing" or isinstance(got, dict) else f"; got {got!r}"
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {setting_path(tuple(item['loc']), where)}: {message}{shown}")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None


@contextmanager
def _using_config(path: Path | None) -> Iterator[None]:
    token = _config_file.set(path)
    try:
        yield
    finally:
        _config_file.reset(token)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Load and validate settings, raising :class:`SettingsError` with a readable message."""
    path_text = config_file if config_file is not None else os.environ.get(CONFIG_ENV)
    path = Path(path_text) if path_text else None
    if path is not None and not path.is_file():
        raise SettingsError(f"config file {str(path)!r} does not exist (--config or {CONFIG_ENV})")
    unknown = _unknown_variables(os.environ)
    try:
        with _using_config(path):
            settings = Settings(**overrides)
    except ValidationError as error:
        lines = _describe(error).splitlines()
        raise SettingsError("\n".join([lines[0], *unknown, *lines[1:]])) from None
    except SourceError as error:
        raise SettingsError(_source_error(error)) from None
    except ValueError as error:  # TOML syntax errors surface as ValueError subclasses
        raise SettingsError(f"config file {str(path)!r}: {error}") from None
    if unknown:
        raise SettingsError("invalid settings:\n" + "\n".join(unknown))
    return settings
