"""Fixtures of the integration tests that the fault-injection tests moved from there use."""

from tests.integration.test_influx_sink import settings_v1
from tests.integration.test_mqtt_connector import root, settings

__all__ = ["root", "settings", "settings_v1"]
