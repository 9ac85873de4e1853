"""Ledger verification against what a hostile host can do with the files it stores: cut the
ledger short, put an older copy back, fabricate a snapshot, rewrite history and have it signed,
or slip in signatures of enclaves that are not (or no longer) members. Each is refused by name.

Ledgers are built as a leader would log them (``tests/km/test_ledger.py``'s enclaves and
commands), with one replicated state that every signing enclave has applied.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from attest.certs import TcbStatus
from attest.hardware import Platform
from attest.quote import QuoteVerifier
from consensus.storage import DurableLog
from consensus.types import Entry, HardState, PersistedState, Snapshot, SnapshotMeta
from kmnode.km.commands import Refused
from kmnode.km.enclave import KMEnclave
from kmnode.km.ledger_proof import SignedSnapshot, head_message, signature_holds
from kmnode.km.machine import KMStateMachine
from kmnode.km.state import KMState, encode_command
from kmnode.ledger import LedgerError, LedgerMark, ledger_mark, verify_ledger, verify_node

from .ledgers import Builder
from .test_ledger import COMMANDS, KM, MEMBER, NOW, VENDOR, signer

ROOT = VENDOR.public_key
PLATFORM2 = Platform("p2", TcbStatus.UP_TO_DATE, b"p2".ljust(32, b"\0"), VENDOR)
PLATFORM3 = Platform("p3", TcbStatus.UP_TO_DATE, b"p3".ljust(32, b"\0"), VENDOR)
MEMBER2 = {**MEMBER, "name": "km2", "platform_id": "p2"}


def enclave_on(platform: Platform, name: str) -> KMEnclave:
    return KMEnclave(name, platform.enclave(KM), QuoteVerifier(ROOT))


def genuine() -> tuple[Builder, KMEnclave]:
    """Five commands signed twice by km1's enclave (the last signature covers everything)."""
    km1 = signer()
    built = Builder().commands(COMMANDS[:3])
    built.sign(km1)
    built.commands(COMMANDS[3:])
    built.sign(km1)
    return built, km1


def test_a_genuine_ledger_and_its_mark() -> None:
    built, _ = genuine()
    report = verify_ledger(built.ledger(), ROOT)
    assert report.ok, report.problem
    assert report.signatures == 2 and report.unsigned_tail == 0
    mark = ledger_mark(built.ledger(), ROOT, "km1")
    assert mark.index == report.mark_index == built.index - 1  # the last entry signs the rest
    assert verify_ledger(built.ledger(), ROOT, against=mark).ok


# --- truncation and rollback, against a signed mark ----------------------------------------


def test_truncated_ledger_is_refused_against_a_mark_naming_where_it_ends() -> None:
    built, _ = genuine()
    mark = ledger_mark(built.ledger(), ROOT, "km2")
    short = built.ledger(through=4)  # a genuine prefix: every signature in it still holds
    assert verify_ledger(short, ROOT, allow_unsigned_tail=True).ok
    report = verify_ledger(short, ROOT, against=mark, allow_unsigned_tail=True)
    assert not report.ok
    assert report.problem is not None and report.problem.startswith("truncated or rolled back")
    assert f"ends at index 4, before index {mark.index}, which km2 holds" in report.problem
    assert report.first_bad_index == 5


def test_rolled_back_copy_is_refused_against_a_newer_mark() -> None:
    """The host keeps a copy, the cluster moves on and signs more, the copy is put back."""
    built, km1 = genuine()
    older = built.ledger()
    built.command(encode_command("key.create", name="later"))
    built.sign(km1)
    newer = ledger_mark(built.ledger(), ROOT, "mark.json")
    report = verify_ledger(older, ROOT, against=newer)
    assert not report.ok and "truncated or rolled back" in (report.problem or "")
    assert f"before index {newer.index}" in (report.problem or "")


def test_rolled_back_and_rewritten_ledger_differs_at_the_marks_index() -> None:
    """An older copy that then went on differently (a leader alone with it): as long as the
    mark's, and signed by a member too, but the chain at the mark's index is another."""
    built, km1 = genuine()
    built.command(encode_command("key.create", name="paid"))
    built.sign(km1)
    mark = ledger_mark(built.ledger(), ROOT, "km3")
    fork = Builder().commands(COMMANDS)
    fork.command(encode_command("key.create", name="unpaid"))  # index 6 again, other bytes
    fork.sign(km1)
    fork.command(encode_command("key.create", name="more"))
    fork.sign(km1)
    assert verify_ledger(fork.ledger(), ROOT).ok  # on its own, a consistent signed history
    report = verify_ledger(fork.ledger(), ROOT, against=mark)
    assert not report.ok and report.first_bad_index == mark.index
    assert f"rolled back or forked: at index {mark.index}" in (report.problem or "")


def test_a_mark_whose_evidence_was_edited_is_refused() -> None:
    built, _ = genuine()
    mark = ledger_mark(built.ledger(), ROOT, "km1")
    edited = dataclasses.replace(mark, index=mark.index + 100)
    with pytest.raises(LedgerError, match="not genuine: signature does not verify"):
        verify_ledger(built.ledger(), ROOT, against=edited)
    assert LedgerMark.from_json(json.loads(json.dumps(mark.to_json())), "f") == dataclasses.replace(
        mark, source="f"
    )
    with pytest.raises(LedgerError, match="not a ledger mark"):
        LedgerMark.from_json({"format": "kmsim-ledger-mark/1", "index": True}, "f")


# --- snapshots --------------------------------------------------------------------------------


def compacted() -> tuple[Builder, Snapshot, KMEnclave]:
    """A ledger compacted at index 4 (km1's signed snapshot), then more signed commands."""
    built, km1 = genuine()
    built.command(encode_command("key.create", name="x"))  # 8
    snap = built.snapshot(km1)
    built.command(encode_command("key.create", name="y"))
    built.sign(km1)
    return built, snap, km1


def test_a_signed_snapshot_is_a_verified_start() -> None:
    built, snap, _ = compacted()
    report = verify_ledger(built.ledger(snapshot=snap), ROOT)
    assert report.ok, report.problem
    assert report.snapshot_index == snap.meta.index and report.signatures == 1


def test_unsigned_snapshot_is_named_fabricated() -> None:
    built, snap, _ = compacted()
    forged_state = KMState.restore(SignedSnapshot.decode(snap.data).state)  # type: ignore[union-attr]
    forged_state.keys.clear()
    forged = Snapshot(snap.meta, forged_state.snapshot())
    report = verify_ledger(built.ledger(snapshot=forged), ROOT)
    assert not report.ok and report.first_bad_index == snap.meta.index
    assert (
        report.problem
        == f"the snapshot at index {snap.meta.index} is fabricated: no enclave signed it"
    )


def test_snapshot_with_an_altered_image_is_named_fabricated() -> None:
    built, snap, _ = compacted()
    signed = SignedSnapshot.decode(snap.data)
    assert signed is not None
    altered = signed.state.replace(b'"name":"a"', b'"name":"z"')
    assert altered != signed.state
    forged = Snapshot(snap.meta, dataclasses.replace(signed, state=altered).encode())
    report = verify_ledger(built.ledger(snapshot=forged), ROOT)
    assert not report.ok and "is fabricated: signature does not verify" in (report.problem or "")


def test_snapshot_signed_by_a_non_member_enclave_is_named_fabricated() -> None:
    """A genuine enclave on a platform that hosts no member signs an image of its own making."""
    built, snap, _ = compacted()
    outsider = enclave_on(PLATFORM3, "km9")
    fake = Builder().commands(COMMANDS[:2])
    fake.index = snap.meta.index - 1
    fake.command(encode_command("key.create", name="planted"))
    forged = fake.snapshot(outsider)
    report = verify_ledger(built.ledger(snapshot=forged), ROOT)
    assert not report.ok
    assert "is fabricated: platform 'p3' hosted no member then" in (report.problem or "")


def test_a_snapshot_counts_only_if_its_signer_is_a_build_the_verifier_trusts() -> None:
    """A snapshot names its own members and policy, so a genuine enclave of another build could
    sign one that admits itself; the verifier's trusted measurements (cluster.yaml's policy,
    --trust-km) anchor it."""
    built, snap, _ = compacted()
    ledger = built.ledger(snapshot=snap)
    assert verify_ledger(ledger, ROOT, trusted_km=frozenset({KM.measurement})).ok
    report = verify_ledger(ledger, ROOT, trusted_km=frozenset({b"\x07" * 32}))
    assert not report.ok and report.first_bad_index == snap.meta.index
    assert f"its signer's KM measurement {KM.measurement.hex()} is not one this verifier" in (
        report.problem or ""
    )


def test_snapshot_relabelled_to_another_index_is_named_fabricated() -> None:
    built, snap, _ = compacted()
    relabelled = Snapshot(dataclasses.replace(snap.meta, index=snap.meta.index - 1), snap.data)
    report = verify_ledger(built.ledger(snapshot=relabelled), ROOT)
    assert not report.ok and "is fabricated: it is labelled index" in (report.problem or "")


# --- re-signed history ------------------------------------------------------------------------


def test_a_rewritten_entry_cannot_be_signed_by_asking_the_enclave() -> None:
    """The host rewrites an entry of a signed ledger and asks the enclave for a signature over
    the rewritten chain. No entry point takes a chain, an index or bytes to sign: what it gets
    covers the enclave's own head, and the rewritten ledger is refused."""
    signing = {
        name: list(inspect.signature(method).parameters)
        for name, method in inspect.getmembers(KMEnclave, inspect.isfunction)
        if "_signing_key.sign" in inspect.getsource(method)
        or "_ledger_proof(" in inspect.getsource(method)
    }
    assert signing == {
        "_ledger_proof": ["self", "message", "now"],  # private: what the three below sign
        "ledger_signature": ["self", "now"],
        "snapshot_capture": ["self", "term", "now"],
        "recovery_split": ["self", "now"],  # a split its own state asks for
    }
    built, km1 = genuine()
    built.command(encode_command("key.create", name="tail"))  # not signed yet
    evil = Entry(1, built.index, data=encode_command("key.create", name="evil"))
    rewritten = Builder().commands([*(e.data for e in built.entries[:-1]), evil.data])
    # Whatever the host would like signed, the enclave signs the head it applied itself.
    km1.state = built.state
    sign = km1.ledger_signature(NOW)
    assert (sign.index, bytes.fromhex(sign.chain_hash)) == (built.index, built.state.chain_hash)
    assert not signature_holds(
        bytes.fromhex(sign.public_key),
        head_message(evil.index, rewritten.state.chain_hash),
        bytes.fromhex(sign.signature),
    )
    entries = (*built.entries[:-1], evil, Entry(1, evil.index + 1, data=sign.encode()))
    forged = PersistedState(HardState(1, "km1", evil.index + 1), Snapshot(), entries)
    report = verify_ledger(forged, ROOT)
    assert not report.ok and report.bad_range == (evil.index - 2, evil.index)
    assert f"hash chain at index {evil.index} differs from what the leader's enclave signed" in (
        report.problem or ""
    )


@pytest.mark.parametrize("index", [2**64, -1, "7"])
def test_a_malformed_signature_entry_is_named_not_a_crash(index: object) -> None:
    built, km1 = genuine()
    km1.state = built.state
    fields = json.loads(km1.ledger_signature(NOW).encode())
    del fields["op"]
    built.command(encode_command("ledger.sign", **{**fields, "index": index}))
    report = verify_ledger(built.ledger(), ROOT)
    assert not report.ok and report.first_bad_index == built.index
    assert f"entry {built.index}: malformed signature entry: 'index'" in (report.problem or "")


# --- who may sign -----------------------------------------------------------------------------


def two_members() -> tuple[Builder, KMEnclave, KMEnclave]:
    built = Builder().commands(COMMANDS[:2])
    assert (
        built.command(encode_command("member.add", member=MEMBER2)).__class__.__name__ != "Refused"
    )
    return built, signer(), enclave_on(PLATFORM2, "km2")


def test_signature_of_a_removed_members_enclave_is_not_counted() -> None:
    built, km1, km2 = two_members()
    built.sign(km2)  # a member then: counts
    built.command(encode_command("member.remove", name="km2"))
    built.command(encode_command("key.create", name="after"))
    refused = built.sign(km2)  # removed now: the state machine does not count it either
    assert isinstance(refused, Refused) and "not a member's" in refused.error
    report = verify_ledger(built.ledger(), ROOT)
    assert not report.ok and report.signatures == 1 and report.uncounted_signatures == 1
    assert any("not counted: platform 'p2' hosted no member then" in n for n in report.notes)
    assert "covered by no member's signature" in (report.problem or "")
    built.sign(km1)
    assert verify_ledger(built.ledger(), ROOT).ok


def test_signature_of_an_enclave_that_was_never_a_member_is_not_counted() -> None:
    built = Builder().commands(COMMANDS)
    outsider = enclave_on(PLATFORM3, "km9")
    assert isinstance(built.sign(outsider), Refused)
    report = verify_ledger(built.ledger(), ROOT, allow_unsigned_tail=True)
    assert report.ok and report.signatures == 0 and report.uncounted_signatures == 1
    assert report.unsigned_tail == len(COMMANDS) + 1
    assert not verify_ledger(built.ledger(), ROOT).ok


def test_signature_of_a_revoked_platforms_member_is_not_counted() -> None:
    built, km1, km2 = two_members()
    built.command(encode_command("policy.revoke_platform", platform_id="p2"))
    assert isinstance(built.sign(km2), Refused)
    report = verify_ledger(built.ledger(), ROOT, allow_unsigned_tail=True)
    assert report.signatures == 0 and report.uncounted_signatures == 1
    assert any("RevokedPlatform" in n for n in report.notes)
    built.sign(km1)
    assert verify_ledger(built.ledger(), ROOT).ok


def test_the_nodes_state_machine_writes_snapshots_that_verify_from_disk(tmp_path: Path) -> None:
    """The path a node takes: its state machine snapshots (signed by its enclave), the log is
    compacted, and the raft directory left behind verifies offline, starting from it."""
    built, km1 = genuine()
    machine = KMStateMachine(signer())
    for entry in built.entries:
        machine.apply(entry)
    snap = Snapshot(SnapshotMeta(built.index, built.entries[-1].term), machine.snapshot())
    built.command(encode_command("key.create", name="after"), term=2)
    built.sign(km1)
    with DurableLog.open(tmp_path, fsync=False) as log:
        log.append(built.entries, HardState(2, "km1", built.index))
        log.compact(snap)
    report = verify_node(tmp_path, ROOT)
    assert report.ok, report.problem
    assert report.snapshot_index == snap.meta.index and report.commands == 2
    follower = KMStateMachine(signer())
    follower.restore(snap.data)  # a snapshot installed from the leader
    assert SignedSnapshot.decode(follower.snapshot()) is not None
    assert follower._enclave.state.chain_hash == machine._enclave.state.chain_hash
