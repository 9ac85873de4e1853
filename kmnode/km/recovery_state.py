"""The replicated recovery records: the current split of the master secret, the threshold,
and the shares submitted in a recovery. Pure and deterministic, like the rest of ``KMState``.

Whether a new split is due is decided here, from the committed identities alone (holders are
the identities with the ``recovery`` role, with the X25519 keys the ledger holds for them), so
every node agrees on it and a leader change cannot lose it: the new leader sees the same
``due`` and makes the split. A split the state did not ask for (another generation, other
holders or keys, another threshold, a secret other than the one committed before) is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kmnode.identity import PublicIdentity
from kmnode.km.command_base import Applied, CommandRefused, canonical
from kmnode.km.ledger_proof import split_message
from kmnode.km.recovery_commands import (
    MAX_RECOVERY_HOLDERS,
    RecoveryShare,
    RecoveryShares,
    RecoveryThresholdChanged,
    RecoveryThresholdSet,
    ShareAccepted,
    SharesCommitted,
)
from kmnode.recovery.shares import RecoveryHolder, RecoverySet


def canonical_split(split: RecoverySet) -> bytes:
    """The bytes a split's signature is over: its canonical JSON."""
    return canonical(split.model_dump(mode="json"))


if TYPE_CHECKING:
    from kmnode.km.state import KMState


@dataclass(frozen=True)
class SplitDue:
    """What the next split must be: its holders (sorted by name), threshold and generation."""

    holders: tuple[RecoveryHolder, ...]
    threshold: int
    generation: int


def holders_of(identities: Mapping[str, PublicIdentity]) -> tuple[RecoveryHolder, ...]:
    """The recovery holders the identities name, sorted by name."""
    return tuple(
        RecoveryHolder(i.name, i.box_key)
        for i in sorted(identities.values(), key=lambda i: i.name)
        if "recovery" in i.roles
    )


@dataclass(frozen=True)
class Submission:
    index: int
    boxes: dict[str, str]


@dataclass
class RecoveryState:
    #: Shares that rebuild the secret, as governance set it (0: a majority of the holders).
    threshold: int = 0
    #: The current split, and the commitment to the master secret every split must carry.
    current: RecoverySet | None = None
    #: The holders and X25519 keys the current split was boxed to (a key changed by
    #: governance makes a new split due).
    boxed_to: tuple[RecoveryHolder, ...] = ()
    master_commitment: str = ""
    #: Holders whose share of the current split was accepted: the index it was at and the
    #: share boxed to each recovering node's enclave (node -> base64). Kept in the state, not
    #: only in the log, so a snapshot taken during a recovery loses no share.
    submitted: dict[str, Submission] = field(default_factory=dict)
    #: The index at which the threshold was reached (0: no recovery completed on this split);
    #: a fresh split is due after it.
    complete_index: int = 0

    # --- what is due ------------------------------------------------------------------------

    def threshold_for(self, holders: int) -> int:
        return self.threshold or holders // 2 + 1

    def problem(self, identities: Mapping[str, PublicIdentity]) -> str:
        """Why no split can be made now ("" when one can)."""
        holders = holders_of(identities)
        if not holders:
            return (
                "no identity has the recovery role: if every node loses its sealed state, "
                "the keys are lost"
            )
        if len(holders) > MAX_RECOVERY_HOLDERS:
            return f"{len(holders)} recovery holders, at most {MAX_RECOVERY_HOLDERS} are supported"
        if self.threshold > len(holders):
            return f"the threshold {self.threshold} exceeds the {len(holders)} recovery holders"
        return ""

    def due(self, identities: Mapping[str, PublicIdentity]) -> SplitDue | None:
        """The split the ledger needs now, or None if the current one is right."""
        if self.problem(identities):
            return None
        holders = holders_of(identities)
        threshold = self.threshold_for(len(holders))
        current = self.current
        if (
            current is not None
            and not self.complete_index
            and self.boxed_to == holders
            and current.threshold == threshold
        ):
            return None
        generation = current.generation + 1 if current is not None else 1
        return SplitDue(holders, threshold, generation)

    # --- applying ---------------------------------------------------------------------------

    def commit(self, index: int, cmd: RecoveryShares, state: KMState) -> SharesCommitted:
        state._require_init()
        split = cmd.recovery_set
        due = self.due(state.identities)
        if due is None:
            raise CommandRefused(
                self.problem(state.identities) or "the recovery split on the ledger is current"
            )
        if split.cluster_id != state.cluster_id:
            raise CommandRefused("the recovery split names another cluster")
        if split.generation != due.generation:
            raise CommandRefused(
                f"recovery split generation {split.generation}, the ledger expects {due.generation}"
            )
        if split.threshold != due.threshold:
            raise CommandRefused(
                f"recovery split threshold {split.threshold}, the ledger expects {due.threshold}"
            )
        names = tuple(s.name for s in split.shares)
        if names != tuple(h.name for h in due.holders):
            raise CommandRefused("the recovery split's holders are not the recovery identities")
        if self.master_commitment and split.master_commitment != self.master_commitment:
            raise CommandRefused("the recovery split is of another secret than the ledger's")
        # Only an enclave holds the secret, and its code splits nothing else: a split no
        # allowed member enclave signed (one a host put together around the ledger's
        # commitment, or a first split of a secret of its choosing) is refused.
        state.check_enclave_proof(cmd, split_message(canonical_split(split)), "recovery split")
        # The boxes' keys cannot be checked here (a sealed box does not name its recipient);
        # each holder checks its own with `kmctl recovery share show`, which opens it and
        # compares it with its commitment.
        self.current = split
        self.boxed_to = due.holders
        self.master_commitment = split.master_commitment
        self.submitted = {}
        self.complete_index = 0
        return SharesCommitted(split.generation, list(names), split.threshold)

    def submit(self, index: int, cmd: RecoveryShare, state: KMState) -> ShareAccepted:
        state._require_init()
        if cmd.auth is None:
            raise CommandRefused("recovery.share needs a signed request", "forbidden")
        holder = cmd.auth.by
        current = self.current
        if current is None:
            raise CommandRefused("the ledger holds no recovery split")
        if cmd.generation != current.generation:
            raise CommandRefused(
                f"a share of split {cmd.generation}; the ledger's split is {current.generation}"
            )
        if holder not in {s.name for s in current.shares}:
            raise CommandRefused(f"{holder!r} holds no share of split {current.generation}")
        if self.complete_index:
            raise CommandRefused(
                f"split {current.generation} has already rebuilt the secret "
                f"(at index {self.complete_index})"
            )
        if holder in self.submitted:
            raise CommandRefused(f"{holder!r} already submitted its share", "replay")
        self.submitted[holder] = Submission(index, dict(cmd.boxes))
        have, need = len(self.submitted), current.threshold
        if have >= need:
            self.complete_index = index
        return ShareAccepted(holder, current.generation, have, need, have >= need)

    def set_threshold(self, index: int, cmd: RecoveryThresholdSet, state: KMState) -> Applied:
        holders = len(holders_of(state.identities))
        if cmd.threshold > holders:
            raise CommandRefused(
                f"threshold {cmd.threshold} exceeds the {holders} recovery holders"
            )
        self.threshold = cmd.threshold
        return RecoveryThresholdChanged(cmd.threshold)

    # --- views and snapshots ----------------------------------------------------------------

    def view(self, identities: Mapping[str, PublicIdentity]) -> dict[str, Any]:
        """What ``GET /v1/recovery`` shows of the ledger's side (all of it public)."""
        current = self.current
        return {
            "threshold_setting": self.threshold,
            "generation": current.generation if current else None,
            "threshold": current.threshold if current else None,
            "holders": [s.name for s in current.shares] if current else [],
            "submitted": sorted(self.submitted),
            "complete_index": self.complete_index or None,
            "split_due": self.due(identities) is not None,
            "problem": self.problem(identities) or None,
            "recovery_set": json.loads(current.to_json()) if current else None,
        }

    def capture(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "current": self.current.to_json() if self.current else None,
            "boxed_to": [list(h) for h in self.boxed_to],
            "master_commitment": self.master_commitment,
            "submitted": {n: asdict(s) for n, s in self.submitted.items()},
            "complete_index": self.complete_index,
        }

    @classmethod
    def from_json(cls, raw: Any) -> RecoveryState:
        if not isinstance(raw, dict):
            return cls()
        current = raw.get("current")
        return cls(
            threshold=int(raw.get("threshold", 0)),
            current=RecoverySet.from_json(current) if current else None,
            boxed_to=tuple(RecoveryHolder(str(n), str(k)) for n, k in raw.get("boxed_to", [])),
            master_commitment=str(raw.get("master_commitment", "")),
            submitted={n: Submission(**s) for n, s in raw.get("submitted", {}).items()},
            complete_index=int(raw.get("complete_index", 0)),
        )
