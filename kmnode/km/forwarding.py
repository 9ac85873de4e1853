"""Commands a follower gets committed through the leader (release outcomes, token ends), in
batches.

A follower cannot propose; it sends the command to the leader in a Raft PROPOSE message. Under
load a node has the outcomes of a whole applied batch to forward at once, so the commands of
one event-loop turn leave as one message per leader (split to stay far below the peer frame
limit), not one message each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from consensus.types import Entry, EntryType, Message, MessageType, RaftError

#: Forwarded commands per proposal message, in bytes: far below the 8 MiB peer frame limit.
FORWARD_BATCH_BYTES = 1 << 20


def split_by_size(entries: list[Entry], limit: int) -> list[tuple[Entry, ...]]:
    """Consecutive runs of ``entries``, in order, each holding at most ``limit`` bytes of data
    (an entry larger than ``limit`` travels alone)."""
    batches: list[tuple[Entry, ...]] = []
    start, size = 0, 0
    for i, entry in enumerate(entries):
        if i > start and size + len(entry.data) > limit:
            batches.append(tuple(entries[start:i]))
            start, size = i, 0
        size += len(entry.data)
    if start < len(entries):
        batches.append(tuple(entries[start:]))
    return batches


class Forwarder:
    """Queues commands for the leader and sends each turn's queue as PROPOSE messages."""

    def __init__(self, name: str, send: Callable[[Message], None]) -> None:
        self.name = name
        self._send = send
        self._queued: dict[str, list[Entry]] = {}

    def forward(self, leader: str, command: bytes) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.setdefault(leader, []).append(Entry(0, 0, EntryType.NORMAL, command))

    def _flush(self) -> None:
        batches, self._queued = self._queued, {}
        for leader, entries in batches.items():
            for batch in split_by_size(entries, FORWARD_BATCH_BYTES):
                self._send(Message(MessageType.PROPOSE, to=leader, frm=self.name, entries=batch))


class _Driver(Protocol):
    @property
    def is_leader(self) -> bool: ...

    @property
    def leader(self) -> str: ...

    async def propose(self, command: bytes, timeout: float) -> object: ...


async def commit_anywhere(
    driver: _Driver,
    forwarder: Forwarder,
    command: bytes,
    done: Callable[[], bool],
    wait: Callable[[float], Awaitable[object]],
    timeout: float = 10.0,
) -> bool:
    """Get a node-proposed command committed from any node: propose it if this node leads,
    else forward it to the leader, until ``done()`` says its effect is applied here (``wait``
    sleeps until a relevant apply, or the time given). A retry may commit twice; the state
    machine refuses the duplicate, so this is idempotent. True if done in time."""
    deadline = time.monotonic() + timeout
    for _ in range(50):
        remaining = deadline - time.monotonic()
        if done() or remaining <= 0:
            break
        if driver.is_leader:
            with contextlib.suppress(RaftError):
                await driver.propose(command, timeout=min(remaining, 5.0))
        elif driver.leader:
            forwarder.forward(driver.leader, command)
        await wait(min(max(remaining, 0.0), 1.0))
    return done()
