"""Robust, bounded building blocks of the detectors' baselines (plain Python, no Faust).

* :class:`RollingSample`: the last ``size`` values and their quantiles. Quantiles
  are re-sorted every ``refresh`` additions, so a reading costs O(1) amortised
  and a baseline never looks at more than ``size`` values.
* :class:`LocalClock`: local hour, weekday and minute of day of an epoch
  instant in an IANA zone (DST included), as a :class:`LocalTime` cached per
  quarter hour: zoneinfo conversions cost microseconds and the detectors ask for
  every reading. A quarter hour, not an hour, because some zones are offset by
  30 or 45 minutes.
* :func:`median`, :func:`mad_spread`: the robust location and spread of a short list.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

import numpy as np

from pipeline.settings import time_zone

MAD_TO_SIGMA = 1.4826
"""A normal distribution's standard deviation over its median absolute deviation. [-]"""
QUARTER_HOUR_S = 900


def median(values: Sequence[float]) -> float:
    return median_of_sorted(sorted(values))


def median_of_sorted(ordered: Sequence[float]) -> float:
    n = len(ordered)
    if n == 0:
        raise ValueError("median of no values")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def mad_spread(values: Sequence[float], center: float | None = None) -> float:
    """The median absolute deviation scaled to a normal standard deviation."""
    middle = median(values) if center is None else center
    return MAD_TO_SIGMA * median([abs(v - middle) for v in values])


def quantile_of_sorted(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default method)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class RollingSample:
    """The last ``size`` values, with quantiles refreshed every ``refresh`` additions.

    Values are packed doubles (``array('d')``: 8 bytes each, where a deque of Python
    floats costs about 40 with its sorted copy): a detector holds several samples of
    thousands of values per device, and a worker holds every device of its partitions.
    """

    __slots__ = ("_next", "_since", "_sorted", "refresh", "size", "values", "version")

    def __init__(self, size: int, refresh: int | None = None) -> None:
        self.size = size
        self.values = array("d")
        """The values; once full, a ring whose oldest value is at ``_next``."""
        self._next = 0
        self.refresh = refresh or max(10, size // 20)
        self._sorted = array("d")
        self._since = 0
        self.version = 0
        """Counts the refreshes: quantiles derived from the sample can be cached per version."""

    def __len__(self) -> int:
        return len(self.values)

    def add(self, value: float) -> None:
        values = self.values
        if len(values) < self.size:
            values.append(value)
            # Sort early while the sample is young, so quantiles exist from the first tens.
            if len(self._sorted) * 2 < len(values):
                self._sort()
                return
        else:
            values[self._next] = value
            self._next = (self._next + 1) % self.size
        self._since += 1
        if self._since >= self.refresh:
            self._sort()

    def _sort(self) -> None:
        # numpy sorts the packed doubles in place of boxing thousands of Python floats
        # (about ten times faster); the sorted copy stays an array('d'), whose items
        # are plain floats.
        ordered = array("d")
        ordered.frombytes(np.sort(np.frombuffer(self.values, dtype=np.float64)).tobytes())
        self._sorted = ordered
        self._since = 0
        self.version += 1

    def to_state(self) -> list[float]:
        """The values, oldest first."""
        values = self.values
        return values[self._next :].tolist() + values[: self._next].tolist()

    def restore(self, values: Iterable[float]) -> None:
        """Refill from a checkpoint (quantiles refreshed at once)."""
        kept = array("d", values)
        self.values = kept[len(kept) - self.size :] if len(kept) > self.size else kept
        self._next = 0
        self._sort()

    def largest(self) -> float:
        """The largest value at the last refresh (raises if the sample is empty)."""
        return self._sorted[-1]

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the sample at its last refresh (raises if it is empty)."""
        if not self._sorted:
            raise ValueError("quantile of an empty sample")
        return quantile_of_sorted(self._sorted, q)


@dataclass(frozen=True, slots=True)
class LocalTime:
    """The local calendar of one quarter hour (see :class:`LocalClock`)."""

    base_s: float
    """The quarter hour's first instant. [s since the epoch]"""
    hour: int
    weekday: int
    """Monday is 0."""
    day: date
    base_minute: float
    """Local minute of the day at ``base_s``. [min]"""

    def minute_of_day(self, ts_s: float) -> float:
        return self.base_minute + (ts_s - self.base_s) / 60.0


_NO_TIME = LocalTime(math.nan, 0, 0, date.min, 0.0)


class LocalClock:
    """Local calendar facts of epoch instants in one zone, cached per quarter hour."""

    __slots__ = ("_current", "zone")

    def __init__(self, zone_name: str) -> None:
        self.zone = time_zone(zone_name)
        self._current = _NO_TIME

    def at(self, ts_s: float) -> LocalTime:
        """The local calendar of the quarter hour ``ts_s`` is in (the same object for
        every instant of it, so callers can cache what they derive from it)."""
        current = self._current
        # NaN compares false: the first call loads.
        if current.base_s <= ts_s < current.base_s + QUARTER_HOUR_S:
            return current
        base_s = math.floor(ts_s / QUARTER_HOUR_S) * QUARTER_HOUR_S
        local = datetime.fromtimestamp(base_s, UTC).astimezone(self.zone)
        current = self._current = LocalTime(
            base_s, local.hour, local.weekday(), local.date(), local.hour * 60 + local.minute
        )
        return current

    def hour(self, ts_s: float) -> int:
        return self.at(ts_s).hour

    def weekday(self, ts_s: float) -> int:
        """Monday is 0."""
        return self.at(ts_s).weekday

    def day(self, ts_s: float) -> date:
        return self.at(ts_s).day

    def minute_of_day(self, ts_s: float) -> float:
        return self.at(ts_s).minute_of_day(ts_s)
