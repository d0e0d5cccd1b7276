"""Patent parsers on the bundled records in data/patents/ (see its SOURCES.md).

Expected values were read from the XML files themselves, not from the parser.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pytest

from ingest.patents import (
    Format,
    ParseResult,
    detect_format,
    fetch_url,
    parse_bytes,
    parse_epo_ops,
    parse_file,
    parse_uspto,
    parse_wipo,
)
from pipeline.schemas import Patent, PatentOffice

DATA = Path(__file__).resolve().parents[3] / "data" / "patents"


def _by_id(result: ParseResult) -> dict[str, Patent]:
    return {p.patent_id: p for p in result.patents}


def _read(name: str) -> bytes:
    return (DATA / name).read_bytes()


# --------------------------------------------------------------------------- USPTO


def test_uspto_grants_concatenated_file() -> None:
    result = parse_file(DATA / "uspto_grants.xml")

    assert result.errors == []
    assert [p.patent_id for p in result.patents] == ["US-9358892-B1", "US-7062920-B2"]
    grant = result.patents[0]
    assert grant.office is PatentOffice.USPTO
    # The file says <doc-number>09358892</doc-number>: DOCDB drops the padding.
    assert (grant.country, grant.doc_number, grant.kind) == ("US", "9358892", "B1")
    assert grant.title == (
        "System and method for pre-charging a hybrid vehicle for improving reverse"
        " driving performance"
    )
    assert grant.cpc[0] == "B60L11/1809"  # main-cpc
    assert grant.cpc[1:3] == ["B60K35/00", "B60L11/1861"]
    assert grant.ipc[0] == "B60L9/00"
    assert grant.applicants == ["Toyota Motor Engineering & Manufacturing North America, Inc."]
    assert grant.inventors == ["Geoffrey D. Gaither"]
    assert grant.publication_date == date(2016, 6, 7)
    assert grant.filing_date == date(2014, 12, 2)
    assert grant.priority_date is None
    assert len(grant.citations) == 24
    assert grant.non_patent_citations == 4
    assert grant.citations[0] == "US-5856709-A"
    # USPTO writes <country>WO</country><doc-number>WO2009/157308</doc-number>.
    assert grant.citations[-1] == "WO-2009157308"
    assert len(grant.claims) == 20
    assert grant.claims[0].startswith(
        "1. A pre-charging system for improving reverse direction hill climb performance"
    )
    assert grant.claims[-1].startswith("20. ")
    assert grant.abstract.startswith("A method/system is provided for improving reverse hill")
    assert grant.language == "en"
    assert grant.source == str(DATA / "uspto_grants.xml")

    # v4.1 (2006): no classifications-cpc, inventors listed as applicant-inventors.
    old = result.patents[1]
    assert (
        old.title
        == "Combustor dome assembly of a gas turbine engine having a free floating swirler"
    )
    assert old.cpc == []
    assert old.ipc == ["F23R3/60"]
    assert old.applicants[0] == "Marie Ann McMasters"
    assert len(old.inventors) == 5
    assert old.publication_date == date(2006, 6, 20)
    assert len(old.citations) == 13
    assert old.non_patent_citations == 0
    assert len(old.claims) == 15


def test_uspto_application() -> None:
    result = parse_file(DATA / "uspto_applications.xml")

    assert result.errors == []
    (app,) = result.patents
    assert app.patent_id == "US-20220240351-A1"
    assert app.title == (
        "SELF-REGULATING ELECTRIC HEATING FILM AND PREPARATION METHOD AND USE THEREOF"
    )
    assert app.cpc[0] == "H05B1/0294"
    assert app.ipc[0] == "H05B1/02"
    assert app.applicants == ["Beihang University"]
    assert app.inventors[:2] == ["Huawei CHEN", "Yantong ZHU"]
    assert app.publication_date == date(2022, 7, 28)
    assert app.filing_date == date(2021, 6, 28)
    assert app.priority_date == date(2021, 1, 27)  # CN priority claim
    assert app.citations == []
    assert len(app.claims) == 10


def test_pseudoscientific_application_parses_like_any_other() -> None:
    (patent,) = parse_file(DATA / "uspto_pseudoscience_application.xml").patents

    assert patent.patent_id == "US-20249999999-A1"
    assert patent.title.startswith("ZERO-POINT VACUUM ENERGY RESONATOR")
    assert patent.cpc == ["H02N11/008"]
    assert patent.applicants == ["Aurelian Quill"]
    assert patent.publication_date == date(2024, 12, 26)
    # No citation of any literature: what a reviewer of over-unity claims looks at first.
    assert patent.citations == []
    assert patent.non_patent_citations == 0
    assert len(patent.claims) == 3
    # Nested claim-text elements become one text with whitespace collapsed.
    assert patent.claims[0].startswith(
        "1. An over-unity electrical generator comprising: a permanent-magnet core; two"
    )
    assert "claim 1, wherein the excess energy" in patent.claims[1]


def test_uspto_malformed_document_is_one_error_and_the_rest_is_read() -> None:
    result = parse_file(DATA / "uspto_malformed.xml")

    assert [p.patent_id for p in result.patents] == ["US-20220240350-A1", "US-20220160114-A2"]
    (error,) = result.errors
    assert error.document == 2
    assert error.source == str(DATA / "uspto_malformed.xml")
    assert error.reason.startswith("not well-formed XML: no element found: line ")
    assert re.fullmatch(
        r".*uspto_malformed\.xml: document 2: not well-formed XML: .*line \d+, column \d+",
        str(error),
    )
    assert len(result.patents[0].claims) == 19
    assert result.patents[0].claims[0] == "1.-18. (Cancelled)"


def _without_title(data: bytes) -> bytes:
    return re.sub(rb"<invention-title[^>]*>.*?</invention-title>", b"", data, flags=re.S)


def test_uspto_missing_title_is_an_error_naming_the_document() -> None:
    good = _read("uspto_applications.xml")
    bad = _without_title(_read("uspto_pseudoscience_application.xml"))

    result = parse_uspto(good + bad, "memory")

    assert [p.patent_id for p in result.patents] == ["US-20220240351-A1"]
    (error,) = result.errors
    assert (error.document, error.patent_id, error.reason) == (
        2,
        "US-20249999999-A1",
        "no invention-title",
    )
    assert str(error) == "memory: document 2 US-20249999999-A1: no invention-title"


def test_uspto_missing_publication_date_and_id() -> None:
    data = _read("uspto_pseudoscience_application.xml")
    no_date = data.replace(
        b"<date>20241226</date>\n</document-id>\n</publication-reference>",
        b"</document-id>\n</publication-reference>",
    ).replace(b' date-publ="20241226"', b"")
    no_id = re.sub(rb"<publication-reference>.*?</publication-reference>", b"", data, flags=re.S)

    result = parse_uspto(no_date + no_id, "memory")

    assert result.patents == []
    assert [(e.document, e.patent_id, e.reason) for e in result.errors] == [
        (1, "US-20249999999-A1", "no publication date"),
        (2, None, "no publication-reference country/doc-number/kind"),
    ]


def test_entity_declarations_are_refused() -> None:
    bomb = (
        b'<?xml version="1.0"?>\n<!DOCTYPE us-patent-grant [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n<us-patent-grant>&b;</us-patent-grant>\n'
    )
    result = parse_uspto(_read("uspto_applications.xml") + bomb, "memory")

    assert [p.patent_id for p in result.patents] == ["US-20220240351-A1"]
    assert result.errors[0].document == 2
    assert "entity declarations" in result.errors[0].reason


# --------------------------------------------------------------------------- EPO OPS


def test_epo_ops_search_response() -> None:
    result = parse_file(DATA / "epo_ops_search_siemens.xml")

    assert result.errors == []
    patents = _by_id(result)
    assert list(patents) == ["AU-2024270787-A1", "AU-2024265697-A1", "DK-3740998-T3"]
    wind = patents["AU-2024270787-A1"]
    assert wind.office is PatentOffice.EPO
    assert wind.title == "MONITORING THE OPERATION OF A WIND TURBINE"
    assert wind.cpc[0] == "F03D17/006"
    assert "Y02E10/72" in wind.cpc
    # OPS writes IPC as fixed-width text: "F03D  17/    00            C I".
    assert wind.ipc == ["F03D17/00"]
    # The "original" party names, not the normalised "epodoc" ones.
    assert wind.applicants == ["SIEMENS GAMESA RENEWABLE ENERGY A/S"]
    assert wind.inventors == ["NADERHOFF, Thorsten", "SANDEL, Klaus"]
    assert wind.publication_date == date(2025, 10, 23)
    assert wind.filing_date == date(2024, 5, 16)
    assert wind.priority_date == date(2023, 5, 17)
    assert wind.abstract == ""
    assert wind.claims == []

    flywheel = patents["AU-2024265697-A1"]
    assert (
        flywheel.title == "A STEAM TURBINE ROTOR FLYWHEEL SYSTEM FOR GRID FREQUENCY STABILIZATION"
    )
    assert flywheel.cpc[0] == "F01D1/02"
    assert flywheel.applicants == ["SIEMENS ENERGY GLOBAL GMBH & CO. KG"]
    assert flywheel.abstract.startswith("A method of providing a flywheel system for grid")

    # Only a title in the original language (lang="ol"): used, language unknown.
    storage = patents["DK-3740998-T3"]
    assert storage.title == "ENERGILAGRINGSSYSTEM"
    assert storage.language is None
    assert storage.ipc[0] == "H01M10/613"
    assert storage.cpc[0] == "H01G2/08"
    assert storage.publication_date == date(2025, 10, 20)


def test_epo_ops_biblio_with_citations() -> None:
    result = parse_epo_ops(_read("epo_ops_biblio_ep2400812.xml"), "ops")

    assert result.errors == []
    patents = _by_id(result)
    assert list(patents) == ["EP-2400812-A1", "EP-2533477-A1", "EP-2533477-B1"]
    first = patents["EP-2400812-A1"]
    assert first.title == "BLUETOOTH NETWORKING"  # lang="en" of de/fr/en
    assert first.cpc == ["H04W84/20", "H04W88/04"]
    # "9SOLUTIONS OY" and "9Solutions Oy" are one applicant.
    assert first.applicants == ["9SOLUTIONS OY"]
    assert first.publication_date == date(2011, 12, 28)
    assert len(first.citations) == 6
    assert first.citations[-1] == "EP-1542377-A2"
    assert first.non_patent_citations == 0
    assert patents["EP-2533477-A1"].non_patent_citations == 1
    assert patents["EP-2533477-B1"].publication_date == date(2014, 3, 5)


def test_epo_ops_not_found_stub_and_missing_title() -> None:
    data = _read("epo_ops_biblio_ep2400812.xml")
    data = data.replace(
        b'country="EP" doc-number="2400812" kind="A1">',
        b'country="EP" doc-number="2400812" kind="A1" status="not found">',
    )
    data = data.replace(
        b'<invention-title lang="en">Bluetooth network configuration</invention-title>', b"", 1
    )
    data = re.sub(rb'<invention-title lang="(de|fr)">[^<]*</invention-title>', b"", data)

    result = parse_epo_ops(data, "ops")

    assert [p.patent_id for p in result.patents] == ["EP-2533477-B1"]
    assert [(e.document, e.patent_id, e.reason) for e in result.errors] == [
        (1, "EP-2400812-A1", "OPS status 'not found'"),
        (2, "EP-2533477-A1", "no invention-title"),
    ]


def test_epo_ops_malformed_response_is_one_error() -> None:
    data = _read("epo_ops_search_siemens.xml")[:5000]

    result = parse_epo_ops(data, "ops")

    assert result.patents == []
    (error,) = result.errors
    assert error.document is None
    assert error.reason.startswith("not well-formed XML:")


# --------------------------------------------------------------------------- WIPO


def test_wipo_st36_document() -> None:
    result = parse_file(DATA / "wipo_st36_wo.xml")

    assert result.errors == []
    (wo,) = result.patents
    assert wo.patent_id == "WO-2024999999-A1"
    assert wo.office is PatentOffice.WIPO
    assert (
        wo.title == "QUENCH DETECTION FOR A HIGH-TEMPERATURE SUPERCONDUCTING TOROIDAL FIELD MAGNET"
    )
    assert wo.ipc == ["H01F6/06", "G21B1/05"]
    assert wo.applicants == ["EXAMPLE FUSION MAGNETICS LTD"]
    assert wo.inventors == ["Helen RIVERS", "Daniel OKAFOR"]
    assert wo.publication_date == date(2024, 11, 28)
    assert wo.filing_date == date(2024, 4, 30)
    assert wo.priority_date == date(2023, 5, 3)
    assert wo.citations == ["US-20190267171-A1"]
    assert wo.non_patent_citations == 1
    assert len(wo.claims) == 2


def test_wipo_several_documents_under_a_wrapper() -> None:
    one = _read("wipo_st36_wo.xml").split(b"?>", 1)[1]
    other = _without_title(one.replace(b"2024999999", b"2024999998"))
    data = b"<?xml version='1.0'?><export>" + one + other + b"</export>"

    result = parse_wipo(data, "export")

    assert [p.patent_id for p in result.patents] == ["WO-2024999999-A1"]
    assert [(e.document, e.patent_id, e.reason) for e in result.errors] == [
        (2, "WO-2024999998-A1", "no invention-title")
    ]


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("uspto_grants.xml", "uspto"),
        ("uspto_applications.xml", "uspto"),
        ("uspto_malformed.xml", "uspto"),
        ("uspto_pseudoscience_application.xml", "uspto"),
        ("epo_ops_search_siemens.xml", "epo"),
        ("epo_ops_biblio_ep2400812.xml", "epo"),
        ("wipo_st36_wo.xml", "wipo"),
    ],
)
def test_detect_format(name: str, fmt: Format) -> None:
    data = _read(name)
    assert detect_format(data) == fmt
    assert parse_bytes(data, name).patents == parse_bytes(data, name, fmt).patents


def test_unknown_format_is_an_error_not_a_crash() -> None:
    result = parse_bytes(b"<html><body>rate limited</body></html>", "https://example.test/x")

    assert result.patents == []
    (error,) = result.errors
    assert error.reason.startswith("unrecognised patent format")


def test_fetch_url_refuses_non_http_schemes() -> None:
    with pytest.raises(ValueError, match="http"):
        fetch_url(f"file://{DATA / 'uspto_grants.xml'}")


def test_every_sample_file_is_listed_in_sources() -> None:
    sources = (DATA / "SOURCES.md").read_text()
    for path in DATA.glob("*.xml"):
        assert path.name in sources
