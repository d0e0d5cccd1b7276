"""Peak memory of one worker holding state for 100,000 devices.

``worker_rss_mb``: ``wattstream worker`` (every agent, the InfluxDB sink to a file) on
``SITES`` sites of ``DEVICES_PER_SITE`` household meters each (apartment blocks),
every meter sending ``READINGS_PER_DEVICE`` readings 15 minutes apart, all on the
embedded broker before the worker starts; the figure is the worker's peak resident
memory (``VmHWM``) once it has read everything. Every meter is watched by the
detectors, so the worker ends holding a live detector per device; their checkpoints
go to the table store, RocksDB by default (as here), outside the Python heap.

A worker run cannot give each of 100,000 devices the four weeks of history after which
a detector's state stops growing (its time-of-week profile keeps ``profile_days`` of
hourly means), so the growth is measured apart: ``detector_bytes_per_device_young`` and
``_mature`` are the Python heap (tracemalloc) of one site's live detectors per device
after ``READINGS_PER_DEVICE`` readings and after ``MATURE_DAYS`` days;
``worker_rss_mature_estimate_mb`` adds the difference, for 100,000 devices, to the
measured peak.

Run: ``python -m benchmarks memory``.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from benchmarks.e2e import _e2e, _load, _overrides
from pipeline.local import EmbeddedBroker
from pipeline.settings import load_settings
from processors.anomaly import DetectionSettings
from processors.detection import SiteDetection

SITES = 100
DEVICES_PER_SITE = 1_000
READINGS_PER_DEVICE = 4
STEP = timedelta(minutes=15)
START = datetime(2025, 4, 7, tzinfo=UTC)  # inside the sample's prices and intensities
MATURE_DAYS = 35
PROBE_DEVICES = 20


def _household_kw(device: int, at: datetime) -> float:
    """A plausible household load: a base, a morning and an evening peak, per-home scale."""
    hour = at.hour + at.minute / 60
    peaks = math.exp(-((hour - 7.5) ** 2) / 2) + 1.6 * math.exp(-((hour - 19.5) ** 2) / 3)
    return round((0.15 + 0.05 * (device % 7)) * (1 + 3 * peaks), 3)


def _config() -> str:
    blocks = [f'[[sites]]\nid = "block-{s}"\nmarket = "IT-NORD"\n' for s in range(SITES)]
    return "\n".join(blocks)


def _telemetry(path: Path) -> int:
    times = [START + n * STEP for n in range(READINGS_PER_DEVICE)]
    frame = pl.DataFrame(
        {
            "time": [t for t in times for _ in range(SITES * DEVICES_PER_SITE)],
            "site": [
                f"block-{s}" for _ in times for s in range(SITES) for _ in range(DEVICES_PER_SITE)
            ],
            "device": [
                f"meter-{d}" for _ in times for _ in range(SITES) for d in range(DEVICES_PER_SITE)
            ],
            "kind": "home",
            "power_kw": [
                _household_kw(d, t)
                for t in times
                for _ in range(SITES)
                for d in range(DEVICES_PER_SITE)
            ],
        }
    ).with_columns(pl.col("time").dt.replace_time_zone("UTC"))
    frame.write_parquet(path)
    return frame.height


def _detector_bytes_per_device(days: float) -> float:
    """Heap of one site's live detectors, per device, after ``days``."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        detection = SiteDetection("probe", DetectionSettings())
        steps = max(1, round(days * 24 * 3600 / STEP.total_seconds()))
        for n in range(steps):
            at = START + n * STEP
            for device in range(PROBE_DEVICES):
                detection.observe(f"meter-{device}", "home", at, _household_kw(device, at))
        used = tracemalloc.get_traced_memory()[0] - before
        assert len(detection.signals) == PROBE_DEVICES
    finally:
        tracemalloc.stop()
    return used / PROBE_DEVICES


def bench_memory() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        config = work_dir / "wattstream.toml"
        config.write_text(_config())
        telemetry = work_dir / "telemetry.parquet"
        readings = _telemetry(telemetry)
        with EmbeddedBroker() as broker:
            # The default store, as a deployment runs it: checkpoints in RocksDB, not the heap.
            overrides = {**_overrides(broker, work_dir), "store": "rocksdb"}
            settings = load_settings(config, **overrides)
            sent = asyncio.run(_load(settings, telemetry, rounds=1))
            assert sent == readings, (sent, readings)
            out = _e2e(settings, readings, config=config)
    young = _detector_bytes_per_device(READINGS_PER_DEVICE * STEP.total_seconds() / 86400)
    mature = _detector_bytes_per_device(MATURE_DAYS)
    devices = SITES * DEVICES_PER_SITE
    return {
        "memory_devices": float(devices),
        "worker_rss_mb": out["worker_rss_mb"],
        "memory_readings_per_s": out["e2e_readings_per_s"],
        "detector_bytes_per_device_young": young,
        "detector_bytes_per_device_mature": mature,
        "worker_rss_mature_estimate_mb": out["worker_rss_mb"] + devices * (mature - young) / 2**20,
    }


if __name__ == "__main__":
    for key, value in bench_memory().items():
        print(f"{key:<40} {value:>14,.1f}")
