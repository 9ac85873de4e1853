"""The ledger's first entry and its signatures, proposed by the leader.

Genesis: the first node's leader proposes ``cluster.init`` (with the cluster id its enclave
chose). Afterwards the leader's enclave signs the hash chain it has applied every
``sign_every_entries`` commands, or after ``sign_interval_s`` if anything is unsigned, so
`kmctl ledger verify` can vouch for a copied ledger offline. The enclave signs only its own
head (``KMEnclave.ledger_signature`` takes no index or hash), and the state machine counts a
signature only from a member's enclave.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from consensus.types import RaftError
from kmnode.km.commands import ClusterInit, MemberRecord
from kmnode.km.enclave import EnclaveStateError

if TYPE_CHECKING:
    from kmnode.km.node import KMNode


async def initialise_ledger(node: KMNode) -> None:
    """Propose ``cluster.init`` once this (genesis) node leads; bounded to about 10 s."""
    driver = node.raft()
    for _ in range(200):
        if node.enclave.state.cluster:
            return
        if driver.is_leader:
            command = ClusterInit(
                cluster=node.config.cluster,
                cluster_id=node.enclave.cluster_id,
                policy=node.enclave.state.policy.to_dict(),
                member=MemberRecord(**node.member_record()),
                identities=list(node.config.identities),
                chaos_enabled=node.config.governance.chaos or None,
                # The nodes cluster.yaml lists at genesis are admitted; others need a proposal.
                admitted=[MemberRecord(**n.member_record()) for n in node.config.nodes],
                recovery_threshold=node.config.governance.recovery_threshold or None,
            ).encode()
            with contextlib.suppress(RaftError):
                await driver.propose(command)
                node.publish_event("cluster.genesis", cluster=node.config.cluster)
                return
        await asyncio.sleep(0.05)


async def sign_periodically(node: KMNode) -> None:
    """While this node leads, have its enclave sign the applied chain when it is due."""
    spec = node.config.ledger
    last_attempt = time.monotonic()
    while True:
        await asyncio.sleep(min(spec.sign_interval_s, 0.2))
        driver = node.raft()
        state = node.enclave.state
        unsigned = state.applied_index - state.last_signature_entry
        due = unsigned >= spec.sign_every_entries or (
            unsigned > 0 and time.monotonic() - last_attempt >= spec.sign_interval_s
        )
        if not driver.is_leader or not state.cluster or not due:
            continue
        last_attempt = time.monotonic()
        try:
            command = node.enclave.ledger_signature(time.time()).encode()
        except EnclaveStateError:
            continue  # its ledger belongs to another cluster: the node is stopping anyway
        with contextlib.suppress(RaftError):
            await driver.propose(command)
