"""The shared site agent is the one reader that dead-letters undecodable telemetry, so
every app has it, also when no site has a processor that adds a step to it."""

from __future__ import annotations

from pathlib import Path

from pipeline.app import create_app
from pipeline.settings import load_settings
from pipeline.streams import _SITE_STEPS
from tests.conftest import SettingsFactory

SITE_AGENT = "pipeline.streams.site_agents"
SAMPLE_SETTINGS = Path(__file__).resolve().parents[3] / "data" / "sample" / "wattstream.toml"


def test_an_app_without_site_steps_still_runs_the_agent_that_dead_letters(
    make_settings: SettingsFactory,
) -> None:
    quiet = make_settings(
        broker="127.0.0.1:9",
        sites=[{"id": "plain", "market": "M", "detection": {"enabled": False}}],
    )
    app = create_app(quiet)
    assert SITE_AGENT in app.agents
    # No processor works for the site; the agent is there anyway.
    assert all(not step.sites for step in _SITE_STEPS[app].steps)


def test_the_sample_registers_its_processors_as_steps_of_one_agent(
    make_settings: SettingsFactory,
) -> None:
    sample = load_settings(SAMPLE_SETTINGS, broker="127.0.0.1:9")
    sites = [site.model_dump() for site in sample.sites]
    app = create_app(make_settings(broker="127.0.0.1:9", sites=sites))
    names = {step.name.rsplit(".", 1)[-1] for step in _SITE_STEPS[app].steps if step.sites}
    assert {"arbitrage", "allocation", "detection", "scope2"} <= names
    # Arbitrage and allocation are steps now, not agents reading telemetry on their own.
    telemetry_readers = [name for name in app.agents if "arbitrage" in name or "allocation" in name]
    assert telemetry_readers == []
