"""The KM state as Raft's state machine, with a hook for what the node does after an apply.

Applying must stay deterministic, so side effects (provisioning a key to the local service
enclave, waking API requests) happen in listeners the node registers, after the state changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from consensus.types import Entry
from kmnode.km.state import KMState

ApplyListener = Callable[[int, dict[str, Any]], None]


class StateHolder(Protocol):
    """Anything that owns the replicated KM state (the KM enclave)."""

    state: KMState


class KMStateMachine:
    def __init__(self, holder: StateHolder) -> None:
        self._holder = holder
        self.listeners: list[ApplyListener] = []

    def apply(self, entry: Entry) -> object:
        result = self._holder.state.apply(entry.index, entry.data)
        for listener in self.listeners:
            listener(entry.index, result)
        return result

    def snapshot(self) -> bytes:
        return self._holder.state.snapshot()

    def snapshot_capture(self) -> Callable[[], bytes]:
        """An image of the state now, serialised later (the Raft driver does it in a thread:
        the release history makes serialising slow, and it must not stall the event loop)."""
        return self._holder.state.snapshot_capture()

    def restore(self, data: bytes) -> None:
        self._holder.state = KMState.restore(data)
