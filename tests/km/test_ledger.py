"""Offline ledger verification: genuine ledgers pass, altered ones are caught and located."""

from __future__ import annotations

import dataclasses
import json

from attest.certs import TcbStatus
from attest.hardware import Platform, VendorRoot
from attest.identity import EnclaveIdentity, measure_sources, signer_id
from attest.policy import Policy
from attest.quote import QuoteVerifier
from consensus.types import Entry, HardState, PersistedState
from kmnode.km.enclave import KMEnclave
from kmnode.km.state import KMState, encode_command
from kmnode.ledger import first_difference, verify_ledger

NOW = 1_800_000_000.0
VENDOR = VendorRoot(b"vendor".ljust(32, b"\0"))
PLATFORM = Platform("p1", TcbStatus.UP_TO_DATE, b"p1".ljust(32, b"\0"), VENDOR)
KM = EnclaveIdentity(measure_sources({"km": b"code"}), signer_id("t"), 1, 1)
POLICY = Policy(km_measurements=frozenset({KM.measurement}), min_svn=1)
MEMBER = {"name": "km1", "platform_id": "p1", "host": "127.0.0.1", "peer_port": 1, "api_port": 2}


def signer(identity: EnclaveIdentity = KM) -> KMEnclave:
    return KMEnclave("km1", PLATFORM.enclave(identity), QuoteVerifier(VENDOR.public_key))


def build(commands: list[bytes], sign_after: list[int], enclave: KMEnclave) -> list[Entry]:
    """Entries as a leader would log them, with a signature entry after the given positions."""
    state = enclave.state = KMState()  # the enclave signs the state it has applied
    entries: list[Entry] = []
    index = 1
    for position, data in enumerate(commands):
        entries.append(Entry(1, index, data=data))
        state.apply(index, data)
        index += 2  # leave gaps: NOOPs and membership changes never reach the state machine
        if position in sign_after:
            sign = enclave.ledger_signature(NOW).encode()
            entries.append(Entry(1, index, data=sign))
            state.apply(index, sign)
            index += 1
    return entries


COMMANDS = [
    encode_command("cluster.init", cluster="t", policy=POLICY.to_dict(), member=MEMBER),
    encode_command("key.create", name="a"),
    encode_command("key.create", name="b"),
    encode_command("key.rotate", key="a"),
    encode_command("key.create", name="c"),
]


def ledger(entries: list[Entry]) -> PersistedState:
    return PersistedState(HardState(1, "km1", entries[-1].index), entries=tuple(entries))


def test_genuine_ledger_verifies_with_every_signature() -> None:
    report = verify_ledger(ledger(build(COMMANDS, [2, 4], signer())), VENDOR.public_key)
    assert report.ok, report.problem
    assert report.signatures == 2 and report.unsigned_tail == 0


def test_unsigned_tail_fails_unless_allowed() -> None:
    entries = build(COMMANDS, [2], signer())
    report = verify_ledger(ledger(entries), VENDOR.public_key)
    assert not report.ok and report.unsigned_tail == 2
    assert "covered by no member's signature" in (report.problem or "")
    allowed = verify_ledger(ledger(entries), VENDOR.public_key, allow_unsigned_tail=True)
    assert allowed.ok and allowed.unsigned_tail == 2
    assert any("(allowed)" in note for note in allowed.notes)


def test_altered_command_is_caught_and_located_against_another_ledger() -> None:
    good = build(COMMANDS, [2, 4], signer())
    tampered = list(good)
    tampered[2] = dataclasses.replace(good[2], data=encode_command("key.create", name="evil"))
    report = verify_ledger(ledger(tampered), VENDOR.public_key)
    assert not report.ok and "differs" in (report.problem or "")
    assert (
        report.bad_range is not None and report.bad_range[0] < good[2].index <= report.bad_range[1]
    )
    assert first_difference(ledger(tampered), ledger(good)) == good[2].index


def test_signature_by_a_key_no_enclave_vouches_for_is_refused() -> None:
    entries = build(COMMANDS, [2], signer())
    sign_entry = next(i for i, e in enumerate(entries) if b"ledger.sign" in e.data)
    cmd = json.loads(entries[sign_entry].data)
    cmd["public_key"] = "11" * 32
    entries[sign_entry] = dataclasses.replace(entries[sign_entry], data=json.dumps(cmd).encode())
    report = verify_ledger(ledger(entries), VENDOR.public_key)
    assert not report.ok and "ReportDataMismatch" in (report.problem or "")
    assert report.first_bad_index == entries[sign_entry].index


def test_signature_by_an_enclave_the_policy_refuses_is_not_counted() -> None:
    rogue = dataclasses.replace(KM, measurement=measure_sources({"km": b"rogue"}))
    entries = build(COMMANDS, [2], signer(rogue))
    report = verify_ledger(ledger(entries), VENDOR.public_key, allow_unsigned_tail=True)
    assert report.ok and report.signatures == 0 and report.uncounted_signatures == 1
    assert any("not counted" in n and "UnknownMeasurement" in n for n in report.notes)
    assert not verify_ledger(ledger(entries), VENDOR.public_key).ok  # nothing signs its tail


def test_ledger_under_another_vendor_root_is_refused() -> None:
    other = VendorRoot(b"other".ljust(32, b"\0")).public_key
    report = verify_ledger(ledger(build(COMMANDS, [2], signer())), other)
    assert not report.ok and "UntrustedCertificate" in (report.problem or "")
