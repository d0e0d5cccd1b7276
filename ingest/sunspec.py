"""SunSpec information models: definitions, a pure decoder and its inverse, discovery parsing.

The model definitions are loaded from the SunSpec Alliance's own JSON model files
as shipped by pysunspec2 (``sunspec2/models/json/model_<id>.json``); nothing here is
a hand-copied register table, so a new model revision is a package upgrade.

A model block on the wire is ``ID, L, <L registers>``; point offsets below count from
the ``ID`` register (offset 0 is ``ID``, 1 is ``L``, 2 the first body register), which is
how the JSON files list them.

Decoding (:func:`decode_model`) is pure: register words in, values out.

* Not-implemented sentinels become ``None``: ``0x8000`` int16/sunssf, ``0xFFFF``
  uint16/count/enum16/bitfield16, ``0x80000000`` int32, ``0xFFFFFFFF``
  uint32/enum32/bitfield32, ``0x8000000000000000`` int64, ``0xFFFFFFFFFFFFFFFF``
  uint64, ``0`` for accumulators (acc16/acc32/acc64) and addresses, NaN float32, and
  an all-NUL string.
* A point with a scale factor is returned as ``float`` (``raw * 10**sf``), always, so
  a field keeps one type (InfluxDB rejects a field whose type changes). When its
  scale factor is itself not implemented the value is ``None``: an unscaled number
  would be off by powers of ten. (pysunspec2 returns the raw value in that case.)
* Enumerations and bitfields are returned as their raw ``int``; :func:`symbol_name`
  names an enum value.
* Repeating groups are flattened as ``<group>[<index>].<point>``.

:func:`encode_model` is the inverse, used by the simulator and by round-trip tests.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, TypeAlias

Value: TypeAlias = float | int | str | None

SUNS_MARKER = (0x5375, 0x6E53)
"""``SunS`` as two big-endian registers: the start of a SunSpec map."""
END_MODEL_ID = 0xFFFF
"""The model id that ends the chain (its length register is 0)."""
BASE_ADDRESSES = (40000, 0, 50000)
"""Where the ``SunS`` marker may be, in the order the specification says to try."""
MAX_MODELS = 256
"""A chain longer than this is taken as corrupt (real devices have fewer than 20)."""

# type -> (size in registers, not-implemented raw value or None when the type has none)
_INT_TYPES: dict[str, tuple[int, bool, int | None]] = {
    # name: (registers, signed, not-implemented raw value)
    "int16": (1, True, -0x8000),
    "sunssf": (1, True, -0x8000),
    "uint16": (1, False, 0xFFFF),
    "count": (1, False, 0xFFFF),
    "enum16": (1, False, 0xFFFF),
    "bitfield16": (1, False, 0xFFFF),
    "acc16": (1, False, 0),
    "int32": (2, True, -0x8000_0000),
    "uint32": (2, False, 0xFFFF_FFFF),
    "enum32": (2, False, 0xFFFF_FFFF),
    "bitfield32": (2, False, 0xFFFF_FFFF),
    "acc32": (2, False, 0),
    "ipaddr": (2, False, 0),
    "int64": (4, True, -0x8000_0000_0000_0000),
    "uint64": (4, False, 0xFFFF_FFFF_FFFF_FFFF),
    "acc64": (4, False, 0),
}
_BYTES_TYPES = frozenset({"string", "ipv6addr", "eui48"})
_FLOAT_TYPES = {"float32": 2, "float64": 4}
_SKIPPED_TYPES = frozenset({"pad"})
SCALE_FACTOR_RANGE = range(-10, 11)
"""The values a ``sunssf`` may take (SunSpec: -10 to 10). Another one is a corrupt block:
``W_SF`` = 400 would make any ``W`` too large for a float."""


class SunSpecError(ValueError):
    """A register block or chain that does not follow the SunSpec rules. Not retriable:
    reading the same registers again gives the same bytes."""

    retriable = False


@dataclass(frozen=True)
class Point:
    """One point of a model, with its offset in registers from the block's ``ID``."""

    name: str
    type: str
    offset: int
    size: int
    sf: str | int | None = None
    """Name of the scale-factor point, or a fixed exponent."""
    units: str | None = None
    label: str | None = None
    symbols: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RepeatingGroup:
    """A group repeated ``count`` times after the fixed points (e.g. MPPT modules)."""

    name: str
    points: tuple[Point, ...]
    """Offsets count from the start of one repetition."""
    size: int
    count: str | int
    """A point name holding the count, or a fixed number; 0 means "as many as fit in L"."""


@dataclass(frozen=True)
class ModelDef:
    model_id: int
    name: str
    label: str
    points: tuple[Point, ...]
    """The fixed points, ``ID`` and ``L`` included."""
    fixed_length: int
    """Registers after ``L`` taken by the fixed points (the ``L`` of a model without
    repeating groups)."""
    repeating: tuple[RepeatingGroup, ...] = ()

    def point(self, name: str) -> Point:
        for point in self.points:
            if point.name == name:
                return point
        raise KeyError(f"model {self.model_id} has no point {name!r}")


def _size_of(point_json: Mapping[str, Any]) -> int:
    size = int(point_json["size"])
    type_ = point_json["type"]
    expected = _INT_TYPES.get(type_, (None,))[0] or _FLOAT_TYPES.get(type_)
    if expected is not None and size != expected:
        raise SunSpecError(f"point {point_json['name']!r}: {type_} with size {size}")
    return size


def _points(group_json: Mapping[str, Any]) -> tuple[tuple[Point, ...], int]:
    points: list[Point] = []
    offset = 0
    for p in group_json.get("points", []):
        size = _size_of(p)
        points.append(
            Point(
                name=p["name"],
                type=p["type"],
                offset=offset,
                size=size,
                sf=p.get("sf"),
                units=p.get("units"),
                label=p.get("label"),
                symbols={s["name"]: int(s["value"]) for s in p.get("symbols", [])},
            )
        )
        offset += size
    return tuple(points), offset


@cache
def load_model(model_id: int) -> ModelDef:
    """The definition of one model from pysunspec2's JSON files; KeyError when unknown."""
    try:
        text = (
            resources.files("sunspec2")
            .joinpath("models", "json", f"model_{model_id}.json")
            .read_text(encoding="utf-8")
        )
    except FileNotFoundError as error:
        raise KeyError(f"no SunSpec definition of model {model_id}") from error
    data = json.loads(text)
    top = data["group"]
    points, size = _points(top)
    repeating = []
    for group in top.get("groups", []):
        group_points, group_size = _points(group)
        if group.get("groups"):
            # None of the models we poll nests groups twice; fail loudly if one ever does.
            raise SunSpecError(f"model {model_id}: nested repeating groups are not supported")
        repeating.append(
            RepeatingGroup(
                name=group["name"],
                points=group_points,
                size=group_size,
                count=group.get("count", 1),
            )
        )
    return ModelDef(
        model_id=model_id,
        name=top["name"],
        label=top.get("label", top["name"]),
        points=points,
        fixed_length=size - 2,
        repeating=tuple(repeating),
    )


def symbol_name(model_id: int, point_name: str, value: int | None) -> str | None:
    """The symbol of an enum value (``ChaSt`` 4 -> ``CHARGING``), None when unknown."""
    if value is None:
        return None
    symbols = load_model(model_id).point(point_name).symbols
    return next((name for name, v in symbols.items() if v == value), None)


# --- decoding -----------------------------------------------------------------------


def _raw_int(words: Sequence[int], signed: bool) -> int:
    raw = 0
    for word in words:
        raw = (raw << 16) | (word & 0xFFFF)
    bits = 16 * len(words)
    if signed and raw >= 1 << (bits - 1):
        raw -= 1 << bits
    return raw


def _decode_raw(point: Point, words: Sequence[int]) -> Value:
    """The raw (unscaled) value of one point, None when not implemented."""
    if point.type in _INT_TYPES:
        _, signed, not_implemented = _INT_TYPES[point.type]
        raw = _raw_int(words, signed)
        if raw == not_implemented:
            return None
        if point.type == "ipaddr":
            return ".".join(str(b) for b in raw.to_bytes(4, "big"))
        return raw
    if point.type in _FLOAT_TYPES:
        data = b"".join(w.to_bytes(2, "big") for w in words)
        number: float = struct.unpack(">f" if len(words) == 2 else ">d", data)[0]
        return None if math.isnan(number) else number
    if point.type in _BYTES_TYPES:
        data = b"".join(w.to_bytes(2, "big") for w in words)
        if not any(data):
            return None
        if point.type == "string":
            return data.split(b"\x00", 1)[0].decode("utf-8", "replace").rstrip()
        return data.hex(":")
    raise SunSpecError(f"point {point.name!r}: unknown type {point.type!r}")


def _scale(raw: Value, exponent: Value) -> Value:
    if raw is None or exponent is None:
        return None
    assert isinstance(raw, int | float) and isinstance(exponent, int)
    # Dividing by an exact power of ten rounds once (1234 / 10 == 123.4), where
    # multiplying by 0.1 can add an error in the last digit.
    return raw / 10**-exponent if exponent < 0 else float(raw * 10**exponent)


def _decode_points(
    points: Sequence[Point],
    registers: Sequence[int],
    base: int,
    prefix: str = "",
    outer: Mapping[str, Value] | None = None,
) -> dict[str, Value]:
    """``outer``: the fixed points' raw values, for a repeating group whose scale
    factors are defined once for the whole model (model 160's ``DCW_SF``)."""
    raw: dict[str, Value] = dict(outer or {})
    for point in points:
        if point.type in _SKIPPED_TYPES:
            continue
        start = base + point.offset
        raw[point.name] = _decode_raw(point, registers[start : start + point.size])
    values: dict[str, Value] = {}
    for point in points:
        if point.type in _SKIPPED_TYPES:
            continue
        value = raw[point.name]
        if point.sf is not None:
            exponent: Value = point.sf if isinstance(point.sf, int) else raw.get(point.sf)
            if isinstance(exponent, int) and exponent not in SCALE_FACTOR_RANGE:
                raise SunSpecError(
                    f"point {prefix}{point.name!r}: scale factor {point.sf} = {exponent} is "
                    f"outside {SCALE_FACTOR_RANGE.start}..{SCALE_FACTOR_RANGE.stop - 1}"
                )
            value = _scale(value, exponent)
        values[prefix + point.name] = value
    return values


def model_length(model_id: int, registers: Sequence[int]) -> int:
    """Check a block's header against the definition; returns its ``L``."""
    if len(registers) < 2:
        raise SunSpecError(f"model {model_id}: block of {len(registers)} registers has no header")
    if registers[0] != model_id:
        raise SunSpecError(f"block starts with model id {registers[0]}, expected {model_id}")
    length = registers[1]
    definition = load_model(model_id)
    if length < definition.fixed_length:
        raise SunSpecError(
            f"model {model_id}: length {length} is shorter than its "
            f"{definition.fixed_length} fixed registers"
        )
    if len(registers) < length + 2:
        raise SunSpecError(
            f"model {model_id}: length {length} needs {length + 2} registers, got {len(registers)}"
        )
    return length


def decode_model(model_id: int, registers: Sequence[int]) -> dict[str, Value]:
    """Decode one model block (``ID``, ``L``, body) into point values.

    Scale factors are applied and not-implemented values are None (see the module
    docstring). Extra registers past the definition (a newer revision) are ignored.
    Raises :class:`SunSpecError` for a block that does not match the definition.
    """
    for i, word in enumerate(registers):
        if not 0 <= word <= 0xFFFF:
            raise SunSpecError(f"register {i} = {word} is not a 16-bit word")
    length = model_length(model_id, registers)
    definition = load_model(model_id)
    values = _decode_points(definition.points, registers, 0)
    # Raw scale factors of the fixed points, for groups that refer to them.
    outer = {
        p.name: _decode_raw(p, registers[p.offset : p.offset + p.size])
        for p in definition.points
        if p.type == "sunssf"
    }
    offset = 2 + definition.fixed_length
    for group in definition.repeating:
        if group.size == 0:
            continue
        available = (length + 2 - offset) // group.size
        count_value = group.count if isinstance(group.count, int) else values.get(group.count)
        count = available if not count_value else min(int(count_value), available)
        for index in range(count):
            values.update(
                _decode_points(group.points, registers, offset, f"{group.name}[{index}].", outer)
            )
            offset += group.size
    return values


# --- encoding (the inverse, for simulators and tests) ------------------------------------


def _encode_int(value: int, size: int, signed: bool, name: str) -> list[int]:
    bits = 16 * size
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= value <= high:
        raise ValueError(f"point {name!r}: {value} does not fit in {bits} bits")
    raw = value & ((1 << bits) - 1)
    return [(raw >> (16 * (size - 1 - i))) & 0xFFFF for i in range(size)]


def _not_implemented_words(point: Point) -> list[int]:
    if point.type in _INT_TYPES:
        _, signed, not_implemented = _INT_TYPES[point.type]
        return _encode_int(not_implemented or 0, point.size, signed, point.name)
    if point.type in _FLOAT_TYPES:
        data = struct.pack(">f" if point.size == 2 else ">d", math.nan)
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return [0] * point.size


def _encode_point(point: Point, value: Value, exponent: int | None) -> list[int]:
    if value is None or point.type in _SKIPPED_TYPES:
        return _not_implemented_words(point) if value is None else [0] * point.size
    if point.type in _INT_TYPES:
        _, signed, not_implemented = _INT_TYPES[point.type]
        if point.type == "ipaddr":
            raw = int.from_bytes(bytes(int(b) for b in str(value).split(".")), "big")
        else:
            if not isinstance(value, int | float):
                raise ValueError(f"point {point.name!r} needs a number, got {value!r}")
            if point.sf is not None:
                if exponent is None:
                    raise ValueError(f"point {point.name!r}: its scale factor is not set")
                raw = round(value / 10**exponent)
            else:
                raw = round(value)
        if raw == not_implemented:
            raise ValueError(
                f"point {point.name!r}: {value!r} encodes as the not-implemented value"
            )
        return _encode_int(raw, point.size, signed, point.name)
    if point.type in _FLOAT_TYPES:
        if not isinstance(value, int | float):
            raise ValueError(f"point {point.name!r} needs a number, got {value!r}")
        data = struct.pack(">f" if point.size == 2 else ">d", value)
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if point.type in _BYTES_TYPES:
        data = (
            str(value).encode("utf-8")
            if point.type == "string"
            else bytes.fromhex(str(value).replace(":", ""))
        )
        if len(data) > 2 * point.size:
            raise ValueError(f"point {point.name!r}: {value!r} is longer than {point.size} regs")
        data = data.ljust(2 * point.size, b"\x00")
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    raise SunSpecError(f"point {point.name!r}: unknown type {point.type!r}")


def encode_model(model_id: int, values: Mapping[str, Value]) -> list[int]:
    """The register block (``ID``, ``L``, body) holding ``values``: the inverse of decode.

    Scale-factor points (``W_SF`` ...) are given like any other value; a scaled point
    is stored as ``round(value / 10**sf)``. Points not given are "not implemented".
    Repeating groups are not encoded (none of the simulated models has one).
    """
    definition = load_model(model_id)
    unknown = set(values) - {p.name for p in definition.points}
    if unknown:
        raise KeyError(f"model {model_id} has no points {sorted(unknown)}")
    registers: list[int] = []
    for point in definition.points:
        if point.name == "ID":
            registers.append(model_id)
        elif point.name == "L":
            registers.append(definition.fixed_length)
        else:
            exponent: int | None = None
            if isinstance(point.sf, int):
                exponent = point.sf
            elif point.sf is not None:
                sf_value = values.get(point.sf)
                exponent = sf_value if isinstance(sf_value, int) else None
            registers.extend(_encode_point(point, values.get(point.name), exponent))
    return registers


# --- discovery ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelHeader:
    """Where one model of a device's chain is: ``address`` is its ``ID`` register."""

    model_id: int
    address: int
    length: int

    @property
    def end(self) -> int:
        """The address after this model's last register (the next model's ``ID``)."""
        return self.address + 2 + self.length


def next_header(address: int, model_id: int, length: int, index: int) -> ModelHeader | None:
    """Validate one step of the chain; None at the end marker."""
    if model_id == END_MODEL_ID:
        return None
    if index >= MAX_MODELS:
        raise SunSpecError(f"chain has more than {MAX_MODELS} models: no end marker")
    if model_id == 0:
        # Model id 0 is reserved; seeing it means we walked into unmapped memory.
        raise SunSpecError(f"model id 0 at address {address}: the chain is broken")
    header = ModelHeader(model_id, address, length)
    if header.end > 0x10000:
        raise SunSpecError(
            f"model {model_id} at {address} with length {length} runs past address 65535"
        )
    return header


def parse_chain(base_address: int, registers: Sequence[int]) -> list[ModelHeader]:
    """The models of a register dump that starts with ``SunS`` at ``base_address``.

    Raises :class:`SunSpecError` for a missing marker, a chain that runs off the dump
    or never ends, instead of crashing or looping.
    """
    if tuple(registers[:2]) != SUNS_MARKER:
        raise SunSpecError(f"no SunS marker at {base_address}: {list(registers[:2])}")
    headers: list[ModelHeader] = []
    offset = 2
    while True:
        if offset + 2 > len(registers):
            raise SunSpecError(
                f"chain runs past the {len(registers)} registers read at {base_address + offset}"
                " without an end marker"
            )
        header = next_header(
            base_address + offset, registers[offset], registers[offset + 1], len(headers)
        )
        if header is None:
            return headers
        headers.append(header)
        offset = header.end - base_address


__all__ = [
    "BASE_ADDRESSES",
    "END_MODEL_ID",
    "SUNS_MARKER",
    "ModelDef",
    "ModelHeader",
    "Point",
    "RepeatingGroup",
    "SunSpecError",
    "Value",
    "decode_model",
    "encode_model",
    "load_model",
    "model_length",
    "next_header",
    "parse_chain",
    "symbol_name",
]
