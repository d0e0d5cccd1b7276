"""SunSpec model definitions, decoding, encoding and chain parsing: pure, no server.

Regression cases live in ``sunspec_cases/<name>/``: ``registers.json`` holds a model
id and a register block written by hand (raw words such as ``0xFA10``, not produced
by our encoder), with ``expected.json`` (the points listed must decode to exactly
these values; others are not checked) or ``error.txt`` (a substring of the error).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import sunspec
from ingest.modbus import FIELD_MAP, ModbusConfig, map_reading
from ingest.simulators.sunspec_server import (
    battery,
    battery_profile,
    clear_sky_power_w,
    inverter,
    meter,
    pv_profile,
)
from pipeline.schemas import BatteryReading, MeterReading, SolarReading

CASES = Path(__file__).parent / "sunspec_cases"
CASE_DIRS = sorted(p for p in CASES.iterdir() if p.is_dir())


@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_regression_case(case: Path) -> None:
    data = json.loads((case / "registers.json").read_text())
    if (case / "error.txt").exists():
        with pytest.raises(sunspec.SunSpecError, match=(case / "error.txt").read_text().strip()):
            sunspec.decode_model(data["model_id"], data["registers"])
        return
    decoded = sunspec.decode_model(data["model_id"], data["registers"])
    expected = json.loads((case / "expected.json").read_text())
    assert {name: decoded[name] for name in expected} == expected


def test_there_are_cases_of_each_kind() -> None:
    kinds = {"error" if (p / "error.txt").exists() else "expected" for p in CASE_DIRS}
    assert kinds == {"error", "expected"}
    models = {json.loads((p / "registers.json").read_text())["model_id"] for p in CASE_DIRS}
    assert {1, 103, 113, 124, 203, 802} <= models


# --- definitions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "fixed_length"),
    [(1, 66), (101, 50), (103, 50), (113, 60), (124, 24), (203, 105), (802, 62)],
)
def test_definitions_come_from_the_json_files(model_id: int, fixed_length: int) -> None:
    definition = sunspec.load_model(model_id)
    assert definition.fixed_length == fixed_length
    assert [p.name for p in definition.points[:2]] == ["ID", "L"]
    # Offsets are contiguous: every point starts where the previous one ended.
    for before, after in zip(definition.points, definition.points[1:], strict=False):
        assert after.offset == before.offset + before.size


def test_points_carry_types_scale_factors_and_symbols() -> None:
    w = sunspec.load_model(103).point("W")
    assert (w.type, w.size, w.sf, w.units, w.offset) == ("int16", 1, "W_SF", "W", 14)
    assert sunspec.load_model(103).point("WH").type == "acc32"
    assert sunspec.symbol_name(802, "ChaSt", 4) == "CHARGING"
    assert sunspec.symbol_name(802, "ChaSt", None) is None


def test_repeating_groups_are_loaded() -> None:
    mppt = sunspec.load_model(160)
    assert [g.name for g in mppt.repeating] == ["module"]
    assert mppt.repeating[0].size == 20


def test_unknown_model_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="model 65000"):
        sunspec.load_model(65000)


# --- decoding edges ---------------------------------------------------------------------


def test_repeating_group_is_decoded_with_indexes() -> None:
    definition = sunspec.load_model(160)
    registers = [160, definition.fixed_length + 2 * 20] + [0xFFFF] * (definition.fixed_length + 40)
    registers[2 + definition.point("N").offset - 2] = 2
    decoded = sunspec.decode_model(160, registers)
    assert "module[0].DCW" in decoded and "module[1].DCW" in decoded
    assert "module[2].DCW" not in decoded


def test_longer_block_from_a_newer_revision_is_accepted() -> None:
    registers = sunspec.encode_model(103, {"W": 100.0, "W_SF": 0})
    registers[1] += 4
    registers += [0, 0, 0, 0]
    assert sunspec.decode_model(103, registers)["W"] == 100.0


def test_word_out_of_range_is_an_error() -> None:
    registers = sunspec.encode_model(103, {})
    registers[5] = 70_000
    with pytest.raises(sunspec.SunSpecError, match="not a 16-bit word"):
        sunspec.decode_model(103, registers)


@pytest.mark.parametrize(
    ("point_type", "words"),
    [
        ("int16", [0x8000]),
        ("uint16", [0xFFFF]),
        ("enum16", [0xFFFF]),
        ("bitfield16", [0xFFFF]),
        ("acc16", [0]),
        ("int32", [0x8000, 0]),
        ("uint32", [0xFFFF, 0xFFFF]),
        ("acc32", [0, 0]),
        ("bitfield32", [0xFFFF, 0xFFFF]),
        ("float32", [0x7FC0, 0]),
        ("string", [0, 0, 0]),
    ],
)
def test_not_implemented_sentinels(point_type: str, words: list[int]) -> None:
    point = sunspec.Point("X", point_type, 0, len(words))
    assert sunspec._decode_raw(point, words) is None


def test_sentinel_neighbours_are_values() -> None:
    assert sunspec._decode_raw(sunspec.Point("X", "int16", 0, 1), [0x8001]) == -32767
    assert sunspec._decode_raw(sunspec.Point("X", "uint16", 0, 1), [0xFFFE]) == 65534
    assert sunspec._decode_raw(sunspec.Point("X", "acc32", 0, 2), [0, 1]) == 1
    assert sunspec._decode_raw(sunspec.Point("X", "float32", 0, 2), [0, 0]) == 0.0


# --- encode -> decode round trips -----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    watts=st.integers(min_value=-32767, max_value=32767),
    w_sf=st.integers(min_value=-3, max_value=3),
    energy_wh=st.integers(min_value=1, max_value=0xFFFF_FFFF),
    hz=st.integers(min_value=0, max_value=65534),
)
def test_inverter_round_trip(watts: int, w_sf: int, energy_wh: int, hz: int) -> None:
    values: dict[str, sunspec.Value] = {
        "W": watts * 10.0**w_sf,
        "W_SF": w_sf,
        "WH": float(energy_wh),
        "WH_SF": 0,
        "Hz": hz / 100,
        "Hz_SF": -2,
        "St": 4,
    }
    decoded = sunspec.decode_model(103, sunspec.encode_model(103, values))
    assert decoded["W"] == pytest.approx(values["W"], rel=1e-12, abs=1e-9)
    assert decoded["WH"] == float(energy_wh)
    assert decoded["Hz"] == pytest.approx(hz / 100, abs=1e-9)
    assert decoded["St"] == 4
    assert decoded["A"] is None  # not given -> not implemented


@settings(max_examples=100, deadline=None)
@given(
    soc_tenths=st.integers(min_value=0, max_value=1000),
    power_w=st.integers(min_value=-32767, max_value=32767),
    cycles=st.integers(min_value=0, max_value=0xFFFF_FFFE),
    status=st.sampled_from([1, 2, 3, 4, 5, 6, 7]),
)
def test_battery_round_trip(soc_tenths: int, power_w: int, cycles: int, status: int) -> None:
    values: dict[str, sunspec.Value] = {
        "SoC": soc_tenths / 10,
        "SoC_SF": -1,
        "W": float(power_w),
        "W_SF": 0,
        "NCyc": cycles,
        "ChaSt": status,
    }
    decoded = sunspec.decode_model(802, sunspec.encode_model(802, values))
    assert decoded["SoC"] == soc_tenths / 10
    assert decoded["W"] == float(power_w)
    assert decoded["NCyc"] == cycles
    assert decoded["ChaSt"] == status


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=32
    ),
    watts=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32),
)
def test_strings_and_floats_round_trip(text: str, watts: float) -> None:
    assert sunspec.decode_model(1, sunspec.encode_model(1, {"Mn": text}))["Mn"] == text
    decoded = sunspec.decode_model(113, sunspec.encode_model(113, {"W": watts}))
    assert decoded["W"] == watts


def test_encode_rejects_what_cannot_be_stored() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        sunspec.encode_model(103, {"W": 40_000.0, "W_SF": 0})
    with pytest.raises(ValueError, match="not-implemented"):
        sunspec.encode_model(103, {"W": -32768.0, "W_SF": 0})
    with pytest.raises(ValueError, match="scale factor is not set"):
        sunspec.encode_model(103, {"W": 10.0})
    with pytest.raises(KeyError, match="Watts"):
        sunspec.encode_model(103, {"Watts": 10.0})
    with pytest.raises(ValueError, match="longer than"):
        sunspec.encode_model(1, {"Mn": "x" * 33})


# --- discovery chain ----------------------------------------------------------------------


def chain(*blocks: list[int]) -> list[int]:
    words = list(sunspec.SUNS_MARKER)
    for block in blocks:
        words += block
    return words


def test_chain_is_parsed() -> None:
    common = sunspec.encode_model(1, {"Mn": "x"})
    inv = sunspec.encode_model(103, {})
    headers = sunspec.parse_chain(40000, chain(common, inv, [0xFFFF, 0]))
    assert headers == [
        sunspec.ModelHeader(1, 40002, 66),
        sunspec.ModelHeader(103, 40070, 50),
    ]
    assert headers[1].end == 40122


@pytest.mark.parametrize(
    ("registers", "message"),
    [
        ([0x1234, 0x5678, 1, 66], "no SunS marker"),
        (chain([1, 66] + [0] * 66), "without an end marker"),
        (chain([1, 200] + [0] * 10), "without an end marker"),
        (chain([0, 10] + [0] * 10, [0xFFFF, 0]), "model id 0"),
        (chain([7, 0] * 300), "more than 256 models"),
    ],
    ids=["no-marker", "no-end", "length-past-dump", "model-zero", "endless"],
)
def test_malformed_chain_is_an_error_not_a_crash(registers: list[int], message: str) -> None:
    with pytest.raises(sunspec.SunSpecError, match=message):
        sunspec.parse_chain(40000, registers)


def test_chain_running_past_the_address_space_is_an_error() -> None:
    with pytest.raises(sunspec.SunSpecError, match="past address 65535"):
        sunspec.next_header(65_000, 103, 1000, 0)


# --- mapping to our readings -------------------------------------------------------------------


NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def decoded_models(device: Any) -> dict[int, dict[str, sunspec.Value]]:
    return {
        model_id: sunspec.decode_model(model_id, sunspec.encode_model(model_id, values))
        for model_id, values in device.models.items()
    }


def test_solar_power_in_kw_and_never_negative() -> None:
    reading = map_reading("solar", "pv-1", NOW, decoded_models(inverter(1, power_w=1500.0)))
    assert isinstance(reading, SolarReading) and reading.power_kw == 1.5
    night = map_reading("solar", "pv-1", NOW, decoded_models(inverter(1, power_w=-7.0)))
    assert isinstance(night, SolarReading) and night.power_kw == 0.0


def test_meter_sign_import_positive() -> None:
    exporting = map_reading("meter", "grid", NOW, decoded_models(meter(1, power_w=-1200.0)))
    assert isinstance(exporting, MeterReading)
    assert (exporting.power_kw, exporting.import_energy_kwh, exporting.frequency_hz) == (
        -1.2,
        1000.0,
        50.0,
    )
    flipped = map_reading(
        "meter", "grid", NOW, decoded_models(meter(1, power_w=-1200.0)), invert_power=True
    )
    assert isinstance(flipped, MeterReading) and flipped.power_kw == 1.2


def test_battery_discharging_positive() -> None:
    reading = map_reading(
        "battery", "bat-1", NOW, decoded_models(battery(1, soc_pct=48.5, power_w=2500.0))
    )
    assert isinstance(reading, BatteryReading)
    assert (reading.power_kw, reading.soc_pct, reading.voltage_v) == (2.5, 48.5, 51.2)


def test_battery_without_soc_is_rejected() -> None:
    models = decoded_models(battery(1))
    models[802]["SoC"] = None
    with pytest.raises(ValueError, match="soc_pct"):
        map_reading("battery", "bat-1", NOW, models)


def test_field_map_targets_exist() -> None:
    models: dict[str, type[SolarReading | BatteryReading | MeterReading]] = {
        "solar": SolarReading,
        "battery": BatteryReading,
        "meter": MeterReading,
    }
    for rule in FIELD_MAP:
        assert rule.field in models[rule.kind].model_fields, rule
        for model_id in rule.models:
            sunspec.load_model(model_id).point(rule.point)  # raises when misspelt


def test_config_is_validated_without_network() -> None:
    device = {"host": "10.0.0.5", "site": "s", "device": "d", "kind": "solar"}
    config = ModbusConfig(devices=[device])
    assert config.devices[0].port == 502 and config.devices[0].base_address is None
    with pytest.raises(ValueError, match="configured twice"):
        ModbusConfig(devices=[device, device])
    with pytest.raises(ValueError, match="reconnect_max_s"):
        ModbusConfig(devices=[device], reconnect_min_s=10, reconnect_max_s=1)
    with pytest.raises(ValueError, match="kind"):
        ModbusConfig(devices=[{**device, "kind": "fusion"}])


def test_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "modbus.toml"
    path.write_text(
        "[modbus]\n"
        "[[modbus.devices]]\n"
        'host = "10.0.0.5"\nunit_id = 3\nsite = "turin-home"\ndevice = "grid"\n'
        'kind = "meter"\npoll_interval_s = 2.5\n'
    )
    config = ModbusConfig.from_toml(path)
    assert config.devices[0].unit_id == 3 and config.devices[0].poll_interval_s == 2.5


def test_float_model_not_implemented_is_none() -> None:
    decoded = sunspec.decode_model(113, sunspec.encode_model(113, {}))
    assert decoded["W"] is None


def test_repeating_group_uses_the_models_scale_factors() -> None:
    definition = sunspec.load_model(160)
    module = definition.repeating[0]
    registers = [160, definition.fixed_length + module.size] + [0xFFFF] * (
        definition.fixed_length + module.size
    )
    registers[definition.point("N").offset] = 1
    registers[definition.point("DCW_SF").offset] = 0xFFFF  # -1
    dcw = next(p for p in module.points if p.name == "DCW")
    registers[2 + definition.fixed_length + dcw.offset] = 12345
    assert sunspec.decode_model(160, registers)["module[0].DCW"] == 1234.5


def test_storage_124_alone_gives_a_battery_reading() -> None:
    storage = sunspec.encode_model(
        124, {"ChaState": 75.3, "ChaState_SF": -1, "InBatV": 48.2, "InBatV_SF": -1}
    )
    inverter_block = sunspec.encode_model(103, {"W": 1800.0, "W_SF": 0})
    models = {
        124: sunspec.decode_model(124, storage),
        103: sunspec.decode_model(103, inverter_block),
    }
    reading = map_reading("battery", "bat-2", NOW, models)
    assert isinstance(reading, BatteryReading)
    assert (reading.soc_pct, reading.power_kw, reading.voltage_v) == (75.3, 1.8, 48.2)


# --- simulator profiles ------------------------------------------------------------------------


def test_clear_sky_profile_is_zero_at_night_and_peaks_at_noon() -> None:
    assert clear_sky_power_w(datetime(2026, 6, 1, 2, 0, tzinfo=UTC), 5000.0) == 0.0
    assert clear_sky_power_w(datetime(2026, 6, 1, 12, 0, tzinfo=UTC), 5000.0) == 5000.0
    device = inverter(1, profile=pv_profile(4000.0))
    device.advance(datetime(2026, 6, 1, 12, 0, tzinfo=UTC))
    assert device.models[103]["W"] == 4000


def test_battery_profile_integrates_power_into_soc() -> None:
    device = battery(1, soc_pct=50.0, profile=battery_profile(lambda _: 5000.0, 10_000.0, 50.0))
    start = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    device.advance(start)
    device.advance(start.replace(minute=30))  # 5 kW discharge for 30 min = 2.5 kWh = 25 %
    assert device.models[802]["SoC"] == pytest.approx(25.0)
    assert device.models[802]["ChaSt"] == 3  # DISCHARGING
    decoded = sunspec.decode_model(802, sunspec.encode_model(802, device.models[802]))
    assert decoded["SoC"] == 25.0
