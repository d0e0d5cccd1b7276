"""``wattstream backtest`` as a user runs it: JSON, table and report, blanks, bad arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.conftest import SAMPLE_CONFIG

SAMPLE_PRICES = SAMPLE_CONFIG.parent / "prices.csv"
BATTERY = ["--capacity-kwh", "10", "--power-kw", "5", "--round-trip-efficiency", "0.9"]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["backtest", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_json_has_every_strategy_and_the_bound() -> None:
    code, out, _ = run("--prices", str(SAMPLE_PRICES), *BATTERY, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["hours"] == 168 and result["skipped_rows"] == 0
    bound = result["bound"]["revenue"]
    threshold = result["strategies"]["threshold"]["revenue"]
    optimal = result["strategies"]["optimal"]["revenue"]
    assert 0 < threshold < optimal <= bound + 1e-9
    assert optimal >= 0.9 * bound


@pytest.mark.parametrize(("capacity", "power"), [("13.5", "5"), ("100", "100"), ("20", "2.5")])
def test_optimal_reaches_nine_tenths_of_the_bound_on_the_sample(capacity: str, power: str) -> None:
    args = ["--capacity-kwh", capacity, "--power-kw", power, "--round-trip-efficiency", "0.88"]
    code, out, _ = run("--prices", str(SAMPLE_PRICES), *args, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["strategies"]["optimal"]["share_of_bound"] >= 0.9


def test_blank_prices_are_skipped_and_counted(tmp_path: Path) -> None:
    lines = SAMPLE_PRICES.read_text().splitlines()
    header = lines[0].split(",")
    price_column = header.index("price_per_kwh")
    rows = [line.split(",") for line in lines[1:]]
    for row in rows[30:40]:
        row[price_column] = ""
    path = tmp_path / "holes.csv"
    path.write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    code, out, err = run("--prices", str(path), *BATTERY, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["skipped_rows"] == 10 and result["intervals"] == 158
    assert "no price" in err


def test_table_and_html_report(tmp_path: Path) -> None:
    report = tmp_path / "bt.html"
    code, out, _ = run("--prices", str(SAMPLE_PRICES), *BATTERY, "--report", str(report))
    assert code == 0
    assert "perfect foresight" in out and "optimal" in out and "threshold" in out
    page = report.read_text()
    assert page.count("<svg") == 1 and "of bound" in page and "<script" not in page


def test_fixed_thresholds_are_used_when_given() -> None:
    code, out, _ = run(
        "--prices", str(SAMPLE_PRICES), *BATTERY, "--json", "--strategy", "threshold",
        "--charge-below", "-5", "--discharge-above", "5",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert list(result["strategies"]) == ["threshold"]
    assert result["strategies"]["threshold"]["revenue"] == 0  # thresholds never reached


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--soc-min-pct", "60", "--soc-max-pct", "40"], "--soc-min-pct"),
        (["--charge-below", "0.1"], "both --charge-below and --discharge-above"),
        (["--timezone", "Mars/Olympus"], "unknown time zone"),
        (["--publication-time", "noon"], "clock time"),
    ],
)
def test_bad_arguments_exit_2_naming_them(args: list[str], message: str) -> None:
    code, _, err = run("--prices", str(SAMPLE_PRICES), *BATTERY, *args, "--json")
    assert code == 2 and message in err


def test_a_file_with_no_prices_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("time,price_per_kwh\n2025-01-01T00:00:00Z,\n2025-01-01T01:00:00Z,\n")
    code, _, err = run("--prices", str(path), *BATTERY, "--json")
    assert code == 2 and "empty.csv: no row has a price: every price_per_kwh or" in err


def test_a_history_may_start_with_blank_prices(tmp_path: Path) -> None:
    path = tmp_path / "late.csv"
    path.write_text(
        "time,price_per_kwh\n2025-01-01T00:00:00Z,\n2025-01-01T01:00:00Z,0.1\n"
        "2025-01-01T02:00:00Z,0.3\n"
    )
    code, out, _ = run("--prices", str(path), *BATTERY, "--json")
    assert code == 0 and json.loads(out)["skipped_rows"] == 1


def test_times_without_offset_need_the_timezone_they_were_written_in(tmp_path: Path) -> None:
    path = tmp_path / "naive.csv"
    rows = [f"2025-01-0{1 + h // 24}T{h % 24:02d}:00:00,{0.1 + 0.1 * (h % 3)}" for h in range(48)]
    path.write_text("time,price_per_kwh\n" + "\n".join(rows) + "\n")
    code, _, err = run("--prices", str(path), *BATTERY, "--json")
    assert code == 2 and "row 1" in err and "--timezone" in err
    code, out, _ = run("--prices", str(path), *BATTERY, "--json", "--timezone", "Europe/Rome")
    assert code == 0
    result = json.loads(out)
    assert result["first"] == "2024-12-31T23:00:00+00:00" and result["intervals"] == 48


def test_an_autumn_day_in_local_time_has_25_hours_and_no_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "autumn.csv"
    hours = [f"2024-10-27T{h:02d}:00:00" for h in range(3)]
    hours += ["2024-10-27T02:00:00"] + [f"2024-10-27T{h:02d}:00:00" for h in range(3, 24)]
    path.write_text(
        "time,price_per_mwh\n" + "\n".join(f"{t},{50 + i}" for i, t in enumerate(hours)) + "\n"
    )
    code, out, _ = run(
        "--prices", str(path), *BATTERY, "--json", "--timezone", "Europe/Brussels"
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["intervals"] == 25 and result["gaps"] == []
    assert result["first"] == "2024-10-26T22:00:00+00:00"
    assert result["last"] == "2024-10-27T22:00:00+00:00"


def test_a_file_with_duplicate_instants_or_mixed_steps_is_refused_naming_rows(
    tmp_path: Path,
) -> None:
    duplicate = tmp_path / "duplicate.csv"
    duplicate.write_text(
        "time,price_per_kwh\n2025-01-01T00:00Z,0.1\n2025-01-01T01:00Z,0.2\n"
        "2025-01-01T01:00Z,0.3\n2025-01-01T02:00Z,0.1\n"
    )
    code, _, err = run("--prices", str(duplicate), *BATTERY, "--json")
    assert code == 2 and "rows 2 and 3" in err
    mixed = tmp_path / "mixed.csv"
    times = [f"2025-01-01T{h:02d}:00Z" for h in range(6)]
    times += [f"2025-01-01T06:{m:02d}Z" for m in (15, 30, 45)]
    times += [f"2025-01-01T{h:02d}:{m:02d}Z" for h in range(7, 10) for m in (0, 15, 30, 45)]
    mixed.write_text("time,price_per_kwh\n" + "\n".join(f"{t},0.1" for t in times) + "\n")
    code, _, err = run("--prices", str(mixed), *BATTERY, "--json")
    assert code == 2 and "mixes steps: rows 1 to 7" in err


def test_foresight_none_and_its_mpc_in_the_json_and_the_table(tmp_path: Path) -> None:
    code, out, _ = run("--prices", str(SAMPLE_PRICES), *BATTERY, "--json", "--foresight", "none")
    assert code == 0
    result = json.loads(out)
    assert result["foresight"] == "none" and set(result["strategies"]) == {
        "threshold",
        "optimal",
        "mpc",
    }
    assert 0 < result["strategies"]["mpc"]["share_of_bound"] <= 1
    report = tmp_path / "none.html"
    code, out, _ = run(
        "--prices", str(SAMPLE_PRICES), *BATTERY, "--foresight", "none", "--report", str(report)
    )  # fmt: skip
    assert code == 0 and "foresight none" in out and "mpc forecast mean absolute error" in out
    page = report.read_text()
    assert "foresight <b>none</b>" in page and "The mpc forecaster" in page
    assert all(f"<td>{name}</td>" in page for name in ("threshold", "optimal", "mpc"))
