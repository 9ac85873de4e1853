"""The shared Ready loop (``consensus.readyloop``): one Ready in flight at a time, and when its
messages may leave: a steady leader pipelines before its write; a follower's acknowledgement
leaves only after its write is durable, or right behind the write when the driver's writes and
sends go through one ordered channel (a KM enclave's host); never before the write."""

from __future__ import annotations

from consensus.readyloop import ReadyLoop, SendAt
from consensus.sim.harness import Harness
from consensus.types import MessageType


def steady_cluster() -> Harness:
    h = Harness(["a", "b", "c"], seed=1)
    h.elect("a")
    h.stabilize()
    return h


def test_a_steady_leader_sends_its_appends_before_its_own_write() -> None:
    h = steady_cluster()
    leader = h.nodes["a"]
    leader.propose(b"x")
    step = ReadyLoop(leader).next()
    assert step is not None and step.ready.must_sync
    assert any(m.type == MessageType.APPEND for m in step.ready.messages)
    assert step.send_at is SendAt.BEFORE_WRITE
    h2 = steady_cluster()  # the same Ready with pipelining off: after durable
    h2.nodes["a"].propose(b"x")
    strict = ReadyLoop(h2.nodes["a"], pipeline=False).next()
    assert strict is not None and strict.send_at is SendAt.AFTER_DURABLE


def test_a_follower_acknowledges_after_durable_or_behind_the_write_on_ordered_io() -> None:
    for ordered, expected in ((False, SendAt.AFTER_DURABLE), (True, SendAt.AFTER_WRITE)):
        h = steady_cluster()
        h.nodes["a"].propose(b"x")
        h.process("a")
        appends = h.take(lambda m: m.to == "b" and m.type == MessageType.APPEND)
        assert appends
        follower = h.nodes["b"]
        for m in appends:
            follower.step(m)
        loop = ReadyLoop(follower, ordered_io=ordered)
        step = loop.next()
        assert step is not None and step.ready.must_sync and step.ready.entries
        assert any(m.type == MessageType.APPEND_RESP for m in step.ready.messages)
        assert step.send_at is expected


def test_one_ready_in_flight_until_it_is_advanced() -> None:
    h = steady_cluster()
    leader = h.nodes["a"]
    loop = ReadyLoop(leader)
    leader.propose(b"x")
    first = loop.next()
    assert first is not None
    leader.propose(b"y")
    assert loop.next() is None  # the second proposal waits: it joins the next Ready
    loop.advance(first)
    second = loop.next()
    assert second is not None and [e.data for e in second.ready.entries] == [b"y"]
    loop.drop()  # a crash mid-write: nothing advanced, the loop is free again
    assert loop.inflight is None
