"""Running a Faust worker in a test: start it, produce its input, wait until it is read, stop;
or a ``wattstream`` command as a process of its own; and reading what it serves on /metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faust
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import kafka
from pipeline.local import stop_process
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def start_wattstream(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``wattstream ARGS`` as a process, its stderr appended to ``log`` (a pipe nobody
    reads would block it once full)."""
    with log.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )


def run_wattstream(
    env: dict[str, str], *args: str, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``wattstream ARGS`` to its end, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@contextmanager
def wattstream_process(
    env: dict[str, str], log: Path, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """:func:`start_wattstream`, stopped by its pid at the end."""
    process = start_wattstream(env, log, *args)
    try:
        yield process
    finally:
        stop_process(process, timeout_s=30)


async def run_worker(
    app: faust.App,
    settings: Settings,
    records: Sequence[tuple[str, str, bytes]],
    drained: Sequence[str],
    timeout_s: float = 40.0,
) -> None:
    """Start ``app``, send ``records`` (topic, key, value) in order, wait until its group
    has read the ``drained`` topics to their end, stop it (also when the wait fails)."""
    await app.start()
    try:
        producer = kafka.producer(settings)
        await producer.start()
        try:
            for topic, key, value in records:
                await producer.send_and_wait(topic, value, key=key.encode())
        finally:
            await producer.stop()
        await kafka.wait_until_drained(
            settings,
            {settings.app_id: list(drained)},
            timeout_s=timeout_s,
            failed=lambda: app.crash_reason,
        )
    finally:
        await app.stop()


async def until_done_or_dead(
    work: Coroutine[Any, Any, None], process: subprocess.Popen[bytes], log: Path
) -> None:
    """Await ``work``, failing at once (with the log) if the process dies meanwhile."""
    task = asyncio.ensure_future(work)
    while not task.done():
        if process.poll() is not None:
            task.cancel()
            output = log.read_text()[-3000:]  # noqa: ASYNC240 - test failure path only
            pytest.fail(f"worker exited with {process.returncode}:\n{output}")
        await asyncio.wait([task], timeout=0.5)
    task.result()


def metrics_page(url: str) -> dict[tuple[str, tuple[str, ...]], float]:
    """Every sample of a /metrics page, by name and label values in the order of the
    labels' names (``le`` left out): ``("wattstream_sink_points_total", ("written",
    "influx"))`` for ``outcome`` and ``sink``."""
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our loopback URL
        text = response.read().decode()
    return {
        (s.name, tuple(v for k, v in sorted(s.labels.items()) if k != "le")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "le" not in s.labels
    }
