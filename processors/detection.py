"""The site's detectors behind one door: readings in, alerts out.

:class:`SiteDetection` keeps one :class:`SignalDetector` (spikes, drops, level
shifts, stuck values, high consumption) per watched device and one
:class:`VampireDetector` per consumption device, created on a device's first
reading. The Faust agent and ``wattstream detect`` both feed it readings in
time order per device, so they raise the same alerts.

Plain Python (no Faust import) except :func:`register`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pipeline.schemas import Alert, HomeReading, MeterReading, Reading, SolarReading, TelemetryBatch
from pipeline.settings import Settings, SiteConfig, validate_section
from processors.anomaly import CONSUMPTION_KINDS, DetectionSettings, SignalDetector
from processors.vampire import VampireDetector

if TYPE_CHECKING:
    import faust


EXPLAINED_BY_SIGNAL = ("level_shift", "drop", "stuck", "high_consumption")
CHECKPOINT_EVERY_S = 6 * 3600.0
"""Event time between two checkpoints of a device's baselines: a checkpoint is ~200 kB,
and what a restart forgets (the readings since) only refines a baseline of weeks. [s]"""


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
        self._watched = frozenset(self.settings.kinds) if self.settings.enabled else frozenset()

    def watches(self, kind: str) -> bool:
        return kind in self._watched

    def observe(
        self,
        device: str,
        kind: str,
        at: datetime,
        power_kw: float,
        irradiance_w_m2: float | None = None,
        ts_s: float | None = None,
    ) -> list[Alert]:
        """One power reading of ``device`` (PV with its irradiance, if measured); the alerts
        it starts or ends. ``ts_s`` is ``at`` in seconds since the epoch, if the caller
        has it (a file's readers convert a whole column at once)."""
        if kind not in self._watched:
            return []
        signal = self.signals.get(device)
        if signal is None:
            signal = self.signals[device] = SignalDetector(self.site, device, kind, self.settings)
        if ts_s is None:
            ts_s = at.timestamp()
        out = signal.observe(at, power_kw, irradiance_w_m2, ts_s)
        if kind in CONSUMPTION_KINDS:
            vampire = self.vampires.get(device)
            if vampire is None:
                vampire = self.vampires[device] = VampireDetector(
                    self.site, device, kind, self.settings
                )
            # A shift, a dropout or a frozen value explains the reading better than a
            # vampire load: the vampire detector neither fires on it nor learns from it.
            opened = signal.open
            explained = bool(opened) and any(label in opened for label in EXPLAINED_BY_SIGNAL)
            out.extend(vampire.observe(at, power_kw, explained, ts_s))
        return out

    def to_state(self, device: str) -> dict[str, Any]:
        """A checkpoint of what ``device``'s detectors have learned (plain JSON)."""
        signal = self.signals[device]
        vampire = self.vampires.get(device)
        return {
            "kind": signal.kind,
            "signal": signal.to_state(),
            "vampire": None if vampire is None else vampire.to_state(),
        }

    def restore(self, device: str, state: dict[str, Any]) -> None:
        """Take up ``device``'s checkpoint (before its first reading in this process)."""
        kind = state["kind"]
        signal = self.signals[device] = SignalDetector(self.site, device, kind, self.settings)
        signal.restore(state["signal"])
        if state["vampire"] is not None:
            vampire = VampireDetector(self.site, device, kind, self.settings)
            vampire.restore(state["vampire"])
            self.vampires[device] = vampire

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
    validated here, at start-up). What each device has learned is checkpointed in a
    Faust table keyed ``site/device`` every ``CHECKPOINT_EVERY_S`` of its event time
    and whenever it raises or resolves an alert; a restarted worker (or the one that
    takes the partition over) resumes from the checkpoint instead of learning again.
    The readings between the checkpoint and the committed offset only refine the
    baselines, so a restart loses none of the alerts' identity (ids are from data).
    """
    from pipeline.streams import site_table, site_telemetry_agent

    engines = {
        site.id: SiteDetection(site.id, cfg)
        for site in settings.sites
        if (cfg := detection_settings(site)).enabled
    }
    table = site_table(
        app,
        settings,
        "detection-state",
        "Per-device detector baselines: local level, residuals, profile, idle baseline.",
    )
    checkpointed_s: dict[str, float] = {}

    def step(site: str, batch: TelemetryBatch) -> list[Alert]:
        engine = engines[site]
        devices = {r.device for r in batch.readings if engine.watches(r.kind)}
        for device in devices - engine.signals.keys():
            saved = table.get(f"{site}/{device}")
            if saved is not None:
                engine.restore(device, saved)
        out = engine.on_readings(batch.readings)
        alerted = {a.device for a in out}
        for device in devices & engine.signals.keys():
            key = f"{site}/{device}"
            event_s = engine.signals[device].last_s or 0.0
            due = event_s - checkpointed_s.get(key, -math.inf) >= CHECKPOINT_EVERY_S
            if due or device in alerted:
                table[key] = engine.to_state(device)
                checkpointed_s[key] = event_s
        return out

    site_telemetry_agent(app, settings, f"{__name__}.detection", engines, step)
