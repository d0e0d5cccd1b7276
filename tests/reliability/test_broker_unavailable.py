"""A broker that is not there when a command starts: the command waits, says so
clearly once per attempt (no stack trace), and gets going when the broker comes;
with a bounded ``kafka.start_timeout_s`` it gives up with one line and exit code 1.

Each test starts ``wattstream`` as a real process pointed at a free loopback port
where nothing listens; the first one then starts the embedded broker on that port.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.e2e import worker_environment
from pipeline import kafka, topics
from pipeline.local import EmbeddedBroker, free_port
from pipeline.settings import Settings
from tests.conftest import SettingsFactory
from tests.workers import run_wattstream, wattstream_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RETRY_LINE = re.compile(
    r"WARNING pipeline\.kafka: Kafka broker '127\.0\.0\.1:(\d+)' not answering "
    r"\(connection refused\): attempt (\d+) after [\d.]+ s, next in ([\d.]+) s, .*"
    r"check WATTSTREAM_BROKER"
)


def environment(settings: Settings, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A worker's environment on a config with no sites: the shared telemetry agent only,
    which dead-letters what does not decode, the cheapest observable of a working worker."""
    config = tmp_path / "no-sites.toml"
    config.write_text("# no sites: the worker runs the agents every deployment has\n")
    env = worker_environment(settings, config, log_level="INFO")
    # A short ceiling, so the worker notices the broker within about a second of it
    # coming up (the default is 10 s).
    env["WATTSTREAM_KAFKA_START_RETRY_MAX_S"] = "1"
    env.update(extra)
    return env


def as_lines(output: str) -> str:
    """The JSON records a command logs off a terminal as ``LEVEL logger: message`` lines
    (the other lines as they are): the retry lines are checked by their words."""
    lines = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            lines.append(line)
            continue
        lines.append(f"{record['level']} {record['logger']}: {record['message']}")
    return "\n".join(lines)


def text_of(log: Path) -> str:
    return as_lines(log.read_text())


async def wait_for_line(
    log: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in text_of(log):
        assert process.poll() is None, text_of(log)
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s: {text_of(log)}"
        await asyncio.sleep(0.1)


async def wait_for_dead_letter(settings: Settings, timeout_s: float) -> list[bytes]:
    """Send one record that is not telemetry; return the dead letters once the worker wrote one."""
    producer = kafka.producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic(topics.TELEMETRY), b"not a telemetry batch", key=b"site-x"
        )
    finally:
        await producer.stop()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        letters = [value for _, value in await kafka.read_all(settings, topics.DEAD_LETTERS)]
        if letters:
            return letters
        await asyncio.sleep(0.5)
    raise AssertionError(f"no dead letter within {timeout_s} s")


async def test_the_worker_waits_for_a_late_broker_then_runs(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    port = free_port()
    settings = make_settings(broker=f"127.0.0.1:{port}", kafka={"one_record_per_batch": True})
    log = tmp_path / "worker.log"
    broker = EmbeddedBroker(port=port)
    try:
        with wattstream_process(environment(settings, tmp_path), log, "worker") as worker:
            # Several attempts' worth: 0.5 s, then about 1 s apart.
            await asyncio.sleep(6)
            assert worker.poll() is None, text_of(log)
            waiting = text_of(log)
            attempts = [m for line in waiting.splitlines() if (m := RETRY_LINE.search(line))]
            assert len(attempts) >= 3, waiting
            assert {int(m.group(1)) for m in attempts} == {port}
            assert all(float(m.group(3)) <= 1.0 for m in attempts)  # the ceiling holds
            assert "without a time limit" in waiting
            assert "Traceback" not in waiting
            # Only our line per attempt: aiokafka's own connect errors stay quiet meanwhile.
            assert "aiokafka" not in waiting, waiting

            broker.start()
            # The worker creates its topics once the broker answers (a record sent before
            # would auto-create the topic with the broker's default partitions).
            await wait_for_line(log, "created topics:", worker, timeout_s=20)
            letters = await wait_for_dead_letter(settings, timeout_s=40)
            assert worker.poll() is None, text_of(log)
    finally:
        # After the worker: a worker that loses its broker while stopping takes long.
        broker.close()
    assert b"not a telemetry batch" in letters[0]
    text = text_of(log)
    assert re.search(r"Kafka broker '127\.0\.0\.1:\d+' answered \(attempt \d+", text), text
    assert "created topics:" in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["worker"], id="worker"),
        pytest.param(["replay", "--prices", "PRICES"], id="replay"),
        pytest.param(["ingest", "carbon", "CARBON"], id="ingest-carbon"),
    ],
)
def test_a_bounded_start_timeout_ends_with_one_line_and_exit_1(
    command: list[str], make_settings: SettingsFactory, tmp_path: Path
) -> None:
    port = free_port()
    settings = make_settings(broker=f"127.0.0.1:{port}")
    prices = tmp_path / "prices.csv"
    prices.write_text("time,market,price_per_kwh\n2025-01-01T00:00:00Z,M,0.1\n")
    carbon = tmp_path / "carbon.toml"
    carbon.write_text(f'[carbon]\nsource = "{REPO / "data" / "sample" / "carbon.csv"}"\n')
    args = [{"PRICES": str(prices), "CARBON": str(carbon)}.get(a, a) for a in command]
    env = environment(settings, tmp_path, WATTSTREAM_KAFKA_START_TIMEOUT_S="2")
    started = time.monotonic()
    result = run_wattstream(env, *args)
    elapsed_s = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"wattstream: Kafka broker '127.0.0.1:{port}' did not answer within 2 s "
        "(connection refused); check WATTSTREAM_BROKER, or WATTSTREAM_KAFKA_START_TIMEOUT_S "
        "(0 waits without limit)"
    )
    attempts = [
        m for line in as_lines(result.stderr).splitlines() if (m := RETRY_LINE.search(line))
    ]
    assert len(attempts) >= 2, result.stderr
    assert "at most 2 s" in result.stderr
    # Python start-up and imports, then the 2 s wait: nothing waits much longer.
    assert elapsed_s < 20, elapsed_s


def test_a_signal_ends_the_wait_cleanly(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings(broker=f"127.0.0.1:{free_port()}")
    log = tmp_path / "worker.log"
    with wattstream_process(environment(settings, tmp_path), log, "worker") as worker:
        deadline = time.monotonic() + 30
        while "not answering" not in log.read_text():
            assert time.monotonic() < deadline and worker.poll() is None, log.read_text()
            time.sleep(0.2)
        worker.terminate()
        assert worker.wait(timeout=10) == 0, log.read_text()
    text = log.read_text()
    assert "stopped by SIGTERM while waiting for the Kafka broker" in text
    assert "Traceback" not in text
