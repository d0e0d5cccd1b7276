"""Deep-tech patent watch: watchlists, a scientific-validity score, a market class, alerts.

A :class:`~pipeline.schemas.Patent` is scored by :func:`score` and, if it is a
credible match of a watchlist, turned into an ``alert_type="patent"``
:class:`~pipeline.schemas.Alert` by :func:`alert_for`. Plain Python, no Faust
import; everything here is a pure function of the record and the settings.

**Watchlists** (:class:`Watchlist`, ``[[patents.watchlists]]``) match a patent by
a CPC/IPC prefix (``G21B``, ``H01F6``, ``H01M10/0562``) or by a keyword in the
title, abstract or claims. Keywords are case-insensitive and word-boundary
aware (``LENR`` does not match ``glenrock``); a space or hyphen in a keyword
matches a space, a hyphen or nothing (``over-unity`` matches ``overunity``), and
a plural ``s``/``es``/``ies`` is accepted. Defaults (:data:`DEFAULT_WATCHLISTS`):

* ``fusion`` (breakthrough): CPC G21B1 (thermonuclear fusion reactors: G21B1/05
  magnetic confinement, G21B1/057 tokamaks), G21D (nuclear power plant); tokamak,
  stellarator, plasma confinement, nuclear fusion, fusion reactor... but not the bare
  word "fusion" (fusion splicing, welding and bonding are everywhere);
* ``solid_state_battery`` (breakthrough): H01M10/0562 (solid inorganic electrolytes),
  H01M10/0565 (polymeric), H01M2300/0065 and /0068 (indexing: solid electrolytes);
  solid electrolyte, solid-state battery, all-solid-state, LLZO, argyrodite... but
  not H01M10/052 alone, which is every lithium-ion cell;
* ``superconducting_magnet`` (breakthrough): H01F6 (superconducting magnets and
  coils), H01B12 (superconductive conductors and cables); REBCO, HTS tape, Nb3Sn...;
* ``fringe`` (watched, never a breakthrough): G21B3 ("low temperature nuclear
  fusion reactors, e.g. alleged cold fusion reactors"), H02K53 ("alleged
  dynamo-electric perpetua mobilia"), F03G7/10 ("alleged perpetua mobilia"),
  H02N11/008 (alleged electric or magnetic perpetua mobilia); cold
  fusion, LENR, zero point energy, over-unity, perpetual motion, free energy
  generator ("free energy" alone is Gibbs' and Helmholtz's).

**Validity** (0-100) is the sum of the factors below, clamped to [0, 100]. Every
factor is always present in :attr:`PatentScore.factors`, with its signed points
and a one-line reason, so an alert can say exactly why it fired. The points are
round numbers chosen by argument, not fitted to any data set:

====================  =========================  ===============================================
factor                points                     why
====================  =========================  ===============================================
base                  +50                        a publication proves nothing either way
red_flags             -40 per physics red flag   a claim against conservation of energy or the
                                                 second law is not rescued by anything else
red_flag_cap          down to 30 at most         with a red flag, polish (citations, numbers,
                                                 a grant) must not lift the score past 30
red_flag_cpc          -25                        classified in a scheme's own "alleged" group
                                                 (G21B3 cold fusion; H02K53, F03G7/10 and
                                                 H02N11/008 perpetua mobilia); G21B3/004
                                                 muon-catalysed fusion, real physics, is exempt
class_consistency     +10 all / +5 some / -10    do the claims use the vocabulary of the
                      none / 0 unknown           classes' fields (:data:`CLASS_TERMS`)?
                                                 classes unrelated to the claims suggest
                                                 misclassification or borrowed credibility
patent_citations      +2 each, at most +10       engaging with prior art
literature_citations  +3 each, at most +15       engaging with the scientific literature
specificity           +3 per quantity with a     claims an examiner or a lab could check;
                      unit, +2 per material,     ``-5`` when the record has no claim text
                      at most +15; -5 no claims  (less evidence, less credibility)
vague_language        -5 per hype term,          "unlimited", "inexhaustible", "revolutionary"
                      at most -15                belong to marketing, not to claims
examination           +10 grant / 0 otherwise    a grant (kind B*, or a US reissue E) passed
                                                 substantive examination; applications and
                                                 utility models have not
====================  =========================  ===============================================

Physics red flags (:data:`RED_FLAGS`), searched in the title, abstract and claims:
over-unity or an efficiency above 100 %, more energy out than in, perpetual
motion, free-energy devices, zero-point/vacuum energy extraction, cold fusion /
LENR / excess heat from loaded deuterium, anti-gravity or reactionless drives, and
claims to violate or overcome the laws of thermodynamics or conservation of energy.
The patterns are deliberately narrow where the words have honest uses: "Gibbs free
energy" and "surface free energy" are chemistry, "excess heat" is a cooling problem
unless it comes from deuterium in palladium or nickel, and a heat pump's COP above 1
is not over-unity (only "efficiency" above 100 % is, and not "quantum efficiency",
which multiple exciton generation really lifts above 100 %); "without violating the
second law" is not a claim to violate it. A fusion gain Q > 1 is energy released by
fuel, and is not phrased as "more energy out than in". Other negations ("unlike
perpetual motion machines") are not understood: such text in a claim is rare.

**Market class**:

* ``NOISE`` if validity < 40 or any physics red flag;
* ``DISRUPTIVE`` if validity >= 70, a *breakthrough* watchlist matched (fusion,
  solid-state batteries, superconducting magnets) and the claims are
  *fundamental*: at least one independent claim names the watched technology
  itself (contains one of that watchlist's keywords: "A tokamak comprising...",
  not "A bracket for a sensor") and there are at least two independent claims
  (protection in more than one category, e.g. a device and a method);
* ``INCREMENTAL`` otherwise.

**Alerts**: when validity >= ``min_score_to_alert``, a watchlist matched and the
class is not NOISE; ``warning`` for DISRUPTIVE, ``info`` for INCREMENTAL. The id is
``stable_id("alert", site, "patent", patent_id)``: the same on every rerun, and
distinct for two patents published on the same day (``incident_id`` keys on the
start instant, which here is only a date).

Example alert (abridged)::

    {"alert_id": "alert-5b1e...", "site": "deeptech-watch", "alert_type": "patent",
     "severity": "warning", "subject": "US-11289658-B2: High-field tokamak magnet ...",
     "start": "2024-05-07T00:00:00Z", "observed": 100.0, "expected": 70.0,
     "details": {"validity": 100.0, "market": "DISRUPTIVE", "watchlists": "fusion",
                 "factor_base": 50.0, "reason_base": "...", "factor_red_flags": 0.0,
                 "red_flags": "", ...}}
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from pipeline.schemas import Alert, Identifier, Patent, Severity, stable_id
from pipeline.settings import Settings, repeated, validate_section
from processors.alerting import DetailValue, firing

if TYPE_CHECKING:
    import faust

ALERT_TYPE = "patent"

Market = Literal["DISRUPTIVE", "INCREMENTAL", "NOISE"]

# Points of each factor (see the module docstring for the reasoning).
BASE_POINTS = 50.0
RED_FLAG_POINTS = -40.0
RED_FLAG_CAP = 30.0
RED_FLAG_CPC_POINTS = -25.0
CONSISTENT_ALL_POINTS = 10.0
CONSISTENT_SOME_POINTS = 5.0
CONSISTENT_NONE_POINTS = -10.0
PATENT_CITATION_POINTS = 2.0
PATENT_CITATION_MAX = 10.0
LITERATURE_CITATION_POINTS = 3.0
LITERATURE_CITATION_MAX = 15.0
QUANTITY_POINTS = 3.0
MATERIAL_POINTS = 2.0
SPECIFICITY_MAX = 15.0
NO_CLAIMS_POINTS = -5.0
VAGUE_POINTS = -5.0
VAGUE_MAX = -15.0
GRANT_POINTS = 10.0

NOISE_BELOW = 40.0
DISRUPTIVE_FROM = 70.0
# Two categories (device and method, say) is the usual mark of a broad family;
# one independent claim is the usual mark of an improvement to a known thing.
FUNDAMENTAL_MIN_INDEPENDENT = 2

# A CPC/IPC symbol without spaces: subclass (G21B), optionally a main group (1)
# and a subgroup (/05). Settings may write "G21B 1/05"; spaces are removed first.
_CPC_RE = re.compile(r"^[A-HY][0-9]{2}[A-Z](?:[0-9]{1,4}(?:/[0-9]{1,6})?)?$")


def _normalise_cpc(symbol: str) -> str:
    return re.sub(r"\s+", "", symbol).upper()


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Watchlist(_Config):
    """One watched technology: CPC/IPC prefixes and keywords, either one matches."""

    name: Identifier
    """Shown in alerts (``details["watchlists"]``) and on the dashboard."""
    keywords: list[Annotated[str, StringConstraints(strip_whitespace=True, min_length=2)]] = Field(
        default_factory=list
    )
    """Matched in title, abstract and claims; case-insensitive, whole words."""
    cpc: list[str] = Field(default_factory=list)
    """CPC or IPC prefixes: a subclass (``G21B``), a main group (``H01F6``, which does
    not match ``H01F60``) or a subgroup (``H01M10/05``, matching ``H01M10/0562``)."""
    breakthrough: bool = False
    """A match may be DISRUPTIVE (fusion, solid-state, superconducting magnets);
    ``false`` for lists watched for other reasons, like the fringe list."""

    @field_validator("cpc")
    @classmethod
    def _valid_cpc(cls, value: list[str]) -> list[str]:
        out = []
        for symbol in value:
            norm = _normalise_cpc(symbol)
            if not _CPC_RE.match(norm):
                raise ValueError(f"{symbol!r} is not a CPC/IPC symbol or prefix, e.g. 'G21B1/05'")
            out.append(norm)
        return out

    @model_validator(mode="after")
    def _not_empty(self) -> Watchlist:
        if not self.keywords and not self.cpc:
            raise ValueError(f"watchlist {self.name!r} needs keywords or cpc (it has neither)")
        return self


DEFAULT_WATCHLISTS: tuple[Watchlist, ...] = (
    # CPC G21B: fusion reactors (G21B1 thermonuclear, G21B1/05 magnetic confinement,
    # G21B1/057 tokamaks); G21D: nuclear power plant (G21D7 direct conversion).
    # The bare word "fusion" is left out on purpose: fusion splicing, welding and
    # bonding would flood the list.
    Watchlist(
        name="fusion",
        cpc=["G21B1", "G21D"],
        keywords=[
            "nuclear fusion",
            "fusion reactor",
            "fusion power plant",
            "fusion plasma",
            "thermonuclear",
            "tokamak",
            "stellarator",
            "plasma confinement",
            "magnetic confinement",
            "inertial confinement",
            "deuterium-tritium",
            "breeding blanket",
            "divertor",
        ],
        breakthrough=True,
    ),
    # H01M10/0562: Li accumulators with solid inorganic electrolytes; H01M10/0565:
    # polymeric (gel or solid); H01M2300/0065, /0068: indexing "solid electrolytes".
    # H01M10/052 (all Li accumulators) alone is not enough: it is every Li-ion cell.
    Watchlist(
        name="solid_state_battery",
        cpc=["H01M10/0562", "H01M10/0565", "H01M2300/0065", "H01M2300/0068"],
        keywords=[
            "solid electrolyte",
            "solid-state battery",
            "solid-state electrolyte",
            "all-solid-state",
            "solid polymer electrolyte",
            "sulfide electrolyte",
            "garnet electrolyte",
            "LLZO",
            "argyrodite",
        ],
        breakthrough=True,
    ),
    # H01F6: superconducting magnets and coils; H01B12: superconductive conductors,
    # cables and transmission lines.
    Watchlist(
        name="superconducting_magnet",
        cpc=["H01F6", "H01B12"],
        keywords=[
            "superconducting magnet",
            "superconducting coil",
            "HTS magnet",
            "HTS tape",
            "REBCO",
            "YBCO",
            "Nb3Sn",
            "high-temperature superconductor",
            "high-temperature superconducting",
            "quench detection",
        ],
        breakthrough=True,
    ),
    # Watched so the dashboard shows what the fringe files, never to alert on it:
    # G21B3 "low temperature nuclear fusion reactors, e.g. alleged cold fusion
    # reactors"; H02K53 "alleged dynamo-electric perpetua mobilia"; F03G7/10
    # "alleged perpetua mobilia"; H02N11/008 alleged electric or magnetic perpetua
    # mobilia (title from memory of the scheme, not checked against the published
    # scheme here). "free energy" alone is chemistry (Gibbs), so the
    # keyword needs a device noun.
    Watchlist(
        name="fringe",
        cpc=["G21B3", "H02K53", "F03G7/10", "H02N11/008"],
        keywords=[
            "cold fusion",
            "low energy nuclear reaction",
            "LENR",
            "zero point energy",
            "vacuum energy",
            "free energy generator",
            "free energy device",
            "free energy machine",
            "over-unity",
            "perpetual motion",
            "anti-gravity",
        ],
        breakthrough=False,
    ),
)


class PatentWatchSettings(_Config):
    """The ``[patents]`` section: which site the alerts belong to and what is watched."""

    site: Identifier
    """The alerts' ``site`` (the watch is not a physical site; any id, e.g. ``deeptech``)."""
    watchlists: list[Watchlist] = Field(default_factory=lambda: list(DEFAULT_WATCHLISTS))
    """Defaults: fusion, solid_state_battery, superconducting_magnet, fringe."""
    min_score_to_alert: Annotated[float, Field(ge=0.0, le=100.0)] = 70.0
    """Validity from which a watched, non-NOISE patent raises an alert. [0-100]"""
    red_flag_cpc: list[str] = Field(
        default_factory=lambda: ["G21B3", "H02K53", "F03G7/10", "H02N11/008"]
    )
    """Classes of alleged effects: a match costs ``RED_FLAG_CPC_POINTS``."""
    red_flag_cpc_exempt: list[str] = Field(default_factory=lambda: ["G21B3/004"])
    """Inside ``red_flag_cpc`` but real physics: G21B3/004 is muon-catalysed fusion."""

    @field_validator("red_flag_cpc", "red_flag_cpc_exempt")
    @classmethod
    def _valid_cpc(cls, value: list[str]) -> list[str]:
        out = []
        for symbol in value:
            norm = _normalise_cpc(symbol)
            if not _CPC_RE.match(norm):
                raise ValueError(f"{symbol!r} is not a CPC/IPC symbol or prefix, e.g. 'G21B3'")
            out.append(norm)
        return out

    @field_validator("watchlists")
    @classmethod
    def _unique_names(cls, value: list[Watchlist]) -> list[Watchlist]:
        names = [w.name for w in value]
        duplicates = repeated(names)
        if duplicates:
            raise ValueError(f"watchlist names must be unique, repeated: {duplicates}")
        return value


@dataclass(frozen=True)
class Factor:
    """One explainable contribution to validity."""

    name: str
    points: float
    reason: str


@dataclass(frozen=True)
class PatentScore:
    """What :func:`score` found about one patent."""

    watchlists: list[str]
    """Names of the watchlists matched, in settings order."""
    validity: float
    """Sum of the factors' points, clamped. [0-100]"""
    factors: list[Factor]
    market: Market
    market_reason: str
    red_flags: list[str] = field(default_factory=list)
    """Names of the physics red flags found."""
    independent_claims: int = 0
    fundamental: bool = False


# --- text matching ----------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive; a space/hyphen matches space, hyphen or nothing."""
    words = [w for w in re.split(r"[\s\-]+", keyword.strip()) if w]
    last = words[-1]
    # Plurals: tokamaks, batteries, electrolytes.
    if last.lower().endswith("y"):
        words[-1] = re.escape(last[:-1]) + "(?:y|ies)"
    else:
        words[-1] = re.escape(last) + "(?:s|es)?"
    body = r"[\s\-]*".join([re.escape(w) for w in words[:-1]] + [words[-1]])
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class RedFlag:
    """A physics red flag: a pattern, and optionally a context it needs."""

    name: str
    pattern: re.Pattern[str]
    requires: re.Pattern[str] | None = None
    """The flag counts only if the text also matches this (e.g. deuterium for excess heat)."""


_I = re.IGNORECASE
_SEP = r"[\s\-]*"
# Not "quantum efficiency": above 100 % is real physics there (one photon can make two
# excitons by singlet fission or multiple exciton generation).
_EFFICIENCY = r"(?<!quantum )efficienc\w*\s+(?:of\s+|is\s+)?"
# A percentage above 100 (101..999, or four digits and more).
_OVER_100 = r"(?:1[0-9][1-9]|1[1-9][0-9]|[2-9][0-9]{2}|[0-9]{4,})(?:\.[0-9]+)?"
RED_FLAGS: tuple[RedFlag, ...] = (
    RedFlag(
        "over-unity",
        re.compile(
            rf"over{_SEP}unity"
            rf"|{_EFFICIENCY}(?:greater\s+than|above|exceeding|in\s+excess\s+of|more\s+than|over)"
            r"\s+(?:100|one\s+hundred)\s*(?:%|percent|per\s+cent)"
            rf"|{_EFFICIENCY}(?:about\s+)?{_OVER_100}\s*(?:%|percent)",
            _I,
        ),
    ),
    RedFlag(
        "more energy out than in",
        re.compile(
            # Only a few filler words after "than", so "more power than earlier designs in
            # cars" is not read as "more power than in".
            r"more\s+(?:\w+\s+)?(?:energy|power)\s+out\s+than\s+(?:is\s+|was\s+)?(?:put\s+)?in\b"
            r"|more\s+(?:\w+\s+){0,2}?(?:energy|power|output)\s+than\s+"
            r"(?:(?:the|is|was|it|its|are)\s+){0,2}(?:\w+\s+)?(?:input|supplied|consumed|put\s+in)\b"
            r"|more\s+(?:\w+\s+){0,2}?(?:energy|power|output)\s+than\s+(?:it|they)\s+"
            r"(?:receives?|consumes?|absorbs?|draws?|takes?)\b"
            # "an output of at least 300 % of its input"
            r"|(?:output|deliver|produc|generat)\w*\s+(?:\w+\s+){0,4}?(?:at\s+least\s+|about\s+)?"
            rf"{_OVER_100}\s*%\s+of\s+(?:its|the)\s+(?:\w+\s+)?input"
            r"|(?:output|generated|produced)\s+(?:energy|power)\s+(?:that\s+|which\s+)?"
            r"(?:exceeds|exceeding|greater\s+than|larger\s+than|higher\s+than|more\s+than)\s+"
            r"(?:the\s+|its\s+)?(?:energy\s+|power\s+)?(?:input|supplied|consumed)",
            _I,
        ),
    ),
    RedFlag(
        "perpetual motion",
        re.compile(
            r"perpetu\w*\s+motion|perpetuum\s+mobile|perpetua\s+mobilia"
            r"|(?:runs?|running|operat\w*|turn\w*|rotat\w*)\s+perpetually"
            r"|(?:indefinitely|forever|perpetually)[\s,]+without\s+(?:any\s+)?(?:external\s+)?"
            r"(?:energy|power|fuel|input)",
            _I,
        ),
    ),
    RedFlag(
        "free energy",
        re.compile(
            r"(?<!gibbs )(?<!helmholtz )(?<!surface )(?<!activation )"
            rf"\bfree{_SEP}energy\s+(?:generator|device|machine|source|system|motor|engine|"
            r"extraction|converter|apparatus)"
            rf"|(?:produc|generat|deliver|extract)\w*\s+free{_SEP}energy\b",
            _I,
        ),
    ),
    RedFlag(
        "zero-point energy extraction",
        re.compile(
            r"(?:extract|harvest|tap|convert|generat|produc|draw)\w*\s+(?:\w+\s+){0,3}?"
            rf"(?:zero{_SEP}point\s+(?:energy|field|fluctuations?)|(?:quantum\s+)?vacuum\s+energy)"
            rf"|(?:zero{_SEP}point|quantum\s+vacuum)\s+energy\s+(?:\w+\s+)?"
            r"(?:extract\w*|harvest\w*|generator|converter|device|source)",
            _I,
        ),
    ),
    RedFlag(
        "cold fusion",
        re.compile(rf"cold{_SEP}fusion|low{_SEP}energy\s+nuclear\s+reactions?|\blenrs?\b", _I),
    ),
    RedFlag(
        "excess heat",
        re.compile(
            r"(?:produc|generat|releas|yield|exhibit|obtain)\w*\s+(?:\w+\s+){0,3}?"
            r"(?:excess|anomalous)\s+(?:heat|energy|enthalpy|power)",
            _I,
        ),
        # Excess heat alone is what a cooling system removes; from deuterium in a
        # metal lattice it is the Fleischmann-Pons claim.
        requires=re.compile(
            rf"deuter\w*|palladium|heavy\s+water|hydrogen{_SEP}loaded|nickel{_SEP}hydrogen", _I
        ),
    ),
    RedFlag(
        "anti-gravity",
        re.compile(
            rf"anti{_SEP}gravit\w*|gravity\s+shield\w*|reactionless\s+(?:drive|thrust\w*|propulsion)",
            _I,
        ),
    ),
    RedFlag(
        "violates thermodynamics",
        re.compile(
            # "without violating the second law" is a careful applicant, not a red flag.
            r"(?<!not )(?<!without )(?<!never )"
            r"(?:violat|overcom|circumvent|defy|defies|break|contrary\s+to|beyond)\w*\s+"
            r"(?:\w+\s+){0,3}?(?:laws?|principles?|limits?|constraints?)\s+of\s+(?:the\s+)?"
            r"(?:conservation\s+of\s+energy|thermodynamics)",
            _I,
        ),
    ),
)

# Vocabulary of each class's field, matched as word stems in the claims. Longest
# prefix wins. Small on purpose: it only needs to tell a tokamak claim filed under
# G21B from a wheel of magnets filed under G21B.
CLASS_TERMS: dict[str, tuple[str, ...]] = {
    "G21B": (
        "plasma",
        "fusion",
        "tokamak",
        "stellarator",
        "deuterium",
        "tritium",
        "confinement",
        "neutron",
        "blanket",
        "divertor",
        "toroidal",
        "poloidal",
        "ignition",
        "pellet",
    ),
    "G21D": ("reactor", "nuclear", "turbine", "coolant", "heat exchanger", "steam"),
    "H01M": (
        "electrode",
        "cathode",
        "anode",
        "electrolyte",
        "lithium",
        "sodium",
        "battery",
        "cell",
        "separator",
        "current collector",
    ),
    "H01F": (
        "coil",
        "winding",
        "magnet",
        "superconduct",
        "conductor",
        "tape",
        "quench",
        "cryo",
        "critical current",
    ),
    "H01B12": (
        "superconduct",
        "conductor",
        "tape",
        "wire",
        "cable",
        "rebco",
        "ybco",
        "nb3sn",
        "nbti",
        "substrate",
        "critical current",
    ),
    "H02K": ("rotor", "stator", "winding", "magnet", "shaft", "armature", "coil"),
    "F03G": ("weight", "spring", "wheel", "buoyan", "gravit", "float", "lever", "magnet"),
    "H05H": ("plasma", "ion", "beam", "electrode", "discharge", "accelerat"),
}

# Units worth a "quantity": what makes a claim measurable. Case-sensitive where
# case is the unit (T tesla vs t tonne is moot here; mA vs MA is not).
_QUANTITY_RE = re.compile(
    r"(?<![\w.])\d+(?:[.,]\d+)?\s*(?:x\s*10\^?-?\d+\s*)?"
    r"(?:keV|MeV|eV|mS/cm|S/cm|Wh/kg|Wh/L|mAh/g|mAh|kA|MA|mA|A/mm2|A/mm²|kV|MV|mV|V|MW|kW|GW|W|"
    r"T|K|°C|°|MPa|GPa|kPa|Pa|bar|mm|µm|um|nm|cm|m3|m²|m2|m|kg|mg|g|wt\s*%|at\s*%|mol\s*%|%|"
    r"ppm|ms|µs|s|Hz|kHz|MHz|GHz|rpm|h)(?![\w/])"
)

# Materials: chemical formulas with at least two elements and a count, and named
# materials of the watched fields.
_FORMULA_RE = re.compile(
    r"\b(?:[A-Z][a-z]?\d*(?:\.\d+)?){2,}\b",
)
# Element symbols up to bismuth, written run together and split by their capitals.
_ELEMENT_SYMBOLS = frozenset(
    re.findall(
        r"[A-Z][a-z]?",
        "HHeLiBeBCNOFNeNaMgAlSiPSClArKCaScTiVCrMnFeCoNiCuZnGaGeAsSeBrKrRbSrYZrNbMoTcRuRhPdAg"
        "CdInSnSbTeIXeCsBaLaCePrNdPmSmEuGdTbDyHoErTmYbLuHfTaWReOsIrPtAuHgTlPbBi",
    )
)
_MATERIAL_NAMES = re.compile(
    r"\b(?:tungsten|beryllium|lithium|deuterium|tritium|niobium|vanadium|copper|"
    r"stainless\s+steel|graphite|silicon\s+carbide|rebco|ybco|bscco|garnet|argyrodite|"
    r"sulfide|oxide|polymer|ceramic|hastelloy|yttrium|gadolinium|zirconium|lanthanum|"
    r"magnesium\s+diboride|helium)\b",
    _I,
)

# Hype that belongs to marketing, not to claims.
_VAGUE_RE = re.compile(
    r"\b(?:unlimited|limitless|inexhaustible|infinite\s+(?:energy|power)|revolutionary|"
    r"miracle\w*|universal\s+energy|cosmic\s+energy|endless\s+(?:energy|power)|"
    r"secret|magical|any\s+(?:type|kind)\s+of\s+energy)\b",
    _I,
)

_DEPENDENT_RE = re.compile(
    r"\b(?:according\s+to|as\s+claimed\s+in|as\s+recited\s+in|as\s+defined\s+in|as\s+in|"
    r"of|in|by|with|from|using)\s+(?:any\s+(?:one\s+)?of\s+)?claims?\s+\d+",
    _I,
)


# --- classes ------------------------------------------------------------------------


def _split_symbol(symbol: str) -> tuple[str, str, str]:
    """``G21B1/057`` -> (``G21B``, ``1``, ``057``); missing parts are ``""``."""
    sub, rest = symbol[:4], symbol[4:]
    group, _, subgroup = rest.partition("/")
    return sub, group, subgroup


def cpc_matches(symbol: str, prefix: str) -> bool:
    """Whether ``symbol`` lies under ``prefix`` (a subclass, main group or subgroup).

    A main group matches whole (``H01F6`` is not ``H01F60``). Subgroups compare by
    digit prefix (``H01M10/05`` covers ``H01M10/0562``): the CPC hierarchy is really
    given by dots in the scheme, but digit prefixes are the usual approximation and
    exact for the defaults.
    """
    s_sub, s_group, s_subgroup = _split_symbol(_normalise_cpc(symbol))
    p_sub, p_group, p_subgroup = _split_symbol(prefix)
    if s_sub != p_sub:
        return False
    if not p_group:
        return True
    if s_group != p_group:
        return False
    return s_subgroup.startswith(p_subgroup)


def _classes(patent: Patent) -> list[str]:
    # IPC shares the CPC scheme down to the group: both are evidence.
    return list(dict.fromkeys(_normalise_cpc(c) for c in [*patent.cpc, *patent.ipc]))


def _terms_for(symbol: str) -> tuple[str, tuple[str, ...]] | None:
    best: tuple[str, tuple[str, ...]] | None = None
    for prefix, terms in CLASS_TERMS.items():
        if cpc_matches(symbol, prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, terms)
    return best


def _has_stem(text: str, stem: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(stem)}", text, re.IGNORECASE) is not None


# --- factors --------------------------------------------------------------------------


def _red_flags(text: str) -> list[str]:
    found = []
    for flag in RED_FLAGS:
        if flag.pattern.search(text) and (flag.requires is None or flag.requires.search(text)):
            found.append(flag.name)
    return found


def _class_consistency(patent: Patent) -> Factor:
    claims = " ".join(patent.claims) or patent.abstract
    known = [(c, t) for c in _classes(patent) if (t := _terms_for(c)) is not None]
    if not known or not claims:
        what = "no claim or abstract text" if not claims else "no class in the vocabulary table"
        return Factor("class_consistency", 0.0, f"not assessed: {what}")
    consistent = [c for c, (_, terms) in known if any(_has_stem(claims, t) for t in terms)]
    inconsistent = [c for c, _ in known if c not in consistent]
    if not inconsistent:
        return Factor(
            "class_consistency",
            CONSISTENT_ALL_POINTS,
            f"claims use the vocabulary of every known class ({', '.join(consistent)})",
        )
    if consistent:
        return Factor(
            "class_consistency",
            CONSISTENT_SOME_POINTS,
            f"claims fit {', '.join(consistent)} but not {', '.join(inconsistent)}",
        )
    return Factor(
        "class_consistency",
        CONSISTENT_NONE_POINTS,
        f"claims use none of the vocabulary of {', '.join(inconsistent)}",
    )


def _citations(patent: Patent) -> list[Factor]:
    n_pat = len(set(patent.citations))
    n_npl = patent.non_patent_citations
    pat_points = min(n_pat * PATENT_CITATION_POINTS, PATENT_CITATION_MAX)
    npl_points = min(n_npl * LITERATURE_CITATION_POINTS, LITERATURE_CITATION_MAX)
    return [
        Factor(
            "patent_citations",
            pat_points,
            f"{n_pat} patent citations (+{PATENT_CITATION_POINTS:g} each, "
            f"at most +{PATENT_CITATION_MAX:g})",
        ),
        Factor(
            "literature_citations",
            npl_points,
            f"{n_npl} non-patent literature citations (+{LITERATURE_CITATION_POINTS:g} each, "
            f"at most +{LITERATURE_CITATION_MAX:g})",
        ),
    ]


def _materials(text: str) -> set[str]:
    found = {m.group(0).lower() for m in _MATERIAL_NAMES.finditer(text)}
    for m in _FORMULA_RE.finditer(text):
        token = m.group(0)
        elements = re.findall(r"[A-Z][a-z]?", token)
        # A formula: only real element symbols, at least two different ones and a
        # count somewhere (Li7La3Zr2O12, Nb3Sn), so "USA" or "CPC" are not materials.
        if (
            all(e in _ELEMENT_SYMBOLS for e in elements)
            and len(set(elements)) >= 2
            and re.search(r"\d", token)
        ):
            found.add(token)
    return found


def _specificity(patent: Patent) -> Factor:
    if not patent.claims:
        return Factor(
            "specificity",
            NO_CLAIMS_POINTS,
            "no claim text in the record: less evidence to judge",
        )
    claims = " ".join(patent.claims)
    quantities = {m.group(0).replace(" ", "") for m in _QUANTITY_RE.finditer(claims)}
    materials = _materials(claims)
    points = min(
        len(quantities) * QUANTITY_POINTS + len(materials) * MATERIAL_POINTS, SPECIFICITY_MAX
    )
    return Factor(
        "specificity",
        points,
        f"{len(quantities)} quantities with units (+{QUANTITY_POINTS:g} each), "
        f"{len(materials)} materials (+{MATERIAL_POINTS:g} each), at most +{SPECIFICITY_MAX:g}",
    )


def _vague(text: str) -> Factor:
    terms = sorted({m.group(0).lower() for m in _VAGUE_RE.finditer(text)})
    points = max(len(terms) * VAGUE_POINTS, VAGUE_MAX) + 0.0  # + 0.0: no "-0"
    reason = f"hype terms: {'; '.join(terms)}" if terms else "no hype terms"
    return Factor("vague_language", points, reason)


def is_grant(patent: Patent) -> bool:
    """Kind B* (US, EP, CN, JP grants) or E (US reissue); A*, U, S... are not examined grants."""
    return patent.kind.startswith("B") or patent.kind == "E"


def _examination(patent: Patent) -> Factor:
    if is_grant(patent):
        return Factor("examination", GRANT_POINTS, f"granted (kind {patent.kind}): examined")
    return Factor("examination", 0.0, f"kind {patent.kind}: not (yet) examined, no bonus")


def _red_flag_cpc(patent: Patent, settings: PatentWatchSettings) -> Factor:
    hits = [
        c
        for c in _classes(patent)
        if any(cpc_matches(c, p) for p in settings.red_flag_cpc)
        and not any(cpc_matches(c, p) for p in settings.red_flag_cpc_exempt)
    ]
    if hits:
        return Factor(
            "red_flag_cpc",
            RED_FLAG_CPC_POINTS,
            f"classified in a group of alleged effects: {', '.join(hits)}",
        )
    return Factor("red_flag_cpc", 0.0, "no class of alleged effects")


def independent_claims(claims: Sequence[str]) -> list[str]:
    """Claims that refer to no other claim."""
    return [c for c in claims if not _DEPENDENT_RE.search(c)]


def matched_watchlists(patent: Patent, watchlists: Iterable[Watchlist]) -> list[Watchlist]:
    """Watchlists whose CPC prefix or keyword the patent matches, in order."""
    text = _text(patent)
    classes = _classes(patent)
    out = []
    for wl in watchlists:
        by_cpc = any(cpc_matches(c, p) for c in classes for p in wl.cpc)
        if by_cpc or any(_keyword_pattern(k).search(text) for k in wl.keywords):
            out.append(wl)
    return out


def _text(patent: Patent) -> str:
    return "\n".join([patent.title, patent.abstract, *patent.claims])


def score(patent: Patent, settings: PatentWatchSettings) -> PatentScore:
    """Watchlists matched, validity with its factors, and the market class of ``patent``."""
    text = _text(patent)
    watched = matched_watchlists(patent, settings.watchlists)
    flags = _red_flags(text)
    factors = [
        Factor("base", BASE_POINTS, "starting point: a publication proves nothing either way"),
        Factor(
            "red_flags",
            RED_FLAG_POINTS * len(flags) + 0.0,  # + 0.0: never a "-0" in the alert
            f"physics red flags: {'; '.join(flags)} ({RED_FLAG_POINTS:g} each)"
            if flags
            else "no physics red flag",
        ),
        _red_flag_cpc(patent, settings),
        _class_consistency(patent),
        *_citations(patent),
        _specificity(patent),
        _vague(text),
        _examination(patent),
    ]
    total = sum(f.points for f in factors)
    if flags and total > RED_FLAG_CAP:
        cap = Factor(
            "red_flag_cap",
            RED_FLAG_CAP - total,
            f"capped at {RED_FLAG_CAP:g}: no evidence outweighs a claim against physics",
        )
    else:
        cap = Factor("red_flag_cap", 0.0, "no cap" if not flags else "already below the cap")
    factors.append(cap)
    validity = round(min(max(total + cap.points, 0.0), 100.0), 1)

    indep = independent_claims(patent.claims)
    breakthrough = [w for w in watched if w.breakthrough]
    core = any(
        _keyword_pattern(k).search(claim)
        for w in breakthrough
        for k in w.keywords
        for claim in indep
    )
    fundamental = core and len(indep) >= FUNDAMENTAL_MIN_INDEPENDENT

    market: Market
    if flags or validity < NOISE_BELOW:
        market = "NOISE"
        why = f"physics red flags ({'; '.join(flags)})" if flags else f"validity < {NOISE_BELOW:g}"
    elif validity >= DISRUPTIVE_FROM and breakthrough and fundamental:
        market = "DISRUPTIVE"
        why = (
            f"validity >= {DISRUPTIVE_FROM:g}, breakthrough watchlist "
            f"{', '.join(w.name for w in breakthrough)}, {len(indep)} independent claims "
            "claiming the technology itself"
        )
    else:
        market = "INCREMENTAL"
        missing = []
        if validity < DISRUPTIVE_FROM:
            missing.append(f"validity < {DISRUPTIVE_FROM:g}")
        if not breakthrough:
            missing.append("no breakthrough watchlist")
        if not core:
            missing.append("no independent claim names the watched technology")
        if len(indep) < FUNDAMENTAL_MIN_INDEPENDENT:
            missing.append(f"{len(indep)} independent claim(s) < {FUNDAMENTAL_MIN_INDEPENDENT}")
        why = "not disruptive: " + "; ".join(missing)
    return PatentScore(
        watchlists=[w.name for w in watched],
        validity=validity,
        factors=factors,
        market=market,
        market_reason=why,
        red_flags=flags,
        independent_claims=len(indep),
        fundamental=fundamental,
    )


def alert_id(site: str, patent_id: str) -> str:
    """Stable over reruns and distinct per patent (not per publication day)."""
    return stable_id("alert", site, ALERT_TYPE, patent_id)


def alert_for(patent: Patent, result: PatentScore, settings: PatentWatchSettings) -> Alert | None:
    """An alert for a credible, watched, non-NOISE patent; ``None`` otherwise."""
    if (
        result.market == "NOISE"
        or not result.watchlists
        or result.validity < settings.min_score_to_alert
    ):
        return None
    severity = Severity.WARNING if result.market == "DISRUPTIVE" else Severity.INFO
    details: dict[str, DetailValue] = {
        "patent_id": patent.patent_id,
        "validity": float(result.validity),
        "market": result.market,
        "market_reason": result.market_reason,
        "watchlists": "; ".join(result.watchlists),
        "red_flags": "; ".join(result.red_flags),
        "granted": is_grant(patent),
        "independent_claims": float(result.independent_claims),
    }
    for f in result.factors:
        # Floats always: an InfluxDB field must keep one type forever.
        details[f"factor_{f.name}"] = float(f.points)
        details[f"reason_{f.name}"] = f.reason
    contributions = ", ".join(f"{f.name} {f.points:+g}" for f in result.factors if f.points)
    title = patent.title if len(patent.title) <= 120 else patent.title[:117] + "..."
    alert = firing(
        site=settings.site,
        device=None,
        alert_type=ALERT_TYPE,
        severity=severity,
        subject=f"{patent.patent_id}: {title}",
        message=(
            f"{patent.patent_id} ({', '.join(result.watchlists)}) scores "
            f"{result.validity:g}/100, {result.market}: {contributions}"
        ),
        start=datetime.combine(patent.publication_date, time(0), tzinfo=UTC),
        observed=float(result.validity),
        expected=float(settings.min_score_to_alert),
        details=details,
    )
    # firing() keys the id on the start instant, a bare date here: many patents
    # publish on the same Tuesday, so the id is the patent's own.
    return alert.model_copy(update={"alert_id": alert_id(settings.site, patent.patent_id)})


def watch_settings(settings: Settings) -> PatentWatchSettings | None:
    """The ``[patents]`` section, validated (None when there is none: the watch is off)."""
    if settings.patents is None:
        return None
    return validate_section(PatentWatchSettings, "patents", settings.patents)


def register(app: faust.App, settings: Settings) -> None:
    """Score every record of the patents topic; alerts for the high scorers.

    A record that does not decode is dead-lettered; the alert goes to the alerts topic,
    keyed by the watch's site, before the record is acknowledged (at least once; the
    alert id is the patent's, so a replay makes no second alert).
    """
    from pipeline import codec, topics
    from pipeline.streams import AGENT_SUPERVISOR, DeadLetters, decode_event, raw_topic

    watch = watch_settings(settings)
    if watch is None:
        return
    source = raw_topic(app, settings, topics.PATENTS)
    alerts = raw_topic(app, settings, topics.ALERTS)
    dlq = DeadLetters(app, settings, component=__name__)

    async def patent_watch(stream: Any) -> None:
        async for event in stream.events():
            patent = await decode_event(Patent, event, dlq)
            if patent is None:
                continue
            alert = alert_for(patent, score(patent, watch), watch)
            if alert is not None:
                await alerts.send(key=alert.site.encode(), value=codec.encode(alert))

    app.agent(source, name=f"{__name__}.patent_watch", supervisor_strategy=AGENT_SUPERVISOR)(
        patent_watch
    )
