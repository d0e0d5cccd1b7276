"""Price fan-out: each market's price ticks go to every site in that market.

Prices are keyed by market, telemetry by site. Re-keying each tick by site onto
the ``site-prices`` topic (co-partitioned with telemetry) lets one worker see a
site's readings and prices in one stream, and keep the site's state in one
table partition, with no global table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline import codec, topics
from pipeline.schemas import PriceTick
from pipeline.settings import Settings

if TYPE_CHECKING:
    import faust


def sites_in_market(settings: Settings, market: str) -> list[str]:
    """The configured sites whose prices come from ``market``, in a stable order."""
    return sorted(site.id for site in settings.sites if site.market == market)


def register(app: faust.App, settings: Settings) -> None:
    from pipeline.streams import AGENT_SUPERVISOR, DeadLetters, decode_event, raw_topic

    prices = raw_topic(app, settings, topics.PRICES)
    site_prices = raw_topic(app, settings, topics.SITE_PRICES)
    dlq = DeadLetters(app, settings, component=__name__)

    @app.agent(prices, name=f"{__name__}.fan_out", supervisor_strategy=AGENT_SUPERVISOR)
    async def fan_out(stream: Any) -> None:
        async for event in stream.events():
            tick = await decode_event(PriceTick, event, dlq)
            if tick is None:
                continue
            value = codec.encode(tick)
            for site in sites_in_market(settings, tick.market):
                await site_prices.send(key=site.encode(), value=value)
