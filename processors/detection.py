"""The site's detectors behind one door: readings in, alerts out.

:class:`SiteDetection` keeps one :class:`SignalDetector` (spikes, drops, level
shifts, stuck values, high consumption) per watched device and one
:class:`VampireDetector` per consumption device, created on a device's first
reading. The Faust agent and ``wattstream detect`` both feed it readings in
time order per device, so they raise the same alerts.

Plain Python (no Faust import) except :func:`register`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from pipeline.schemas import Alert, HomeReading, MeterReading, Reading, SolarReading, TelemetryBatch
from pipeline.settings import Settings, SiteConfig, validate_section
from processors.anomaly import CONSUMPTION_KINDS, DetectionSettings, SignalDetector
from processors.vampire import VampireDetector

if TYPE_CHECKING:
    import faust


EXPLAINED_BY_SIGNAL = ("level_shift", "drop", "stuck", "high_consumption")


def detection_settings(site: SiteConfig) -> DetectionSettings:
    """The site's ``[sites.detection]`` section, validated (defaults without one)."""
    return validate_section(DetectionSettings, f"sites[{site.id}].detection", site.detection or {})


class SiteDetection:
    """Every statistical detector of one site."""

    def __init__(self, site: str, settings: DetectionSettings | None = None) -> None:
        self.site = site
        self.settings = settings or DetectionSettings()
        self.signals: dict[str, SignalDetector] = {}
        self.vampires: dict[str, VampireDetector] = {}

    def observe(
        self,
        device: str,
        kind: str,
        at: datetime,
        power_kw: float,
        irradiance_w_m2: float | None = None,
    ) -> list[Alert]:
        """One power reading of ``device`` (PV with its irradiance, if measured); the alerts
        it starts or ends."""
        if not self.settings.enabled or kind not in self.settings.kinds:
            return []
        signal = self.signals.get(device)
        if signal is None:
            signal = self.signals[device] = SignalDetector(self.site, device, kind, self.settings)
        out = signal.observe(at, power_kw, irradiance_w_m2)
        if kind in CONSUMPTION_KINDS:
            vampire = self.vampires.get(device)
            if vampire is None:
                vampire = self.vampires[device] = VampireDetector(
                    self.site, device, kind, self.settings
                )
            # A shift, a dropout or a frozen value explains the reading better than a
            # vampire load: the vampire detector neither fires on it nor learns from it.
            explained = any(label in signal.open for label in EXPLAINED_BY_SIGNAL)
            out.extend(vampire.observe(at, power_kw, explained=explained))
        return out

    def on_readings(self, readings: Iterable[Reading]) -> list[Alert]:
        """A batch of readings, in order of their timestamps."""
        out: list[Alert] = []
        watched = [r for r in readings if isinstance(r, HomeReading | MeterReading | SolarReading)]
        for reading in sorted(watched, key=lambda r: r.ts):
            irradiance = reading.irradiance_w_m2 if isinstance(reading, SolarReading) else None
            out.extend(
                self.observe(reading.device, reading.kind, reading.ts, reading.power_kw, irradiance)
            )
        return out


def register(app: faust.App, settings: Settings) -> None:
    """Wire the statistical detectors to Kafka: telemetry in, alerts out.

    Every site is watched (``[sites.detection]`` only changes the settings, and is
    validated here, at start-up). Undecodable telemetry is skipped: the arbitrage agent
    reads the same records and dead-letters them once.

    The baselines live in the worker's memory: after a restart or a rebalance a device
    learns again (``warmup_h``) before it raises alerts.
    """
    from pipeline.streams import site_telemetry_agent

    engines = {
        site.id: SiteDetection(site.id, cfg)
        for site in settings.sites
        if (cfg := detection_settings(site)).enabled
    }

    def step(site: str, batch: TelemetryBatch) -> list[Alert]:
        return engines[site].on_readings(batch.readings)

    site_telemetry_agent(app, settings, f"{__name__}.detection", engines, step)
