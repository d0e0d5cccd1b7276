"""A year of 15-minute prices through ``wattstream backtest --foresight none``.

The issue's goal: under 2 minutes on one core. The prices are synthetic but shaped like
a real market's (daily and weekly shape, a level that wanders, persistent deviations and
occasional spikes), seeded, so the run is the same every time; what is timed is the code
path a user's file takes after it is read: every strategy (threshold, optimal, mpc with
its forecaster), the perfect-foresight bound and the JSON summary.
"""

from __future__ import annotations

import math
import os
import resource
import time
from datetime import UTC, datetime, timedelta

import numpy as np

from processors.backtest import PricePoint, run_backtest
from processors.optimal import BatteryModel


def year_of_quarter_hours(seed: int = 11) -> list[PricePoint]:
    rng = np.random.default_rng(seed)
    steps = 365 * 96
    t = np.arange(steps)
    hour = (t % 96) / 4
    daily = 0.03 * np.sin((hour - 8) * math.pi / 12) + 0.04 * np.exp(-((hour - 19) ** 2) / 4)
    weekend = np.where(((t // 96) % 7) >= 5, -0.015, 0.0)
    level = 0.09 + np.cumsum(rng.normal(0, 0.0008, steps)).clip(-0.05, 0.08)
    deviation = np.zeros(steps)
    noise = rng.normal(0, 0.012, steps)
    for i in range(1, steps):
        deviation[i] = 0.8 * deviation[i - 1] + noise[i]
    spikes = rng.choice([0.0, 0.25, -0.15], steps, p=[0.996, 0.002, 0.002])
    prices = level + daily + weekend + deviation + spikes
    start = datetime(2025, 1, 1, tzinfo=UTC)
    return [PricePoint(start + i * timedelta(minutes=15), float(p)) for i, p in enumerate(prices)]


def bench_backtest() -> dict[str, float]:
    points = year_of_quarter_hours()
    battery = BatteryModel(10, 5, 5, 0.9, 0.0, 10.0)
    cpu_before = time.process_time()
    wall_before = time.perf_counter()
    result = run_backtest(points, battery, foresight="none")
    summary = result.to_json()
    wall_s = time.perf_counter() - wall_before
    cpu_s = time.process_time() - cpu_before
    shares = {
        f"backtest_year_15min_none_{name}_share_of_bound": float(item["share_of_bound"] or 0)
        for name, item in summary["strategies"].items()  # type: ignore[attr-defined]
    }
    return {
        "backtest_year_15min_none_intervals": float(len(points)),
        "backtest_year_15min_none_wall_s": wall_s,
        "backtest_year_15min_none_cpu_s": cpu_s,
        "backtest_year_15min_none_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024,
        "backtest_cores": float(os.cpu_count() or 1),
        **shares,
    }
