"""wattstream's settings: one pydantic-settings model, from the environment and a TOML file.

Precedence, highest first: explicit overrides in code, environment variables
``WATTSTREAM_<AREA>_<FIELD>`` (for example ``WATTSTREAM_INFLUX_URL``), the TOML
file given by ``--config`` or ``WATTSTREAM_CONFIG``, then the defaults below.
Lists such as ``sites`` are best written in TOML; from the environment they
take JSON.

Every invalid value fails at start-up with a :class:`SettingsError` that
names the setting, its environment variable and the accepted values.
Secrets are ``SecretStr``: they print as ``**********`` and never reach a log.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.schemas import Identifier
from pipeline.topics import TopicSpec

M = TypeVar("M", bound=BaseModel)

ENV_PREFIX = "WATTSTREAM_"
CONFIG_ENV = "WATTSTREAM_CONFIG"

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
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
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
    org: str = "wattstream"
    bucket: str = "wattstream"
    token: SecretStr | None = None
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

    @model_validator(mode="after")
    def _url_scheme(self) -> Self:
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"influx.url must start with http:// or https://, got {self.url!r}")
        return self

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
    strategy: Literal["threshold", "optimal"] = "threshold"
    """``threshold``: the price rule below; ``optimal``: a rolling-horizon linear
    program over the prices published so far (see processors/optimal.py)."""
    charge_below_price_per_kwh: float | None = None
    """Threshold strategy: charge below this price (required for it)."""
    discharge_above_price_per_kwh: float | None = None
    """Threshold strategy: discharge above this price (required for it)."""
    degradation_cost_per_kwh: Annotated[float, Field(ge=0.0)] = 0.0
    """Optimal strategy: wear cost per kWh discharged, in the price's currency."""
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

    @model_validator(mode="after")
    def _unique_devices(self) -> Self:
        devices = [b.device for b in self.batteries]
        duplicates = sorted({d for d in devices if devices.count(d) > 1})
        if duplicates:
            raise ValueError(f"site {self.id}: duplicate battery devices {duplicates}")
        return self


class WebhookSettings(_Area):
    """Alert webhooks (``WATTSTREAM_WEBHOOK_*``). With no ``url``, no webhook is sent."""

    url: str | None = None
    secret: SecretStr | None = None
    """HMAC-SHA256 key of the signature header; required with a URL."""
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

    @model_validator(mode="after")
    def _signed(self) -> Self:
        if self.url is not None:
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(
                    f"webhook.url must start with http:// or https://, got {self.url!r}"
                )
            if self.secret is None or not self.secret.get_secret_value():
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
    kafka: KafkaSettings = KafkaSettings()
    influx: InfluxSettings = InfluxSettings()
    replay: ReplaySettings = ReplaySettings()
    webhook: WebhookSettings = WebhookSettings()
    sites: list[SiteConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_sites(self) -> Self:
        ids = [s.id for s in self.sites]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate site ids {duplicates}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
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

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-able data, secrets masked: safe to log or print."""
        return self.model_dump(mode="json")


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


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        setting = ".".join(str(p) for p in loc) or "(settings)"
        message = item["msg"]
        got = "" if item["type"] == "missing" else f"; got {item.get('input')!r}"
        if isinstance(item.get("input"), dict):
            got = ""
        lines.append(f"  {setting} (env {_env_name(loc)}): {message}{got}")
    return "invalid settings:\n" + "\n".join(lines)


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
            lines.append(f"  {setting_path(tuple(item['loc']), where)}: {item['msg']}{shown}")
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
    try:
        with _using_config(path):
            return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None
    except ValueError as error:  # TOML syntax errors surface as ValueError subclasses
        raise SettingsError(f"config file {str(path)!r}: {error}") from None
