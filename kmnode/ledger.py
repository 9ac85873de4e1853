"""Offline verification of a node's ledger (its Raft log), for `kmctl ledger verify`.

The host stores the ledger and could rewrite it, checksums included. What it cannot forge is a
signature of the leader's KM enclave: every so often the leader signs (index, chain hash), where
the chain hash folds every command up to that index, and binds its signing key with a quote. So
a verifier that trusts only the vendor root replays the commands, recomputes the chain, and
checks every signature (quote against the policy in force at that point, Ed25519 over the
recomputed chain). A mismatch means some command in the signed range was altered; comparing
with another node's ledger then names the exact first entry that differs.

Works on a copy of the log directory, so verifying never modifies the node's files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from attest.errors import AttestationError
from attest.identity import EnclaveRole
from attest.quote import Quote, QuoteVerifier, report_data_for
from consensus.storage import DurableLog, StorageError
from consensus.types import Entry, EntryType, PersistedState
from kmnode.km.state import KMState

SIGNER_LABEL = b"ledger-signer"


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
    signatures: int = 0
    last_signed_index: int = 0
    unsigned_tail: int = 0
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
            "signatures": self.signatures,
            "last_signed_index": self.last_signed_index,
            "unsigned_tail": self.unsigned_tail,
            "notes": self.notes,
        }


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


def _check_signature(
    cmd: dict[str, Any], chains: dict[int, bytes], state: KMState, verifier: QuoteVerifier
) -> str | None:
    """None if the signature entry is genuine and matches the recomputed chain, else why not."""
    try:
        index = int(cmd["index"])
        claimed = bytes.fromhex(cmd["chain_hash"])
        public_key = bytes.fromhex(cmd["public_key"])
        quote = bytes.fromhex(cmd["quote"])
        signature = bytes.fromhex(cmd["signature"])
    except (KeyError, ValueError, TypeError):
        return "malformed signature entry"
    try:
        stamp = Quote.decode(quote).body.timestamp_ms / 1000.0
        verifier.verify(
            quote,
            state.policy,
            report_data_for(SIGNER_LABEL, public_key),
            role=EnclaveRole.KM,
            now=stamp,
        )
    except AttestationError as exc:
        return f"signer's quote refused: {type(exc).__name__}: {exc}"
    try:
        VerifyKey(public_key).verify(index.to_bytes(8, "big") + claimed, signature)
    except (BadSignatureError, ValueError):
        return "signature does not verify under the attested signing key"
    recomputed = chains.get(index)
    if recomputed is None:
        return f"signature covers index {index}, which this ledger does not hold"
    if recomputed != claimed:
        return f"hash chain at index {index} differs from what the leader's enclave signed"
    return None


def verify_ledger(persisted: PersistedState, vendor_root: bytes) -> LedgerReport:
    report = LedgerReport()
    verifier = QuoteVerifier(vendor_root)
    snapshot = persisted.snapshot
    state = KMState.restore(snapshot.data) if not snapshot.is_empty else KMState()
    if not snapshot.is_empty:
        report.notes.append(f"starts from a snapshot at index {snapshot.meta.index}")
    chains = {state.applied_index: state.chain_hash}
    verified_through = state.last_signed_index
    signature_entries: set[int] = set()
    commands = committed_commands(persisted)
    report.commands = len(commands)
    if commands:
        report.first_index, report.last_index = commands[0].index, commands[-1].index
    for entry in commands:
        cmd = _command(entry)
        if cmd is not None and cmd.get("op") == "ledger.sign":
            why = _check_signature(cmd, chains, state, verifier)
            if why is not None:
                signed = cmd.get("index")
                report.fail(f"entry {entry.index}: {why}")
                if isinstance(signed, int) and "differs" in why:
                    report.bad_range = (verified_through, signed)
                else:
                    report.first_bad_index = entry.index
                return report
            verified_through = int(cmd["index"])
            signature_entries.add(entry.index)
            report.signatures += 1
            chains = {k: v for k, v in chains.items() if k >= verified_through}
        state.apply(entry.index, entry.data)
        chains[entry.index] = state.chain_hash
    report.last_signed_index = verified_through
    # A verified signature entry vouches for itself (quote + signature), so it is not "unsigned".
    report.unsigned_tail = sum(
        1 for e in commands if e.index > verified_through and e.index not in signature_entries
    )
    if report.unsigned_tail:
        report.notes.append(
            f"{report.unsigned_tail} command(s) after index {verified_through} are not yet "
            "covered by a signature"
        )
    return report


def first_difference(ours: PersistedState, reference: PersistedState) -> int | None:
    """The first committed index where two ledgers hold different commands (None: agree)."""
    theirs = {e.index: e.data for e in committed_commands(reference)}
    for entry in committed_commands(ours):
        other = theirs.get(entry.index)
        if other is not None and other != entry.data:
            return entry.index
    return None


def verify_node(
    raft_dir: Path, vendor_root: bytes, references: list[Path] | None = None
) -> LedgerReport:
    """Verify one node's ledger; on a chain mismatch, name the first bad entry by comparing
    with ``references`` (other nodes' raft directories) when they hold that range."""
    try:
        persisted = read_ledger(raft_dir)
    except StorageError as exc:
        report = LedgerReport()
        report.fail(f"the log itself is damaged: {exc}")
        return report
    report = verify_ledger(persisted, vendor_root)
    if report.bad_range is not None:
        for reference in references or []:
            try:
                other = read_ledger(reference)
            except StorageError:
                continue
            if not verify_ledger(other, vendor_root).ok:
                continue
            index = first_difference(persisted, other)
            if index is not None:
                report.first_bad_index = index
                report.notes.append(f"first difference from {reference.parent.name}'s ledger")
                break
    return report
