"""The arbitrage and price fan-out agents on the real embedded broker."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.peer import arbitrage_only_config
from ingest.replay import Replay
from pipeline import codec, kafka, topics
from pipeline.app import agent_input_topics, create_app
from pipeline.local import EmbeddedBroker
from pipeline.schemas import Command, DeadLetter, Decision
from pipeline.settings import Settings
from tests.conftest import SettingsFactory
from tests.expectations import expected_decisions

pytestmark = pytest.mark.integration

SITES = [
    {
        "id": f"site-{n}",
        "market": "M",
        "batteries": [
            {
                "device": "bat",
                "capacity_kwh": 10.0 * (n + 1),
                "max_charge_kw": 5.0,
                "max_discharge_kw": 5.0,
                "charge_below_price_per_kwh": 0.08,
                "discharge_above_price_per_kwh": 0.15,
            }
        ],
    }
    for n in range(3)
]
START = datetime(2025, 4, 7, tzinfo=UTC)
HOURS = 12


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    telemetry = ["time,site,device,kind,power_kw,soc_pct"]
    for minute in range(0, HOURS * 60, 5):
        ts = (START + timedelta(minutes=minute)).isoformat()
        for n in range(3):
            soc = 15 + (minute * (n + 1) // 5) % 80
            telemetry.append(f"{ts},site-{n},bat,battery,0.5,{soc}")
            telemetry.append(f"{ts},site-{n},meter,meter,1.5,")
    prices = ["time,market,price_per_kwh,published_at"]
    for hour in range(HOURS):
        price = [0.05, 0.10, 0.20, -0.01][hour % 4]
        prices.append(
            f"{(START + timedelta(hours=hour)).isoformat()},M,{price},{START.isoformat()}"
        )
    (tmp_path / "t.csv").write_text("\n".join(telemetry) + "\n")
    (tmp_path / "p.csv").write_text("\n".join(prices) + "\n")
    return tmp_path / "t.csv", tmp_path / "p.csv"


async def arbitrage_worker(
    make_settings: SettingsFactory, broker: EmbeddedBroker, tmp_path: Path, **overrides: Any
) -> tuple[Settings, Path]:
    """Settings for :data:`SITES` on the broker (``overrides`` added), their topics created,
    and the config file (tmp_path/arbitrage.toml) of a worker that runs their arbitrage only."""
    settings = make_settings(
        broker=broker.bootstrap, sites=SITES, kafka={"one_record_per_batch": True}, **overrides
    )
    config = tmp_path / "arbitrage.toml"
    config.write_text(arbitrage_only_config(settings))
    await kafka.ensure_topics(settings)
    return settings, config


async def test_replay_through_agents_gives_the_rule_decisions_and_dead_letters_bad_input(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        sites=SITES,
        kafka={"one_record_per_batch": True},
        replay={"batch_max_readings": 50},
    )
    telemetry, prices = write_inputs(tmp_path)
    await kafka.ensure_topics(settings)
    app = create_app(settings)
    await app.start()
    try:
        # A malformed record straight onto the telemetry topic, between good ones.
        producer = kafka.producer(settings)
        await producer.start()
        await producer.send_and_wait(
            settings.topic(topics.TELEMETRY), b'{"site": "site-0", "readings": [', key=b"site-0"
        )
        await producer.stop()
        stats = await Replay(settings, telemetry, prices).run()
        assert stats.readings_sent == HOURS * 12 * 6
        await kafka.wait_until_drained(
            settings,
            {settings.app_id: agent_input_topics(settings)},
            timeout_s=60,
        )
    finally:
        await app.stop()

    decoded: Callable[[bytes], Decision] = lambda raw: codec.decode(Decision, raw)  # noqa: E731
    got = [decoded(v) for _, v in await kafka.read_all(settings, topics.DECISIONS)]
    expected = expected_decisions(settings, telemetry, prices)
    assert len(expected) == 3 * HOURS
    key = lambda d: (d.site, d.valid_from)  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)
    assert {d.action.value for d in got} == {"CHARGE", "DISCHARGE", "HOLD"}

    # Every decision is also a command to its battery, dry-run by default.
    commands = [
        codec.decode(Command, v) for _, v in await kafka.read_all(settings, topics.COMMANDS)
    ]
    by_source = {c.source_id: c for c in commands}
    assert len(commands) == len(by_source) == len(got)
    for decision in got:
        command = by_source[decision.decision_id]
        assert (command.device, command.setpoint_kw) == (decision.device, decision.power_kw)
        assert command.dry_run and command.valid_until == decision.valid_until

    letters = [
        codec.decode(DeadLetter, v) for _, v in await kafka.read_all(settings, topics.DEAD_LETTERS)
    ]
    assert len(letters) == 1
    assert letters[0].error_type == "JSONDecodeError"
    assert letters[0].raw == '{"site": "site-0", "readings": ['
    assert letters[0].source_topic == settings.topic(topics.TELEMETRY)
    assert letters[0].component == "pipeline.streams.site_agents"
    assert orjson.loads(codec.encode(letters[0]))["reason"].startswith("not JSON")


def test_every_agent_crashes_the_worker_instead_of_stalling(make_settings: SettingsFactory) -> None:
    """An exception in an agent is a bug: the worker must exit, not run on without the agent."""
    import mode

    app = create_app(make_settings(broker="127.0.0.1:1", sites=SITES), with_sinks=True)
    strategies = {name: agent.supervisor_strategy for name, agent in app.agents.items()}
    assert strategies and set(strategies.values()) == {mode.CrashingSupervisor}, strategies
