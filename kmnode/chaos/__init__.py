"""Chaos testing: the recorded operation history and the checker that judges it.

``history`` records what clients asked and what they were told (Jepsen style: one ``invoke``
and exactly one ``ok``/``fail``/``info`` per operation, plus nemesis fault events);
``checker`` decides, from that history and the state every node holds after healing, whether
the cluster kept its promises. Both are pure data and functions so they can be tested
exhaustively without processes or a network; the nemesis and the runner build on them.
"""

from kmnode.chaos.checker import (
    CheckOutcome,
    CheckResult,
    FinalState,
    NodeState,
    PlaintextHit,
    ReleaseRecord,
    Violation,
    check,
    check_allowed_measurement,
    check_identical_keys,
    check_linearizable,
    check_no_lost_ops,
    check_plaintext,
    check_recovery,
    check_release_committed,
    scan_plaintext,
)
from kmnode.chaos.history import (
    FaultEvent,
    History,
    HistoryError,
    HistoryRecorder,
    Operation,
    OpEvent,
    OpHandle,
)

__all__ = [
    "CheckOutcome",
    "CheckResult",
    "FaultEvent",
    "FinalState",
    "History",
    "HistoryError",
    "HistoryRecorder",
    "NodeState",
    "OpEvent",
    "OpHandle",
    "OpKind",
    "Operation",
    "PlaintextHit",
    "ReleaseRecord",
    "Violation",
    "check",
    "check_allowed_measurement",
    "check_identical_keys",
    "check_linearizable",
    "check_no_lost_ops",
    "check_plaintext",
    "check_recovery",
    "check_release_committed",
    "scan_plaintext",
]
