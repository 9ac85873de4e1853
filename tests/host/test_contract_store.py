"""The host's contract-state store, reached the way the service enclave reaches it: a
``StoreClient`` over a real socketpair. What is stored survives a reopen, checkpoints restore,
every tamper the chaos API can order is named by the enclave's checks, and garbage on the
socket gets a refusal, never a dead host."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmnode.contracts.sealed_state import StateSealer, TamperError
from kmnode.contracts.store_wire import (
    MAX_FRAME_BYTES,
    MAX_RECORD_BYTES,
    Done,
    Found,
    FrameReader,
    Get,
    PutMany,
    Refused,
    Reply,
    StoreClient,
    StoreRefused,
    StoreUnavailable,
    decode_reply,
    encode_request,
    frame,
)
from kmnode.contracts.verified import VerifiedBacking
from kmnode.host.contract_store import FILE_NAME, ContractStore, TamperMode

KEY = bytes(range(32))


def h(n: int) -> bytes:
    return n.to_bytes(32, "big")


class Node:
    """A store and an enclave-side client connected to it (closed by the fixture)."""

    def __init__(self, path: Path, *, page: int = 512, cache_entries: int = 65_536) -> None:
        self.path = path
        self.store = ContractStore(path, fsync=True, cache_entries=cache_entries)
        host_end, enclave_end = socket.socketpair()
        self.thread = self.store.serve(host_end)
        self.client = StoreClient(enclave_end, timeout=10, page=page)

    def backing(self) -> VerifiedBacking:
        return VerifiedBacking(self.client, lambda contract: StateSealer(contract, KEY, 1))

    def close(self) -> None:
        self.client.close()
        self.store.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.close()


def open_node(nodes: list[Node], path: Path, **kwargs: int) -> Node:
    node = Node(path, **kwargs)
    nodes.append(node)
    return node


@pytest.fixture
def node(nodes: list[Node], tmp_path: Path) -> Node:
    return open_node(nodes, tmp_path / FILE_NAME)


def test_records_round_trip_and_none_deletes(node: Node) -> None:
    client = node.client
    client.put_many("token", {h(1): b"one", h(2): b"two"})
    client.put_many("other", {h(1): b"theirs"})
    client.put_many("token", {h(2): None, h(3): b""})
    assert client.get("token", h(1)) == b"one"
    assert client.get("token", h(2)) is None
    assert client.get("token", h(3)) == b""
    assert client.get("other", h(1)) == b"theirs"
    assert client.get("nobody", h(1)) is None


def test_what_was_acknowledged_survives_a_reopen(nodes: list[Node], tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    first = open_node(nodes, path)
    first.client.put_many("token", {h(1): b"one", h(2): b"two"})
    first.client.put_many("token", {h(2): None})
    first.client.checkpoint(4)
    nodes.remove(first)
    first.close()
    again = open_node(nodes, path)
    assert list(again.client.records()) == [("token", h(1), b"one")]
    assert again.client.checkpoints() == [4]


def test_the_external_cache_counts_hits_and_stays_bounded(
    nodes: list[Node], tmp_path: Path
) -> None:
    node = open_node(nodes, tmp_path / FILE_NAME, cache_entries=3)
    node.client.put_many("token", {h(i): b"v" for i in range(5)})  # writes go through it
    stats = node.store.stats()
    assert (stats.entries, stats.capacity, stats.hits, stats.misses) == (3, 3, 0, 0)
    assert node.client.get("token", h(4)) == b"v"  # recent: a hit
    assert node.client.get("token", h(0)) == b"v"  # evicted: a miss, from SQLite
    assert node.client.get("token", h(9)) is None  # absent: a miss, then known absent
    assert node.client.get("token", h(9)) is None
    stats = node.store.stats()
    assert (stats.entries, stats.hits, stats.misses) == (3, 2, 2)


def test_checkpoints_keep_the_newest_two_and_restore_replaces_everything(node: Node) -> None:
    client = node.client
    client.put_many("token", {h(1): b"at 1"})
    client.checkpoint(1)
    client.put_many("token", {h(1): b"at 2", h(2): b"new at 2"})
    client.checkpoint(2)
    client.put_many("token", {h(1): None, h(3): b"at 3"})
    client.checkpoint(3)
    assert client.checkpoints() == [2, 3]
    assert client.restore(1) is False
    client.put_many("token", {h(4): b"after 3"})
    assert client.restore(2) is True
    assert list(client.records()) == [("token", h(1), b"at 2"), ("token", h(2), b"new at 2")]
    assert client.get("token", h(4)) is None  # the external cache was dropped too
    client.checkpoint(0)  # older than both kept: dropped at once
    assert client.checkpoints() == [2, 3]


def test_records_come_in_pages_by_count_and_by_bytes(nodes: list[Node], tmp_path: Path) -> None:
    node = open_node(nodes, tmp_path / FILE_NAME, page=3)
    node.client.put_many("b", {h(i): b"%d" % i for i in range(7)})
    node.client.put_many("a", {h(1): b"a1"})
    listed = list(node.client.records())
    assert [(c, k) for c, k, _ in listed] == [("a", h(1))] + [("b", h(i)) for i in range(7)]
    assert [r for c, _, r in listed if c == "b"] == [b"%d" % i for i in range(7)]
    assert len(list(node.client.records("b"))) == 7
    assert list(node.client.records("nobody")) == []
    # By bytes: 70 full records are more than half a frame, so the host splits the page.
    big = {h(i): bytes([i]) * MAX_RECORD_BYTES for i in range(70)}
    node.client.put_many("big", big)
    entries, more = node.store.page("big", None, 4096)
    assert more and 0 < len(entries) < 70
    assert dict((k, r) for _, k, r in node.client.records("big")) == big


def test_a_batch_over_one_frame_lands_whole(node: Node) -> None:
    big = {h(i): bytes([i]) * MAX_RECORD_BYTES for i in range(160)}  # ~10 MiB: 2 parts
    node.client.put_many("token", big)
    assert len(list(node.client.records("token"))) == 160
    assert node.client.get("token", h(159)) == big[h(159)]


def call(
    sock: socket.socket, body: bytes, reader: FrameReader, *, framed: bool = True
) -> tuple[int, Reply]:
    """One raw request on a raw socket (as a broken enclave would send it); ``framed=False``
    sends the bytes as they are, length prefix and all."""
    sock.sendall(frame(body) if framed else body)
    for _ in range(100):  # reads at most
        reply = reader.next()
        if reply is not None:
            return decode_reply(reply)
        data = sock.recv(1 << 20)
        assert data, "the host hung up"
        reader.feed(data)
    raise AssertionError("no reply in 100 reads")


@pytest.fixture
def raw(node: Node) -> Iterator[tuple[socket.socket, FrameReader]]:
    host_end, enclave_end = socket.socketpair()
    enclave_end.settimeout(10)
    node.store.serve(host_end)
    yield enclave_end, FrameReader()
    enclave_end.close()


def test_parts_out_of_order_are_refused_and_nothing_lands(
    node: Node, raw: tuple[socket.socket, FrameReader]
) -> None:
    sock, reader = raw
    part = PutMany("token", ((h(1), b"one"),), 0, False)
    assert call(sock, encode_request(1, part), reader) == (1, Done())
    assert node.client.get("token", h(1)) is None  # staged, not committed
    skipped = PutMany("token", ((h(2), b"two"),), 2, True)
    _, reply = call(sock, encode_request(2, skipped), reader)
    assert isinstance(reply, Refused) and "out of order" in reply.message
    resumed = PutMany("token", ((h(2), b"two"),), 1, True)
    _, reply = call(sock, encode_request(3, resumed), reader)
    assert isinstance(reply, Refused)  # the staging was dropped with the bad part
    assert list(node.client.records()) == []


def test_garbage_requests_get_refusals_and_the_host_keeps_serving(
    node: Node, raw: tuple[socket.socket, FrameReader]
) -> None:
    sock, reader = raw
    bodies = [
        (b"", 0),  # too short to name a request: answered as request 0
        (b"\x01", 0),
        (b"\x09" + (3).to_bytes(8, "big"), 3),  # an unknown op
        (b"\x01" + (4).to_bytes(8, "big") + b"\x05tok", 4),  # a Get cut short
        (encode_request(5, Get("token", h(1))) + b"\0", 5),  # a byte too many
    ]
    for body, request_id in bodies:
        reply_id, reply = call(sock, body, reader)
        assert reply_id == request_id
        assert isinstance(reply, Refused) and reply.message.startswith("bad request")
    node.client.put_many("token", {h(1): b"still here"})
    assert call(sock, encode_request(7, Get("token", h(1))), reader) == (7, Found(b"still here"))


def test_an_oversize_frame_is_refused_and_only_that_connection_closes(
    node: Node, raw: tuple[socket.socket, FrameReader]
) -> None:
    sock, reader = raw
    _, reply = call(sock, (MAX_FRAME_BYTES + 1).to_bytes(4, "big"), reader, framed=False)
    assert isinstance(reply, Refused) and "at most 8388608" in reply.message
    assert sock.recv(10) == b""  # then the host hung up
    node.client.put_many("token", {h(1): b"fine"})  # the enclave's own connection is fine
    assert node.client.get("token", h(1)) == b"fine"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(min_size=1, max_size=200))
def test_any_garbage_frame_gets_an_answer(
    node: Node, raw: tuple[socket.socket, FrameReader], garbage: bytes
) -> None:
    sock, reader = raw
    call(sock, garbage, reader)  # some answer (a garbage body may happen to be a request)
    node.client.put_many("probe", {h(0): garbage})
    assert node.client.get("probe", h(0)) == garbage


def test_a_stopped_store_leaves_the_client_unavailable_not_hung(node: Node) -> None:
    node.store.close()
    with pytest.raises(StoreUnavailable):
        node.client.get("token", h(1))


def test_a_failing_database_is_a_refusal(node: Node) -> None:
    with contextlib.closing(sqlite3.connect(node.path)) as other:  # lost under the host
        other.execute("DROP TABLE history")
    with pytest.raises(StoreRefused, match="store failed: no such table: history"):
        node.client.put_many("token", {h(1): b"one"})
    assert node.client.get("token", h(1)) is None


# ---- tampering, as the chaos API orders it, seen by the enclave's checks ------------------


def written_state(node: Node) -> VerifiedBacking:
    """Two keys written twice (so each has an older copy), one deleted."""
    backing = node.backing()
    backing.store("token", {b"b:bob": b"100", b"b:cat": b"1", b"b:gone": b"x"})
    backing.store("token", {b"b:bob": b"70", b"b:cat": b"31", b"b:gone": None})
    return backing


@pytest.mark.parametrize(
    ("mode", "kind"),
    [("flip", "flipped"), ("swap", "swapped"), ("rollback", "stale"), ("drop", "missing")],
)
@pytest.mark.parametrize("seed", range(5))
def test_each_tamper_is_named_by_the_enclave(
    node: Node, mode: TamperMode, kind: str, seed: int
) -> None:
    backing = written_state(node)
    for key in (b"b:bob", b"b:cat", b"b:gone"):  # warm the external cache: it must not hide it
        backing.load("token", key)
    description = node.store.tamper(mode, "token", random.Random(seed))
    assert description.startswith(f"{mode}:") and "'token'" in description
    kinds = []
    for key in (b"b:bob", b"b:cat", b"b:gone"):
        try:
            backing.load("token", key)
        except TamperError as error:
            kinds.append(error.kind)
    assert kinds and set(kinds) == {kind}, (description, kinds)


def test_tampering_with_nothing_says_why(node: Node) -> None:
    rng = random.Random(1)
    modes: list[tuple[TamperMode, str]] = [
        ("flip", "flip"), ("swap", "swap"), ("rollback", "roll back"), ("drop", "drop")
    ]  # fmt: skip
    for mode, verb in modes:
        with pytest.raises(ValueError, match=f"nothing to {verb}"):
            node.store.tamper(mode, None, rng)
    node.client.put_many("token", {h(1): b"only"})
    with pytest.raises(ValueError, match="it takes 2 records; contract 'token' has 1"):
        node.store.tamper("swap", "token", rng)
    with pytest.raises(ValueError, match="no overwritten record"):
        node.store.tamper("rollback", "token", rng)
    with pytest.raises(ValueError, match="no records in contract 'other'"):
        node.store.tamper("drop", "other", rng)


def test_a_rollback_brings_back_a_deleted_key(node: Node) -> None:
    backing = node.backing()
    backing.store("token", {b"b:gone": b"x"})
    backing.store("token", {b"b:gone": None})
    node.store.tamper("rollback", None, random.Random(0))
    with pytest.raises(TamperError) as caught:
        backing.load("token", b"b:gone")
    assert caught.value.kind == "stale"


def test_tamper_descriptions_and_logs_carry_no_record_bytes(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    secret = b"SECRET-STATE-BYTES"
    node.client.put_many("token", {h(1): secret, h(2): secret + b"2"})
    node.client.put_many("token", {h(1): secret + b"1"})
    caplog.set_level(logging.DEBUG)
    said = [node.store.tamper(m, None, random.Random(3)) for m in ("flip", "swap", "rollback")]
    said.append(node.store.tamper("drop", None, random.Random(3)))
    text = " ".join(said) + caplog.text + repr(node.store)
    assert "SECRET" not in text and secret.hex() not in text
    assert len(caplog.records) >= 4  # each tamper is logged


# ---- resync: a checkpoint copied from a peer ----------------------------------------------


class Switch:
    """A ``HostStore`` that forwards to whichever store it is pointed at."""

    def __init__(self, target: StoreClient) -> None:
        self.target = target

    def get(self, contract: str, hidden: bytes) -> bytes | None:
        return self.target.get(contract, hidden)

    def put_many(self, contract: str, records: Mapping[bytes, bytes | None]) -> None:
        self.target.put_many(contract, records)


def test_a_checkpoint_copied_from_a_peer_restores_here(nodes: list[Node], tmp_path: Path) -> None:
    good = open_node(nodes, tmp_path / "good.sqlite")
    bad = open_node(nodes, tmp_path / "bad.sqlite")
    store = Switch(good.client)
    backing = VerifiedBacking(store, lambda contract: StateSealer(contract, KEY, 1))
    backing.store("token", {b"b:bob": b"70"})
    good.client.checkpoint(5)
    bad.client.put_many("token", {h(1): b"wrong"})
    bad.store.import_checkpoint(5, good.store.export_checkpoint(5))
    assert bad.client.checkpoints() == [5]
    assert bad.client.get("token", h(1)) == b"wrong"  # not current until restored
    assert bad.client.restore(5)
    assert list(bad.client.records()) == list(good.client.records())
    store.target = bad.client  # the same enclave's checks, now over the repaired store
    assert backing.load("token", b"b:bob") == b"70"
    with pytest.raises(LookupError, match="no checkpoint 6"):
        good.store.export_checkpoint(6)


@pytest.mark.parametrize(
    ("entry", "text"),
    [
        (("", h(1), b"x"), "contract name"),
        (("token", b"short", b"x"), "hidden key is 32 bytes"),
        (("token", h(1), b"x" * (MAX_RECORD_BYTES + 1)), "at most 65600"),
    ],
)
def test_a_peer_checkpoint_breaking_the_limits_is_refused_whole(
    node: Node, entry: tuple[str, bytes, bytes], text: str
) -> None:
    with pytest.raises(ValueError, match=f"checkpoint 2 cannot be imported: .*{text}"):
        node.store.import_checkpoint(2, [("token", h(2), b"fine"), entry])
    assert node.client.checkpoints() == []
