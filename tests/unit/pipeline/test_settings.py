"""Settings: sources, precedence, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.settings import SettingsError, load_settings

BATTERY = """
[[sites]]
id = "a"
market = "M"
  [[sites.batteries]]
  device = "b1"
  capacity_kwh = 10
  max_charge_kw = 5
  max_discharge_kw = 5
  charge_below_price_per_kwh = {low}
  discharge_above_price_per_kwh = {high}
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("WATTSTREAM_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_configuration() -> None:
    settings = load_settings()
    assert settings.embedded_broker
    assert settings.kafka.session_timeout_s == 6.0
    assert settings.influx.url is None


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path, 'broker = "file:9092"\n[influx]\nurl = "http://file:8086"\nretry_max_s = 3\n'
    )
    monkeypatch.setenv("WATTSTREAM_INFLUX_URL", "http://env:8086")
    monkeypatch.setenv("WATTSTREAM_BROKER", "env:9092")
    settings = load_settings(path)
    assert settings.broker == "env:9092"
    assert settings.influx.url == "http://env:8086"
    assert settings.influx.retry_max_s == 3.0  # from the file, not overridden


def test_config_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTSTREAM_CONFIG", str(write(tmp_path, "partitions = 3\n")))
    assert load_settings().partitions == 3


def test_invalid_choice_names_setting_env_and_accepted_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATTSTREAM_INFLUX_API", "v3")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "influx.api" in message
    assert "WATTSTREAM_INFLUX_API" in message
    assert "'v1' or 'v2'" in message
    assert "'v3'" in message


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"influx\.urll"):
        load_settings(write(tmp_path, '[influx]\nurll = "http://x"\n'))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"settings\.toml"):
        load_settings(write(tmp_path, "partitions = = 3\n"))


def test_battery_thresholds_must_be_ordered(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="charge_below_price_per_kwh"):
        load_settings(write(tmp_path, BATTERY.format(low=0.2, high=0.1)))


def test_valid_battery_is_loaded(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BATTERY.format(low=0.05, high=0.15)))
    (site,) = settings.sites
    assert site.batteries[0].round_trip_efficiency == 0.9  # the documented default


def test_sasl_requires_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(SettingsError, match="sasl_username"):
        load_settings()


def test_influx_url_needs_a_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTSTREAM_INFLUX_URL", "localhost:8086")
    with pytest.raises(SettingsError, match="http://"):
        load_settings()


def test_secrets_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTSTREAM_INFLUX_PASSWORD", "hunter2")
    monkeypatch.setenv("WATTSTREAM_INFLUX_TOKEN", "tok-secret")
    settings = load_settings()
    assert settings.influx.password is not None
    assert settings.influx.password.get_secret_value() == "hunter2"
    dumped = repr(settings) + str(settings.redacted())
    assert "hunter2" not in dumped and "tok-secret" not in dumped


def test_duplicate_sites_are_rejected(tmp_path: Path) -> None:
    text = '[[sites]]\nid = "a"\nmarket = "M"\n[[sites]]\nid = "a"\nmarket = "N"\n'
    with pytest.raises(SettingsError, match="duplicate site ids"):
        load_settings(write(tmp_path, text))


def test_the_sample_config_is_valid() -> None:
    path = Path(__file__).resolve().parents[3] / "data" / "sample" / "wattstream.toml"
    settings = load_settings(path)
    assert {site.id for site in settings.sites} == {
        "turin-home",
        "turin-school",
        "moncalieri-depot",
    }


@pytest.mark.parametrize(
    ("variable", "read"),
    [
        ("WATTSTREAM_KAFKA_SASL_PASSWORD_FILE", lambda s: s.kafka.sasl_password),
        ("WATTSTREAM_INFLUX_PASSWORD_FILE", lambda s: s.influx.password),
        ("WATTSTREAM_INFLUX_TOKEN_FILE", lambda s: s.influx.token),
        ("WATTSTREAM_WEBHOOK_SECRET_FILE", lambda s: s.webhook.secret),
    ],
)
def test_a_secret_comes_from_the_file_its_file_variable_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, read: Any
) -> None:
    # As Docker and Kubernetes mount secrets: a file, its text with a trailing newline.
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t value\n")
    monkeypatch.setenv(variable, str(secret))
    settings = load_settings()
    assert read(settings).get_secret_value() == "s3cr3t value"
    assert "s3cr3t" not in str(settings.redacted())


def test_a_secret_file_that_cannot_be_read_or_a_secret_set_twice_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATTSTREAM_INFLUX_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match=r"influx.token \(env WATTSTREAM_INFLUX_TOKEN_FILE\)"):
        load_settings()
    secret = tmp_path / "token"
    secret.write_text("from-file")
    monkeypatch.setenv("WATTSTREAM_INFLUX_TOKEN_FILE", str(secret))
    monkeypatch.setenv("WATTSTREAM_INFLUX_TOKEN", "from-env")
    with pytest.raises(SettingsError, match=r"WATTSTREAM_INFLUX_TOKEN and .*_FILE: set only one"):
        load_settings()


def test_only_secrets_have_file_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTSTREAM_INFLUX_URL_FILE", "/etc/hostname")
    with pytest.raises(SettingsError, match=r"influx\.url_file"):
        load_settings()
