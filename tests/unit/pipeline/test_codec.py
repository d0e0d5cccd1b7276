"""Decoding bytes: clear reasons, and salvaging the good readings of a bad batch."""

from __future__ import annotations

import orjson
import pytest

from pipeline import codec
from pipeline.schemas import PriceTick

GOOD = {"kind": "meter", "device": "m1", "ts": "2025-04-07T00:00:00Z", "power_kw": 1.5}


def envelope(*readings: object, **extra: object) -> bytes:
    return orjson.dumps(
        {
            "schema_version": 1,
            "batch_id": "b1",
            "site": "s1",
            "source": "t",
            "readings": list(readings),
            **extra,
        }
    )


def test_valid_batch_has_no_rejections() -> None:
    batch, rejected = codec.decode_telemetry(envelope(GOOD, GOOD))
    assert batch is not None and len(batch.readings) == 2
    assert rejected == []


def test_bad_readings_are_rejected_one_by_one_and_the_rest_kept() -> None:
    bad_soc = {
        "kind": "battery",
        "device": "b",
        "ts": "2025-04-07T00:00:00Z",
        "power_kw": 1,
        "soc_pct": 130,
    }
    naive = {**GOOD, "ts": "2025-04-07T00:00:00"}
    batch, rejected = codec.decode_telemetry(envelope(GOOD, bad_soc, naive))
    assert batch is not None and len(batch.readings) == 1
    assert len(rejected) == 2
    assert "reading 1" in rejected[0].reason and "soc_pct" in rejected[0].reason
    assert "reading 2" in rejected[1].reason and "timezone" in rejected[1].reason
    assert orjson.loads(rejected[0].raw) == bad_soc


def test_not_json_is_rejected_whole() -> None:
    batch, rejected = codec.decode_telemetry(b"{not json")
    assert batch is None
    assert rejected[0].error_type == "JSONDecodeError"
    assert rejected[0].raw == b"{not json"


def test_broken_envelope_is_rejected_whole() -> None:
    batch, rejected = codec.decode_telemetry(envelope(GOOD, site=""))
    assert batch is None and "site" in rejected[0].reason


def test_unknown_schema_version_is_rejected() -> None:
    batch, rejected = codec.decode_telemetry(envelope(GOOD, schema_version=2))
    assert batch is None
    assert rejected[0].error_type == "UnsupportedSchemaVersion"


def test_all_readings_bad_gives_no_batch() -> None:
    batch, rejected = codec.decode_telemetry(envelope({**GOOD, "power_kw": "lots"}))
    assert batch is None and len(rejected) == 1


def test_decode_raises_with_the_field_and_value() -> None:
    raw = orjson.dumps(
        {"market": "M", "start": "2025-04-07T00:00:00Z", "end": "x", "price_per_kwh": 1}
    )
    with pytest.raises(codec.DecodeError, match=r"end: .*\(got 'x'\)"):
        codec.decode(PriceTick, raw)


@pytest.mark.parametrize("raw", [b"", b"null", b"[]", b"42", b'"text"', b"\xff\xfe"])
def test_garbage_never_raises_from_decode_telemetry(raw: bytes) -> None:
    batch, rejected = codec.decode_telemetry(raw)
    assert batch is None and len(rejected) == 1
