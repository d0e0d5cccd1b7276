"""RollingSample keeps exactly the last ``size`` values (a ring of packed doubles) and
answers quantiles from its last refresh, as a deque of floats with a sorted copy would."""

from __future__ import annotations

import json
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.baselines import RollingSample, quantile_of_sorted

finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.lists(finite, max_size=60))
def test_ring_keeps_the_last_values_in_order_and_refreshes_like_a_deque(
    size: int, refresh: int, values: list[float]
) -> None:
    sample = RollingSample(size, refresh=refresh)
    reference: deque[float] = deque(maxlen=size)
    reference_sorted: list[float] = []
    since = 0
    for value in values:
        sample.add(value)
        reference.append(value)
        since += 1
        if since >= refresh or len(reference_sorted) * 2 < len(reference):
            reference_sorted, since = sorted(reference), 0
        assert sample.to_state() == list(reference)
        assert len(sample) == len(reference)
        for q in (0.0, 0.001, 0.5, 0.999, 1.0):
            assert sample.quantile(q) == quantile_of_sorted(reference_sorted, q)


@given(st.integers(1, 12), st.lists(finite, max_size=40), st.lists(finite, max_size=20))
def test_a_restored_sample_continues_as_the_original(
    size: int, before: list[float], after: list[float]
) -> None:
    original = RollingSample(size, refresh=3)
    for value in before:
        original.add(value)
    restored = RollingSample(size, refresh=3)
    restored.restore(json.loads(json.dumps(original.to_state())))
    assert restored.to_state() == original.to_state()
    if before:  # a restore refreshes the quantiles at once
        assert restored.quantile(0.5) == quantile_of_sorted(sorted(original.to_state()), 0.5)
    for value in after:
        original.add(value)
        restored.add(value)
    assert restored.to_state() == original.to_state()


def test_restoring_more_values_than_fit_keeps_the_newest() -> None:
    sample = RollingSample(3)
    sample.restore([1.0, 2.0, 3.0, 4.0, 5.0])
    assert sample.to_state() == [3.0, 4.0, 5.0]
    assert sample.quantile(0.0) == 3.0 and sample.quantile(1.0) == 5.0
    with pytest.raises(ValueError, match="empty"):
        RollingSample(3).quantile(0.5)
