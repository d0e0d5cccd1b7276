"""ENTSO-E day-ahead prices: ``Publication_MarketDocument`` (document type A44) -> PriceTick.

The Transparency Platform API answers a day-ahead price query with a
``Publication_MarketDocument`` (IEC 62325-451-3): one or more ``TimeSeries``,
each with one or more ``Period`` (``timeInterval`` start/end, ``resolution``
PT15M / PT30M / PT60M) holding ``Point`` elements (``position``, 1-based, and
``price.amount``). Prices are in ``currency_Unit.name`` per
``price_Measure_Unit.name`` (MWH in practice): they are divided by 1000 here,
so a tick is always per kWh.

curveType A01 ("sequential fixed size block") lists every position; A03
("variable sized block") may omit positions, and an omitted position repeats
the price of the previous one up to the end of the period.

When the query matches nothing, the API answers with an
``Acknowledgement_MarketDocument`` instead: :func:`parse_day_ahead` raises
:class:`NoDataError` for it (retriable: the prices may simply not be published
yet).

Example tick (key ``DE-LU``)::

    {"schema_version": 1, "market": "DE-LU", "start": "2025-04-07T22:00:00Z",
     "end": "2025-04-07T23:00:00Z", "price_per_kwh": 0.08942, "currency": "EUR",
     "price_kind": "day_ahead", "published_at": "2025-04-07T11:02:13Z"}
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta

from pydantic import ValidationError

from pipeline import codec
from pipeline.codec import DecodeError
from pipeline.schemas import PriceKind, PriceTick

# In_Domain EIC codes of the most used bidding zones -> readable market ids.
# Source: ENTSO-E "Area" codes (Transparency Platform API guide, section A.10).
# An EIC not listed here is kept as the market id: it is unique and valid.
EIC_MARKETS: dict[str, str] = {
    "10Y1001A1001A82H": "DE-LU",  # Germany-Luxembourg, since 2018-10-01
    "10YAT-APG------L": "AT",
    "10YBE----------2": "BE",
    "10YNL----------L": "NL",
    "10YFR-RTE------C": "FR",
    "10YES-REE------0": "ES",
    "10YPT-REN------W": "PT",
    "10YCH-SWISSGRIDZ": "CH",
    "10YPL-AREA-----S": "PL",
    "10YCZ-CEPS-----N": "CZ",
    "10YDK-1--------W": "DK1",
    "10YDK-2--------M": "DK2",
    "10Y1001A1001A73I": "IT-NORD",
    "10Y1001A1001A70O": "IT-CNOR",
    "10Y1001A1001A71M": "IT-CSUD",
    "10Y1001A1001A788": "IT-SUD",
}

# price_Measure_Unit.name -> divisor to a price per kWh.
_PER_KWH_DIVISOR: dict[str, float] = {"MWH": 1000.0, "KWH": 1.0}

_RESOLUTION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?$")
# Most steps one Period may hold: a leap year of 15-minute steps. An A03 curve fills
# every step from a single Point, so without a bound a few bytes could ask for billions.
MAX_PERIOD_STEPS = 366 * 24 * 4


class DocumentError(DecodeError):
    """A document (price or carbon) that can never become messages; retrying the same
    bytes will not help. ``error_type`` goes into the dead letter."""

    def __init__(self, reason: str, error_type: str = "BadDocument") -> None:
        super().__init__(reason, error_type)


class NoDataError(DocumentError):
    """The API's "no matching data" answer (``Acknowledgement_MarketDocument``).

    Retriable: day-ahead prices are published once a day, asking later may succeed.
    """

    retriable = True

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "NoData")


def market_of(eic: str) -> str:
    """Readable market id of a bidding zone EIC code, or the EIC itself."""
    return EIC_MARKETS.get(eic, eic)


def _local(tag: str) -> str:
    # Tags come as "{namespace}name"; the namespace version varies (7:0, 7:3), names do not.
    return tag.rsplit("}", 1)[-1]


def _child(element: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in element if _local(c.tag) == name), None)


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in element if _local(c.tag) == name]


def _text(element: ET.Element, path: str, where: str) -> str:
    """Text of a required descendant given as ``a/b``; a clear error names what is missing."""
    node: ET.Element | None = element
    for name in path.split("/"):
        node = _child(node, name) if node is not None else None
    if node is None or not (node.text or "").strip():
        raise DocumentError(f"{where}: missing <{path}>")
    return (node.text or "").strip()


def _instant(text: str, where: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise DocumentError(f"{where}: {text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise DocumentError(f"{where}: {text!r} has no UTC offset")
    return value


def _resolution(text: str, where: str) -> timedelta:
    match = _RESOLUTION.match(text)
    if match is None or not any(match.groups()):
        raise DocumentError(
            f"{where}: resolution {text!r} not supported (expected e.g. PT15M, PT30M, PT60M)"
        )
    try:
        hours, minutes = (int(g) if g else 0 for g in match.groups())
        step = timedelta(hours=hours, minutes=minutes)
    except (OverflowError, ValueError):  # more days than timedelta holds, or 4300+ digits
        raise DocumentError(f"{where}: resolution {text[:40]!r} is out of range") from None
    if step <= timedelta(0):
        raise DocumentError(f"{where}: resolution {text!r} is zero")
    return step


def _refuse_dtd(raw: bytes) -> None:
    # ENTSO-E documents never carry a DTD; refusing one rules out entity-expansion
    # bombs (billion laughs, quadratic blowup) without the defusedxml dependency.
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise DocumentError("XML with a DTD or entity declarations is refused", "UnsafeXML")


def parse_xml(raw: bytes) -> ET.Element:
    """The root element, or :class:`DocumentError` with the line and column of the fault."""
    _refuse_dtd(raw)
    try:
        return ET.fromstring(raw)  # noqa: S314 - no DTD possible, see _refuse_dtd
    except ET.ParseError as error:
        line, column = error.position
        what = error.msg.split(": line ", 1)[0]  # expat appends its own 0-based position
        # expat counts columns from 0; editors count from 1.
        raise DocumentError(
            f"malformed XML at line {line}, column {column + 1}: {what}", "XMLSyntaxError"
        ) from None


def parse_day_ahead(
    raw: bytes,
    *,
    price_kind: PriceKind = PriceKind.DAY_AHEAD,
    published_at: datetime | None = None,
) -> list[PriceTick]:
    """Parse a day-ahead ``Publication_MarketDocument`` into ticks sorted by market and start.

    ``published_at`` defaults to the document's ``createdDateTime`` (never earlier
    than when the prices were known). Raises :class:`NoDataError` for an
    acknowledgement, :class:`DocumentError` for anything else unusable.
    """
    root = parse_xml(raw)
    kind = _local(root.tag)
    if kind == "Acknowledgement_MarketDocument":
        text = "; ".join(
            " ".join(
                (node.text or "").strip()
                for node in (_child(reason, "code"), _child(reason, "text"))
                if node is not None
            )
            for reason in _children(root, "Reason")
        )
        raise NoDataError(f"ENTSO-E answered with an acknowledgement, no prices: {text!r}")
    if kind != "Publication_MarketDocument":
        raise DocumentError(f"expected a Publication_MarketDocument, got <{kind}>")
    document_type = _text(root, "type", "document")
    if document_type != "A44":
        raise DocumentError(f"document type {document_type!r} is not A44 (day-ahead prices)")
    if published_at is None:
        created = _child(root, "createdDateTime")
        if created is not None and created.text:
            published_at = _instant(created.text.strip(), "createdDateTime")

    ticks: list[PriceTick] = []
    for series_index, series in enumerate(_children(root, "TimeSeries"), start=1):
        where = f"TimeSeries {series_index}"
        eic = _text(series, "in_Domain.mRID", where)
        currency = _text(series, "currency_Unit.name", where)
        unit = _text(series, "price_Measure_Unit.name", where)
        if unit not in _PER_KWH_DIVISOR:
            raise DocumentError(
                f"{where}: price_Measure_Unit.name {unit!r} not supported "
                f"(expected one of {sorted(_PER_KWH_DIVISOR)})"
            )
        curve_element = _child(series, "curveType")
        # The schema's default curve type is A01 when the element is absent.
        curve = (curve_element.text or "").strip() if curve_element is not None else "A01"
        if curve not in ("A01", "A03"):
            raise DocumentError(f"{where}: curveType {curve!r} not supported (A01, A03)")
        for period_index, period in enumerate(_children(series, "Period"), start=1):
            ticks.extend(
                _period_ticks(
                    period,
                    f"{where} Period {period_index}",
                    market=market_of(eic),
                    currency=currency,
                    divisor=_PER_KWH_DIVISOR[unit],
                    fill_gaps=curve == "A03",
                    price_kind=price_kind,
                    published_at=published_at,
                )
            )
    if not ticks:
        raise DocumentError("document has no TimeSeries with prices")
    return sorted(ticks, key=lambda t: (t.market, t.start))


def _period_ticks(
    period: ET.Element,
    where: str,
    *,
    market: str,
    currency: str,
    divisor: float,
    fill_gaps: bool,
    price_kind: PriceKind,
    published_at: datetime | None,
) -> list[PriceTick]:
    start = _instant(_text(period, "timeInterval/start", where), f"{where} start")
    end = _instant(_text(period, "timeInterval/end", where), f"{where} end")
    step = _resolution(_text(period, "resolution", where), where)
    slots, remainder = divmod(end - start, step)
    if slots < 1 or remainder:
        raise DocumentError(
            f"{where}: interval {start.isoformat()}..{end.isoformat()} is not a whole "
            f"number of {step} steps"
        )
    if slots > MAX_PERIOD_STEPS:
        raise DocumentError(
            f"{where}: interval {start.isoformat()}..{end.isoformat()} has {slots} steps "
            f"of {step}; at most {MAX_PERIOD_STEPS} (a year of 15-minute steps) are read"
        )
    prices: dict[int, float] = {}
    for point_index, point in enumerate(_children(period, "Point"), start=1):
        point_where = f"{where} Point {point_index}"
        position_text = _text(point, "position", point_where)
        amount_text = _text(point, "price.amount", point_where)
        try:
            position = int(position_text)
            amount = float(amount_text)
        except ValueError:
            raise DocumentError(
                f"{point_where}: position {position_text!r} / price.amount {amount_text!r} "
                "are not numbers"
            ) from None
        if not 1 <= position <= slots:
            raise DocumentError(f"{point_where}: position {position} outside 1..{slots}")
        if position in prices:
            raise DocumentError(f"{point_where}: position {position} appears twice")
        # Rounded so /1000 does not turn 89.42 into 0.08942000000000001 on the wire.
        prices[position] = round(amount / divisor, 10)
    if not prices:
        raise DocumentError(f"{where}: no Point")
    if fill_gaps:
        if 1 not in prices:
            raise DocumentError(f"{where}: curveType A03 needs a price at position 1")
        # A03: an omitted position keeps the previous price.
        for position in range(2, slots + 1):
            prices.setdefault(position, prices[position - 1])
    ticks = []
    for position in sorted(prices):
        try:
            ticks.append(
                PriceTick(
                    market=market,
                    start=start + (position - 1) * step,
                    end=start + position * step,
                    price_per_kwh=prices[position],
                    currency=currency,
                    price_kind=price_kind,
                    published_at=published_at,
                )
            )
        except ValidationError as error:
            raise DocumentError(
                f"{where} position {position}: {codec.describe(error)}", "ValidationError"
            ) from None
    return ticks
