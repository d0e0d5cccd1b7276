"""Price tables (CSV, JSON), time-of-use tariffs, and the feed's logic without a broker."""

from __future__ import annotations

import asyncio
import itertools
import tomllib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from pydantic import ValidationError

from ingest.entsoe import DocumentError
from ingest.prices import (
    PriceFeed,
    PriceFeedConfig,
    TouSchedule,
    parse_prices,
    read_price_file,
    redact_url,
    sniff_format,
    tou_ticks,
)
from pipeline import topics
from pipeline.metrics import ConnectorCollector
from pipeline.schemas import DeadLetter, PriceKind, PriceTick
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[3]
BRUSSELS = ZoneInfo("Europe/Brussels")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# --- CSV and JSON ----------------------------------------------------------------------------


def test_csv_per_mwh_is_divided_by_1000_and_negative_prices_are_kept() -> None:
    raw = b"time,price_per_mwh\n2025-04-07T00:00:00Z,89.42\n2025-04-07T03:00:00+02:00,-12.5\n"
    parsed = parse_prices(raw, market="DE-LU")
    assert parsed.rejected == []
    first, second = parsed.messages
    assert first.price_per_kwh == 0.08942 and second.price_per_kwh == -0.0125
    assert second.start == utc(2025, 4, 7, 1) and second.start.tzinfo is UTC
    assert first.end == second.start and second.end == utc(2025, 4, 7, 2)
    assert first.published_at == first.start  # the conservative default
    assert first.market == "DE-LU" and first.price_kind is PriceKind.DAY_AHEAD


def test_15_minute_csv_with_a_gap_keeps_15_minute_ticks() -> None:
    rows = [f"2025-04-07T00:{m:02d}:00Z,M1,0.{m + 10}" for m in (0, 15, 30)]
    rows.append("2025-04-07T01:30:00Z,M1,0.5")  # an hour missing before it
    raw = ("time,market,price_per_kwh\n" + "\n".join(rows) + "\n").encode()
    ticks = parse_prices(raw).messages
    assert [t.end - t.start for t in ticks] == [timedelta(minutes=15)] * 4
    assert ticks[-1].end == utc(2025, 4, 7, 1, 45)


def test_bad_rows_are_rejected_with_row_numbers_and_the_rest_kept() -> None:
    raw = (
        b"time,market,price_per_kwh,end\n"
        b"2025-04-07T00:00:00Z,M,0.1,\n"  # row 1: fine
        b"2025-04-07T01:00:00,M,0.1,\n"  # row 2: naive
        b"2025-04-07T02:00:00Z,M,abc,\n"  # row 3: not a number
        b"2025-04-07T03:00:00Z,M,0.1,2025-04-07T02:00:00Z\n"  # row 4: end before start
        b"2025-04-07T04:00:00Z,M,,\n"  # row 5: no price
        b"2025-04-07T05:00:00Z,M,nan,\n"  # row 6: NaN
        b"2025-04-07T06:00:00Z,M,0.2,\n"  # row 7: fine
    )
    parsed = parse_prices(raw)
    reasons = [r.reason for r in parsed.rejected]
    assert [r.split(":")[0] for r in reasons] == ["row 2", "row 3", "row 4", "row 5", "row 6"]
    assert "no UTC offset" in reasons[0]
    assert "'abc' is not a number" in reasons[1]
    assert "must be after start" in reasons[2]
    assert "finite" in reasons[4]
    assert [t.start.hour for t in parsed.messages] == [0, 6]
    assert orjson.loads(parsed.rejected[1].raw)["price_per_kwh"] == "abc"
    assert {r.error_type for r in parsed.rejected} == {"BadRow"}


def test_rows_without_any_market_are_rejected() -> None:
    parsed = parse_prices(b"time,price_per_kwh,end\n2025-04-07T00:00:00Z,0.1,2025-04-07T01:00Z\n")
    assert parsed.messages == [] and "no market" in parsed.rejected[0].reason


def test_a_single_row_needs_an_end() -> None:
    parsed = parse_prices(b"time,price_per_kwh\n2025-04-07T00:00:00Z,0.1\n", market="M")
    assert "needs an 'end'" in parsed.rejected[0].reason


def test_missing_columns_fail_the_document() -> None:
    with pytest.raises(DocumentError, match="prices need 'time'"):
        parse_prices(b"when,price\n2025-04-07T00:00:00Z,1\n", market="M")
    with pytest.raises(DocumentError, match="no price rows"):
        parse_prices(b"time,price_per_kwh\n", market="M")


def test_json_list_and_object_forms() -> None:
    rows = [
        {"time": "2025-04-07T00:00:00Z", "price_per_mwh": 100},
        {"time": "2025-04-07T00:15:00Z", "price_per_mwh": -3, "published_at": "2025-04-06T12:00Z"},
    ]
    as_object = orjson.dumps({"market": "NL", "currency": "EUR", "prices": rows})
    ticks = parse_prices(as_object).messages
    assert [(t.market, t.price_per_kwh) for t in ticks] == [("NL", 0.1), ("NL", -0.003)]
    assert ticks[1].published_at == utc(2025, 4, 6, 12)
    as_list = orjson.dumps([{**r, "market": "BE"} for r in rows])
    assert [t.market for t in parse_prices(as_list, "json").messages] == ["BE", "BE"]
    # Several markets in one table: each infers its own interval length.
    mixed = orjson.dumps(
        [
            {"time": "2025-04-07T00:00:00Z", "market": "A", "price_per_kwh": 1},
            {"time": "2025-04-07T01:00:00Z", "market": "A", "price_per_kwh": 2},
            {"time": "2025-04-07T00:00:00Z", "market": "B", "price_per_kwh": 3},
            {"time": "2025-04-07T00:15:00Z", "market": "B", "price_per_kwh": 4},
        ]
    )
    spans = {(t.market, t.end - t.start) for t in parse_prices(mixed).messages}
    assert spans == {("A", timedelta(hours=1)), ("B", timedelta(minutes=15))}


def test_broken_json_and_wrong_shapes() -> None:
    with pytest.raises(DocumentError, match="not JSON"):
        parse_prices(b"[{", "json")
    with pytest.raises(DocumentError, match="'prices' list"):
        parse_prices(b'{"market": "M"}')
    parsed = parse_prices(
        b'[{"time": "2025-04-07T00:00:00Z", "price_per_kwh": 1, "market": "M", '
        b'"end": "2025-04-07T01:00:00Z"}, 7]'
    )
    assert len(parsed.messages) == 1 and parsed.rejected[0].reason.startswith("row 2:")


def test_sniff_format() -> None:
    assert sniff_format(b"\xef\xbb\xbf  <?xml") == "entsoe"
    assert sniff_format(b"\n[") == "json" and sniff_format(b"{") == "json"
    assert sniff_format(b"time,price_per_kwh") == "csv"


def test_read_price_file_by_suffix(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(
        b'{"market": "M", "prices": [{"time": "2025-04-07T00:00:00Z", '
        b'"price_per_kwh": 0.2, "end": "2025-04-07T01:00:00Z"}]}'
    )
    assert read_price_file(path).messages[0].price_per_kwh == 0.2


# --- time-of-use tariffs ---------------------------------------------------------------------


def three_rate(**overrides: Any) -> TouSchedule:
    data: dict[str, Any] = {
        "market": "be-tou",
        "time_zone": "Europe/Brussels",
        "periods": [
            {"name": "super-off-peak", "rate_per_kwh": 0.10, "start": "01:00", "end": "07:00"},
            {
                "name": "peak",
                "rate_per_kwh": 0.40,
                "start": "17:00",
                "end": "21:00",
                "days": ["weekdays"],
            },
            {"name": "off-peak", "rate_per_kwh": 0.25, "start": "07:00", "end": "17:00"},
            {"name": "off-peak-evening", "rate_per_kwh": 0.25, "start": "21:00", "end": "01:00"},
            {
                "name": "weekend-evening",
                "rate_per_kwh": 0.20,
                "start": "17:00",
                "end": "21:00",
                "days": ["sat", "sun"],
            },
        ],
    }
    data.update(overrides)
    return TouSchedule.model_validate(data)


def local_hours(ticks: list[PriceTick]) -> list[tuple[int, float]]:
    return [(t.start.astimezone(BRUSSELS).hour, t.price_per_kwh) for t in ticks]


def test_tou_normal_weekday_hourly() -> None:
    ticks = tou_ticks(three_rate(), date(2025, 4, 7), date(2025, 4, 7))  # a Monday, CEST
    assert len(ticks) == 24
    assert ticks[0].start == utc(2025, 4, 6, 22)  # local midnight in UTC
    rates = dict(local_hours(ticks))
    assert (rates[0], rates[1], rates[6], rates[7], rates[17], rates[20], rates[21]) == (
        0.25,
        0.10,
        0.10,
        0.25,
        0.40,
        0.40,
        0.25,
    )
    assert all(t.price_kind is PriceKind.TOU and t.market == "be-tou" for t in ticks)
    assert all(t.end - t.start == timedelta(hours=1) for t in ticks)


def test_tou_weekends_have_their_own_evening_rate() -> None:
    ticks = tou_ticks(three_rate(), date(2025, 4, 12), date(2025, 4, 12))  # Saturday
    assert dict(local_hours(ticks))[18] == 0.20


def test_tou_spring_forward_day_has_23_hours_without_local_2am() -> None:
    # Europe/Brussels, 2025-03-30 (Sunday): 02:00 CET jumps to 03:00 CEST.
    ticks = tou_ticks(three_rate(), date(2025, 3, 30), date(2025, 3, 30))
    assert len(ticks) == 23
    hours = [h for h, _ in local_hours(ticks)]
    assert 2 not in hours and hours[:4] == [0, 1, 3, 4]
    assert ticks[0].start == utc(2025, 3, 29, 23) and ticks[-1].end == utc(2025, 3, 30, 22)
    assert dict(local_hours(ticks))[3] == 0.10  # still super off-peak by the wall clock


def test_tou_fall_back_day_has_25_hours_with_local_2am_twice() -> None:
    # Europe/Brussels, 2025-10-26 (Sunday): 03:00 CEST falls back to 02:00 CET.
    ticks = tou_ticks(three_rate(), date(2025, 10, 26), date(2025, 10, 26))
    assert len(ticks) == 25
    hours = local_hours(ticks)
    assert [h for h, _ in hours].count(2) == 2
    assert [rate for h, rate in hours if h == 2] == [0.10, 0.10]
    assert ticks[0].start == utc(2025, 10, 25, 22) and ticks[-1].end == utc(2025, 10, 26, 23)
    # Consecutive and gap-free in UTC across the change.
    assert all(a.end == b.start for a, b in itertools.pairwise(ticks))


def test_tou_15_minute_ticks_across_a_week_including_dst() -> None:
    schedule = three_rate(resolution_min=15)
    ticks = tou_ticks(schedule, date(2025, 3, 24), date(2025, 3, 30))
    assert len(ticks) == (7 * 24 - 1) * 4
    assert {t.end - t.start for t in ticks} == {timedelta(minutes=15)}


def test_tou_overlap_names_both_periods() -> None:
    with pytest.raises(ValidationError, match=r"'peak' overlaps 'off-peak' on mon at 16:00"):
        three_rate(
            periods=[
                {"name": "off-peak", "rate_per_kwh": 0.2, "start": "00:00", "end": "17:00"},
                {"name": "peak", "rate_per_kwh": 0.4, "start": "16:00", "end": "24:00"},
            ]
        )


def test_tou_uncovered_hours_are_named() -> None:
    with pytest.raises(ValidationError, match="no period covers sat 00:00-24:00"):
        three_rate(periods=[{"name": "all-week", "rate_per_kwh": 0.2, "days": ["weekdays"]}])
    with pytest.raises(ValidationError, match="no period covers mon 07:00-08:00"):
        three_rate(
            periods=[
                {"name": "night", "rate_per_kwh": 0.1, "start": "20:00", "end": "07:00"},
                {"name": "day", "rate_per_kwh": 0.3, "start": "08:00", "end": "20:00"},
            ]
        )


def test_tou_bad_values_are_named() -> None:
    with pytest.raises(ValidationError, match="not an IANA time zone"):
        three_rate(time_zone="Europe/Atlantis")
    with pytest.raises(ValidationError, match="'25:00' is not a clock time"):
        three_rate(periods=[{"name": "x", "rate_per_kwh": 0.1, "start": "25:00"}])
    with pytest.raises(ValidationError, match="unknown days"):
        three_rate(periods=[{"name": "x", "rate_per_kwh": 0.1, "days": ["funday"]}])
    with pytest.raises(ValidationError, match=r"'half-hour': 00:00-00:30 is not on 60-minute"):
        three_rate(
            periods=[
                {"name": "half-hour", "rate_per_kwh": 0.1, "start": "00:00", "end": "00:30"},
                {"name": "rest", "rate_per_kwh": 0.2, "start": "00:30", "end": "24:00"},
            ]
        )
    with pytest.raises(ValueError, match="before first_day"):
        tou_ticks(three_rate(), date(2025, 4, 7), date(2025, 4, 6))


# --- the feed's configuration and logic, with a fake producer ---------------------------------


def test_config_is_validated_at_construction_without_network() -> None:
    config = PriceFeedConfig(source="https://web-api.tp.entsoe.eu/api?documentType=A44")
    assert config.is_url and config.format == "auto"
    with pytest.raises(ValidationError, match="http"):
        PriceFeedConfig(source="ftp://example.org/prices.csv")
    with pytest.raises(ValidationError, match="reconnect_initial_s"):
        PriceFeedConfig(source="p.csv", reconnect_initial_s=10, reconnect_max_s=1)
    with pytest.raises(ValidationError, match="frozen"):
        config.source = "x"  # type: ignore[misc]


def commented_defaults(sample: Path, table: str) -> dict[str, Any]:
    """The ``# key = value`` lines of one table of a sample file, parsed as TOML."""
    lines, current = [], None
    for line in sample.read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif current == table and line.startswith("# ") and " = " in line:
            lines.append(line.removeprefix("# "))
    return tomllib.loads("\n".join(lines))


def test_sample_toml_is_valid_and_its_commented_defaults_are_the_real_ones() -> None:
    sample = REPO / "ingest" / "prices.sample.toml"
    config = PriceFeedConfig.from_toml(sample, "prices")
    defaults = commented_defaults(sample, "prices")
    defaults.pop("market")  # an example value: its default is None
    assert defaults and all(getattr(config, k) == v for k, v in defaults.items()), defaults
    schedule = TouSchedule.model_validate(tomllib.loads(sample.read_text())["tou"])
    assert len(tou_ticks(schedule, date(2025, 10, 26), date(2025, 10, 26))) == 25


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        self.sent.append((topic, value, key))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def settings() -> Settings:
    return Settings(broker="127.0.0.1:1", topic_prefix="t.")


async def test_feed_sends_new_ticks_once_and_dead_letters_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    feed = PriceFeed(settings(), PriceFeedConfig(source=str(path), market="M", poll_interval_s=60))
    producer = FakeProducer()
    feed._producer = producer  # no broker in unit tests

    path.write_text("time,price_per_kwh\n2025-04-07T00:00Z,0.1\n2025-04-07T01:00Z,0.2\n")
    assert await feed.poll_once() == 60
    assert await feed.poll_once() == 60  # same file again: nothing new
    assert [(t, k) for t, _, k in producer.sent] == [("t.wattstream.prices", b"M")] * 2
    assert feed.stats.sent == 2 and feed.stats.duplicates == 2

    # A corrected price for the same hour is new; a bad row is dead-lettered.
    path.write_text(
        "time,price_per_kwh\n2025-04-07T00:00Z,0.1\n2025-04-07T01:00Z,0.3\n2025-04-07T02:00,1\n"
    )
    await feed.poll_once()
    prices = [v for t, v, _ in producer.sent if t == "t.wattstream.prices"]
    assert len(prices) == 3 and PriceTick.model_validate_json(prices[-1]).price_per_kwh == 0.3
    (letter,) = [
        DeadLetter.model_validate_json(v)
        for t, v, _ in producer.sent
        if t == "t.wattstream.dead-letters"
    ]
    assert "row 3" in letter.reason and letter.source_topic == "t." + topics.PRICES.name

    # A broken document: one dead letter with the raw bytes, and the feed carries on.
    path.write_bytes(b"<Publication_MarketDocument><oops></Publication_MarketDocument>")
    assert await feed.poll_once() == 60
    letter = DeadLetter.model_validate_json(producer.sent[-1][1])
    assert "malformed XML at line 1" in letter.reason and "<oops>" in letter.raw
    assert letter.error_type == "XMLSyntaxError" and feed.stats.bad_documents == 1


async def test_unreadable_source_backs_off_exponentially_with_jitter_up_to_the_cap(
    tmp_path: Path,
) -> None:
    config = PriceFeedConfig(
        source=str(tmp_path / "missing.csv"), reconnect_initial_s=1, reconnect_max_s=8
    )
    feed = PriceFeed(settings(), config)
    delays = [await feed.poll_once() for _ in range(6)]
    for delay_s, ceiling_s in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling_s / 2 <= delay_s <= ceiling_s
    assert feed.stats.fetch_errors == 6 and "missing.csv" in (feed.stats.last_error or "")
    # What /metrics makes of it: six failed polls, none answered, no last answer yet.
    collector = ConnectorCollector()
    collector.connectors["price"] = feed.stats
    samples = {
        (s.name, tuple(s.labels.values())): s.value
        for family in collector.collect()
        for s in family.samples
    }
    assert samples[("wattstream_feed_polls_total", ("price", "error"))] == 6
    assert samples[("wattstream_feed_polls_total", ("price", "ok"))] == 0
    assert not any(name.startswith("wattstream_feed_last_answer") for name, _ in samples)
    await feed.stop()
    await feed.stop()  # safe twice


def test_credentials_in_urls_are_masked() -> None:
    url = "https://web-api.tp.entsoe.eu/api?securityToken=abc-123&documentType=A44&api_key=k"
    assert redact_url(url) == (
        "https://web-api.tp.entsoe.eu/api?securityToken=***&documentType=A44&api_key=***"
    )
    assert redact_url("data/prices.csv") == "data/prices.csv"
