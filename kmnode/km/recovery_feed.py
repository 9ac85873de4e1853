"""The node's side of recovery: keep the ledger's split of the master secret current, and in
recovery mode, take the secret up once the ledger holds enough shares.

* While this node leads and holds the secret, whenever the replicated state says a split is
  due (``RecoveryState.due``: genesis, a change of recovery identities, keys or threshold, or a
  completed recovery), its enclave makes one and the node proposes it. The state decides, so a
  new leader picks up a split its predecessor did not finish.
* A node started in recovery mode (its sealed state lost; the operator asked for recovery)
  replays the ledger without the secret. When an applied share completes the threshold, or a
  restored snapshot or a restart shows it complete, the enclave rebuilds the secret from the
  boxes addressed to it; the node seals it and leaves recovery mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from consensus.types import RaftError
from kmnode.datadir import RECOVER_MARKER, RECOVERY_SESSION
from kmnode.km.command_base import Applied, Refused
from kmnode.km.enclave import EnclaveStateError
from kmnode.km.recovery_commands import ShareAccepted, SharesCommitted
from kmnode.recovery.shares import RecoveryError

if TYPE_CHECKING:
    from kmnode.km.node import KMNode

log = logging.getLogger(__name__)

#: How often a leader looks whether a split is due (an apply wakes it sooner).
CHECK_INTERVAL_S = 0.5
#: The longest wait after a refused split before the next attempt.
MAX_BACKOFF_S = 30.0


class RecoveryFeed:
    def __init__(self, node: KMNode) -> None:
        self.node = node
        self._wake = asyncio.Event()
        #: Why this enclave could not rebuild the secret from the shares ("" if it could or
        #: has not tried).
        self.error = ""
        #: Set once a recovering node holds the secret again (work that needs it waits).
        self.opened = asyncio.Event()

    @property
    def recovering(self) -> bool:
        """Started in recovery mode and still without the master secret: the node serves only
        status and recovery routes."""
        return self.node.mode == "recover" and not self.node.enclave.has_master_secret

    def on_apply(self, result: Applied) -> None:
        if isinstance(result, ShareAccepted):
            self.node.publish_event(
                "recovery.share_accepted",
                holder=result.holder,
                generation=result.generation,
                have=result.have,
                need=result.need,
            )
        elif isinstance(result, SharesCommitted):
            self.error = ""  # a new split: what an earlier ceremony could not do is moot
        if isinstance(result, SharesCommitted) and self._is_leader():
            self.node.publish_event(
                "recovery.shares_issued",
                generation=result.generation,
                holders=result.holders,
                threshold=result.threshold,
            )
        self.try_recover()
        self._wake.set()

    def try_recover(self) -> None:
        """Take the secret up if this node is recovering and the ledger holds enough shares."""
        node = self.node
        if not self.recovering or not node.enclave.state.recovery.complete_index:
            return
        outcome = node.enclave.recover()
        if outcome:
            if outcome != self.error:
                log.error("%s: cannot rebuild the master secret: %s", node.name, outcome)
                node.publish_event("recovery.failed", reason=outcome)
            self.error = outcome
            return
        self.error = ""
        self.opened.set()
        node.store_sealed_state()
        for done in (RECOVER_MARKER, RECOVERY_SESSION):
            with contextlib.suppress(OSError):
                node.node_disk.delete(done)
        log.info("%s: master secret rebuilt from recovery shares; the node is open", node.name)
        node.publish_event("recovery.opened", node=node.name)
        node.transport.revalidate()  # join connections are served again now
        node.contracts.wake()  # the operations committed before the loss run now

    def _is_leader(self) -> bool:
        driver = self.node.driver
        return driver is not None and driver.is_leader

    async def run(self) -> None:
        """While leading with the secret, propose the split the state says is due."""
        node = self.node
        backoff = CHECK_INTERVAL_S
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CHECK_INTERVAL_S)
            self._wake.clear()
            enclave = node.enclave
            state = enclave.state
            if not state.cluster or not enclave.has_master_secret or not self._is_leader():
                continue
            if state.recovery.due(state.identities) is None:
                continue
            try:
                command = enclave.recovery_split(time.time())
                result = await node.propose(command.encode())
            except (EnclaveStateError, RecoveryError) as exc:
                result = Refused(str(exc))
            except RaftError:
                continue  # leadership moved: whoever leads now sees the same due split
            if isinstance(result, Refused):
                # Should not happen (the state said it was due); never a proposal a tick.
                log.warning("%s: recovery split refused: %s", node.name, result.error)
                node.publish_event("recovery.split_refused", reason=result.error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            else:
                backoff = CHECK_INTERVAL_S
