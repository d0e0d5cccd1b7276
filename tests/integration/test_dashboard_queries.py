"""Every query of every shipped Grafana dashboard, expanded as Grafana expands it, against a
real InfluxDB loaded through the real pipeline.

Grafana cannot run here, so this is how the dashboards are checked: every panel target,
annotation and template-variable query is expanded with :func:`pipeline.dashboards.expand`
over the data's time range, with the ``$__interval`` Grafana would pick for a 1000-pixel
panel, and run against InfluxDB 1.6.7: with every site selected ("All") and with one site
it must return at least one non-null value, of the selected sites only; a query filtered
by site must return nothing for a site that has no data (a filter that does not filter).

How the data gets there: the bundled sample (data/sample) is replayed through every agent
and the InfluxDB sink, in this process as ``wattstream demo`` runs them, so telemetry,
prices, the zone's carbon intensity (through the carbon feed), real arbitrage decisions,
emissions, certificate events and follow-the-sun commands flow. Some alerts (vampire
loads, a patent alert), allocation plans and other commands have no source in the sample
(the fusion SCRAM is raised by the real SCRAM agent from the simulator's quench shot), and
no connector here produces home, EV or fusion telemetry from the sample:
**schema-valid messages built from ``pipeline.schemas`` models stand in for them** on their
Kafka topics (home, EV and fusion readings from the project's own simulators). They go
through the same real sink into the same real InfluxDB as everything else.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
import yaml

from ingest.simulators.fusion import fusion_series, safety_violations
from ingest.simulators.profiles import EvConfig, ev_state, household_load_kw
from pipeline import codec, kafka, topics
from pipeline.dashboards import (
    Dashboard,
    DashboardQuery,
    calculate_interval,
    expand,
    load_dashboards,
    parse_interval,
    queries,
    template_variables,
    variable_query,
    variable_references,
)
from pipeline.demo import run_pipeline
from pipeline.local import EmbeddedBroker
from pipeline.schemas import (
    Alert,
    AlertStatus,
    Allocation,
    AllocationPlan,
    Command,
    EvReading,
    FusionReading,
    HomeReading,
    Message,
    Severity,
    SourceFlow,
    TelemetryBatch,
    stable_id,
)
from pipeline.settings import Settings, load_settings
from tests.conftest import REPO, SAMPLE_CONFIG
from tests.servers import InfluxDB1
from tests.unit.processors.test_patent_scoring import fusion_grant

pytestmark = pytest.mark.integration

SAMPLE = SAMPLE_CONFIG.parent
WEEK_START = datetime(2025, 4, 7, tzinfo=UTC)
DAYS = 7
SITES = ("moncalieri-depot", "turin-home", "turin-school")
FUSION_SITE = "frascati-fusion"
LOCAL_TZ = "Europe/Rome"
MAX_DATA_POINTS = 1000
"""Grafana asks for about one point per pixel: a panel some 1000 pixels wide."""
DATASOURCE_YAML = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "influxdb.yaml"

DASHBOARDS = load_dashboards()


# --- stand-ins for the processors of later issues ---------------------------------------------


def _hours() -> Iterator[datetime]:
    for hour in range(DAYS * 24):
        yield WEEK_START + timedelta(hours=hour)


def _local_hour(at: datetime) -> int:
    return (at.hour + 2) % 24  # Europe/Rome is UTC+2 all through the sample week


def _hourly_energy() -> dict[tuple[str, datetime], dict[str, float]]:
    """Per site and hour, from the sample telemetry: grid import/export, solar, battery kWh."""
    frame = pl.read_parquet(SAMPLE / "telemetry.parquet")
    hourly = (
        frame.with_columns(pl.col("time").dt.truncate("1h").alias("hour"))
        .group_by("site", "hour", "kind")
        .agg(
            (pl.col("power_kw").clip(lower_bound=0).sum() / 60).alias("positive_kwh"),
            (-pl.col("power_kw").clip(upper_bound=0).sum() / 60).alias("negative_kwh"),
        )
    )
    energy: dict[tuple[str, datetime], dict[str, float]] = {}
    for row in hourly.iter_rows(named=True):
        slot = energy.setdefault((row["site"], row["hour"]), {})
        slot[f"{row['kind']}_positive_kwh"] = row["positive_kwh"]
        slot[f"{row['kind']}_negative_kwh"] = row["negative_kwh"]
    return energy


def _prices() -> dict[datetime, float]:
    frame = pl.read_csv(SAMPLE / "prices.csv", try_parse_dates=True)
    return {row["time"]: row["price_per_kwh"] for row in frame.iter_rows(named=True)}


Produced = list[tuple[topics.TopicSpec, str, Message]]


def allocation_plans() -> Produced:
    energy, prices = _hourly_energy(), _prices()
    return [
        (topics.ALLOCATIONS, site, _plan(site, start, energy[(site, start)], prices[start]))
        for site in SITES
        for start in _hours()
    ]


def _plan(site: str, start: datetime, e: dict[str, float], price: float) -> AllocationPlan:
    hour = _local_hour(start)
    generator_kw = 4.0 if site == "moncalieri-depot" and 18 <= hour <= 20 else 0.0
    sources = [
        SourceFlow(source="solar", power_kw=e["solar_positive_kwh"]),
        SourceFlow(source="battery", power_kw=e["battery_positive_kwh"]),
        SourceFlow(source="grid", power_kw=e["meter_positive_kwh"]),
        SourceFlow(source="generator", power_kw=generator_kw),
    ]
    supply_kw = sum(s.power_kw for s in sources)
    # The EV charger is last in line: in the evening peak it is shed by a third.
    shed = 1 / 3 if 18 <= hour <= 20 else 0.0
    requested = {
        "base_load": 0.5 * supply_kw,
        "hvac": 0.3 * supply_kw,
        "ev_charger": 0.2 * supply_kw,
    }
    allocations = [
        Allocation(
            consumer=consumer,
            priority=priority,
            requested_kw=requested_kw,
            allocated_kw=requested_kw * (1 - shed) if consumer == "ev_charger" else requested_kw,
            sources=[SourceFlow(source=s.source, power_kw=s.power_kw * share) for s in sources],
        )
        for priority, (consumer, requested_kw), share in zip(
            (1, 2, 3), requested.items(), (0.5, 0.3, 0.2), strict=True
        )
    ]
    grid_cost = e["meter_positive_kwh"] * price
    export_revenue = e["meter_negative_kwh"] * price * 0.9
    saving = 0.05 * grid_cost + 0.01
    return AllocationPlan(
        plan_id=stable_id("plan", site, start),
        site=site,
        start=start,
        end=start + timedelta(hours=1),
        sources=sources,
        allocations=allocations,
        grid_cost=grid_cost,
        export_revenue=export_revenue,
        net_cost=grid_cost - export_revenue,
        baseline_net_cost=grid_cost - export_revenue + saving,
        saving=saving,
    )


def _alert_pair(
    site: str,
    device: str | None,
    alert_type: str,
    severity: Severity,
    start: datetime,
    duration: timedelta | None,
    subject: str,
    observed: float | None = None,
    expected: float | None = None,
) -> list[Alert]:
    alert_id = stable_id("al", site, device, alert_type, start)
    firing = Alert(
        alert_id=alert_id,
        site=site,
        device=device,
        alert_type=alert_type,
        severity=severity,
        subject=subject,
        message=f"{subject} at {site}" + (f"/{device}" if device else ""),
        start=start,
        observed=observed,
        expected=expected,
    )
    if duration is None:
        return [firing]
    resolved = firing.model_copy(update={"status": AlertStatus.RESOLVED, "end": start + duration})
    return [firing, resolved]


def alerts_and_commands() -> Produced:
    out: Produced = []
    for n, site in enumerate(SITES):
        day = WEEK_START + timedelta(days=1 + n)
        for alert in (
            *_alert_pair(
                site,
                "home-1",
                "vampire_load",
                Severity.WARNING,
                day + timedelta(hours=1),
                timedelta(hours=3),
                "standby consumption above baseline",
                observed=0.35 + 0.1 * n,
                expected=0.12,
            ),
            *_alert_pair(
                site,
                "battery-1",
                "device_offline",
                Severity.WARNING,
                day + timedelta(hours=10),
                timedelta(minutes=20),
                "no readings for 5 minutes",
            ),
            *_alert_pair(
                site,
                "meter-1",
                "consumption_anomaly",
                Severity.CRITICAL,
                day + timedelta(days=2, hours=17),
                None,
                "consumption 3x the usual",
                observed=12.0,
                expected=4.0,
            ),
        ):
            out.append((topics.ALERTS, site, alert))
        for hour in range(0, DAYS * 24, 6):
            issued = WEEK_START + timedelta(hours=hour)
            command = Command(
                command_id=stable_id("cmd", site, issued),
                site=site,
                device="battery-1",
                action="set_power",
                setpoint_kw=-2.5 if _local_hour(issued) < 12 else 2.5,
                reason="arbitrage setpoint",
                issued_at=issued,
                valid_until=issued + timedelta(hours=1),
                source_id=stable_id("dec", site, issued),
            )
            out.append((topics.COMMANDS, site, command))
        shed = Command(
            command_id=stable_id("cmd", site, "shed"),
            site=site,
            device="ev-1",
            action="shed",
            setpoint_kw=0.0,
            reason="evening peak: EV charger shed",
            issued_at=day + timedelta(hours=16),
            dry_run=False,
        )
        out.append((topics.COMMANDS, site, shed))

    # The SCRAM alert and command come from the real SCRAM agent on the fusion telemetry;
    # the patent alerts from the real patent watch, on two grants published that week.
    for patent_day in (0, 4):
        grant = fusion_grant(
            doc_number=f"1190000{patent_day}",
            patent_id=f"US-1190000{patent_day}-B2",
            publication_date=(WEEK_START + timedelta(days=patent_day)).date(),
        )
        out.append((topics.PATENTS, grant.patent_id, grant))
    return out


SHOTS = ("nominal", "nominal", "quench", "nominal")
"""One tokamak shot a day at 09:00 UTC; the third one quenches."""


def telemetry_stand_ins() -> Produced:
    """Home and EV readings every 5 minutes at each site, and four tokamak shots."""
    out: Produced = []
    ev_config = EvConfig(timezone=LOCAL_TZ)
    for site in SITES:
        for day in range(DAYS):
            readings: list[Any] = []
            for step in range(24 * 12):
                at = WEEK_START + timedelta(days=day, minutes=5 * step)
                load_kw = household_load_kw(f"{site}/home-1", at, timezone=LOCAL_TZ)
                readings.append(HomeReading(device="home-1", ts=at, power_kw=load_kw))
                ev = ev_state(f"{site}/ev-1", at, config=ev_config)
                readings.append(
                    EvReading(
                        device="ev-1",
                        ts=at,
                        power_kw=ev.power_kw,
                        soc_pct=ev.soc_pct,
                        plugged_in=ev.plugged_in,
                        energy_kwh=ev.energy_kwh,
                    )
                )
            batch = TelemetryBatch(
                batch_id=stable_id("b", site, day), site=site, source="stand-in", readings=readings
            )
            out.append((topics.TELEMETRY, site, batch))
    for day, scenario in enumerate(SHOTS):
        shot = fusion_series(scenario, WEEK_START + timedelta(days=day, hours=9), seed=day)
        batch = TelemetryBatch(
            batch_id=stable_id("shot", day),
            site=FUSION_SITE,
            source="stand-in",
            readings=list(shot.readings),
        )
        out.append((topics.TELEMETRY, FUSION_SITE, batch))
    return out


def quench() -> tuple[datetime, FusionReading]:
    """The faulty shot's fault onset and its first reading outside the safe bands."""
    day = SHOTS.index("quench")
    shot = fusion_series("quench", WEEK_START + timedelta(days=day, hours=9), seed=day)
    assert shot.fault_onset is not None
    return shot.fault_onset, next(r for r in shot.readings if safety_violations(r))


async def produce(settings: Settings, messages: Produced) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        sent = [
            await producer.send(settings.topic(spec), codec.encode(message), key=key.encode())
            for spec, key, message in messages
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


# --- the loaded database --------------------------------------------------------------------


@dataclass
class Loaded:
    influxdb: InfluxDB1
    database: str
    min_interval: timedelta
    _ranges: dict[str, tuple[datetime, datetime]] = field(default_factory=dict)
    _variables: dict[tuple[str, str], dict[str, list[str]]] = field(default_factory=dict)

    def rows(self, influxql: str) -> list[dict[str, Any]]:
        return self.influxdb.rows(influxql, self.database)

    def measurement_range(self, measurement: str) -> tuple[datetime, datetime]:
        """First and last point of a measurement, widened to whole minutes."""
        if measurement not in self._ranges:
            ends = [
                self.rows(f'SELECT * FROM "{measurement}" ORDER BY time {order} LIMIT 1')  # noqa: S608
                for order in ("ASC", "DESC")
            ]
            assert all(ends), f"measurement {measurement!r} has no points"
            first, last = (datetime.fromtimestamp(e[0]["time"] / 1000, UTC) for e in ends)
            self._ranges[measurement] = (
                first.replace(second=0, microsecond=0),
                last.replace(second=0, microsecond=0) + timedelta(minutes=1),
            )
        return self._ranges[measurement]

    def time_range(self, query: str) -> tuple[datetime, datetime]:
        """The time range of the data a query reads: its measurements' first to last point."""
        ranges = [self.measurement_range(m) for m in measurements(query)]
        if not ranges:  # e.g. a variable query over every measurement
            ranges = [self.measurement_range(m["name"]) for m in self.rows("SHOW MEASUREMENTS")]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def run(self, query: str, variables: dict[str, list[str]]) -> tuple[str, dict[str, Any]]:
        start, end = self.time_range(query)
        interval = calculate_interval(start, end, MAX_DATA_POINTS, self.min_interval)
        influxql = expand(query, start, end, interval, variables)
        return influxql, self.influxdb.query(influxql, self.database)["results"][0]

    def variables(self, dashboard: Dashboard, selection: str) -> dict[str, list[str]]:
        """Each template variable's selection, resolved in order as Grafana does: "All"
        (every value its query returns), except ``site``: its first value for ONE_SITE,
        a site without data for NO_SUCH_SITE. Later variable queries see the earlier
        selections."""
        if selection == NO_SUCH_SITE:
            return {**self.variables(dashboard, ALL_SITES), "site": ["no-such-site"]}
        key = (dashboard.uid, selection)
        if key not in self._variables:
            resolved: dict[str, list[str]] = {}
            for variable in template_variables(dashboard.model):
                _, result = self.run(variable_query(variable), resolved)
                values = sorted({row[1] for s in result.get("series", []) for row in s["values"]})
                assert values, f"{dashboard.uid}: variable {variable['name']!r} has no values"
                if selection == ONE_SITE and variable["name"] == "site":
                    values = values[:1]
                resolved[variable["name"]] = values
            self._variables[key] = resolved
        return self._variables[key]


def measurements(query: str) -> set[str]:
    """The measurements after each FROM (a subquery's FROM is found on its own)."""
    found: set[str] = set()
    for match in re.finditer(r'\bFROM\s+((?:"[^"]+"\s*,\s*)*"[^"]+")', query):
        found.update(re.findall(r'"([^"]+)"', match.group(1)))
    return found


async def _load(settings: Settings) -> None:
    await kafka.wait_for_broker(settings)
    await kafka.ensure_topics(settings)
    await produce(
        settings,
        [
            *telemetry_stand_ins(),
            *allocation_plans(),
            *alerts_and_commands(),
        ],
    )
    # The replay, the agents and the sink, as `wattstream demo` runs them; the sink also
    # takes the stand-ins already waiting on their topics.
    await run_pipeline(
        settings,
        SAMPLE / "telemetry.parquet",
        SAMPLE / "prices.csv",
        drain_timeout_s=120,
        report_dir=None,
        carbon_path=SAMPLE / "carbon.csv",
        ev_charging=False,  # no dashboard shows the EV stage's charging yet
    )


@pytest.fixture(scope="module")
def loaded(
    kafka_broker: EmbeddedBroker, influxdb: InfluxDB1, tmp_path_factory: pytest.TempPathFactory
) -> Loaded:
    tag = uuid.uuid4().hex[:12]
    database = f"dashboards_{tag}"
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("WATTSTREAM_"):
                patch.delenv(name)
        settings = load_settings(
            SAMPLE_CONFIG,
            broker=kafka_broker.bootstrap,
            app_id=f"dashboards-{tag}",
            topic_prefix=f"d{tag}.",
            partitions=2,
            store="memory",
            data_dir=tmp_path_factory.mktemp("dashboards") / "state",
            kafka={"one_record_per_batch": True},
            influx={"url": influxdb.url, "database": database, "flush_interval_s": 0.5},
            patents={"site": FUSION_SITE},
        )
        asyncio.run(_load(settings))
    provisioned = yaml.safe_load(DATASOURCE_YAML.read_text())["datasources"][0]
    min_interval = parse_interval(provisioned["jsonData"]["timeInterval"])
    return Loaded(influxdb, database, min_interval)


# --- the checks -----------------------------------------------------------------------------


ALL_SITES, ONE_SITE, NO_SUCH_SITE = "all-sites", "one-site", "no-such-site"


def _cases() -> list[Any]:
    """(dashboard, query, site selection), named "dashboard/kind:title/refId-selection".

    A query that filters by site also runs for a site with no data, where it must
    return nothing: that is what catches a missing or broken site filter.
    """
    cases = []
    for dashboard in DASHBOARDS:
        for query in queries(dashboard):
            selections = [ALL_SITES, ONE_SITE]
            if "site" in variable_references(query.text):
                selections.append(NO_SUCH_SITE)
            for selection in selections:
                case_id = f"{dashboard.path.stem}/{query.kind}:{query.title}/{query.ref_id}"
                cases.append(pytest.param(dashboard, query, selection, id=f"{case_id}-{selection}"))
    return cases


def _non_null_values(statement: dict[str, Any]) -> list[Any]:
    values: list[Any] = []
    for series in statement.get("series", []):
        columns = series["columns"]
        for row in series["values"]:
            values.extend(
                v for c, v in zip(columns, row, strict=True) if c != "time" and v is not None
            )
    return values


def _sites_in(statement: dict[str, Any]) -> set[str]:
    """Sites in the answer: the series' site tags, and a "site" column of table queries."""
    sites = set()
    for series in statement.get("series", []):
        if "site" in series.get("tags", {}):
            sites.add(series["tags"]["site"])
        if "site" in series["columns"]:
            index = series["columns"].index("site")
            sites.update(row[index] for row in series["values"] if row[index] is not None)
    return sites


@pytest.mark.parametrize(("dashboard", "query", "selection"), _cases())
def test_every_dashboard_query_returns_the_selected_sites_data(
    loaded: Loaded, dashboard: Dashboard, query: DashboardQuery, selection: str
) -> None:
    variables = loaded.variables(dashboard, selection)
    influxql, statement = loaded.run(query.text, variables)
    assert "error" not in statement, f"{query.label}: {statement['error']}\n{influxql}"
    if selection == NO_SUCH_SITE:
        assert not _non_null_values(statement), f"{query.label}: data of other sites\n{influxql}"
        return
    assert _non_null_values(statement), f"{query.label}: no data\n{influxql}"
    if "site" in variables:
        unexpected = _sites_in(statement) - set(variables["site"])
        assert not unexpected, f"{query.label}: sites {unexpected} not selected\n{influxql}"


def test_the_queries_are_many_and_cover_every_dashboard() -> None:
    # Guards the parametrisation above: an empty or truncated list would pass vacuously.
    per_dashboard = {d.uid: len(queries(d)) for d in DASHBOARDS}
    assert len(per_dashboard) == 5 and min(per_dashboard.values()) >= 8, per_dashboard


def test_site_variables_list_exactly_the_sites_that_have_data(loaded: Loaded) -> None:
    sites = {d.path.stem: loaded.variables(d, ALL_SITES)["site"] for d in DASHBOARDS}
    assert sites == {
        "alerts": sorted([*SITES, FUSION_SITE]),
        "carbon": list(SITES),
        "deep-tech": [FUSION_SITE],
        "energy-station": list(SITES),
        "facility": list(SITES),
    }
    one = loaded.variables(_dashboard("deep-tech"), ONE_SITE)
    assert one == {"site": [FUSION_SITE], "device": ["tokamak-1"]}


def _dashboard(stem: str) -> Dashboard:
    return next(d for d in DASHBOARDS if d.path.stem == stem)


def _panel_query(stem: str, title: str, ref_id: str = "A") -> str:
    dashboard = _dashboard(stem)
    return next(q.text for q in queries(dashboard) if q.title == title and q.ref_id == ref_id)


def test_decision_counts_are_the_real_arbitrage_decisions(loaded: Loaded) -> None:
    """The energy-station dashboard sees every decision the agents made: 3 sites x 168 h."""
    variables = loaded.variables(_dashboard("energy-station"), ALL_SITES)
    _, statement = loaded.run(_panel_query("energy-station", "Decisions"), variables)
    counts = {s["tags"]["action"]: s["values"][0][1] for s in statement["series"]}
    assert set(counts) == {"CHARGE", "DISCHARGE", "HOLD"}
    assert sum(counts.values()) == len(SITES) * DAYS * 24


def test_scram_annotation_marks_the_fault_of_the_quench_shot(loaded: Loaded) -> None:
    dashboard = _dashboard("deep-tech")
    (annotation,) = [q for q in queries(dashboard) if q.kind == "annotation" and q.title == "SCRAM"]
    _, statement = loaded.run(annotation.text, loaded.variables(dashboard, ONE_SITE))
    (series,) = statement["series"]
    ((at_ms, subject, _message, severity),) = series["values"]
    _, violation = quench()
    assert at_ms == pytest.approx(violation.ts.timestamp() * 1000, abs=1)
    # Raised by the real SCRAM agent at the shot's first reading outside the safe bands.
    assert subject == "SCRAM tokamak-1" and severity == "critical"


def test_one_site_sees_less_than_all_sites(loaded: Loaded) -> None:
    """The site filter really filters: one site's revenue rows are a subset of All's."""
    dashboard = _dashboard("energy-station")
    query = _panel_query("energy-station", "Expected revenue")
    _, every = loaded.run(query, loaded.variables(dashboard, ALL_SITES))
    _, one = loaded.run(query, loaded.variables(dashboard, ONE_SITE))
    assert _sites_in(every) == set(SITES)
    assert _sites_in(one) == {SITES[0]}
