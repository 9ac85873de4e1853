"""The KM state as Raft's state machine, with a hook for what the node does after an apply.

Applying must stay deterministic, so side effects (provisioning a key to the local service
enclave, waking API requests) happen in listeners the node registers, after the state changed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from consensus.types import Entry
from kmnode.km.commands import Applied, ClusterInitialised
from kmnode.km.enclave import KMEnclave
from kmnode.km.ledger_proof import SignedSnapshot
from kmnode.km.state import KMState

ApplyListener = Callable[[int, Applied], None]


class KMStateMachine:
    def __init__(self, enclave: KMEnclave) -> None:
        self._enclave = enclave
        self.listeners: list[ApplyListener] = []
        #: Raft term of the last entry applied: what a snapshot signature names with its index.
        self._term = 0

    def apply(self, entry: Entry) -> object:
        result = self._enclave.state.apply(entry.index, entry.data)
        self._term = entry.term
        if isinstance(result, ClusterInitialised):
            # The ledger now names its cluster: it must be the one the sealed state is bound to.
            self._enclave.check_binding()
        for listener in self.listeners:
            listener(entry.index, result)
        return result

    def snapshot(self) -> bytes:
        return self.snapshot_capture()()

    def snapshot_capture(self) -> Callable[[], bytes]:
        """An image of the state now, serialised later (the Raft driver does it in a thread:
        the release history makes serialising slow, and it must not stall the event loop),
        signed by the enclave (``ledger_proof.SignedSnapshot``) for offline verification."""
        if not self._enclave.state.cluster or self._enclave.binding_error:
            # Nothing to vouch for yet, or a ledger of another cluster (the node is stopping).
            return self._enclave.state.snapshot_capture()
        return self._enclave.snapshot_capture(self._term, time.time())

    def restore(self, data: bytes) -> None:
        signed = SignedSnapshot.decode(data)
        state = KMState.restore(data if signed is None else signed.state)
        state.quote_verifier = self._enclave.verifier
        self._enclave.state = state
        self._term = 0 if signed is None else signed.term
        self._enclave.check_binding()
