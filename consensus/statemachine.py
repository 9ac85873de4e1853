"""The interface between the Raft driver and the replicated application (the KM ledger).

The driver calls ``apply`` once per committed NORMAL entry, in log order, on every node; the
return value resolves the proposer's future on the node that proposed it. ``snapshot`` and
``restore`` let the log be compacted and a lagging node be caught up from an image instead of
the whole history, so they must capture everything ``apply`` has built, deterministically.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from consensus.types import Entry


@runtime_checkable
class StateMachine(Protocol):
    def apply(self, entry: Entry) -> object:
        """Apply one committed entry; must be deterministic (same result on every node)."""
        ...

    def snapshot(self) -> bytes:
        """Serialize the state built by every entry applied so far."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a ``snapshot()`` image (possibly from another node)."""
        ...
