"""Repairing a replaced node's contract state, as an operator does after replacing a member.

A member replaced with an empty data directory (``faults.replace``) catches up on the Raft
log, but not necessarily on contract state: once two checkpoints are committed, the
operations before the older one are no longer kept, so its service enclave cannot rebuild the
state from nothing; it stops and asks for a resync. The operator's procedure is `kmctl
contracts resync NODE` (``kmnode.cli.contracts_cmds``): copy a peer's kept copy of a
committed checkpoint into the node's store, then have its service enclave restore from it
(the enclave takes the copy only if its roots equal the committed checkpoint, so a peer can
offer nothing else). The nemesis heals a replacement the same way, through the same routes,
so a run with contracts judges the replaced node like any other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kmnode.chaos.contract_evidence import NodeContracts
from kmnode.client import NodeClient
from kmnode.config import ClusterConfig
from kmnode.errors import EXIT_FAILURE, KmsimError
from kmnode.identity import IdentityKeys

_POLL = 0.2
#: Seconds a restored node may take to execute again and catch up (as `kmctl` waits).
RESYNC_WAIT = 10.0
_VIEW = "/v1/node/contracts"
_COPY = "/v1/node/contracts/store/checkpoint"


def wait_view(
    client: NodeClient, timeout: float, until: Callable[[NodeContracts], bool]
) -> NodeContracts:
    """The node's contract view once ``until`` holds of it, or as it is after ``timeout``
    seconds."""
    deadline = time.monotonic() + timeout
    view = NodeContracts.from_api(client.get(_VIEW))
    for _ in range(int(timeout / _POLL) + 1):
        if until(view) or time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
        view = NodeContracts.from_api(client.get(_VIEW))
    return view


def resync(
    cfg: ClusterConfig,
    node: str,
    signer: IdentityKeys | None,
    timeout: float,
    source: str | None = None,
) -> dict[str, Any]:
    """Copy the newest committed checkpoint a peer (``source``, or any other node) keeps into
    ``node``'s store and restore from it; returns what was done (``records`` copied, the
    node's ``position``) and whether the node is still halted. ``KmsimError`` if no peer
    keeps a copy of a committed checkpoint. `kmctl contracts resync` is this."""
    target = NodeClient.for_node(cfg.node(node), 10.0, signer)
    committed = NodeContracts.from_api(target.get(_VIEW)).committed_roots
    last = "no committed checkpoint yet"
    peers = [source] if source else [n.name for n in cfg.nodes if n.name != node]
    for peer in peers:
        holder = NodeClient.for_node(cfg.node(peer), 10.0, signer)
        for seq in sorted(committed, reverse=True):
            try:
                copied = holder.get(_COPY, {"seq": str(seq)})
            except KmsimError as exc:
                last = exc.message
                continue
            target.request("PUT", _COPY, body=copied)
            target.post("/v1/node/contracts/resync")
            view = wait_view(target, min(timeout, RESYNC_WAIT), _running)
            return {
                "copied_from": peer,
                "seq": seq,
                "records": len(copied.get("records", [])),
                "position": view.position,
                "halted": view.halted,
            }
    raise KmsimError(f"no peer keeps a committed checkpoint to copy ({last})", EXIT_FAILURE)


def repair_if_halted(
    cfg: ClusterConfig, node: str, signer: IdentityKeys | None, timeout: float
) -> dict[str, Any]:
    """Resync ``node`` if, once its service enclave started on contract state, it stopped
    executing; {} if it did not (it executes, or there is nothing to execute)."""
    client = NodeClient.for_node(cfg.node(node), 10.0, signer)
    if not wait_view(client, timeout, _started).halted:
        return {}
    return resync(cfg, node, signer, timeout)


def _running(view: NodeContracts) -> bool:
    return view.settled and not view.halted


def _started(view: NodeContracts) -> bool:
    """Restored (or not): halted, or executing (a fresh node that could restore executes at
    once; waiting for it to catch up with calls still coming in could take long)."""
    return view.settled or (not view.error and view.position > 0)


__all__ = ["repair_if_halted", "resync", "wait_view"]
