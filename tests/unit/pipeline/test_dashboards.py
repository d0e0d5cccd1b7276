"""The shipped Grafana dashboards and provisioning files, and pipeline.dashboards itself:
validation, Grafana's macro and variable expansion, export. No servers: the queries are
run against a real InfluxDB in tests/integration/test_dashboard_queries.py."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import line_protocol_parser
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.dashboards import (
    DATASOURCE_UID,
    DEFAULT_DIR,
    FOLDER_UID,
    Dashboard,
    DashboardError,
    calculate_interval,
    dump,
    expand,
    export,
    format_interval,
    lint,
    load_dashboard,
    load_dashboards,
    panels,
    parse_interval,
    queries,
    round_interval_ms,
    template_variables,
    variable_references,
)
from pipeline.schemas import (
    Alert,
    Allocation,
    AllocationPlan,
    CarbonIntensity,
    CertificateEvent,
    Command,
    Decision,
    EmissionsRecord,
    PriceTick,
    SourceFlow,
    TelemetryBatch,
)
from sinks.lineprotocol import LINES_BY_SCHEMA
from tests.conftest import REPO

PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
T0 = datetime(2025, 4, 7, tzinfo=UTC)
T1 = datetime(2025, 4, 14, tzinfo=UTC)
SHIPPED = load_dashboards()


# --- the shipped files ------------------------------------------------------------------------


def test_the_five_dashboards_are_shipped_with_fixed_uids() -> None:
    assert DEFAULT_DIR == REPO / "deploy" / "grafana" / "dashboards"
    assert {d.path.name: d.uid for d in SHIPPED} == {
        "alerts.json": "wattstream-alerts",
        "carbon.json": "wattstream-carbon",
        "deep-tech.json": "wattstream-deep-tech",
        "energy-station.json": "wattstream-energy-station",
        "facility.json": "wattstream-facility",
    }
    for dashboard in SHIPPED:
        assert dashboard.model["id"] is None
        assert dashboard.model["schemaVersion"] == 39
        assert "wattstream" in dashboard.model["tags"]


def test_shipped_dashboards_pass_every_check() -> None:
    assert lint(SHIPPED) == []


def test_shipped_files_are_in_the_canonical_form_export_writes(tmp_path: Path) -> None:
    written = export(tmp_path, SHIPPED)
    assert [p.name for p in written] == [d.path.name for d in SHIPPED]
    for dashboard, path in zip(SHIPPED, written, strict=True):
        assert path.read_bytes() == dashboard.path.read_bytes(), f"{dashboard.path.name}: re-export"
    assert [d.model for d in load_dashboards(tmp_path)] == [d.model for d in SHIPPED]


def test_every_dashboard_has_a_multi_value_site_variable() -> None:
    for dashboard in SHIPPED:
        (site,) = [v for v in template_variables(dashboard.model) if v["name"] == "site"]
        assert site["type"] == "query" and site["multi"] and site["includeAll"]
        assert re.fullmatch(r'SHOW TAG VALUES FROM .+ WITH KEY = "site"', site["query"])
        assert site["datasource"]["uid"] == DATASOURCE_UID


def test_the_dashboards_cover_what_they_promise() -> None:
    """Each dashboard reads the measurements its brief names, with sensible panel types."""
    reads = {d.path.stem: {m for q in queries(d) for m in _measurements(q.text)} for d in SHIPPED}
    assert {"price", "decision", "battery", "allocation_plan", "allocation"} <= reads[
        "energy-station"
    ]
    assert {"meter", "solar", "home", "ev", "alert"} <= reads["facility"]
    assert {"carbon_intensity", "emissions", "certificate"} <= reads["carbon"]
    assert {"fusion", "alert", "command"} <= reads["deep-tech"]
    assert {"alert", "command", "wattstream_sink"} <= reads["alerts"]
    deep_tech = next(d for d in SHIPPED if d.path.stem == "deep-tech")
    (scram,) = [q for q in queries(deep_tech) if q.kind == "annotation" and q.title == "SCRAM"]
    assert "\"alert_type\" = 'scram'" in scram.text
    fields = " ".join(q.text for q in queries(deep_tech))
    for field in ("plasma_temp_kev", "confinement_stability", "q_factor", "magnetic_field_t"):
        assert field in fields
    types = {p["type"] for d in SHIPPED for p in panels(d.model)}
    assert {"timeseries", "stat", "table", "state-timeline", "barchart", "row"} <= types


def _measurements(query: str) -> set[str]:
    found: set[str] = set()
    for match in re.finditer(r'\bFROM\s+((?:"[^"]+"\s*,\s*)*"[^"]+")', query):
        found.update(re.findall(r'"([^"]+)"', match.group(1)))
    return found


def _one_of_each_message() -> Iterator[Any]:
    """Every message the sink writes, with every optional field set."""
    yield TelemetryBatch.model_validate(
        {
            "batch_id": "b",
            "site": "s",
            "source": "t",
            "readings": [
                {
                    "kind": "battery",
                    "device": "d",
                    "ts": T0,
                    "power_kw": 1.0,
                    "soc_pct": 50.0,
                    "voltage_v": 400.0,
                    "temperature_c": 20.0,
                },
                {
                    "kind": "solar",
                    "device": "d",
                    "ts": T0,
                    "power_kw": 1.0,
                    "irradiance_w_m2": 1.0,
                    "temp_air_c": 1.0,
                    "temp_module_c": 1.0,
                },
                {
                    "kind": "meter",
                    "device": "d",
                    "ts": T0,
                    "power_kw": 1.0,
                    "import_energy_kwh": 1.0,
                    "export_energy_kwh": 1.0,
                    "voltage_v": 230.0,
                    "frequency_hz": 50.0,
                },
                {"kind": "home", "device": "d", "ts": T0, "power_kw": 1.0},
                {
                    "kind": "generator",
                    "device": "d",
                    "ts": T0,
                    "power_kw": 1.0,
                    "running": True,
                    "fuel_pct": 1.0,
                },
                {
                    "kind": "ev",
                    "device": "d",
                    "ts": T0,
                    "power_kw": 1.0,
                    "soc_pct": 1.0,
                    "plugged_in": True,
                    "energy_kwh": 1.0,
                },
                {
                    "kind": "fusion",
                    "device": "d",
                    "ts": T0,
                    "plasma_temp_kev": 1.0,
                    "confinement_stability": 0.9,
                    "q_factor": 0.5,
                    "magnetic_field_t": 5.0,
                },
            ],
        }
    )
    yield PriceTick(market="m", start=T0, end=T1, price_per_kwh=0.1)
    yield CarbonIntensity(zone="z", start=T0, end=T1, co2_g_per_kwh=1.0, renewable_share_pct=1.0)
    yield Decision(
        decision_id="d",
        site="s",
        device="d",
        strategy="threshold",
        action="HOLD",
        power_kw=0.0,
        grid_energy_kwh=0.0,
        price_per_kwh=0.1,
        expected_revenue=0.0,
        soc_pct=1.0,
        expected_soc_pct=1.0,
        decided_at=T0,
        valid_from=T0,
        valid_until=T1,
        reason="r",
    )
    yield Alert(
        alert_id="a",
        site="s",
        device="d",
        alert_type="t",
        severity="info",
        subject="s",
        message="m",
        start=T0,
        observed=1.0,
        expected=1.0,
    )
    flows = [SourceFlow(source=s, power_kw=1.0) for s in ("solar", "battery", "grid", "generator")]
    yield AllocationPlan(
        plan_id="p",
        site="s",
        start=T0,
        end=T1,
        sources=flows,
        allocations=[
            Allocation(consumer="c", priority=1, requested_kw=1.0, allocated_kw=1.0, sources=flows)
        ],
        grid_cost=1.0,
        export_revenue=1.0,
        net_cost=1.0,
        baseline_net_cost=1.0,
        saving=1.0,
    )
    yield EmissionsRecord(
        record_id="r",
        site="s",
        start=T0,
        end=T1,
        grid_energy_kwh=1.0,
        solar_energy_kwh=1.0,
        battery_energy_kwh=1.0,
        grid_co2_g_per_kwh=1.0,
        location_based_kg_co2=1.0,
        market_based_kg_co2=1.0,
        clean_share_pct=1.0,
    )
    yield CertificateEvent(
        event_id="e",
        certificate_id="c",
        action="MINT",
        site="s",
        device="d",
        hour_start=T0,
        claimed_by="x",
        at=T0,
    )
    yield Command(
        command_id="c",
        site="s",
        device="d",
        action="set_power",
        setpoint_kw=1.0,
        reason="r",
        issued_at=T0,
        source_id="x",
    )


def _schema() -> dict[str, set[str]]:
    """Measurement -> its tag and field keys, from what sinks.lineprotocol writes."""
    keys: dict[str, set[str]] = {}
    for message in _one_of_each_message():
        for line in LINES_BY_SCHEMA[type(message)](message):
            point = line_protocol_parser.parse_line(line.decode())
            keys.setdefault(point["measurement"], set()).update(point["tags"], point["fields"])
    return keys


def test_every_identifier_a_query_names_is_in_the_sinks_schema() -> None:
    """A misspelt field or tag shows in Grafana as an empty panel, not an error: catch it here.

    ``wattstream_sink`` (the sink's own counters) is checked against a real sink by the
    integration test instead.
    """
    schema = _schema()
    assert {"battery", "fusion", "decision", "alert", "allocation_plan", "command"} <= set(schema)
    for dashboard in SHIPPED:
        for query in queries(dashboard):
            read = _measurements(query.text)
            if "wattstream_sink" in read:
                continue
            unknown = read - set(schema)
            assert not unknown, f"{query.label}: unknown measurements {unknown}"
            known = set().union(*(schema[m] for m in read)) | read
            aliases = set(re.findall(r'\bAS\s+"([^"]+)"', query.text))
            named = set(re.findall(r'"([^"]+)"', query.text))
            assert named <= known | aliases, f"{query.label}: unknown {named - known - aliases}"


def test_every_query_on_a_site_measurement_filters_by_the_site_variable() -> None:
    schema = _schema()
    by_site = {m for m, keys in schema.items() if "site" in keys}
    assert by_site >= {"battery", "decision", "alert", "emissions", "fusion"}
    assert "price" not in by_site and "carbon_intensity" not in by_site
    for dashboard in SHIPPED:
        for query in queries(dashboard):
            if query.kind == "variable" and 'WITH KEY = "site"' in query.text:
                continue
            if _measurements(query.text) & by_site:
                assert '"site" =~ /^$site$/' in query.text, query.label


# --- provisioning -----------------------------------------------------------------------------

ENV_EXPANSION = re.compile(r"^\$(?:__env\{[A-Za-z_][A-Za-z0-9_]*\}|\{[A-Za-z_][A-Za-z0-9_]*\})$")
SECRET_KEYS = re.compile(
    r"^(user|password|basicAuthUser|basicAuthPassword|token|httpHeaderValue\d*)$"
)


def _datasource() -> dict[str, Any]:
    document = yaml.safe_load((PROVISIONING / "datasources" / "influxdb.yaml").read_text())
    assert document["apiVersion"] == 1
    (datasource,) = document["datasources"]
    datasource_: dict[str, Any] = datasource
    return datasource_


def test_the_datasource_is_influxql_on_the_wattstream_database_with_the_panels_uid() -> None:
    datasource = _datasource()
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "influxdb" and datasource["access"] == "proxy"
    assert datasource["url"] == "http://influxdb:8086"
    assert datasource["jsonData"]["version"] == "InfluxQL"
    assert datasource["jsonData"]["dbName"] == "wattstream"
    assert parse_interval(datasource["jsonData"]["timeInterval"]) <= timedelta(minutes=1)


def test_datasource_credentials_come_only_from_the_environment() -> None:
    datasource = _datasource()

    def secrets(node: Any, secure: bool = False) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, dict | list):
                    yield from secrets(value, secure or key == "secureJsonData")
                elif secure or SECRET_KEYS.match(key):
                    yield key, value

    found = dict(secrets(datasource))
    assert {"user", "password"} <= set(found), found
    for key, value in found.items():
        assert isinstance(value, str) and ENV_EXPANSION.match(value), f"{key}: {value!r}"


def test_the_dashboard_provider_loads_the_mounted_directory_into_the_folder() -> None:
    document = yaml.safe_load((PROVISIONING / "dashboards" / "wattstream.yaml").read_text())
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert provider["folder"] == "wattstream" and provider["folderUid"] == FOLDER_UID


# --- loading and enumerating ------------------------------------------------------------------

DS = {"type": "influxdb", "uid": DATASOURCE_UID}


def _target(query: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": DS, "query": query, "rawQuery": True, "refId": ref}


def _panel(panel_id: int, title: str, *targets: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": panel_id,
        "title": title,
        "type": "timeseries",
        "datasource": DS,
        "targets": list(targets),
    }


Q = 'SELECT mean("power_kw") FROM "meter" WHERE "site" =~ /^$site$/ AND $timeFilter'


def _model() -> dict[str, Any]:
    return {
        "uid": "u1",
        "title": "Test",
        "id": None,
        "panels": [
            _panel(1, "Top", _target(Q)),
            {"id": 2, "type": "text", "title": "Notes"},
            {
                "id": 3,
                "type": "row",
                "title": "Collapsed",
                "collapsed": True,
                "panels": [
                    _panel(4, "Inside", _target(Q, "A"), _target(Q.replace("meter", "solar"), "B")),
                ],
            },
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "name": "Annotations & Alerts",
                },
                {"datasource": DS, "name": "Migrated", "target": {"query": Q, "rawQuery": True}},
                {"datasource": DS, "name": "Legacy", "query": Q},
            ]
        },
        "templating": {
            "list": [
                {
                    "type": "query",
                    "name": "site",
                    "datasource": DS,
                    "query": 'SHOW TAG VALUES FROM "meter" WITH KEY = "site"',
                },
                {
                    "type": "query",
                    "name": "device",
                    "datasource": DS,
                    "query": {
                        "query": 'SHOW TAG VALUES WITH KEY = "device" WHERE "site" =~ /^$site$/',
                        "refId": "V",
                    },
                },
                {"type": "custom", "name": "mode", "query": "a,b"},
            ]
        },
    }


def _dashboard(model: dict[str, Any], name: str = "test.json") -> Dashboard:
    return Dashboard(Path(name), model)


def test_queries_include_nested_panels_annotations_and_variables() -> None:
    found = [(q.kind, q.title, q.ref_id, q.text) for q in queries(_dashboard(_model()))]
    assert found == [
        ("panel", "Top", "A", Q),
        ("panel", "Inside", "A", Q),
        ("panel", "Inside", "B", Q.replace("meter", "solar")),
        ("annotation", "Migrated", "Anno", Q),
        ("annotation", "Legacy", "Anno", Q),
        ("variable", "site", "Var", 'SHOW TAG VALUES FROM "meter" WITH KEY = "site"'),
        (
            "variable",
            "device",
            "Var",
            'SHOW TAG VALUES WITH KEY = "device" WHERE "site" =~ /^$site$/',
        ),
    ]
    assert lint([_dashboard(_model())]) == []


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{ not json")
    with pytest.raises(DashboardError, match=r"broken\.json"):
        load_dashboards(tmp_path)
    (tmp_path / "broken.json").write_text('{"title": "no panels"}')
    with pytest.raises(DashboardError, match=r"broken\.json: not a Grafana dashboard"):
        load_dashboard(tmp_path / "broken.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DashboardError, match=r"no \*\.json dashboards"):
        load_dashboards(empty)
    with pytest.raises(DashboardError, match="no such directory"):
        load_dashboards(tmp_path / "missing")


# --- lint catches what it promises ------------------------------------------------------------


def _mutated(change: Callable[[dict[str, Any]], None]) -> list[str]:
    model = copy.deepcopy(_model())
    change(model)
    return lint([_dashboard(model)])


def _inside(model: dict[str, Any]) -> dict[str, Any]:
    inside: dict[str, Any] = model["panels"][2]["panels"][0]
    return inside


MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "panel datasource": (
        lambda m: m["panels"][0].update(datasource={"type": "influxdb", "uid": "other"}),
        "panel 'Top': datasource uid must be 'wattstream-influxdb'",
    ),
    "panel datasource type": (
        lambda m: m["panels"][0]["datasource"].update(type="prometheus"),
        "panel 'Top': datasource type must be 'influxdb'",
    ),
    "nested target datasource": (
        lambda m: _inside(m)["targets"][1].update(datasource={"uid": "other"}),
        "panel 'Inside' target 'B': datasource uid must be",
    ),
    "not raw": (
        lambda m: m["panels"][0]["targets"][0].update(rawQuery=False),
        "not a raw InfluxQL query",
    ),
    "no targets": (lambda m: _inside(m).update(targets=[]), "panel 'Inside': no targets"),
    "id set": (lambda m: m.update(id=7), "id must be null"),
    "unknown variable": (
        lambda m: m["panels"][0]["targets"][0].update(query=Q + ' AND "d" =~ /^$nope$/'),
        "unknown variables ['nope']",
    ),
    "no time filter": (
        lambda m: m["panels"][0]["targets"][0].update(query='SELECT * FROM "meter"'),
        "no $timeFilter",
    ),
    "invented values": (
        lambda m: m["panels"][0]["targets"][0].update(
            query=Q + " GROUP BY time($__interval) fill(previous)"
        ),
        "invents values",
    ),
    "count with zeros": (
        lambda m: m["panels"][0]["targets"][0].update(
            query=Q.replace("mean", "count") + " GROUP BY time($__interval) fill(null)"
        ),
        "count() per time bucket needs fill(none)",
    ),
    "duplicate title": (lambda m: _inside(m).update(title="Top"), "same title"),
    "duplicate refId": (lambda m: _inside(m)["targets"][1].update(refId="A"), "not unique"),
    "annotation datasource": (
        lambda m: m["annotations"]["list"][2].update(datasource={"uid": "x"}),
        "annotation 'Legacy': datasource uid must be",
    ),
    "variable refers to itself": (
        lambda m: m["templating"]["list"][0].update(
            query='SHOW TAG VALUES WITH KEY = "site" WHERE "site" =~ /^$site$/'
        ),
        "refers to itself",
    ),
    "empty query": (lambda m: _inside(m)["targets"][0].update(query=" "), "empty query"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_lint_reports_each_kind_of_problem(name: str) -> None:
    change, expected = MUTATIONS[name]
    problems = _mutated(change)
    assert any(expected in problem for problem in problems), problems


def test_lint_reports_a_uid_used_twice() -> None:
    problems = lint([_dashboard(_model(), "a.json"), _dashboard(_model(), "b.json")])
    assert problems == ["b.json: uid 'u1' is also used by a.json"]


# --- expanding as Grafana does ----------------------------------------------------------------


def test_time_filter_is_epoch_milliseconds_inclusive() -> None:
    assert expand("WHERE $timeFilter", T0, T1, "1h") == (
        "WHERE time >= 1743984000000ms and time <= 1744588800000ms"
    )
    # Sub-millisecond parts are cut off, as Go's UnixNano() / 1e6 does.
    late = T0 + timedelta(microseconds=1999)
    assert expand("$timeFilter", late, late, "1h") == (
        "time >= 1743984000001ms and time <= 1743984000001ms"
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        expand("$timeFilter", datetime(2025, 4, 7), T1, "1h")  # noqa: DTZ001 - the point


@pytest.mark.parametrize(
    ("interval", "text"),
    [
        (timedelta(minutes=10), "10m"),
        (timedelta(hours=1), "1h"),
        (timedelta(hours=36), "1d"),
        (timedelta(days=2), "2d"),
        (timedelta(days=400), "1y"),
        (timedelta(seconds=90), "1m"),
        (timedelta(milliseconds=1500), "1s"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(microseconds=500), "1ms"),
    ],
)
def test_interval_is_formatted_in_whole_grafana_units(interval: timedelta, text: str) -> None:
    assert format_interval(interval) == text
    assert expand("GROUP BY time($__interval)", T0, T1, interval) == f"GROUP BY time({text})"


def test_interval_macros_and_their_order() -> None:
    # The server replaces $interval before $__interval_ms before $__interval (Go ReplaceAll).
    query = "$__interval_ms $interval $__interval ${__interval} $intervalX"
    assert expand(query, T0, T1, timedelta(minutes=10)) == "600000 10m 10m 10m 10mX"
    assert expand("$__interval", T0, T1, "5m") == "5m"
    with pytest.raises(ValueError, match="not a Grafana interval"):
        expand("$__interval", T0, T1, "5 minutes")


REGEX = 'WHERE "site" =~ /^$site$/'


@pytest.mark.parametrize(
    ("query", "value", "expected"),
    [
        # A multi-value selection (or "All"): escaped, pipe-joined, parenthesised.
        (REGEX, ["turin-home", "turin-school"], 'WHERE "site" =~ /^(turin-home|turin-school)$/'),
        (REGEX, ["turin-home"], 'WHERE "site" =~ /^(turin-home)$/'),
        (
            REGEX,
            ["a.b", "c/d", "e(f)|g", "h-i", "x$^*+?[]{}\\"],
            'WHERE "site" =~ /^(a\\.b|c\\/d|e\\(f\\)\\|g|h-i|x\\$\\^\\*\\+\\?\\[\\]\\{\\}\\\\)$/',
        ),
        # The three syntaxes are one variable.
        ('WHERE "site" =~ /^${site}$/', ["a", "b"], 'WHERE "site" =~ /^(a|b)$/'),
        ('WHERE "site" =~ /^[[site]]$/', ["a", "b"], 'WHERE "site" =~ /^(a|b)$/'),
        # A single value is escaped inside a regex literal only; numbers never.
        (REGEX, "a.b", 'WHERE "site" =~ /^a\\.b$/'),
        ("WHERE \"site\" = '$site'", "a.b", "WHERE \"site\" = 'a.b'"),
        (REGEX, "42.5", 'WHERE "site" =~ /^42.5$/'),
        # Explicit formats win over the datasource's.
        ("${site:csv}", ["a", "b"], "a,b"),
        ("${site:pipe}", ["a", "b"], "a|b"),
        ("${site:regex}", ["a.b"], "a\\.b"),
        ("${site:regex}", ["a", "b"], "(a|b)"),
        ("${site:singlequote}", ["it's", "b"], "'it\\'s','b'"),
        ("[[site:doublequote]]", ["a"], '"a"'),
    ],
)
def test_template_variables_are_formatted_as_grafanas_influxdb_datasource_does(
    query: str, value: str | list[str], expected: str
) -> None:
    assert expand(query, T0, T1, "1m", {"site": value}) == expected


def test_unknown_references_are_left_as_grafana_leaves_them() -> None:
    assert expand("$other ${other} [[other]] $site", T0, T1, "1m", {"site": ["a"]}) == (
        "$other ${other} [[other]] (a)"
    )
    with pytest.raises(ValueError, match="may not be called 'interval'"):
        expand("$interval", T0, T1, "1m", {"interval": "x"})
    with pytest.raises(ValueError, match="field paths"):
        expand("${site.name}", T0, T1, "1m", {"site": "x"})
    with pytest.raises(ValueError, match="format 'glob'"):
        expand("${site:glob}", T0, T1, "1m", {"site": "x"})


def test_every_shipped_query_expands_to_plain_influxql() -> None:
    for dashboard in SHIPPED:
        variables = {v["name"]: ["x", "y"] for v in template_variables(dashboard.model)}
        for query in queries(dashboard):
            expanded = expand(query.text, T0, T1, "10m", variables)
            assert variable_references(expanded) == set(), (query.label, expanded)
            assert "$timeFilter" not in expanded and "$__interval" not in expanded


def test_interval_grafana_picks_for_a_panel() -> None:
    week = (T0, T1)
    assert calculate_interval(*week, max_data_points=1000) == timedelta(minutes=10)
    assert calculate_interval(*week, max_data_points=1500) == timedelta(minutes=5)
    assert calculate_interval(*week, 1000, min_interval=timedelta(hours=1)) == timedelta(hours=1)
    assert calculate_interval(T0, T0 + timedelta(hours=1), 1000) == timedelta(seconds=5)
    assert [round_interval_ms(ms) for ms in (0, 10, 89_999, 90_000, 1e12)] == [
        1,
        10,
        60_000,
        120_000,
        31_536_000_000,
    ]
    with pytest.raises(ValueError, match="max_data_points"):
        calculate_interval(*week, max_data_points=0)


def test_parse_interval_knows_grafanas_units() -> None:
    assert [parse_interval(t) for t in ("500ms", "10s", "1m", "2h", "1d", "1w")] == [
        timedelta(milliseconds=500),
        timedelta(seconds=10),
        timedelta(minutes=1),
        timedelta(hours=2),
        timedelta(days=1),
        timedelta(weeks=1),
    ]


# --- export and the command -------------------------------------------------------------------


def test_dump_is_stable_and_nulls_the_id() -> None:
    model = {"title": "t", "id": 12, "panels": [], "uid": "u"}
    text = dump(model)
    assert json.loads(text)["id"] is None
    assert text == dump(dict(reversed(list(model.items()))))
    assert text.endswith("}\n") and text.index('"id"') < text.index('"panels"')


def test_export_command_writes_every_dashboard(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["dashboards", "export", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(tmp_path / "out" / d.path.name) for d in SHIPPED]
    for dashboard in SHIPPED:
        assert (tmp_path / "out" / dashboard.path.name).read_bytes() == dashboard.path.read_bytes()


def test_export_command_with_a_directory_without_dashboards_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["dashboards", "export", str(tmp_path / "out"), "--dashboards", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "no *.json dashboards" in result.stderr
