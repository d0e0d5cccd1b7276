"""``wattstream detect``: the streaming detectors over a telemetry file, with no broker.

The file is long format (CSV or Parquet), one reading per row: ``time``, ``device``,
``kind`` (``meter``, ``home``, ``solar``...), ``power_kw``, and for PV where measured
``irradiance_w_m2`` and ``temp_air_c``; ``site`` is optional (one site, ``file``, when
absent). Times with a UTC offset are taken as given; naive times need ``timezone``,
and are localised per device in file order: the autumn hour that occurs twice is
summer time the first time, winter time the second; a local time that does not exist
(spring) is an error naming its row.

Each device's readings go, in time order, through the same detector objects the Faust
agents run (:class:`processors.detection.SiteDetection`: spikes, drops, level shifts,
stuck values, high consumption, vampire loads; :func:`processors.solar.detect_frame`
for PV arrays the config specifies). Their baselines learn from the file's own past
as it is read, never from its future, so the alerts are those the stream raises when
the same file is replayed (a test asserts it). A reading at an instant its device
already has is a duplicate: the first one counts, the others are counted and dropped.
Rows without a power value are skipped and counted.

Plain Python: :func:`detect_file` returns the incidents; the command prints them. The
detectors are imported when they run: ``pipeline`` has no import-time dependency on
``processors``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from pipeline.schemas import Alert, AlertStatus
from pipeline.settings import Settings, SiteConfig

log = logging.getLogger(__name__)

DETECTORS = ("anomaly", "vampire", "solar")
DEFAULT_SITE = "file"
PROGRESS_EVERY = 100_000
"""Readings between two calls of the progress callback (about a second's work). [-]"""
REQUIRED_COLUMNS = ("time", "device", "kind", "power_kw")
OPTIONAL_COLUMNS = ("site", "irradiance_w_m2", "temp_air_c", "temp_module_c")


class DetectFileError(ValueError):
    """A file that cannot be read as telemetry; the message names the file (and row)."""


@dataclass(frozen=True)
class Incident:
    """One alert from its start to its end (None: still open at the end of the file)."""

    site: str
    device: str
    label: str
    start: datetime
    end: datetime | None
    severity: str
    expected: float | None
    observed: float | None
    alert_id: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "device": self.device,
            "label": self.label,
            "start": self.start.isoformat(),
            "end": None if self.end is None else self.end.isoformat(),
            "severity": self.severity,
            "expected": self.expected,
            "observed": self.observed,
            "alert_id": self.alert_id,
            "message": self.message,
        }


@dataclass
class DeviceSummary:
    site: str
    device: str
    kind: str
    readings: int = 0
    first: datetime | None = None
    last: datetime | None = None
    step: timedelta | None = None
    """The most common time between two readings."""
    gaps: int = 0
    """Times between readings longer than twice the step."""
    incidents: Counter[str] = field(default_factory=Counter)


@dataclass
class DetectResult:
    incidents: list[Incident]
    devices: list[DeviceSummary]
    rows: int
    duplicates: int
    without_power: int


def incidents_of(alerts: Iterable[Alert]) -> list[Incident]:
    """Pair each alert's firing and resolved events (they share the ``alert_id``)."""
    opened: dict[str, Alert] = {}
    ended: dict[str, datetime | None] = {}
    order: list[str] = []
    for alert in alerts:
        if alert.alert_id not in opened:
            opened[alert.alert_id] = alert
            order.append(alert.alert_id)
            ended[alert.alert_id] = alert.end
        if alert.status is AlertStatus.RESOLVED:
            ended[alert.alert_id] = alert.end or alert.start
    out = []
    for alert_id in order:
        alert = opened[alert_id]
        out.append(
            Incident(
                site=alert.site,
                device=alert.device or "",
                label=alert.alert_type,
                start=alert.start,
                end=ended[alert_id],
                severity=str(alert.severity),
                expected=alert.expected,
                observed=alert.observed,
                alert_id=alert_id,
                message=alert.message,
            )
        )
    return out


def read_frame(path: Path, timezone: str | None = None) -> tuple[pl.DataFrame, int]:
    """The file's readings with ``time`` in UTC, sorted by site, device and time; and
    how many rows were duplicates of an earlier reading of their device."""
    try:
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path)
        elif path.suffix.lower() == ".csv":
            frame = pl.read_csv(path, infer_schema_length=10_000, try_parse_dates=False)
        else:
            raise DetectFileError(f"{path}: use a .csv or .parquet file")
    except (pl.exceptions.PolarsError, OSError) as error:
        raise DetectFileError(f"{path}: cannot read: {error}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DetectFileError(
            f"{path}: missing column(s) {missing}; needs {list(REQUIRED_COLUMNS)}"
        )
    if "site" not in frame.columns:
        frame = frame.with_columns(pl.lit(DEFAULT_SITE).alias("site"))
    keep = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in frame.columns]
    frame = frame.select(keep).with_row_index("_row", offset=1)
    try:
        frame = frame.with_columns(
            pl.col("site").cast(pl.String),
            pl.col("device").cast(pl.String),
            pl.col("kind").cast(pl.String),
            *(
                pl.col(c).cast(pl.Float64, strict=False)
                for c in ("power_kw", "irradiance_w_m2", "temp_air_c", "temp_module_c")
                if c in frame.columns
            ),
        )
    except pl.exceptions.PolarsError as error:
        raise DetectFileError(f"{path}: {str(error).splitlines()[0]}") from None
    frame = frame.with_columns(_utc(frame, path, timezone))
    frame = frame.sort(["site", "device", "time", "_row"])
    # Sorted, a duplicate follows the reading it repeats (file order kept by _row).
    repeats = (
        (pl.col("time") == pl.col("time").shift(1))
        & (pl.col("device") == pl.col("device").shift(1))
        & (pl.col("site") == pl.col("site").shift(1))
    ).fill_null(False)
    unique = frame.filter(~repeats)
    return unique, frame.height - unique.height


def _utc(frame: pl.DataFrame, path: Path, timezone: str | None) -> pl.Series:
    column = frame["time"]
    if isinstance(column.dtype, pl.Datetime) and column.dtype.time_zone is not None:
        return column.dt.convert_time_zone("UTC").alias("time")
    if column.dtype == pl.String:
        aware = column.str.to_datetime(format="%+", time_zone="UTC", strict=False)
        if aware.null_count() == 0:
            return aware.alias("time")
        try:
            naive = column.str.to_datetime(strict=False)
        except pl.exceptions.PolarsError:  # no value looks like a date at all
            naive = pl.Series([None] * len(column), dtype=pl.Datetime("us"))
        bad = aware.is_null() & naive.is_null()
        if bad.any():
            row = int(frame["_row"].filter(bad)[0])
            raise DetectFileError(
                f"{path}: row {row}: time {column.filter(bad)[0]!r} is not ISO 8601"
            )
        if (~aware.is_null()).any():
            raise DetectFileError(f"{path}: times with and without a UTC offset are mixed")
    elif isinstance(column.dtype, pl.Datetime):
        naive = column
    else:
        raise DetectFileError(f"{path}: time has type {column.dtype}; expected ISO 8601 text")
    if timezone is None:
        row = int(frame["_row"][0])
        raise DetectFileError(
            f"{path}: row {row}: time {column[0]!s} has no UTC offset: give --timezone "
            "(the IANA zone the times were written in)"
        )
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise DetectFileError(f"unknown time zone {timezone!r}") from None
    # The autumn hour occurs twice: per device, in file order, summer time comes first.
    occurrence = (
        pl.DataFrame({"device": frame["device"], "naive": naive})
        .with_columns(pl.col("naive").cum_count().over(["device", "naive"]).alias("n"))
        .get_column("n")
    )
    ambiguous = pl.Series(["earliest" if n <= 1 else "latest" for n in occurrence.to_list()])
    try:
        local = naive.dt.replace_time_zone(timezone, ambiguous=ambiguous, non_existent="raise")
    except pl.exceptions.PolarsError as error:
        raise DetectFileError(
            f"{path}: a local time that does not exist in {timezone} (the spring change): "
            f"{str(error).splitlines()[0]}"
        ) from None
    return local.dt.convert_time_zone("UTC").alias("time")


def detect_file(
    path: Path,
    *,
    settings: Settings | None = None,
    detectors: Iterable[str] = DETECTORS,
    timezone: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DetectResult:
    """Run the chosen detectors over ``path`` (see the module docstring)."""
    from processors.detection import SiteDetection, detection_settings
    from processors.solar import detect_frame, solar_settings

    chosen = set(detectors)
    unknown = sorted(chosen - set(DETECTORS))
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; choose from {list(DETECTORS)}")
    frame, duplicates = read_frame(path, timezone)
    missing_power = frame["power_kw"].is_null() | frame["power_kw"].is_nan().fill_null(False)
    without_power = int(missing_power.sum())
    frame = frame.filter(pl.col("power_kw").is_not_null() & pl.col("power_kw").is_not_nan())
    sites = {s.id: s for s in settings.sites} if settings is not None else {}
    alerts: list[Alert] = []
    summaries: list[DeviceSummary] = []
    done = 0
    for (site_id, device, kind), rows in frame.group_by(
        ["site", "device", "kind"], maintain_order=True
    ):
        site_id, device, kind = str(site_id), str(device), str(kind)
        summary = _summary(site_id, device, kind, rows)
        summaries.append(summary)
        site = sites.get(site_id) or SiteConfig(id=site_id, market="none")
        if chosen & {"anomaly", "vampire"}:
            engine = SiteDetection(site_id, detection_settings(site))
            if engine.watches(kind):
                has_irradiance = "irradiance_w_m2" in rows.columns
                # Exactly datetime.timestamp(): whole microseconds divided by 1e6. The
                # datetimes are made from it (twice as fast as polars' to_list).
                epoch_s = (rows["time"].dt.epoch("us").cast(pl.Float64) / 1e6).to_list()
                powers_kw = rows["power_kw"].to_list()
                irradiances = (
                    rows["irradiance_w_m2"].to_list() if has_irradiance else [None] * rows.height
                )
                for first in range(0, rows.height, PROGRESS_EVERY):
                    last = first + PROGRESS_EVERY
                    for ts_s, power_kw, irradiance in zip(
                        epoch_s[first:last],
                        powers_kw[first:last],
                        irradiances[first:last],
                        strict=True,
                    ):
                        at = datetime.fromtimestamp(ts_s, UTC)
                        for alert in engine.observe(device, kind, at, power_kw, irradiance, ts_s):
                            family = "vampire" if alert.alert_type == "vampire" else "anomaly"
                            if family in chosen:
                                alerts.append(alert)
                    if progress is not None and last < rows.height:
                        progress(done + last, frame.height)
        if "solar" in chosen and kind == "solar":
            arrays = solar_settings(site)
            if arrays is not None:
                found, _ = detect_frame(rows, site_id, arrays)
                alerts += found
        done += rows.height
        if progress is not None:
            progress(done, frame.height)
    incidents = incidents_of(alerts)
    by_device = {(s.site, s.device): s for s in summaries}
    for incident in incidents:
        by_device[(incident.site, incident.device)].incidents[incident.label] += 1
    return DetectResult(incidents, summaries, frame.height, duplicates, without_power)


def _summary(site: str, device: str, kind: str, rows: pl.DataFrame) -> DeviceSummary:
    times = rows["time"]
    summary = DeviceSummary(site, device, kind, rows.height, times.min(), times.max())  # type: ignore[arg-type]
    if rows.height > 1:
        gaps = times.diff().drop_nulls()
        step = gaps.mode().min()
        if isinstance(step, timedelta):
            summary.step = step
            summary.gaps = int((gaps > 2 * step).sum())
    return summary


__all__ = [
    "DETECTORS",
    "DetectFileError",
    "DetectResult",
    "DeviceSummary",
    "Incident",
    "detect_file",
    "incidents_of",
    "read_frame",
]
