"""Patent watch: watchlists, validity factors, market class and alerts, on records built here
(credible deep-tech filings and deliberately pseudo-scientific ones)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.schemas import Patent, PatentOffice, Severity
from processors.patents import (
    PatentWatchSettings,
    Watchlist,
    alert_for,
    cpc_matches,
    matched_watchlists,
    score,
)

SETTINGS = PatentWatchSettings(site="deeptech")

FACTOR_NAMES = {
    "base",
    "red_flags",
    "red_flag_cpc",
    "class_consistency",
    "patent_citations",
    "literature_citations",
    "specificity",
    "vague_language",
    "examination",
    "red_flag_cap",
}


def patent(**overrides: Any) -> Patent:
    """A US record; every field can be overridden."""
    fields: dict[str, Any] = {
        "patent_id": "US-11000001-B2",
        "office": PatentOffice.USPTO,
        "country": "US",
        "doc_number": "11000001",
        "kind": "B2",
        "title": "A device",
        "abstract": "",
        "claims": [],
        "cpc": [],
        "publication_date": date(2024, 5, 7),
        "source": "test",
    }
    fields.update(overrides)
    return Patent(**fields)


def fusion_grant(**overrides: Any) -> Patent:
    fields: dict[str, Any] = {
        "title": "High-field tokamak with REBCO toroidal field magnets",
        "abstract": (
            "A compact tokamak whose toroidal field coils are wound from high-temperature "
            "superconducting tape, allowing a higher field on the plasma and a smaller machine."
        ),
        "claims": [
            "1. A tokamak comprising a vacuum vessel, a tungsten divertor and toroidal field "
            "coils wound from REBCO tape, the coils producing a toroidal magnetic field of at "
            "least 12 T on the plasma axis at an operating temperature of 20 K.",
            "2. The tokamak of claim 1, wherein the tape carries a critical current of at "
            "least 300 A at 20 T.",
            "3. A method of confining a deuterium-tritium plasma, comprising energising the "
            "toroidal field coils of the tokamak to a current of 40 kA and heating the plasma "
            "with 25 MW of neutral beam power.",
        ],
        "cpc": ["G21B1/057", "H01F6/06"],
        "citations": [f"US-{n}" for n in range(9000001, 9000007)],
        "non_patent_citations": 4,
    }
    fields.update(overrides)
    return patent(**fields)


def solid_state_application() -> Patent:
    return patent(
        patent_id="US-20240123456-A1",
        doc_number="20240123456",
        kind="A1",
        title="Sulfide solid electrolyte for all-solid-state batteries",
        abstract="An argyrodite-type solid electrolyte with high ionic conductivity.",
        claims=[
            "1. A solid electrolyte for an all-solid-state battery, comprising an "
            "argyrodite-type sulfide Li6PS5Cl having an ionic conductivity of at least "
            "3 mS/cm at 25 °C.",
            "2. The solid electrolyte according to claim 1, having a particle size of "
            "0.5 µm to 5 µm.",
            "3. The solid electrolyte according to claim 1, wherein the Gibbs free energy of "
            "its decomposition against lithium metal is positive.",
        ],
        cpc=["H01M10/0562", "H01M2300/0068"],
        citations=["US-10000001", "JP-2019000001"],
        non_patent_citations=1,
    )


# Deliberately pseudo-scientific records, dressed up as well as they could be
# (granted, cited, numbers in the claims) so that only the physics sinks them.
PSEUDO = {
    "over-unity": patent(
        patent_id="US-11000002-B2",
        doc_number="11000002",
        title="Magnetic over-unity generator",
        abstract="A generator producing more output energy than input.",
        claims=[
            "1. A generator comprising a rotor with 12 neodymium magnets and a stator "
            "winding, the generator producing more output energy than input energy at "
            "3000 rpm.",
            "2. A method of generating electricity with the generator of claim 1.",
        ],
        cpc=["H02K53/00"],
        citations=["US-1", "US-2", "US-3", "US-4", "US-5"],
        non_patent_citations=5,
    ),
    "perpetual": patent(
        patent_id="US-11000003-B2",
        doc_number="11000003",
        title="Gravity wheel",
        abstract="A perpetual motion machine in which weights on levers keep a wheel turning.",
        claims=[
            "1. A wheel of 2 m diameter carrying 8 weights of 5 kg on hinged levers, the "
            "wheel turning indefinitely without any external energy.",
        ],
        cpc=["F03G7/10"],
        citations=["US-6", "US-7"],
    ),
    "zero-point": patent(
        patent_id="WO-2023000004-A1",
        office=PatentOffice.WIPO,
        country="WO",
        doc_number="2023000004",
        kind="A1",
        title="Zero-point energy extractor",
        abstract="A resonant cavity that extracts zero-point energy from the quantum vacuum.",
        claims=[
            "1. An apparatus that extracts zero-point energy from the quantum vacuum with "
            "Casimir plates spaced 10 nm apart, delivering unlimited electrical power.",
        ],
        cpc=["H02N11/00"],
        non_patent_citations=2,
    ),
    "cold-fusion": patent(
        patent_id="EP-3000005-A1",
        office=PatentOffice.EPO,
        country="EP",
        doc_number="3000005",
        kind="A1",
        title="Electrolytic cell for cold fusion",
        abstract="An electrolytic cell with a palladium cathode in heavy water.",
        claims=[
            "1. An electrolytic cell comprising a palladium cathode loaded with deuterium "
            "from heavy water at a current density of 500 mA, the cell producing excess "
            "heat of 4 W.",
        ],
        cpc=["G21B3/002"],
        citations=["US-8"],
        non_patent_citations=3,
    ),
}


def factors(result: Any) -> dict[str, float]:
    return {f.name: f.points for f in result.factors}


def test_credible_fusion_grant_is_disruptive_with_an_explained_alert() -> None:
    record = fusion_grant()
    result = score(record, SETTINGS)
    assert "fusion" in result.watchlists and "superconducting_magnet" in result.watchlists
    assert result.validity >= 70
    assert result.market == "DISRUPTIVE", result.market_reason
    assert result.red_flags == []
    points = factors(result)
    assert points["examination"] == 10.0
    assert points["class_consistency"] == 10.0
    assert points["patent_citations"] == 10.0  # 6 citations, capped at 5
    assert points["literature_citations"] == 12.0
    assert points["specificity"] == 15.0
    alert = alert_for(record, result, SETTINGS)
    assert alert is not None
    assert alert.alert_type == "patent"
    assert alert.severity is Severity.WARNING
    assert alert.site == "deeptech" and alert.device is None
    assert alert.start == datetime(2024, 5, 7, tzinfo=UTC)
    assert "US-11000001-B2" in alert.subject and "tokamak" in alert.subject.lower()
    assert "DISRUPTIVE" in alert.message and "examination +10" in alert.message
    assert alert.details["validity"] == result.validity
    assert alert.details["market"] == "DISRUPTIVE"
    assert "fusion" in str(alert.details["watchlists"])
    for name in FACTOR_NAMES:
        assert isinstance(alert.details[f"factor_{name}"], float)
        assert alert.details[f"reason_{name}"]


def test_solid_state_application_is_incremental_with_one_independent_claim() -> None:
    record = solid_state_application()
    result = score(record, SETTINGS)
    assert result.watchlists == ["solid_state_battery"]
    # "Gibbs free energy" is chemistry, not a free-energy device.
    assert result.red_flags == []
    assert factors(result)["examination"] == 0.0
    assert result.independent_claims == 1
    assert 70 <= result.validity < 100
    assert result.market == "INCREMENTAL"
    assert "independent claim" in result.market_reason
    alert = alert_for(record, result, SETTINGS)
    assert alert is not None and alert.severity is Severity.INFO


@pytest.mark.parametrize("key", sorted(PSEUDO))
def test_pseudo_science_scores_low_is_noise_and_raises_nothing(key: str) -> None:
    record = PSEUDO[key]
    result = score(record, SETTINGS)
    assert result.validity < 40, result.factors
    assert result.market == "NOISE"
    assert result.red_flags
    assert factors(result)["red_flags"] <= -40.0
    assert alert_for(record, result, SETTINGS) is None


def test_pseudo_science_red_flags_are_named() -> None:
    found = {key: score(record, SETTINGS).red_flags for key, record in PSEUDO.items()}
    assert "over-unity" in found["over-unity"]
    assert "more energy out than in" in found["over-unity"]
    assert "perpetual motion" in found["perpetual"]
    assert "zero-point energy extraction" in found["zero-point"]
    assert {"cold fusion", "excess heat"} <= set(found["cold-fusion"])


def test_polish_cannot_lift_a_red_flag_above_the_cap() -> None:
    # One red flag in a granted, cited, specific record outside the "alleged" classes:
    # the other factors alone would carry it to 70.
    record = patent(
        title="Permanent magnet motor",
        claims=[
            "1. A motor comprising a rotor of Nd2Fe14B magnets and a copper stator winding, "
            "having an efficiency of 140 % at 3000 rpm and 400 V.",
            "2. A method of driving the motor of claim 1 at 50 Hz.",
        ],
        cpc=["H02K21/00"],
        citations=[f"US-{n}" for n in range(5)],
        non_patent_citations=5,
    )
    result = score(record, SETTINGS)
    assert result.red_flags == ["over-unity"]
    assert factors(result)["red_flag_cap"] < 0
    assert result.validity == 30.0
    assert result.market == "NOISE"
    assert alert_for(record, result, PatentWatchSettings(site="x", min_score_to_alert=0)) is None


def test_fringe_classes_are_watched_and_penalised() -> None:
    magnetic = score(patent(title="Magnet motor", cpc=["H02N11/008"]), SETTINGS)
    assert factors(magnetic)["red_flag_cpc"] == -25.0
    cold = score(PSEUDO["cold-fusion"], SETTINGS)
    assert "fringe" in cold.watchlists
    assert factors(cold)["red_flag_cpc"] == -25.0
    # G21B3/004 is muon-catalysed fusion: real physics, watched but not penalised.
    muon = score(
        patent(
            title="Muon-catalysed fusion target",
            claims=["1. A target of deuterium-tritium at 20 K exposed to a muon beam."],
            cpc=["G21B3/004"],
        ),
        SETTINGS,
    )
    assert "fringe" in muon.watchlists
    assert factors(muon)["red_flag_cpc"] == 0.0


def test_every_factor_is_present_with_a_reason() -> None:
    for record in [fusion_grant(), solid_state_application(), *PSEUDO.values(), patent()]:
        result = score(record, SETTINGS)
        assert {f.name for f in result.factors} == FACTOR_NAMES
        assert all(f.reason.strip() for f in result.factors)
        assert len(result.factors) == len(FACTOR_NAMES)
        total = sum(f.points for f in result.factors)
        assert result.validity == round(min(max(total, 0.0), 100.0), 1)


def test_honest_uses_of_suspicious_words_are_not_red_flags() -> None:
    honest = patent(
        title="Battery pack cooling and heat pump",
        abstract=(
            "A cooling plate removes excess heat generated by the cells; the heat pump "
            "has a coefficient of performance greater than 1. The surface free energy of "
            "the coating is 30 mN/m."
        ),
        claims=["1. A battery pack wherein a heat pump with a COP of 3.5 removes excess heat."],
        cpc=["H01M10/613"],
    )
    assert score(honest, SETTINGS).red_flags == []


def test_other_red_flags() -> None:
    texts = {
        "anti-gravity": "An anti-gravity platform lifting 10 kg.",
        "violates thermodynamics": "An engine that overcomes the second law of thermodynamics.",
        "over-unity": "A motor with an efficiency of 140 % at 50 Hz.",
        "free energy": "A free energy generator for homes.",
    }
    # Phrasings seen in a real pseudo-scientific application.
    texts_more = {
        "more energy out than in": [
            "A resonator producing more electrical output than input.",
            "The generator delivers more electrical energy than it receives from any source.",
            "It delivers an electrical output of at least 300% of its input.",
        ],
        "perpetual motion": [
            "The output feeds the coils, so that the generator runs perpetually once started.",
            "It sustains itself and runs indefinitely, without fuel.",
        ],
        "violates thermodynamics": [
            "thereby overcoming the apparent limits of conservation of energy.",
        ],
        "zero-point energy extraction": [
            "wherein the excess energy is extracted from the zero-point field of the vacuum.",
        ],
    }
    for flag, variants in texts_more.items():
        for text in variants:
            assert flag in score(patent(abstract=text), SETTINGS).red_flags, text
    for flag, text in texts.items():
        assert flag in score(patent(abstract=text), SETTINGS).red_flags, flag
    careful = [
        "A motor with an efficiency of 95 %.",  # a good motor
        "A solar cell with an external quantum efficiency of 114 % by multiple exciton generation.",
        "A heat engine that does not violate the second law of thermodynamics.",
        "A turbine producing more power than earlier designs in the same frame size.",
    ]
    for text in careful:
        assert score(patent(abstract=text), SETTINGS).red_flags == [], text
    # 95 % is a good motor, not a red flag.
    assert score(patent(abstract="A motor with an efficiency of 95 %."), SETTINGS).red_flags == []


def test_inconsistent_classes_and_vague_claims_cost_points() -> None:
    record = fusion_grant(
        claims=[
            "1. A wheel with weights providing revolutionary, unlimited power to any home.",
        ],
        citations=[],
        non_patent_citations=0,
    )
    points = factors(score(record, SETTINGS))
    assert points["class_consistency"] == -10.0
    assert points["vague_language"] == -10.0
    assert points["specificity"] == 0.0
    no_claims = factors(score(fusion_grant(claims=[]), SETTINGS))
    assert no_claims["specificity"] == -5.0


def test_watchlist_matching_is_word_aware_and_by_cpc_prefix() -> None:
    assert (
        matched_watchlists(patent(title="Fusion splicing of optical fibres"), SETTINGS.watchlists)
        == []
    )
    assert (
        matched_watchlists(patent(title="Glenrock LENRs"), SETTINGS.watchlists)[0].name == "fringe"
    )
    assert matched_watchlists(patent(title="Glenrock mine"), SETTINGS.watchlists) == []
    names = [w.name for w in matched_watchlists(patent(title="Overunity box"), SETTINGS.watchlists)]
    assert names == ["fringe"]
    assert [w.name for w in matched_watchlists(patent(ipc=["H01B12/02"]), SETTINGS.watchlists)] == [
        "superconducting_magnet"
    ]
    assert cpc_matches("H01M10/0562", "H01M10/05")
    assert cpc_matches("G21B1/057", "G21B")
    assert cpc_matches("H01F6/06", "H01F6")
    assert not cpc_matches("H01F60/00", "H01F6")


def test_no_alert_below_threshold_or_without_watchlist() -> None:
    record = fusion_grant()
    result = score(record, SETTINGS)
    strict = PatentWatchSettings(site="deeptech", min_score_to_alert=100.5 - 0.5)
    assert (alert_for(record, result, strict) is None) == (result.validity < 100)
    unwatched = patent(title="A hinge", claims=["1. A hinge of 5 mm steel."], cpc=["E05D3/02"])
    assert alert_for(unwatched, score(unwatched, SETTINGS), SETTINGS) is None


def test_alert_id_is_stable_and_per_patent() -> None:
    first = fusion_grant()
    a1 = alert_for(first, score(first, SETTINGS), SETTINGS)
    a2 = alert_for(fusion_grant(), score(fusion_grant(), SETTINGS), SETTINGS)
    other = fusion_grant(patent_id="US-11000009-B2", doc_number="11000009")
    a3 = alert_for(other, score(other, SETTINGS), SETTINGS)
    assert a1 is not None and a2 is not None and a3 is not None
    assert a1.alert_id == a2.alert_id
    assert a1.alert_id != a3.alert_id  # same publication day, different patent
    assert a1 == a2


def test_settings_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="min_score_to_alert"):
        PatentWatchSettings(site="deeptech", min_score_to_alert=150)
    with pytest.raises(ValidationError, match=r"watchlists\.0\.cpc"):
        PatentWatchSettings.model_validate(
            {"site": "deeptech", "watchlists": [{"name": "x", "cpc": ["not a class"]}]}
        )
    with pytest.raises(ValidationError, match="min_score"):
        PatentWatchSettings.model_validate({"site": "deeptech", "min_score": 50})
    with pytest.raises(ValidationError, match="site"):
        PatentWatchSettings.model_validate({})
    with pytest.raises(ValidationError, match=r"keywords\.0"):
        Watchlist(name="blank", keywords=["   "])
    with pytest.raises(ValidationError, match="neither"):
        Watchlist(name="empty")
    with pytest.raises(ValidationError, match="unique"):
        PatentWatchSettings(site="deeptech", watchlists=[Watchlist(name="a", keywords=["x1"])] * 2)


def test_settings_normalise_cpc_with_spaces() -> None:
    wl = Watchlist(name="fusion2", cpc=["g21b 1/05"])
    assert wl.cpc == ["G21B1/05"]
