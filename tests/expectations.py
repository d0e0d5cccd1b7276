"""What the pipeline must produce, computed straight from input files with no broker."""

from __future__ import annotations

from pathlib import Path

from ingest.replay import read_prices, read_telemetry, site_batches
from pipeline import codec
from pipeline.schemas import Decision
from pipeline.settings import Settings
from processors.arbitrage import SiteArbitrage, SiteState, battery_readings


def expected_decisions(settings: Settings, telemetry: Path, prices: Path) -> list[Decision]:
    """The arbitrage rule applied to the files: every price known, readings in file order."""
    frame, _ = read_telemetry(telemetry)
    ticks, _ = read_prices(prices)
    out: list[Decision] = []
    for site in settings.sites:
        engine, state = SiteArbitrage(site), SiteState()
        for tick in ticks:
            if tick.market == site.market:
                engine.on_price(state, tick)
        for batches in site_batches(frame.filter(frame["site"] == site.id), "x", settings.replay):
            for batch, _ in batches:
                assert batch is not None
                decoded, _ = codec.decode_telemetry(batch.value)
                assert decoded is not None
                out.extend(engine.on_readings(state, battery_readings(decoded)))
    return out
