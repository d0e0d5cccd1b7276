"""``wattstream detect`` over a million readings (the issue's goal: under 10 s, one core).

Twenty household meters, 50,000 five-minute readings each (about six months), with a
daily shape and noise, written to a Parquet file; timed from reading the file to the
list of incidents, with every detector on.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.detect import detect_file

DEVICES = 20
READINGS_PER_DEVICE = 50_000


def million_readings(path: Path, seed: int = 3) -> int:
    rng = np.random.default_rng(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    steps = np.arange(READINGS_PER_DEVICE)
    times = [start + timedelta(minutes=5 * int(k)) for k in steps]
    frames = []
    for d in range(DEVICES):
        hour = (steps * 5 / 60) % 24
        power = 0.4 + 0.3 * np.sin((hour - 7) * np.pi / 12) ** 2 + rng.gamma(2, 0.05, len(steps))
        frames.append(
            pl.DataFrame(
                {"time": times, "device": f"home-{d:02d}", "kind": "home", "power_kw": power}
            )
        )
    frame = pl.concat(frames)
    frame.write_parquet(path)
    return frame.height


def bench_detect() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "million.parquet"
        readings = million_readings(path)
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        result = detect_file(path)
        wall_s = time.perf_counter() - wall_before
        cpu_s = time.process_time() - cpu_before
    return {
        "detect_readings": float(readings),
        "detect_wall_s": wall_s,
        "detect_cpu_s": cpu_s,
        "detect_readings_per_s": readings / wall_s,
        "detect_incidents": float(len(result.incidents)),
    }
