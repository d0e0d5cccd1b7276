"""The `wattstream` command, run as a subprocess the way users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import schemas

WATTSTREAM = [sys.executable, "-m", "pipeline.cli"]


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    return subprocess.run(
        [*WATTSTREAM, *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "worker", "broker", "replay", "schemas", "topics", "config"):
        assert f"  {command}" in result.stdout


def test_schemas_export_writes_a_valid_json_schema_per_message(tmp_path: Path) -> None:
    result = run("schemas", "export", str(tmp_path / "schemas"))
    assert result.returncode == 0
    files = sorted(p.name for p in (tmp_path / "schemas").iterdir())
    assert files == sorted(f"{m.__name__}.schema.json" for m in schemas.ALL_MESSAGES)
    decision = json.loads((tmp_path / "schemas" / "Decision.schema.json").read_text())
    assert decision["properties"]["action"]["$ref"].endswith("Action")
    assert "decision_id" in decision["required"]


def test_an_invalid_setting_exits_2_naming_it() -> None:
    result = run("topics", env={"WATTSTREAM_PARTITIONS": "many"})
    assert result.returncode == 2
    assert "partitions (env WATTSTREAM_PARTITIONS)" in result.stderr
    assert "'many'" in result.stderr
    assert "Traceback" not in result.stderr


def test_topics_lists_the_registry_with_the_prefix() -> None:
    result = run("topics", "--json", env={"WATTSTREAM_TOPIC_PREFIX": "prod."})
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["prod.wattstream.telemetry"]["partitions"] == 8
    assert rows["prod.wattstream.prices"]["key"] == "market"


def test_config_show_masks_secrets() -> None:
    result = run("config", "show", env={"WATTSTREAM_INFLUX_PASSWORD": "s3cret-value"})
    assert result.returncode == 0
    shown = json.loads(result.stdout)
    assert shown["influx"]["password"] == "**********"
    assert "s3cret-value" not in result.stdout + result.stderr


def test_replay_without_a_broker_says_how_to_get_one(tmp_path: Path) -> None:
    prices = tmp_path / "p.csv"
    prices.write_text("time,market,price_per_kwh\n2025-01-01T00:00:00Z,M,0.1\n")
    result = run("replay", "--prices", str(prices))
    assert result.returncode == 2
    assert "WATTSTREAM_BROKER" in result.stderr


@pytest.mark.parametrize("speed", ["0", "-1", "fast"])
def test_replay_rejects_a_bad_speed(tmp_path: Path, speed: str) -> None:
    prices = tmp_path / "p.csv"
    prices.write_text("time,market,price_per_kwh\n2025-01-01T00:00:00Z,M,0.1\n")
    result = run(
        "replay", "--prices", str(prices), "--speed", speed, env={"WATTSTREAM_BROKER": "x:1"}
    )
    assert result.returncode == 2
    assert "speed" in result.stderr.lower()
