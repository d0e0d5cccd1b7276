"""Fuzzed and bad telemetry through the real worker on the embedded broker.

200 records go to the telemetry topic of a worker with its agents and the InfluxDB sink
(writing to a line-protocol file): good batches, batches with some bad readings, and
records that are bad whole (not JSON, NaN tokens, unknown schema versions, broken
envelopes, every reading bad, a key that is not the batch's site, no key, a tombstone,
700 kB of garbage). Then:

* every bad record, and every bad reading of a salvaged batch, is on the dead-letter
  topic exactly once, with its own bytes, a reason that names what is wrong, the source
  topic, key and offset, and the component that rejected it; nothing else is there;
* every good reading (those of salvaged batches too) is stored by the sink, and no bad
  reading is;
* the worker did not crash on any of it.

The records are made by a seeded generator (hypothesis cannot drive an async test with
a session broker), from the same kinds of mutations as test_fuzz_decoders.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline import codec, kafka, topics
from pipeline.app import agent_input_topics, create_app
from pipeline.local import EmbeddedBroker
from pipeline.schemas import DeadLetter
from sinks.influx import DEFAULT_TOPICS
from sinks.lineprotocol import epoch_ns
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration

SEED = 20250407
RECORDS = 200
SITES = ["fz-a", "fz-b", "fz-c"]
START = datetime(2025, 4, 7, tzinfo=UTC)
COMPONENT = "pipeline.streams.site_agents"

# A bad reading: (what is done to it, a fragment of the reason).
BAD_READINGS: list[tuple[str, str]] = [
    ("nan_text", "Input should be a valid number"),  # text is not a number, "NaN" neither
    ("infinity_text", "Input should be a valid number"),
    ("true", "Input should be a valid number"),
    ("wrong_type", "Input should be a valid number"),
    ("unknown_kind", "does not match any of the expected tags"),
    ("naive_ts", "timezone"),
    ("ts_past_9999_in_utc", "out of range in UTC"),
    ("missing_power", "Field required"),
    ("bad_device", "String should match pattern"),
    ("numeric_device", "Input should be a valid string"),
    ("soc_over_100", "less than or equal to 100"),
    ("unknown_key", "Extra inputs are not permitted"),
]


@dataclass
class Reading:
    site: str
    data: dict[str, Any]

    @property
    def point(self) -> tuple[str, str, str, int]:
        """How the sink stores it: measurement, site and device tags, timestamp."""
        ts = datetime.fromisoformat(self.data["ts"])
        return self.data["kind"], self.site, self.data["device"], epoch_ns(ts)


@dataclass
class Letter:
    """A dead letter the worker must write."""

    raw: str
    error_type: str
    reason: tuple[str, ...]
    """Fragments the reason must hold."""
    key: str | None


@dataclass
class Record:
    key: str | None
    value: bytes | None
    good: list[Reading] = field(default_factory=list)
    bad: list[Reading] = field(default_factory=list)
    """Bad readings: the sink stores none of them."""
    letters: list[Letter] = field(default_factory=list)
    unchecked: list[Reading] = field(default_factory=list)
    """Valid readings of a record the agents reject for its key: the sink stores them."""


class Generator:
    """Seeded records; every reading has a device id of its own, so a stored point
    names the reading it came from."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.devices = 0
        self.minutes = 0

    def device(self) -> str:
        self.devices += 1
        return f"d{self.devices:04d}"

    def ts(self) -> str:
        rng = self.rng
        self.minutes += 1
        offset = self.minutes
        roll = rng.random()
        if roll < 0.05:
            offset -= rng.randint(1, 120)  # late: out of order
        elif roll < 0.08:
            offset = self.minutes - 1  # the same minute as the last one
        elif roll < 0.09:
            offset += 75 * 365 * 24 * 60  # a clock in 2100
        stamp = START + timedelta(minutes=offset, seconds=rng.choice([0, 0, 0.5]))
        zone = rng.choice(["Z", "Z", "+02:00"])
        if zone == "+02:00":
            return (stamp + timedelta(hours=2)).replace(tzinfo=None).isoformat() + zone
        return stamp.replace(tzinfo=None).isoformat() + "Z"

    def good(self) -> dict[str, Any]:
        rng = self.rng
        kind = rng.choice(["home", "meter", "solar", "battery", "ev", "generator"])
        data: dict[str, Any] = {"device": self.device(), "ts": self.ts(), "kind": kind}
        if kind == "home":
            data["power_kw"] = round(rng.uniform(0, 5), 3)
        elif kind == "meter":
            data |= {"power_kw": round(rng.uniform(-5, 8), 3), "voltage_v": 230.0}
        elif kind == "solar":
            data |= {"power_kw": round(rng.uniform(0, 6), 3), "irradiance_w_m2": 800.0}
        elif kind == "battery":
            data |= {"power_kw": round(rng.uniform(-5, 5), 3), "soc_pct": rng.uniform(0, 100)}
        elif kind == "ev":
            data |= {"power_kw": round(rng.uniform(-7, 11), 3), "plugged_in": rng.random() < 0.8}
        else:
            data |= {"power_kw": round(rng.uniform(0, 20), 3), "running": rng.random() < 0.5}
        return data

    def bad(self) -> tuple[dict[str, Any], str]:
        what, reason = self.rng.choice(BAD_READINGS)
        data = self.good()
        if what == "nan_text":
            data["power_kw"] = "NaN"
        elif what == "infinity_text":
            data["power_kw"] = "-Infinity"
        elif what == "true":
            data["power_kw"] = True
        elif what == "wrong_type":
            data["power_kw"] = {"value": 1.0}
        elif what == "unknown_kind":
            data["kind"] = "toaster"
        elif what == "naive_ts":
            data["ts"] = data["ts"].removesuffix("Z").removesuffix("+02:00")
        elif what == "ts_past_9999_in_utc":
            data["ts"] = "9999-12-31T23:30:00-01:00"
        elif what == "missing_power":
            del data["power_kw"]
        elif what == "bad_device":
            data["device"] = f"{data['device']} x"
        elif what == "numeric_device":
            data["device"] = 5
        elif what == "soc_over_100":
            data |= {"kind": "battery", "soc_pct": 130.0}
            data.pop("plugged_in", None)
            data.pop("running", None)
            data.pop("voltage_v", None)
            data.pop("irradiance_w_m2", None)
        else:
            data["zzz"] = 1
        return data, reason

    def batch(self, for_site: str, readings: list[dict[str, Any]], **envelope: Any) -> bytes:
        doc = {
            "schema_version": 1,
            "batch_id": f"bat-{self.rng.getrandbits(48):012x}",
            "site": for_site,
            "source": "fuzz",
            "readings": readings,
        }
        return orjson.dumps({**doc, **envelope})

    def record(self) -> Record:
        rng = self.rng
        site = rng.choice(SITES)
        roll = rng.random()
        if roll < 0.45:  # a good batch
            readings = [self.good() for _ in range(rng.randint(1, 6))]
            return Record(
                site, self.batch(site, readings), good=[Reading(site, r) for r in readings]
            )
        if roll < 0.70:  # salvaged: some readings bad, each dead-lettered on its own
            record = Record(site, None)
            readings = []
            for index in range(rng.randint(2, 7)):
                if index == 0 or rng.random() < 0.6:
                    readings.append(self.good())
                    record.good.append(Reading(site, readings[-1]))
                    continue
                data, reason = self.bad()
                readings.append(data)
                record.bad.append(Reading(site, data))
                raw = orjson.dumps(data).decode()
                record.letters.append(Letter(raw, "ValidationError", (reason,), site))
            rng.shuffle(readings)  # disorder: the reasons' indexes follow
            self._renumber(record, readings)
            record.value = self.batch(site, readings)
            return record
        return self.bad_record(site)

    def _renumber(self, record: Record, readings: list[dict[str, Any]]) -> None:
        """Each bad reading's reason names its index in the batch as sent."""
        by_raw = {orjson.dumps(r).decode(): i for i, r in enumerate(readings)}
        for letter in record.letters:
            letter.reason = (f" reading {by_raw[letter.raw]}: ", *letter.reason)

    def bad_record(self, site: str) -> Record:
        """A record rejected whole: one dead letter with its bytes (or per reading)."""
        rng = self.rng
        good = [self.good() for _ in range(rng.randint(1, 3))]
        what = rng.choice(
            [
                "bytes",
                "truncated",
                "nan_token",
                "version",
                "envelope",
                "empty",
                "all_bad",
                "key_mismatch",
                "no_key",
                "tombstone",
                "not_an_object",
            ]
        )
        if what == "bytes":
            value = b"\xff" + rng.randbytes(rng.randint(0, 300))
            return self._whole(site, value, "JSONDecodeError", "not JSON", good)
        if what == "truncated":
            value = self.batch(site, good)
            value = value[: rng.randint(1, len(value) - 1)]
            return self._whole(site, value, "JSONDecodeError", "not JSON", good)
        if what == "nan_token":
            value = self.batch(site, good).replace(b'"power_kw":', b'"power_kw":NaN,"x":', 1)
            return self._whole(site, value, "JSONDecodeError", "not JSON", good)
        if what == "version":
            version = rng.choice([2, 0, "1", None])
            value = self.batch(site, good, schema_version=version)
            return self._whole(
                site, value, "UnsupportedSchemaVersion", "unsupported schema_version", good
            )
        if what == "envelope":
            broken: dict[str, Any] = rng.choice(
                [{"site": "a b"}, {"batch_id": ""}, {"source": ""}, {"x": 1}]
            )
            value = self.batch(site, good, **broken)
            return self._whole(site, value, "ValidationError", "invalid TelemetryBatch", good)
        if what == "empty":
            value = self.batch(site, [])
            return self._whole(site, value, "ValidationError", "readings", [])
        if what == "all_bad":
            record = Record(site, None)
            readings = []
            for index in range(rng.randint(1, 4)):
                data, reason = self.bad()
                readings.append(data)
                record.bad.append(Reading(site, data))
                raw = orjson.dumps(data).decode()
                record.letters.append(
                    Letter(raw, "ValidationError", (f" reading {index}: ", reason), site)
                )
            record.value = self.batch(site, readings)
            return record
        if what == "key_mismatch":
            other = rng.choice([s for s in SITES if s != site])
            value = self.batch(site, good)
            record = self._whole(other, value, "KeyMismatch", f"!= Kafka key {other!r}", [])
            record.unchecked = [Reading(site, r) for r in good]
            return record
        if what == "no_key":
            value = self.batch(site, good)
            record = self._whole(None, value, "KeyMismatch", "!= Kafka key ''", [])
            record.unchecked = [Reading(site, r) for r in good]
            return record
        if what == "tombstone":
            return self._whole(site, None, "EmptyValue", "tombstone", [])
        value = orjson.dumps([{"site": site, "readings": good}])
        return self._whole(site, value, "ValidationError", "invalid TelemetryBatch", good)

    def _whole(
        self,
        key: str | None,
        value: bytes | None,
        error_type: str,
        reason: str,
        lost: list[dict[str, Any]],
    ) -> Record:
        """A record dead-lettered whole; its readings (``lost``) are not stored."""
        raw = "" if value is None else value.decode("utf-8", "backslashreplace")
        record = Record(key, value, letters=[Letter(raw, error_type, (reason,), key)])
        record.bad = [Reading(key or "", r) for r in lost]
        return record


def records(seed: int = SEED, count: int = RECORDS) -> list[Record]:
    generator = Generator(seed)
    out = [generator.record() for _ in range(count - 1)]
    # One oversized record: its dead letter keeps its start and still fits in a message.
    garbage = b'{"site": "fz-a", "readings": ["' + b'"' * 700_000
    out.insert(count // 2, generator._whole("fz-a", garbage, "JSONDecodeError", "not JSON", []))
    return out


def test_the_generator_makes_every_kind_of_record() -> None:
    made = records()
    assert len(made) == RECORDS
    types = {letter.error_type for record in made for letter in record.letters}
    assert types == {
        "JSONDecodeError",
        "UnsupportedSchemaVersion",
        "ValidationError",
        "KeyMismatch",
        "EmptyValue",
    }
    reasons = {fragment for r in made for letter in r.letters for fragment in letter.reason}
    assert {fragment for _, fragment in BAD_READINGS} <= reasons
    goods = sum(len(r.good) for r in made)
    bads = sum(len(r.letters) for r in made)
    assert goods > 300 and bads > 80


def is_letter(got: DeadLetter, want: Letter) -> bool:
    # An oversized record's raw is cut to fit a Kafka message: its start is kept.
    same_raw = got.raw == want.raw or (
        len(orjson.dumps(want.raw)) > 900_000 and len(got.raw) > 0 and want.raw.startswith(got.raw)
    )
    return (
        same_raw
        and got.error_type == want.error_type
        and got.key == want.key
        and all(fragment in got.reason for fragment in want.reason)
    )


def stored_points(path: Path) -> set[tuple[str, str, str, int]]:
    """The telemetry points in the sink's line-protocol file."""
    kinds = {"battery", "solar", "meter", "home", "generator", "ev", "fusion"}
    points = set()
    for line in path.read_text().splitlines():
        if line.split(",", 1)[0] not in kinds:
            continue  # decisions, alerts...: their text fields may hold spaces
        series, _fields, stamp = line.split(" ")  # telemetry: ids and numbers only
        measurement, *tags = series.split(",")
        tag = dict(t.split("=", 1) for t in tags)
        points.add((measurement, tag["site"], tag["device"], int(stamp)))
    return points


async def test_fuzzed_telemetry_is_dead_lettered_with_its_reasons_and_good_readings_are_stored(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        sites=[{"id": site, "market": "M"} for site in SITES],
        kafka={"one_record_per_batch": True},
        influx={"flush_interval_s": 0.2},
    )
    made = records()
    await kafka.ensure_topics(settings)
    app = create_app(settings, with_sinks=True)
    telemetry = settings.topic(topics.TELEMETRY)
    await app.start()
    try:
        producer = kafka.producer(settings)
        await producer.start()
        try:
            for record in made:
                key = None if record.key is None else record.key.encode()
                await producer.send_and_wait(telemetry, record.value, key=key)
        finally:
            await producer.stop()
        # The agents and the sink (its own group) have read everything, and it stays so.
        await kafka.wait_until_drained(
            settings,
            {
                settings.app_id: agent_input_topics(settings),
                f"{settings.app_id}-sink-influx": [settings.topic(s) for s in DEFAULT_TOPICS],
            },
            timeout_s=90,
            failed=lambda: app.crash_reason,
        )
    finally:
        await app.stop()
    assert app.crash_reason is None

    # Every rejection is on the dead-letter topic once, with its bytes and its reason.
    letters = [
        codec.decode(DeadLetter, value)
        for _, value in await kafka.read_all(settings, topics.DEAD_LETTERS)
    ]
    expected = [letter for record in made for letter in record.letters]
    assert len(letters) == len(expected)
    unmatched = list(letters)
    for want in expected:
        match = next((got for got in unmatched if is_letter(got, want)), None)
        assert match is not None, (want, [g for g in unmatched if g.key == want.key][:3])
        unmatched.remove(match)
        assert match.source_topic == telemetry and match.component == COMPONENT
        assert match.source_offset is not None and match.source_partition is not None
        assert len(codec.encode(match)) < 1_000_000
    assert unmatched == []

    # Every good reading is stored, salvaged batches' included; no bad one is.
    stored = stored_points(settings.influx.file)
    good = [reading.point for record in made for reading in record.good]
    assert len(good) > 300
    missing = [point for point in good if point not in stored]
    assert missing == []
    stored_devices = {device for _, _, device, _ in stored}
    leaked = [
        reading.data
        for record in made
        for reading in record.bad
        if str(reading.data.get("device")) in stored_devices
    ]
    assert leaked == []
