"""The chaos fault ``poison``: this host turns hostile and feeds garbage into every input it holds.

The threat model says the host is untrusted: it may send its KM enclave any bytes in any order,
answer requests it was never asked, flood it with ticks, send operator requests no client made,
and write anything to the other members' peer ports. While enabled, the poisoner does all of
that at a bounded rate, from a seeded generator:

* ``enclave_bytes``: random records written straight into the circuit's ring (not msgpack, or
  msgpack of the wrong shape);
* ``enclave_typed``: well-formed circuit messages with wrong contents: bytes and closes for
  connections that do not exist (and, rarely, for ones that do), inbound connections nobody
  made, replies to requests never asked, bursts of ticks;
* ``api_calls``: operator requests through the enclave's own door (``ApiCall``) with garbage
  methods' targets, headers and bodies, unsigned or with forged signatures;
* ``http``: garbage HTTP to this node's own operator API port (bad request lines, headers,
  bodies, deep nesting);
* ``peer``: connections to every member's peer port carrying random and mutated frames.

What must hold (and what the nemesis checks from the counters this returns): no node stops, no
answer is a 5xx or an ``internal`` failure, and the run's history stays valid. Nothing here
may raise out of the loop: a poisoner that dies quietly would prove nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kmnode.circuit import Circuit, CircuitClosed
from kmnode.km_messages import (
    ApiCall,
    Closed,
    Data,
    Failed,
    Failure,
    Message,
    Reply,
    Tick,
    encode,
)

#: Actions per second while poisoning (each is small: a record, a request, a connection).
DEFAULT_RATE = 40.0
#: Connection numbers the poisoner invents for connections nobody made: far above the host's
#: own counter, so they never collide with a real connection.
FAKE_CONN_BASE = 1 << 40
#: Request ids for replies nobody asked for: far from the enclave's own counter.
FAKE_REPLY_ID_BASE = 1 << 40
#: What the host may legitimately send the enclave, by op (see ``kmnode.km_messages``); stop
#: and service-crash are left out: those are powers a host has anyway, not garbage.
HOST_TO_ENCLAVE_OPS = (
    "status", "api.call", "links.get", "modules", "tick",
    "net.accepted", "net.data", "net.closed",
    "ack", "failure", "net.listening", "net.connected", "disk.listing", "disk.data",
)  # fmt: skip
_FIELDS = (
    "id", "conn", "data", "method", "target", "headers", "body", "peer_host", "peer_port",
    "port", "names", "code", "message", "field", "changes", "peer", "mode",
)  # fmt: skip
ACTIONS = ("enclave_bytes", "enclave_typed", "api_calls", "http", "peer")
_HTTP_TIMEOUT = 2.0


@dataclass
class PoisonStats:
    """What was sent and what came back; ``problems`` are findings (a 5xx, an internal
    failure), each with a short example."""

    sent: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text[:300])

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": dict(sorted(self.sent.items())),
            "answers": dict(sorted(self.answers.items())),
            "problems": list(self.problems),
        }


class Poisoner:
    """Runs while enabled; ``circuit`` is read on every action (the enclave may restart)."""

    def __init__(
        self,
        circuit: Callable[[], Circuit | None],
        api_address: tuple[str, int],
        peer_addresses: Callable[[], list[tuple[str, int]]],
    ) -> None:
        self._circuit = circuit
        self._api = api_address
        self._peers = peer_addresses
        self._task: asyncio.Task[None] | None = None
        self.stats = PoisonStats()
        self.seed: int | None = None

    @property
    def enabled(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, seed: int, rate: float = DEFAULT_RATE) -> None:
        """Start (or restart with a new seed); the counters start from zero."""
        if self._task is not None:
            self._task.cancel()
        self.stats, self.seed = PoisonStats(), seed
        self._task = asyncio.create_task(self._run(random.Random(seed), rate), name="poison")

    async def stop(self) -> PoisonStats:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return self.stats

    async def _run(self, rng: random.Random, rate: float) -> None:
        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                action = rng.choice(ACTIONS)
                self.stats.sent[action] += 1
                try:
                    if action == "enclave_bytes":
                        self._enclave_bytes(rng)
                    elif action == "enclave_typed":
                        self._enclave_typed(rng)
                    else:
                        # Requests and connections wait on answers: run them beside the loop,
                        # a few at a time, so a slow answer never slows the poison down.
                        if len(pending) < 16:
                            task = asyncio.create_task(self._async_action(action, rng.random()))
                            pending.add(task)
                            task.add_done_callback(pending.discard)
                except CircuitClosed:
                    self.stats.answers["circuit_closed"] += 1
                await asyncio.sleep(1.0 / rate)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _async_action(self, action: str, seed: float) -> None:
        rng = random.Random(seed)
        try:
            if action == "api_calls":
                await self._api_call(rng)
            elif action == "http":
                await self._http(rng)
            else:
                await self._peer(rng)
        except (OSError, TimeoutError, CircuitClosed, asyncio.IncompleteReadError) as exc:
            self.stats.answers[f"{action}:{type(exc).__name__}"] += 1

    # --- into the KM enclave ------------------------------------------------------------------

    def _send(self, record: bytes) -> None:
        circuit = self._circuit()
        if circuit is None:
            raise CircuitClosed("the KM enclave is not running")
        circuit.send_raw(record)

    def _enclave_bytes(self, rng: random.Random) -> None:
        if rng.random() < 0.5:
            record = rng.randbytes(rng.randint(1, 512))
        else:  # msgpack, but not a circuit message
            record = msgpack.packb(_garbage(rng, 3), use_bin_type=True)
        self._send(record)

    def _enclave_typed(self, rng: random.Random) -> None:
        kind = rng.random()
        message: Message | None = None
        if kind < 0.3:  # a known op with random fields
            raw = {"op": rng.choice(HOST_TO_ENCLAVE_OPS)}
            raw.update({rng.choice(_FIELDS): _garbage(rng, 2) for _ in range(rng.randint(0, 4))})
            self._send(msgpack.packb(raw, use_bin_type=True))
            return
        if kind < 0.5:  # a reply to a request never asked
            message = Failure(
                id=FAKE_REPLY_ID_BASE + rng.randrange(1 << 20), code="internal", message="forged"
            )
        elif kind < 0.6:  # a burst of ticks (sways liveness only)
            for _ in range(rng.randint(1, 20)):
                self._send(encode(Tick()))
            return
        elif kind < 0.9:  # bytes on a connection nobody made
            conn = FAKE_CONN_BASE + rng.randrange(1 << 20)
            message = Data(conn=conn, data=rng.randbytes(rng.randint(1, 256)))
        elif kind < 0.97:
            message = Closed(conn=FAKE_CONN_BASE + rng.randrange(1 << 20))
        else:  # rarely: garbage on a real connection (the session must drop and come back)
            message = Data(conn=rng.randint(1, 32), data=rng.randbytes(rng.randint(1, 64)))
        self._send(encode(message))

    async def _api_call(self, rng: random.Random) -> None:
        circuit = self._circuit()
        if circuit is None:
            raise CircuitClosed("the KM enclave is not running")
        headers = {
            rng.choice(["signature", "signature-input", "content-digest", "x"]): _text(rng, 200)
            for _ in range(rng.randint(0, 3))
        }
        call = ApiCall(
            method=rng.choice(["GET", "POST"]),
            target=rng.choice(["/v1/keys", "/v1/releases", "/v1/proposals", "/v1/", "/"])
            + _text(rng, 40),
            headers=headers,
            body=rng.randbytes(rng.randint(0, 300)) if rng.random() < 0.5 else b"{}",
        )
        try:
            reply: Reply = await circuit.call(call, Reply, timeout=10.0)
        except Failed as exc:
            code = exc.failure.code
            self.stats.answers[f"api_call:{code}"] += 1
            if code == "internal":
                self.stats.problem(f"ApiCall {call.method} {call.target!r}: {exc.failure.message}")
            return
        self.stats.answers[f"api_call:{type(reply).__name__}"] += 1

    # --- from outside: the operator API and the peer ports ------------------------------------

    async def _http(self, rng: random.Random) -> None:
        request = _http_request(rng, self._api)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*self._api), _HTTP_TIMEOUT)
        try:
            writer.write(request)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), _HTTP_TIMEOUT)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), _HTTP_TIMEOUT)
        parts = line.split()
        status = parts[1].decode("ascii", "replace") if len(parts) > 1 else "none"
        self.stats.answers[f"http:{status[:1]}xx" if status.isdigit() else "http:none"] += 1
        if status.startswith("5"):
            self.stats.problem(f"HTTP {status} for {request[:120]!r}")

    async def _peer(self, rng: random.Random) -> None:
        peers = self._peers()
        if not peers:
            return
        host, port = rng.choice(peers)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
        try:
            for _ in range(rng.randint(1, 4)):
                writer.write(_peer_bytes(rng))
            await writer.drain()
            # Whatever the node answers (a handshake reply, or nothing): a little is read.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(4096), 0.2)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        self.stats.answers["peer:closed"] += 1


def _text(rng: random.Random, most: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789/?=&%.{}[]\"':,;~-_ \t\x00é"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, most)))


def _garbage(rng: random.Random, depth: int) -> Any:
    """A random msgpack-able value (scalars, bytes, text, small lists and maps)."""
    kind = rng.randrange(9 if depth > 0 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), rng.randint(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1.5, float("nan"), float("inf"), 1e308])
    if kind == 4:
        return rng.randbytes(rng.randint(0, 64))
    if kind in (5, 6):
        return _text(rng, 32)
    if kind == 7:
        return [_garbage(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    return {_text(rng, 8): _garbage(rng, depth - 1) for _ in range(rng.randint(0, 4))}


def _http_request(rng: random.Random, api: tuple[str, int]) -> bytes:
    """Garbage HTTP: a mangled request line, or a plausible one with a garbage body."""
    host = f"{api[0]}:{api[1]}"
    kind = rng.random()
    if kind < 0.2:
        return rng.randbytes(rng.randint(1, 300)) + b"\r\n\r\n"
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "G\x00T"])
    path = rng.choice(["/v1/keys", "/v1/status", "/v1/releases", "/v1/chaos/rules", "/v1/x"])
    path += rng.choice(["", "/" + _text(rng, 20), "?" + _text(rng, 20), "/../../etc/passwd"])
    if kind < 0.5:
        body = b"[" * rng.randint(1, 5000)
    elif kind < 0.8:
        body = msgpack.packb(_garbage(rng, 3), use_bin_type=True)
    else:
        body = b'{"name": "k", "timeout": NaN, "generation": true}'
    content_type = rng.choice(["application/json", "text/plain", "application/json; x=\x7f"])
    head = (
        f"{method} {path.replace(' ', '%20')} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"Signature: {_text(rng, 40)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("utf-8", "replace") + body


def _peer_bytes(rng: random.Random) -> bytes:
    """One chunk for a peer port: random bytes, a frame with a garbage payload, or a length
    prefix far larger than anything allowed."""
    kind = rng.random()
    if kind < 0.3:
        return rng.randbytes(rng.randint(1, 512))
    if kind < 0.8:
        payload = bytes([rng.randrange(256)]) + rng.randbytes(rng.randint(0, 512))
        return len(payload).to_bytes(4, "big") + payload
    return rng.choice([2**32 - 1, 2**31, 64 << 20]).to_bytes(4, "big") + rng.randbytes(64)


__all__ = ["ACTIONS", "DEFAULT_RATE", "PoisonStats", "Poisoner"]
