"""Island mode, backup generation and battery health.

**Island mode.** One small state machine per site, :class:`IslandController`,
with two states (:class:`GridState`):

* ``connected`` -> ``islanded`` when the grid fails: an explicit grid-status
  reading says so, or the grid-side meter's voltage or frequency stays out of
  band for ``failure_confirm_s`` (a sag shorter than that - a motor start, a
  fault cleared elsewhere - is not an outage). On entry it fires one critical
  ``grid_failure`` alert and sheds every non-critical consumer.
* ``islanded`` -> ``connected`` when the grid has been back (status up, voltage
  and frequency in band) without interruption for ``return_stable_s``; any bad
  observation restarts that clock. On exit it resolves the alert (same
  ``alert_id``), restores the shed consumers and stops the generators.

While islanded, critical loads are served from battery and solar, and the
backup generators are started when they cannot be (see
:meth:`IslandController._generator_needed`): the critical load net of solar
exceeds the battery's discharge limit, or would take the battery below
``battery_min_soc_pct`` within ``horizon_h``. Generators do not flap:

* a start needs the shortfall to last ``start_confirm_s`` (one inrush spike is
  not a shortfall);
* a running generator stops only after its ``min_run_s`` *and* once the battery
  is back above ``generator_stop_soc_pct`` with the battery able to cover the
  load again - a hysteresis band between the start and stop conditions, so a
  load hovering at the threshold does not start and stop it every reading.

All commands are dry-run unless ``dry_run=false``; every command and alert id
is deterministic (site, device, action, incident start), so a replay sends no
duplicate.

The meter is assumed to measure the grid side of the transfer switch: while the
site is islanded it still sees the (dead or returning) grid.

**Battery health.** :class:`BatteryHealth` follows one battery from its
readings: charge level, remaining runtime at the current discharge, equivalent
full cycles and measured round-trip efficiency (method in its docstring).

Plain Python, no Faust import.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.schemas import (
    Alert,
    AlertStatus,
    BatteryReading,
    Command,
    Identifier,
    MeterReading,
    Reading,
    Severity,
    TelemetryBatch,
    stable_id,
)
from pipeline.settings import Settings, SiteConfig, repeated, validate_section
from processors.allocation import ConsumerConfig, ConsumerKind, default_consumers

if TYPE_CHECKING:
    import faust

Pct = Annotated[float, Field(ge=0.0, le=100.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class GridState(StrEnum):
    CONNECTED = "connected"
    ISLANDED = "islanded"


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GeneratorConfig(_Config):
    """One backup generator."""

    device: Identifier
    rated_kw: PositiveFloat
    min_run_s: NonNegativeFloat = 1800.0
    """Once started, run at least this long: short runs wet-stack diesel engines and
    every start wears the starter. 30 min is a common manufacturer minimum. [s]"""


class IslandConfig(_Config):
    """Island mode of one site."""

    site: Identifier
    consumers: list[ConsumerConfig]
    """Non-critical ones are shed on grid failure, critical ones kept."""
    generators: list[GeneratorConfig] = Field(default_factory=list)
    """Started in this order, as many as the shortfall needs."""
    battery_capacity_kwh: PositiveFloat
    battery_max_discharge_kw: PositiveFloat
    battery_round_trip_efficiency: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    battery_min_soc_pct: Pct = 10.0
    """Island mode may use the reserve but not go below this. [%]"""
    generator_stop_soc_pct: Pct = 60.0
    """A running generator stops only once the battery is back above this (hysteresis). [%]"""
    horizon_h: PositiveFloat = 1.0
    """Start a generator if the battery would reach battery_min_soc_pct within this:
    enough for a generator to start, warm up and take load with margin. [h]"""
    start_confirm_s: NonNegativeFloat = 10.0
    """A shortfall must last this long before a start: a load's inrush is not a shortfall. [s]"""
    nominal_voltage_v: PositiveFloat = 230.0
    voltage_tolerance_pct: Annotated[float, Field(gt=0.0, lt=100.0)] = 15.0
    """Out of +-15 % is a failure: wider than EN 50160's +-10 % supply quality band, so
    a weak but live grid is not called an outage; narrower than a dead bus. [%]"""
    min_frequency_hz: PositiveFloat = 47.5
    max_frequency_hz: PositiveFloat = 51.5
    """47.5-51.5 Hz: the band in which EN 50549-1 requires generators to stay connected;
    outside it the grid is not one to lean on. [Hz]"""
    failure_confirm_s: NonNegativeFloat = 2.0
    """Out of band this long is an outage; shorter is a sag. [s]"""
    return_stable_s: NonNegativeFloat = 300.0
    """Grid back and in band this long before reconnecting: IEEE 1547's default
    return-to-service delay, long enough for auto-reclosers to finish. [s]"""
    dry_run: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.min_frequency_hz < self.max_frequency_hz:
            raise ValueError(
                f"island {self.site}: min_frequency_hz ({self.min_frequency_hz}) must be below "
                f"max_frequency_hz ({self.max_frequency_hz})"
            )
        if not self.battery_min_soc_pct < self.generator_stop_soc_pct:
            raise ValueError(
                f"island {self.site}: generator_stop_soc_pct ({self.generator_stop_soc_pct}) "
                f"must be above battery_min_soc_pct ({self.battery_min_soc_pct})"
            )
        devices = [g.device for g in self.generators]
        duplicates = repeated(devices)
        if duplicates:
            raise ValueError(f"island {self.site}: duplicate generators {duplicates}")
        return self


@dataclass(frozen=True)
class SiteObservation:
    """What is known about a site at one instant; None means not measured in this update."""

    ts: datetime
    grid_voltage_v: float | None = None
    grid_frequency_hz: float | None = None
    grid_connected: bool | None = None
    """An explicit grid-status reading (transfer switch, inverter), when there is one."""
    critical_load_kw: float | None = None
    solar_kw: float | None = None
    battery_soc_pct: float | None = None


@dataclass
class IslandState:
    """What the controller of one site remembers (a Faust table value)."""

    grid: GridState = GridState.CONNECTED
    out_of_band_since: datetime | None = None
    in_band_since: datetime | None = None
    incident_start: datetime | None = None
    shed: list[str] = field(default_factory=list)
    running: dict[str, datetime] = field(default_factory=dict)
    """Generator device -> start time."""
    shortfall_since: datetime | None = None
    critical_load_kw: float = 0.0
    solar_kw: float = 0.0
    battery_soc_pct: float | None = None

    def to_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "grid": self.grid.value,
            "out_of_band_since": iso(self.out_of_band_since),
            "in_band_since": iso(self.in_band_since),
            "incident_start": iso(self.incident_start),
            "shed": list(self.shed),
            "running": {d: t.isoformat() for d, t in self.running.items()},
            "shortfall_since": iso(self.shortfall_since),
            "critical_load_kw": self.critical_load_kw,
            "solar_kw": self.solar_kw,
            "battery_soc_pct": self.battery_soc_pct,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> IslandState:
        if not data:
            return cls()

        def dt(value: str | None) -> datetime | None:
            return None if value is None else datetime.fromisoformat(value)

        return cls(
            grid=GridState(data["grid"]),
            out_of_band_since=dt(data["out_of_band_since"]),
            in_band_since=dt(data["in_band_since"]),
            incident_start=dt(data["incident_start"]),
            shed=list(data["shed"]),
            running={d: datetime.fromisoformat(t) for d, t in data["running"].items()},
            shortfall_since=dt(data["shortfall_since"]),
            critical_load_kw=float(data["critical_load_kw"]),
            solar_kw=float(data["solar_kw"]),
            battery_soc_pct=data["battery_soc_pct"],
        )


ALERT_TYPE = "grid_failure"
# Consumers that are loads; battery charging and export are flows, not devices to shed.
LOAD_KINDS = frozenset({ConsumerKind.FLEET, ConsumerKind.FACILITY, ConsumerKind.OPPORTUNISTIC})


class IslandController:
    """The island-mode state machine of one site. Pure: the caller passes time in."""

    def __init__(self, config: IslandConfig) -> None:
        self.config = config

    # --- grid health ---------------------------------------------------------------

    def grid_ok(self, obs: SiteObservation) -> bool | None:
        """Whether this observation shows a healthy grid; None if it says nothing about it."""
        cfg = self.config
        verdicts: list[bool] = []
        if obs.grid_connected is not None:
            verdicts.append(obs.grid_connected)
        if obs.grid_voltage_v is not None:
            band_v = cfg.nominal_voltage_v * cfg.voltage_tolerance_pct / 100.0
            verdicts.append(abs(obs.grid_voltage_v - cfg.nominal_voltage_v) <= band_v)
        if obs.grid_frequency_hz is not None:
            verdicts.append(cfg.min_frequency_hz <= obs.grid_frequency_hz <= cfg.max_frequency_hz)
        return all(verdicts) if verdicts else None

    def step(self, state: IslandState, obs: SiteObservation) -> list[Command | Alert]:
        """Advance the state machine by one observation; return what to send."""
        if obs.critical_load_kw is not None:
            state.critical_load_kw = max(0.0, obs.critical_load_kw)
        if obs.solar_kw is not None:
            state.solar_kw = max(0.0, obs.solar_kw)
        if obs.battery_soc_pct is not None:
            state.battery_soc_pct = obs.battery_soc_pct

        out: list[Command | Alert] = []
        ok = self.grid_ok(obs)
        if state.grid is GridState.CONNECTED:
            if ok is False:
                if state.out_of_band_since is None:
                    state.out_of_band_since = obs.ts
                confirmed = (
                    obs.grid_connected is False
                    or (obs.ts - state.out_of_band_since).total_seconds()
                    >= self.config.failure_confirm_s
                )
                if confirmed:
                    out += self._island(state, obs)
            elif ok is True:
                state.out_of_band_since = None
        else:
            if ok is False:
                state.in_band_since = None
            elif ok is True:
                if state.in_band_since is None:
                    state.in_band_since = obs.ts
                stable_s = (obs.ts - state.in_band_since).total_seconds()
                if stable_s >= self.config.return_stable_s:
                    return out + self._reconnect(state, obs)
            out += self._dispatch_generators(state, obs.ts)
        return out

    # --- transitions ---------------------------------------------------------------

    def _alert(self, state: IslandState, status: AlertStatus, obs: SiteObservation) -> Alert:
        assert state.incident_start is not None
        start = state.incident_start
        details: dict[str, float | str | bool] = {}
        if obs.grid_voltage_v is not None:
            details["grid_voltage_v"] = obs.grid_voltage_v
        if obs.grid_frequency_hz is not None:
            details["grid_frequency_hz"] = obs.grid_frequency_hz
        firing = status is AlertStatus.FIRING
        return Alert(
            alert_id=stable_id("alert", self.config.site, ALERT_TYPE, start.isoformat()),
            site=self.config.site,
            alert_type=ALERT_TYPE,
            severity=Severity.CRITICAL,
            status=status,
            subject=f"grid failure at {self.config.site}"
            + ("" if firing else ": grid back, reconnected"),
            message=(
                "grid lost: site islanded, non-critical loads shed"
                if firing
                else f"grid stable for {self.config.return_stable_s:.0f} s: loads restored"
            ),
            start=start,
            end=None if firing else obs.ts,
            details=details,
        )

    def _command(
        self,
        state: IslandState,
        device: str,
        action: str,
        ts: datetime,
        reason: str,
        setpoint_kw: float | None = None,
    ) -> Command:
        assert state.incident_start is not None
        incident = state.incident_start.isoformat()
        return Command(
            command_id=stable_id("cmd", self.config.site, device, action, incident, ts.isoformat()),
            site=self.config.site,
            device=device,
            action=action,
            setpoint_kw=setpoint_kw,
            reason=reason,
            issued_at=ts,
            dry_run=self.config.dry_run,
            source_id=stable_id("alert", self.config.site, ALERT_TYPE, incident),
        )

    def _island(self, state: IslandState, obs: SiteObservation) -> list[Command | Alert]:
        # The incident starts when the grid was first seen bad, not when it was confirmed,
        # so the alert's start is the outage's start.
        state.grid = GridState.ISLANDED
        state.incident_start = state.out_of_band_since or obs.ts
        state.out_of_band_since = None
        state.in_band_since = None
        state.shortfall_since = None
        out: list[Command | Alert] = [self._alert(state, AlertStatus.FIRING, obs)]
        state.shed = sorted(
            c.name for c in self.config.consumers if c.kind in LOAD_KINDS and not c.critical
        )
        for device in state.shed:
            out.append(
                self._command(state, device, "shed", obs.ts, "grid failure: non-critical load")
            )
        out += self._dispatch_generators(state, obs.ts)
        return out

    def _reconnect(self, state: IslandState, obs: SiteObservation) -> list[Command | Alert]:
        out: list[Command | Alert] = []
        for device in sorted(state.running):
            out.append(self._command(state, device, "stop_job", obs.ts, "grid back: stop backup"))
        for device in state.shed:
            out.append(self._command(state, device, "restore", obs.ts, "grid back: restore load"))
        out.append(self._alert(state, AlertStatus.RESOLVED, obs))
        state.grid = GridState.CONNECTED
        state.incident_start = None
        state.in_band_since = None
        state.shed = []
        state.running = {}
        state.shortfall_since = None
        return out

    # --- generators ----------------------------------------------------------------

    def deficit_kw(self, state: IslandState) -> float:
        """Critical load that solar does not cover, for the battery (or generators). [kW]"""
        return max(0.0, state.critical_load_kw - state.solar_kw)

    def battery_covers(self, state: IslandState, soc_floor_pct: float) -> bool:
        """Whether the battery alone can carry the deficit for ``horizon_h`` above a floor."""
        cfg = self.config
        deficit_kw = self.deficit_kw(state)
        if deficit_kw <= 0:
            return True
        if deficit_kw > cfg.battery_max_discharge_kw or state.battery_soc_pct is None:
            return False
        usable_kwh = (
            max(0.0, state.battery_soc_pct - soc_floor_pct)
            / 100.0
            * cfg.battery_capacity_kwh
            * math.sqrt(cfg.battery_round_trip_efficiency)
        )
        return usable_kwh / deficit_kw >= cfg.horizon_h

    def _generator_needed(self, state: IslandState) -> bool:
        return not self.battery_covers(state, self.config.battery_min_soc_pct)

    def _may_stop(self, state: IslandState) -> bool:
        # Hysteresis: the stop condition is strictly harder than "no longer needed".
        soc = state.battery_soc_pct
        return (
            soc is not None
            and soc >= self.config.generator_stop_soc_pct
            and self.battery_covers(state, self.config.battery_min_soc_pct)
        )

    def _dispatch_generators(self, state: IslandState, ts: datetime) -> list[Command | Alert]:
        out: list[Command | Alert] = []
        generators = self.config.generators
        if not generators:
            return out
        needed = self._generator_needed(state)
        if needed:
            if state.shortfall_since is None:
                state.shortfall_since = ts
        else:
            state.shortfall_since = None

        running_kw = sum(g.rated_kw for g in generators if g.device in state.running)
        shortfall_confirmed = (
            state.shortfall_since is not None
            and (ts - state.shortfall_since).total_seconds() >= self.config.start_confirm_s
        )
        if shortfall_confirmed:
            # Add generators in order until the running ones cover the deficit, or all run.
            for generator in generators:
                if generator.device in state.running:
                    continue
                if state.running and running_kw >= self.deficit_kw(state):
                    break
                state.running[generator.device] = ts
                running_kw += generator.rated_kw
                out.append(
                    self._command(
                        state,
                        generator.device,
                        "start_job",
                        ts,
                        f"island: battery and solar cannot carry {self.deficit_kw(state):.1f} kW "
                        f"of critical load for {self.config.horizon_h:g} h",
                        setpoint_kw=generator.rated_kw,
                    )
                )
        elif state.running and self._may_stop(state):
            for generator in generators:
                started = state.running.get(generator.device)
                if started is None:
                    continue
                if (ts - started).total_seconds() >= generator.min_run_s:
                    del state.running[generator.device]
                    out.append(
                        self._command(
                            state,
                            generator.device,
                            "stop_job",
                            ts,
                            "island: battery recharged and able to carry the load",
                        )
                    )
        return out


# --- battery health ----------------------------------------------------------------------


@dataclass(frozen=True)
class BatteryHealthSnapshot:
    device: str
    ts: datetime
    soc_pct: float
    energy_kwh: float
    """Stored energy at this state of charge. [kWh]"""
    power_kw: float
    """Positive discharging. [kW]"""
    runtime_h: float | None
    """Time to the floor at the current discharge; None when not discharging. [h]"""
    equivalent_full_cycles: float
    energy_in_kwh: float
    energy_out_kwh: float
    measured_round_trip_efficiency: float | None
    """Energy out / energy in over closed cycles; None before the first one. [-]"""
    closed_cycles: int


class BatteryHealth:
    """Health of one battery, from its readings (``power_kw`` positive discharging).

    * **Energy** in and out is integrated from power with a sample-and-hold rule:
      the power read at ``ts`` holds until the next reading. A gap longer than
      ``max_gap_s`` is not integrated (energy is never invented across missing
      telemetry) and restarts the efficiency measurement.
    * **Equivalent full cycles** = (energy in + energy out) / (2 x capacity): one full
      charge and one full discharge make one cycle.
    * **Round-trip efficiency** is measured over *closed cycles*: a window opens at
      some state of charge (the anchor) and closes when the state of charge comes
      back to the anchor after moving at least ``min_cycle_depth_pct`` away from it,
      with energy both in and out. Since the stored energy is the same at both ends,
      energy out / energy in over the window is the round-trip efficiency,
      self-discharge and auxiliaries included. The crossing is interpolated inside
      the reading interval where the state of charge passes the anchor, so a
      reading that jumps past the anchor does not bias the result. The efficiency
      reported is energy-weighted over all closed cycles (sum out / sum in).
      It is only as good as the BMS's state-of-charge estimate: a drifting SOC
      shows up as a drifting efficiency.
    * **Runtime** at the current discharge uses the stored energy above
      ``floor_soc_pct`` times the one-way efficiency (measured when known, else the
      rated one).
    """

    def __init__(
        self,
        device: str,
        capacity_kwh: float,
        *,
        floor_soc_pct: float = 10.0,
        rated_round_trip_efficiency: float = 0.9,
        min_cycle_depth_pct: float = 5.0,
        max_gap_s: float = 900.0,
    ) -> None:
        if not capacity_kwh > 0:
            raise ValueError(f"battery {device}: capacity_kwh must be positive, got {capacity_kwh}")
        if not 0 < rated_round_trip_efficiency <= 1:
            raise ValueError(
                f"battery {device}: rated_round_trip_efficiency must be in (0, 1], "
                f"got {rated_round_trip_efficiency}"
            )
        self.device = device
        self.capacity_kwh = capacity_kwh
        self.floor_soc_pct = floor_soc_pct
        self.rated_round_trip_efficiency = rated_round_trip_efficiency
        # A 5-point excursion is well above SOC quantisation (0.1-1 %) and noise, so a
        # closed window is a real cycle and not a wiggle around the anchor.
        self.min_cycle_depth_pct = min_cycle_depth_pct
        # 15 min: longer than any poll interval, short enough that a held power value
        # is still plausible.
        self.max_gap_s = max_gap_s
        self.energy_in_kwh = 0.0
        self.energy_out_kwh = 0.0
        self.closed_in_kwh = 0.0
        self.closed_out_kwh = 0.0
        self.closed_cycles = 0
        self.out_of_order = 0
        self._last: tuple[datetime, float, float] | None = None
        """(ts, power_kw, soc_pct) of the previous reading."""
        self._anchor_pct: float | None = None
        self._window_in_kwh = 0.0
        self._window_out_kwh = 0.0
        self._window_depth_pct = 0.0

    def _open_window(self, anchor_pct: float) -> None:
        self._anchor_pct = anchor_pct
        self._window_in_kwh = self._window_out_kwh = self._window_depth_pct = 0.0

    def update(self, ts: datetime, power_kw: float, soc_pct: float) -> BatteryHealthSnapshot:
        """Take one reading; return the health after it."""
        if not (math.isfinite(power_kw) and math.isfinite(soc_pct)):
            raise ValueError(f"battery {self.device}: non-finite reading {power_kw=} {soc_pct=}")
        last = self._last
        if last is not None and ts <= last[0]:
            self.out_of_order += 1
            return self.snapshot()
        if last is None:
            self._open_window(soc_pct)
        else:
            prev_ts, prev_power_kw, prev_soc = last
            dt_h = (ts - prev_ts).total_seconds() / 3600.0
            if dt_h * 3600.0 > self.max_gap_s:
                self._open_window(soc_pct)
            else:
                step_kwh = prev_power_kw * dt_h
                in_kwh, out_kwh = max(0.0, -step_kwh), max(0.0, step_kwh)
                self.energy_in_kwh += in_kwh
                self.energy_out_kwh += out_kwh
                self._advance_window(prev_soc, soc_pct, in_kwh, out_kwh)
        self._last = (ts, power_kw, soc_pct)
        return self.snapshot()

    def _advance_window(self, prev_soc: float, soc: float, in_kwh: float, out_kwh: float) -> None:
        anchor = self._anchor_pct
        assert anchor is not None
        crosses = (prev_soc - anchor) * (soc - anchor) < 0 or (soc == anchor != prev_soc)
        deep = self._window_depth_pct >= self.min_cycle_depth_pct
        if (
            crosses
            and deep
            and self._window_in_kwh + in_kwh > 0
            and self._window_out_kwh + out_kwh > 0
        ):
            # Split this step where the SOC passes the anchor (linear within the step).
            fraction = (anchor - prev_soc) / (soc - prev_soc)
            self.closed_in_kwh += self._window_in_kwh + in_kwh * fraction
            self.closed_out_kwh += self._window_out_kwh + out_kwh * fraction
            self.closed_cycles += 1
            self._open_window(anchor)
            self._window_in_kwh = in_kwh * (1 - fraction)
            self._window_out_kwh = out_kwh * (1 - fraction)
            self._window_depth_pct = abs(soc - anchor)
            return
        self._window_in_kwh += in_kwh
        self._window_out_kwh += out_kwh
        self._window_depth_pct = max(self._window_depth_pct, abs(soc - anchor))

    def feed(self, reading: BatteryReading) -> BatteryHealthSnapshot:
        """Take a battery reading of this device."""
        if reading.device != self.device:
            raise ValueError(f"reading of {reading.device!r} fed to the tracker of {self.device!r}")
        return self.update(reading.ts, reading.power_kw, reading.soc_pct)

    @property
    def measured_round_trip_efficiency(self) -> float | None:
        if self.closed_cycles == 0 or self.closed_in_kwh <= 0:
            return None
        return self.closed_out_kwh / self.closed_in_kwh

    def snapshot(self) -> BatteryHealthSnapshot:
        if self._last is None:
            raise ValueError(f"battery {self.device}: no reading yet")
        ts, power_kw, soc_pct = self._last
        measured = self.measured_round_trip_efficiency
        efficiency = self.rated_round_trip_efficiency if measured is None else measured
        runtime_h: float | None = None
        if power_kw > 0:
            usable_kwh = max(0.0, soc_pct - self.floor_soc_pct) / 100.0 * self.capacity_kwh
            runtime_h = usable_kwh * math.sqrt(efficiency) / power_kw
        return BatteryHealthSnapshot(
            device=self.device,
            ts=ts,
            soc_pct=soc_pct,
            energy_kwh=soc_pct / 100.0 * self.capacity_kwh,
            power_kw=power_kw,
            runtime_h=runtime_h,
            equivalent_full_cycles=(self.energy_in_kwh + self.energy_out_kwh)
            / (2.0 * self.capacity_kwh),
            energy_in_kwh=self.energy_in_kwh,
            energy_out_kwh=self.energy_out_kwh,
            measured_round_trip_efficiency=self.measured_round_trip_efficiency,
            closed_cycles=self.closed_cycles,
        )


# --- the stream's adapter: telemetry -> SiteObservation ----------------------------------
#
# Readings are taken in event-time order and grouped by timestamp; each group is one
# observation. The grid comes from ``meter`` readings (voltage_v, frequency_hz) of the
# grid-side meter (``meter_device``; None: every meter). The energy picture keeps the
# latest power of every device: solar_kw is the sum of the solar devices, the battery
# state of charge the mean of the batteries' latest, and the critical load either the
# sum of the ``critical_load_devices`` (home/ev/... readings of critical circuits) or,
# with none configured, the whole site load meter + solar + battery + generator (an
# upper bound: what the site drew, critical or not).


class IslandSettings(IslandConfig):
    """``[sites.island]``: :class:`IslandConfig` (``site`` is the site's id) plus which
    readings feed it. ``consumers`` default to the allocation section's (else the default
    order); the battery limits default to the site's battery when it has exactly one."""

    meter_device: Identifier | None = None
    critical_load_devices: list[Identifier] = Field(default_factory=list)


def island_settings(site: SiteConfig) -> IslandSettings | None:
    """Validate a site's ``island`` section (None without one); raises SettingsError."""
    if site.island is None:
        return None
    where = f"sites[{site.id}].island"
    data = {**site.island, "site": site.id}
    if "consumers" not in data:
        consumers = (site.allocation or {}).get("consumers")
        data["consumers"] = consumers if consumers is not None else default_consumers()
    if len(site.batteries) == 1:
        battery = site.batteries[0]
        data.setdefault("battery_capacity_kwh", battery.capacity_kwh)
        data.setdefault("battery_max_discharge_kw", battery.max_discharge_kw)
        data.setdefault("battery_round_trip_efficiency", battery.round_trip_efficiency)
    return validate_section(IslandSettings, where, data)


def observations(
    readings: Iterable[Reading], latest: dict[str, list[Any]], cfg: IslandSettings
) -> list[SiteObservation]:
    """One observation per distinct timestamp, in event-time order.

    ``latest`` (device -> [kind, power_kw, soc_pct or None]) is the energy picture
    carried between calls; it is updated in place.
    """
    by_ts: dict[datetime, list[Reading]] = {}
    for reading in readings:
        by_ts.setdefault(reading.ts, []).append(reading)
    out: list[SiteObservation] = []
    for ts in sorted(by_ts):
        voltage_v: float | None = None
        frequency_hz: float | None = None
        for reading in by_ts[ts]:
            power_kw = getattr(reading, "power_kw", None)
            if power_kw is not None:
                soc = reading.soc_pct if isinstance(reading, BatteryReading) else None
                latest[reading.device] = [reading.kind, float(power_kw), soc]
            if isinstance(reading, MeterReading) and cfg.meter_device in (None, reading.device):
                if reading.voltage_v is not None:
                    voltage_v = reading.voltage_v
                if reading.frequency_hz is not None:
                    frequency_hz = reading.frequency_hz

        def total_kw(*kinds: str) -> float:
            return sum(p for kind, p, _ in latest.values() if kind in kinds)

        if cfg.critical_load_devices:
            critical_kw = sum(latest[d][1] for d in cfg.critical_load_devices if d in latest)
        else:
            critical_kw = total_kw("meter", "solar", "battery", "generator")
        socs = [soc for kind, _, soc in latest.values() if kind == "battery" and soc is not None]
        out.append(
            SiteObservation(
                ts=ts,
                grid_voltage_v=voltage_v,
                grid_frequency_hz=frequency_hz,
                critical_load_kw=max(0.0, critical_kw),
                solar_kw=total_kw("solar"),
                battery_soc_pct=sum(socs) / len(socs) if socs else None,
            )
        )
    return out


def step_readings(
    controller: IslandController, data: dict[str, Any] | None, readings: Iterable[Reading]
) -> tuple[dict[str, Any], list[Command | Alert]]:
    """Feed a batch of a site's readings to its controller; return the new state (JSON) and
    what to send."""
    data = data or {}
    state = IslandState.from_json(data.get("island"))
    latest: dict[str, list[Any]] = dict(data.get("latest") or {})
    cfg = controller.config
    assert isinstance(cfg, IslandSettings)
    out: list[Command | Alert] = []
    for obs in observations(readings, latest, cfg):
        out += controller.step(state, obs)
    return {"island": state.to_json(), "latest": latest}, out


# --- wiring -------------------------------------------------------------------------------


def register(app: faust.App, settings: Settings) -> None:
    """Wire island mode to Kafka: telemetry in, commands and alerts out.

    Only sites with an ``island`` section get work; sections are validated here, at
    start-up. Undecodable telemetry is dead-lettered once, by the shared site agent
    (:func:`pipeline.streams.site_agent`).
    """
    from pipeline.streams import site_table, site_telemetry_agent

    controllers = {
        site.id: IslandController(cfg)
        for site in settings.sites
        if (cfg := island_settings(site)) is not None
    }
    table = site_table(
        app,
        settings,
        "island-state",
        "Per-site island state: grid state, shed loads, running generators, latest powers.",
    )

    def step(site: str, batch: TelemetryBatch) -> list[Command | Alert]:
        table[site], out = step_readings(controllers[site], table.get(site), batch.readings)
        return out

    # Telemetry only: this agent does not use prices, so it does not read them.
    site_telemetry_agent(app, settings, f"{__name__}.island", controllers, step)
