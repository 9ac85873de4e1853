"""EventPublisher against real brokers: the embedded amqtt process and a real mosquitto.

The property that matters is that a broker outage never reaches the caller: `publish` keeps
returning at once, messages wait in the bounded buffer, and delivery resumes in order.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kmnode.config import ClusterConfig, MqttSpec
from kmnode.host.mqtt import (
    EventPublisher,
    TopicKind,
    parse_topic,
    topic_filter,
    topic_for,
)
from tests.host import BrokerUnderTest, Subscriber, eventually
from tests.ports import free_port

pytestmark = pytest.mark.timeout(60)

ALL_KM1 = "kmsim/demo/km1/#"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerUnderTest]:
    """A broker on a free port, not started: each test decides when it comes up."""
    under_test = BrokerUnderTest(free_port(), tmp_path / "broker.log")
    try:
        yield under_test
    finally:
        under_test.stop()


@pytest.fixture
def running_broker(broker: BrokerUnderTest) -> BrokerUnderTest:
    broker.start()
    return broker


def make_publisher(port: int, buffer_size: int = 10_000) -> EventPublisher:
    """A short backoff cap keeps reconnect waits in these tests well under a second."""
    return EventPublisher(
        "127.0.0.1", port, cluster="demo", node="km1", buffer_size=buffer_size, max_backoff=0.5
    )


@pytest.fixture
async def publisher_factory() -> AsyncIterator[list[EventPublisher]]:
    """Collects publishers so each is stopped even when its test fails."""
    made: list[EventPublisher] = []
    yield made
    for publisher in made:
        await publisher.stop(timeout=1.0)


def seqs(messages: list[tuple[str, bytes]]) -> list[int]:
    return [json.loads(payload)["seq"] for _, payload in messages]


async def test_messages_arrive_in_order_on_their_topics(
    running_broker: BrokerUnderTest, publisher_factory: list[EventPublisher]
) -> None:
    kinds = [TopicKind.EVENTS, TopicKind.SERVICE, TopicKind.AUDIT]
    async with Subscriber(running_broker.port, ALL_KM1) as sub:
        publisher = make_publisher(running_broker.port)
        publisher_factory.append(publisher)
        publisher.start()
        for i in range(30):
            publisher.publish(kinds[i % 3], {"seq": i, "kind": kinds[i % 3].value})
        publisher.publish("audit", b"\x00raw bytes\xff")
        await sub.wait_for(31)

    expected_topics = [f"kmsim/demo/km1/{kinds[i % 3].value}" for i in range(30)]
    assert [topic for topic, _ in sub.messages[:30]] == expected_topics
    assert seqs(sub.messages[:30]) == list(range(30))
    assert sub.messages[0][1] == b'{"seq":0,"kind":"events"}'  # compact JSON
    assert sub.messages[30] == ("kmsim/demo/km1/audit", b"\x00raw bytes\xff")
    stats = publisher.stats()
    assert (stats.published, stats.dropped, stats.buffered, stats.connected) == (31, 0, 0, True)


async def test_broker_down_at_start_buffers_then_delivers(
    broker: BrokerUnderTest, publisher_factory: list[EventPublisher]
) -> None:
    publisher = make_publisher(broker.port)
    publisher_factory.append(publisher)
    publisher.start()
    await eventually(lambda: publisher.stats().connect_failures >= 2, "failed connection attempts")

    for i in range(20):
        publisher.publish(TopicKind.EVENTS, {"seq": i})  # returns at once, never raises
    stats = publisher.stats()
    assert (stats.published, stats.buffered, stats.connected) == (0, 20, False)

    await asyncio.to_thread(broker.start)
    # The broker acknowledged all 20 (QoS 1): nothing was lost to the outage.
    await eventually(lambda: publisher.stats().published == 20, "the buffered messages")
    assert publisher.stats().buffered == 0
    assert publisher.stats().dropped == 0
    async with Subscriber(broker.port, ALL_KM1) as sub:
        publisher.publish(TopicKind.EVENTS, {"seq": 20})
        await sub.wait_for(1)
    assert seqs(sub.messages) == [20]


async def test_broker_killed_mid_stream_and_restarted(
    running_broker: BrokerUnderTest, publisher_factory: list[EventPublisher]
) -> None:
    publisher = make_publisher(running_broker.port)
    publisher_factory.append(publisher)
    publisher.start()
    async with Subscriber(running_broker.port, ALL_KM1) as sub:
        for i in range(10):
            publisher.publish(TopicKind.EVENTS, {"seq": i})
        await sub.wait_for(10)
        running_broker.kill()
        for i in range(10, 20):  # while the broker is dead: must not raise or block
            publisher.publish(TopicKind.EVENTS, {"seq": i})
        await eventually(lambda: not publisher.stats().connected, "the lost connection")
    assert seqs(sub.messages) == list(range(10))

    await asyncio.to_thread(running_broker.start)
    await eventually(lambda: publisher.stats().reconnects >= 1, "a reconnect")
    await eventually(lambda: publisher.stats().published == 20, "the messages sent in the outage")
    async with Subscriber(running_broker.port, ALL_KM1) as sub:
        for i in range(20, 30):
            publisher.publish(TopicKind.EVENTS, {"seq": i})
        await sub.wait_for(10)
    assert seqs(sub.messages) == list(range(20, 30))
    stats = publisher.stats()
    assert (stats.published, stats.dropped, stats.buffered) == (30, 0, 0)
    assert stats.reconnects >= 1


async def test_overflow_drops_the_oldest_and_counts_exactly(
    broker: BrokerUnderTest, publisher_factory: list[EventPublisher]
) -> None:
    publisher = make_publisher(broker.port, buffer_size=5)
    publisher_factory.append(publisher)
    publisher.start()  # the broker is down: everything stays buffered
    await eventually(lambda: publisher.stats().connect_failures >= 1, "a failed connection")
    for i in range(12):
        publisher.publish(TopicKind.EVENTS, {"seq": i})
    stats = publisher.stats()
    assert (stats.dropped, stats.buffered, stats.published) == (7, 5, 0)

    # Stopping keeps the buffer; restarting after the subscriber is in place makes the
    # delivered set exact.
    await publisher.stop(timeout=0.5)
    await asyncio.to_thread(broker.start)
    async with Subscriber(broker.port, ALL_KM1) as sub:
        publisher.start()
        await sub.wait_for(5)
        await eventually(lambda: publisher.stats().buffered == 0, "an empty buffer")
    assert seqs(sub.messages) == [7, 8, 9, 10, 11]
    assert publisher.stats().dropped == 7
    assert publisher.stats().published == 5


def test_the_buffer_is_bounded_in_bytes_too() -> None:
    publisher = EventPublisher(
        "127.0.0.1", 1, cluster="demo", node="km1", buffer_bytes=1000, max_payload=400
    )
    for _ in range(5):
        publisher.publish(TopicKind.SERVICE, b"z" * 300)
    stats = publisher.stats()
    assert (stats.buffered, stats.dropped) == (3, 2)
    with pytest.raises(ValueError, match="max_payload must be from 1 to buffer_bytes"):
        EventPublisher("127.0.0.1", 1, cluster="demo", node="km1", buffer_bytes=10, max_payload=11)


class HungBroker:
    """Accepts MQTT connections and publishes but never acknowledges one (no PUBACK).

    Records, per connection, the payloads of the PUBLISH packets it received.
    """

    def __init__(self) -> None:
        self.connections: list[list[bytes]] = []
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received: list[bytes] = []
        self.connections.append(received)
        try:
            while True:
                header = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                for _ in range(4):
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = header >> 4
                if kind == 1:  # CONNECT -> CONNACK, accepted
                    writer.write(b"\x20\x02\x00\x00")
                elif kind == 12:  # PINGREQ -> PINGRESP
                    writer.write(b"\xd0\x00")
                elif kind == 3:  # PUBLISH (QoS 1): topic, packet id, payload; never acknowledged
                    topic_len = int.from_bytes(body[:2], "big")
                    received.append(body[2 + topic_len + 2 :])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the publisher hung up: this fake broker's connection simply ends
        finally:
            writer.close()


async def test_a_broker_that_never_acknowledges_costs_nothing_and_loses_nothing() -> None:
    hung = HungBroker()
    hung.server = await asyncio.start_server(hung.handle, "127.0.0.1", 0)
    publisher = EventPublisher(
        "127.0.0.1", hung.port, cluster="demo", node="km1", publish_timeout=0.3, max_backoff=0.2
    )
    try:
        publisher.start()
        for i in range(3):
            publisher.publish(TopicKind.EVENTS, {"seq": i})
        await eventually(lambda: len(hung.connections) >= 3, "two reconnections")
        await eventually(lambda: len(hung.connections[1]) >= 1, "a resend")
        stats = publisher.stats()
        assert (stats.published, stats.dropped, stats.buffered) == (0, 0, 3)
        assert stats.reconnects >= 1
        # The unacknowledged message is sent again first on every new connection: order holds.
        assert hung.connections[0][0] == hung.connections[1][0] == b'{"seq":0}'
    finally:
        await publisher.stop(timeout=0.5)
        hung.server.close()
        await hung.server.wait_closed()
    assert publisher.stats().buffered == 3
    assert asyncio.all_tasks() == {asyncio.current_task()}


def test_oversized_and_malformed_payloads_are_refused_and_not_counted() -> None:
    publisher = EventPublisher("127.0.0.1", 1, cluster="demo", node="km1", max_payload=100)
    publisher.publish(TopicKind.EVENTS, b"x" * 100)  # exactly the limit is fine
    with pytest.raises(ValueError, match=r"kmsim/demo/km1/events is 101 bytes; the maximum is 100"):
        publisher.publish(TopicKind.EVENTS, b"x" * 101)
    with pytest.raises(ValueError, match=r"is 1\d\d bytes; the maximum is 100 bytes"):
        publisher.publish(TopicKind.AUDIT, {"blob": "y" * 100})
    with pytest.raises(ValueError, match="not JSON"):
        publisher.publish(TopicKind.EVENTS, {"set": {1, 2}})
    with pytest.raises(ValueError, match="not JSON"):
        publisher.publish(TopicKind.EVENTS, {"nan": float("nan")})
    with pytest.raises(ValueError, match="unknown topic suffix 'service'"):
        publisher.publish("service", {})
    stats = publisher.stats()
    assert (stats.buffered, stats.dropped, stats.published) == (1, 0, 0)


async def test_stop_flushes_and_leaves_no_task(
    running_broker: BrokerUnderTest,
) -> None:
    publisher = make_publisher(running_broker.port)
    publisher.start()
    for i in range(200):
        publisher.publish(TopicKind.SERVICE, {"seq": i})
    await publisher.stop(timeout=20)
    assert publisher.stats().published == 200
    assert publisher.stats().connected is False
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_stop_with_the_broker_down_returns_and_leaves_no_task(
    broker: BrokerUnderTest,
) -> None:
    publisher = make_publisher(broker.port)
    async with publisher:
        publisher.publish(TopicKind.EVENTS, {"seq": 0})
        await eventually(lambda: publisher.stats().connect_failures >= 1, "a failed connection")
    assert publisher.stats().buffered == 1
    assert asyncio.all_tasks() == {asyncio.current_task()}


def test_topics() -> None:
    assert topic_for("kmsim", "demo", "km2", TopicKind.SERVICE) == "kmsim/demo/km2/service/out"
    assert topic_filter("kmsim", "demo", TopicKind.AUDIT) == "kmsim/demo/+/audit"
    assert topic_filter("kmsim", "demo", TopicKind.EVENTS, "km3") == "kmsim/demo/km3/events"
    assert parse_topic("kmsim/demo/km2/service/out", "kmsim", "demo") == ("km2", TopicKind.SERVICE)
    assert parse_topic("kmsim/other/km2/events", "kmsim", "demo") is None
    assert parse_topic("kmsim/demo/km2/metrics", "kmsim", "demo") is None
    for bad in ("", "a/b", "+", "#"):
        with pytest.raises(ValueError, match="cannot be an MQTT topic level"):
            topic_for("kmsim", "demo", bad, TopicKind.EVENTS)


def test_from_config_uses_the_cluster_broker_and_prefix() -> None:
    cfg = ClusterConfig(mqtt=MqttSpec(url="mqtt://broker.example:1884", topic_prefix="lab"))
    publisher = EventPublisher.from_config(cfg, "km2")
    assert publisher.topic(TopicKind.AUDIT) == "lab/demo/km2/audit"
    with pytest.raises(KeyError, match="no node named 'km9'"):
        EventPublisher.from_config(cfg, "km9")


async def test_publisher_against_real_mosquitto(
    mosquitto: int, publisher_factory: list[EventPublisher]
) -> None:
    publisher = make_publisher(mosquitto)
    publisher_factory.append(publisher)
    async with Subscriber(mosquitto, topic_filter("kmsim", "demo", TopicKind.EVENTS)) as sub:
        publisher.start()
        for i in range(20):
            publisher.publish(TopicKind.EVENTS, {"seq": i})
        publisher.publish(TopicKind.AUDIT, {"not": "subscribed"})
        await sub.wait_for(20)
        await eventually(lambda: publisher.stats().published == 21, "all acknowledgements")
    assert seqs(sub.messages) == list(range(20))
    assert {topic for topic, _ in sub.messages} == {"kmsim/demo/km1/events"}
