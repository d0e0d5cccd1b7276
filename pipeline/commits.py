"""Faust's offset commits, kept from skipping a message or stopping for good.

Faust commits, per partition, the end of the first run of consecutive acknowledged
offsets. Four faults of faust-streaming 0.15 break at-least-once there; each showed in
our kill -9 test (tests/reliability/test_worker_crash.py):

* **A message missing at the head is committed over** (faust-streaming issue 606):
  ``Consumer._new_offset`` holds back only when at least two offsets are missing after
  the committed one, so with one message fetched but not acknowledged it commits past
  it, and after a restart that message is never read. :func:`guard_head_of_commits`
  makes it hold back whenever the committed offset itself is not acknowledged.
* **Messages dropped during recovery** (issue 596): after a restart, messages
  delivered to a stream while Faust finishes its recovery were thrown away unread, their
  offsets never acknowledged, and the partition's commits stopped there while the worker
  went on processing. Our kill -9 test found the way (DEVLOG traces of each delivery and
  acknowledgement): ``Recovery.on_recovery_completed`` resumes the stream partitions
  while the flow is already running (it was resumed to read the changelogs), seeks them,
  and then calls ``app.flow_control.resume()`` again, which empties every stream's queue
  (``FlowControlEvent.resume`` clears the ``clear_on_resume`` queues). The messages
  fetched in between are in those queues and marked read: they are never delivered
  again. :func:`keep_queued_while_flowing` makes a resume of a flow that is not
  suspended leave the queues alone; a resume after a suspension (a rebalance) still
  clears what was queued before it.
* **A suspended flow marks a message read.** Faust's fetch loop marks a message read
  even when the suspended flow did not let it through; :func:`keep_undelivered_unread`
  keeps such a read offset where it was.

* **A commit before the state it covers is written.** Faust flushes its producer before
  it commits offsets, but ``ProducerBuffer.flush`` returns as soon as no message was
  sent for 0.1 s, with table changelog writes still queued: under load the offsets of a
  batch were committed while its state had not reached the changelog, and a worker
  killed then came back with state older than its committed input (the input between
  them lost: Scope 2 skipped two days of three sites in one kill -9 run).
  :func:`flush_producer_buffer_fully` makes that flush wait until every queued message
  has been handed to the Kafka client, whose own flush Faust then awaits.

:func:`reread_dropped` stays as the safety net for any other way: it finds a partition
whose commits wait for a missing offset and seeks it back there. A message re-read that
way comes after later ones of its partition were processed, so it logs a warning; since
the fix above none has shown in our runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import faust
from faust.transport.consumer import Consumer
from faust.transport.producer import ProducerBuffer

log = logging.getLogger(__name__)

REREAD_CHECK_S = 5.0
"""How often partitions are checked for acknowledgements stuck behind a missing offset."""


def missing_head(committed: int | None, acked: Sequence[int]) -> bool:
    """Whether the next offset to commit is not acknowledged while later ones are."""
    return committed is not None and bool(acked) and min(acked) > committed


def _wrap_consumer_method(name: str, wrap: Callable[[Any], Any]) -> None:
    """Replace ``Consumer.<name>`` by ``wrap(original)``, once however often it is asked."""
    original = getattr(Consumer, name)
    if getattr(original, "_wattstream_wrapped", False):
        return
    wrapped = wrap(original)
    wrapped._wattstream_wrapped = True
    setattr(Consumer, name, wrapped)


def guard_head_of_commits() -> None:
    """Never commit past an offset that is not acknowledged (faust-streaming issue 606).

    Gaps Faust knows of (offsets a compacted topic no longer has) still count as
    acknowledged: Faust adds them in ``_new_offset`` itself.
    """

    def wrap(original: Callable[[Consumer, Any], int | None]) -> Any:
        def _new_offset(self: Consumer, tp: Any) -> int | None:
            committed, acked = self._committed_offset[tp], self._acked[tp]
            if not self._gap.get(tp) and missing_head(committed, acked):
                return None
            return original(self, tp)

        return _new_offset

    _wrap_consumer_method("_new_offset", wrap)


FLUSH_POLL_S = 0.1
"""How often a flush looks again at the buffer (Faust's own wait per message)."""


def flush_producer_buffer_fully() -> None:
    """Make ``ProducerBuffer.flush`` return only once nothing is queued or being handed to
    the Kafka client (see the module's docstring). A buffer that stopped with messages
    queued raises, as Faust's own flush does: those messages cannot be sent."""
    if getattr(ProducerBuffer.flush, "_wattstream_wrapped", False):
        return
    send_pending = ProducerBuffer._send_pending

    def handing(buffer: ProducerBuffer) -> int:
        """Messages taken off the queue and not yet handed to the Kafka client."""
        return int(getattr(buffer, "_wattstream_handing", 0))

    async def _send_pending(self: ProducerBuffer, fut: Any) -> None:
        setattr(self, "_wattstream_handing", handing(self) + 1)  # noqa: B010
        try:
            await send_pending(self, fut)
        finally:
            setattr(self, "_wattstream_handing", handing(self) - 1)  # noqa: B010

    async def flush(self: ProducerBuffer) -> None:
        while self.size or handing(self):
            if self.state != "running" and self.size:
                raise RuntimeError("Cannot flush: Producer not Running")
            self.message_sent.clear()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=FLUSH_POLL_S)
            except TimeoutError:
                continue

    flush._wattstream_wrapped = True  # type: ignore[attr-defined]
    ProducerBuffer._send_pending = _send_pending  # type: ignore[method-assign]
    ProducerBuffer.flush = flush  # type: ignore[method-assign]


def keep_queued_while_flowing(app: faust.App) -> None:
    """Make ``app.flow_control.resume()`` leave the stream queues alone while the flow is
    not suspended: what they hold then was delivered in this flow, not before a
    suspension (see the module's docstring)."""
    flow = app.flow_control
    resume = flow.resume

    def resume_unless_flowing() -> None:
        if not flow.is_active():
            resume()

    flow.resume = resume_unless_flowing  # type: ignore[method-assign]


class _ReadOffsets(defaultdict[Any, int | None]):
    """Faust's per-partition read offsets, not moved forward while the flow is suspended.

    Faust's fetch loop marks a message read even when the suspended flow did not let it
    through (``Consumer._drain_messages``); a seek (``perform_seek``, which updates this
    mapping without ``__setitem__``) or a changelog partition moves it as usual.
    """

    def __init__(self, suspended: Callable[[], bool]) -> None:
        super().__init__(lambda: None)
        self._suspended = suspended

    def __setitem__(self, tp: Any, offset: int | None) -> None:
        current = self.get(tp)
        forward = offset is not None and (current is None or offset > current)
        if forward and self._suspended() and not tp.topic.endswith("-changelog"):
            return
        super().__setitem__(tp, offset)


def keep_undelivered_unread() -> None:
    """Every Faust consumer keeps its read offsets in a :class:`_ReadOffsets`."""

    def wrap(original: Callable[..., None]) -> Any:
        def __init__(self: Consumer, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            self._read_offset = _ReadOffsets(self.suspend_flow.is_set)

        return __init__

    _wrap_consumer_method("__init__", wrap)


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
