"""Capped exponential backoff with jitter, for every retry loop in wattstream."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``initial_s`` up to ``max_s``, each drawn in [ceiling/2, ceiling].

    The jitter keeps many clients that failed together (devices that dropped at
    once, feeds restarted together) from retrying in lockstep, while the lower
    half of the range keeps the schedule close to the nominal doubling.
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {initial_s} and {max_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self._ceiling_s = initial_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def next_delay_s(self) -> float:
        """The delay before the next attempt; the ceiling doubles for the one after. [s]"""
        delay_s = self._ceiling_s * self._rng.uniform(0.5, 1.0)
        self._ceiling_s = min(self._ceiling_s * 2, self.max_s)
        return delay_s

    def reset(self) -> None:
        """After a success: the next failure starts from ``initial_s`` again."""
        self._ceiling_s = self.initial_s
