"""What the commits rely on in Faust, tested on its own consumer: a batch left by an
exception is never safe to commit (pipeline.streams.committed_only_when_done: a message
marked acknowledged is not acknowledged again), the commit is held at a missing offset,
partitions stuck behind one are read again, a suspended flow marks nothing read, and
resuming a flow that runs already keeps what the streams have queued, and a flush before a
commit waits for every queued message (pipeline/commits.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest
from faust.transport.producer import ProducerBuffer
from faust.types import TP
from faust.types.tuples import ConsumerMessage
from mode.utils.queues import FlowControlQueue

from pipeline import topics
from pipeline.app import create_app
from pipeline.commits import _ReadOffsets, missing_head, stuck_partitions
from pipeline.streams import committed_only_when_done
from tests.conftest import SettingsFactory


def _consumer_and_topic(make_settings: SettingsFactory) -> tuple[Any, TP]:
    settings = make_settings(broker="127.0.0.1:9")
    app = create_app(settings)
    tp = TP(settings.topic(topics.TELEMETRY), 0)
    cast(Any, app.topics)._acking_topics.add(tp.topic)  # as the conductor does once it subscribes
    return app.consumer, tp


def _message(tp: TP, offset: int) -> ConsumerMessage:
    """A message as a stream holds it: one reference, released by its ack."""
    message = ConsumerMessage(tp.topic, tp.partition, offset, 0.0, 0, {}, b"k", b"v", None, tp=tp)
    message.incref()
    return message


def _ack(consumer: Any, tp: TP, offset: int) -> None:
    assert _message(tp, offset).ack(consumer)


def test_one_message_missing_at_the_head_holds_the_commit(make_settings: SettingsFactory) -> None:
    # faust-streaming issue 606: committed 2585, 2586-2589 acknowledged, 2585 still in
    # flight; Faust alone commits 2590 and 2585 is never read after a restart.
    consumer, tp = _consumer_and_topic(make_settings)
    consumer._committed_offset[tp] = 2585
    for offset in range(2586, 2590):
        _ack(consumer, tp, offset)
    assert consumer._new_offset(tp) is None
    _ack(consumer, tp, 2585)
    assert consumer._new_offset(tp) == 2590


def test_a_gap_faust_knows_of_still_counts_as_acknowledged(make_settings: SettingsFactory) -> None:
    # Offsets a compacted topic no longer has: Faust records them as a gap when it
    # fetches past them, and commits over them.
    consumer, tp = _consumer_and_topic(make_settings)
    consumer._committed_offset[tp] = 10
    consumer._gap[tp].addi(10, 12)
    for offset in (12, 13):
        _ack(consumer, tp, offset)
    assert consumer._new_offset(tp) == 14


def test_missing_head() -> None:
    assert not missing_head(None, [5, 6])  # nothing committed yet: Faust's own rule
    assert not missing_head(4, [])
    assert not missing_head(4, [4, 5])
    assert missing_head(4, [5, 6])


def test_a_partition_is_read_again_when_its_head_stays_missing_across_two_checks() -> None:
    tp, other = TP("t", 0), TP("t", 1)
    committed = {tp: 4, other: 10}
    stuck, seen = stuck_partitions(committed, {tp: [6, 7], other: [10, 11]}, {})
    assert stuck == {} and seen == {tp: (4, 6)}
    # Still missing at the next check, later offsets acknowledged meanwhile: read again.
    stuck, seen = stuck_partitions(committed, {tp: [6, 7, 8], other: [12]}, seen)
    assert stuck == {tp: 4}
    # A head that filled in, or moved on, is not stuck.
    stuck, _ = stuck_partitions({tp: 4}, {tp: [4, 6]}, {tp: (4, 6)})
    assert stuck == {}
    stuck, _ = stuck_partitions({tp: 7}, {tp: [9]}, {tp: (4, 6)})
    assert stuck == {}


def test_a_suspended_flow_does_not_mark_an_undelivered_message_read(
    make_settings: SettingsFactory,
) -> None:
    # faust-streaming issue 596: fetched while the flow is suspended (between resuming the
    # partitions and resuming the flow after recovery), not delivered, and yet marked read,
    # the message would be dropped when it is fetched again after the seek.
    consumer, tp = _consumer_and_topic(make_settings)
    read = consumer._read_offset
    assert isinstance(read, _ReadOffsets)
    read[tp] = 29
    consumer.stop_flow()
    read[tp] = 40  # what the fetch loop does with a message the flow did not deliver
    assert read[tp] == 29
    read.update({tp: 12})  # perform_seek, to the committed offset
    assert read[tp] == 12
    changelog = TP(f"{tp.topic}-state-changelog", 0)
    read[changelog] = 7  # recovery reads changelogs while the flow is suspended
    assert read[changelog] == 7
    consumer.resume_flow()
    read[tp] = 13
    assert read[tp] == 13
    assert read[TP("never-read", 0)] is None  # still a defaultdict of None


@pytest.mark.parametrize("failure", [RuntimeError("a step raised"), KeyboardInterrupt()])
def test_a_batch_left_by_an_exception_is_never_safe_to_commit(
    make_settings: SettingsFactory, failure: BaseException
) -> None:
    consumer, tp = _consumer_and_topic(make_settings)
    done, failed = [_message(tp, 0), _message(tp, 1)], [_message(tp, 2), _message(tp, 3)]
    for message in done:
        assert message.ack(consumer)
    batch = [SimpleNamespace(message=m) for m in failed]
    with pytest.raises(type(failure)), committed_only_when_done(batch):
        raise failure
    # take_events' ``finally`` acknowledges the batch anyway: Faust ignores it.
    for message in failed:
        assert not message.ack(consumer)
    assert consumer._new_offset(tp) == 2  # the offset after the batch that finished


def test_a_finished_batch_is_acknowledged_as_usual(make_settings: SettingsFactory) -> None:
    consumer, tp = _consumer_and_topic(make_settings)
    batch = [_message(tp, 0), _message(tp, 1)]
    with committed_only_when_done([SimpleNamespace(message=m) for m in batch]):
        pass
    for message in batch:
        assert message.ack(consumer)
    assert consumer._new_offset(tp) == 2


def test_resuming_a_running_flow_keeps_what_the_streams_have_queued(
    make_settings: SettingsFactory,
) -> None:
    # Faust's recovery resumes the flow to read the changelogs, delivers stream messages,
    # then resumes it again: mode's FlowControlEvent.resume emptied the stream queues,
    # and those messages were never delivered again (faust-streaming issue 596).
    app = create_app(make_settings(broker="127.0.0.1:9"))
    queue: FlowControlQueue[str] = FlowControlQueue(
        flow_control=app.flow_control, clear_on_resume=True
    )
    app.flow_control.resume()
    queue.put_nowait("delivered while flowing")
    app.flow_control.resume()
    assert queue.qsize() == 1
    # A resume after a suspension (a rebalance) still drops what was queued before it.
    app.flow_control.suspend()
    app.flow_control.resume()
    assert queue.qsize() == 0 and app.flow_control.is_active()


async def test_a_flush_waits_for_messages_slower_than_faust_waits_for_one(
    make_settings: SettingsFactory,
) -> None:
    # Faust flushes its producer before it commits; its buffer's flush gave up after 0.1 s
    # without a message sent, so a table's changelog write could still be queued when the
    # offsets of its batch were committed. Here each hand-over takes 0.3 s (a loaded client).
    app = create_app(make_settings(broker="127.0.0.1:9"))
    handed: list[int] = []

    class SlowClient:
        async def publish_message(self, fut: Any, wait: bool = False) -> None:
            await asyncio.sleep(0.3)
            handed.append(fut.n)

    buffer = ProducerBuffer()
    buffer.app = app
    await buffer.start()
    try:
        for n in range(3):
            buffer.put(
                cast(Any, SimpleNamespace(n=n, message=SimpleNamespace(channel=SlowClient())))
            )
        await buffer.flush()
        assert handed == [0, 1, 2] and buffer.size == 0
    finally:
        await buffer.stop()
