"""The peer-port fuzzer: connections that send what a hostile peer or network would, built from
a real handshake transcript where it can be (an enclave's genuine HELLO, the node's genuine
ANSWER, the enclave's genuine FINISH and channel frames), then flipped, cut and extended."""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time

from consensus.types import Message, MessageType
from kmnode.km.enclave import KMEnclave, Purpose
from kmnode.km.peer_wire import (
    CHANNEL,
    HANDSHAKE,
    JOIN,
    RAFT,
    encode_frame,
    initiate,
    read_frame,
)

HALF_OPEN = 300
#: A commit index no legitimate message uses: seeing it at the node means fuzz got through.
POISON = 999_999


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
    """Cases against the peer port at ``port`` of node ``target``. ``member`` is the enclave
    whose sessions give real handshake messages and channel frames to mutate: a member the
    node accepts (every case reaches its furthest point), or a stranger claiming a member's
    name (the node answers its HELLO, then refuses it)."""

    def __init__(self, port: int, target: str, member: KMEnclave, rng: random.Random) -> None:
        self.rng = rng
        self.port = port
        self.target = target
        self.member = member
        #: Poison messages that reached the node intact inside a mutated stream.
        self.genuine_poison = 0

    async def random_bytes(self) -> None:
        await exchange(self.port, self.rng.randbytes(self.rng.choice((1, 5, 100, 5000, 20000))))

    async def mutated_hello(self) -> None:
        session, hello = self.member.open_initiator(self.target, Purpose.RAFT)
        self.member.close_session(session)
        frame = encode_frame(self.rng.choice((RAFT, JOIN)), hello)
        await exchange(self.port, mutate(self.rng, frame))

    async def mutated_finish(self) -> None:
        """A real HELLO and the node's real ANSWER, then a FINISH (or its frame) mutated."""
        session, hello = self.member.open_initiator(self.target, Purpose.RAFT)
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
            pass  # the node hung up on the garbage: what it should do
        finally:
            self.member.close_session(session)
            writer.close()

    async def mutated_channel_frames(self) -> None:
        """A genuine attested link from a member, then frames a peer should never send."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            session = await initiate(self.member, reader, writer, RAFT, self.target)
            poison = Message(
                MessageType.HEARTBEAT, to=self.target, frm=self.member.name, term=1, commit=POISON
            )
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
            pass  # the node hung up on the garbage: what it should do
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
            pass  # the node hung up (or stopped reading) past its limit: what it should do
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
