"""`wattstream demo`, as `make demo` runs it: embedded broker, bundled sample, a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from pipeline.schemas import Alert
from pipeline.settings import load_settings
from processors.detection import SiteDetection, detection_settings
from processors.solar import detect_frame, solar_settings

pytestmark = pytest.mark.e2e

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def test_demo_runs_to_a_summary_with_every_action(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--json"],
        env=env,
        cwd=tmp_path,  # outputs (out/influx.lp, out/demo.log) land here
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    decisions = summary["summary"]
    # One decision per battery per hour: 3 batteries, 7 days.
    assert decisions["decisions"] == 3 * 7 * 24
    assert all(count > 0 for count in decisions["by_action"].values())
    assert set(decisions["by_action"]) == {"CHARGE", "DISCHARGE", "HOLD"}
    assert decisions["energy_charged_kwh"] > 0 and decisions["energy_discharged_kwh"] > 0
    assert summary["readings_replayed"] == 90_720
    assert summary["dead_letters"] == 0

    all_lines = (tmp_path / "out" / "influx.lp").read_text().splitlines()
    # The sink's own counters travel with every write; the rest are the data.
    lines = [line for line in all_lines if not line.startswith("wattstream_sink,")]
    assert 0 < len(all_lines) - len(lines) < 100
    # Readings, prices, decisions and their dry-run commands (one each), and allocation
    # plans: one per site per hour once the hour is over (the last hour of the week never
    # is: no reading follows it), each a plan point plus one point per consumer (5).
    allocation_points = 3 * (7 * 24 - 1) * (1 + 5)
    # Alerts of the detectors (the sample watches its PV only): whatever they find is
    # exactly what the same detectors find over the file without a broker.
    expected_alerts = _detector_alerts_over_sample()
    alert_lines = [line for line in lines if line.startswith("alert,")]
    assert len(alert_lines) == len(expected_alerts)
    assert (
        summary["points_written"]
        == len(lines)
        == (90_720 + 168 + 2 * 3 * 7 * 24 + allocation_points + len(expected_alerts))
    )
    assert sum(line.startswith("allocation_plan,") for line in lines) == 3 * (7 * 24 - 1)
    assert sum(line.startswith("decision,") for line in lines) == 3 * 7 * 24

    report = (tmp_path / "out" / "report.html").read_text()
    assert summary["report"] == "out/report.html"
    assert report.count("<svg") == 3  # one chart per battery
    for site in ("turin-home", "turin-school", "moncalieri-depot"):
        assert f"{site} / battery-1" in report
    assert "<script" not in report and "http" not in report.split("<svg")[0].lower()


def _detector_alerts_over_sample() -> list[Alert]:
    """The alert events of the sample's detectors, run over the telemetry file directly."""
    config = load_settings(SAMPLE / "wattstream.toml")
    frame = pl.read_parquet(SAMPLE / "telemetry.parquet").sort("time")
    alerts: list[Alert] = []
    for site in config.sites:
        arrays = solar_settings(site)
        if arrays is not None:
            found, _ = detect_frame(frame.filter(pl.col("site") == site.id), site.id, arrays)
            alerts += found
    engines = {site.id: SiteDetection(site.id, detection_settings(site)) for site in config.sites}
    for row in frame.iter_rows(named=True):
        engine = engines[row["site"]]
        alerts.extend(
            engine.observe(
                row["device"], row["kind"], row["time"], row["power_kw"], row["irradiance_w_m2"]
            )
        )
    return alerts
