"""`kmctl snapshot save`: a signed snapshot of this node's KM state, served in chunks.

The snapshot is the one Raft compaction makes (``KMStateMachine.snapshot_capture``): the state
image (no secret is in it: keys are derived from the master secret, which never enters the
state) inside an envelope this enclave signed over (index, term, chain hash, digest), so
whoever restores it can tell it from a fabricated one. Taken on the event loop, serialised in
a thread, kept until its last chunk is read or the next save starts, and read in chunks of
``CHUNK_BYTES``: no reply over the circuit or HTTP is ever larger, whatever the state's size.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kmnode.km.ledger_proof import SignedSnapshot
from kmnode.km_messages import Failed

if TYPE_CHECKING:
    from kmnode.km.node import KMNode

#: The most snapshot bytes one reply carries.
CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class _Taken:
    id: str
    data: bytes
    index: int
    term: int


class SnapshotSource:
    def __init__(self, node: KMNode) -> None:
        self.node = node
        self._taken: _Taken | None = None

    async def chunk(self, offset: int, wanted: str | None) -> dict[str, Any]:
        """Chunk ``offset`` of snapshot ``wanted`` (offset 0 and no id: take a new one)."""
        if wanted is None:
            if offset != 0:
                raise Failed.of("bad_request", "a snapshot is read from offset 0 without an id")
            self._taken = await self._take()
        taken = self._taken
        if taken is None or (wanted is not None and taken.id != wanted):
            raise Failed.of(
                "not_found",
                "that snapshot is no longer held here (another save started, or it was read "
                "to its end): start again from offset 0",
            )
        if offset > len(taken.data):
            raise Failed.of("bad_request", f"offset {offset} is past the end ({len(taken.data)})")
        part = taken.data[offset : offset + CHUNK_BYTES]
        if offset + len(part) >= len(taken.data):
            self._taken = None  # read to its end: nothing keeps its memory
        return {
            "id": taken.id,
            "node": self.node.name,
            "index": taken.index,
            "term": taken.term,
            "size": len(taken.data),
            "offset": offset,
            "chunk": base64.b64encode(part).decode("ascii"),
        }

    async def _take(self) -> _Taken:
        node = self.node
        if not node.enclave.state.cluster:
            raise Failed.of("not_ready", "this node holds no cluster state to snapshot yet")
        serialise = node.machine.snapshot_capture()  # on the loop: a consistent image
        data = await asyncio.to_thread(serialise)
        signed = SignedSnapshot.decode(data)
        if signed is None:
            raise Failed.of("refused", "this node's enclave cannot sign a snapshot now")
        return _Taken(hashlib.sha256(data).hexdigest(), data, signed.index, signed.term)
