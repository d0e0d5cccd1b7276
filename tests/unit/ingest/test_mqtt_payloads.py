"""MQTT payloads to readings, with no broker: topics, JSON, line protocol, field maps, reasons."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ingest.mqtt import MqttConfig, ParseResult, PayloadParser, TopicPattern
from pipeline.schemas import BatteryReading, MeterReading, SolarReading

RECEIVED = datetime(2025, 4, 7, 10, 0, tzinfo=UTC)


def parser(**overrides: Any) -> PayloadParser:
    return PayloadParser(MqttConfig(client_id="test", **overrides))


def parse(topic: str, payload: bytes | str, **overrides: Any) -> ParseResult:
    raw = payload.encode() if isinstance(payload, str) else payload
    return parser(**overrides).parse(topic, raw, RECEIVED)


def reasons(result: ParseResult) -> list[str]:
    return [r.reason for r in result.rejections]


# --- topics -------------------------------------------------------------------------------


def test_topic_pattern_gives_subscription_and_parts() -> None:
    pattern = TopicPattern.compile("sites/{site}/{kind}/{device}")
    assert pattern.subscription == "sites/+/+/+"
    assert pattern.match("sites/turin-home/battery/bat-1") == {
        "site": "turin-home",
        "kind": "battery",
        "device": "bat-1",
    }
    assert pattern.match("sites/turin-home/battery") is None
    assert pattern.match("other/turin-home/battery/bat-1") is None
    assert pattern.match("sites/turin-home/battery/bat-1/extra") is None


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("sites/+/{kind}/{device}", "wildcards are derived"),
        ("sites/#", "wildcards are derived"),
        ("sites/{site}/{phase}", "unknown placeholder '{phase}'"),
        ("sites/{site}/{site}", "appears twice"),
        ("sites/x{site}", "wildcards are derived"),
    ],
)
def test_bad_topic_patterns_are_refused_at_construction(pattern: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MqttConfig(client_id="c", topics=(pattern,))


def test_first_matching_pattern_wins_and_unmatched_topic_is_rejected() -> None:
    topics = ("a/{site}/{kind}/{device}", "b/{kind}/{device}/{site}")
    ok = parse("b/meter/m1/s9", '{"power_kw": 1.0}', topics=topics)
    assert [(site, r.kind, r.device) for site, r in ok.readings] == [("s9", "meter", "m1")]
    bad = parse("c/s1/meter/m1", '{"power_kw": 1.0}', topics=topics)
    assert bad.readings == [] and "matches none of" in reasons(bad)[0]


# --- config -------------------------------------------------------------------------------


def test_persistent_session_needs_a_client_id() -> None:
    with pytest.raises(ValidationError, match="persistent_session requires client_id"):
        MqttConfig()
    assert MqttConfig(persistent_session=False).client_id is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mqtts://h:8883", "scheme must be mqtt://"),
        ("mqtt://user:pw@h:1883", "must not hold credentials"),
        ("mqtt://h:99999", "invalid port"),
        ("mqtt://:1883", "no host"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MqttConfig(client_id="c", url=url)


def test_password_is_never_shown() -> None:
    config = MqttConfig(client_id="c", username="u", password="hunter2")
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.model_dump())
    assert config.address() == ("localhost", 1883)


def test_field_map_target_must_be_a_reading_field() -> None:
    with pytest.raises(ValidationError, match="'pwr_kw' is not a reading field"):
        MqttConfig(client_id="c", field_map={"P": {"field": "pwr_kw"}})


# --- JSON ---------------------------------------------------------------------------------


def test_json_object_becomes_one_reading_with_topic_routing() -> None:
    result = parse(
        "sites/turin-home/battery/bat-1",
        '{"ts": "2025-04-07T12:00:00+02:00", "power_kw": -1.5, "soc_pct": 48.5}',
    )
    assert result.rejections == []
    ((site, reading),) = result.readings
    assert site == "turin-home"
    assert reading == BatteryReading(
        device="bat-1", ts=datetime(2025, 4, 7, 10, tzinfo=UTC), power_kw=-1.5, soc_pct=48.5
    )


def test_json_array_keeps_good_readings_and_names_the_bad_one() -> None:
    result = parse(
        "sites/s1/solar/pv-1",
        '[{"time": "2025-04-07T10:00:00Z", "power_kw": 3.0},'
        ' {"time": "2025-04-07T10:01:00Z", "power_kw": -2.0},'
        " 7,"
        ' {"time": "2025-04-07T10:02:00Z", "power_kw": 2.5, "irradiance_w_m2": 800}]',
    )
    assert [r.power_kw for _, r in result.readings if isinstance(r, SolarReading)] == [3.0, 2.5]
    assert len(result.rejections) == 2
    assert reasons(result)[0].startswith("reading 1: solar.power_kw: Input should be greater")
    assert "(got '-2.0')" in reasons(result)[0]
    assert reasons(result)[1] == "reading 2: expected a JSON object, got int '7'"


def test_field_map_renames_and_scales_vendor_fields() -> None:
    result = parse("sites/s1/meter/m1", '{"P": 1500, "E_in": 250000, "U": 231.5, "f": 50.01}')
    ((_, reading),) = result.readings
    assert isinstance(reading, MeterReading)
    assert reading.power_kw == pytest.approx(1.5)
    assert reading.import_energy_kwh == pytest.approx(250.0)
    assert (reading.voltage_v, reading.frequency_hz) == (231.5, 50.01)


def test_config_field_map_is_merged_over_the_default_with_offset() -> None:
    result = parse(
        "sites/s1/battery/b1",
        '{"P": -2000, "charge": 55, "T_K": 298.15}',
        field_map={"charge": {"field": "soc_pct"}},
    )
    ((_, reading),) = result.readings
    assert isinstance(reading, BatteryReading)
    assert (reading.power_kw, reading.soc_pct) == (-2.0, 55)
    assert reading.temperature_c == pytest.approx(25.0)


def test_scaling_a_non_number_is_rejected_with_the_vendor_name() -> None:
    result = parse("sites/s1/meter/m1", '{"P": "1500"}')
    assert reasons(result) == ["P: needs a number to scale, got '1500'"]
    result = parse("sites/s1/meter/m1", '{"P": true}')
    assert reasons(result) == ["P: needs a number to scale, got 'True'"]


def test_a_field_given_twice_is_rejected() -> None:
    result = parse("sites/s1/meter/m1", '{"P": 1500, "power_kw": 1.5}')
    assert reasons(result) == ["both 'P' and 'power_kw' give power_kw"]


def test_missing_ts_means_receive_time_and_epoch_numbers_are_accepted() -> None:
    result = parse("sites/s1/home/h1", '[{"power_kw": 0.4}, {"power_kw": 0.5, "ts": 1744020000}]')
    assert [r.ts for _, r in result.readings] == [RECEIVED, datetime(2025, 4, 7, 10, tzinfo=UTC)]


def test_naive_timestamp_and_both_time_keys_are_rejected() -> None:
    naive = parse("sites/s1/home/h1", '{"power_kw": 0.4, "ts": "2025-04-07T10:00:00"}')
    assert "home.ts: Input should have timezone info" in reasons(naive)[0]
    both = parse("sites/s1/home/h1", '{"power_kw": 0.4, "ts": 1, "time": 2}')
    assert reasons(both) == ["both 'ts' and 'time' given; send one"]


def test_payload_routing_keys_override_the_topic() -> None:
    result = parse("sites/s1/meter/m1", '{"site": "s2", "device": "m9", "power_kw": 2.0}')
    ((site, reading),) = result.readings
    assert (site, reading.device) == ("s2", "m9")


def test_unknown_kind_is_rejected_with_the_known_kinds() -> None:
    result = parse("sites/s1/heatpump/hp1", '{"power_kw": 2.0}')
    assert result.readings == []
    assert result.rejections[0].error_type == "UnknownKind"
    assert reasons(result)[0].startswith("kind 'heatpump' is not one of ['battery'")


def test_bad_site_and_unknown_field_are_named() -> None:
    bad_site = parse("sites/s 1/meter/m1", '{"power_kw": 2.0}')
    assert reasons(bad_site)[0].startswith("site: (message): String should match pattern")
    unknown = parse("sites/s1/meter/m1", '{"power_kw": 2.0, "colour": "red"}')
    assert reasons(unknown) == ["meter.colour: Extra inputs are not permitted (got 'red')"]


@pytest.mark.parametrize(
    ("payload", "start"),
    [
        (b'{"power_kw": ', "not JSON: "),
        (b"\xff\xfe", "not JSON: "),
        (b"[]", "empty JSON array"),
        (b'"text"', "expected a JSON object, got str"),
    ],
)
def test_undecodable_json_is_rejected(payload: bytes, start: str) -> None:
    result = parse("sites/s1/meter/m1", payload)
    assert result.readings == [] and reasons(result)[0].startswith(start)


def test_nan_is_rejected() -> None:
    # orjson refuses NaN literals; a NaN can only come scaled from an overflow.
    result = parse(
        "sites/s1/meter/m1", '{"P": 1e308}', field_map={"P": {"field": "power_kw", "scale": 1e10}}
    )
    assert "meter.power_kw: Input should be a finite number" in reasons(result)[0]


# --- line protocol ------------------------------------------------------------------------


def lp(payload: str, topic: str = "sites/s1/any/d1", **overrides: Any) -> ParseResult:
    return parse(topic, payload, payload_format="line-protocol", **overrides)


def test_line_protocol_measurement_is_kind_and_tags_override_topic() -> None:
    result = lp(
        "battery,site=s2,device=bat-7,host=edge1 P=-1500i,soc_pct=48.5 1744020000000000000\n"
        "meter power_kw=0.25\n"
    )
    assert result.rejections == []
    (site1, battery), (site2, meter) = result.readings
    assert (site1, battery.device, battery.kind) == ("s2", "bat-7", "battery")
    assert isinstance(battery, BatteryReading)
    assert (battery.power_kw, battery.soc_pct) == (-1.5, 48.5)
    assert battery.ts == datetime(2025, 4, 7, 10, tzinfo=UTC)
    assert (site2, meter.device, meter.ts) == ("s1", "d1", RECEIVED)


def test_line_protocol_precision_and_booleans() -> None:
    result = lp("generator power_kw=3,running=t 1744020000", line_protocol_precision="s")
    ((_, reading),) = result.readings
    assert reading.ts == datetime(2025, 4, 7, 10, tzinfo=UTC)
    assert reading.model_dump()["running"] is True


def test_line_protocol_escaping() -> None:
    # Escaped spaces, commas and equals signs in tag values are unescaped by the parser;
    # our id rules then refuse them, quoting the unescaped value.
    result = lp(r"meter,device=m\ 1\,a\=b power_kw=1")
    assert result.readings == []
    assert reasons(result)[0].startswith("meter.device: String should match pattern")
    assert reasons(result)[0].endswith("(got 'm 1,a=b')")
    # Escaped measurement and field keys, a quoted string with an escaped quote.
    result = lp(r"met\ er power_kw=1")
    assert reasons(result)[0].startswith("kind 'met er' is not one of")
    result = lp(r'meter power_kw=1,note="say \"hi\", ok"')
    assert reasons(result) == ["meter.note: Extra inputs are not permitted (got 'say \"hi\", ok')"]


def test_malformed_lines_are_named_and_the_rest_kept() -> None:
    result = lp("meter power_kw=1\nmeter power_kw=\n# a comment\n\nmeter power_kw=2 notatime\n")
    assert [r.model_dump()["power_kw"] for _, r in result.readings] == [1.0]
    assert reasons(result) == [
        "line 2: Failed to parse value of field. in 'meter power_kw='",
        "line 5: Failed to parse nanoseconds integer timestamp. in 'meter power_kw=2 notatime'",
    ]
    assert {r.error_type for r in result.rejections} == {"LineProtocolError"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "no line-protocol line in the payload"),
        (b"\xff meter power_kw=1", "line protocol is not UTF-8"),
        (b"heatpump power_kw=1", "kind 'heatpump' is not one of"),
        (b"meter", "Failed to parse measurement"),
    ],
)
def test_bad_line_protocol_payloads(payload: bytes, reason: str) -> None:
    result = parse("sites/s1/x/d1", payload, payload_format="line-protocol")
    assert result.readings == [] and reason in reasons(result)[0]


def test_line_protocol_without_topic_routing_needs_tags() -> None:
    result = lp("meter power_kw=1", topic="raw/t", topics=("raw/t",))
    assert reasons(result) == ["no site: neither the topic pattern nor the payload names one"]
    ok = lp("meter,site=s1,device=m1 power_kw=1", topic="raw/t", topics=("raw/t",))
    assert [(s, r.device) for s, r in ok.readings] == [("s1", "m1")]


# --- the sample configuration ----------------------------------------------------------------


def test_sample_toml_is_valid_and_its_commented_defaults_are_the_real_ones() -> None:
    sample = Path(__file__).resolve().parents[3] / "ingest" / "mqtt.sample.toml"
    config = MqttConfig.from_toml(sample)
    assert config.client_id == "wattstream-ingest"
    lines = [
        line.removeprefix("# ")
        for line in sample.read_text().splitlines()
        if line.startswith("# ") and " = " in line
    ]
    defaults: dict[str, Any] = tomllib.loads("\n".join(lines))
    assert len(defaults) > 10
    assert MqttConfig(client_id="wattstream-ingest", **defaults) == MqttConfig(
        client_id="wattstream-ingest"
    )
    assert config == MqttConfig(client_id="wattstream-ingest")
