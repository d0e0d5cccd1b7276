"""ENTSO-E day-ahead documents: regression cases as folders, plus the edges around them.

Each folder of ``entsoe_cases/`` holds a hand-written ``document.xml`` (modelled
on the public Publication_MarketDocument schema) and either ``expected.json``
(``[market, start, end, price_per_kwh, currency, published_at]`` per tick) or
``error.txt`` (a substring of the error message).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from ingest.entsoe import DocumentError, NoDataError, market_of, parse_day_ahead
from ingest.prices import parse_prices
from pipeline.schemas import PriceKind

CASES = Path(__file__).parent / "entsoe_cases"


def case_dirs() -> list[Path]:
    return sorted(p for p in CASES.iterdir() if p.is_dir())


@pytest.mark.parametrize("case", case_dirs(), ids=lambda p: p.name)
def test_case(case: Path) -> None:
    raw = (case / "document.xml").read_bytes()
    if (case / "error.txt").exists():
        expected_error = (case / "error.txt").read_text().strip()
        with pytest.raises(DocumentError) as caught:
            parse_day_ahead(raw)
        assert expected_error in caught.value.reason
        return
    expected = orjson.loads((case / "expected.json").read_bytes())
    ticks = parse_day_ahead(raw)
    got = [
        [
            t.market,
            t.start.isoformat().replace("+00:00", "Z"),
            t.end.isoformat().replace("+00:00", "Z"),
            t.price_per_kwh,
            t.currency,
            t.published_at.isoformat().replace("+00:00", "Z") if t.published_at else None,
        ]
        for t in ticks
    ]
    assert got == expected
    assert all(t.price_kind is PriceKind.DAY_AHEAD for t in ticks)
    assert all(t.start.tzinfo is UTC for t in ticks)


def test_there_are_cases_of_each_kind() -> None:
    kinds = {("error" if (c / "error.txt").exists() else "ok") for c in case_dirs()}
    assert kinds == {"error", "ok"}


def test_acknowledgement_is_a_retriable_no_data_error_quoting_the_reason() -> None:
    raw = (CASES / "acknowledgement_no_data" / "document.xml").read_bytes()
    with pytest.raises(NoDataError, match="No matching data found") as caught:
        parse_day_ahead(raw)
    assert caught.value.retriable and caught.value.error_type == "NoData"


def test_malformed_xml_is_an_error_never_a_crash_with_line_and_column() -> None:
    with pytest.raises(DocumentError, match=r"line 1, column \d+") as caught:
        parse_day_ahead(b"<Publication_MarketDocument><type>A44</type>")
    assert caught.value.error_type == "XMLSyntaxError" and not caught.value.retriable
    with pytest.raises(DocumentError, match="malformed XML at line 1"):
        parse_day_ahead(b"")


def test_a_dtd_is_refused_before_parsing_so_entity_bombs_cannot_expand() -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><type>&lol2;</type>'
    )
    with pytest.raises(DocumentError, match="DTD") as caught:
        parse_day_ahead(bomb)
    assert caught.value.error_type == "UnsafeXML"


def test_other_document_types_are_refused_by_name() -> None:
    raw = (CASES / "a01_hourly_de_lu" / "document.xml").read_bytes()
    with pytest.raises(DocumentError, match="'A65' is not A44"):
        parse_day_ahead(raw.replace(b"<type>A44</type>", b"<type>A65</type>"))
    with pytest.raises(DocumentError, match="expected a Publication_MarketDocument"):
        parse_day_ahead(b"<GL_MarketDocument/>")


def test_missing_element_is_named() -> None:
    raw = (CASES / "a01_hourly_de_lu" / "document.xml").read_bytes()
    broken = raw.replace(b"<price_Measure_Unit.name>MWH</price_Measure_Unit.name>", b"")
    with pytest.raises(DocumentError, match=r"TimeSeries 1: missing <price_Measure_Unit.name>"):
        parse_day_ahead(broken)


def test_a03_without_the_first_position_cannot_be_filled() -> None:
    raw = (CASES / "a03_omitted_positions_15min" / "document.xml").read_bytes()
    broken = raw.replace(
        b"<Point><position>1</position><price.amount>100.00</price.amount></Point>", b""
    )
    with pytest.raises(DocumentError, match="A03 needs a price at position 1"):
        parse_day_ahead(broken)


def test_a01_with_a_missing_position_keeps_the_gap() -> None:
    raw = (CASES / "a01_hourly_de_lu" / "document.xml").read_bytes()
    # A01 lists every position it has: a missing one is no price, not a repeat.
    start = raw.index(b"<Point>\n        <position>2</position>")
    end = raw.index(b"</Point>", start) + len(b"</Point>")
    ticks = parse_day_ahead(raw[:start] + raw[end:])
    assert [t.start.hour for t in ticks] == [22, 0]


def test_published_at_override_and_price_kind() -> None:
    raw = (CASES / "a01_hourly_de_lu" / "document.xml").read_bytes()
    at = datetime(2025, 4, 6, 12, 0, tzinfo=UTC)
    ticks = parse_day_ahead(raw, published_at=at, price_kind=PriceKind.INTRADAY)
    assert {t.published_at for t in ticks} == {at}
    assert {t.price_kind for t in ticks} == {PriceKind.INTRADAY}


def test_eic_codes_map_to_readable_markets_and_unknown_ones_are_kept() -> None:
    assert market_of("10Y1001A1001A82H") == "DE-LU"
    assert market_of("10Y1001A1001A73I") == "IT-NORD"
    assert market_of("10YHU-MAVIR----U") == "10YHU-MAVIR----U"


def test_parse_prices_sniffs_xml() -> None:
    raw = (CASES / "a03_omitted_positions_15min" / "document.xml").read_bytes()
    parsed = parse_prices(raw)
    assert len(parsed.messages) == 8 and parsed.rejected == []
