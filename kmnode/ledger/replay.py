"""Replaying a stored ledger: its snapshot (only if a member's enclave signed it), its commands,
the chain hash after each, and a verdict on every signature entry on the way."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from attest.quote import Quote, QuoteVerifier
from consensus.storage import DurableLog
from consensus.types import Entry, EntryType, PersistedState, Snapshot, SnapshotMeta
from kmnode.km.commands import CommandRefused, LedgerSign, parse
from kmnode.km.ledger_proof import Proof, SignedSnapshot, head_message
from kmnode.km.state import KMState
from kmnode.ledger.evidence import not_counted, not_genuine
from kmnode.ledger.mark import LedgerMark
from kmnode.ledger.report import LedgerReport


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


def _op(entry: Entry) -> object:
    """The ``op`` an entry claims (anything: the state machine judges the rest)."""
    try:
        value = json.loads(entry.data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return value.get("op") if isinstance(value, dict) else None


def _start(
    snapshot: Snapshot,
    verifier: QuoteVerifier,
    replay: Replay,
    trusted_km: frozenset[bytes] | None,
) -> KMState | None:
    """The state the ledger starts from: empty, or a snapshot's image if a member's enclave
    signed exactly it (None, with the report failed, otherwise)."""
    report = replay.report
    if snapshot.is_empty:
        return KMState()
    where = f"the snapshot at index {snapshot.meta.index}"
    report.snapshot_index = snapshot.meta.index
    judged = judge_snapshot(snapshot.data, verifier, trusted_km, snapshot.meta)
    if isinstance(judged, str):
        report.fail(f"{where} is {judged}", snapshot.meta.index)
        return None
    report.notes.append(f"starts from a snapshot at index {snapshot.meta.index}, signed")
    return judged[1]


def judge_snapshot(
    data: bytes,
    verifier: QuoteVerifier,
    trusted_km: frozenset[bytes] | None,
    meta: SnapshotMeta | None = None,
) -> tuple[SignedSnapshot, KMState] | str:
    """A signed snapshot and its state, if a member's enclave signed exactly that image; else
    why not ("fabricated: ..." or "fabricated or damaged: ..."). ``meta``: the index and term
    the snapshot is stored under, which must be the signed ones.

    A snapshot names its own members and policy, so judged by itself alone, an enclave of any
    build on a genuine platform could sign an image that admits it. ``trusted_km`` (the KM
    measurements the verifier trusts, from cluster.yaml and ``--trust-km``) anchors it: the
    signer's measurement must be one of them. Later signatures are judged by the policy the
    ledger itself replays from there."""
    try:
        signed = SignedSnapshot.decode(data)
    except ValueError as exc:
        return f"fabricated or damaged: {exc}"
    if signed is None:
        return "fabricated: no enclave signed it"
    why = not_genuine(signed.proof, signed.message(), verifier)
    if why is None and trusted_km is not None:
        measurement = Quote.decode(signed.proof.quote).body.identity.measurement
        if measurement not in trusted_km:
            why = (
                f"its signer's KM measurement {measurement.hex()} is not one this verifier "
                "trusts (cluster.yaml's policy; add others with --trust-km)"
            )
    if why is None and meta is not None and (meta.index, meta.term) < (signed.index, signed.term):
        why = f"it is labelled index {meta.index}, its signature covers {signed.index}"
    if why is None and meta is not None and meta.index == signed.index and meta.term != signed.term:
        why = f"it is labelled term {meta.term}, its signature covers {signed.term}"
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
        why = not_counted(signed.proof, state, verifier)
    if why is not None or state is None:
        return f"fabricated: {why}"
    return signed, state


def _signature_entry(
    entry: Entry, state: KMState, verifier: QuoteVerifier, replay: Replay
) -> LedgerSign | None:
    """Judge one ``ledger.sign`` entry; the command if it counts. Fails the report on an entry
    that is not a well-formed command, evidence that is not genuine, or a chain that differs;
    a genuine signature that does not count is a note."""
    report = replay.report
    try:
        command = parse(entry.data)
        if not isinstance(command, LedgerSign):
            raise CommandRefused(f"an entry of {command.op} claims to be a ledger.sign")
    except CommandRefused as exc:
        report.fail(f"entry {entry.index}: malformed signature entry: {exc}", entry.index)
        return None
    index, claimed = command.index, bytes.fromhex(command.chain_hash)
    try:
        proof = Proof(
            bytes.fromhex(command.public_key),
            bytes.fromhex(command.quote),
            bytes.fromhex(command.signature),
        )
    except ValueError:
        report.fail(f"entry {entry.index}: malformed signature entry: not hex", entry.index)
        return None
    why = not_genuine(proof, head_message(index, claimed), verifier)
    if why is not None:
        report.fail(f"entry {entry.index}: {why}", entry.index)
        return None
    uncounted = not_counted(proof, state, verifier)
    if uncounted is None and index < replay.start:
        uncounted = f"it covers index {index}, before the snapshot this ledger starts from"
    if uncounted is not None:
        report.uncounted_signatures += 1
        report.notes.append(f"entry {entry.index}: signature not counted: {uncounted}")
        return None
    recomputed = replay.chains.get(index)
    if recomputed is None:
        report.fail(
            f"entry {entry.index}: signature covers index {index}, which this ledger does not hold",
            entry.index,
        )
        return None
    if recomputed != claimed:
        report.fail(
            f"entry {entry.index}: hash chain at index {index} differs from what the leader's "
            "enclave signed"
        )
        report.bad_range = (report.last_signed_index, index)
        replay.diverged = True
        return None
    if index >= report.mark_index:
        replay.mark = LedgerMark(index, claimed, proof)
        report.mark_index = index
    return command


def replay_ledger(
    persisted: PersistedState, vendor_root: bytes, trusted_km: frozenset[bytes] | None = None
) -> Replay:
    """Replay a ledger and judge its snapshot (against ``trusted_km``, if given: see
    ``_start``) and signatures (the unsigned tail is counted, not judged: see
    ``verify_ledger``)."""
    replay = Replay(LedgerReport())
    report = replay.report
    verifier = QuoteVerifier(vendor_root)
    state = _start(persisted.snapshot, verifier, replay, trusted_km)
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
        if _op(entry) == "ledger.sign":
            signed = _signature_entry(entry, state, verifier, replay)
            if signed is not None:
                counted.add(entry.index)
                report.signatures += 1
                report.last_signed_index = max(report.last_signed_index, signed.index)
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
