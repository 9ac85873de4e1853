"""The host <-> KM enclave circuit: typed messages over two rings, and what a hostile side
can put in them (garbage, unknown ops, wrong types, deep nesting, replies to nobody)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmnode.circuit import Circuit, CircuitClosed
from kmnode.km_messages import (
    Ack,
    ApiCall,
    CircuitError,
    Data,
    DataReply,
    Event,
    Failed,
    ModulesRequest,
    Notice,
    ReleaseKey,
    Reply,
    Request,
    StatusReply,
    StatusRequest,
    decode,
    encode,
)
from kmnode.ring import Ring
from tests.operators import api_call

pytestmark = pytest.mark.timeout(30)


class Pair:
    """Both sides of a circuit in one process: ``host`` and ``enclave``."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{id(self)}"
        self.rings = [
            Ring.create(f"/kmsim-test-a-{tag}", 1 << 16),
            Ring.create(f"/kmsim-test-b-{tag}", 1 << 16),
        ]
        self.notices: list[Notice] = []
        to_enclave, to_host = os.pipe(), os.pipe()
        self.fds = [*to_enclave, *to_host]
        self.host = Circuit(
            self.rings[1],
            self.rings[0],
            bell_in=to_host[0],
            bell_out=to_enclave[1],
            on_request=self.refuse,
            on_notice=self.notices.append,
        )
        self.enclave = Circuit(
            self.rings[0],
            self.rings[1],
            bell_in=to_enclave[0],
            bell_out=to_host[1],
            on_request=self.answer,
            on_notice=self.notices.append,
        )

    async def answer(self, request: Request) -> Reply:
        if isinstance(request, StatusRequest):
            return DataReply(data={"ok": True})
        if isinstance(request, ApiCall):
            if request.method == "POST":
                raise Failed.of("refused", f"no key named {request.target.split('/')[3]!r}")
            return Ack()
        raise RuntimeError("a bug with a secret in its message: 0123456789abcdef")

    async def refuse(self, request: Request) -> Reply:
        raise Failed.of("bad_request", "the host serves nothing here")

    def inject(self, record: bytes) -> None:
        """Write a raw record into the enclave's inbound ring, as a hostile host would (with
        the host's own writer: a ring has one writer per side), then ring the doorbell."""
        self.host._writer.write(record)
        self.host._ring()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    p.host.start()
    p.enclave.start()
    try:
        yield p
    finally:
        await p.host.close()
        await p.enclave.close()
        for ring in p.rings:
            ring.close()
        for fd in p.fds:
            os.close(fd)


async def test_a_request_gets_its_reply(pair: Pair) -> None:
    reply = await pair.host.call(StatusRequest(), DataReply)
    assert reply.data == {"ok": True}


async def test_a_refusal_arrives_as_failed_with_its_code(pair: Pair) -> None:
    with pytest.raises(Failed) as caught:
        await pair.host.call(api_call("POST", "/v1/keys/db/release"), DataReply)
    assert caught.value.failure.code == "refused" and "db" in caught.value.failure.message


async def test_a_bug_on_the_other_side_is_an_internal_failure_without_its_message(
    pair: Pair,
) -> None:
    with pytest.raises(Failed) as caught:
        await pair.host.call(ModulesRequest(), DataReply)
    assert caught.value.failure.code == "internal"
    assert "0123456789abcdef" not in caught.value.failure.message


async def test_a_reply_of_the_wrong_kind_is_an_error(pair: Pair) -> None:
    with pytest.raises(CircuitError, match="answered by Ack"):
        await pair.host.call(api_call("GET", "/v1/keys"), StatusReply)


async def test_notices_arrive_in_order(pair: Pair) -> None:
    for i in range(5):
        pair.enclave.notify(Event(kind="e", fields={"i": i}))
    for _ in range(200):
        if len(pair.notices) == 5:
            break
        await asyncio.sleep(0.01)
    assert [n.fields["i"] for n in pair.notices if isinstance(n, Event)] == list(range(5))


@pytest.mark.parametrize(
    "record",
    [
        b"",
        b"\xff\xfe garbage",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"op": "no.such.op"}),
        msgpack.packb({"op": "status", "extra": 1}),
        msgpack.packb({"op": "key.release", "key": 7}),
        msgpack.packb({"op": "key.release", "key": "db", "timeout": float("nan")}),
        msgpack.packb({"op": "data", "id": 1, "data": {"x": b"\x00"}}),
        b"\x91" * 5000 + b"\xc0",
    ],
)
async def test_garbage_is_dropped_and_counted_and_the_circuit_goes_on(
    pair: Pair, record: bytes
) -> None:
    pair.inject(record)
    for _ in range(200):
        if pair.enclave.malformed:
            break
        await asyncio.sleep(0.01)
    assert pair.enclave.malformed == 1
    assert (await pair.host.call(StatusRequest(), DataReply)).data == {"ok": True}


async def test_a_reply_nobody_asked_for_is_ignored(pair: Pair) -> None:
    pair.inject(encode(DataReply(id=12345, data="forged")))
    assert (await pair.host.call(StatusRequest(), DataReply)).data == {"ok": True}


async def test_a_side_that_goes_away_fails_what_waits_on_it(pair: Pair) -> None:
    """The other side's process exits: its end of the doorbell closes, ours reads end-of-file,
    and every call waiting on it fails at once instead of at its timeout."""
    await pair.enclave.close()  # nobody answers any more
    waiting = asyncio.create_task(pair.host.call(StatusRequest(), DataReply, timeout=20))
    await asyncio.sleep(0.05)
    os.close(pair.fds[3])  # the enclave's doorbell write end, as its exit would
    pair.fds.remove(pair.fds[3])
    with pytest.raises(CircuitClosed):
        await asyncio.wait_for(waiting, 5)
    assert pair.host.closed.is_set()
    with pytest.raises(CircuitClosed):
        await pair.host.call(StatusRequest(), DataReply)


@given(st.binary(max_size=512))
def test_decode_refuses_anything_that_is_not_a_message(record: bytes) -> None:
    try:
        message = decode(record)
    except CircuitError:
        return
    assert decode(encode(message)) == message


def test_operator_timeouts_are_bounded_at_the_boundary() -> None:
    for bad in (float("nan"), float("inf"), -1.0, 1e9):
        with pytest.raises(ValueError):
            ReleaseKey(key="db", timeout=bad)
    assert ReleaseKey(key="db", timeout=3.0).timeout == 3.0


async def test_both_sides_bursting_past_full_rings_deliver_everything_in_order(
    pair: Pair,
) -> None:
    """A snapshot going to the host while the host relays a catch-up to the enclave: each side
    writes far more than a ring holds, at once. Neither blocks on the full ring (a side that
    slept there would stop reading its own, and two full rings would stop both); what does not
    fit waits, in order, and everything arrives."""
    pair.notices.clear()
    chunk = 8 * 1024  # a record may take a quarter of a ring
    count = 256  # 2 MiB each way, through 64 KiB rings
    for i in range(count):
        pair.host.notify(Data(conn=1, data=i.to_bytes(4, "big") * (chunk // 4)))
        pair.enclave.notify(Data(conn=2, data=i.to_bytes(4, "big") * (chunk // 4)))
    assert pair.host._backlog and pair.enclave._backlog  # both rings full, nobody blocked
    for _ in range(1000):
        if len(pair.notices) == 2 * count:
            break
        await asyncio.sleep(0.005)
    for conn in (1, 2):
        got = [n.data[:4] for n in pair.notices if isinstance(n, Data) and n.conn == conn]
        assert got == [i.to_bytes(4, "big") for i in range(count)]
    assert not pair.host.closed.is_set() and not pair.enclave.closed.is_set()


async def test_a_side_that_stops_reading_is_given_up_on(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kmnode.circuit as circuit

    monkeypatch.setattr(circuit, "WRITE_TIMEOUT", 0.2)
    pair.enclave._unwatch()  # the enclave stops reading (stuck, or paused for good)
    for _ in range(16):
        pair.host.notify(Data(conn=1, data=bytes(8 * 1024)))
    assert pair.host._backlog
    for _ in range(1000):  # bounded: 10 s at most, for a loaded machine
        if pair.host.closed.is_set():
            break
        await asyncio.sleep(0.01)
    assert pair.host.closed.is_set()
    with pytest.raises(CircuitClosed):
        await pair.host.call(StatusRequest(), DataReply)
