"""Bytes <-> messages. Pure functions: no Kafka, no Faust.

A telemetry batch with some bad readings is salvaged: the good readings go
on, each bad one is returned with its reason so the caller dead-letters it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from pipeline.schemas import READING_ADAPTER, SCHEMA_VERSION, TelemetryBatch

M = TypeVar("M", bound=BaseModel)

# Longest excerpt of foreign input quoted in a reason: enough to recognise it.
_EXCERPT_CHARS = 120


class DecodeError(ValueError):
    """Input that can never become a valid message; retrying will not help."""

    retriable = False

    def __init__(self, reason: str, error_type: str = "DecodeError") -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_type = error_type


@dataclass(frozen=True)
class Rejected:
    """A part of an input that was rejected: its own bytes and why."""

    raw: bytes
    reason: str
    error_type: str


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def describe(error: ValidationError, limit: int = 5) -> str:
    """A one-line reason naming each bad field, e.g. ``readings.3.soc_pct: ... (got 130.0)``."""
    parts = []
    for item in error.errors()[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "(message)"
        got = item.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {str(got)[:_EXCERPT_CHARS]!r})"
        parts.append(f"{where}: {item['msg']}{shown}")
    more = error.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# A Kafka tombstone's value is None: rejected like any bad record (its dead letter's raw is
# empty), not passed on to fail where bytes are expected.
_TOMBSTONE = "no value (a tombstone): nothing to decode"


def _load(raw: bytes | None) -> Any:
    if raw is None:
        raise DecodeError(_TOMBSTONE, "EmptyValue")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise DecodeError(
            f"not JSON: {error} in {raw[:_EXCERPT_CHARS]!r}", "JSONDecodeError"
        ) from None


def _check_version(data: Any) -> None:
    if isinstance(data, dict):
        version = data.get("schema_version", SCHEMA_VERSION)
        # true == 1 and 1.0 == 1 in Python: only the JSON integer 1 is version 1.
        if type(version) is not int or version != SCHEMA_VERSION:
            raise DecodeError(
                f"unsupported schema_version {version!r}; this build reads {SCHEMA_VERSION}",
                "UnsupportedSchemaVersion",
            )


def decode(model: type[M], raw: bytes | None) -> M:
    """Parse and validate one message, or raise :class:`DecodeError` with the reason."""
    data = _load(raw)
    _check_version(data)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise DecodeError(
            f"invalid {model.__name__}: {describe(error)}", "ValidationError"
        ) from None


def decode_telemetry(raw: bytes | None) -> tuple[TelemetryBatch | None, list[Rejected]]:
    """Decode a telemetry batch, keeping its valid readings.

    Returns the batch of valid readings (None if none is valid or the envelope
    itself is broken) and the rejected parts. Never raises for bad input.
    """
    if raw is None:
        return None, [Rejected(b"", _TOMBSTONE, "EmptyValue")]
    try:
        data = _load(raw)
        _check_version(data)
    except DecodeError as error:
        return None, [Rejected(raw, error.reason, error.error_type)]
    try:
        return TelemetryBatch.model_validate(data), []
    except ValidationError as error:
        reading_errors_only = all(
            len(e["loc"]) >= 2 and e["loc"][0] == "readings" and isinstance(e["loc"][1], int)
            for e in error.errors()
        )
        if not (reading_errors_only and isinstance(data, dict)):
            return None, [
                Rejected(raw, f"invalid TelemetryBatch: {describe(error)}", "ValidationError")
            ]

    good: list[Any] = []
    rejected: list[Rejected] = []
    for index, reading in enumerate(data["readings"]):
        try:
            good.append(READING_ADAPTER.validate_python(reading))
        except ValidationError as error:
            rejected.append(
                Rejected(
                    orjson.dumps(reading),
                    f"batch {data.get('batch_id')!r} reading {index}: {describe(error)}",
                    "ValidationError",
                )
            )
    if not good:
        return None, rejected
    return TelemetryBatch.model_validate({**data, "readings": good}), rejected
