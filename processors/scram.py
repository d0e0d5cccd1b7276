"""Fusion SCRAM: shut a reactor down when its plasma leaves the safe envelope.

Each fusion device (a tokamak: :class:`~pipeline.schemas.FusionReading`) is watched
by three kinds of rule, all in **event time** (the readings' ``ts``, never the
wall clock):

1. **Hard limits** on every reading: plasma temperature above ``temp_max_kev``,
   fusion gain above ``q_max``; and, while a plasma is present (hotter than
   ``plasma_present_kev``), confinement stability below ``stability_min`` or a
   toroidal field below ``field_min_t``. A value exactly at a limit is inside it.
2. **Sustained instability, with hysteresis**: stability below ``stability_warn``
   starts a clock; once it has run for ``unstable_after_s`` the device is
   *unstable*. Only a reading above ``stability_warn + stability_clear_margin``
   stops the clock (or clears the state), so a plasma hovering around the warning
   level is one stretch, not many short ones that each stay under the time limit.
3. **Rates of change** over the last ``rate_window_s``: temperature rising faster
   than ``temp_rise_max_kev_per_s`` (a thermal runaway climbs long before it
   crosses the hard limit) or falling faster than ``temp_fall_max_kev_per_s`` (a
   thermal quench: the plasma is being lost), stability falling faster than
   ``stability_fall_max_per_s`` and Q rising faster than ``q_rise_max_per_s``.
   Rates are taken between 3-point running medians of the samples, so a single
   noisy sample (a spike, a dropped bit) can never trip them: a median of three
   ignores one outlier, while a real step passes through one sample later.
   Rate rules apply while a plasma is present at either end of the window, and are
   checked at most every ``rate_window_s / 200`` (10 ms by default) - per reading for
   slow sources, every tenth reading of a 1 kHz diagnostic.

Why stability and field limits need a plasma: both describe confinement, which is
meaningless without a plasma; after a disruption a machine reads stability near 0
with a cold vessel, and a SCRAM then would be noise (and its incident could never
end). A temperature or Q reading above its limit is a plasma by definition.

**Incidents.** The first reading that trips any rule opens an incident: one
critical ``scram`` :class:`~pipeline.schemas.Alert` (details: which rules tripped,
the triggering reading's values, each rule's observed value and limit, the
reference values of a rate and the start of a sustained instability) and one
``scram`` :class:`~pipeline.schemas.Command` to the device (sent first: it is the
safety action), dry-run unless the site says ``commands = "live"``; the SCRAM is
logged at CRITICAL with the triggering reading and the rate window's far end.
Further trips during the incident send nothing more. The incident is resolved
(same alert id, ``end`` set) once the device has been **safe** for
``resolve_after_s`` of event time without interruption: no rule trips and no
instability clock is running - which a plasma that is gone (as after every
SCRAM) satisfies by construction, and a plasma back inside every limit too.

**Event time and arrival order.** Readings of a batch are taken in timestamp order
per device. A reading not newer than the device's newest one (late, or a
duplicate) is still checked against the hard limits - a late reading of 30 keV
is evidence of a dangerous plasma, and safety comes first - but does not move the
rate history, the instability clock or the resolution clock, which need time to
go forward. Late readings that fall inside an incident already closed are ignored.

Ids are deterministic (site, device, ``scram``, the triggering reading's time), so
a replay or a restarted worker sends the same alert and command ids.

Which sites are protected: every site, for any fusion reading on the telemetry
topic, with the defaults below unless the site has a ``[sites.fusion]`` section;
``enabled = false`` there is the only way to turn it off. A reactor must not lose
its protection because a configuration section was forgotten.

**The agent** (:func:`register`) is latency-critical. A telemetry record without the
bytes ``fusion`` is skipped unparsed; a fusion batch is validated in one pydantic
call; alerts and commands are sent as soon as the batch is evaluated. State lives in
a Faust table keyed by site (per device: ~15 samples, three clocks and the open
incident), written at once when an incident or a clock changes and otherwise at
most every :data:`PERSIST_EVERY_S` of event time (:class:`StateCache`): on the
embedded broker every table write is a produce round trip of its own.

Plain Python: Faust is imported only inside :func:`register`.

Example firing alert (abridged)::

    {"alert_id": "alert-3f2c...", "site": "reactor-site", "device": "tokamak-1",
     "alert_type": "scram", "severity": "critical", "status": "firing",
     "subject": "SCRAM tokamak-1", "start": "2025-03-01T00:05:12.400000Z",
     "message": "SCRAM tokamak-1: magnetic_field_t 4.41 < 4.5 T with a 14.9 keV plasma",
     "observed": 4.41, "expected": 4.5,
     "details": {"rules": "field_low_with_plasma", "plasma_temp_kev": 14.9, ...}}
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import codec, topics
from pipeline.schemas import (
    SCHEMA_VERSION,
    Alert,
    Command,
    FusionReading,
    Severity,
    TelemetryBatch,
    stable_id,
)
from pipeline.settings import Settings, SiteConfig, validate_section
from processors.alerting import DetailValue, firing, resolved

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

ALERT_TYPE = "scram"
COMMAND_ACTION = "scram"

PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
UnitInterval = Annotated[float, Field(ge=0.0, le=1.0)]

# The rate history keeps one sample per tenth of the window: enough resolution for a
# rate over the window, and a state of ~12 samples per device whatever the sampling
# rate (a 1 kHz diagnostic would otherwise keep a thousand).
HISTORY_SLOTS_PER_WINDOW = 10
# Rates are checked at most this many times per window (every 10 ms with the default
# 2 s): a 1 kHz diagnostic would otherwise pay three medians and four rates per reading
# for a rule whose window is 2 s long. Hard limits are still checked on every reading.
RATE_CHECKS_PER_WINDOW = 200
# A pause in a device's readings longer than this many windows restarts its rate
# history: a rate across a long gap says nothing about the last rate_window_s.
GAP_RESET_WINDOWS = 5.0
# Event times are held as float seconds since the epoch, exact to ~0.2 us; readings carry
# microseconds. Durations compared against a setting allow 1 us, so "for exactly 2 s"
# means 2 s, not 1.9999998 s.
TIME_TOLERANCE_S = 1e-6


class ScramSettings(BaseModel):
    """``[sites.fusion]``: the SCRAM limits of a site's fusion devices.

    Defaults equal the safe bands of ``ingest/simulators/fusion.py`` (a JET/ITER-class
    machine), which its nominal shots respect with margin at every seed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    enabled: bool = True
    """false: no SCRAM protection for this site (the only way to turn it off)."""
    temp_max_kev: PositiveFloat = 25.0
    """Core temperature limit: 10 keV above a 15 keV flat-top, below where pressure-driven
    modes make a disruption likely. [keV]"""
    stability_min: UnitInterval = 0.7
    """Confinement stability limit while a plasma is present. [-]"""
    q_max: PositiveFloat = 1.5
    """Fusion gain limit: above it the fusion power exceeds what the machine's first wall
    and divertor are rated for (a research machine runs at Q ~ 0.6). [-]"""
    field_min_t: NonNegativeFloat = 4.5
    """Toroidal field limit while a plasma is present: below it the plasma is not held
    (a magnet quench). [T]"""
    plasma_present_kev: NonNegativeFloat = 2.0
    """Hotter than this there is a plasma: breakdown and ramp-down run at ~0.5 keV. [keV]"""
    stability_warn: UnitInterval = 0.8
    """Below this the instability clock runs. [-]"""
    stability_clear_margin: NonNegativeFloat = 0.05
    """The clock stops only above stability_warn + this (hysteresis). [-]"""
    unstable_after_s: NonNegativeFloat = 2.0
    """Below stability_warn this long is a sustained instability: a locked-mode
    precursor lasts seconds; ELMs and sawteeth dip for milliseconds. [s]"""
    rate_window_s: PositiveFloat = 2.0
    """Rates of change are taken over this much event time. Over 1 s the simulator's
    flat-top noise alone reached 0.44 keV/s in 20 nominal shots, too close to the 0.5
    keV/s limit; over 2 s it stays below 0.33 keV/s, and a runaway is still caught
    within ~1.5-3 s of its onset. [s]"""
    rise_rules_min_kev: NonNegativeFloat = 15.0
    """The rise-rate rules (temperature, Q) apply when the whole rate window is at or
    above this temperature: the design flat-top. Below it the machine heats on its
    programmed ramp, as fast as 2.5 keV/s in a 60 s shot, which no rate limit can tell
    from a runaway; above it, nothing programmed raises temperature or gain fast. [keV]"""
    temp_rise_max_kev_per_s: PositiveFloat = 0.5
    """At flat-top, noise moves temperature by less than 0.33 keV/s over 2 s; a thermal
    runaway climbs at T/20 s, about 0.75 keV/s at 15 keV. [keV/s]"""
    temp_fall_max_kev_per_s: PositiveFloat = 5.0
    """Twice the fastest programmed ramp-down (a 60 s shot cools at up to 2.5 keV/s); a
    thermal quench loses tens of keV/s. [keV/s]"""
    stability_fall_max_per_s: PositiveFloat = 0.2
    """Flat-top noise moves stability by ~0.005/s; a disruption collapses it at ~2/s. [1/s]"""
    q_rise_max_per_s: PositiveFloat = 0.1
    """At flat-top Q moves by less than 0.03/s; a runaway raises it as T^2. [1/s]"""
    resolve_after_s: NonNegativeFloat = 5.0
    """A SCRAM incident ends after this long safe without interruption. [s]"""
    commands: Literal["off", "dry_run", "live"] = "dry_run"
    """What a SCRAM sends to the device: ``off`` nothing (alert only); ``dry_run`` a
    command marked dry-run (audited, never applied); ``live`` a command the control
    connector applies, if it is enabled too (two keys)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.stability_min < self.stability_warn:
            raise ValueError(
                f"stability_warn ({self.stability_warn}) must be above "
                f"stability_min ({self.stability_min})"
            )
        if self.stability_warn + self.stability_clear_margin > 1.0:
            raise ValueError(
                f"stability_warn + stability_clear_margin "
                f"({self.stability_warn} + {self.stability_clear_margin}) must not exceed 1"
            )
        if not self.plasma_present_kev < self.temp_max_kev:
            raise ValueError(
                f"plasma_present_kev ({self.plasma_present_kev}) must be below "
                f"temp_max_kev ({self.temp_max_kev})"
            )
        return self


def scram_settings(site: SiteConfig) -> ScramSettings:
    """A site's SCRAM settings: its ``fusion`` section, or the defaults without one.

    Raises :class:`~pipeline.settings.SettingsError` naming the bad setting, e.g.
    ``sites[reactor-site].fusion.temp_max_kev``.
    """
    return validate_section(ScramSettings, f"sites[{site.id}].fusion", site.fusion or {})


# --- state --------------------------------------------------------------------------------

Sample = tuple[float, float, float, float]
"""(event time [s since the epoch], plasma_temp_kev, confinement_stability, q_factor)."""


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


@dataclass
class DeviceState:
    """What the detector remembers of one device (part of a Faust table value)."""

    last_ts_s: float | None = None
    """Event time of the newest in-order reading. [s since the epoch]"""
    recent: list[Sample] = field(default_factory=list)
    """The last (up to) three in-order samples: the running median's input."""
    history: list[Sample] = field(default_factory=list)
    """Median-filtered samples, oldest first, at least a tenth of a window apart."""
    rates_checked_s: float | None = None
    """When the rates were last checked. [s since the epoch]"""
    below_warn_since_s: float | None = None
    """When the instability clock started (None: not running). [s since the epoch]"""
    unstable: bool = False
    incident: dict[str, Any] | None = None
    """The open incident's firing alert (JSON), or None."""
    safe_since_s: float | None = None
    """Start of the current safe stretch during an incident. [s since the epoch]"""
    closed_until_s: float | None = None
    """End of the last resolved incident: late readings up to it are ignored."""

    def to_json(self) -> dict[str, Any]:
        return {
            "last_ts_s": self.last_ts_s,
            "recent": [list(s) for s in self.recent],
            "history": [list(s) for s in self.history],
            "rates_checked_s": self.rates_checked_s,
            "below_warn_since_s": self.below_warn_since_s,
            "unstable": self.unstable,
            "incident": self.incident,
            "safe_since_s": self.safe_since_s,
            "closed_until_s": self.closed_until_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceState:
        return cls(
            last_ts_s=data["last_ts_s"],
            recent=[(s[0], s[1], s[2], s[3]) for s in data["recent"]],
            history=[(s[0], s[1], s[2], s[3]) for s in data["history"]],
            rates_checked_s=data["rates_checked_s"],
            below_warn_since_s=data["below_warn_since_s"],
            unstable=data["unstable"],
            incident=data["incident"],
            safe_since_s=data["safe_since_s"],
            closed_until_s=data["closed_until_s"],
        )


@dataclass
class SiteScramState:
    """The detector's state for one Kafka key (a site): device id -> state."""

    devices: dict[str, DeviceState] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {device: state.to_json() for device, state in self.devices.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SiteScramState:
        if not data:
            return cls()
        return cls({device: DeviceState.from_json(d) for device, d in data.items()})


# --- rules --------------------------------------------------------------------------------


class Trip(NamedTuple):
    """One rule that tripped on a reading."""

    rule: str
    observed: float
    limit: float
    text: str
    """e.g. ``plasma_temp_kev 26.1 > 25 keV``."""


class RateContext(NamedTuple):
    """The two ends of a rate: the filtered sample a window ago, and the one now."""

    ref: Sample
    now: Sample


def hard_limit_trips(cfg: ScramSettings, reading: FusionReading) -> list[Trip]:
    """The instantaneous limits a reading is outside of (empty when inside)."""
    trips: list[Trip] = []
    temp_kev = reading.plasma_temp_kev
    if temp_kev > cfg.temp_max_kev:
        trips.append(
            Trip(
                "temp_high",
                temp_kev,
                cfg.temp_max_kev,
                f"plasma_temp_kev {temp_kev:g} > {cfg.temp_max_kev:g} keV",
            )
        )
    if reading.q_factor > cfg.q_max:
        trips.append(
            Trip(
                "q_high",
                reading.q_factor,
                cfg.q_max,
                f"q_factor {reading.q_factor:g} > {cfg.q_max:g}",
            )
        )
    if temp_kev > cfg.plasma_present_kev:
        stability = reading.confinement_stability
        if stability < cfg.stability_min:
            trips.append(
                Trip(
                    "stability_low",
                    stability,
                    cfg.stability_min,
                    f"confinement_stability {stability:g} < {cfg.stability_min:g}",
                )
            )
        field_t = reading.magnetic_field_t
        if field_t is not None and field_t < cfg.field_min_t:
            trips.append(
                Trip(
                    "field_low_with_plasma",
                    field_t,
                    cfg.field_min_t,
                    f"magnetic_field_t {field_t:g} < {cfg.field_min_t:g} T with a "
                    f"{temp_kev:g} keV plasma",
                )
            )
    return trips


def _filtered(recent: Sequence[Sample]) -> Sample:
    """The running median of the last three samples, at the newest one's time."""
    (_, t0, s0, q0), (_, t1, s1, q1), (ts_s, t2, s2, q2) = recent
    # median(a, b, c) = max(min(a, b), min(max(a, b), c)), inlined: this runs per reading.
    return (
        ts_s,
        max(min(t0, t1), min(max(t0, t1), t2)),
        max(min(s0, s1), min(max(s0, s1), s2)),
        max(min(q0, q1), min(max(q0, q1), q2)),
    )


def rate_trips(cfg: ScramSettings, ref: Sample, now: Sample) -> list[Trip]:
    """Rates of change between two filtered samples that exceed their limits."""
    dt_s = now[0] - ref[0]
    if dt_s <= 0.0 or max(now[1], ref[1]) <= cfg.plasma_present_kev:
        return []
    trips: list[Trip] = []
    temp_rate = (now[1] - ref[1]) / dt_s
    # Below the flat-top the machine is heating on its programmed ramp (a 60 s shot ramps
    # at ~2.5 keV/s); above it, heating has no business raising temperature or gain fast.
    at_flat_top = min(ref[1], now[1]) >= cfg.rise_rules_min_kev
    if at_flat_top and temp_rate > cfg.temp_rise_max_kev_per_s:
        trips.append(
            Trip(
                "temp_rise_rate",
                temp_rate,
                cfg.temp_rise_max_kev_per_s,
                f"temperature rising {temp_rate:.3g} > {cfg.temp_rise_max_kev_per_s:g} keV/s",
            )
        )
    if -temp_rate > cfg.temp_fall_max_kev_per_s:
        trips.append(
            Trip(
                "temp_fall_rate",
                -temp_rate,
                cfg.temp_fall_max_kev_per_s,
                f"temperature falling {-temp_rate:.3g} > {cfg.temp_fall_max_kev_per_s:g} keV/s",
            )
        )
    stability_fall = (ref[2] - now[2]) / dt_s
    if stability_fall > cfg.stability_fall_max_per_s:
        trips.append(
            Trip(
                "stability_fall_rate",
                stability_fall,
                cfg.stability_fall_max_per_s,
                f"stability falling {stability_fall:.3g} > {cfg.stability_fall_max_per_s:g}/s",
            )
        )
    q_rate = (now[3] - ref[3]) / dt_s
    if at_flat_top and q_rate > cfg.q_rise_max_per_s:
        trips.append(
            Trip(
                "q_rise_rate",
                q_rate,
                cfg.q_rise_max_per_s,
                f"Q rising {q_rate:.3g} > {cfg.q_rise_max_per_s:g}/s",
            )
        )
    return trips


# --- the detector -------------------------------------------------------------------------


class ScramDetector:
    """The SCRAM rules of one site; state is passed in, so it can live in a Faust table."""

    def __init__(self, site: str, settings: ScramSettings | None = None) -> None:
        self.site = site
        self.settings = cfg = settings or ScramSettings()
        # Plain floats for the per-reading fast path (no pydantic attribute lookups).
        self._temp_max_kev = cfg.temp_max_kev
        self._q_max = cfg.q_max
        self._stability_min = cfg.stability_min
        self._field_min_t = cfg.field_min_t
        self._present_kev = cfg.plasma_present_kev
        self._rise_rules_min_kev = cfg.rise_rules_min_kev
        self._rate_limits = (
            cfg.temp_rise_max_kev_per_s,
            cfg.temp_fall_max_kev_per_s,
            cfg.stability_fall_max_per_s,
            cfg.q_rise_max_per_s,
        )

    def on_readings(
        self, state: SiteScramState, readings: Iterable[FusionReading], *, key_prefix: str = ""
    ) -> list[Alert | Command]:
        """Feed readings (any order, any devices) and return what to send, in order.

        ``key_prefix`` namespaces device states (used when one Kafka key carries
        readings of another site, so their devices never share state).
        """
        by_device: dict[str, list[FusionReading]] = {}
        for reading in readings:
            by_device.setdefault(reading.device, []).append(reading)
        out: list[Alert | Command] = []
        for device, device_readings in by_device.items():
            device_readings.sort(key=lambda r: r.ts)  # stable: equal times keep arrival order
            key = key_prefix + device
            device_state = state.devices.get(key)
            if device_state is None:
                device_state = state.devices[key] = DeviceState()
            for reading in device_readings:
                out += self.step(device_state, reading)
        return out

    def step(self, state: DeviceState, reading: FusionReading) -> list[Alert | Command]:
        """One reading of one device."""
        cfg = self.settings
        ts_s = reading.ts.timestamp()
        temp_kev = reading.plasma_temp_kev
        stability = reading.confinement_stability
        field_t = reading.magnetic_field_t
        # The common case - inside every limit - is decided with plain comparisons; the
        # descriptive trips are built only when something is past a limit.
        hard = (
            temp_kev > self._temp_max_kev
            or reading.q_factor > self._q_max
            or (
                temp_kev > self._present_kev
                and (
                    stability < self._stability_min
                    or (field_t is not None and field_t < self._field_min_t)
                )
            )
        )
        if state.last_ts_s is not None and ts_s <= state.last_ts_s:
            # Late or duplicate: hard limits only, time-based state untouched.
            closed = state.closed_until_s is not None and ts_s <= state.closed_until_s
            if hard and state.incident is None and not closed:
                return self._open(
                    state, reading, hard_limit_trips(cfg, reading), None, None, late=True
                )
            return []

        rates = self._advance_rates(state, reading, ts_s)
        rate_hit = rates is not None and self._rate_exceeded(rates)
        unstable_since_s = self._advance_instability(state, reading, ts_s)
        state.last_ts_s = ts_s
        if not (hard or rate_hit or unstable_since_s is not None):
            if state.incident is None:
                return []
            return self._maybe_resolve(
                state,
                reading,
                ts_s,
                safe=not state.unstable and state.below_warn_since_s is None,
            )

        trips = hard_limit_trips(cfg, reading) if hard else []
        if rates is not None and rate_hit:
            trips += rate_trips(cfg, rates.ref, rates.now)
        if unstable_since_s is not None:
            trips.append(
                Trip(
                    "unstable_sustained",
                    stability,
                    cfg.stability_warn,
                    f"confinement_stability below {cfg.stability_warn:g} for "
                    f"{ts_s - unstable_since_s:.3g} s (since {_iso(unstable_since_s)})",
                )
            )
        if state.incident is None:
            return self._open(state, reading, trips, rates, unstable_since_s, late=False)
        return self._maybe_resolve(state, reading, ts_s, safe=False)

    def _rate_exceeded(self, rates: RateContext) -> bool:
        """Whether any rate is past its limit (what :func:`rate_trips` then describes)."""
        (ref_s, ref_t, ref_st, ref_q), (now_s, now_t, now_st, now_q) = rates
        dt_s = now_s - ref_s
        if dt_s <= 0.0 or (now_t <= self._present_kev and ref_t <= self._present_kev):
            return False
        rise, fall, stability_fall, q_rise = self._rate_limits
        temp_rate = (now_t - ref_t) / dt_s
        at_flat_top = min(ref_t, now_t) >= self._rise_rules_min_kev
        return (
            (at_flat_top and temp_rate > rise)
            or -temp_rate > fall
            or (ref_st - now_st) / dt_s > stability_fall
            or (at_flat_top and (now_q - ref_q) / dt_s > q_rise)
        )

    # --- rules with memory ------------------------------------------------------------

    def _advance_rates(
        self, state: DeviceState, reading: FusionReading, ts_s: float
    ) -> RateContext | None:
        """Add the reading to the rate history; the window's two ends, once known."""
        window_s = self.settings.rate_window_s
        recent, history = state.recent, state.history
        if state.last_ts_s is not None and ts_s - state.last_ts_s > GAP_RESET_WINDOWS * window_s:
            recent.clear()
            history.clear()
        recent.append(
            (ts_s, reading.plasma_temp_kev, reading.confinement_stability, reading.q_factor)
        )
        if len(recent) > 3:
            del recent[0]
        elif len(recent) < 3:
            return None
        checked_s = state.rates_checked_s
        if checked_s is not None and ts_s - checked_s < window_s / RATE_CHECKS_PER_WINDOW:
            return None
        state.rates_checked_s = ts_s
        now = _filtered(recent)
        horizon_s = ts_s - window_s + TIME_TOLERANCE_S
        while len(history) >= 2 and history[1][0] <= horizon_s:
            del history[0]
        ref = history[0] if history and history[0][0] <= horizon_s else None
        slot_s = window_s / HISTORY_SLOTS_PER_WINDOW - TIME_TOLERANCE_S
        if not history or ts_s - history[-1][0] >= slot_s:
            history.append(now)
        return None if ref is None else RateContext(ref, now)

    def _advance_instability(
        self, state: DeviceState, reading: FusionReading, ts_s: float
    ) -> float | None:
        """Run the instability clock; when it has run long enough, when it started."""
        cfg = self.settings
        stability = reading.confinement_stability
        if reading.plasma_temp_kev <= cfg.plasma_present_kev:
            state.below_warn_since_s, state.unstable = None, False  # no plasma to confine
        elif stability < cfg.stability_warn:
            if state.below_warn_since_s is None:
                state.below_warn_since_s = ts_s
            if ts_s - state.below_warn_since_s >= cfg.unstable_after_s - TIME_TOLERANCE_S:
                state.unstable = True
        elif stability > cfg.stability_warn + cfg.stability_clear_margin:
            state.below_warn_since_s, state.unstable = None, False
        # In between (the hysteresis band) the clock and the state carry on.
        return state.below_warn_since_s if state.unstable else None

    # --- incidents ------------------------------------------------------------------

    def _open(
        self,
        state: DeviceState,
        reading: FusionReading,
        trips: list[Trip],
        rates: RateContext | None,
        unstable_since_s: float | None,
        *,
        late: bool,
    ) -> list[Alert | Command]:
        cfg = self.settings
        details: dict[str, DetailValue] = {
            "rules": ",".join(t.rule for t in trips),
            "reading_ts": reading.ts.isoformat(),
            "plasma_temp_kev": reading.plasma_temp_kev,
            "confinement_stability": reading.confinement_stability,
            "q_factor": reading.q_factor,
            "late_reading": late,
            "commands": cfg.commands,
        }
        if reading.magnetic_field_t is not None:
            details["magnetic_field_t"] = reading.magnetic_field_t
        for trip in trips:
            details[trip.rule] = trip.observed
            details[f"{trip.rule}_limit"] = trip.limit
        if rates is not None and any(t.rule.endswith("_rate") for t in trips):
            ref, now = rates.ref, rates.now
            details |= {
                "rate_from_ts": _iso(ref[0]),
                "rate_from_plasma_temp_kev": ref[1],
                "rate_from_confinement_stability": ref[2],
                "rate_from_q_factor": ref[3],
                "rate_to_plasma_temp_kev": now[1],
                "rate_to_confinement_stability": now[2],
                "rate_to_q_factor": now[3],
            }
        if unstable_since_s is not None:
            details["unstable_since_ts"] = _iso(unstable_since_s)
        first = trips[0]
        message = f"SCRAM {reading.device}: " + "; ".join(t.text for t in trips)
        alert = firing(
            site=self.site,
            device=reading.device,
            alert_type=ALERT_TYPE,
            severity=Severity.CRITICAL,
            subject=f"SCRAM {reading.device}",
            message=message,
            start=reading.ts,
            observed=first.observed,
            expected=first.limit,
            details=details,
        )
        state.incident = alert.model_dump(mode="json")
        state.safe_since_s = None
        log.critical(
            "SCRAM site=%s device=%s alert=%s rules=%s reading=%s%s",
            self.site,
            reading.device,
            alert.alert_id,
            details["rules"],
            reading.model_dump_json(),
            "" if rates is None else f" rate_from={rates.ref} rate_to={rates.now}",
        )
        command = self.command_for(alert)
        # The command first: it is the safety action, the alert is the record of it.
        return [alert] if command is None else [command, alert]

    def command_for(self, alert: Alert) -> Command | None:
        """The SCRAM command of a firing alert (None when the site sends no commands)."""
        mode = self.settings.commands
        if mode == "off" or alert.device is None:
            return None
        return Command(
            command_id=stable_id("cmd", alert.alert_id, COMMAND_ACTION),
            site=alert.site,
            device=alert.device,
            action=COMMAND_ACTION,
            # The reactor's safe state: no power exchanged (the control path fixes it too).
            setpoint_kw=0.0,
            reason=alert.message,
            issued_at=alert.start,
            dry_run=mode != "live",
            source_id=alert.alert_id,
        )

    def _maybe_resolve(
        self, state: DeviceState, reading: FusionReading, ts_s: float, *, safe: bool
    ) -> list[Alert | Command]:
        if not safe:
            state.safe_since_s = None
            return []
        if state.safe_since_s is None:
            state.safe_since_s = ts_s
        if ts_s - state.safe_since_s < self.settings.resolve_after_s - TIME_TOLERANCE_S:
            return []
        assert state.incident is not None
        alert = Alert.model_validate(state.incident)
        plasma_gone = reading.plasma_temp_kev <= self.settings.plasma_present_kev
        done = resolved(
            alert,
            reading.ts,
            {
                "resolved_because": "plasma_gone" if plasma_gone else "within_limits",
                "duration_s": (reading.ts - alert.start).total_seconds(),
            },
        )
        state.incident, state.safe_since_s, state.closed_until_s = None, None, ts_s
        log.warning(
            "SCRAM resolved site=%s device=%s alert=%s after %.3f s (%s)",
            self.site,
            reading.device,
            alert.alert_id,
            done.details["duration_s"],
            done.details["resolved_because"],
        )
        return [done]


# --- persistence ----------------------------------------------------------------------------

PERSIST_EVERY_S = 0.1
"""Write a key's state to the table at most this often in event time, unless something
that decides a SCRAM changed. On the embedded broker every table write is a produce
round trip of its own (one record per batch); writing after every batch capped the
agent at a few hundred batches/s. Losing up to this much rate history in a crash is
harmless: the median and the rate window refill from the next readings."""


def _signature(state: SiteScramState) -> tuple[tuple[Any, ...], ...]:
    """What must never be lost: incidents and the clocks that open or close them."""
    return tuple(
        (
            device,
            None if d.incident is None else d.incident["alert_id"],
            d.unstable,
            d.below_warn_since_s,
            d.safe_since_s,
            d.closed_until_s,
        )
        for device, d in state.devices.items()
    )


def _event_time_s(state: SiteScramState) -> float:
    return max((d.last_ts_s or 0.0 for d in state.devices.values()), default=0.0)


@dataclass
class _Cached:
    state: SiteScramState
    written: dict[str, Any] | None
    """The table value last written (or read) for the key."""
    signature: tuple[tuple[Any, ...], ...]
    written_at_s: float
    """Event time of that write. [s since the epoch]"""


class StateCache:
    """Site states between batches: in memory, written to the table when it matters.

    The table stays the source of truth: a cached state is used only while the table
    still holds what was last written for its key (after a rebalance another worker
    may have written newer state, which is then read instead).
    """

    def __init__(self, persist_every_s: float = PERSIST_EVERY_S) -> None:
        self.persist_every_s = persist_every_s
        self._cache: dict[str, _Cached] = {}

    def load(self, key: str, stored: dict[str, Any] | None) -> SiteScramState:
        """The state of ``key``, given what the table holds for it now."""
        cached = self._cache.get(key)
        if cached is not None and (cached.written is stored or cached.written == stored):
            return cached.state
        state = SiteScramState.from_json(stored)
        self._cache[key] = _Cached(state, stored, _signature(state), _event_time_s(state))
        return state

    def to_write(self, key: str, state: SiteScramState) -> dict[str, Any] | None:
        """The value to write to the table after a batch, or None when it can wait."""
        cached = self._cache[key]
        signature, now_s = _signature(state), _event_time_s(state)
        due_s = self.persist_every_s - TIME_TOLERANCE_S
        if signature == cached.signature and now_s - cached.written_at_s < due_s:
            return None
        written = state.to_json()
        cached.written, cached.signature, cached.written_at_s = written, signature, now_s
        return written


# --- decoding -----------------------------------------------------------------------------

FUSION_MARKER = b"fusion"
"""Every batch with a fusion reading holds these bytes (``"kind":"fusion"``); most
telemetry does not, and skipping it unparsed keeps this agent's latency low."""

_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


def parse_fusion(raw: bytes | None) -> tuple[str | None, list[FusionReading]]:
    """The batch's site and its valid fusion readings (never raises).

    Bytes without the marker are not parsed at all. The fast path validates the
    whole batch in one pydantic call. Otherwise every fusion reading that is valid
    on its own is kept, even from a batch the codec rejects (a non-finite value
    written as ``NaN`` by a lenient JSON encoder, a broken envelope): a SCRAM must
    not wait for a neighbour's broken reading. The site is None when the batch does
    not name a valid one. The shared site agent dead-letters what is rejected.
    """
    if raw is None or FUSION_MARKER not in raw:  # None: a Kafka tombstone
        return None, []
    try:
        batch = TelemetryBatch.model_validate_json(raw)
    except ValidationError:
        pass
    else:
        return batch.site, [r for r in batch.readings if isinstance(r, FusionReading)]
    try:
        # The standard library accepts NaN and Infinity, which orjson (rightly) refuses;
        # each reading is validated below, so they never reach a rule.
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack
        return None, []
    if not isinstance(data, dict) or data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        return None, []
    items = data.get("readings")
    readings: list[FusionReading] = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("kind") == "fusion":
            try:
                readings.append(FusionReading.model_validate(item))
            except ValidationError:
                continue
    site = data.get("site")
    return (site if isinstance(site, str) and _IDENTIFIER.match(site) else None), readings


# --- wiring -------------------------------------------------------------------------------


class Detectors:
    """One detector per site, created on first sight: every site is protected."""

    def __init__(self, settings: Settings) -> None:
        self.configured = {site.id: scram_settings(site) for site in settings.sites}
        self._detectors: dict[str, ScramDetector] = {}

    def get(self, site: str) -> ScramDetector | None:
        """The site's detector, or None when its ``fusion`` section turns SCRAM off."""
        detector = self._detectors.get(site)
        if detector is None:
            detector = self._detectors[site] = ScramDetector(
                site, self.configured.get(site, ScramSettings())
            )
        return detector if detector.settings.enabled else None


def register(app: faust.App, settings: Settings) -> None:
    """Wire SCRAM to Kafka: telemetry in, SCRAM commands and alerts out, state in a table.

    Every site's fusion readings are watched (defaults without a ``fusion`` section);
    sections are validated here, at start-up. SCRAM has an agent of its own, so that no
    slow step of the shared site agent ever delays it; undecodable telemetry is skipped
    here and dead-lettered once, by the shared site agent.
    """
    from pipeline.streams import AGENT_SUPERVISOR, delivered, raw_topic

    detectors = Detectors(settings)
    states = StateCache()
    source = raw_topic(app, settings, topics.TELEMETRY)
    commands_topic = raw_topic(app, settings, topics.COMMANDS)
    alerts_topic = raw_topic(app, settings, topics.ALERTS)
    table = app.Table(
        f"{settings.app_id}-scram-state",
        default=None,
        partitions=settings.partitions,
        help="Per-site SCRAM state: per fusion device, its rate history, instability "
        "clock and open incident.",
    )

    @app.agent(source, name=f"{__name__}.scram", supervisor_strategy=AGENT_SUPERVISOR)
    async def scram(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            batch_site, readings = parse_fusion(message.value)
            if not readings:
                continue
            key = message.key.decode("utf-8", "replace") if message.key else None
            site = batch_site or key
            if site is None:
                continue  # neither the batch nor its key names a site to alert
            detector = detectors.get(site)
            if detector is None:
                continue
            # A batch keyed by another site (a producer bug) is still checked - the
            # readings are real - but its devices keep their own state under the key.
            key = key or site
            prefix = "" if key == site else f"{site}/"
            state = states.load(key, table.get(key))
            out = detector.on_readings(state, readings, key_prefix=prefix)
            sent = []
            for item in out:
                target = alerts_topic if isinstance(item, Alert) else commands_topic
                sent.append(await target.send(key=site.encode(), value=codec.encode(item)))
            # Alerts delivered before the state that says they were raised (see
            # pipeline.streams.site_agent): a crash between the two raises them again.
            await delivered(sent)
            if (value := states.to_write(key, state)) is not None:
                table[key] = value
