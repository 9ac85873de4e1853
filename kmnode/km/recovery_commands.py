"""The disaster-recovery commands (issue 16) and their results, as typed records.

* ``recovery.shares`` (a node proposes it; the leader's KM enclave made it): a new split of the
  master secret, each share boxed to a recovery identity's X25519 key, with a commitment per
  share and one to the secret (``kmnode.recovery.shares.RecoverySet``). Due at genesis, after
  every change of the recovery identities or the threshold, and after a recovery.
* ``recovery.threshold`` (only as a passed proposal's action): how many shares rebuild it.
* ``recovery.share`` (a recovery identity signs it; the leader's enclave checked the share it
  could open against its commitment before proposing it): a holder's share, boxed to every
  recovering member's enclave recovery key, so every node rebuilds the secret inside its own
  enclave and the share outlives a change of leader. The share itself never appears in clear.

What depends on the state (is this the current split, is the signer a holder) is
``kmnode.km.recovery_state``'s to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from kmnode.km.command_base import Applied, CommandModel, EnclaveSigned, Name
from kmnode.recovery.shares import BOXED_BYTES, RecoverySet

#: The most recovery holders a split may have: the set must fit one command
#: (``MAX_COMMAND_BYTES``), about 230 bytes a holder.
MAX_RECOVERY_HOLDERS = 64
#: The most nodes one submitted share is boxed to (one box per recovering member).
MAX_SHARE_BOXES = 64
#: A share sealed to a node's recovery key, in base64 (no padding-free variants).
BoxedB64 = Annotated[
    str,
    StringConstraints(
        pattern=r"^[A-Za-z0-9+/]*={0,2}$",
        min_length=(BOXED_BYTES + 2) // 3 * 4,
        max_length=(BOXED_BYTES + 2) // 3 * 4,
    ),
]


class RecoveryShares(EnclaveSigned):
    """A new split of the master secret, made and signed by the leader's enclave (a split
    no allowed enclave of a member signed is refused: only an enclave holds the secret, and
    its code splits nothing else)."""

    op: Literal["recovery.shares"] = "recovery.shares"
    recovery_set: RecoverySet


class RecoveryThresholdSet(CommandModel):
    """How many shares rebuild the master secret; 0 means a majority of the holders."""

    op: Literal["recovery.threshold"] = "recovery.threshold"
    threshold: Annotated[int, Field(ge=0, le=MAX_RECOVERY_HOLDERS)]


class RecoveryShare(CommandModel):
    """A holder's share of split ``generation``, boxed to each recovering member's enclave."""

    op: Literal["recovery.share"] = "recovery.share"
    ROLE = "recovery"
    generation: Annotated[int, Field(ge=0, lt=1 << 63)]
    boxes: Annotated[dict[Name, BoxedB64], Field(min_length=1, max_length=MAX_SHARE_BOXES)]


@dataclass(frozen=True, slots=True)
class SharesCommitted(Applied):
    """A new split is on the ledger: who holds a share, and how many rebuild the secret."""

    generation: int
    holders: list[str]
    threshold: int


@dataclass(frozen=True, slots=True)
class ShareAccepted(Applied):
    """A holder's share was accepted; ``have`` of ``need`` so far. ``complete`` once ``need``
    shares are in: every recovering enclave rebuilds the secret from its boxes then."""

    holder: str
    generation: int
    have: int
    need: int
    complete: bool


@dataclass(frozen=True, slots=True)
class RecoveryThresholdChanged(Applied):
    threshold: int
