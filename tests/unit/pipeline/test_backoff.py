from __future__ import annotations

import random

import pytest

from pipeline.backoff import Backoff


def test_delays_double_up_to_the_ceiling_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff(1.0, 10.0, random.Random(1))
    delays = [backoff.next_delay_s() for _ in range(8)]
    ceilings = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(2))
    for _ in range(5):
        backoff.next_delay_s()
    backoff.reset()
    assert 0.25 <= backoff.next_delay_s() <= 0.5


def test_jitter_spreads_clients_that_failed_together() -> None:
    first = [Backoff(1.0, 60.0, random.Random(seed)).next_delay_s() for seed in range(20)]
    assert len({round(d, 6) for d in first}) == 20


@pytest.mark.parametrize(("initial_s", "max_s"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_nonsense_limits_are_refused(initial_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial_s, max_s)
