"""`wattstream demo`, as `make demo` runs it: embedded broker, bundled sample, a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from pydantic import TypeAdapter

from ingest.carbon import parse_carbon
from ingest.prices import read_price_file
from pipeline.schemas import Alert, Reading
from pipeline.settings import load_settings
from processors.carbon import CarbonEngine, carbon_settings, certify_with_ledger
from processors.certificates import CertificateLedger, certificate_settings
from processors.detection import SiteDetection, detection_settings
from processors.follow_sun import GridFeed, GridFeedState, follow_sun_settings
from processors.solar import detect_frame, solar_settings

pytestmark = pytest.mark.e2e

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
READING: TypeAdapter[Reading] = TypeAdapter(Reading)


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
    data_lines = [line for line in all_lines if not line.startswith("wattstream_sink,")]
    assert 0 < len(all_lines) - len(data_lines) < 100
    # The EV stage runs on the night after the sample: its points come after the sample's.
    ev = summary["ev_charging"]
    ev_start_ns = int(datetime.fromisoformat(ev["start"]).timestamp()) * 10**9
    ev_lines = [line for line in data_lines if int(line.rsplit(" ", 1)[1]) >= ev_start_ns]
    lines = [line for line in data_lines if int(line.rsplit(" ", 1)[1]) < ev_start_ns]
    _check_ev_stage(ev, ev_lines)
    # Readings, prices, decisions and their dry-run commands (one each), and allocation
    # plans: one per site per hour once the hour is over, each a plan point plus one point
    # per consumer (5). The last hour of the week is over only at the depot, where the EV
    # stage's readings follow it.
    allocation_plans = 3 * (7 * 24 - 1) + 1
    allocation_points = allocation_plans * (1 + 5)
    # Alerts of the detectors (the sample watches its PV only): whatever they find is
    # exactly what the same detectors find over the file without a broker.
    # Scope 2, certificates and follow-the-sun: what the same engines give over the files.
    records, certificates, follow_sun = _carbon_over_sample()
    follow_sun_alerts = [item for item in follow_sun if isinstance(item, Alert)]
    expected_alerts = _detector_alerts_over_sample() + follow_sun_alerts
    alert_lines = [line for line in lines if line.startswith("alert,")]
    assert len(alert_lines) == len(expected_alerts)
    assert len(follow_sun_alerts) >= 2  # the sample's clean, cheap hours open windows
    assert sum(line.startswith("emissions,") for line in lines) == len(records) == 3 * 167
    assert sum(line.startswith("certificate,") for line in lines) == len(certificates)
    assert sum(line.startswith("carbon_intensity,") for line in lines) == 168
    for site, carbon in summary["carbon"].items():
        mine = [r for r in records if r.site == site]
        assert carbon["hours"] == len(mine)
        assert carbon["location_based_kg_co2"] == pytest.approx(
            sum(r.location_based_kg_co2 for r in mine), abs=1e-3
        )
        minted = [e for e in certificates if e.site == site and e.action.value == "MINT"]
        assert carbon["certificates_minted_mwh"] == pytest.approx(
            sum(e.energy_mwh for e in minted), abs=1e-6
        )
    data_points = 90_720 + 168 + 2 * 3 * 7 * 24 + allocation_points + len(expected_alerts)
    data_points += 168 + len(records) + len(certificates) + len(follow_sun) - len(follow_sun_alerts)
    assert len(lines) == data_points
    assert summary["points_written"] == len(data_lines) == data_points + len(ev_lines)
    assert sum(line.startswith("allocation_plan,") for line in lines) == allocation_plans
    assert sum(line.startswith("decision,") for line in lines) == 3 * 7 * 24

    report = (tmp_path / "out" / "report.html").read_text()
    assert summary["report"] == "out/report.html"
    assert report.count("<svg") == 3  # one chart per battery
    for site in ("turin-home", "turin-school", "moncalieri-depot"):
        assert f"{site} / battery-1" in report
    assert "<script" not in report and "http" not in report.split("<svg")[0].lower()


def _check_ev_stage(ev: dict[str, Any], ev_lines: list[str]) -> None:
    """The depot's two vans charged over OCPP (one charger per version), the fleet's
    every setpoint was audited once, and the cars drew no more than their profiles."""
    assert ev["start"] == "2025-04-14T00:00:00+00:00"  # the first hour after the sample
    chargers = ev["chargers"]
    assert {c["vehicle"] for c in chargers} == {"van-1", "van-2"}
    assert sorted(c["protocol"] for c in chargers) == ["1.6", "2.0.1"]
    for charger in chargers:
        assert charger["sessions"] == 1 and charger["energy_kwh"] > 1.0
        assert charger["profiles_sent"] > 0
        assert charger["reports_checked"] > 0
    setpoints = sum(c["setpoints"] for c in chargers)
    assert sum(ev["audits_by_outcome"].values()) == setpoints  # one audit per command
    # Most setpoints reach a charger with its car plugged in; the last may come after
    # the car left.
    assert ev["audits_by_outcome"]["sent"] >= setpoints - len(chargers)
    # The 30 kW feeder is shared: the fleet never asks for more, and uses all of it while
    # both vans need energy (22 kW for one van at most).
    assert 22.0 < ev["peak_setpoints_kw"] <= 30.0 + 1e-6
    # The cars follow their limits from the next report on; a limit that reaches a car
    # after its next report (a slow machine) may find it drawing the previous one.
    assert ev["reports_under_limit"] >= 0.9 * ev["reports_checked"]
    measurements = Counter(line.split(",", 1)[0] for line in ev_lines)
    assert measurements == {
        "ev": ev["readings"],
        "ev_session": ev["session_events"],
        "command": setpoints,
    }
    # Plug-in, start, stop and unplug per session.
    assert ev["session_events"] == 4 * sum(c["sessions"] for c in chargers)


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


def _carbon_over_sample() -> tuple[list[Any], list[Any], list[Any]]:
    """Emissions records, certificate events and follow-the-sun outputs of the sample's
    configuration over the files, with no broker (intensities first, as the demo sends
    them; every price is known a day ahead)."""
    config = load_settings(SAMPLE / "wattstream.toml")
    intensities = parse_carbon((SAMPLE / "carbon.csv").read_bytes(), "csv").messages
    ticks = read_price_file(SAMPLE / "prices.csv").messages
    frame = pl.read_parquet(SAMPLE / "telemetry.parquet").sort("time")
    records: list[Any] = []
    events: list[Any] = []
    follow_sun: list[Any] = []
    for site in config.sites:
        cfg, cert_cfg = carbon_settings(site), certificate_settings(site)
        assert cfg is not None and cert_cfg is not None
        book = CertificateLedger(site.id)

        def ledger(book: CertificateLedger = book) -> CertificateLedger:
            return book

        engine = CarbonEngine(
            site.id, cfg, certify=certify_with_ledger(ledger, cert_cfg, site.id, events)
        )
        for intensity in intensities:
            records += engine.add_intensity(intensity)
        rows = frame.filter(pl.col("site") == site.id)
        readings = [
            READING.validate_python({k: v for k, v in row.items() if v is not None})
            for row in rows.drop("site").rename({"time": "ts"}).iter_rows(named=True)
        ]
        records += engine.add_readings(readings)
        sun = follow_sun_settings(site)
        if sun is not None:
            feed, state = GridFeed(site.id, sun), GridFeedState()
            for intensity in intensities:
                follow_sun += feed.add_intensity(state, intensity)
            for tick in ticks:
                follow_sun += feed.add_price(state, tick)
            for ts in rows["time"].unique().sort():
                follow_sun += feed.advance(state, ts)
    return records, events, follow_sun
