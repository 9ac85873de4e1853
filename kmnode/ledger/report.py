"""What a ledger check reports, and the error it raises for input it cannot use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kmnode.errors import KmsimError


class LedgerError(KmsimError):
    """A ledger or a mark cannot be used (exit code 1: a check refused; 2: unreadable input)."""


@dataclass
class LedgerReport:
    ok: bool = True
    problem: str | None = None
    #: Index of the first entry known to be bad (exact), if one could be named.
    first_bad_index: int | None = None
    #: When only a range is known: the bad entry is in (after, through].
    bad_range: tuple[int, int] | None = None
    commands: int = 0
    first_index: int = 0
    last_index: int = 0
    #: The last committed index the ledger holds (Raft's own entries included).
    end_index: int = 0
    signatures: int = 0
    #: Genuine signatures not counted (their enclave was no member, or not allowed, then).
    uncounted_signatures: int = 0
    last_signed_index: int = 0
    unsigned_tail: int = 0
    #: Index of the snapshot the ledger starts from (0: none), verified by its signature.
    snapshot_index: int = 0
    #: The highest index a member's ``ledger.sign`` covers here (what `ledger mark` writes).
    mark_index: int = 0
    notes: list[str] = field(default_factory=list)

    def fail(self, problem: str, index: int | None = None) -> None:
        if self.ok:
            self.ok, self.problem, self.first_bad_index = False, problem, index

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problem": self.problem,
            "first_bad_index": self.first_bad_index,
            "bad_range": list(self.bad_range) if self.bad_range else None,
            "commands": self.commands,
            "first_index": self.first_index,
            "last_index": self.last_index,
            "end_index": self.end_index,
            "signatures": self.signatures,
            "uncounted_signatures": self.uncounted_signatures,
            "last_signed_index": self.last_signed_index,
            "unsigned_tail": self.unsigned_tail,
            "snapshot_index": self.snapshot_index,
            "mark_index": self.mark_index,
            "notes": self.notes,
        }
