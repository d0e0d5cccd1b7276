"""Carbon intensity tables and the generation mix -> intensity computation."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingest.carbon import (
    EMISSION_FACTORS_G_PER_KWH,
    MIX_SOURCE,
    CarbonFeed,
    CarbonFeedConfig,
    intensity_from_mix,
    parse_carbon,
)
from ingest.entsoe import DocumentError
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[3]


def test_worked_example_by_hand() -> None:
    # 1000 MW in total:
    #   coal 100 x 820 = 82000, gas 200 x 490 = 98000, wind 300 x 11 = 3300,
    #   solar 100 x 48 = 4800, nuclear 300 x 12 = 3600  -> 191700 / 1000 = 191.7 g/kWh.
    # Renewable: wind 300 + solar 100 = 400 of 1000 -> 40 %. Nuclear is low-carbon,
    # not renewable.
    co2_g_per_kwh, renewable_pct = intensity_from_mix(
        {"coal": 100, "gas": 200, "wind": 300, "solar": 100, "nuclear": 300}
    )
    assert co2_g_per_kwh == pytest.approx(191.7)
    assert renewable_pct == pytest.approx(40.0)


def test_factor_table_covers_every_fuel_once() -> None:
    assert sorted(EMISSION_FACTORS_G_PER_KWH) == sorted(
        [
            "coal",
            "lignite",
            "gas",
            "oil",
            "nuclear",
            "hydro",
            "wind",
            "solar",
            "biomass",
            "geothermal",
            "other",
        ]
    )
    assert EMISSION_FACTORS_G_PER_KWH["coal"] == 820 and EMISSION_FACTORS_G_PER_KWH["wind"] == 11


def test_mix_edges() -> None:
    assert intensity_from_mix({"hydro": 5.0}) == (24.0, 100.0)
    assert intensity_from_mix({"coal": 1.0, "solar": 0.0}) == (820.0, 0.0)  # night
    with pytest.raises(ValueError, match=r"unknown fuel\(s\) \['fusion', 'peat'\]"):
        intensity_from_mix({"coal": 1, "peat": 1, "fusion": 1})
    with pytest.raises(ValueError, match="zero"):
        intensity_from_mix({"coal": 0, "wind": 0})
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        intensity_from_mix({"hydro": -3})  # pumping is consumption, not generation
    with pytest.raises(ValueError, match="finite"):
        intensity_from_mix({"gas": float("nan")})


def test_mix_csv_becomes_records_with_renewable_share() -> None:
    raw = (
        b"time,zone,coal,gas,wind,solar,nuclear\n"
        b"2025-04-07T10:00:00+02:00,BE,100,200,300,100,300\n"
        b"2025-04-07T09:00:00Z,BE,0,0,10,,\n"
    )
    parsed = parse_carbon(raw)
    assert parsed.rejected == []
    first, second = parsed.messages
    assert first.start == datetime(2025, 4, 7, 8, tzinfo=UTC)
    assert first.end - first.start == timedelta(hours=1)
    assert (first.co2_g_per_kwh, first.renewable_share_pct) == (pytest.approx(191.7), 40.0)
    assert (second.co2_g_per_kwh, second.renewable_share_pct) == (11.0, 100.0)
    assert first.source == MIX_SOURCE and first.zone == "BE"


def test_unknown_fuel_columns_fail_the_document_naming_them() -> None:
    raw = b"time,zone,coal,peat,tidal\n2025-04-07T00:00:00Z,BE,1,2,3\n"
    with pytest.raises(DocumentError, match=r"unknown column\(s\) \['peat', 'tidal'\]") as caught:
        parse_carbon(raw)
    assert caught.value.error_type == "UnknownFuel"


def test_intensity_table_json_and_bad_rows_with_numbers() -> None:
    raw = orjson.dumps(
        {
            "zone": "DE-LU",
            "intensity": [
                {"time": "2025-04-07T00:00:00Z", "co2_g_per_kwh": 380, "renewable_share_pct": 45},
                {"time": "2025-04-07T00:15:00Z", "co2_g_per_kwh": -1},  # row 2: negative
                {"time": "2025-04-07T00:30:00", "co2_g_per_kwh": 300},  # row 3: naive
                {"time": "2025-04-07T00:45:00Z", "co2_g_per_kwh": "x"},  # row 4: not a number
                {"time": "2025-04-07T01:00:00Z", "co2_g_per_kwh": 350, "renewable_share_pct": 120},
                {"time": "2025-04-07T01:15:00Z", "co2_g_per_kwh": 360},
            ],
        }
    )
    parsed = parse_carbon(raw, source="electricitymaps")
    assert [r.reason.split(":")[0] for r in parsed.rejected] == ["row 2", "row 3", "row 4", "row 5"]
    assert "greater than or equal to 0" in parsed.rejected[0].reason
    assert "no UTC offset" in parsed.rejected[1].reason
    assert "renewable_share_pct" in parsed.rejected[3].reason
    good = parsed.messages
    assert [(r.co2_g_per_kwh, r.renewable_share_pct) for r in good] == [(380, 45), (360, None)]
    assert {r.end - r.start for r in good} == {timedelta(minutes=15)}
    assert good[0].source == "electricitymaps" and good[0].zone == "DE-LU"


def test_zone_from_config_and_errors_for_wrong_documents() -> None:
    raw = b"time,co2_g_per_kwh,end\n2025-04-07T00:00:00Z,100,2025-04-07T01:00:00Z\n"
    assert parse_carbon(raw, zone="FR").messages[0].zone == "FR"
    assert "no zone" in parse_carbon(raw).rejected[0].reason
    with pytest.raises(DocumentError, match="not a carbon intensity table"):
        parse_carbon(b"<xml/>")
    with pytest.raises(DocumentError, match="neither co2_g_per_kwh nor fuel"):
        parse_carbon(b"time,zone\n2025-04-07T00:00:00Z,BE\n")


def test_sample_toml_is_valid_and_its_commented_defaults_are_the_real_ones() -> None:
    sample = REPO / "ingest" / "carbon.sample.toml"
    config = CarbonFeedConfig.from_toml(sample, "carbon")
    lines = [
        line.removeprefix("# ")
        for line in sample.read_text().splitlines()
        if line.startswith("# ") and " = " in line
    ]
    defaults: dict[str, Any] = tomllib.loads("\n".join(lines))
    defaults.pop("zone")  # an example value: its default is None
    assert defaults and all(getattr(config, k) == v for k, v in defaults.items())
    feed = CarbonFeed(Settings(broker="127.0.0.1:1"), config)  # no network at construction
    assert feed.spec.name == "wattstream.carbon"
