"""``wattstream detect`` over files: the incidents, time zones, duplicates, the command."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.detect import DetectFileError, detect_file
from pipeline.settings import load_settings
from tests.integration.test_detection_agent import (
    DROP_AT,
    SPIKE_AT,
    START,
    STEP,
    STUCK_AT,
    home_readings,
)


def write_home(tmp_path: Path, *, times: list[str] | None = None, site: bool = False) -> Path:
    readings = home_readings()
    columns: dict[str, object] = {
        "time": times or [r.ts.isoformat() for r in readings],
        "device": [r.device for r in readings],
        "kind": "home",
        "power_kw": [r.power_kw for r in readings],
    }
    if site:
        columns["site"] = "flat"
    path = tmp_path / "home.csv"
    pl.DataFrame(columns).write_csv(path)
    return path


def config(tmp_path: Path) -> Path:
    path = tmp_path / "wattstream.toml"
    path.write_text('[[sites]]\nid = "flat"\nmarket = "M"\n[sites.detection]\nkinds = ["home"]\n')
    return path


def test_the_injected_faults_are_found_where_they_were_put(tmp_path: Path) -> None:
    settings = load_settings(config(tmp_path))
    result = detect_file(write_home(tmp_path, site=True), settings=settings)
    starts = {(i.label, i.start) for i in result.incidents}
    assert ("spike", START + SPIKE_AT * STEP) in starts
    assert ("stuck", START + (STUCK_AT + 1) * STEP) in starts
    assert ("drop", START + DROP_AT * STEP) in starts
    assert all(i.end is None or i.end >= i.start for i in result.incidents)
    (device,) = result.devices
    assert (device.readings, device.step, device.gaps) == (5 * 288, STEP, 0)
    assert sum(device.incidents.values()) == len(result.incidents)
    # Only the vampire detector: none of these.
    vampire = detect_file(write_home(tmp_path, site=True), settings=settings, detectors=["vampire"])
    assert not {i.label for i in vampire.incidents} & {"spike", "stuck", "drop"}


def test_naive_times_need_a_timezone_and_are_read_in_it(tmp_path: Path) -> None:
    utc = [r.ts for r in home_readings()]
    brussels = [t.astimezone(ZoneInfo("Europe/Brussels")) for t in utc]
    path = write_home(tmp_path, times=[t.replace(tzinfo=None).isoformat() for t in brussels])
    with pytest.raises(DetectFileError, match=r"row 1: .*no UTC offset: give --timezone"):
        detect_file(path)
    result = detect_file(path, timezone="Europe/Brussels")
    assert result.devices[0].first == utc[0] and result.devices[0].last == utc[-1]


def test_the_autumn_hour_twice_is_two_hours_and_a_spring_time_that_does_not_exist_fails(
    tmp_path: Path,
) -> None:
    hours = ["2024-10-27T00:00", "2024-10-27T01:00", "2024-10-27T02:00", "2024-10-27T02:00"]
    hours += [f"2024-10-27T{h:02d}:00" for h in range(3, 6)]
    path = tmp_path / "autumn.csv"
    pl.DataFrame(
        {"time": hours, "device": "m", "kind": "meter", "power_kw": [1.0] * len(hours)}
    ).write_csv(path)
    result = detect_file(path, timezone="Europe/Brussels")
    assert result.duplicates == 0 and result.rows == 7
    assert result.devices[0].first == datetime(2024, 10, 26, 22, tzinfo=UTC)
    assert result.devices[0].last == datetime(2024, 10, 27, 4, tzinfo=UTC)
    assert result.devices[0].step == timedelta(hours=1) and result.devices[0].gaps == 0
    spring = tmp_path / "spring.csv"
    pl.DataFrame(
        {
            "time": ["2025-03-30T01:00", "2025-03-30T02:30", "2025-03-30T03:00"],
            "device": "m",
            "kind": "meter",
            "power_kw": [1.0, 1.0, 1.0],
        }
    ).write_csv(spring)
    with pytest.raises(DetectFileError, match="does not exist in Europe/Brussels"):
        detect_file(spring, timezone="Europe/Brussels")


def test_progress_is_reported_within_a_device_and_ends_at_every_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipeline.detect.PROGRESS_EVERY", 500)
    calls: list[tuple[int, int]] = []
    result = detect_file(
        write_home(tmp_path), progress=lambda done, total: calls.append((done, total))
    )
    # One device of 1,440 readings: after 500 and 1,000, then at its end.
    assert calls == [(500, 1440), (1000, 1440), (1440, 1440)]
    assert result.rows == 1440


def test_duplicates_and_rows_without_power_are_counted_not_used(tmp_path: Path) -> None:
    path = tmp_path / "dups.csv"
    path.write_text(
        "time,device,kind,power_kw\n"
        "2025-01-01T00:00:00Z,m,meter,1.0\n"
        "2025-01-01T00:05:00Z,m,meter,\n"
        "2025-01-01T00:10:00Z,m,meter,1.2\n"
        "2025-01-01T00:10:00Z,m,meter,9.9\n"
        "2025-01-01T00:40:00Z,m,meter,1.1\n"
    )
    result = detect_file(path)
    assert (result.rows, result.duplicates, result.without_power) == (3, 1, 1)
    assert result.devices[0].gaps == 1  # 00:10 -> 00:40 is more than twice the step


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("time,device,power_kw\n2025-01-01T00:00Z,m,1\n", "missing column(s) ['kind']"),
        ("time,device,kind,power_kw\nyesterday,m,meter,1\n", "row 1: time 'yesterday'"),
    ],
)
def test_bad_files_get_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DetectFileError, match=re.escape(message)):
        detect_file(path)


def test_the_command_prints_json_lines_a_table_and_usage_errors(tmp_path: Path) -> None:
    path = write_home(tmp_path, site=True)
    runner = CliRunner()
    result = runner.invoke(main, ["detect", str(path), "--config", str(config(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) >= 3
    for line in lines:
        assert {"device", "label", "start", "end", "severity", "expected", "observed"} <= set(line)
        assert datetime.fromisoformat(line["start"]).tzinfo is not None
    table = runner.invoke(main, ["detect", str(path), "--config", str(config(tmp_path))])
    assert table.exit_code == 0 and "per device" in table.stdout and "spike" in table.stdout
    bad = runner.invoke(main, ["detect", str(path), "--detectors", "anomaly,magic"])
    assert bad.exit_code == 2 and "choose from anomaly,vampire,solar" in bad.stderr
    naive = tmp_path / "naive.csv"
    naive.write_text("time,device,kind,power_kw\n2025-01-01T00:00,m,meter,1\n")
    missing_zone = runner.invoke(main, ["detect", str(naive)])
    assert missing_zone.exit_code == 2 and "--timezone" in missing_zone.stderr
