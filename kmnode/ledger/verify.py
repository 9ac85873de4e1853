"""The verdicts: a ledger verified on its own (and its unsigned tail judged), compared with a
signed mark, or located against other nodes' ledgers; and a ledger's own mark."""

from __future__ import annotations

from pathlib import Path

from attest.quote import QuoteVerifier
from consensus.storage import StorageError
from consensus.types import PersistedState
from kmnode.errors import EXIT_REFUSED
from kmnode.ledger.mark import LedgerMark
from kmnode.ledger.replay import Replay, committed_commands, read_ledger, replay_ledger
from kmnode.ledger.report import LedgerError, LedgerReport


def verify_ledger(
    persisted: PersistedState,
    vendor_root: bytes,
    *,
    against: LedgerMark | None = None,
    allow_unsigned_tail: bool = False,
    trusted_km: frozenset[bytes] | None = None,
) -> LedgerReport:
    """Verify a ledger, and compare it with ``against`` (another ledger's signed mark, which
    must be genuine itself); commands after the last member's signature fail it unless
    allowed. A snapshot it starts from must be signed by a ``trusted_km`` measurement (if
    given; see ``replay._start``)."""
    return _verify(persisted, vendor_root, against, allow_unsigned_tail, trusted_km).report


def _verify(
    persisted: PersistedState,
    vendor_root: bytes,
    against: LedgerMark | None,
    allow_unsigned_tail: bool,
    trusted_km: frozenset[bytes] | None = None,
) -> Replay:
    replay = replay_ledger(persisted, vendor_root, trusted_km)
    if against is not None and replay.report.ok:
        against.check(QuoteVerifier(vendor_root))
        compare_with_mark(replay, against)
    judge_tail(replay.report, allow_unsigned_tail)
    return replay


def judge_tail(report: LedgerReport, allowed: bool) -> None:
    """An unsigned tail is what no enclave vouches for yet: the commands since the last
    signature interval, or commands a host appended. Only the caller can say which is fine."""
    if not report.unsigned_tail:
        return
    what = (
        f"{report.unsigned_tail} command(s) after index {report.last_signed_index} are covered "
        "by no member's signature"
    )
    if allowed:
        report.notes.append(f"{what} (allowed)")
    else:
        report.fail(
            f"{what}: pass --allow-unsigned-tail to accept the entries since the last "
            "signature interval"
        )


def compare_with_mark(replay: Replay, mark: LedgerMark) -> None:
    """Fail the report if this ledger ends before ``mark`` (truncated, or an older copy put
    back) or holds another chain at the mark's index (rolled back and rewritten, or forked)."""
    report, source = replay.report, mark.source or "the other ledger"
    if mark.index > replay.end:
        report.fail(
            f"truncated or rolled back: this ledger ends at index {replay.end}, before index "
            f"{mark.index}, which {source} holds signed by a member's enclave",
            replay.end + 1,
        )
        return
    ours = replay.chain_at(mark.index)
    if ours is None:
        report.notes.append(
            f"{source}'s mark (index {mark.index}) precedes this ledger's snapshot: not compared"
        )
    elif ours != mark.chain_hash:
        report.fail(
            f"rolled back or forked: at index {mark.index} this ledger's chain differs from the "
            f"one {source} holds signed by a member's enclave",
            mark.index,
        )
        replay.diverged = True
    else:
        report.notes.append(f"agrees with {source}'s signed mark at index {mark.index}")


def first_difference(ours: PersistedState, reference: PersistedState) -> int | None:
    """The first committed index where two ledgers hold different commands (None: agree)."""
    theirs = {e.index: e.data for e in committed_commands(reference)}
    for entry in committed_commands(ours):
        other = theirs.get(entry.index)
        if other is not None and other != entry.data:
            return entry.index
    return None


def _read(raft_dir: Path) -> PersistedState:
    try:
        return read_ledger(raft_dir)
    except StorageError as exc:
        raise LedgerError(f"the log itself is damaged: {exc}", EXIT_REFUSED) from None


def ledger_mark(persisted: PersistedState, vendor_root: bytes, source: str) -> LedgerMark:
    """The signed high-water mark of a ledger, which must verify (its unsigned tail aside:
    the mark is only what members signed)."""
    replay = replay_ledger(persisted, vendor_root)
    if not replay.report.ok:
        raise LedgerError(
            f"{source}'s ledger does not verify: {replay.report.problem}", EXIT_REFUSED
        )
    if replay.mark is None:
        raise LedgerError(f"{source}'s ledger holds no member's signature yet", EXIT_REFUSED)
    mark = replay.mark
    return LedgerMark(mark.index, mark.chain_hash, mark.proof, source)


def node_mark(raft_dir: Path, vendor_root: bytes, source: str) -> LedgerMark:
    """``ledger_mark`` of a node's raft directory."""
    return ledger_mark(_read(raft_dir), vendor_root, source)


def verify_node(
    raft_dir: Path,
    vendor_root: bytes,
    references: list[Path] | None = None,
    *,
    against: LedgerMark | None = None,
    allow_unsigned_tail: bool = False,
    trusted_km: frozenset[bytes] | None = None,
) -> LedgerReport:
    """Verify one node's ledger, and compare it with ``against`` (another ledger's signed
    mark, checked first). On a chain mismatch, name the first bad entry by comparing with
    ``references`` (other nodes' raft directories, which must verify themselves)."""
    try:
        persisted = _read(raft_dir)
    except LedgerError as exc:
        report = LedgerReport()
        report.fail(exc.message)
        return report
    replay = _verify(persisted, vendor_root, against, allow_unsigned_tail, trusted_km)
    report = replay.report
    if replay.diverged:
        for reference in references or []:
            try:
                other = read_ledger(reference)
            except StorageError:
                continue
            if not replay_ledger(other, vendor_root).report.ok:
                continue
            index = first_difference(persisted, other)
            if index is not None:
                report.first_bad_index = index
                report.notes.append(f"first difference from {reference.parent.name}'s ledger")
                break
    return report
