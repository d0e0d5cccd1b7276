"""The benchmarks' inputs: the scale-out copies of the sample are valid settings and data
whose sites match, and the steps bench's timeline holds every kind of input."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from benchmarks import memory
from benchmarks.e2e import SAMPLE, _copied_sites, _copied_telemetry
from benchmarks.steps import _timeline
from ingest.replay import read_telemetry
from pipeline.schemas import CarbonIntensity, PriceTick
from pipeline.settings import load_settings
from processors.detection import detection_settings


def test_copied_sites_and_telemetry_name_the_same_sites(tmp_path: Path) -> None:
    config = tmp_path / "wattstream.toml"
    config.write_text(_copied_sites((SAMPLE / "wattstream.toml").read_text(), copies=3))
    settings = load_settings(config)
    original = load_settings(SAMPLE / "wattstream.toml")
    ids = [site.id for site in settings.sites]
    assert sorted(ids) == sorted(f"{s.id}-{n}" for s in original.sites for n in range(3))
    # Each copy keeps its site's sections (batteries, carbon zone...).
    home = next(s for s in original.sites if s.id == "turin-home")
    copy = next(s for s in settings.sites if s.id == "turin-home-2")
    assert copy.model_dump(exclude={"id"}) == home.model_dump(exclude={"id"})

    telemetry = tmp_path / "telemetry.parquet"
    _copied_telemetry(SAMPLE / "telemetry.parquet", telemetry, copies=3)
    frame = pl.read_parquet(telemetry)
    assert sorted(frame["site"].unique().to_list()) == sorted(ids)
    assert frame.height == 3 * pl.read_parquet(SAMPLE / "telemetry.parquet").height


def test_steps_timeline_is_in_event_time_order_with_prices_intensities_and_batches() -> None:
    settings = load_settings(SAMPLE / "wattstream.toml")
    events = list(_timeline(settings))
    times = [(ms, order) for ms, order, _ in events]
    assert times == sorted(times)
    kinds = {type(item).__name__ for _, _, item in events}
    assert {PriceTick.__name__, CarbonIntensity.__name__, "OutgoingBatch"} <= kinds
    prices = [item for _, _, item in events if isinstance(item, PriceTick)]
    assert len(prices) == 3 * 168  # three rounds of the sample's week of hourly prices
    # Each round's intensities cover its own week, once: every hour of the three weeks.
    intensity_starts = [item.start for _, _, item in events if isinstance(item, CarbonIntensity)]
    assert len(set(intensity_starts)) == len(intensity_starts) == 3 * 168
    assert {s.start for s in prices} == set(intensity_starts)


def test_memory_bench_devices_are_valid_settings_and_telemetry(tmp_path: Path) -> None:
    config = tmp_path / "wattstream.toml"
    config.write_text(memory._config())
    settings = load_settings(config)
    assert len(settings.sites) == memory.SITES
    # Every meter is watched: the worker ends holding a detector per device.
    assert all(
        (cfg := detection_settings(site)).enabled and "home" in cfg.kinds for site in settings.sites
    )

    telemetry = tmp_path / "telemetry.parquet"
    rows = memory._telemetry(telemetry)
    frame, bad = read_telemetry(telemetry)
    assert not bad and frame.height == rows
    devices = frame.select("site", "device").unique().height
    assert devices == memory.SITES * memory.DEVICES_PER_SITE == 100_000
    assert rows == devices * memory.READINGS_PER_DEVICE
    assert set(frame["site"].unique()) == {site.id for site in settings.sites}


def test_detector_memory_probe_grows_with_history() -> None:
    hour = memory._detector_bytes_per_device(1 / 24)
    days = memory._detector_bytes_per_device(3)
    assert 0 < hour < days
