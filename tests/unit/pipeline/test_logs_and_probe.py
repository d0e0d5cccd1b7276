"""Structured logs (JSON off a terminal, batch ids, secrets masked) and the /readyz probe
a container health check runs, against a real local metrics server."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from pipeline import logs, metrics


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Any:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_file_gets_json_lines_with_the_batch_and_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    logs.setup_logging("INFO", path, secrets=["s3cr3t-token", "abc"])
    log = logging.getLogger("wattstream.test")
    log.info("outside any batch")
    with logs.batch("wattstream.telemetry/3/42"):
        log.warning("writing with token %s", "s3cr3t-token")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["message"] for r in records] == [
        "outside any batch",
        "writing with token **********",
    ]
    assert [r["batch"] for r in records] == [None, "wattstream.telemetry/3/42"]
    assert records[1]["level"] == "WARNING" and records[1]["logger"] == "wattstream.test"
    assert records[0]["time"].endswith("+00:00")  # ISO 8601, UTC
    assert "s3cr3t-token" not in path.read_text()


def test_a_terminal_gets_readable_lines_and_json_can_be_forced() -> None:
    text = logs.formatter("auto", Terminal())
    record = logging.LogRecord("w", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.batch = "t/0/1"
    assert text.format(record).endswith("INFO w: hello you [batch t/0/1]")
    forced = logs.formatter("json", Terminal())
    assert json.loads(forced.format(record))["message"] == "hello you"


def test_batch_ids_name_the_first_message() -> None:
    class Message:
        topic, partition, offset = "wattstream.telemetry", 5, 1200

    assert logs.batch_id(Message()) == "wattstream.telemetry/5/1200"


async def test_the_probe_exits_0_when_ready_and_1_with_why_when_not() -> None:
    verdict: dict[str, str | None] = {"now": None}

    async def check() -> str | None:
        return verdict["now"]

    readiness = metrics.Readiness()
    readiness.add("broker", check)
    server = metrics.MetricsServer("127.0.0.1", 0, readiness)
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/readyz"
        with pytest.raises(SystemExit) as ready:
            await asyncio.to_thread(metrics.probe, url)
        assert ready.value.code == 0
        verdict["now"] = "connection refused"
        with pytest.raises(SystemExit) as unready:
            await asyncio.to_thread(metrics.probe, url)
        assert unready.value.code == 1
        assert metrics.READY._value.get() == 0.0  # the gauge follows what /readyz said
    finally:
        await server.stop()
    with pytest.raises(SystemExit) as gone:
        metrics.probe(url, timeout_s=1)
    assert gone.value.code == 1


async def test_a_check_that_hangs_or_raises_is_a_reason_not_a_crash() -> None:
    async def hangs() -> str | None:
        await asyncio.sleep(10)
        return None

    async def raises() -> str | None:
        raise OSError("no route to host")

    readiness = metrics.Readiness(timeout_s=0.1)
    readiness.add("hangs", hangs)
    readiness.add("raises", raises)
    assert await readiness.run() == {
        "hangs": "no answer within 0.1 s",
        "raises": "OSError: no route to host",
    }
