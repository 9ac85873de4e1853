"""Coalesced records (`EventPublisher.publish_record`): fewer messages, the same records.

Audit records are published once per release; under load a message per record cost the broker
and the nodes as much CPU as a follower's Raft work, so records waiting together leave as one
``{"records": [...]}`` message. What must not change is what a subscriber that unpacks
(`unpack_records`, as `kmctl events` does) ends up with: every record, in order, byte for byte
as if it had been published alone.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kmnode.host.mqtt import BATCH_FIELD, EventPublisher, TopicKind, unpack_records
from tests.host import BrokerUnderTest, Subscriber, eventually
from tests.ports import free_port

pytestmark = pytest.mark.timeout(60)

ALL_KM1 = "kmsim/demo/km1/#"
AUDIT = "kmsim/demo/km1/audit"


def record(i: int) -> dict[str, object]:
    return {"release": f"r{i}", "key": "k", "generation": 1, "status": "provisioned"}


def compact(value: dict[str, object]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@contextlib.asynccontextmanager
async def watched_publisher(
    broker: BrokerUnderTest,
) -> AsyncIterator[tuple[Subscriber, EventPublisher]]:
    """km1's publisher, and a subscriber to everything it publishes (subscribed first)."""
    async with (
        Subscriber(broker.port, ALL_KM1) as sub,
        EventPublisher("127.0.0.1", broker.port, cluster="demo", node="km1") as pub,
    ):
        yield sub, pub


def unpacked(messages: list[tuple[str, bytes]], topic: str) -> list[bytes]:
    return [r for t, p in messages if t == topic for r in unpack_records(p)]


async def test_records_published_together_share_a_message_and_unpack_to_the_same_records(
    broker: BrokerUnderTest,
) -> None:
    async with watched_publisher(broker) as (sub, pub):
        for i in range(50):
            pub.publish_record(TopicKind.AUDIT, record(i))
        await eventually(lambda: pub.stats().published == 50, "50 records acknowledged")
        await eventually(lambda: len(unpacked(sub.messages, AUDIT)) == 50, "50 records")
    assert len(sub.messages) < 50, "records waiting together must share messages"
    assert unpacked(sub.messages, AUDIT) == [compact(record(i)) for i in range(50)]
    assert all(p.startswith(b'{"records":[') for _, p in sub.messages)


async def test_a_lone_record_is_sent_exactly_as_publish_sends_it(broker: BrokerUnderTest) -> None:
    async with watched_publisher(broker) as (sub, pub):
        pub.publish_record(TopicKind.AUDIT, record(1))
        await sub.wait_for(1)
    assert sub.messages == [(AUDIT, compact(record(1)))]


async def test_records_never_cross_a_plain_message_or_another_topic(
    broker: BrokerUnderTest,
) -> None:
    async with watched_publisher(broker) as (sub, pub):
        pub.publish_record(TopicKind.AUDIT, record(0))
        pub.publish_record(TopicKind.AUDIT, record(1))
        pub.publish(TopicKind.AUDIT, {"plain": 2})
        pub.publish_record(TopicKind.SERVICE, {"seq": 3})
        pub.publish_record(TopicKind.AUDIT, record(4))
        await eventually(lambda: pub.stats().published == 5, "5 acknowledged")
        await sub.wait_for(4)
    topics = [t for t, _ in sub.messages]
    assert topics == [AUDIT, AUDIT, "kmsim/demo/km1/service/out", AUDIT]
    assert unpack_records(sub.messages[0][1]) == [compact(record(0)), compact(record(1))]
    assert sub.messages[1][1] == b'{"plain":2}'
    assert sub.messages[2][1] == b'{"seq":3}'
    assert sub.messages[3][1] == compact(record(4))


async def test_a_coalesced_message_stays_within_max_payload(broker: BrokerUnderTest) -> None:
    limit = 1000
    async with (
        Subscriber(broker.port, ALL_KM1) as sub,
        EventPublisher(
            "127.0.0.1", broker.port, cluster="demo", node="km1", max_payload=limit
        ) as pub,
    ):
        for i in range(100):
            pub.publish_record(TopicKind.AUDIT, record(i))
        await eventually(lambda: pub.stats().published == 100, "100 acknowledged")
        await eventually(lambda: len(unpacked(sub.messages, AUDIT)) == 100, "100 records")
    assert max(len(p) for _, p in sub.messages) <= limit
    assert len(sub.messages) > 1
    assert unpacked(sub.messages, AUDIT) == [compact(record(i)) for i in range(100)]


async def test_records_buffered_during_an_outage_arrive_in_order(tmp_path: Path) -> None:
    broker = BrokerUnderTest(free_port(), tmp_path / "broker.log")
    pub = EventPublisher("127.0.0.1", broker.port, cluster="demo", node="km1", max_backoff=0.2)
    try:
        pub.start()
        await eventually(lambda: pub.stats().connect_failures >= 1, "a failed connection")
        for i in range(30):
            pub.publish_record(TopicKind.AUDIT, record(i))
        assert pub.stats().buffered == 30
        broker.start()
        async with Subscriber(broker.port, ALL_KM1) as sub:
            for i in range(30, 40):
                pub.publish_record(TopicKind.AUDIT, record(i))
            await eventually(lambda: pub.stats().published == 40, "40 acknowledged")
            await eventually(lambda: any(b'"r39"' in p for _, p in sub.messages), "r39")
        # The subscriber may have joined after the first batch went out; what it saw is an
        # in-order tail of the records.
        got = unpacked(sub.messages, AUDIT)
        assert got == [compact(record(i)) for i in range(40 - len(got), 40)]
    finally:
        await pub.stop(timeout=1.0)
        broker.stop()


def test_unpack_records_leaves_anything_else_alone() -> None:
    for payload in (
        b"",
        b"\x00raw",
        b'{"release":"r1"}',
        b'{"records":[{"a":1}],"extra":1}',  # not only the batch key: not a batch
        b'{"records":[1,2]}',  # not records
        b'{"records":[',  # truncated
    ):
        assert unpack_records(payload) == [payload]
    batch = json.dumps({BATCH_FIELD: [{"b": 2, "a": 1}, {"c": [1, "x"]}]}).encode()
    assert unpack_records(batch) == [b'{"b":2,"a":1}', b'{"c":[1,"x"]}']


def test_publish_record_refuses_what_publish_refuses() -> None:
    pub = EventPublisher("127.0.0.1", 1, cluster="demo", node="km1", max_payload=100)
    with pytest.raises(ValueError, match="must be a dict"):
        pub.publish_record(TopicKind.AUDIT, b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the maximum is 100 bytes"):
        pub.publish_record(TopicKind.AUDIT, {"blob": "y" * 100})
    with pytest.raises(ValueError, match="not JSON"):
        pub.publish_record(TopicKind.AUDIT, {"nan": float("nan")})
    assert pub.stats().buffered == 0
