"""Faust's offset commits, kept from skipping a message or stopping for good.

Faust commits, per partition, the end of the first run of consecutive acknowledged
offsets. Two known faults of faust-streaming 0.15 break at-least-once there, and both
showed in our kill -9 test (tests/reliability/test_worker_crash.py):

* **A message missing at the head is committed over** (faust-streaming issue 606):
  ``Consumer._new_offset`` holds back only when at least two offsets are missing after
  the committed one, so with one message fetched but not acknowledged it commits past
  it, and after a restart that message is never read. :func:`guard_head_of_commits`
  makes it hold back whenever the committed offset itself is not acknowledged.
* **Messages dropped during recovery stop the commits** (issue 596): after a restart,
  messages fetched while the tables were being recovered can be cleared from the
  stream's queue and then dropped as already read when they are fetched again; their
  offsets are never acknowledged, and the partition's commits stop there while the
  worker goes on processing (its lag grows, and every restart reprocesses from there).
  :func:`reread_dropped` finds such partitions and seeks them back to their committed
  offset, so the missing messages are read and processed (again, for the ones already
  processed: the processors ignore readings and prices they have already taken).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import faust
from faust.transport.consumer import Consumer

log = logging.getLogger(__name__)

REREAD_CHECK_S = 5.0
"""How often partitions are checked for acknowledgements stuck behind a missing offset."""


def missing_head(committed: int | None, acked: Sequence[int]) -> bool:
    """Whether the next offset to commit is not acknowledged while later ones are."""
    return committed is not None and bool(acked) and min(acked) > committed


def guard_head_of_commits() -> None:
    """Never commit past an offset that is not acknowledged (faust-streaming issue 606).

    Gaps Faust knows of (offsets a compacted topic no longer has) still count as
    acknowledged: Faust adds them in ``_new_offset`` itself.
    """
    original = Consumer._new_offset
    if getattr(original, "_wattstream_guarded", False):
        return

    def _new_offset(self: Consumer, tp: Any) -> int | None:
        if not self._gap.get(tp) and missing_head(self._committed_offset[tp], self._acked[tp]):
            return None
        result: int | None = original(self, tp)
        return result

    _new_offset._wattstream_guarded = True  # type: ignore[attr-defined]
    Consumer._new_offset = _new_offset  # type: ignore[method-assign]


def stuck_partitions(
    committed: Mapping[Any, int | None],
    acked: Mapping[Any, Sequence[int]],
    seen_before: Mapping[Any, tuple[int, int]],
) -> tuple[dict[Any, int], dict[Any, tuple[int, int]]]:
    """Partitions whose commits wait for a missing offset since the last check.

    Returns the partitions to read again from their committed offset, and what to
    compare with at the next check: (committed, first acknowledged) of each partition
    with a missing head now. A partition counts as stuck when it had the same missing
    head at the previous check: a message still being processed is acknowledged by then.
    """
    stuck: dict[Any, int] = {}
    now: dict[Any, tuple[int, int]] = {}
    for tp, offsets in acked.items():
        offset = committed.get(tp)
        if offset is None or not missing_head(offset, offsets):
            continue
        head = (offset, min(offsets))
        now[tp] = head
        if seen_before.get(tp) == head:
            stuck[tp] = offset
    return stuck, now


def reread_dropped(app: faust.App) -> None:
    """Check the app's partitions every :data:`REREAD_CHECK_S` and seek back the stuck ones."""
    seen: dict[Any, tuple[int, int]] = {}

    @app.timer(REREAD_CHECK_S, name=f"{__name__}.reread_dropped")
    async def check() -> None:
        nonlocal seen
        consumer: Any = app.consumer  # Faust's own Consumer: its acks are not typed
        assigned = consumer.assignment()
        acked = {tp: list(offsets) for tp, offsets in consumer._acked.items() if tp in assigned}
        stuck, seen = stuck_partitions(consumer._committed_offset, acked, seen)
        for tp, offset in stuck.items():
            log.warning(
                "%s[%d]: offset %d was fetched but never reached its agent, so commits "
                "stopped there (faust-streaming issue 596): reading again from %d",
                tp.topic,
                tp.partition,
                offset,
                offset,
            )
            await consumer.seek(tp, offset)
            seen.pop(tp, None)
