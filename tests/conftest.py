"""Fixtures shared by every test: real servers on free loopback ports, settings per test.

Servers are started once per session and stopped by process id; each test gets
its own topic prefix (uuid4), so tests share a broker without seeing each other.
A server that `make test` installs is never skipped: if it is missing, the run fails.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.local import EmbeddedBroker
from pipeline.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CONFIG = REPO / "data" / "sample" / "wattstream.toml"


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SettingsFactory:
    """Settings isolated from the caller's environment, with a unique topic prefix."""
    for name in list(__import__("os").environ):
        if name.startswith("WATTSTREAM_"):
            monkeypatch.delenv(name)
    prefix = f"t{uuid.uuid4().hex[:12]}."

    def factory(config_file: Path | None = None, **overrides: Any) -> Settings:
        defaults: dict[str, Any] = {
            "app_id": f"test-{uuid.uuid4().hex[:12]}",
            "topic_prefix": prefix,
            "partitions": 2,
            "store": "memory",
            "data_dir": tmp_path / "state",
        }
        defaults["influx"] = {"file": tmp_path / "influx.lp", **overrides.pop("influx", {})}
        # The fixtures' broker is tansu: see KafkaSettings.fetch_max_wait_ms.
        defaults["kafka"] = {"fetch_max_wait_ms": 10, **overrides.pop("kafka", {})}
        return load_settings(config_file, **{**defaults, **overrides})

    return factory


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (the Faust DirtyTest idea)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    assert not leaked, f"test left threads running: {leaked}"


@pytest.fixture(scope="session")
def influxdb() -> Iterator[Any]:
    """A real InfluxDB 1.6.7 (Debian `influxdb`), v1 API."""
    from tests.servers import InfluxDB1

    server = InfluxDB1()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def victoria_metrics() -> Iterator[Any]:
    """A real VictoriaMetrics (Debian `victoria-metrics`): the InfluxDB v2 write API."""
    from tests.servers import VictoriaMetrics

    server = VictoriaMetrics()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Any]:
    """A real Mosquitto 2.0 (Debian `mosquitto`) with persistence, on a free loopback port."""
    from tests.servers import Mosquitto

    server = Mosquitto()
    server.start()
    yield server
    server.close()
