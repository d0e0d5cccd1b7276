"""The one registry of Kafka topics. Nothing else in wattstream spells a topic name.

Every topic keyed by site has the same partition count, so Faust co-partitions
them: partition p of ``telemetry`` and of ``site-prices`` hold the same sites,
and one worker sees a site's readings and prices in one stream.

A deployment can prefix every name (``WATTSTREAM_TOPIC_PREFIX``), so several
deployments, or several tests, share one cluster without seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from pipeline import schemas

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    value_schema: type[BaseModel]
    key: str
    """What the Kafka key holds (UTF-8 text)."""
    description: str
    keyed_by_site: bool = True
    """Site-keyed topics are co-partitioned and take the deployment's partition count."""
    partitions: int | None = None
    """Fixed partition count for topics that are not keyed by site."""
    retention_ms: int = 7 * DAY_MS
    compacted: bool = False
    internal: bool = False
    """Written and read by wattstream itself, not a public interface."""

    def full_name(self, prefix: str = "") -> str:
        return f"{prefix}{self.name}"

    def partition_count(self, site_partitions: int) -> int:
        if self.keyed_by_site:
            return site_partitions
        assert self.partitions is not None, f"{self.name}: partitions must be fixed"
        return self.partitions

    def configs(self) -> dict[str, str]:
        configs = {"retention.ms": str(self.retention_ms)}
        if self.compacted:
            configs["cleanup.policy"] = "compact"
        return configs


TELEMETRY = TopicSpec(
    "wattstream.telemetry",
    schemas.TelemetryBatch,
    key="site",
    description="Batches of device readings from every connector.",
)
PRICES = TopicSpec(
    "wattstream.prices",
    schemas.PriceTick,
    key="market",
    keyed_by_site=False,
    # Prices are a few messages per hour per market: one partition keeps each
    # market's ticks in order and costs nothing.
    partitions=1,
    retention_ms=400 * DAY_MS,
    description="Energy prices per market and delivery interval (day-ahead, spot, TOU).",
)
CARBON = TopicSpec(
    "wattstream.carbon",
    schemas.CarbonIntensity,
    key="zone",
    keyed_by_site=False,
    partitions=1,
    retention_ms=400 * DAY_MS,
    description="Grid carbon intensity per zone and interval.",
)
SITE_PRICES = TopicSpec(
    "wattstream.site-prices",
    schemas.PriceTick,
    key="site",
    internal=True,
    description="Price ticks fanned out to each site of their market, co-partitioned "
    "with telemetry so one worker joins a site's readings and prices.",
)
SITE_CARBON = TopicSpec(
    "wattstream.site-carbon",
    schemas.CarbonIntensity,
    key="site",
    internal=True,
    description="Carbon intensities fanned out to each site of their zone, co-partitioned "
    "with telemetry so one worker joins a site's readings and its grid's intensity.",
)
DECISIONS = TopicSpec(
    "wattstream.decisions",
    schemas.Decision,
    key="site",
    retention_ms=30 * DAY_MS,
    description="Battery arbitrage decisions, one per battery per price interval.",
)
ALERTS = TopicSpec(
    "wattstream.alerts",
    schemas.Alert,
    key="site",
    retention_ms=30 * DAY_MS,
    description="Alerts with deterministic ids: firing and resolved events.",
)
ALLOCATIONS = TopicSpec(
    "wattstream.allocations",
    schemas.AllocationPlan,
    key="site",
    retention_ms=30 * DAY_MS,
    description="Energy allocation plans per site and interval.",
)
EMISSIONS = TopicSpec(
    "wattstream.emissions",
    schemas.EmissionsRecord,
    key="site",
    retention_ms=400 * DAY_MS,
    description="Hourly Scope 2 emissions per site.",
)
CERTIFICATES = TopicSpec(
    "wattstream.certificates",
    schemas.CertificateEvent,
    key="site",
    retention_ms=-1,  # the ledger's event log: kept forever
    description="Guarantee-of-origin ledger events (mint, burn, expire).",
)
COMMANDS = TopicSpec(
    "wattstream.commands",
    schemas.Command,
    key="site",
    retention_ms=30 * DAY_MS,
    description="Commands to devices, and the audit of what was sent or dry-run.",
)
DEAD_LETTERS = TopicSpec(
    "wattstream.dead-letters",
    schemas.DeadLetter,
    key="source topic",
    keyed_by_site=False,
    partitions=1,
    retention_ms=30 * DAY_MS,
    description="Records that could not be parsed or validated, with the reason and raw bytes.",
)
EV_SESSIONS = TopicSpec(
    "wattstream.ev-sessions",
    schemas.ChargingSessionEvent,
    key="site",
    # Session records back billing and yearly charging statistics.
    retention_ms=400 * DAY_MS,
    description="EV charging session events from OCPP charge points: plug-in, "
    "transaction start, stop (with the energy delivered), unplug.",
)
PATENTS = TopicSpec(
    "wattstream.patents",
    schemas.Patent,
    key="patent_id",
    keyed_by_site=False,
    partitions=1,
    compacted=True,  # the latest record of each document
    retention_ms=-1,
    description="Patent publications (USPTO, EPO, WIPO) for the deep-tech watch.",
)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    TELEMETRY,
    PRICES,
    CARBON,
    SITE_PRICES,
    SITE_CARBON,
    DECISIONS,
    ALERTS,
    ALLOCATIONS,
    EMISSIONS,
    CERTIFICATES,
    COMMANDS,
    DEAD_LETTERS,
    EV_SESSIONS,
    PATENTS,
)


def by_name(name: str, prefix: str = "") -> TopicSpec:
    """The spec of a topic given its full (prefixed) or bare name."""
    for spec in ALL_TOPICS:
        if name in (spec.name, spec.full_name(prefix)):
            return spec
    known = ", ".join(spec.name for spec in ALL_TOPICS)
    raise KeyError(f"unknown topic {name!r}; known topics: {known}")
