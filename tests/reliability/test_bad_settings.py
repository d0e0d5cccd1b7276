"""Bad settings stop a command at start-up with exit code 2 and a message that names
each offending setting (its environment variable or its TOML path), never a Python
traceback; typos (unknown keys, unknown WATTSTREAM_* variables) are errors, not
ignored. And no secret ever shows: not in ``wattstream config show``, not in an
error, not in the worker's start-up log.

The table runs through the real ``wattstream`` entry point (click's CliRunner, in
process, for speed); one case and the log check run it as a real process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.local import EmbeddedBroker, free_port, stop_process
from tests.workers import run_wattstream

REPO = Path(__file__).resolve().parents[2]

SITE = '[[sites]]\nid = "s1"\nmarket = "M"\n'
BATTERY = (
    SITE + "  [[sites.batteries]]\n"
    '  device = "b1"\n'
    "  capacity_kwh = 10\n"
    "  max_charge_kw = 5\n"
    "  max_discharge_kw = 5\n"
    "  charge_below_price_per_kwh = 0.05\n"
    "  discharge_above_price_per_kwh = 0.15\n"
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("WATTSTREAM_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The worker command configures the root logger (to CliRunner's stream): undo it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def battery(**fields: object) -> str:
    """The valid battery above with ``fields`` set (TOML values), replaced or added."""
    kept = [line for line in BATTERY.splitlines() if line.strip().split(" = ")[0] not in fields]
    return "\n".join([*kept, *(f"  {key} = {value}" for key, value in fields.items())]) + "\n"


def invoke(tmp_path: Path, args: list[str], env: dict[str, str], toml: str | None) -> Result:
    if toml is not None:
        path = tmp_path / "settings.toml"
        path.write_text(toml)
        args = ["--config", str(path), *args]
    return CliRunner().invoke(main, args, env=env)


def assert_clean_usage_error(result: Result, names: tuple[str, ...]) -> None:
    shown = result.stderr
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    # The command ended by sys.exit with its message, not by an exception.
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert shown.startswith("wattstream: "), shown
    for name in names:
        assert name in shown, f"{name!r} not named in:\n{shown}"


# (env, TOML file, what the message must name). Each row holds one mistake.
CONFIG_SHOW_CASES = [
    # --- top level, from the environment
    pytest.param({"WATTSTREAM_PARTITIONS": "many"}, None, ("WATTSTREAM_PARTITIONS",), id="env-int"),
    pytest.param({"WATTSTREAM_PARTITIONS": "0"}, None, ("WATTSTREAM_PARTITIONS",), id="env-range"),
    pytest.param({"WATTSTREAM_STORE": "redis"}, None, ("WATTSTREAM_STORE",), id="env-choice"),
    pytest.param({"WATTSTREAM_LOG_LEVEL": "loud"}, None, ("WATTSTREAM_LOG_LEVEL",), id="env-level"),
    pytest.param({"WATTSTREAM_APP_ID": "has space"}, None, ("WATTSTREAM_APP_ID",), id="env-id"),
    pytest.param(
        {"WATTSTREAM_TOPIC_PREFIX": "a/b"}, None, ("WATTSTREAM_TOPIC_PREFIX",), id="env-prefix"
    ),
    pytest.param(
        {"WATTSTREAM_BROKR": "k:9092"},
        None,
        ("WATTSTREAM_BROKR", "WATTSTREAM_BROKER"),
        id="env-typo",
    ),
    pytest.param(
        {"WATTSTREAM_DATADIR": "/tmp/x"}, None, ("WATTSTREAM_DATADIR",), id="env-typo-no-area"
    ),
    pytest.param({"WATTSTREAM_SITES": "not json"}, None, ("WATTSTREAM_SITES",), id="env-json"),
    pytest.param(
        {"WATTSTREAM_SITES": '[{"id": "a"}]'}, None, ("sites[0].market",), id="env-sites-missing"
    ),
    pytest.param({"WATTSTREAM_SITES_ID": "a"}, None, ("WATTSTREAM_SITES_ID",), id="env-sites-typo"),
    # --- kafka.*, from the environment
    pytest.param(
        {"WATTSTREAM_KAFKA_SECURITY_PROTOCOL": "TLS"},
        None,
        ("WATTSTREAM_KAFKA_SECURITY_PROTOCOL",),
        id="env-kafka-protocol",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_SASL_MECHANISM": "GSSAPI"},
        None,
        ("WATTSTREAM_KAFKA_SASL_MECHANISM",),
        id="env-kafka-mechanism",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
        None,
        ("kafka.sasl_username", "kafka.sasl_password"),
        id="env-kafka-sasl-needs-credentials",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_SESSION_TIMEOUT_S": "-1"},
        None,
        ("WATTSTREAM_KAFKA_SESSION_TIMEOUT_S",),
        id="env-kafka-negative",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_MAX_MESSAGE_BYTES": "10"},
        None,
        ("WATTSTREAM_KAFKA_MAX_MESSAGE_BYTES",),
        id="env-kafka-small",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_FETCH_MAX_WAIT_MS": "0"},
        None,
        ("WATTSTREAM_KAFKA_FETCH_MAX_WAIT_MS",),
        id="env-kafka-fetch-wait",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH": "sometimes"},
        None,
        ("WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH",),
        id="env-kafka-bool",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_START_TIMEOUT_S": "-5"},
        None,
        ("WATTSTREAM_KAFKA_START_TIMEOUT_S",),
        id="env-kafka-start-timeout",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_START_RETRY_MAX_S": "0"},
        None,
        ("WATTSTREAM_KAFKA_START_RETRY_MAX_S",),
        id="env-kafka-retry-ceiling",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "WATTSTREAM_KAFKA_SSL_CAFILE": "/no/ca.pem"},
        None,
        ("kafka.ssl_cafile", "WATTSTREAM_KAFKA_SSL_CAFILE"),
        id="env-kafka-cafile-missing",
    ),
    pytest.param(
        {
            "WATTSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
            "WATTSTREAM_KAFKA_SSL_CERTFILE": "PEM:junk",
        },
        None,
        ("kafka.ssl_certfile",),
        id="env-kafka-certfile-not-pem",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "WATTSTREAM_KAFKA_SSL_CAFILE": "PEM:junk"},
        None,
        ("kafka.ssl_cafile",),
        id="env-kafka-cafile-not-pem",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_SSL_KEYFILE": "PEM:junk"},
        None,
        ("kafka.ssl_keyfile", "WATTSTREAM_KAFKA_SSL_CERTFILE"),
        id="env-kafka-key-without-cert",
    ),
    pytest.param(
        {"WATTSTREAM_KAFKA_SASL_PASWORD": "x"},
        None,
        ("WATTSTREAM_KAFKA_SASL_PASWORD", "kafka.sasl_password"),
        id="env-kafka-typo",
    ),
    # --- influx.*, from the environment
    pytest.param(
        {"WATTSTREAM_INFLUX_API": "v3"}, None, ("WATTSTREAM_INFLUX_API",), id="env-influx-api"
    ),
    pytest.param(
        {"WATTSTREAM_INFLUX_URL": "localhost:8086"},
        None,
        ("WATTSTREAM_INFLUX_URL",),
        id="env-influx-url-scheme",
    ),
    pytest.param(
        {"WATTSTREAM_INFLUX_URL": "http://"},
        None,
        ("WATTSTREAM_INFLUX_URL",),
        id="env-influx-no-host",
    ),
    pytest.param(
        {"WATTSTREAM_INFLUX_URL": "http://admin:pw@influx:8086"},
        None,
        ("WATTSTREAM_INFLUX_URL", "influx.password"),
        id="env-influx-url-credentials",
    ),
    pytest.param(
        {"WATTSTREAM_INFLUX_BATCH_SIZE_POINTS": "0"},
        None,
        ("WATTSTREAM_INFLUX_BATCH_SIZE_POINTS",),
        id="env-influx-batch",
    ),
    pytest.param(
        {"WATTSTREAM_INFLUX_BUFFER_POINTS": "10"},
        None,
        ("influx.buffer_points", "influx.batch_size_points"),
        id="env-influx-buffer-below-batch",
    ),
    pytest.param(
        {"WATTSTREAM_INFLUX_GZIP": "maybe"}, None, ("WATTSTREAM_INFLUX_GZIP",), id="env-influx-bool"
    ),
    pytest.param(
        {"WATTSTREAM_INFLUX_RETRY_MAX_S": "0"},
        None,
        ("WATTSTREAM_INFLUX_RETRY_MAX_S",),
        id="env-influx-retry",
    ),
    pytest.param(
        {"WATTSTREAM_INFLUX_URLL": "http://x"},
        None,
        ("WATTSTREAM_INFLUX_URLL", "influx.url"),
        id="env-influx-typo",
    ),
    # --- webhook.* and replay.*, from the environment
    pytest.param(
        {"WATTSTREAM_WEBHOOK_URL": "http://alerts.example"},
        None,
        ("webhook.secret", "WATTSTREAM_WEBHOOK_SECRET"),
        id="env-webhook-unsigned",
    ),
    pytest.param(
        {"WATTSTREAM_WEBHOOK_URL": "alerts.example/hook", "WATTSTREAM_WEBHOOK_SECRET": "k"},
        None,
        ("WATTSTREAM_WEBHOOK_URL",),
        id="env-webhook-scheme",
    ),
    pytest.param(
        {"WATTSTREAM_WEBHOOK_MIN_SEVERITY": "loud"},
        None,
        ("WATTSTREAM_WEBHOOK_MIN_SEVERITY",),
        id="env-webhook-severity",
    ),
    pytest.param(
        {"WATTSTREAM_WEBHOOK_MAX_ATTEMPTS": "0"},
        None,
        ("WATTSTREAM_WEBHOOK_MAX_ATTEMPTS",),
        id="env-webhook-attempts",
    ),
    pytest.param(
        {"WATTSTREAM_WEBHOOK_TEMPLATE": "teams"},
        None,
        ("WATTSTREAM_WEBHOOK_TEMPLATE",),
        id="env-webhook-template",
    ),
    pytest.param(
        {"WATTSTREAM_WEBHOOK_COOLDOWN_S": "-1"},
        None,
        ("WATTSTREAM_WEBHOOK_COOLDOWN_S",),
        id="env-webhook-cooldown",
    ),
    pytest.param(
        {"WATTSTREAM_REPLAY_BATCH_MAX_READINGS": "0"},
        None,
        ("WATTSTREAM_REPLAY_BATCH_MAX_READINGS",),
        id="env-replay-batch",
    ),
    # --- the TOML file: top level and sections
    pytest.param({}, 'partitions = "many"\n', ("partitions",), id="toml-int"),
    pytest.param({}, 'brokr = "k:9092"\n', ("brokr", "did you mean broker"), id="toml-typo"),
    pytest.param({}, "partitions = = 3\n", ("settings.toml",), id="toml-syntax"),
    pytest.param(
        {}, "[kafka]\nsession_timeout_s = 0\n", ("kafka.session_timeout_s",), id="toml-kafka"
    ),
    pytest.param(
        {},
        '[kafka]\nsasl_pasword = "x"\n',
        ("kafka.sasl_pasword", "did you mean kafka.sasl_password"),
        id="toml-kafka-typo",
    ),
    pytest.param(
        {}, "[kafka]\nstart_timeout_s = -1\n", ("kafka.start_timeout_s",), id="toml-kafka-start"
    ),
    pytest.param({}, '[influx]\napi = "v3"\n', ("influx.api",), id="toml-influx"),
    pytest.param({}, '[influx]\nurll = "http://x"\n', ("influx.urll",), id="toml-influx-typo"),
    pytest.param({}, "[influx]\ntimeout_s = 0\n", ("influx.timeout_s",), id="toml-influx-timeout"),
    pytest.param({}, "[webhook]\nqueue_size = 0\n", ("webhook.queue_size",), id="toml-webhook"),
    pytest.param(
        {}, "[replay]\nbatch_window_s = 0\n", ("replay.batch_window_s",), id="toml-replay"
    ),
    pytest.param({}, "[replays]\nbatch_window_s = 1\n", ("replays",), id="toml-unknown-section"),
    # --- [[sites]] and their batteries
    pytest.param({}, '[[sites]]\nid = "s1"\n', ("sites[0].market",), id="toml-site-missing"),
    pytest.param(
        {}, '[[sites]]\nid = "bad id!"\nmarket = "M"\n', ("sites[0].id",), id="toml-site-id"
    ),
    pytest.param(
        {},
        SITE + "  [sites.alocation]\n  x = 1\n",
        ("sites[0].alocation", "did you mean sites[0].allocation"),
        id="toml-site-section-typo",
    ),
    pytest.param({}, SITE + SITE, ("sites", "duplicate site ids"), id="toml-duplicate-sites"),
    pytest.param(
        {},
        battery(capacity_kwh=-1),
        ("sites[0].batteries[0].capacity_kwh",),
        id="toml-battery-capacity",
    ),
    pytest.param(
        {},
        battery(round_trip_efficiency=1.5),
        ("sites[0].batteries[0].round_trip_efficiency",),
        id="toml-battery-efficiency",
    ),
    pytest.param(
        {},
        battery(soc_min_pct=90, soc_max_pct=50),
        ("sites[0].batteries[0]", "soc_min_pct", "soc_max_pct"),
        id="toml-battery-soc-window",
    ),
    pytest.param(
        {},
        battery(strategy='"greedy"'),
        ("sites[0].batteries[0].strategy",),
        id="toml-battery-strategy",
    ),
    pytest.param(
        {},
        battery(charge_below_price_per_kwh=0.3),
        ("sites[0].batteries[0]", "charge_below_price_per_kwh"),
        id="toml-battery-thresholds",
    ),
    pytest.param(
        {},
        battery(commands='"yes"'),
        ("sites[0].batteries[0].commands",),
        id="toml-battery-commands",
    ),
    pytest.param(
        {},
        battery(capacity_khw=10),
        ("sites[0].batteries[0].capacity_khw", "did you mean sites[0].batteries[0].capacity_kwh"),
        id="toml-battery-typo",
    ),
    pytest.param(
        {},
        BATTERY + BATTERY.split("\n", 3)[3],
        ("sites[0].batteries", "duplicate battery devices"),
        id="toml-battery-duplicate",
    ),
]


@pytest.mark.parametrize(("env", "toml", "names"), CONFIG_SHOW_CASES)
def test_config_show_names_the_bad_setting(
    env: dict[str, str], toml: str | None, names: tuple[str, ...], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    env = {k: str(junk) if v == "PEM:junk" else v for k, v in env.items()}
    result = invoke(tmp_path, ["config", "show"], env, toml)
    assert_clean_usage_error(result, names)
    assert result.stdout == ""  # no settings printed


# The sites' processor sections are plain tables to pipeline.settings; each processor
# validates its own when the worker builds the app, before it waits for the broker.
WORKER_CASES = [
    pytest.param(
        SITE + '  [sites.allocation]\n  timezone = "Europe/Rome"\n  bogus = 1\n',
        ("sites[s1].allocation.limits", "sites[s1].allocation.bogus"),
        id="allocation",
    ),
    pytest.param(
        SITE + '  [sites.detection]\n  timezone = "Mars/Olympus"\n',
        ("sites[s1].detection.timezone",),
        id="detection-timezone",
    ),
    pytest.param(
        SITE + '  [sites.detection]\n  kinds = ["toaster"]\n',
        ("sites[s1].detection.kinds[0]",),
        id="detection-kinds",
    ),
    pytest.param(
        SITE + '  [sites.carbon]\n  zonee = "IT-NO"\n',
        ("sites[s1].carbon.zone", "sites[s1].carbon.zonee"),
        id="carbon",
    ),
    pytest.param(
        SITE + "  [sites.certificates]\n  unit_kwh = 1.0\n",
        ("sites[s1].certificates", "sites[s1].carbon"),
        id="certificates-without-carbon",
    ),
    pytest.param(
        SITE + '  [[sites.solar.arrays]]\n  device = "pv-1"\n  kwp = -6.0\n',
        ("sites[s1].solar.arrays[0].kwp",),
        id="solar",
    ),
    pytest.param(
        SITE + '  [sites.fleet]\n  max_import_kw = 10\n  timezone = "Europe/Rome"\n'
        '  [[sites.fleet.vehicles]]\n  vehicle_id = "v"\n  capacity_kwh = 75\n'
        '  target_soc_pct = 190\n  max_charge_kw = 22\n  departure = "06:30"\n',
        ("sites[s1].fleet.vehicles[0].target_soc_pct",),
        id="fleet",
    ),
    pytest.param(
        SITE + "  [sites.island]\n  return_stable_s = 300\n",
        ("sites[s1].island.battery_capacity_kwh",),
        id="island",
    ),
    pytest.param(
        SITE + '  [sites.fusion]\n  enabled = "perhaps"\n',
        ("sites[s1].fusion.enabled",),
        id="fusion",
    ),
    pytest.param(
        SITE + "  [sites.curtailment]\n  bogus = 1\n",
        ("sites[s1].curtailment.bogus",),
        id="curtailment",
    ),
    pytest.param(
        SITE + "  [sites.follow_sun]\n  max_price_per_kwh = 0.1\n"
        '  [[sites.follow_sun.jobs]]\n  device = "kiln"\n  power_kw = -3\n',
        ("sites[s1].follow_sun.jobs[0].power_kw",),
        id="follow-sun",
    ),
]


def worker_env(tmp_path: Path) -> dict[str, str]:
    """A broker where nothing listens, and a wait bound: a case that passes validation
    fails with exit code 1 after 1 s instead of waiting for ever."""
    return {
        "WATTSTREAM_BROKER": f"127.0.0.1:{free_port()}",
        "WATTSTREAM_KAFKA_START_TIMEOUT_S": "1",
        "WATTSTREAM_STORE": "memory",
        "WATTSTREAM_DATA_DIR": str(tmp_path / "state"),
        "WATTSTREAM_INFLUX_FILE": str(tmp_path / "influx.lp"),
    }


@pytest.mark.parametrize(("toml", "names"), WORKER_CASES)
def test_the_worker_names_a_bad_processor_section_before_waiting_for_the_broker(
    toml: str, names: tuple[str, ...], tmp_path: Path
) -> None:
    started = time.monotonic()
    result = invoke(tmp_path, ["worker"], worker_env(tmp_path), toml)
    assert_clean_usage_error(result, names)
    assert "not answering" not in result.stderr  # it did not wait for the broker first
    assert time.monotonic() - started < 10


def test_the_worker_names_a_data_dir_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**worker_env(tmp_path), "WATTSTREAM_DATA_DIR": str(blocker / "state")}
    assert_clean_usage_error(invoke(tmp_path, ["worker"], env, None), ("WATTSTREAM_DATA_DIR",))


def test_a_real_process_exits_2_naming_every_bad_setting(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(battery(capacity_kwh=-1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    env.update(worker_env(tmp_path), WATTSTREAM_CONFIG=str(config), WATTSTREAM_INFLUX_API="v3")
    result = run_wattstream(env, "worker")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "wattstream: invalid settings:",
        "  influx.api (env WATTSTREAM_INFLUX_API): Input should be 'v1' or 'v2'; got 'v3'",
        "  sites[0].batteries[0].capacity_kwh (env WATTSTREAM_SITES (JSON) or [[sites]] in "
        "the TOML file): Input should be greater than 0; got -1",
    ]


# --- secrets ---------------------------------------------------------------------------

SECRETS = {
    "kafka.sasl_password": "kafka-sasl-pw-7c1e",
    "influx.password": "influx-pw-93ab",
    "influx.token": "influx-token-5d20",
    "webhook.secret": "webhook-hmac-11f4",
}
# A webhook URL often is a key itself (Slack's carry it in the path).
WEBHOOK_KEY = "webhook-path-key-8e2a"
PUBLIC = {
    "kafka.sasl_username": "alice-kafka",
    "influx.username": "bob-influx",
    "influx.org": "org-visible",
    "influx.bucket": "bucket-visible",
}


def env_name(setting: str) -> str:
    return "WATTSTREAM_" + setting.replace(".", "_").upper()


def secret_env(influx_port: int, webhook_port: int) -> dict[str, str]:
    return {
        **{env_name(k): v for k, v in {**SECRETS, **PUBLIC}.items()},
        "WATTSTREAM_INFLUX_URL": f"http://127.0.0.1:{influx_port}",
        "WATTSTREAM_WEBHOOK_URL": f"http://127.0.0.1:{webhook_port}/services/T0/{WEBHOOK_KEY}",
    }


def secret_toml(influx_port: int, webhook_port: int) -> str:
    sections: dict[str, dict[str, str]] = {}
    for setting, value in {**SECRETS, **PUBLIC}.items():
        area, name = setting.split(".")
        sections.setdefault(area, {})[name] = value
    sections["influx"]["url"] = f"http://127.0.0.1:{influx_port}"
    sections["webhook"]["url"] = f"http://127.0.0.1:{webhook_port}/services/T0/{WEBHOOK_KEY}"
    return "".join(
        f"[{area}]\n" + "".join(f'{k} = "{v}"\n' for k, v in fields.items()) + "\n"
        for area, fields in sections.items()
    )


def assert_no_secret(text: str) -> None:
    for value in [*SECRETS.values(), WEBHOOK_KEY]:
        assert value not in text, f"secret {value!r} shown"


@pytest.mark.parametrize("source", ["env", "toml"])
def test_config_show_masks_every_secret_and_shows_the_rest(source: str, tmp_path: Path) -> None:
    env = secret_env(8086, 9000) if source == "env" else {}
    toml = secret_toml(8086, 9000) if source == "toml" else None
    result = invoke(tmp_path, ["config", "show"], env, toml)
    assert result.exit_code == 0, result.output
    assert_no_secret(result.output)
    shown = json.loads(result.stdout)
    for setting in SECRETS:
        area, name = setting.split(".")
        assert shown[area][name] == "**********", setting
    for setting, value in PUBLIC.items():
        area, name = setting.split(".")
        assert shown[area][name] == value, setting
    assert shown["influx"]["url"] == "http://127.0.0.1:8086"
    assert shown["webhook"]["url"] == "http://127.0.0.1:9000/**********"


@pytest.mark.parametrize(
    ("env", "toml"),
    [
        pytest.param(
            {"WATTSTREAM_KAFKA_SASL_PASWORD": SECRETS["kafka.sasl_password"]}, None, id="env-typo"
        ),
        pytest.param({}, f'[influx]\npasword = "{SECRETS["influx.password"]}"\n', id="toml-typo"),
        pytest.param({}, "[influx]\npassword = 12345\n", id="not-a-string"),
        pytest.param(
            {"WATTSTREAM_INFLUX_URL": f"http://bob:{SECRETS['influx.password']}@influx:8086"},
            None,
            id="password-in-url",
        ),
        pytest.param(
            {"WATTSTREAM_INFLUX_URL": f"bob:{SECRETS['influx.password']}@influx:8086"},
            None,
            id="password-in-bad-url",
        ),
        pytest.param(
            {"WATTSTREAM_WEBHOOK_URL": f"hooks.example/{WEBHOOK_KEY}"},
            None,
            id="webhook-url-without-scheme",
        ),
    ],
)
def test_an_error_never_echoes_a_secret(
    env: dict[str, str], toml: str | None, tmp_path: Path
) -> None:
    result = invoke(tmp_path, ["config", "show"], env, toml)
    assert result.exit_code == 2, result.output
    assert_no_secret(result.output)
    assert "12345" not in result.output


@pytest.mark.integration
def test_the_worker_start_up_log_shows_no_secret(tmp_path: Path) -> None:
    """A worker at DEBUG with every secret set (environment and file), through its start:
    waiting for the broker, then its agents and both sinks (InfluxDB and webhook, whose
    servers are not there, so they log their retries too)."""
    port = free_port()
    config = tmp_path / "settings.toml"
    config.write_text(secret_toml(free_port(), free_port()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    env.update(
        secret_env(free_port(), free_port()),
        WATTSTREAM_CONFIG=str(config),
        WATTSTREAM_BROKER=f"127.0.0.1:{port}",
        WATTSTREAM_LOG_LEVEL="DEBUG",
        WATTSTREAM_APP_ID=f"secrets-{port}",
        WATTSTREAM_STORE="memory",
        WATTSTREAM_DATA_DIR=str(tmp_path / "state"),
        WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH="true",
        WATTSTREAM_KAFKA_FETCH_MAX_WAIT_MS="10",
        WATTSTREAM_KAFKA_START_RETRY_MAX_S="1",
    )
    log = tmp_path / "worker.log"
    broker = EmbeddedBroker(port=port)
    try:
        with log.open("wb") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "worker"],
                env=env,
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_for(log, "not answering", worker)
                broker.start()
                wait_for(log, "webhook sink: group", worker)
                wait_for(log, "[^Worker]: Ready", worker)
            finally:
                stop_process(worker, timeout_s=30)
    finally:
        broker.close()
    text = log.read_text()
    assert "Traceback" not in text
    assert_no_secret(text)


def wait_for(log: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float = 40) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in {timeout_s} s"
        time.sleep(0.2)
