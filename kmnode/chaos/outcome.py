"""What a check concludes: valid or not, and the first broken promise with the operation that
exposes it. Shared by every check module (checker, linearizable, plaintext)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from kmnode.chaos.history import Operation


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken promise; ``op`` is the operation that exposes it, if any."""

    message: str
    op: Operation | None = None
    node: str | None = None

    @property
    def order(self) -> float:
        """History position of the exposing op; final-state-only violations sort last. Ties
        keep the order the check found them in (sorting is stable)."""
        return math.inf if self.op is None else self.op.position


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    valid: bool
    detail: str
    first_violation: Violation | None = None
    violations: int = 0
    #: The check's headline number, where it has one (the slowest recovery, in seconds).
    figure: float | None = None

    @classmethod
    def judge(cls, violations: Iterable[Violation], passed: str) -> CheckOutcome:
        found = sorted(violations, key=lambda v: v.order)
        if not found:
            return cls(True, passed)
        first = found[0]
        where = f" ({first.op.describe()})" if first.op else ""
        more = f" [+{len(found) - 1} more]" if len(found) > 1 else ""
        return cls(False, f"{first.message}{where}{more}", first, len(found))
