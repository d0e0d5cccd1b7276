"""The quixstreams peer of the benchmarks computes what the worker computes.

If it did not, ``peer_quixstreams_readings_per_s`` would compare different work.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.peer import arbitrage_only_config, decision_ids, peer_drained, start_peer
from ingest.replay import Replay
from pipeline import kafka, topics
from pipeline.app import agent_input_topics, create_app
from pipeline.local import EmbeddedBroker, stop_process
from tests.conftest import SettingsFactory
from tests.integration.test_arbitrage_agent import HOURS, SITES, write_inputs

pytestmark = pytest.mark.integration


async def test_peer_makes_the_same_decisions_and_commands_as_the_worker(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap, sites=SITES, kafka={"one_record_per_batch": True}
    )
    telemetry, prices = write_inputs(tmp_path)
    await kafka.ensure_topics(settings)
    app = create_app(settings)
    await app.start()
    try:
        await Replay(settings, telemetry, prices).run()
        await kafka.wait_until_drained(
            settings, {settings.app_id: agent_input_topics(settings)}, timeout_s=60
        )
    finally:
        await app.stop()
    ours = await decision_ids(
        settings, settings.topic(topics.DECISIONS), settings.topic(topics.COMMANDS)
    )
    assert len(ours) == 2 * 3 * HOURS  # a decision and a command per site and hour

    config = tmp_path / "arbitrage.toml"
    config.write_text(arbitrage_only_config(settings))
    group, output = f"{settings.app_id}-peer", f"{settings.topic_prefix}peer-decisions"
    peer = start_peer(settings, group, config, tmp_path, output)
    try:
        await peer_drained(settings, group, peer, timeout_s=120)
    finally:
        stop_process(peer, timeout_s=30)
    assert peer.returncode in (0, -15), (tmp_path / "peer.log").read_text()
    assert await decision_ids(settings, output) == ours
