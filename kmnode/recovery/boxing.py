"""A holder's share on its way to the recovering nodes: boxed to each node's enclave recovery
key, after the quote that binds that key has been verified.

A node in recovery mode has no secret of its own to prove, but its KM enclave derives a
recovery key from its sealing key (only that code on that platform holds it) and quotes it,
the report data binding the node's name and the public key (``recovery_report_data``). The
holder's kmctl verifies the quote (vendor root, the policy's KM measurements, the member's
platform) before it boxes anything: a host that offers a key of its own gets no share, because
it cannot produce a quote binding that key. Each share travels boxed to every recovering
member, so each rebuilds the secret inside its own enclave and a change of leader loses none.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass

from nacl.public import PublicKey, SealedBox

from attest.errors import AttestationError
from attest.identity import EnclaveRole
from attest.policy import Policy
from attest.quote import QuoteVerifier, report_data_for
from kmnode.recovery.shares import RecoveryError, Share

#: Label of the recovery key's derivation in the enclave and of its quote's report data.
RECOVERY_KEY_LABEL = b"kmsim-recovery-key1"


class RecoveryKeyRefused(RecoveryError):
    """A node's recovery key whose quote does not verify: no share is boxed to it."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"the recovery key of {node!r} is refused: {reason}")
        self.node = node


@dataclass(frozen=True)
class RecoveryKey:
    """A recovering node's verified recovery key."""

    node: str
    platform_id: str
    key: PublicKey


def recovery_report_data(node: str, public_key: bytes) -> bytes:
    """The report data of the quote that vouches for ``node``'s recovery key."""
    return report_data_for(RECOVERY_KEY_LABEL, node.encode() + public_key)


def verify_recovery_key(
    node: str,
    platform_id: str,
    answer: Mapping[str, object],
    verifier: QuoteVerifier,
    policy: Policy,
    now: float,
) -> RecoveryKey:
    """Check a node's ``GET /v1/recovery/key`` answer: the quote is a KM enclave's the policy
    allows, on the member's platform (``platform_id``, from the ledger's member record), and it
    binds this node's name and this key."""
    box_key, quote = answer.get("box_key"), answer.get("quote")
    if not isinstance(box_key, str) or not isinstance(quote, str):
        raise RecoveryKeyRefused(node, "the answer has no box_key and quote")
    try:
        raw, quote_bytes = bytes.fromhex(box_key), bytes.fromhex(quote)
    except ValueError:
        raise RecoveryKeyRefused(node, "box_key or quote is not hex") from None
    if len(raw) != 32 or raw == bytes(32):
        raise RecoveryKeyRefused(node, "box_key is not an X25519 public key")
    try:
        verified = verifier.verify(
            quote_bytes,
            policy,
            recovery_report_data(node, raw),
            role=EnclaveRole.KM,
            now=now,
        )
    except AttestationError as exc:
        raise RecoveryKeyRefused(node, f"{type(exc).__name__}: {exc}") from None
    if verified.platform_id != platform_id:
        raise RecoveryKeyRefused(
            node, f"quoted on platform {verified.platform_id!r}, the member is on {platform_id!r}"
        )
    return RecoveryKey(node, platform_id, PublicKey(raw))


def box_share(share: Share, keys: Mapping[str, RecoveryKey]) -> dict[str, str]:
    """The share sealed to each node's verified recovery key (node -> base64)."""
    return {
        node: base64.b64encode(SealedBox(key.key).encrypt(share.value)).decode("ascii")
        for node, key in keys.items()
    }
