"""A recovery holder's submission, as kmctl and the chaos nemesis make it: open the share
(or take the one given), verify every recovering member's quoted recovery key, box the share
to each, and send it to the leader, whose enclave checks it against its commitment.

What a node answers is the untrusted host's relay: the split is checked by opening the share
against its commitment, and each recovery key by its quote (vendor root, the policy in the
operator's cluster.yaml, the member's platform), so a host cannot collect a share by offering
a key of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from attest.quote import QuoteVerifier
from kmnode.client import ClusterClient, NodeClient, NodeUnreachable
from kmnode.config import ClusterConfig
from kmnode.enclave_code import current_measurements
from kmnode.errors import EXIT_REFUSED, KmsimError
from kmnode.identity import IdentityKeys
from kmnode.recovery.boxing import RecoveryKey, RecoveryKeyRefused, box_share, verify_recovery_key
from kmnode.recovery.shares import RecoveryError, RecoverySet, Share, check_share, open_share
from kmnode.simhw import HardwareStore

#: How long to wait for each node's recovery key.
KEY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Submitted:
    """The leader's answer (holder, generation, have, need, complete), the nodes the share was
    boxed to, and a line for each member left out (unreachable, or its key refused)."""

    answer: dict[str, Any]
    boxed_to: list[str]
    left_out: list[str]


def split_of(answer: Any) -> RecoverySet:
    """The split in a ``GET /v1/recovery`` answer (``KmsimError`` if it holds none)."""
    raw = answer.get("recovery_set") if isinstance(answer, dict) else None
    if raw is None:
        problem = answer.get("problem") if isinstance(answer, dict) else None
        detail = f": {problem}" if problem else ""
        raise KmsimError(f"the ledger holds no recovery split{detail}", EXIT_REFUSED)
    try:
        return RecoverySet.from_json(json.dumps(raw))
    except RecoveryError as exc:
        raise KmsimError(f"the node sent an unusable recovery split: {exc}", EXIT_REFUSED) from None


def holder_share(split: RecoverySet, holder: IdentityKeys, given: str | None = None) -> Share:
    """The holder's share: ``given`` (base64, as `recovery share show` prints it) or opened
    with its key; checked against its commitment either way (``RecoveryError`` otherwise)."""
    if given is None:
        return open_share(split, holder.name, holder.box_secret)
    share = Share.from_b64(holder.name, split.entry(holder.name).index, given.strip())
    check_share(split, holder.name, share)
    return share


def recovery_keys(
    cfg: ClusterConfig, members: list[Any], signer: IdentityKeys | None
) -> tuple[dict[str, RecoveryKey], list[str]]:
    """Every reachable member's recovery key, its quote verified; a line per member left out."""
    verifier = QuoteVerifier(HardwareStore(cfg.state_dir / "hardware").vendor_public_key())
    policy = cfg.policy.resolve(current_measurements())
    keys: dict[str, RecoveryKey] = {}
    left_out: list[str] = []
    for member in members:
        if not isinstance(member, Mapping):
            continue
        name, host, port = member.get("name"), member.get("host"), member.get("api_port")
        if not isinstance(name, str) or not isinstance(host, str) or not isinstance(port, int):
            continue
        # The platform the operator's cluster file names for the node, where it names one:
        # the member records came through a host, which could point at another platform.
        listed = {n.name: n.platform.id for n in cfg.nodes}
        platform = listed.get(name, str(member.get("platform_id")))
        node = NodeClient(name, f"http://{host}:{port}", KEY_TIMEOUT_S, signer)
        try:
            answer = node.get("/v1/recovery/key")
            keys[name] = verify_recovery_key(name, platform, answer, verifier, policy, time.time())
        except NodeUnreachable:
            left_out.append(f"{name}: not reachable at {host}:{port}")
        except KmsimError as exc:
            left_out.append(f"{name}: {exc.message}")
        except RecoveryKeyRefused as exc:
            left_out.append(str(exc))
    return keys, left_out


def submit_share(client: ClusterClient, given: str | None = None) -> Submitted:
    """Submit the share of ``client``'s signer (a recovery holder) to the recovering cluster."""
    signer = client.signer
    if signer is None:
        raise KmsimError("no identity to act as: a recovery holder's key is needed", 2)
    answer = client.get("/v1/recovery")
    split = split_of(answer)
    try:
        share = holder_share(split, signer, given)
    except RecoveryError as exc:
        raise KmsimError(f"{exc}; nothing was sent", EXIT_REFUSED) from None
    keys, left_out = recovery_keys(client.config, list(answer.get("members") or []), signer)
    if not keys:
        raise KmsimError(
            "no recovering node offered a verifiable recovery key: "
            + ("; ".join(left_out) or "no members"),
            EXIT_REFUSED,
        )
    accepted = client.post(
        "/v1/recovery/shares", {"generation": split.generation, "boxes": box_share(share, keys)}
    )
    return Submitted(dict(accepted), sorted(keys), left_out)
