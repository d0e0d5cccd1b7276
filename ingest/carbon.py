"""Grid carbon intensity into Kafka: from intensity tables or computed from a generation mix.

Sources (CSV or JSON, from a file or an HTTP(S) URL; JSON is a list of rows or
``{"zone": ..., "intensity": [...]}``):

* intensity tables: ``time`` (interval start, ISO 8601 with a UTC offset),
  ``co2_g_per_kwh`` [gCO2eq/kWh], optional ``zone``, ``end`` (default: start
  plus the zone's smallest step) and ``renewable_share_pct`` [%].
* generation mix: ``time``, optional ``zone`` and ``end``, and one column per
  fuel (see :data:`EMISSION_FACTORS_G_PER_KWH`) in MW (average power) or MWh
  (energy) of the interval; which one does not matter as long as a row uses
  one unit, since the intensity is a generation-weighted mean. Any other
  column is an error that names it.

Example message (key ``BE``)::

    {"schema_version": 1, "zone": "BE", "start": "2025-04-07T10:00:00Z",
     "end": "2025-04-07T11:00:00Z", "co2_g_per_kwh": 191.7,
     "renewable_share_pct": 40.0, "source": "mix:ipcc-ar5"}

Delivery: at least once, like :class:`ingest.prices.PriceFeed`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError

from ingest.entsoe import DocumentError
from ingest.prices import (
    EXTRA_CELLS,
    Feed,
    FeedConfig,
    Parsed,
    bad_row,
    cell_number,
    check_row,
    fill_ends,
    parse_instant,
    sniff_format,
    table_rows,
)
from pipeline import codec, topics
from pipeline.codec import Rejected
from pipeline.schemas import CarbonIntensity, Identifier
from pipeline.settings import Settings

COMPONENT = "ingest.carbon"

# Lifecycle emission factors per fuel. [gCO2eq/kWh]
# Source, unless marked otherwise: IPCC AR5 WG3 (2014), Annex III, Table A.III.2,
# median lifecycle emissions of currently commercially available technologies.
EMISSION_FACTORS_G_PER_KWH: dict[str, float] = {
    "coal": 820.0,  # IPCC AR5: coal, pulverised
    # ASSUMPTION, not in IPCC AR5 (which has one coal value): lignite burns at a lower
    # efficiency than hard coal, and LCA reviews put it above; 1100 sits in their range.
    "lignite": 1100.0,
    "gas": 490.0,  # IPCC AR5: gas, combined cycle
    # ASSUMPTION, not in IPCC AR5 Annex III: oil-fired plants, 650, the value commonly
    # used for oil by grid-intensity services (between gas CCGT and coal).
    "oil": 650.0,
    "nuclear": 12.0,  # IPCC AR5
    "hydro": 24.0,  # IPCC AR5: hydropower
    "wind": 11.0,  # IPCC AR5: wind onshore
    "solar": 48.0,  # IPCC AR5: solar PV, utility
    "biomass": 230.0,  # IPCC AR5: biomass, dedicated
    "geothermal": 38.0,  # IPCC AR5
    # ASSUMPTION: unidentified generation, 700, between oil and coal so that unknown
    # sources are not counted as clean.
    "other": 700.0,
}
RENEWABLE_FUELS = frozenset({"hydro", "wind", "solar", "biomass", "geothermal"})
MIX_SOURCE = "mix:ipcc-ar5"

_ROW_KEYS = {"time", "end", "zone"}


def intensity_from_mix(generation: Mapping[str, float]) -> tuple[float, float]:
    """Generation-weighted lifecycle intensity [gCO2eq/kWh] and renewable share [%].

    ``generation`` maps fuel to MW or MWh (one unit for all). Raises ValueError
    for an unknown fuel, a negative or non-finite value, or no generation at all.
    """
    unknown = sorted(set(generation) - set(EMISSION_FACTORS_G_PER_KWH))
    if unknown:
        raise ValueError(f"unknown fuel(s) {unknown}; known: {sorted(EMISSION_FACTORS_G_PER_KWH)}")
    for fuel, amount in generation.items():
        if not math.isfinite(amount) or amount < 0:
            raise ValueError(f"{fuel} generation {amount!r} must be finite and >= 0")
    total = sum(generation.values())
    if total <= 0:
        raise ValueError("total generation is zero")
    co2 = sum(amount * EMISSION_FACTORS_G_PER_KWH[f] for f, amount in generation.items())
    renewable = sum(amount for f, amount in generation.items() if f in RENEWABLE_FUELS)
    # min: an all-renewable mix can round to 100.00000000000001 %, which Percent refuses.
    return co2 / total, min(100.0, 100.0 * renewable / total)


def parse_carbon(
    raw: bytes,
    fmt: Literal["auto", "csv", "json"] = "auto",
    *,
    zone: str | None = None,
    source: str = "table",
) -> Parsed[CarbonIntensity]:
    """Intensity records of a table: either ``co2_g_per_kwh`` rows or a generation mix.

    Bad rows come back rejected with their row number; a table whose columns are
    unusable (unknown fuels, neither intensity nor fuels) raises DocumentError.
    """
    detected = sniff_format(raw) if fmt == "auto" else fmt
    if detected == "entsoe":
        raise DocumentError("XML is not a carbon intensity table (use CSV or JSON)")
    rows = table_rows(raw, detected, "intensity")
    if not rows:
        raise DocumentError("carbon table has no rows")
    columns = set().union(*(row for row in rows if isinstance(row, dict))) - {EXTRA_CELLS}
    mix = "co2_g_per_kwh" not in columns
    if mix:
        unknown = sorted(columns - _ROW_KEYS - set(EMISSION_FACTORS_G_PER_KWH))
        if unknown:
            raise DocumentError(
                f"unknown column(s) {unknown}: neither co2_g_per_kwh nor a fuel of "
                f"{sorted(EMISSION_FACTORS_G_PER_KWH)}",
                "UnknownFuel",
            )
        if not columns & set(EMISSION_FACTORS_G_PER_KWH):
            raise DocumentError("table has neither co2_g_per_kwh nor fuel columns")

    rejected: list[tuple[int, Rejected]] = []
    by_zone: dict[str, list[tuple[int, dict[str, Any], Any]]] = {}
    for number, row in enumerate(rows, start=1):
        try:
            check_row(row)
            start = parse_instant(row.get("time"), "time")
            row_zone = row.get("zone", zone)
            if row_zone is None:
                raise ValueError("no zone (column or feed config)")
        except ValueError as error:
            rejected.append((number, bad_row(number, row, str(error))))
            continue
        by_zone.setdefault(str(row_zone), []).append((number, row, start))

    records: list[CarbonIntensity] = []
    for zone_id, entries in by_zone.items():
        ends = fill_ends([start for _, _, start in entries])
        for (number, row, start), default_end in zip(entries, ends, strict=True):
            try:
                records.append(
                    _record(row, zone_id, start, default_end, MIX_SOURCE if mix else source)
                )
            except ValidationError as error:
                rejected.append((number, bad_row(number, row, codec.describe(error))))
            except ValueError as error:
                rejected.append((number, bad_row(number, row, str(error))))
    return Parsed(
        sorted(records, key=lambda r: (r.zone, r.start)),
        [bad for _, bad in sorted(rejected, key=lambda item: item[0])],
    )


def _record(
    row: dict[str, Any], zone: str, start: Any, default_end: Any, source: str
) -> CarbonIntensity:
    end = parse_instant(row["end"], "end") if "end" in row else default_end
    if end is None:
        raise ValueError("a single row needs an 'end'")
    if end <= start:
        raise ValueError(f"end {end.isoformat()} must be after start {start.isoformat()}")
    if "co2_g_per_kwh" in row:
        co2 = _number(row, "co2_g_per_kwh")
        share = _number(row, "renewable_share_pct") if "renewable_share_pct" in row else None
    else:
        generation = {
            fuel: _number(row, fuel) for fuel in row if fuel not in _ROW_KEYS and row[fuel] != ""
        }
        co2, share = intensity_from_mix(generation)
    return CarbonIntensity(
        zone=zone,
        start=start,
        end=end,
        co2_g_per_kwh=co2,
        renewable_share_pct=share,
        source=source,
    )


def _number(row: dict[str, Any], name: str) -> float:
    return cell_number(row, name)


class CarbonFeedConfig(FeedConfig):
    format: Literal["auto", "csv", "json"] = "auto"
    zone: Identifier | None = None
    """Zone of rows without a ``zone`` column."""
    source_name: str = Field(default="table", min_length=1)
    """What goes in each record's ``source`` for intensity tables (mixes say ``mix:ipcc-ar5``)."""


class CarbonFeed(Feed[CarbonIntensity]):
    """Polls a carbon URL or file and sends new :class:`CarbonIntensity` records."""

    spec = topics.CARBON
    component = COMPONENT

    def __init__(self, settings: Settings, config: CarbonFeedConfig) -> None:
        super().__init__(settings, config)
        self.config: CarbonFeedConfig = config

    def parse(self, raw: bytes) -> Parsed[CarbonIntensity]:
        return parse_carbon(
            raw, self.config.format, zone=self.config.zone, source=self.config.source_name
        )

    def key(self, message: CarbonIntensity) -> str:
        return message.zone

    def identity(self, message: CarbonIntensity) -> Hashable:
        return (message.zone, message.start, message.co2_g_per_kwh)
