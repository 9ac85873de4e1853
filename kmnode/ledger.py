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

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attest.certs import TcbStatus
from attest.errors import AttestationError
from attest.identity import EnclaveRole
from attest.policy import Policy
from attest.quote import Quote, QuoteVerifier, report_data_for
from consensus.storage import DurableLog, StorageError
from consensus.types import Entry, EntryType, PersistedState, Snapshot
from kmnode.errors import EXIT_REFUSED, EXIT_USAGE, KmsimError
from kmnode.km.ledger_proof import (
    SIGNER_LABEL,
    Proof,
    SignedSnapshot,
    head_message,
    signature_holds,
)
from kmnode.km.state import KMState

MARK_FORMAT = "kmsim-ledger-mark/1"


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


@dataclass(frozen=True)
class LedgerMark:
    """A signed high-water mark: the highest (index, chain hash) a member's enclave signed in
    some ledger, with the evidence (key, quote, signature), so it can be checked on its own."""

    index: int
    chain_hash: bytes
    proof: Proof
    #: Where it came from (a node's name, a file), for messages.
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MARK_FORMAT,
            "source": self.source,
            "index": self.index,
            "chain_hash": self.chain_hash.hex(),
            "public_key": self.proof.public_key.hex(),
            "quote": self.proof.quote.hex(),
            "signature": self.proof.signature.hex(),
        }

    @classmethod
    def from_json(cls, data: object, source: str) -> LedgerMark:
        """A mark from its JSON; ``LedgerError`` (usage) if it is not one."""
        try:
            if not isinstance(data, dict) or data.get("format") != MARK_FORMAT:
                raise ValueError(f"not a {MARK_FORMAT} document")
            index = data["index"]
            if not isinstance(index, int) or isinstance(index, bool) or index < 1:
                raise ValueError("index must be a positive integer")
            return cls(
                index=index,
                chain_hash=bytes.fromhex(data["chain_hash"]),
                proof=Proof(
                    bytes.fromhex(data["public_key"]),
                    bytes.fromhex(data["quote"]),
                    bytes.fromhex(data["signature"]),
                ),
                source=source,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{source} is not a ledger mark: {exc}", EXIT_USAGE) from None

    @classmethod
    def load(cls, path: Path) -> LedgerMark:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LedgerError(f"cannot read the mark {path}: {exc}", EXIT_USAGE) from None
        return cls.from_json(data, str(path))

    def check(self, verifier: QuoteVerifier) -> None:
        """Refuse (``LedgerError``) a mark whose evidence is not genuine: a quote under the
        vendor root binding the key that signed this (index, chain hash). Whether its signer
        was a member was judged when the mark was taken, from the ledger it came from."""
        why = _not_genuine(self.proof, head_message(self.index, self.chain_hash), verifier)
        if why is not None:
            raise LedgerError(f"the mark from {self.source} is not genuine: {why}", EXIT_REFUSED)


@dataclass
class Replay:
    """A ledger replayed: its report, the chain hash after every applied index, and its mark."""

    report: LedgerReport
    chains: dict[int, bytes] = field(default_factory=dict)
    mark: LedgerMark | None = None
    #: The last committed index the ledger holds (its end), and the first index whose chain
    #: is known (the snapshot's, or 0).
    end: int = 0
    start: int = 0
    #: The chain here differs from a signed one (a signature's, or a mark's): worth naming
    #: the first entry that differs from another node's ledger.
    diverged: bool = False

    def chain_at(self, index: int) -> bytes | None:
        """The chain hash after ``index`` (None before the first known one)."""
        known = [i for i in self.chains if i <= index]
        return self.chains[max(known)] if known else None


def read_ledger(raft_dir: Path) -> PersistedState:
    """Replay a copy of ``raft_dir`` (a torn tail is cut from the copy only)."""
    with tempfile.TemporaryDirectory(prefix="kmsim-ledger-") as temp:
        copy = Path(temp) / "raft"
        shutil.copytree(raft_dir, copy)
        log = DurableLog.open(copy, fsync=False)
        try:
            return log.initial_state
        finally:
            log.close()


def committed_commands(persisted: PersistedState) -> list[Entry]:
    commit = persisted.hard_state.commit
    return [e for e in persisted.entries if e.type == EntryType.NORMAL and e.index <= commit]


def _command(entry: Entry) -> dict[str, Any] | None:
    try:
        value = json.loads(entry.data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _not_genuine(proof: Proof, message: bytes, verifier: QuoteVerifier) -> str | None:
    """None if ``proof`` is a genuine enclave's signature over ``message``, else why not: the
    quote is certified under the vendor root and binds the key, and the key signed it. Who
    the enclave is (measurement, platform) is the caller's to judge."""
    try:
        body = Quote.decode(proof.quote).body
        any_enclave = Policy(
            km_measurements=frozenset({body.identity.measurement}),
            accepted_tcb=frozenset(TcbStatus),
        )
        verifier.verify(
            proof.quote,
            any_enclave,
            report_data_for(SIGNER_LABEL, proof.public_key),
            role=EnclaveRole.KM,
            now=body.timestamp_ms / 1000.0,
        )
    except AttestationError as exc:
        return f"signer's quote refused: {type(exc).__name__}: {exc}"
    if not signature_holds(proof.public_key, message, proof.signature):
        return "signature does not verify under the attested signing key"
    return None


def _not_counted(proof: Proof, state: KMState, verifier: QuoteVerifier) -> str | None:
    """None if a genuine signer was a member's enclave that ``state``'s policy allows."""
    body = Quote.decode(proof.quote).body
    try:
        verifier.verify(
            proof.quote,
            state.policy,
            report_data_for(SIGNER_LABEL, proof.public_key),
            role=EnclaveRole.KM,
            now=body.timestamp_ms / 1000.0,
        )
    except AttestationError as exc:
        return f"the policy then refused its enclave ({type(exc).__name__}: {exc})"
    if not any(m.platform_id == body.platform_id for m in state.members.values()):
        return f"platform {body.platform_id!r} hosted no member then"
    return None


def _start(snapshot: Snapshot, verifier: QuoteVerifier, replay: Replay) -> KMState | None:
    """The state the ledger starts from: empty, or a snapshot's image if a member's enclave
    signed exactly it (None, with the report failed, otherwise)."""
    report = replay.report
    if snapshot.is_empty:
        return KMState()
    where = f"the snapshot at index {snapshot.meta.index}"
    report.snapshot_index = snapshot.meta.index
    try:
        signed = SignedSnapshot.decode(snapshot.data)
    except ValueError as exc:
        report.fail(f"{where} is fabricated or damaged: {exc}", snapshot.meta.index)
        return None
    if signed is None:
        report.fail(f"{where} is fabricated: no enclave signed it", snapshot.meta.index)
        return None
    why = _not_genuine(signed.proof, signed.message(), verifier)
    if why is None and (snapshot.meta.index, snapshot.meta.term) < (signed.index, signed.term):
        why = f"it is labelled index {snapshot.meta.index}, its signature covers {signed.index}"
    if why is None and snapshot.meta.index == signed.index and snapshot.meta.term != signed.term:
        why = f"it is labelled term {snapshot.meta.term}, its signature covers {signed.term}"
    state: KMState | None = None
    if why is None:
        try:
            state = KMState.restore(signed.state)
        except (ValueError, KeyError, TypeError) as exc:
            why = f"its image does not parse ({type(exc).__name__})"
    if state is not None and (state.applied_index, state.chain_hash) != (
        signed.index,
        signed.chain_hash,
    ):
        why = "its image is not at the index and chain hash that were signed"
    if why is None and state is not None:
        why = _not_counted(signed.proof, state, verifier)
    if why is not None or state is None:
        report.fail(f"{where} is fabricated: {why}", snapshot.meta.index)
        return None
    report.notes.append(f"starts from a snapshot at index {snapshot.meta.index}, signed")
    return state


def _signature_entry(
    entry: Entry, cmd: dict[str, Any], state: KMState, verifier: QuoteVerifier, replay: Replay
) -> bool:
    """Judge one ``ledger.sign`` entry; True if it counts. Fails the report on evidence that is
    not genuine or a chain that differs; a genuine signature that does not count is a note."""
    report = replay.report
    try:
        index = int(cmd["index"])
        claimed = bytes.fromhex(cmd["chain_hash"])
        proof = Proof(
            bytes.fromhex(cmd["public_key"]),
            bytes.fromhex(cmd["quote"]),
            bytes.fromhex(cmd["signature"]),
        )
    except (KeyError, ValueError, TypeError):
        report.fail(f"entry {entry.index}: malformed signature entry", entry.index)
        return False
    why = _not_genuine(proof, head_message(index, claimed), verifier)
    if why is not None:
        report.fail(f"entry {entry.index}: {why}", entry.index)
        return False
    uncounted = _not_counted(proof, state, verifier)
    if uncounted is None and index < replay.start:
        uncounted = f"it covers index {index}, before the snapshot this ledger starts from"
    if uncounted is not None:
        report.uncounted_signatures += 1
        report.notes.append(f"entry {entry.index}: signature not counted: {uncounted}")
        return False
    recomputed = replay.chains.get(index)
    if recomputed is None:
        report.fail(
            f"entry {entry.index}: signature covers index {index}, which this ledger does not hold",
            entry.index,
        )
        return False
    if recomputed != claimed:
        report.fail(
            f"entry {entry.index}: hash chain at index {index} differs from what the leader's "
            "enclave signed"
        )
        report.bad_range = (report.last_signed_index, index)
        replay.diverged = True
        return False
    if index >= report.mark_index:
        replay.mark = LedgerMark(index, claimed, proof)
        report.mark_index = index
    return True


def replay_ledger(persisted: PersistedState, vendor_root: bytes) -> Replay:
    """Replay a ledger and judge its snapshot and signatures (the unsigned tail is counted,
    not judged: see ``verify_ledger``)."""
    replay = Replay(LedgerReport())
    report = replay.report
    verifier = QuoteVerifier(vendor_root)
    state = _start(persisted.snapshot, verifier, replay)
    if state is None:
        return replay
    replay.start = state.applied_index
    replay.chains[state.applied_index] = state.chain_hash
    report.last_signed_index = state.applied_index if not persisted.snapshot.is_empty else 0
    counted: set[int] = set()
    commands = committed_commands(persisted)
    report.commands = len(commands)
    if commands:
        report.first_index, report.last_index = commands[0].index, commands[-1].index
    for entry in commands:
        cmd = _command(entry)
        if cmd is not None and cmd.get("op") == "ledger.sign":
            if _signature_entry(entry, cmd, state, verifier, replay):
                counted.add(entry.index)
                report.signatures += 1
                report.last_signed_index = max(report.last_signed_index, int(cmd["index"]))
            if not report.ok:
                return replay
        state.apply(entry.index, entry.data)
        replay.chains[entry.index] = state.chain_hash
    last_entry = persisted.entries[-1].index if persisted.entries else 0
    replay.end = max(persisted.snapshot.meta.index, min(persisted.hard_state.commit, last_entry))
    report.end_index = replay.end
    # A counted signature entry vouches for itself (quote + signature), so it is not "unsigned".
    report.unsigned_tail = sum(
        1 for e in commands if e.index > report.last_signed_index and e.index not in counted
    )
    return replay


def verify_ledger(
    persisted: PersistedState,
    vendor_root: bytes,
    *,
    against: LedgerMark | None = None,
    allow_unsigned_tail: bool = False,
) -> LedgerReport:
    """Verify a ledger, and compare it with ``against`` (another ledger's signed mark, which
    must be genuine itself); commands after the last member's signature fail it unless
    allowed."""
    return _verify(persisted, vendor_root, against, allow_unsigned_tail).report


def _verify(
    persisted: PersistedState,
    vendor_root: bytes,
    against: LedgerMark | None,
    allow_unsigned_tail: bool,
) -> Replay:
    replay = replay_ledger(persisted, vendor_root)
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
    replay = _verify(persisted, vendor_root, against, allow_unsigned_tail)
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
