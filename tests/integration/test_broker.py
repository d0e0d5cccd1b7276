"""The embedded broker and the topic plumbing against it."""

from __future__ import annotations

import pytest

from pipeline import kafka, topics
from pipeline.local import EmbeddedBroker, free_port
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration


def test_embedded_broker_starts_on_a_free_port_and_stops() -> None:
    broker = EmbeddedBroker().start()
    try:
        assert broker.running and broker.bootstrap.startswith("127.0.0.1:")
    finally:
        broker.stop()
    assert not broker.running
    broker.stop()  # safe twice


async def test_topics_are_created_with_their_partitions_and_kept(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(broker=kafka_broker.bootstrap, partitions=3)
    created = await kafka.ensure_topics(settings)
    assert sorted(created) == sorted(settings.topic(spec) for spec in topics.ALL_TOPICS)
    assert await kafka.ensure_topics(settings) == []  # idempotent
    ends = await kafka.end_offsets(
        settings, [settings.topic(topics.TELEMETRY), settings.topic(topics.PRICES)]
    )
    by_topic: dict[str, int] = {}
    for tp in ends:
        by_topic[tp.topic] = by_topic.get(tp.topic, 0) + 1
    assert by_topic == {settings.topic(topics.TELEMETRY): 3, settings.topic(topics.PRICES): 1}


async def test_a_partition_count_that_differs_from_existing_topics_stops_start_up(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    first = make_settings(broker=kafka_broker.bootstrap, partitions=2)
    await kafka.ensure_topics(first)
    second = first.model_copy(update={"partitions": 3})
    with pytest.raises(kafka.TopicMismatchError, match="WATTSTREAM_PARTITIONS") as caught:
        await kafka.ensure_topics(second)
    assert f"{first.topic(topics.TELEMETRY)} has 2 partitions, expected 3" in str(caught.value)


async def test_an_unreachable_broker_is_a_clear_error(make_settings: SettingsFactory) -> None:
    settings = make_settings(broker=f"127.0.0.1:{free_port()}")
    with pytest.raises(ConnectionError, match=r"did not answer within 1 s.*WATTSTREAM_BROKER"):
        await kafka.wait_for_broker(settings, timeout_s=1.0)
