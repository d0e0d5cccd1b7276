"""``wattstream worker`` as a process: ``--no-sinks`` runs the agents without the sinks,
and a worker with its sinks (the default) in the same app writes what they left out."""

from __future__ import annotations

import subprocess
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from benchmarks.e2e import worker_environment
from benchmarks.peer import decision_ids
from ingest.replay import Replay
from pipeline import kafka, topics
from pipeline.app import agent_input_topics
from pipeline.local import EmbeddedBroker
from pipeline.settings import Settings
from tests.conftest import SettingsFactory
from tests.integration.test_arbitrage_agent import HOURS, arbitrage_worker, write_inputs
from tests.workers import wattstream_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def running_worker(
    settings: Settings, config: Path, log: Path, *args: str
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    env = worker_environment(settings, config, log_level="INFO")
    return wattstream_process(env, log, "worker", *args)


async def test_no_sinks_runs_the_agents_only(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings, config = await arbitrage_worker(make_settings, kafka_broker, tmp_path)
    telemetry_file, prices_file = write_inputs(tmp_path)
    await Replay(settings, telemetry_file, prices_file).run()
    telemetry = settings.topic(topics.TELEMETRY)
    sink_group = f"{settings.app_id}-sink-influx"

    agents_log = tmp_path / "agents.log"
    with running_worker(settings, config, agents_log, "--no-sinks") as agents:
        await kafka.wait_until_drained(
            settings, {settings.app_id: agent_input_topics(settings)}, timeout_s=120
        )
        assert agents.poll() is None, agents_log.read_text()
    assert "agents only (--no-sinks)" in agents_log.read_text()
    decisions = await decision_ids(
        settings, settings.topic(topics.DECISIONS), settings.topic(topics.COMMANDS)
    )
    assert len(decisions) == 2 * 3 * HOURS  # a decision and a command per site and hour
    assert not settings.influx.file.exists()
    assert (await kafka.group_lag(settings, sink_group, [telemetry])).committed == {}

    # The default worker of the same app: its agents find nothing left, its sink the
    # whole telemetry topic.
    with running_worker(settings, config, tmp_path / "full.log") as full:
        await kafka.wait_until_drained(settings, {sink_group: [telemetry]}, timeout_s=120)
        assert full.poll() is None, (tmp_path / "full.log").read_text()
    lines = settings.influx.file.read_text().splitlines()
    assert sum(line.startswith("battery,") for line in lines) == 3 * HOURS * 12
