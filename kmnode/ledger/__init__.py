"""Offline verification of a node's ledger (its Raft log), for `kmctl ledger verify` and `mark`.

The host stores the ledger and could rewrite it, checksums and all, or put back an older copy.
What it cannot forge is a signature of a member's KM enclave: the leader's enclave signs its own
(applied index, chain hash) every so often, where the chain hash folds every command up to that
index, and it signs every snapshot it writes (index, term, chain hash, digest of the image); its
signing key is bound to it by a quote. So a verifier that trusts only the vendor root:

* starts from the snapshot only if a member's enclave signed exactly that image (otherwise the
  snapshot is named fabricated: its state would be the verifier's whole premise);
* replays the commands, recomputes the chain, and counts a ``ledger.sign`` entry only if its
  quote is genuine, its signer's platform hosts a member at that point of the ledger and the
  policy of that point allows it, and it signs the chain recomputed here (evidence that is not
  genuine, or a chain that differs, is a failure; a genuine signature of a non-member is just
  not counted);
* refuses an unsigned tail (commands no member signed yet) unless the caller allows it;
* compares with another node's signed high-water mark (``LedgerMark``: the highest (index,
  chain hash) a member signed there), which catches what signatures alone cannot: a ledger cut
  short, or an older copy put back, is still a genuine prefix of the history.

Works on a copy of the log directory, so verifying never modifies the node's files.
"""

from kmnode.ledger.mark import MARK_FORMAT, LedgerMark
from kmnode.ledger.replay import Replay, committed_commands, read_ledger, replay_ledger
from kmnode.ledger.report import LedgerError, LedgerReport
from kmnode.ledger.verify import (
    compare_with_mark,
    first_difference,
    judge_tail,
    ledger_mark,
    node_mark,
    verify_ledger,
    verify_node,
)

__all__ = [
    "MARK_FORMAT",
    "LedgerError",
    "LedgerMark",
    "LedgerReport",
    "Replay",
    "committed_commands",
    "compare_with_mark",
    "first_difference",
    "judge_tail",
    "ledger_mark",
    "node_mark",
    "read_ledger",
    "replay_ledger",
    "verify_ledger",
    "verify_node",
]
