"""The enclave's line to the host's store: the frame codec is strict, and the client never
hangs on, nor believes, a host that stalls or answers garbage (a scripted fake host here; the
real one is in tests/host/test_contract_store.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.contracts.store_wire import (
    MAX_BATCH,
    MAX_CONTRACT_BYTES,
    MAX_FRAME_BYTES,
    MAX_RECORD_BYTES,
    Checkpoint,
    CheckpointList,
    Done,
    Found,
    FrameReader,
    Get,
    ListCheckpoints,
    ListRecords,
    PutMany,
    RecordsPage,
    Refused,
    Reply,
    Request,
    Restore,
    Restored,
    StoreClient,
    StoreRefused,
    StoreUnavailable,
    StoreWireError,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    frame,
)

HIDDEN = bytes(range(32))
SECRET_RECORD = b"SECRET-RECORD-BYTES" * 4

# ---- the codec -----------------------------------------------------------------------------

names = st.text(min_size=1, max_size=16).filter(lambda n: 0 < len(n.encode()) <= 64)
hiddens = st.binary(min_size=32, max_size=32)
records = st.binary(max_size=200)
seqs = st.integers(0, 2**64 - 1)
ids = st.integers(0, 2**64 - 1)

requests: st.SearchStrategy[Request] = st.one_of(
    st.builds(Get, names, hiddens),
    st.builds(
        PutMany,
        names,
        st.lists(st.tuples(hiddens, st.none() | records), max_size=5).map(tuple),
        st.integers(0, 2**32 - 1),
        st.booleans(),
    ),
    st.builds(Checkpoint, seqs),
    st.builds(Restore, seqs),
    st.builds(
        ListRecords, st.none() | names, st.none() | st.tuples(names, hiddens), st.integers(1, 4096)
    ),
    st.just(ListCheckpoints()),
)
replies: st.SearchStrategy[Reply] = st.one_of(
    st.builds(Found, st.none() | records),
    st.just(Done()),
    st.builds(Restored, st.booleans()),
    st.builds(
        RecordsPage,
        st.lists(st.tuples(names, hiddens, records), max_size=5).map(tuple),
        st.booleans(),
    ),
    st.builds(CheckpointList, st.lists(seqs, max_size=5).map(tuple)),
    st.builds(Refused, st.text(max_size=100)),
)


@settings(max_examples=300, deadline=None)
@given(request_id=ids, request=requests)
def test_every_request_round_trips(request_id: int, request: Request) -> None:
    assert decode_request(encode_request(request_id, request)) == (request_id, request)


@settings(max_examples=300, deadline=None)
@given(request_id=ids, reply=replies)
def test_every_reply_round_trips(request_id: int, reply: Reply) -> None:
    body = encode_reply(request_id, reply)
    if isinstance(reply, Refused):  # lone surrogates cannot cross as UTF-8
        reply = Refused(reply.message.encode(errors="replace").decode())
    assert decode_reply(body) == (request_id, reply)


@settings(max_examples=500, deadline=None)
@given(body=st.binary(max_size=300))
def test_random_bytes_decode_or_raise_only_store_wire_error(body: bytes) -> None:
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(StoreWireError):
            decode(body)


@settings(max_examples=300, deadline=None)
@given(request=requests, reply=replies, position=st.integers(0), value=st.integers(0, 255))
def test_a_changed_byte_decodes_or_raises_only_store_wire_error(
    request: Request, reply: Reply, position: int, value: int
) -> None:
    for body, decode in (
        (encode_request(7, request), decode_request),
        (encode_reply(7, reply), decode_reply),
    ):
        changed = bytearray(body)
        changed[position % len(changed)] = value
        for candidate in (bytes(changed), body[: position % len(body)], body + b"\0"):
            with contextlib.suppress(StoreWireError):
                decode(candidate)


@settings(max_examples=100, deadline=None)
@given(bodies=st.lists(st.binary(max_size=50), max_size=5), cut=st.integers(1, 64))
def test_frames_come_out_whole_however_the_stream_is_cut(bodies: list[bytes], cut: int) -> None:
    stream = b"".join(frame(b) for b in bodies)
    reader, out = FrameReader(), []
    for start in range(0, len(stream), cut):
        reader.feed(stream[start : start + cut])
        while (body := reader.next()) is not None:
            out.append(body)
    assert out == bodies


@pytest.mark.parametrize(
    ("request_", "text"),
    [
        (Get("x" * (MAX_CONTRACT_BYTES + 1), HIDDEN), "contract name is 1 to 64"),
        (Get("", HIDDEN), "contract name is 1 to 64"),
        (Get("token", HIDDEN[:31]), "hidden key is 32 bytes"),
        (PutMany("token", ((HIDDEN, b"x" * (MAX_RECORD_BYTES + 1)),), 0, True), "at most 65600"),
        (PutMany("token", ((HIDDEN, None),) * (MAX_BATCH + 1), 0, True), "at most 4096"),
        (ListRecords(None, None, MAX_BATCH + 1), "a page is 1 to 4096"),
        (Checkpoint(-1), "sequence number"),
    ],
)
def test_messages_over_a_limit_are_refused_before_sending(request_: Request, text: str) -> None:
    with pytest.raises(StoreWireError, match=text) as caught:
        encode_request(1, request_)
    assert "xxxx" not in str(caught.value)


def test_oversize_and_lying_lengths_are_refused() -> None:
    reader = FrameReader()
    reader.feed((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(StoreWireError, match="at most 8388608"):
        reader.next()
    with pytest.raises(StoreWireError, match="at most"):
        frame(b"\0" * (MAX_FRAME_BYTES + 1))
    # A record length beyond the limit, and one beyond the frame's end.
    body = bytearray(encode_reply(3, Found(b"abc")))
    body[10:14] = (MAX_RECORD_BYTES + 1).to_bytes(4, "big")
    with pytest.raises(StoreWireError, match="at most 65600"):
        decode_reply(bytes(body))
    body[10:14] = (1000).to_bytes(4, "big")
    with pytest.raises(StoreWireError, match="ends inside a record"):
        decode_reply(bytes(body))
    # Counts over the limit, bad flags, bad UTF-8, trailing bytes, unknown ops.
    many = encode_reply(3, CheckpointList(())).replace(
        b"\0\0\0\0", (MAX_BATCH + 1).to_bytes(4, "big")
    )
    with pytest.raises(StoreWireError, match="4097 checkpoints"):
        decode_reply(many)
    with pytest.raises(StoreWireError, match="not 0 or 1"):
        decode_reply(encode_reply(3, Restored(True))[:-1] + b"\x02")
    name = encode_request(3, Get("ab", HIDDEN))
    with pytest.raises(StoreWireError, match="UTF-8"):
        decode_request(name[:10] + b"\xff\xfe" + name[12:])
    with pytest.raises(StoreWireError, match="1 bytes after"):
        decode_request(name + b"\0")
    with pytest.raises(StoreWireError, match="unknown request op 9"):
        decode_request(b"\x09" + bytes(8))
    with pytest.raises(StoreWireError, match="shorter than its header"):
        decode_reply(b"\x81")


# ---- the client against a scripted host ----------------------------------------------------

Script = Callable[[int, Request], bytes | None]


class FakeHost:
    """A host that answers each request with what ``script`` returns (raw bytes: any garbage
    it likes; ``None``: no answer at all), until the client hangs up."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.host, client = socket.socketpair()
        self.host.settimeout(30)
        self.client_sock = client
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        frames = FrameReader()
        for _ in range(1000):  # frames read at most
            try:
                data = self.host.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            frames.feed(data)
            while (body := frames.next()) is not None:
                request_id, request = decode_request(body)
                self.requests.append(request)
                answer = self.script(request_id, request)
                if answer is not None:
                    self.host.sendall(answer)

    def stop(self) -> None:
        self.host.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def reply(request_id: int, message: Reply) -> bytes:
    return frame(encode_reply(request_id, message))


class Factory(Protocol):
    def __call__(
        self, script: Script, timeout: float = ..., page: int = ...
    ) -> tuple[StoreClient, FakeHost]: ...


@pytest.fixture
def fake() -> Iterator[Factory]:
    made: list[tuple[StoreClient, FakeHost]] = []

    def make(script: Script, timeout: float = 5.0, page: int = 512) -> tuple[StoreClient, FakeHost]:
        host = FakeHost(script)
        client = StoreClient(host.client_sock, timeout=timeout, page=page)
        made.append((client, host))
        return client, host

    yield make
    for client, host in made:
        client.close()
        host.stop()


def test_a_host_that_never_answers_is_unavailable_within_the_timeout(fake: Factory) -> None:
    client, _ = fake(lambda i, r: None, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.2 s"):
        client.get("token", HIDDEN)
    assert time.monotonic() - started < 10  # bounded, not hung (the timeout is 0.2 s)


def test_a_late_reply_is_dropped_not_taken_for_the_next_one(fake: Factory) -> None:
    calls: list[int] = []

    def script(request_id: int, request: Request) -> bytes | None:
        calls.append(request_id)
        if request_id == 1:
            return None  # stalls; the answer comes with the second request's
        return reply(1, Found(b"late")) + reply(request_id, Found(b"fresh"))

    client, _ = fake(script, timeout=0.2)
    with pytest.raises(StoreUnavailable):
        client.get("token", HIDDEN)
    client.timeout = 5.0  # the second call gets time to be answered
    assert client.get("token", HIDDEN) == b"fresh"


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        (lambda i: frame(b"\x81" + i.to_bytes(8, "big") + b"\x07"), "not 0 or 1"),
        (lambda i: frame(b"garbage"), "shorter than its header"),
        (lambda i: reply(i, Done()), "a Done reply to a Get"),
        (lambda i: reply(i + 5, Found(None)), "a reply to request 6, not 1"),
        (lambda i: reply(i, Refused("disk on fire")), "refused the request: disk on fire"),
    ],
)
def test_a_host_answering_garbage_is_refused(
    fake: Factory, answer: Callable[[int], bytes], text: str
) -> None:
    client, _ = fake(lambda i, r: answer(i))
    with pytest.raises(StoreWireError, match=text):
        client.get("token", HIDDEN)


def test_a_refusal_is_its_own_error_and_the_client_goes_on(fake: Factory) -> None:
    answers: Iterator[Reply] = iter([Refused("busy"), Found(SECRET_RECORD)])
    client, _ = fake(lambda i, r: reply(i, next(answers)))
    with pytest.raises(StoreRefused):
        client.get("token", HIDDEN)
    assert client.get("token", HIDDEN) == SECRET_RECORD


def test_an_oversize_frame_from_the_host_breaks_the_connection_for_good(fake: Factory) -> None:
    client, host = fake(lambda i, r: (MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(StoreWireError, match="at most 8388608"):
        client.get("token", HIDDEN)
    with pytest.raises(StoreUnavailable, match="unusable: the host sent a frame over the limit"):
        client.get("token", HIDDEN)
    assert len(host.requests) == 1  # the second call never reached the host


def test_a_host_that_hangs_up_is_unavailable(fake: Factory) -> None:
    client, host = fake(lambda i, r: None)
    host.host.close()
    with pytest.raises(StoreUnavailable):
        client.get("token", HIDDEN)
    with pytest.raises(StoreUnavailable, match="unusable"):
        client.checkpoints()


def test_bad_arguments_are_refused_before_anything_is_sent(fake: Factory) -> None:
    client, host = fake(lambda i, r: reply(i, Done()))
    with pytest.raises(StoreWireError, match="hidden key is 32 bytes"):
        client.put_many("token", {HIDDEN: b"ok", b"short": b"x"})
    with pytest.raises(StoreWireError, match="at most 65600"):
        client.put_many("token", {HIDDEN: b"x" * (MAX_RECORD_BYTES + 1)})
    client.put_many("token", {})  # nothing to do: no round trip
    client.checkpoint(1)
    assert host.requests == [Checkpoint(1)]


def test_a_batch_over_a_frame_goes_in_numbered_parts_the_last_one_final(fake: Factory) -> None:
    client, host = fake(lambda i, r: reply(i, Done()))
    big = {i.to_bytes(32, "big"): b"r" * MAX_RECORD_BYTES for i in range(200)}  # ~12.5 MiB
    client.put_many("token", big)
    parts = [r for r in host.requests if isinstance(r, PutMany)]
    assert [(p.part, p.final) for p in parts] == [(0, False), (1, True)]
    assert dict(e for p in parts for e in p.entries) == big


def test_records_are_paged_and_a_lying_page_is_refused(fake: Factory) -> None:
    stored = [("token", i.to_bytes(32, "big"), b"r%d" % i) for i in range(7)]

    def honest(request_id: int, request: Request) -> bytes:
        assert isinstance(request, ListRecords)
        rest = [e for e in stored if request.after is None or e[:2] > request.after]
        page = tuple(rest[: request.limit])
        return reply(request_id, RecordsPage(page, len(rest) > request.limit))

    client, host = fake(honest, page=3)
    assert list(client.records("token")) == stored
    assert len(host.requests) == 3

    def looping(request_id: int, request: Request) -> bytes:  # always the first page again
        return reply(request_id, RecordsPage(tuple(stored[:2]), True))

    client, _ = fake(looping, page=3)
    with pytest.raises(StoreWireError, match="out of order"):
        list(client.records())

    def endless(request_id: int, request: Request) -> bytes:  # empty, "more to come"
        return reply(request_id, RecordsPage((), True))

    client, _ = fake(endless, page=3)
    with pytest.raises(StoreWireError, match="wrong size"):
        list(client.records())

    def other(request_id: int, request: Request) -> bytes:
        return reply(request_id, RecordsPage((("other", HIDDEN, b"x"),), False))

    client, _ = fake(other, page=3)
    with pytest.raises(StoreWireError, match="another contract"):
        list(client.records("token"))


def test_errors_and_repr_never_carry_record_bytes(fake: Factory) -> None:
    client, _ = fake(lambda i, r: reply(i, Found(SECRET_RECORD)))
    with pytest.raises(StoreWireError) as caught:
        client.put_many("token", {HIDDEN: SECRET_RECORD * 2000})
    assert b"SECRET" not in str(caught.value).encode() and "SECRET" not in repr(client)
    with pytest.raises(StoreWireError) as caught:
        decode_reply(encode_reply(1, Found(SECRET_RECORD)) + b"\0")
    assert "SECRET" not in str(caught.value)
