"""Patent publications as the offices publish them -> :class:`pipeline.schemas.Patent`.

Three formats, all XML:

- **USPTO bulk full text** (``ipgYYMMDD.xml`` grants, ``ipaYYMMDD.xml``
  applications, DTD v4.x): a week's file is many XML documents concatenated,
  each with its own ``<?xml ...?>`` declaration and DOCTYPE, rooted at
  ``us-patent-grant`` or ``us-patent-application``. Each document is split
  off and parsed on its own, so one broken document costs only itself.
- **EPO OPS published data** (``/rest-services/published-data/.../biblio`` and
  ``/published-data/search/biblio``): ``ops:world-patent-data`` holding
  ``exchange-document`` elements in the ``http://www.epo.org/exchange``
  namespace. Bibliographic data only: OPS serves claims from another
  endpoint, so ``claims`` stays empty.
- **WIPO ST.36** PCT publications (``wo-patent-document``), the XML that
  PATENTSCOPE and the PCT bulk products carry. PATENTSCOPE's result-list
  export is XLS/CSV without claims or citations, so it is not read here.

Every function returns a :class:`ParseResult`: the patents read and one
:class:`PatentParseError` per document that could not be (not well-formed, no
id, no title, no publication date). Nothing in a file stops the rest of it.

Example message (from ``data/patents/uspto_grants.xml``)::

    {"schema_version": 1, "patent_id": "US-9358892-B1", "office": "USPTO",
     "country": "US", "doc_number": "9358892", "kind": "B1",
     "title": "System and method for pre-charging a hybrid vehicle for improving
     reverse driving performance", "cpc": ["B60L11/1809", ...],
     "publication_date": "2016-06-07", ...}
"""

from __future__ import annotations

import re
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from pipeline.schemas import Patent, PatentOffice
from pipeline.settings import Settings

Format = Literal["uspto", "epo", "wipo"]
_Builder = Callable[[ET.Element, str], Patent]

# Expat, under ElementTree, never fetches
# external DTDs or entities, and since 2.4 limits entity amplification; the one
# remaining hazard in untrusted input is entity declarations in an internal
# DTD subset, which no office's format uses, so a document declaring one is
# refused (see _parse_xml). USPTO documents do carry a DOCTYPE, so unlike
# ingest/entsoe.py a DOCTYPE alone cannot be refused.
_ENTITY_DECL = re.compile(rb"<!ENTITY", re.IGNORECASE)

# A USPTO bulk file is documents back to back; each starts with its own
# XML declaration (at the start of a line in every weekly file).
_XML_DECL = re.compile(rb"(?m)^(?=<\?xml[\s?])")

# OPS and ST.36 IPC as fixed-width text: "H01M  10/   613            A I".
_IPC_TEXT = re.compile(r"^\s*([A-HY]\s*\d\s*\d\s*[A-Z])\s*(\d{1,4})\s*/\s*(\d{1,6})")

# USPTO pads document numbers (09358892, D0912345); DOCDB does not.
_US_NUMBER = re.compile(r"^([A-Z]{0,2})0*(\d+)$")

# How much of a byte string format detection looks at: declarations, a
# stylesheet PI and a DOCTYPE come before the root element, all short.
_SNIFF_BYTES = 4096

# OPS "original" names carry the office's trailing separators ("NADERHOFF, Thorsten, ").
_NAME_TRAILER = re.compile(r"[\s,;]+$")


@dataclass(frozen=True)
class PatentParseError:
    """Why one document of a file was not read."""

    source: str
    reason: str
    """One line, e.g. "not well-formed XML: mismatched tag: line 40, column 2"."""
    document: int | None = None
    """Position of the document in the file, 1-based, when the file holds several."""
    patent_id: str | None = None
    """The document's id when it could be read."""
    raw: bytes = field(default=b"", repr=False)
    """The document's bytes, for the dead-letter topic (nothing is lost)."""

    def __str__(self) -> str:
        where = []
        if self.document is not None:
            where.append(f"document {self.document}")
        if self.patent_id:
            where.append(self.patent_id)
        return f"{self.source}: {' '.join(where) or 'file'}: {self.reason}"


@dataclass
class ParseResult:
    """What a file gave: the patents read, and one error per document that was not."""

    patents: list[Patent] = field(default_factory=list)
    errors: list[PatentParseError] = field(default_factory=list)

    def extend(self, other: ParseResult) -> None:
        self.patents.extend(other.patents)
        self.errors.extend(other.errors)


# --------------------------------------------------------------------------- entry points


def parse_file(path: Path) -> ParseResult:
    """Read a USPTO, EPO OPS or WIPO ST.36 file, detecting its format."""
    return parse_bytes(path.read_bytes(), str(path))


def fetch_url(url: str, *, timeout_s: float = 30.0, fmt: Format | None = None) -> ParseResult:
    """Download one file (a USPTO bulk XML, an OPS response) and parse it.

    OPS needs an OAuth bearer token: fetch such URLs with your own client
    and pass the body to :func:`parse_bytes`.
    """
    if not url.startswith(("https://", "http://")):
        # urlopen would also open file:// and ftp://; a URL here is for the network only.
        raise ValueError(f"url must be http(s), got {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "wattstream-patents"})  # noqa: S310 - scheme checked above
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - scheme checked above
        data: bytes = response.read()
    return parse_bytes(data, url, fmt)


def detect_format(data: bytes) -> Format | None:
    """The format of ``data`` from its root element, or None if none of ours."""
    head = data[:_SNIFF_BYTES]
    if b"<us-patent-grant" in head or b"<us-patent-application" in head:
        return "uspto"
    if b"world-patent-data" in head or b"<exchange-document" in head:
        return "epo"
    if b"<wo-patent-document" in head:
        return "wipo"
    return None


def parse_bytes(data: bytes, source: str, fmt: Format | None = None) -> ParseResult:
    """Parse ``data`` in ``fmt``, or in the format :func:`detect_format` finds."""
    fmt = fmt or detect_format(data)
    if fmt == "uspto":
        return parse_uspto(data, source)
    if fmt == "epo":
        return parse_epo_ops(data, source)
    if fmt == "wipo":
        return parse_wipo(data, source)
    excerpt = data[:60].decode("utf-8", "replace")
    return ParseResult(
        errors=[PatentParseError(source, f"unrecognised patent format, starts {excerpt!r}")]
    )


def parse_uspto(data: bytes, source: str) -> ParseResult:
    """USPTO bulk full-text XML (grants and applications, DTD v4.x), one or many documents."""
    result = ParseResult()
    documents = [d for d in _XML_DECL.split(data) if d.strip()]
    for index, document in enumerate(documents, start=1):
        try:
            root = _parse_xml(document)
        except ValueError as exc:
            result.errors.append(PatentParseError(source, str(exc), document=index, raw=document))
            continue
        _collect(result, source, index, _uspto_patent, root)
    return result


def parse_epo_ops(data: bytes, source: str) -> ParseResult:
    """EPO OPS published-data XML (biblio or search/biblio responses)."""
    return _parse_many(data, source, "exchange-document", _epo_patent)


def parse_wipo(data: bytes, source: str) -> ParseResult:
    """WIPO ST.36 ``wo-patent-document`` XML: one document, or several under any wrapper."""
    return _parse_many(data, source, "wo-patent-document", _wipo_patent)


# --------------------------------------------------------------------------- plumbing


def _parse_xml(data: bytes) -> ET.Element:
    if _ENTITY_DECL.search(data):
        raise ValueError("refused: XML entity declarations are not allowed in untrusted input")
    try:
        # Expat fetches no external entities, and entity declarations are refused above.
        root = ET.fromstring(data)  # noqa: S314
    except ET.ParseError as exc:
        raise ValueError(f"not well-formed XML: {exc}") from None
    _strip_namespaces(root)
    return root


def _strip_namespaces(root: ET.Element) -> None:
    # OPS puts everything in http://www.epo.org/exchange (plus ops:); the element
    # names are unique without it, and one set of paths then serves all formats.
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.startswith("{"):
            el.tag = el.tag.rsplit("}", 1)[1]
        for key in [k for k in el.attrib if k.startswith("{")]:
            el.attrib[key.rsplit("}", 1)[1]] = el.attrib.pop(key)


def _parse_many(
    data: bytes,
    source: str,
    tag: str,
    build: _Builder,
) -> ParseResult:
    result = ParseResult()
    try:
        root = _parse_xml(data)
    except ValueError as exc:
        result.errors.append(PatentParseError(source, str(exc), raw=data))
        return result
    docs = [root] if root.tag == tag else list(root.iter(tag))
    if not docs:
        result.errors.append(PatentParseError(source, f"no {tag} element (root is {root.tag!r})"))
    for index, doc in enumerate(docs, start=1):
        _collect(result, source, index, build, doc)
    return result


class _Failed(Exception):
    def __init__(self, patent_id: str | None, reason: str) -> None:
        super().__init__(reason)
        self.patent_id = patent_id
        self.reason = reason


def _collect(
    result: ParseResult, source: str, index: int, build: _Builder, doc: ET.Element
) -> None:
    try:
        result.patents.append(build(doc, source))
    except _Failed as exc:
        result.errors.append(
            PatentParseError(
                source,
                exc.reason,
                document=index,
                patent_id=exc.patent_id,
                raw=ET.tostring(doc),
            )
        )


def _make(patent_id: str | None, **fields: object) -> Patent:
    """Build the message, turning a missing field or a validation error into one line."""
    for name, label in (
        ("title", "no invention-title"),
        ("publication_date", "no publication date"),
    ):
        if not fields.get(name):
            raise _Failed(patent_id, label)
    try:
        return Patent.model_validate({"patent_id": patent_id, **fields})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise _Failed(patent_id, f"invalid {loc}: {first['msg']}") from None


def _text(el: ET.Element | None) -> str:
    """All text below ``el``, whitespace collapsed (claims and abstracts nest markup)."""
    if el is None:
        return ""
    return " ".join("".join(el.itertext()).split())


def _child_text(el: ET.Element | None, path: str) -> str:
    return _text(el.find(path)) if el is not None else ""


def _date(value: str) -> date | None:
    value = value.strip()
    if not re.fullmatch(r"\d{8}", value) or value.endswith("0000"):
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def _unique(items: Iterable[str]) -> list[str]:
    # Case-insensitive: OPS lists the same party as "9SOLUTIONS OY" and "9Solutions Oy".
    seen: dict[str, str] = {}
    for item in items:
        if item and item.casefold() not in seen:
            seen[item.casefold()] = item
    return list(seen.values())


def _doc_number(country: str, number: str) -> str:
    number = number.strip().replace(" ", "")
    if country and number.startswith(country):
        # USPTO citations repeat the country: <country>WO</country><doc-number>WO2009/157308.
        number = number[len(country) :]
    if country in ("US", "WO"):
        # Citations write US applications as 2019/0267171 and WO ones as 2009/157308.
        number = number.replace("/", "")
        match = _US_NUMBER.match(number)
        if match:
            return match.group(1) + match.group(2)
    return number


def _patent_id(country: str, number: str, kind: str) -> str | None:
    if not (country and number and kind):
        return None
    return f"{country}-{number}-{kind}"


def _symbol(el: ET.Element) -> str:
    """A CPC/IPC symbol from its parts: section class subclass main-group / subgroup."""
    parts = [_child_text(el, "section"), _child_text(el, "class"), _child_text(el, "subclass")]
    group, subgroup = _child_text(el, "main-group"), _child_text(el, "subgroup")
    if not all(parts) or not group:
        text = _child_text(el, "text") or _text(el)
        return _symbol_from_text(text)
    return "".join(parts) + group + "/" + (subgroup or "00")


def _symbol_from_text(text: str) -> str:
    match = _IPC_TEXT.match(text)
    if not match:
        return ""
    return re.sub(r"\s", "", match.group(1)) + match.group(2) + "/" + match.group(3)


def _citations(refs: Iterable[ET.Element]) -> tuple[list[str], int]:
    patents: list[str] = []
    npl = 0
    for citation in refs:
        npl += len(citation.findall("nplcit"))
        for patcit in citation.findall("patcit"):
            ids = patcit.findall("document-id")
            # OPS gives docdb and epodoc forms of the same document: prefer docdb.
            chosen = next(
                (d for d in ids if d.get("document-id-type") == "docdb"),
                ids[0] if ids else None,
            )
            if chosen is None:
                continue
            country = _child_text(chosen, "country")
            number = _doc_number(country, _child_text(chosen, "doc-number"))
            kind = _child_text(chosen, "kind")
            if not number:
                continue
            cite = f"{country}-{number}" if country else number
            patents.append(f"{cite}-{kind}" if kind else cite)
    return patents, npl


def _person(el: ET.Element) -> str:
    book = el.find("addressbook")
    base = book if book is not None else el
    org = _child_text(base, "orgname")
    if org:
        return org
    name = _child_text(base, "name")
    if name:
        return _NAME_TRAILER.sub("", name)
    first, last = _child_text(base, "first-name"), _child_text(base, "last-name")
    return " ".join(p for p in (first, last) if p)


def _lang_pick(elements: list[ET.Element], lang: str = "en") -> ET.Element | None:
    for el in elements:
        if el.get("lang", "").lower() == lang:
            return el
    return elements[0] if elements else None


def _earliest(dates: Iterable[date | None]) -> date | None:
    known = [d for d in dates if d is not None]
    return min(known) if known else None


# --------------------------------------------------------------------------- USPTO


def _uspto_patent(root: ET.Element, source: str) -> Patent:
    if root.tag not in ("us-patent-grant", "us-patent-application"):
        raise _Failed(None, f"root element is {root.tag!r}, not us-patent-grant/application")
    bib = root.find("us-bibliographic-data-grant")
    if bib is None:
        bib = root.find("us-bibliographic-data-application")
    if bib is None:
        raise _Failed(None, "no us-bibliographic-data element")
    pub = bib.find("publication-reference/document-id")
    country = _child_text(pub, "country")
    number = _doc_number(country, _child_text(pub, "doc-number"))
    kind = _child_text(pub, "kind")
    patent_id = _patent_id(country, number, kind)
    if patent_id is None:
        raise _Failed(None, "no publication-reference country/doc-number/kind")

    cpc = _unique(
        _symbol(c)
        for c in bib.findall("classifications-cpc/*/classification-cpc")
        # v4.0-4.2 grants have no classifications-cpc; older files carry none.
    )
    ipc = _unique(_symbol(c) for c in bib.findall("classifications-ipcr/classification-ipcr"))

    parties = bib.find("us-parties")
    if parties is None:
        parties = bib.find("parties")
    applicants: list[str] = []
    inventors: list[str] = []
    if parties is not None:
        applicants = _unique(
            _person(a)
            for a in parties.findall("./*/us-applicant") + parties.findall("./*/applicant")
        )
        inventors = _unique(_person(i) for i in parties.findall("inventors/inventor"))
        if not inventors:
            # Before v4.3 the inventors are applicants with app-type="applicant-inventor".
            inventors = _unique(
                _person(a)
                for a in parties.findall("./*/applicant")
                if a.get("app-type") == "applicant-inventor"
            )
    if not applicants:
        applicants = _unique(_person(a) for a in bib.findall("assignees/assignee"))

    refs = bib.findall("us-references-cited/us-citation") + bib.findall("references-cited/citation")
    citations, npl = _citations(refs)

    return _make(
        patent_id,
        office=PatentOffice.USPTO,
        country=country,
        doc_number=number,
        kind=kind,
        title=_child_text(bib, "invention-title"),
        abstract=_child_text(root, "abstract"),
        claims=[_text(c) for c in root.findall("claims/claim")],
        cpc=cpc,
        ipc=ipc,
        applicants=applicants,
        inventors=inventors,
        publication_date=_date(_child_text(pub, "date")) or _date(root.get("date-publ", "")),
        filing_date=_date(_child_text(bib, "application-reference/document-id/date")),
        priority_date=_earliest(
            _date(_text(d)) for d in bib.findall("priority-claims/priority-claim/date")
        ),
        citations=citations,
        non_patent_citations=npl,
        language=(root.get("lang") or "").lower() or None,
        source=source,
    )


# --------------------------------------------------------------------------- EPO OPS


def _epo_patent(doc: ET.Element, source: str) -> Patent:
    bib = doc.find("bibliographic-data")
    docdb = None
    if bib is not None:
        ids = bib.findall("publication-reference/document-id")
        docdb = next((d for d in ids if d.get("document-id-type") == "docdb"), None)
    country = doc.get("country") or _child_text(docdb, "country")
    number = _doc_number(country, doc.get("doc-number") or _child_text(docdb, "doc-number"))
    kind = doc.get("kind") or _child_text(docdb, "kind")
    patent_id = _patent_id(country, number, kind)
    if patent_id is None:
        raise _Failed(None, "no country/doc-number/kind")
    if doc.get("status"):
        # OPS answers a multi-document request with status="not found" stubs.
        raise _Failed(patent_id, f"OPS status {doc.get('status')!r}")
    if bib is None:
        raise _Failed(patent_id, "no bibliographic-data")

    pub_dates = [
        _date(_child_text(d, "date")) for d in bib.findall("publication-reference/document-id")
    ]
    title_el = _lang_pick(bib.findall("invention-title"))
    title_lang = (title_el.get("lang", "") if title_el is not None else "").lower()

    cpc = _unique(
        _symbol(c)
        for c in bib.findall("patent-classifications/patent-classification")
        if _scheme(c).startswith("CPC")
    )
    ipc = _unique(
        _symbol_from_text(_child_text(c, "text"))
        for c in bib.findall("classifications-ipcr/classification-ipcr")
    )
    applicants = _epo_names(bib.findall("parties/applicants/applicant"), "applicant-name")
    inventors = _epo_names(bib.findall("parties/inventors/inventor"), "inventor-name")
    citations, npl = _citations(bib.findall("references-cited/citation"))

    return _make(
        patent_id,
        office=PatentOffice.EPO,
        country=country,
        doc_number=number,
        kind=kind,
        title=_text(title_el),
        abstract=_text(_lang_pick(doc.findall("abstract"))),
        cpc=cpc,
        ipc=ipc,
        applicants=applicants,
        inventors=inventors,
        publication_date=next((d for d in pub_dates if d), None),
        filing_date=_earliest(
            _date(_text(d)) for d in bib.findall("application-reference/document-id/date")
        ),
        priority_date=_earliest(
            _date(_text(d)) for d in bib.findall("priority-claims/priority-claim/document-id/date")
        ),
        citations=citations,
        non_patent_citations=npl,
        # "ol" is OPS for "original language", which it does not name.
        language=title_lang
        if re.fullmatch(r"[a-z]{2}", title_lang) and title_lang != "ol"
        else None,
        source=source,
    )


def _scheme(classification: ET.Element) -> str:
    scheme = classification.find("classification-scheme")
    return scheme.get("scheme", "") if scheme is not None else ""


def _epo_names(people: list[ET.Element], name_tag: str) -> list[str]:
    # Each party comes twice: "original" (as filed: "SIEMENS GAMESA RENEWABLE
    # ENERGY A/S") and "epodoc" (normalised, with a country: "9SOLUTIONS OY
    # [FI]"). The original is what a reader recognises; epodoc is the fallback.
    for wanted in ("original", "epodoc"):
        names = _unique(
            _NAME_TRAILER.sub("", _child_text(p, f"{name_tag}/name"))
            for p in people
            if p.get("data-format") == wanted
        )
        if names:
            return names
    return _unique(_NAME_TRAILER.sub("", _child_text(p, f"{name_tag}/name")) for p in people)


# --------------------------------------------------------------------------- WIPO ST.36


def _wipo_patent(doc: ET.Element, source: str) -> Patent:
    bib = doc.find("bibliographic-data")
    pub = bib.find("publication-reference/document-id") if bib is not None else None
    country = _child_text(pub, "country") or doc.get("country", "")
    number = _doc_number(country, _child_text(pub, "doc-number") or doc.get("doc-number", ""))
    kind = _child_text(pub, "kind") or doc.get("kind", "")
    patent_id = _patent_id(country, number, kind)
    if patent_id is None:
        raise _Failed(None, "no publication-reference country/doc-number/kind")
    if bib is None:
        raise _Failed(patent_id, "no bibliographic-data")

    ipc = _unique(
        [_symbol(c) for c in bib.iter("classification-ipcr")]
        + [
            _symbol_from_text(_text(c))
            for c in _iter_paths(
                bib,
                "classification-ipc/main-classification",
                "classification-ipc/further-classification",
            )
        ]
    )
    cpc = _unique(_symbol(c) for c in bib.iter("classification-cpc"))
    citations, npl = _citations(
        list(_iter_paths(bib, "references-cited/citation"))
        + list(_iter_paths(doc, "search-report-data/srep-citations/citation"))
    )
    title_el = _lang_pick(bib.findall("invention-title"))
    lang = doc.get("lang") or (title_el.get("lang") if title_el is not None else None)

    return _make(
        patent_id,
        office=PatentOffice.WIPO,
        country=country,
        doc_number=number,
        kind=kind,
        title=_text(title_el),
        abstract=_text(_lang_pick(doc.findall("abstract"))),
        claims=[_text(c) for c in _lang_pick_claims(doc)],
        cpc=cpc,
        ipc=ipc,
        applicants=_unique(_person(a) for a in bib.findall("parties/applicants/applicant")),
        inventors=_unique(_person(i) for i in bib.findall("parties/inventors/inventor")),
        publication_date=_date(_child_text(pub, "date")) or _date(doc.get("date-publ", "")),
        filing_date=_date(_child_text(bib, "application-reference/document-id/date")),
        priority_date=_earliest(
            _date(_text(d)) for d in bib.findall("priority-claims/priority-claim/date")
        ),
        citations=citations,
        non_patent_citations=npl,
        language=lang.lower() if lang else None,
        source=source,
    )


def _lang_pick_claims(doc: ET.Element) -> list[ET.Element]:
    # A WO pamphlet may hold the claims in the filing language and a translation.
    sets = doc.findall("claims")
    chosen = _lang_pick(sets)
    return chosen.findall("claim") if chosen is not None else []


def _iter_paths(el: ET.Element, *paths: str) -> Iterator[ET.Element]:
    for path in paths:
        yield from el.findall(path)


# --------------------------------------------------------------------------- to Kafka


@dataclass
class PublishStats:
    patents_sent: int = 0
    dead_lettered: int = 0


async def publish(settings: Settings, results: Iterable[ParseResult]) -> PublishStats:
    """Send each parsed patent to the patents topic (keyed by its id) and each document
    that could not be read to the dead-letter topic, with its reason and its bytes."""
    from pipeline import codec, kafka, topics
    from pipeline.schemas import dead_letter

    stats = PublishStats()
    patents_topic = settings.topic(topics.PATENTS)
    letters_topic = settings.topic(topics.DEAD_LETTERS)
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for result in results:
            for patent in result.patents:
                await producer.send_and_wait(
                    patents_topic, codec.encode(patent), key=patent.patent_id.encode()
                )
                stats.patents_sent += 1
            for error in result.errors:
                letter = dead_letter(
                    raw=error.raw,
                    reason=str(error),
                    error_type="PatentParseError",
                    component=__name__,
                    source_topic=patents_topic,
                    key=(error.patent_id or error.source).encode(),
                )
                await producer.send_and_wait(
                    letters_topic, codec.encode(letter), key=patents_topic.encode()
                )
                stats.dead_lettered += 1
    finally:
        await producer.stop()
    return stats
