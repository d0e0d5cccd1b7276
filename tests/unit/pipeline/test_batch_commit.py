"""What the shared site agent relies on in Faust to keep a failed batch uncommitted: a
message marked acknowledged is never acknowledged to the consumer, so its offset is
never safe to commit (faust.types.tuples.Message.ack, Consumer._new_offset)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP
from faust.types.tuples import ConsumerMessage as Message

from pipeline import topics
from pipeline.app import create_app
from pipeline.streams import committed_only_when_done
from tests.conftest import SettingsFactory


def _consumer_and_topic(make_settings: SettingsFactory) -> tuple[Any, TP]:
    settings = make_settings(broker="127.0.0.1:9")
    app = create_app(settings)
    tp = TP(settings.topic(topics.TELEMETRY), 0)
    app.topics._acking_topics.add(tp.topic)  # as the conductor does once it subscribes
    return app.consumer, tp


def _message(tp: TP, offset: int) -> Message:
    """A message as a stream holds it: one reference, released by its ack."""
    message = Message(tp.topic, tp.partition, offset, 0.0, 0, {}, b"site", b"{}", None, tp=tp)
    message.incref()
    return message


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
