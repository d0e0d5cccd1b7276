"""Price fan-out: each market's price ticks go to every site in that market.

Prices are keyed by market, telemetry by site. Re-keying each tick by site onto
the ``site-prices`` topic (co-partitioned with telemetry) lets one worker see a
site's readings and prices in one stream, and keep the site's state in one
table partition, with no global table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import topics
from pipeline.schemas import PriceTick
from pipeline.settings import Settings

if TYPE_CHECKING:
    import faust


def sites_in_market(settings: Settings, market: str) -> list[str]:
    """The configured sites whose prices come from ``market``, in a stable order."""
    return sorted(site.id for site in settings.sites if site.market == market)


def register(app: faust.App, settings: Settings) -> None:
    from pipeline.streams import fan_out_agent

    fan_out_agent(
        app,
        settings,
        f"{__name__}.fan_out",
        topics.PRICES,
        topics.SITE_PRICES,
        PriceTick,
        lambda tick: sites_in_market(settings, tick.market),
    )
