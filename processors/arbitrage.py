"""Battery arbitrage: charge when energy is cheap, discharge when it is dear.

The rule (``threshold`` strategy, from the specification), per battery and per
price interval:

* price <  ``charge_below_price_per_kwh``    -> CHARGE
* price >  ``discharge_above_price_per_kwh`` -> DISCHARGE
* otherwise                                  -> HOLD

always within the battery's limits:

* state of charge stays in [max(soc_min, reserve), soc_max] (the reserve is kept
  for backup power, so arbitrage never discharges into it);
* power stays within ``max_charge_kw`` / ``max_discharge_kw``;
* round-trip efficiency is split evenly: charging P kW for t h stores
  P*t*sqrt(eta) kWh, discharging P kW delivers P*t kWh to the grid and draws
  P*t/sqrt(eta) kWh from the cells.

A decision is made once per battery per price interval, from the first reading
of that battery inside the interval, and covers the rest of the interval.
Readings and prices arrive on different topics in any order; :class:`SiteArbitrage`
holds readings whose price is not known yet and decides as soon as it is, so the
decisions are the same whatever the arrival order.

Everything here is plain Python (no Faust import): ``register`` at the bottom is
the thin wiring to Kafka.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pipeline.schemas import (
    Action,
    BatteryReading,
    Command,
    Decision,
    PriceTick,
    TelemetryBatch,
    stable_id,
)
from pipeline.settings import BatteryConfig, Settings, SiteConfig
from processors.optimal import BatteryModel, RollingOptimizer

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

# Below this a setpoint is noise (and would flip an action on rounding): HOLD instead.
MIN_POWER_KW = 1e-6
# Readings whose price has not arrived yet wait in state, compacted to the first
# reading of each 5-minute UTC bucket. That is lossless for every interval that
# starts on a 5-minute boundary (5, 15, 30 and 60-minute markets all do): the
# first reading of such an interval is the first reading of one of its buckets.
UNPRICED_BUCKET_MS = 5 * 60 * 1000
# At most 31 days of buckets per battery wait; a replay at full speed can run a
# long way ahead of the price fan-out, and decisions must not depend on that.
MAX_UNPRICED = 31 * 24 * 12
# Known prices older than this behind the newest reading are pruned from state.
PRICE_HORIZON_MS = 48 * 3600 * 1000


@dataclass(frozen=True)
class Setpoint:
    """The outcome of the rule for one battery over one interval."""

    action: Action
    power_kw: float
    """Positive discharge, negative charge. [kW]"""
    grid_energy_kwh: float
    """Positive sold to the grid, negative bought. [kWh]"""
    expected_soc_pct: float
    reason: str
    binding: tuple[str, ...] = ()


def decide_threshold(
    battery: BatteryConfig, soc_pct: float, price_per_kwh: float, duration_h: float
) -> Setpoint:
    """Apply the threshold rule to one battery for ``duration_h`` hours at one price."""
    if not duration_h > 0:
        raise ValueError(f"duration_h must be positive, got {duration_h}")
    charge_below = battery.charge_below_price_per_kwh
    discharge_above = battery.discharge_above_price_per_kwh
    if charge_below is None or discharge_above is None:
        raise ValueError(f"battery {battery.device}: the threshold rule needs both thresholds")
    one_way_efficiency = math.sqrt(battery.round_trip_efficiency)
    capacity_kwh = battery.capacity_kwh

    if price_per_kwh < charge_below:
        why = f"price {price_per_kwh:.4f} < charge threshold {charge_below:.4f}"
        headroom_kwh = (battery.soc_max_pct - soc_pct) / 100.0 * capacity_kwh
        soc_limited_kw = headroom_kwh / (one_way_efficiency * duration_h)
        if soc_limited_kw <= MIN_POWER_KW:
            return Setpoint(
                Action.HOLD,
                0.0,
                0.0,
                soc_pct,
                f"{why}, but battery full (soc {soc_pct:.1f}% >= max {battery.soc_max_pct:.1f}%)",
                ("soc_max_pct",),
            )
        power_kw = min(battery.max_charge_kw, soc_limited_kw)
        binding = ("max_charge_kw",) if power_kw == battery.max_charge_kw else ("soc_max_pct",)
        stored_kwh = power_kw * duration_h * one_way_efficiency
        return Setpoint(
            Action.CHARGE,
            -power_kw,
            -power_kw * duration_h,
            min(battery.soc_max_pct, soc_pct + stored_kwh / capacity_kwh * 100.0),
            f"{why}: charge {power_kw:.2f} kW (limited by {binding[0]})",
            binding,
        )

    if price_per_kwh > discharge_above:
        why = f"price {price_per_kwh:.4f} > discharge threshold {discharge_above:.4f}"
        floor_pct = max(battery.soc_min_pct, battery.reserve_pct)
        floor_name = "reserve_pct" if battery.reserve_pct >= battery.soc_min_pct else "soc_min_pct"
        available_kwh = (soc_pct - floor_pct) / 100.0 * capacity_kwh
        soc_limited_kw = available_kwh * one_way_efficiency / duration_h
        if soc_limited_kw <= MIN_POWER_KW:
            return Setpoint(
                Action.HOLD,
                0.0,
                0.0,
                soc_pct,
                f"{why}, but battery at its floor (soc {soc_pct:.1f}% <= {floor_name} "
                f"{floor_pct:.1f}%)",
                (floor_name,),
            )
        power_kw = min(battery.max_discharge_kw, soc_limited_kw)
        binding = ("max_discharge_kw",) if power_kw == battery.max_discharge_kw else (floor_name,)
        drawn_kwh = power_kw * duration_h / one_way_efficiency
        return Setpoint(
            Action.DISCHARGE,
            power_kw,
            power_kw * duration_h,
            max(floor_pct, soc_pct - drawn_kwh / capacity_kwh * 100.0),
            f"{why}: discharge {power_kw:.2f} kW (limited by {binding[0]})",
            binding,
        )

    return Setpoint(
        Action.HOLD,
        0.0,
        0.0,
        soc_pct,
        f"price {price_per_kwh:.4f} between thresholds "
        f"{charge_below:.4f} and {discharge_above:.4f}",
    )


def battery_model(battery: BatteryConfig) -> BatteryModel:
    """The LP's view of a configured battery: arbitrage keeps above the reserve."""
    return BatteryModel(
        capacity_kwh=battery.capacity_kwh,
        max_charge_kw=battery.max_charge_kw,
        max_discharge_kw=battery.max_discharge_kw,
        round_trip_efficiency=battery.round_trip_efficiency,
        floor_kwh=max(battery.soc_min_pct, battery.reserve_pct) / 100 * battery.capacity_kwh,
        ceiling_kwh=battery.soc_max_pct / 100 * battery.capacity_kwh,
        degradation_cost_per_kwh=battery.degradation_cost_per_kwh,
    )


@dataclass
class CachedPlan:
    """The last LP plan of a battery, followed until new prices or a drift call for another."""

    horizon_end_ms: int
    """End of the known prices it was made with: a later end means new prices."""
    starts_ms: list[int]
    power_kw: list[float]
    stored_kwh: list[float]
    """Energy stored at the end of each planned interval."""
    stored_at_start_kwh: float
    planned_revenue: float

    def to_json(self) -> list[Any]:
        return [
            self.horizon_end_ms,
            self.starts_ms,
            self.power_kw,
            self.stored_kwh,
            self.stored_at_start_kwh,
            self.planned_revenue,
        ]

    @classmethod
    def from_json(cls, data: list[Any] | None) -> CachedPlan | None:
        return None if not data else cls(*data)


# A measured state of charge further than this from the plan's calls for a new plan.
DRIFT_PCT = 1.0


def decide_optimal(
    battery: BatteryConfig,
    soc_pct: float,
    prices_per_kwh: Sequence[float],
    durations_h: Sequence[float],
    starts_ms: Sequence[int],
    cached: CachedPlan | None = None,
) -> tuple[Setpoint, CachedPlan]:
    """The setpoint of the first interval (``starts_ms[0]``), following or remaking the plan.

    The plan over the known prices is kept and followed while nothing changed:
    it is remade when prices published since extend the horizon, or when the
    measured state of charge drifts more than ``DRIFT_PCT`` from the plan's.
    """
    stored_kwh = soc_pct / 100 * battery.capacity_kwh
    horizon_end_ms = starts_ms[-1] + round(durations_h[-1] * 3_600_000)
    step = -1
    if cached is not None and cached.horizon_end_ms == horizon_end_ms:
        with contextlib.suppress(ValueError):
            step = cached.starts_ms.index(starts_ms[0])
    if step >= 0 and cached is not None:
        expected_kwh = cached.stored_kwh[step - 1] if step > 0 else cached.stored_at_start_kwh
        if abs(expected_kwh - stored_kwh) > DRIFT_PCT / 100 * battery.capacity_kwh:
            step = -1
    replanned = step < 0 or cached is None
    if replanned or cached is None:
        plan = RollingOptimizer(battery_model(battery)).plan(
            stored_kwh, prices_per_kwh, durations_h
        )
        revenue = float(
            sum(
                p * d * q
                for p, d, q in zip(prices_per_kwh, durations_h, plan.net_power_kw, strict=True)
            )
        )
        cached = CachedPlan(
            horizon_end_ms,
            list(starts_ms),
            [float(q) for q in plan.net_power_kw],
            [float(v) for v in plan.stored_kwh],
            stored_kwh,
            revenue,
        )
        step = 0
    horizon = (
        f"LP over {len(cached.starts_ms)} known price intervals "
        f"({'new plan' if replanned else f'step {step + 1} of the plan'}, "
        f"plan revenue {cached.planned_revenue:.4f})"
    )
    setpoint = _planned_setpoint(
        battery,
        cached.power_kw[step],
        cached.stored_kwh[step] / battery.capacity_kwh * 100,
        prices_per_kwh[0],
        durations_h[0],
        horizon,
    )
    return setpoint, cached


def _planned_setpoint(
    battery: BatteryConfig,
    power_kw: float,
    expected_soc_pct: float,
    price: float,
    duration_h: float,
    horizon: str,
) -> Setpoint:
    """The setpoint of a plan's first interval, with the limit that binds it."""
    power_kw = power_kw if abs(power_kw) > MIN_POWER_KW else 0.0
    binding: tuple[str, ...] = ()
    if power_kw < 0:
        action = Action.CHARGE
        if -power_kw >= battery.max_charge_kw - 1e-6:
            binding = ("max_charge_kw",)
        elif expected_soc_pct >= battery.soc_max_pct - 1e-6:
            binding = ("soc_max_pct",)
        what = f"charge {-power_kw:.2f} kW now at {price:.4f}"
    elif power_kw > 0:
        action = Action.DISCHARGE
        floor_pct = max(battery.soc_min_pct, battery.reserve_pct)
        if power_kw >= battery.max_discharge_kw - 1e-6:
            binding = ("max_discharge_kw",)
        elif expected_soc_pct <= floor_pct + 1e-6:
            binding = (
                "reserve_pct" if battery.reserve_pct >= battery.soc_min_pct else "soc_min_pct",
            )
        what = f"discharge {power_kw:.2f} kW now at {price:.4f}"
    else:
        action = Action.HOLD
        what = f"hold at {price:.4f}: later intervals pay more"
    return Setpoint(
        action,
        power_kw,
        power_kw * duration_h,
        min(100.0, max(0.0, expected_soc_pct)),
        f"{horizon}: {what}",
        binding,
    )


# The mpc strategy's forecaster learns from the last weeks of prices: its fit looks
# back 28 days, and each of its samples 5 weeks more (processors/price_forecast.py).
MPC_HISTORY_MS = 70 * 24 * 3600 * 1000


def decide_mpc(
    battery: BatteryConfig,
    soc_pct: float,
    history: Sequence[PricedInterval],
    interval: PricedInterval,
    ts_ms: int,
) -> Setpoint:
    """The mpc strategy's setpoint for ``interval`` at ``ts_ms``: a planner
    (:class:`processors.mpc.MpcPlanner`, as the backtest runs it) fed the prices known
    by then, in order; the same prices give the same decision as the backtest's."""
    from processors.mpc import MpcPlanner

    step_ms = interval.end_ms - interval.start_ms
    planner = MpcPlanner(battery_model(battery), timedelta(milliseconds=step_ms))
    for known in history:
        published_ms = known.start_ms if known.published_ms is None else known.published_ms
        if published_ms > ts_ms or known.end_ms - known.start_ms != step_ms:
            continue  # not known yet, or of another resolution than the market's now
        with contextlib.suppress(ValueError):  # off this interval's grid
            planner.observe(_dt(known.start_ms), known.price_per_kwh)
    duration_h = (interval.end_ms - ts_ms) / 3_600_000
    if not planner.knows(_dt(interval.start_ms)):
        return Setpoint(
            Action.HOLD, 0.0, 0.0, soc_pct, "mpc: this interval's price is not in its history"
        )
    stored_kwh = soc_pct / 100 * battery.capacity_kwh
    step = planner.decide(_dt(interval.start_ms), stored_kwh)
    horizon = planner.last_horizon
    known_steps = horizon.known_steps if horizon is not None else 1
    text = (
        f"MPC over {step.horizon_steps} intervals ({known_steps} known, the rest "
        f"forecast; plan revenue {step.planned_revenue:.4f})"
    )
    return _planned_setpoint(
        battery,
        step.power_kw,
        step.stored_after_kwh / battery.capacity_kwh * 100,
        interval.price_per_kwh,
        duration_h,
        text,
    )


# --- joining readings with prices, per site ---------------------------------------------


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


@dataclass
class PricedInterval:
    start_ms: int
    end_ms: int
    price_per_kwh: float
    currency: str
    published_ms: int | None = None
    """When the price became known (None: at its start). The optimal strategy plans
    only over prices published by its decision time, also when a replay delivers
    prices far ahead of the readings."""


@dataclass
class BatteryState:
    last_decided_start_ms: int | None = None
    unpriced: list[tuple[int, float]] = field(default_factory=list)
    """(ts_ms, soc_pct) of readings whose price interval is not known yet, by time."""
    plan: CachedPlan | None = None
    """The optimal strategy's current plan."""


@dataclass
class SiteState:
    """What the arbitrage of one site remembers between messages (a Faust table value)."""

    intervals: list[PricedInterval] = field(default_factory=list)
    """Known price intervals, sorted by start."""
    history: list[PricedInterval] = field(default_factory=list)
    """Sites with an mpc battery: the last ``MPC_HISTORY_MS`` of prices, sorted by start,
    what its forecaster learns from (``intervals`` keeps only 48 hours)."""
    batteries: dict[str, BatteryState] = field(default_factory=dict)
    newest_reading_ms: int | None = None
    dropped_unpriced: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "intervals": [
                [i.start_ms, i.end_ms, i.price_per_kwh, i.currency, i.published_ms]
                for i in self.intervals
            ],
            "batteries": {
                device: {
                    "last": b.last_decided_start_ms,
                    "unpriced": list(b.unpriced),
                    **({"plan": b.plan.to_json()} if b.plan else {}),
                }
                for device, b in self.batteries.items()
            },
            "newest": self.newest_reading_ms,
            "dropped": self.dropped_unpriced,
            **(
                {
                    "history": [
                        [i.start_ms, i.end_ms, i.price_per_kwh, i.currency, i.published_ms]
                        for i in self.history
                    ]
                }
                if self.history
                else {}
            ),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SiteState:
        if not data:
            return cls()
        return cls(
            intervals=[
                PricedInterval(int(s), int(e), float(p), str(c), *published)
                for s, e, p, c, *published in data["intervals"]
            ],
            batteries={
                device: BatteryState(
                    b["last"],
                    _earliest_per_bucket((int(t), float(soc)) for t, soc in b["unpriced"]),
                    CachedPlan.from_json(b.get("plan")),
                )
                for device, b in data["batteries"].items()
            },
            newest_reading_ms=data["newest"],
            dropped_unpriced=data["dropped"],
            history=[
                PricedInterval(int(s), int(e), float(p), str(c), *published)
                for s, e, p, c, *published in data.get("history", [])
            ],
        )

    def interval_at(self, ts_ms: int) -> PricedInterval | None:
        index = bisect.bisect_right(self.intervals, ts_ms, key=lambda i: i.start_ms) - 1
        if index >= 0 and ts_ms < self.intervals[index].end_ms:
            return self.intervals[index]
        return None

    def add_interval(self, interval: PricedInterval, *, keep_history: bool = False) -> None:
        for known in (self.intervals, self.history) if keep_history else (self.intervals,):
            index = bisect.bisect_left(known, interval.start_ms, key=lambda i: i.start_ms)
            if index < len(known) and known[index].start_ms == interval.start_ms:
                known[index] = interval  # a revised price replaces the old one
            else:
                known.insert(index, interval)
        if keep_history:
            oldest_ms = self.history[-1].start_ms - MPC_HISTORY_MS
            first = bisect.bisect_left(self.history, oldest_ms, key=lambda i: i.start_ms)
            del self.history[:first]


class SiteArbitrage:
    """The threshold strategy for every configured battery of one site."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        self.batteries = {b.device: b for b in site.batteries}
        self.keeps_history = any(b.strategy == "mpc" for b in site.batteries)

    def on_readings(self, state: SiteState, readings: list[BatteryReading]) -> list[Decision]:
        """Take a site's battery readings (in arrival order); return the decisions they allow."""
        decisions: list[Decision] = []
        for reading in readings:
            battery = self.batteries.get(reading.device)
            if battery is None:
                continue
            ts_ms = _ms(reading.ts)
            state.newest_reading_ms = max(ts_ms, state.newest_reading_ms or ts_ms)
            battery_state = state.batteries.setdefault(reading.device, BatteryState())
            interval = state.interval_at(ts_ms)
            if interval is None:
                self._wait_for_price(state, battery_state, ts_ms, reading.soc_pct)
                continue
            decision = self._decide(state, battery, battery_state, interval, ts_ms, reading.soc_pct)
            if decision is not None:
                decisions.append(decision)
        self._prune(state)
        return decisions

    def on_price(self, state: SiteState, tick: PriceTick) -> list[Decision]:
        """Take a price of the site's market; decide for readings that were waiting for it."""
        published_ms = _ms(tick.published_at) if tick.published_at else None
        state.add_interval(
            PricedInterval(
                _ms(tick.start), _ms(tick.end), tick.price_per_kwh, tick.currency, published_ms
            ),
            keep_history=self.keeps_history,
        )
        decisions: list[Decision] = []
        # Every other waiting reading's interval is still unknown (a reading whose
        # interval was known was decided on arrival or by that interval's tick), so only
        # those inside this tick's interval are looked up: waiting readings are kept in
        # time order, so they are one slice, found by bisection however long the backlog
        # of a worker running ahead of its prices.
        start_ms, end_ms = _ms(tick.start), _ms(tick.end)
        for device, battery_state in sorted(state.batteries.items()):
            battery = self.batteries.get(device)
            waiting = battery_state.unpriced
            first = bisect.bisect_left(waiting, start_ms, key=_ts_of)
            last = bisect.bisect_left(waiting, end_ms, key=_ts_of)
            if battery is None or first == last:
                continue
            still_unpriced: list[tuple[int, float]] = []
            for ts_ms, soc_pct in waiting[first:last]:
                interval = state.interval_at(ts_ms)
                if interval is None:
                    still_unpriced.append((ts_ms, soc_pct))
                    continue
                decision = self._decide(state, battery, battery_state, interval, ts_ms, soc_pct)
                if decision is not None:
                    decisions.append(decision)
            waiting[first:last] = still_unpriced
        self._prune(state)
        return decisions

    @staticmethod
    def _known_from(
        state: SiteState, interval: PricedInterval, ts_ms: int
    ) -> tuple[list[float], list[float], list[int]]:
        """Prices, durations and starts from now to the last contiguous known interval."""
        index = state.intervals.index(interval)
        prices = [interval.price_per_kwh]
        durations = [(interval.end_ms - ts_ms) / 3_600_000]
        starts = [interval.start_ms]
        end_ms = interval.end_ms
        for later in state.intervals[index + 1 :]:
            published_ms = later.start_ms if later.published_ms is None else later.published_ms
            if later.start_ms != end_ms or published_ms > ts_ms:
                break  # a hole, or not published yet at decision time: the horizon ends
            prices.append(later.price_per_kwh)
            durations.append((later.end_ms - later.start_ms) / 3_600_000)
            starts.append(later.start_ms)
            end_ms = later.end_ms
        return prices, durations, starts

    def _decide(
        self,
        state: SiteState,
        battery: BatteryConfig,
        battery_state: BatteryState,
        interval: PricedInterval,
        ts_ms: int,
        soc_pct: float,
    ) -> Decision | None:
        last = battery_state.last_decided_start_ms
        if last is not None and interval.start_ms <= last:
            return None  # this interval (or a later one) was already decided
        battery_state.last_decided_start_ms = interval.start_ms
        duration_h = (interval.end_ms - ts_ms) / 3_600_000
        if battery.strategy == "optimal":
            prices, durations, starts = self._known_from(state, interval, ts_ms)
            setpoint, battery_state.plan = decide_optimal(
                battery, soc_pct, prices, durations, starts, battery_state.plan
            )
        elif battery.strategy == "mpc":
            setpoint = decide_mpc(battery, soc_pct, state.history, interval, ts_ms)
        else:
            setpoint = decide_threshold(battery, soc_pct, interval.price_per_kwh, duration_h)
        valid_from = _dt(interval.start_ms)
        return Decision(
            decision_id=stable_id(
                "dec", self.site.id, battery.device, battery.strategy, valid_from.isoformat()
            ),
            site=self.site.id,
            device=battery.device,
            strategy=battery.strategy,
            action=setpoint.action,
            power_kw=setpoint.power_kw,
            grid_energy_kwh=setpoint.grid_energy_kwh,
            price_per_kwh=interval.price_per_kwh,
            currency=interval.currency,
            expected_revenue=setpoint.grid_energy_kwh * interval.price_per_kwh,
            soc_pct=soc_pct,
            expected_soc_pct=setpoint.expected_soc_pct,
            decided_at=_dt(ts_ms),
            valid_from=valid_from,
            valid_until=_dt(interval.end_ms),
            reason=setpoint.reason,
            binding=list(setpoint.binding),
        )

    @staticmethod
    def _wait_for_price(
        state: SiteState, battery_state: BatteryState, ts_ms: int, soc_pct: float
    ) -> None:
        waiting = battery_state.unpriced
        # One reading per bucket, the earliest, whatever the arrival order: a worker
        # restarted from its committed offsets reads again readings its state already
        # holds, behind newer ones. Compared with the last reading only, each of those
        # was kept, and a backlog re-read that way pushed the oldest readings out at
        # MAX_UNPRICED before their prices came (a kill -9 run lost four days of decisions).
        bucket_start_ms = ts_ms - ts_ms % UNPRICED_BUCKET_MS
        index = bisect.bisect_left(waiting, bucket_start_ms, key=_ts_of)
        if index < len(waiting) and waiting[index][0] < bucket_start_ms + UNPRICED_BUCKET_MS:
            if ts_ms < waiting[index][0]:
                waiting[index] = (ts_ms, soc_pct)  # an earlier reading of the bucket, late
            return
        waiting.insert(index, (ts_ms, soc_pct))
        if len(waiting) > MAX_UNPRICED:
            del waiting[0]
            state.dropped_unpriced += 1

    def _prune(self, state: SiteState) -> None:
        newest = state.newest_reading_ms
        if newest is None:
            return
        state.intervals = [i for i in state.intervals if i.end_ms >= newest - PRICE_HORIZON_MS]


def _ts_of(waiting: tuple[int, float]) -> int:
    return waiting[0]


def _earliest_per_bucket(readings: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """Waiting readings in time order, the earliest of each bucket (a state saved by an
    older version may be out of order or hold several readings of a bucket)."""
    kept: list[tuple[int, float]] = []
    for ts_ms, soc_pct in sorted(readings, key=_ts_of):
        if not kept or kept[-1][0] // UNPRICED_BUCKET_MS != ts_ms // UNPRICED_BUCKET_MS:
            kept.append((ts_ms, soc_pct))
    return kept


def command_for(decision: Decision, battery: BatteryConfig) -> Command | None:
    """The device command that carries out a decision (None if the battery sends none).

    The setpoint is the decision's power, already within the battery's limits;
    the control connector clamps again to the device's own. It expires with the
    decision's interval, so a late command is never applied to the next one.
    """
    if battery.commands == "off":
        return None
    return Command(
        command_id=stable_id("cmd", decision.decision_id),
        site=decision.site,
        device=decision.device,
        action="set_power",
        setpoint_kw=decision.power_kw,
        reason=f"{decision.strategy} {decision.action.value}: {decision.reason}",
        issued_at=decision.decided_at,
        valid_until=decision.valid_until,
        dry_run=battery.commands != "live",
        source_id=decision.decision_id,
    )


def battery_readings(batch: TelemetryBatch) -> list[BatteryReading]:
    return [r for r in batch.readings if isinstance(r, BatteryReading)]


# --- wiring -------------------------------------------------------------------------------


def register(app: faust.App, settings: Settings) -> None:
    """Wire the rule to Kafka: telemetry + site prices in, decisions and commands out,
    state in a table (written once per batch of messages)."""
    # Imported here so that importing the rule never imports Faust.
    from pipeline.streams import site_agent, site_state

    engines = {site.id: SiteArbitrage(site) for site in settings.sites if site.batteries}
    if not engines:
        return
    states = site_state(
        app,
        settings,
        "arbitrage-state",
        "Per-site arbitrage state: known prices, pending readings, last decided interval.",
        SiteState.from_json,
        SiteState.to_json,
    )

    def with_commands(site: str, decisions: list[Decision]) -> list[Decision | Command]:
        out: list[Decision | Command] = []
        for decision in decisions:
            out.append(decision)
            command = command_for(decision, engines[site].batteries[decision.device])
            if command is not None:
                out.append(command)
        return out

    def on_telemetry(site: str, batch: TelemetryBatch) -> list[Decision | Command]:
        readings = battery_readings(batch)
        if not readings:
            return []
        state = states.get(site)
        decisions = engines[site].on_readings(state, readings)
        states.put(site, state)
        return with_commands(site, decisions)

    def on_price(site: str, tick: PriceTick) -> list[Decision | Command]:
        state = states.get(site)
        decisions = engines[site].on_price(state, tick)
        states.put(site, state)
        return with_commands(site, decisions)

    site_agent(
        app, settings, f"{__name__}.arbitrage", engines, telemetry=on_telemetry, prices=on_price
    )
