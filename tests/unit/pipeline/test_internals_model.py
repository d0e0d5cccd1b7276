"""The internals dashboard's model: on the provisioned Prometheus, every metric it names
is one a worker exports, and the lint catches what would break it in Grafana."""

from __future__ import annotations

import copy
import re
from datetime import timedelta

from prometheus_client import REGISTRY, generate_latest

from pipeline import metrics  # noqa: F401 - registers the worker's metrics
from pipeline.dashboards import (
    INTERNALS_DIR,
    Dashboard,
    expand_promql,
    lint_prometheus,
    load_dashboards,
    promql_queries,
)

(INTERNALS,) = load_dashboards(INTERNALS_DIR)


def test_the_internals_dashboard_passes_its_checks() -> None:
    assert INTERNALS.uid == "wattstream-internals" and INTERNALS.model["id"] is None
    assert lint_prometheus([INTERNALS]) == []


def test_every_metric_a_panel_names_is_exported_by_a_worker() -> None:
    exported = set(re.findall(r"^# TYPE (\w+)", generate_latest(REGISTRY).decode(), re.M))
    suffixes = ("_total", "_bucket", "_count", "_sum")
    for query in promql_queries(INTERNALS):
        for name in re.findall(r"\b((?:wattstream|process)_\w+)", query.text):
            base = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
            assert name in exported or base in exported, f"{query.label}: {name}"


def test_macros_expand_as_grafana_does_and_lint_reports_breakage() -> None:
    assert (
        expand_promql(
            "rate(x[$__rate_interval]) / ${__range}", timedelta(seconds=60), timedelta(hours=6)
        )
        == "rate(x[1m]) / 6h"
    )
    broken = copy.deepcopy(INTERNALS.model)
    broken["panels"][0]["datasource"] = {"type": "influxdb", "uid": "wattstream-influxdb"}
    broken["panels"][1]["targets"][0]["expr"] = 'sum(x{site=~"$site"})'
    broken["panels"][2]["title"] = broken["panels"][3]["title"]
    problems = lint_prometheus([Dashboard(INTERNALS.path, broken)])
    assert any("datasource uid" in p for p in problems)
    assert any("unknown variables ['site']" in p for p in problems)
    assert any("same title" in p for p in problems)
