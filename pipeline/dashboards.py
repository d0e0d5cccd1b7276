"""The Grafana dashboards shipped in ``deploy/grafana/dashboards``: load, check, expand, push.

The dashboards read the InfluxDB schema of :mod:`sinks.lineprotocol` with raw
InfluxQL, through one provisioned datasource (uid :data:`DATASOURCE_UID`).
Grafana itself cannot run on these machines, so the dashboards are checked by
expanding every query the way Grafana does (:func:`expand`) and running it
against a real InfluxDB (``tests/integration/test_dashboard_queries.py``).

How Grafana turns a raw InfluxQL query into what InfluxDB receives, which
:func:`expand` reproduces:

1. The browser replaces template variables (``$site``, ``${site}``,
   ``[[site]]``) with the InfluxDB datasource's ``interpolateQueryExpr``: a
   multi-value variable becomes ``(a|b)`` with every value regex-escaped; a
   single value is regex-escaped only where it stands inside a regex literal
   (``=~ /^$site$/``); numbers are left alone.
2. The Grafana server replaces, in this order, ``$timeFilter`` with
   ``time >= <from>ms and time <= <to>ms``, ``$interval``, ``$__interval_ms``
   and ``$__interval`` (the interval in Grafana's units: ``10m``, ``1h``, ``1d``).

:func:`push` uploads the dashboards with grafana-client into one folder with a
fixed uid, overwriting by dashboard uid, so pushing twice leaves one copy each.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

DATASOURCE_UID = "wattstream-influxdb"
"""The uid of the provisioned InfluxDB datasource; every panel refers to it."""
DATASOURCE_TYPE = "influxdb"
FOLDER_UID = "wattstream"
"""Fixed, so a second push finds the folder the first one made."""
DEFAULT_FOLDER_TITLE = "wattstream"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards"

QueryKind = Literal["panel", "annotation", "variable"]
VariableValue = str | Sequence[str]
"""A single-value variable's value, or a multi-value variable's selection (a list,
as Grafana holds it, also when one value or "All" is selected)."""

MACROS = frozenset({"timeFilter", "interval", "__interval", "__interval_ms"})
"""What the Grafana server expands in an InfluxQL query, besides template variables."""

PANELS_WITHOUT_QUERIES = frozenset({"row", "text", "news", "dashlist"})


class DashboardError(Exception):
    """A dashboard file that cannot be used, or a Grafana that refused a push."""

    retriable = False


# --- loading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dashboard:
    path: Path
    """The file it was loaded from (its name is kept by :func:`export`)."""
    model: dict[str, Any]
    """Grafana's dashboard JSON model."""

    @property
    def uid(self) -> str:
        return str(self.model.get("uid") or "")

    @property
    def title(self) -> str:
        return str(self.model.get("title") or "")


def load_dashboard(path: Path) -> Dashboard:
    try:
        model = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DashboardError(f"{path}: not a readable JSON file: {error}") from None
    if not isinstance(model, dict) or not isinstance(model.get("panels"), list):
        raise DashboardError(f"{path}: not a Grafana dashboard (no 'panels' list)")
    return Dashboard(path, model)


def load_dashboards(directory: Path | None = None) -> list[Dashboard]:
    """Every ``*.json`` dashboard in ``directory`` (default :data:`DEFAULT_DIR`), by file name."""
    directory = directory or DEFAULT_DIR
    if not directory.is_dir():
        raise DashboardError(f"{directory}: no such directory of dashboards")
    dashboards = [load_dashboard(path) for path in sorted(directory.glob("*.json"))]
    if not dashboards:
        raise DashboardError(f"{directory}: no *.json dashboards in it")
    return dashboards


def dump(model: Mapping[str, Any]) -> str:
    """The canonical file form: ``id`` null, sorted keys, two-space indent, final newline.

    Sorted keys make a file's diff show what changed, not where Grafana put it.
    """
    return json.dumps({**model, "id": None}, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export(directory: Path, dashboards: Sequence[Dashboard] | None = None) -> list[Path]:
    """Write the dashboards to ``directory`` under their file names; returns the paths."""
    dashboards = load_dashboards() if dashboards is None else dashboards
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in dashboards:
        path = directory / dashboard.path.name
        path.write_text(dump(dashboard.model), encoding="utf-8")
        written.append(path)
    return written


# --- what a dashboard queries ---------------------------------------------------------------


@dataclass(frozen=True)
class DashboardQuery:
    dashboard_uid: str
    kind: QueryKind
    title: str
    """The panel's title, the annotation's name or the variable's name."""
    ref_id: str
    text: str
    """The raw InfluxQL, macros and variables not yet expanded."""
    raw: Mapping[str, Any]
    """The target, annotation or variable it comes from."""

    @property
    def label(self) -> str:
        return f"{self.dashboard_uid} / {self.kind} {self.title!r} / {self.ref_id}"


def panels(model: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside rows (a collapsed row holds its own ``panels``)."""
    for panel in model.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def template_variables(model: Mapping[str, Any]) -> list[dict[str, Any]]:
    variables: list[dict[str, Any]] = model.get("templating", {}).get("list", [])
    return variables


def variable_query(variable: Mapping[str, Any]) -> str:
    """A query variable's InfluxQL (stored as a string, or as ``{"query": ...}`` since 10.x)."""
    query = variable.get("query", "")
    if isinstance(query, Mapping):
        return str(query.get("query", ""))
    return str(query)


def annotation_query(annotation: Mapping[str, Any]) -> str:
    """An InfluxQL annotation's query, in the migrated (``target``) or the legacy form."""
    target = annotation.get("target")
    if isinstance(target, Mapping) and target.get("query"):
        return str(target["query"])
    return str(annotation.get("query", ""))


def queries(dashboard: Dashboard) -> list[DashboardQuery]:
    """Every query of a dashboard: panel targets, annotation queries, variable queries."""
    uid = dashboard.uid
    found: list[DashboardQuery] = []
    for panel in panels(dashboard.model):
        for target in panel.get("targets", []):
            found.append(
                DashboardQuery(
                    uid,
                    "panel",
                    str(panel.get("title", "")),
                    str(target.get("refId", "")),
                    str(target.get("query", "")),
                    target,
                )
            )
    for annotation in dashboard.model.get("annotations", {}).get("list", []):
        if annotation.get("builtIn"):
            continue
        name = str(annotation.get("name", ""))
        found.append(
            DashboardQuery(
                uid, "annotation", name, "Anno", annotation_query(annotation), annotation
            )
        )
    for variable in template_variables(dashboard.model):
        if variable.get("type") == "query":
            name = str(variable.get("name", ""))
            found.append(
                DashboardQuery(uid, "variable", name, "Var", variable_query(variable), variable)
            )
    return found


# --- expanding queries as Grafana does --------------------------------------------------------

# Grafana's templateSrv variable syntax: $name, [[name:format]], ${name.field:format}.
_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}", re.ASCII
)
# The InfluxDB datasource's search for regex literals after =~ or !~ (interpolateQueryExpr).
_REGEX_LITERAL = re.compile(
    r"(\s*(=|!)~\s*)\/((?![*+?])(?:[^\r\n\[/\\]|\\.|\[(?:[^\r\n\]\\]|\\.)*\])+)\/"
    r"((?:g(?:im?|mi?)?|i(?:gm?|mg?)?|m(?:gi?|ig?)?)?)",
    re.MULTILINE,
)
# @grafana/data escapeRegex: note '-' is not escaped, '/' is (it would end the literal).
_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|\[\]{}/]")
# What JavaScript's parseFloat accepts as the start of a number (then it is not NaN).
_JS_NUMBER_START = re.compile(r"^\s*[+-]?(?:Infinity|\d|\.\d)")

_INTERVAL_UNITS_MS = {
    "y": 365 * 86_400_000,
    "M": 30 * 86_400_000,
    "w": 7 * 86_400_000,
    "d": 86_400_000,
    "h": 3_600_000,
    "m": 60_000,
    "s": 1_000,
    "ms": 1,
}
_INTERVAL = re.compile(r"^(\d+)(ms|[yMwdhms])$")

# rangeutil.roundInterval: (below this many ms, use this interval in ms).
_ROUNDED_INTERVALS_MS = (
    (10, 1),
    (15, 10),
    (35, 20),
    (75, 50),
    (150, 100),
    (350, 200),
    (750, 500),
    (1_500, 1_000),
    (3_500, 2_000),
    (7_500, 5_000),
    (12_500, 10_000),
    (17_500, 15_000),
    (25_000, 20_000),
    (45_000, 30_000),
    (90_000, 60_000),
    (210_000, 120_000),
    (450_000, 300_000),
    (750_000, 600_000),
    (1_050_000, 900_000),
    (1_500_000, 1_200_000),
    (2_700_000, 1_800_000),
    (5_400_000, 3_600_000),
    (9_000_000, 7_200_000),
    (16_200_000, 10_800_000),
    (32_400_000, 21_600_000),
    (86_400_000, 43_200_000),
    (604_800_000, 86_400_000),
    (1_814_400_000, 604_800_000),
    (3_628_800_000, 2_592_000_000),
)
_LONGEST_INTERVAL_MS = 31_536_000_000

_NS_PER_MS = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def escape_regex(value: str) -> str:
    """@grafana/data ``escapeRegex``."""
    return _REGEX_SPECIAL.sub(lambda match: "\\" + match.group(0), value)


def parse_interval(text: str) -> timedelta:
    """A Grafana interval such as ``10s``, ``1m``, ``500ms``, ``1d`` (rangeutil units)."""
    match = _INTERVAL.match(text.strip())
    if not match:
        raise ValueError(f"not a Grafana interval: {text!r} (e.g. 500ms, 10s, 1m, 1h, 1d)")
    return timedelta(milliseconds=int(match.group(1)) * _INTERVAL_UNITS_MS[match.group(2)])


def round_interval_ms(interval_ms: float) -> int:
    """rangeutil.roundInterval: the "nice" interval Grafana picks for a raw one."""
    for below_ms, rounded_ms in _ROUNDED_INTERVALS_MS:
        if interval_ms < below_ms:
            return rounded_ms
    return _LONGEST_INTERVAL_MS


def calculate_interval(
    time_from: datetime,
    time_to: datetime,
    max_data_points: int,
    min_interval: timedelta = timedelta(milliseconds=1),
) -> timedelta:
    """The ``$__interval`` Grafana gives a panel: the range over the panel's data points
    (about its width in pixels), rounded, and at least the datasource's minimum."""
    if max_data_points < 1:
        raise ValueError(f"max_data_points must be at least 1, got {max_data_points}")
    range_ms = (time_to - time_from) / timedelta(milliseconds=1)
    interval_ms = max(round_interval_ms(range_ms / max_data_points), _ns(min_interval) // 10**6)
    return timedelta(milliseconds=interval_ms)


def format_interval(interval: timedelta) -> str:
    """gtime.FormatInterval: the largest whole unit (``90s`` -> ``1m``; under 1 ms: ``1ms``)."""
    ms = _ns(interval) // _NS_PER_MS
    for unit in ("y", "d", "h", "m", "s", "ms"):
        size = _INTERVAL_UNITS_MS[unit]
        if ms >= size:
            return f"{ms // size}{unit}"
    return "1ms"


def _ns(interval: timedelta) -> int:
    return interval // timedelta(microseconds=1) * 1000


def _epoch_ms(at: datetime) -> int:
    if at.tzinfo is None:
        raise ValueError(f"{at!r}: a time range needs timezone-aware datetimes")
    # Integer arithmetic, like Go's UnixNano() / 1e6 (a float would round).
    return _ns(at - _EPOCH) // _NS_PER_MS


def _influx_value(name: str, value: VariableValue, query: str) -> str:
    """The InfluxDB datasource's ``interpolateQueryExpr`` for one variable reference."""
    if isinstance(value, str):
        if _JS_NUMBER_START.match(value):
            return value
        variable_in_regex = re.compile(rf"\/(?:\^)?(.*)(\${re.escape(name)})(.*)(?:\$)?\/")
        for literal in _REGEX_LITERAL.finditer(query):
            if variable_in_regex.search(literal.group(0)):
                return escape_regex(value)
        return value
    return "(" + "|".join(escape_regex(item) for item in value) + ")"


def _formatted(value: VariableValue, fmt: str) -> str:
    """Grafana's explicit variable formats (``${name:format}``) that InfluxQL can use."""
    values = [value] if isinstance(value, str) else list(value)
    if fmt == "regex":
        escaped = [escape_regex(item) for item in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    if fmt in ("raw", "csv"):
        return ",".join(values)
    if fmt == "pipe":
        return "|".join(values)
    if fmt == "singlequote":
        return ",".join("'" + item.replace("'", "\\'") + "'" for item in values)
    if fmt == "doublequote":
        return ",".join('"' + item.replace('"', '\\"') + '"' for item in values)
    raise ValueError(f"variable format {fmt!r} is not supported here")


def replace_variables(query: str, variables: Mapping[str, VariableValue]) -> str:
    """Step 1, in the browser: template variables only; macros are left for the server."""
    for name in variables:
        if name in MACROS:
            raise ValueError(f"a template variable may not be called {name!r}: Grafana uses it")
    # The server expands these two; the browser maps them onto themselves.
    scoped: dict[str, VariableValue] = {
        **variables,
        "__interval": "$__interval",
        "__interval_ms": "$__interval_ms",
    }

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        if match.group(5):
            raise ValueError(f"{match.group(0)!r}: variable field paths are not supported")
        if name not in scoped:
            return match.group(0)  # Grafana leaves what it does not know
        value = scoped[name]
        if name.startswith("__"):
            return str(value)
        if fmt:
            return _formatted(value, fmt)
        return _influx_value(name, value, query)

    return _VARIABLE.sub(substitute, query)


def replace_macros(query: str, time_from: datetime, time_to: datetime, interval: timedelta) -> str:
    """Step 2, on the Grafana server (pkg/tsdb/influxdb): the time filter and the interval."""
    time_filter = f"time >= {_epoch_ms(time_from)}ms and time <= {_epoch_ms(time_to)}ms"
    interval_text = format_interval(interval)
    query = query.replace("$timeFilter", time_filter)
    query = query.replace("$interval", interval_text)
    query = query.replace("$__interval_ms", str(_ns(interval) // _NS_PER_MS))
    return query.replace("$__interval", interval_text)


def expand(
    query: str,
    time_from: datetime,
    time_to: datetime,
    interval: timedelta | str,
    variables: Mapping[str, VariableValue] | None = None,
) -> str:
    """The InfluxQL Grafana sends to InfluxDB for ``query`` over ``[time_from, time_to]``.

    ``interval`` is the panel's ``$__interval`` (a timedelta or e.g. ``"10m"``; see
    :func:`calculate_interval`). ``variables`` maps names to values: a list is a
    multi-value variable's selection ("All" is the list of every value), a str a
    single-value variable's value.
    """
    if isinstance(interval, str):
        interval = parse_interval(interval)
    expanded = replace_variables(query, variables or {})
    return replace_macros(expanded, time_from, time_to, interval)


def variable_references(query: str) -> set[str]:
    """Names a query refers to with any of Grafana's variable syntaxes."""
    return {
        match.group(1) or match.group(2) or match.group(4) for match in _VARIABLE.finditer(query)
    }


# --- checks ---------------------------------------------------------------------------------

# A gap in the data must show as a gap: an invented value looks like a measurement, and
# would make "this panel returns data" true of an empty database.
_INVENTED_FILL = re.compile(r"fill\(\s*(previous|linear|-?[\d.]+)\s*\)", re.IGNORECASE)
# InfluxDB's count() answers 0, not null, for an empty bucket under fill(null).
_COUNT_BY_TIME = re.compile(r"\bcount\s*\(.*GROUP BY\s+time\(", re.IGNORECASE | re.DOTALL)


def _datasource_uid(node: Mapping[str, Any]) -> str | None:
    datasource = node.get("datasource")
    if isinstance(datasource, Mapping):
        uid = datasource.get("uid")
        return str(uid) if uid is not None else None
    return None


def _wrong_datasource_type(node: Mapping[str, Any]) -> bool:
    datasource = node.get("datasource")
    return isinstance(datasource, Mapping) and datasource.get("type") not in (
        None,
        DATASOURCE_TYPE,
    )


def lint(dashboards: Sequence[Dashboard], datasource_uid: str = DATASOURCE_UID) -> list[str]:
    """What is wrong with the dashboards, one line each (empty when nothing is).

    Every panel and query uses the provisioned datasource by uid; every target is
    raw InfluxQL; every panel but text and row panels has targets; dashboard uids
    are unique and ``id`` is null; a query refers only to Grafana's macros and the
    dashboard's own variables; panel and annotation queries are bounded by
    ``$timeFilter`` (an unbounded query scans the whole database on every refresh).
    """
    problems: list[str] = []
    seen_uids: dict[str, Path] = {}
    for dashboard in dashboards:
        where = dashboard.path.name
        problems.extend(_lint_dashboard(dashboard, datasource_uid))
        uid = dashboard.uid
        if uid in seen_uids:
            problems.append(f"{where}: uid {uid!r} is also used by {seen_uids[uid].name}")
        seen_uids[uid] = dashboard.path
    return problems


def _lint_dashboard(dashboard: Dashboard, datasource_uid: str) -> list[str]:
    model = dashboard.model
    where = dashboard.path.name
    problems: list[str] = []
    if not dashboard.uid:
        problems.append(f"{where}: no uid")
    if not dashboard.title:
        problems.append(f"{where}: no title")
    if model.get("id") is not None:
        problems.append(f"{where}: id must be null (Grafana assigns it), got {model['id']!r}")
    names = {str(v.get("name")) for v in template_variables(model)}
    panel_ids: set[int] = set()
    titles: set[str] = set()
    for panel in panels(model):
        title = panel.get("title", "")
        here = f"{where}: panel {title!r}"
        if panel.get("id") in panel_ids:
            problems.append(f"{here}: id {panel.get('id')} is not unique")
        panel_ids.add(panel.get("id", -1))
        if panel.get("type") in PANELS_WITHOUT_QUERIES:
            continue
        if not title:
            problems.append(f"{where}: panel {panel.get('id')} has no title")
        elif title in titles:
            # A failing query is reported by its panel's title: it must say which panel.
            problems.append(f"{here}: another panel has the same title")
        titles.add(title)
        if _datasource_uid(panel) != datasource_uid:
            problems.append(f"{here}: datasource uid must be {datasource_uid!r}")
        if _wrong_datasource_type(panel):
            problems.append(f"{here}: datasource type must be {DATASOURCE_TYPE!r}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{here}: no targets")
        ref_ids = [target.get("refId") for target in targets]
        if len(set(ref_ids)) != len(ref_ids):
            problems.append(f"{here}: refIds {ref_ids} are not unique")
        for target in targets:
            at = f"{here} target {target.get('refId')!r}"
            if _datasource_uid(target) not in (None, datasource_uid):
                problems.append(f"{at}: datasource uid must be {datasource_uid!r}")
            if target.get("rawQuery") is not True:
                problems.append(f"{at}: not a raw InfluxQL query (rawQuery must be true)")
            if target.get("resultFormat", "time_series") not in ("time_series", "table"):
                problems.append(f"{at}: resultFormat must be time_series or table")
    for query in queries(dashboard):
        at = f"{where}: {query.kind} {query.title!r}"
        if not query.text.strip():
            problems.append(f"{at}: empty query")
            continue
        if query.kind != "panel" and _datasource_uid(query.raw) != datasource_uid:
            problems.append(f"{at}: datasource uid must be {datasource_uid!r}")
        if query.kind != "variable" and "$timeFilter" not in query.text:
            problems.append(f"{at}: no $timeFilter (the query would read all of history)")
        if _INVENTED_FILL.search(query.text):
            problems.append(
                f"{at}: fill(previous|linear|<number>) invents values; use fill(null) and let "
                "the panel span gaps, or fill(none)"
            )
        if _COUNT_BY_TIME.search(query.text) and "fill(none)" not in query.text:
            problems.append(f"{at}: count() per time bucket needs fill(none) (empty buckets are 0)")
        unknown = variable_references(query.text) - names - MACROS
        if unknown:
            problems.append(f"{at}: unknown variables {sorted(unknown)}")
        if query.kind == "variable" and query.title in variable_references(query.text):
            problems.append(f"{at}: refers to itself")
    return problems


# --- pushing to Grafana ---------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    uid: str
    title: str
    version: int | None
    url: str | None
    created: bool
    """False when a dashboard with this uid was there before and was overwritten."""


def _api_url(grafana_url: str) -> str:
    # grafana-client appends "api" to the URL's path as is: "/grafana" would become
    # "/grafanaapi", so the path must end with a slash.
    return grafana_url.rstrip("/") + "/"


def _describe_grafana_error(error: Exception, grafana_url: str) -> str:
    from grafana_client.client import (
        GrafanaException,
        GrafanaTimeoutError,
        GrafanaUnauthorizedError,
    )

    if isinstance(error, GrafanaUnauthorizedError):
        return f"Grafana at {grafana_url} refused the token (401 Unauthorized)"
    if isinstance(error, GrafanaTimeoutError):
        return f"Grafana at {grafana_url} did not answer in time: {error.message}"
    if isinstance(error, GrafanaException) and error.status_code:
        # e.g. "Client Error 403: You'll need additional permissions ..."
        return f"Grafana at {grafana_url} refused the request: {error.message}"
    return f"cannot reach Grafana at {grafana_url}: {type(error).__name__}: {error}"


def push(
    grafana_url: str,
    token: str,
    folder_title: str = DEFAULT_FOLDER_TITLE,
    dashboards: Sequence[Dashboard] | None = None,
    *,
    folder_uid: str = FOLDER_UID,
    timeout_s: float = 10.0,
    on_result: Callable[[PushResult], None] | None = None,
) -> list[PushResult]:
    """Create the folder (or reuse it, by uid) and create or overwrite each dashboard in it.

    Idempotent: dashboards are saved by uid with ``overwrite``, so a second push
    bumps their versions and adds nothing. Raises :class:`DashboardError` with a
    one-line reason (never the token) when Grafana refuses or cannot be reached.
    """
    # Imported here: it pulls in an HTTP stack that no other command needs.
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException

    dashboards = load_dashboards() if dashboards is None else dashboards
    api = GrafanaApi.from_url(_api_url(grafana_url), credential=token, timeout=timeout_s)
    results: list[PushResult] = []
    try:
        _ensure_folder(api, folder_uid, folder_title)
        for dashboard in dashboards:
            created = not _dashboard_exists(api, dashboard.uid)
            answer = api.dashboard.update_dashboard(
                {
                    "dashboard": {**dashboard.model, "id": None},
                    "folderUid": folder_uid,
                    "overwrite": True,
                    "message": f"wattstream dashboards push ({dashboard.path.name})",
                }
            )
            result = PushResult(
                uid=str(answer.get("uid", dashboard.uid)),
                title=dashboard.title,
                version=answer.get("version"),
                url=answer.get("url"),
                created=created,
            )
            results.append(result)
            if on_result is not None:
                on_result(result)
    # OSError: connection failures come from the HTTP library unwrapped (they subclass it).
    except (GrafanaException, OSError) as error:
        message = _describe_grafana_error(error, grafana_url).replace(token, "***")
        raise DashboardError(message) from None
    finally:
        # grafana-client has no close(); its session holds pooled connections.
        api.client.s.close()
    return results


def _ensure_folder(api: Any, folder_uid: str, folder_title: str) -> None:
    from grafana_client.client import GrafanaClientError

    try:
        folder = api.folder.get_folder(folder_uid)
    except GrafanaClientError as error:
        if error.status_code != 404:
            raise
        api.folder.create_folder(folder_title, uid=folder_uid)
        return
    if folder.get("title") != folder_title:
        api.folder.update_folder(folder_uid, title=folder_title, overwrite=True)


def _dashboard_exists(api: Any, uid: str) -> bool:
    from grafana_client.client import GrafanaClientError

    try:
        api.dashboard.get_dashboard(uid)
    except GrafanaClientError as error:
        if error.status_code == 404:
            return False
        raise
    return True


# --- the internals dashboard (Prometheus) --------------------------------------------------

PROMETHEUS_UID = "wattstream-prometheus"
"""The uid of the provisioned Prometheus datasource (the workers' own metrics)."""
INTERNALS_DIR = DEFAULT_DIR / "internals"
"""Dashboards over Prometheus. A subdirectory: Grafana's file provider reads it with the
others, while the InfluxQL checks above look only at the top level."""
PROMQL_MACROS = frozenset({"__rate_interval", "__interval", "__range"})


def promql_queries(dashboard: Dashboard) -> list[DashboardQuery]:
    """Every panel target's PromQL (``expr``) of a Prometheus dashboard."""
    return [
        DashboardQuery(
            dashboard.uid,
            "panel",
            str(panel.get("title", "")),
            str(target.get("refId", "")),
            str(target.get("expr", "")),
            target,
        )
        for panel in panels(dashboard.model)
        for target in panel.get("targets", [])
    ]


def expand_promql(expr: str, rate_interval: timedelta, time_range: timedelta) -> str:
    """``expr`` with Grafana's Prometheus macros replaced as its server does."""
    values = {
        "__rate_interval": format_interval(rate_interval),
        "__interval": format_interval(rate_interval / 4),
        "__range": format_interval(time_range),
    }
    return re.sub(
        r"\$\{?(__rate_interval|__interval|__range)\}?", lambda m: values[m.group(1)], expr
    )


def lint_prometheus(dashboards: Sequence[Dashboard]) -> list[str]:
    """What is wrong with Prometheus dashboards: a uid and a null id, unique panel titles,
    every panel and target on the provisioned Prometheus datasource, a non-empty
    ``expr`` per target, and no variable but Grafana's macros (there are none to set)."""
    problems: list[str] = []
    for dashboard in dashboards:
        where = dashboard.path.name
        if not dashboard.uid:
            problems.append(f"{where}: no uid")
        if dashboard.model.get("id") is not None:
            problems.append(f"{where}: id must be null")
        titles: set[str] = set()
        for panel in panels(dashboard.model):
            here = f"{where}: panel {panel.get('title')!r}"
            if panel.get("type") in PANELS_WITHOUT_QUERIES:
                continue
            if panel.get("title") in titles:
                problems.append(f"{here}: another panel has the same title")
            titles.add(str(panel.get("title")))
            nodes = [panel, *panel.get("targets", [])]
            if any(_datasource_uid(n) != PROMETHEUS_UID for n in nodes):
                problems.append(f"{here}: datasource uid must be {PROMETHEUS_UID!r}")
            if any(n.get("datasource", {}).get("type") != "prometheus" for n in nodes):
                problems.append(f"{here}: datasource type must be 'prometheus'")
            if not panel.get("targets"):
                problems.append(f"{here}: no targets")
            for target in panel.get("targets", []):
                expr = str(target.get("expr", ""))
                if not expr.strip():
                    problems.append(f"{here} target {target.get('refId')!r}: no expr")
                unknown = set(re.findall(r"\$\{?(\w+)", expr)) - PROMQL_MACROS
                if unknown:
                    problems.append(f"{here}: unknown variables {sorted(unknown)}")
    return problems
