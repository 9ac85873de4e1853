"""The peer port under fire, at the socket level: random bytes, a real handshake transcript
with bytes flipped, cut and added, oversize length prefixes with floods behind them, mutated
channel frames on an attested link, and hundreds of half-open connections at once.

Afterwards the node must be unharmed: a legitimate member still handshakes and its messages
still arrive, nothing the fuzzer sent reached Raft, the enclave's state (applied index and hash
chain) is what it was, and the memory Python holds stayed within a stated bound while it ran.
Seeded, with a bounded number of cases, so a failure replays exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import struct
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import pytest

from consensus.types import Message, MessageType
from kmnode.km.enclave import KMEnclave, Purpose
from kmnode.km.peer_wire import (
    CHANNEL,
    HANDSHAKE,
    JOIN,
    RAFT,
    PeerLimits,
    encode_frame,
    initiate,
    read_frame,
)
from tests.host import eventually
from tests.km.peer_links import Links

pytestmark = pytest.mark.timeout(120)

SEED = 13
#: Cases of each kind; the whole run takes well under a minute.
CASES = 150
HALF_OPEN = 300
#: Floods at once, every tenth round: each announces a huge frame and pushes 8 MiB behind it
#: (buffering them, as the node once did, would take 32 MiB).
FLOODS = 4
#: Bounds on what Python may hold because of the fuzzer: while it runs, and after it.
PEAK_BOUND = 16 * 1024 * 1024
LEFT_BOUND = 4 * 1024 * 1024
#: A commit index no legitimate message uses: seeing it at the node means fuzz got through.
POISON = 999_999
LIMITS = PeerLimits(handshake_timeout=1.0)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` changed in one of the ways a hostile peer or network would (never unchanged)."""
    kind = rng.randrange(5)
    if kind == 0 or len(data) < 2:  # flip bits
        flipped = bytearray(data or b"\0")
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped) if bytes(flipped) != data else bytes(flipped) + b"\0"
    if kind == 1:  # truncate
        return data[: rng.randrange(len(data))]
    if kind == 2:  # extend
        return data + rng.randbytes(rng.randint(1, 64))
    if kind == 3:  # overwrite a slice
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randint(1, 16))
        patch = rng.randbytes(end - start)
        out = data[:start] + patch + data[end:]
        return out if out != data else data + b"\0"
    cut = rng.randrange(1, len(data))  # swap the halves
    out = data[cut:] + data[:cut]
    return out if out != data else data + b"\0"


async def exchange(port: int, payload: bytes, timeout: float = 3.0) -> bytes:
    """Send ``payload``, end our side, and return what the node answered before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionError:
        return b""
    finally:
        writer.close()


class Fuzzer:
    def __init__(self, links: Links, rng: random.Random) -> None:
        self.rng = rng
        self.port = links.transports["a"].port
        #: b's enclave: a member a accepts, whose sessions the fuzzer opens to get real
        #: handshake messages and channel frames to mutate.
        self.member: KMEnclave = links.enclaves["b"]
        #: Poison messages that reached the node intact inside a mutated stream.
        self.genuine_poison = 0

    async def random_bytes(self) -> None:
        await exchange(self.port, self.rng.randbytes(self.rng.choice((1, 5, 100, 5000, 20000))))

    async def mutated_hello(self) -> None:
        session, hello = self.member.open_initiator("a", Purpose.RAFT)
        self.member.close_session(session)
        frame = encode_frame(self.rng.choice((RAFT, JOIN)), hello)
        await exchange(self.port, mutate(self.rng, frame))

    async def mutated_finish(self) -> None:
        """A real HELLO and the node's real ANSWER, then a FINISH (or its frame) mutated."""
        session, hello = self.member.open_initiator("a", Purpose.RAFT)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(encode_frame(RAFT, hello))
            kind, answer = await asyncio.wait_for(read_frame(reader, 16 * 1024), 3.0)
            assert kind == HANDSHAKE
            finish = self.member.handshake_step(session, answer, time.time())
            assert finish is not None
            frame = encode_frame(HANDSHAKE, finish)
            if self.rng.random() < 0.5:
                frame = encode_frame(HANDSHAKE, mutate(self.rng, finish))
            else:
                frame = mutate(self.rng, frame)
            writer.write(frame)
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 3.0)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.member.close_session(session)
            writer.close()

    async def mutated_channel_frames(self) -> None:
        """A genuine attested link from a member, then frames a peer should never send."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            session = await initiate(self.member, reader, writer, RAFT, "a")
            poison = Message(MessageType.HEARTBEAT, to="a", frm="b", term=1, commit=POISON)
            sealed = self.member.seal_raft(session, poison)
            choice = self.rng.randrange(3)
            if choice == 0:
                frame = encode_frame(CHANNEL, mutate(self.rng, sealed))
            elif choice == 1:
                genuine = encode_frame(CHANNEL, sealed)
                frame = mutate(self.rng, genuine)
                # Bytes added behind an intact frame: the genuine message (from a genuine
                # member) counts, then the garbage closes the link.
                self.genuine_poison += frame.startswith(genuine)
            else:
                frame = encode_frame(
                    self.rng.choice((CHANNEL, HANDSHAKE, b"Z")), os_bytes(self.rng)
                )
            writer.write(frame)
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 3.0)
            self.member.close_session(session)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def oversize_flood(self) -> None:
        """A length prefix far past any limit, then megabytes behind it."""
        length = self.rng.choice((16 * 1024 + 2, 1 << 20, 8 << 20, 64 << 20, 2**32 - 1))
        kind = self.rng.choice((RAFT, JOIN, HANDSHAKE, CHANNEL))
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(struct.pack(">I", length) + kind)
            chunk = b"\0" * (256 * 1024)
            for _ in range(32):  # up to 8 MiB, until the node hangs up
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 3.0)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    async def half_open_crowd(self) -> None:
        """Hundreds of connections at once, each sending part of a header and waiting."""
        opened: list[asyncio.StreamWriter] = []
        try:
            for _ in range(HALF_OPEN):
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.write(b"\0\0")
                    opened.append(writer)
            await asyncio.sleep(0.3)
        finally:
            for writer in opened:
                writer.close()


def os_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(0, 200))


async def test_the_peer_port_survives_fuzzing_unchanged() -> None:
    links = Links(["a", "b"], limits=LIMITS)
    await links.start()
    try:
        a = links.transports["a"]
        state = links.enclaves["a"].state
        await eventually(lambda: links.linked("b", "a"), "b's link to a")
        links.send("b", "a", 1)
        await eventually(lambda: links.got("a", "b") == [1], "b's first message at a")
        before = (state.applied_index, state.chain_hash)
        fuzz = Fuzzer(links, random.Random(SEED))
        kinds: list[Callable[[], Awaitable[None]]] = [
            fuzz.random_bytes,
            fuzz.mutated_hello,
            fuzz.mutated_finish,
            fuzz.mutated_channel_frames,
        ]
        # The refusals' log records would be kept by pytest's log capture, not by the node.
        quiet = logging.getLogger("kmnode.km.peer_transport")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            started = time.monotonic()
            for round_ in range(CASES):
                # Four cases at once, one of each kind, and a flood now and then.
                batch = [kind() for kind in kinds]
                if round_ % 10 == 0:
                    batch += [fuzz.oversize_flood() for _ in range(FLOODS)]
                await asyncio.gather(*batch)
            await fuzz.half_open_crowd()
            elapsed = time.monotonic() - started
            gc.collect()
            await asyncio.sleep(LIMITS.handshake_timeout + 0.5)  # what was left half-open ends
            gc.collect()
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            quiet.setLevel(level)
        print(
            f"fuzz: {CASES * len(kinds) + CASES // 10 * FLOODS + HALF_OPEN} connections in "
            f"{elapsed:.1f}s; Python memory peak +{(peak - baseline) / 2**20:.1f} MiB, "
            f"left +{(current - baseline) / 2**20:.2f} MiB; stats {a.stats}"
        )
        assert peak - baseline < PEAK_BOUND
        assert current - baseline < LEFT_BOUND
        # Every kind of refusal happened, and the crowd met the handshake limit.
        assert a.stats.refused >= CASES and a.stats.refused_oversize >= CASES // 10
        assert a.stats.refused_busy > 0
        assert a._handshakes_open == 0
        # Nothing the fuzzer sent reached Raft but genuine frames ahead of the garbage (those
        # may or may not, as the garbage behind them arrives with them or later); the state
        # is untouched.
        assert links.got("a", "b").count(POISON) <= fuzz.genuine_poison
        assert (state.applied_index, state.chain_hash) == before
        # The node still serves its legitimate peer, on the link it had or a new one.
        for i in range(2, 12):
            links.send("b", "a", i)
        await eventually(lambda: links.got("a", "b")[-10:] == list(range(2, 12)), "b at a")
        b_session_count = len(links.enclaves["a"]._sessions)
        assert b_session_count < 16  # refused handshakes left no sessions behind
    finally:
        await links.stop()
