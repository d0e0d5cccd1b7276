"""Telemetry records -> line protocol, many records at a time, in polars.

Telemetry is almost all of the sink's volume. Decoding each batch with
pydantic and formatting each point with influxdb-client's ``Point`` costs
about 15 µs a point (~75,000 points/s), a quarter of the sink's goal. Here a
whole poll of records is parsed as NDJSON and turned into lines by column
expressions, in Rust.

The per-record path (:func:`pipeline.codec.decode_telemetry` +
:func:`sinks.lineprotocol.telemetry_lines`) stays the authority: this module
only takes the records it can prove valid and hands every other one back for
that path, which salvages the good readings of a partly bad batch and says
why the rest is bad. "Valid" is read from the pydantic models' own JSON
Schemas (types, required fields, bounds, patterns, lengths), so a field added
to a reading model is checked here too, and a constraint this module does not
understand fails at import, not silently. What JSON Schema does not say
(timestamps must carry an offset; numbers must be finite) is checked by hand.

What a fixed polars schema cannot see is checked on each record as orjson reads it
(:func:`_read_alike`): polars ignores unknown keys, reads an explicit ``null`` as a
missing key, reads a number where text belongs as its text, and keeps the first of two
equal keys where the codec (orjson) keeps the last; such records take the per-record
path.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import orjson
import polars as pl
from pydantic import BaseModel

from pipeline.schemas import READING_MODELS, SCHEMA_VERSION, TelemetryBatch
from sinks.lineprotocol import READING_ENVELOPE

# ISO 8601 with a UTC offset, at most microseconds: pydantic's AwareDatetime
# takes these, and polars parses them to the same instant. Anything else
# (naive times, unix numbers, nanoseconds) goes to the per-record path. Minutes and
# seconds are 00-59: polars reads a leap second :60 as the next minute, pydantic refuses it.
_AWARE_ISO = r"^\d{4}-\d{2}-\d{2}T\d{2}:[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$"

_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S%.f%#z"


@dataclass(frozen=True)
class _Field:
    name: str
    json_type: str
    """``number``, ``boolean`` or ``string``."""
    required: bool
    nullable: bool
    constraints: dict[str, Any]


_KNOWN_KEYWORDS = {
    "type",
    "title",
    "default",
    "description",
    "anyOf",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "pattern",
    "minLength",
    "maxLength",
    "format",
    "enum",
}


def _fields(model: type[BaseModel], skip: frozenset[str] = frozenset()) -> list[_Field]:
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    fields = []
    for name, prop in schema["properties"].items():
        if name in skip:
            continue
        variants = prop.get("anyOf", [prop])
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) != 1:
            raise TypeError(f"{model.__name__}.{name}: only 'T' or 'T | None' is supported")
        main = non_null[0]
        unknown = (set(prop) | set(main)) - _KNOWN_KEYWORDS
        if unknown or main.get("type") not in ("number", "boolean", "string", "integer"):
            raise TypeError(f"{model.__name__}.{name}: unsupported JSON Schema {prop}")
        fields.append(
            _Field(
                name=name,
                json_type=main["type"],
                required=name in required,
                nullable=len(variants) > 1,
                constraints={k: v for k, v in main.items() if k not in ("type", "title")},
            )
        )
    return fields


def _value_ok(field: _Field, column: pl.Expr) -> pl.Expr:
    """True where a non-null value meets the field's constraints."""
    checks: list[pl.Expr] = []
    rules = field.constraints
    if field.json_type == "number":
        checks.append(column.is_finite())
    if "minimum" in rules:
        checks.append(column >= rules["minimum"])
    if "maximum" in rules:
        checks.append(column <= rules["maximum"])
    if "exclusiveMinimum" in rules:
        checks.append(column > rules["exclusiveMinimum"])
    if "exclusiveMaximum" in rules:
        checks.append(column < rules["exclusiveMaximum"])
    if "pattern" in rules:
        checks.append(column.str.contains(rules["pattern"]))
    if "minLength" in rules:
        checks.append(column.str.len_chars() >= rules["minLength"])
    if "maxLength" in rules:
        checks.append(column.str.len_chars() <= rules["maxLength"])
    if "const" in rules:
        checks.append(column == rules["const"])
    if "enum" in rules:
        checks.append(column.is_in(rules["enum"]))
    if rules.get("format") == "date-time":
        checks.append(column.str.contains(_AWARE_ISO))
    return reduce(lambda a, b: a & b, checks, pl.lit(True))


_BATCH_FIELDS = _fields(TelemetryBatch, skip=frozenset({"readings"}))
_KIND_FIELDS: dict[str, list[_Field]] = {
    kind: _fields(model, skip=frozenset({"kind"})) for kind, model in READING_MODELS.items()
}
_ALL_READING_FIELDS: dict[str, _Field] = {}
for _kind_fields in _KIND_FIELDS.values():
    for _field in _kind_fields:
        known = _ALL_READING_FIELDS.setdefault(_field.name, _field)
        if known.json_type != _field.json_type:
            raise TypeError(f"reading field {_field.name} has two types across kinds")
_VALUE_FIELDS = [name for name in _ALL_READING_FIELDS if name not in READING_ENVELOPE]

_DTYPES: dict[str, pl.DataType] = {
    "number": pl.Float64(),
    "integer": pl.Int64(),
    "string": pl.String(),
    "boolean": pl.Boolean(),
}
# An explicit schema: no inference pass, and a value of the wrong JSON type is
# an error rather than a silently widened column. Unknown keys are ignored.
_NDJSON_SCHEMA: dict[str, pl.DataType] = {
    **{field.name: _DTYPES[field.json_type] for field in _BATCH_FIELDS},
    "readings": pl.List(
        pl.Struct(
            {
                "kind": pl.String(),
                **{name: _DTYPES[f.json_type] for name, f in _ALL_READING_FIELDS.items()},
            }
        )
    ),
}


def _reading_ok() -> pl.Expr:
    per_kind = []
    for kind, fields in _KIND_FIELDS.items():
        own = {field.name for field in fields}
        checks = [pl.col("kind") == kind]
        for field in fields:
            column = pl.col(field.name)
            if field.required and not field.nullable:
                checks.append(column.is_not_null() & _value_ok(field, column))
            else:
                checks.append(column.is_null() | _value_ok(field, column))
        checks.extend(pl.col(name).is_null() for name in _ALL_READING_FIELDS if name not in own)
        per_kind.append(reduce(lambda a, b: a & b, checks))
    return reduce(lambda a, b: a | b, per_kind)


def _batch_ok() -> pl.Expr:
    checks = [
        pl.col("schema_version").is_null() | (pl.col("schema_version") == SCHEMA_VERSION),
        pl.col("readings").list.len() > 0,
    ]
    for field in _BATCH_FIELDS:
        if field.name == "schema_version":
            continue
        column = pl.col(field.name)
        checks.append(column.is_not_null() & _value_ok(field, column))
    return reduce(lambda a, b: a & b, checks)


_BATCH_KEYS = frozenset(field.name for field in _BATCH_FIELDS) | {"readings"}
_READING_KEYS = {
    kind: frozenset(field.name for field in fields) | {"kind"}
    for kind, fields in _KIND_FIELDS.items()
}
# polars reads a number or a boolean into a text column as its text; pydantic refuses it.
_BATCH_TEXT = tuple(field.name for field in _BATCH_FIELDS if field.json_type == "string")
_READING_TEXT = {
    kind: tuple(field.name for field in fields if field.json_type == "string")
    for kind, fields in _KIND_FIELDS.items()
}
# Every key in a record's text ends in `":` unless whitespace stands between a key and its
# colon (JSON allows it; such a record takes the slow way): the count of `":` is then at
# least the number of keys, more when a string holds `":` (the slow way too). A raw tab or
# carriage return can only be whitespace: inside a JSON string it must be escaped.
_SPACED_COLONS = (b'" :', b'"\t:', b'"\r:')


def _keys_in_text(value: bytes) -> int | None:
    """How many keys the record's text holds, counting up; None when it cannot tell."""
    if any(spaced in value for spaced in _SPACED_COLONS):
        return None
    return value.count(b'":')


def _texts_ok(record: dict[str, Any], names: tuple[str, ...]) -> bool:
    return all(type(record.get(name, "")) is str or record[name] is None for name in names)


def _read_alike(record: Any, keys_in_text: int) -> bool:
    """Whether polars' fixed schema reads this record as the codec (orjson, pydantic) does.

    ``record`` is the record as orjson parsed it, and ``keys_in_text`` the number of keys
    in its text. False for an unknown key (polars ignores it), a key of another reading
    kind or a null batch field (polars reads null as absent; pydantic refuses both), a
    number or boolean where text belongs (polars reads its text), and a key written twice
    (orjson keeps the last, polars the first): orjson's objects then hold fewer keys than
    the text.
    """
    if not isinstance(record, dict) or not record.keys() <= _BATCH_KEYS:
        return False
    readings = record.get("readings")
    if None in record.values() or not isinstance(readings, list):
        return False
    if not _texts_ok(record, _BATCH_TEXT):
        return False
    keys = len(record)
    for reading in readings:
        if not isinstance(reading, dict):
            return False
        kind = reading.get("kind")
        if not isinstance(kind, str) or kind not in _READING_KEYS:
            return False
        if not reading.keys() <= _READING_KEYS[kind]:
            return False
        if not _texts_ok(reading, _READING_TEXT[kind]):
            return False
        keys += len(reading)
    return keys == keys_in_text


def _read_like_the_codec(values: Sequence[bytes | None], candidates: list[int]) -> list[int]:
    """The records of ``candidates`` that polars reads as the codec does."""
    alike = []
    for index in candidates:
        value = values[index] or b""
        try:
            record = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        keys_in_text = _keys_in_text(value)
        if keys_in_text is not None and _read_alike(record, keys_in_text):
            alike.append(index)
    return alike


def _field_text(name: str) -> pl.Expr:
    """``name=value``, null where the value is null (concat_str then skips it)."""
    # Booleans print as true/false; numbers are Float64 here, so always a float
    # (``5.0``, never ``5i``): a field must keep one type across writes.
    return pl.lit(f"{name}=") + pl.col(name).cast(pl.String)


@dataclass
class Encoded:
    lines: pl.Series
    """Line protocol of every reading of the records taken, in record order."""
    records: pl.Series
    """For each line, the index of its record in the input."""
    slow: list[int]
    """Indexes of records this path did not take: the per-record path must."""


_NO_LINES = pl.Series("line", [], dtype=pl.String)
_NO_RECORDS = pl.Series("record", [], dtype=pl.Int64)


def encode_telemetry(values: Sequence[bytes | None]) -> Encoded:
    """Encode the records it can prove valid; return the indexes of the others."""
    candidates = [i for i, value in enumerate(values) if value and b"\n" not in value]
    taken = _read_like_the_codec(values, candidates)
    slow = sorted(set(range(len(values))) - set(taken))
    if not taken:
        return Encoded(_NO_LINES, _NO_RECORDS, slow)
    try:
        frame = pl.read_ndjson(
            io.BytesIO(b"\n".join(values[i] or b"" for i in taken)), schema=_NDJSON_SCHEMA
        )
    except pl.exceptions.PolarsError:
        # Not JSON, or a value of the wrong JSON type somewhere: polars cannot say
        # which record, so all of them take the per-record path.
        return Encoded(_NO_LINES, _NO_RECORDS, list(range(len(values))))
    frame = frame.with_columns(
        pl.Series("record", taken, dtype=pl.Int64), batch_ok=_batch_ok().fill_null(False)
    )
    # (explode drops empty lists: a batch without readings is caught by batch_ok)
    readings = (
        frame.select("record", "site", "readings")
        .explode("readings")
        .unnest("readings")
        .with_columns(ok=_reading_ok().fill_null(False))
    )
    bad_records = pl.concat(
        [
            frame.filter(~pl.col("batch_ok"))["record"],
            readings.filter(~pl.col("ok"))["record"],
        ]
    ).unique()
    time_ns = (
        pl.col("ts")
        .str.to_datetime(_ISO_FORMAT, time_unit="us", time_zone="UTC", strict=False)
        .dt.epoch("ns")
        .cast(pl.String)
    )
    fields = pl.concat_str(
        [_field_text(name) for name in _VALUE_FIELDS], separator=",", ignore_nulls=True
    )
    encoded = readings.filter(~pl.col("record").is_in(bad_records.implode())).select(
        "record",
        line=pl.concat_str(
            pl.col("kind"),
            pl.lit(",device="),
            pl.col("device"),
            pl.lit(",site="),
            pl.col("site"),
            pl.lit(" "),
            fields,
            pl.lit(" "),
            time_ns,
        ),
    )
    # A timestamp polars could not parse (a date that does not exist): let pydantic judge.
    unparsed = encoded.filter(pl.col("line").is_null())["record"].unique()
    if unparsed.len():
        encoded = encoded.filter(~pl.col("record").is_in(unparsed.implode()))
    slow_all = sorted({*slow, *bad_records.to_list(), *unparsed.to_list()})
    return Encoded(encoded["line"], encoded["record"], slow_all)
