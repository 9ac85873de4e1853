"""The KM enclave's recovery entry points: its recovery key and quote, the leader's check of a
submitted share, and the rebuild of the master secret on fresh enclaves that lost every sealed
state but replayed the ledger, so that every key generation comes back the same.

The holders here are operators on their own laptops: they open their shares with their own
keys (``kmnode.recovery.shares.open_share``) and box them to the recovering enclaves' recovery
keys; everything else goes through the enclave's entry points and ``KMState.apply``.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from nacl.public import PrivateKey

from attest.errors import ReportDataMismatch, SealingError
from attest.identity import EnclaveIdentity, EnclaveRole
from attest.quote import QuoteVerifier, report_data_for
from kmnode.km.commands import Applied
from kmnode.km.enclave import EnclaveStateError, KMEnclave
from kmnode.km.ledger_proof import SIGNER_LABEL, signature_holds, split_message
from kmnode.km.recovery_commands import ShareAccepted, SharesCommitted
from kmnode.km.recovery_state import canonical_split
from kmnode.recovery.boxing import (
    RECOVERY_KEY_LABEL,
    RecoveryKeyRefused,
    recovery_report_data,
    verify_recovery_key,
)
from kmnode.recovery.shares import (
    BogusShare,
    RecoveryError,
    RecoverySet,
    Share,
    UnknownHolder,
)
from tests.km.enclaves import KM_ID, NOW, POLICY, VENDOR, bare_enclave, join
from tests.km.recovery_helpers import (
    OTHER_KM,
    Ledger,
    boxes_for,
    genesis_entries,
    genesis_node,
    open_shares,
    rebuilt_secret,
    secret_forms,
    share_command,
    signed,
)

GENERATIONS = (1, 2, 3)


@dataclass
class LostCluster:
    """Members n-a and n-b that held the secret and a 2-of-3 split of it, and fresh enclaves
    of the same nodes (same names, platforms and code) that replayed the same ledger and hold
    no secret: what is left after every sealed state was lost."""

    members: Ledger
    split: RecoverySet
    #: ``key_fingerprint("db", g)`` on the members before the loss, by generation.
    fingerprints: dict[int, str]
    fresh: Ledger
    #: Each holder's share, as it opened it with its own key.
    shares: dict[str, Share]

    @property
    def leader(self) -> KMEnclave:
        return self.fresh.enclaves[0]

    @property
    def follower(self) -> KMEnclave:
        return self.fresh.enclaves[1]

    def submit(self, holder: str, boxes: dict[str, str]) -> Applied:
        """The leader's enclave checks the share boxed to it; then the share commits."""
        self.leader.check_recovery_share(holder, self.split.generation, boxes)
        return self.fresh.commit(share_command(holder, self.split.generation, boxes))

    def boxes(self, holder: str) -> dict[str, str]:
        """``holder``'s real share boxed to both fresh enclaves."""
        return boxes_for(self.shares[holder].value, self.fresh.enclaves)


def lost_cluster() -> LostCluster:
    a = bare_enclave("n-a", "a")
    a.genesis()
    b = bare_enclave("n-b", "b")
    members = Ledger(a, b)
    members.commit_all(*genesis_entries(a.cluster_id))
    assert join(b, a).status == "admitted"
    made = a.recovery_split(NOW)
    assert members.commit(made.encode()) == SharesCommitted(1, ["rec-1", "rec-2", "rec-3"], 2)
    split = made.recovery_set
    members.commit_all(signed("key.rotate", key="db"), signed("key.rotate", key="db"))
    fingerprints = {g: a.key_fingerprint("db", g) for g in GENERATIONS}
    assert fingerprints == {g: b.key_fingerprint("db", g) for g in GENERATIONS}
    assert len(set(fingerprints.values())) == len(GENERATIONS)

    fresh = Ledger(bare_enclave("n-a", "a"), bare_enclave("n-b", "b"), history=members.entries)
    for enclave in fresh.enclaves:
        enclave.recovery_session(None)  # what a node started in recovery mode begins
        assert enclave.state.snapshot() == a.state.snapshot()
        assert not enclave.has_master_secret
        with pytest.raises(EnclaveStateError):
            enclave.key_fingerprint("db", 1)
    shares = open_shares(split, ["rec-1", "rec-2", "rec-3"])
    return LostCluster(members, split, fingerprints, fresh, shares)


def assert_no_secret(outputs: Iterable[str], lost: LostCluster) -> None:
    """No output contains the master secret or a share's value, in any usual form."""
    text = "\n".join(outputs)
    values = [rebuilt_secret(lost.split), *(s.value for s in lost.shares.values())]
    for value in values:
        for form in secret_forms(value):
            assert form not in text


def views(enclaves: Iterable[KMEnclave]) -> list[str]:
    """What a host may print of enclaves: their repr and their state's."""
    return [f"{e!r} {e.state!r}" for e in enclaves]


# --- the recovery key -----------------------------------------------------------------------------


def recovering(name: str, platform: str, identity: EnclaveIdentity = KM_ID) -> KMEnclave:
    """A fresh enclave that has begun a recovery session (a node started in recovery mode)."""
    enclave = bare_enclave(name, platform, identity)
    enclave.recovery_session(None)
    return enclave


def test_the_recovery_key_is_quoted_for_its_node_and_tied_to_platform_code_and_name() -> None:
    enclave = bare_enclave("n-a", "a")
    with pytest.raises(EnclaveStateError, match="not recovering"):
        enclave.recovery_key(NOW)  # no session: a node that is not recovering has no key
    session = enclave.recovery_session(None)
    public, quote = enclave.recovery_key(NOW)
    assert len(bytes.fromhex(public)) == 32
    verifier = QuoteVerifier(VENDOR.public_key)
    bound = report_data_for(RECOVERY_KEY_LABEL, b"n-a" + bytes.fromhex(public))
    assert recovery_report_data("n-a", bytes.fromhex(public)) == bound
    verified = verifier.verify(quote, POLICY, bound, role=EnclaveRole.KM, now=NOW)
    assert (verified.platform_id, verified.identity) == ("a", KM_ID)
    # The quote binds this node and this key, nothing else.
    for other in (b"n-b" + bytes.fromhex(public), b"n-a" + secrets.token_bytes(32)):
        with pytest.raises(ReportDataMismatch):
            verifier.verify(
                quote,
                POLICY,
                report_data_for(RECOVERY_KEY_LABEL, other),
                role=EnclaveRole.KM,
                now=NOW,
            )

    # The same code on the same platform finds the same key after a restart mid-recovery,
    # from its sealed session; a later recovery (a new session) has another key.
    restarted = bare_enclave("n-a", "a")
    assert restarted.recovery_session(session) == session
    assert restarted.recovery_key(NOW)[0] == public
    assert recovering("n-a", "a").recovery_key(NOW)[0] != public
    others: dict[str, tuple[str, str, EnclaveIdentity]] = {
        "another measurement": ("n-a", "a", OTHER_KM),
        "another node name": ("n-c", "a", KM_ID),
        "another platform": ("n-a", "b", KM_ID),
    }
    for case, (name, platform, identity) in others.items():
        # Nobody else opens the session: not another build, name or platform.
        with pytest.raises(SealingError):
            bare_enclave(name, platform, identity).recovery_session(session)
        assert recovering(name, platform, identity).recovery_key(NOW)[0] != public, case


def test_a_holder_boxes_to_no_key_whose_quote_does_not_hold() -> None:
    """What ``kmctl recovery submit`` checks before boxing a share: a host that offers a key
    of its own, another node's quote, or a quote from another platform or build gets none."""
    enclave = recovering("n-a", "a")
    public, quote = enclave.recovery_key(NOW)
    rogue_public, rogue_quote = recovering("n-a", "a", OTHER_KM).recovery_key(NOW)
    verifier = QuoteVerifier(VENDOR.public_key)
    host_key = PrivateKey.generate().public_key.encode().hex()
    answers: dict[str, tuple[str, str, dict[str, object], str]] = {
        "the host's own key": ("n-a", "a", {"box_key": host_key, "quote": quote.hex()}, "Report"),
        "another node's quote": ("n-b", "a", {"box_key": public, "quote": quote.hex()}, "Report"),
        "another platform": ("n-a", "b", {"box_key": public, "quote": quote.hex()}, "platform"),
        "another build": (
            "n-a",
            "a",
            {"box_key": rogue_public, "quote": rogue_quote.hex()},
            "measurement",
        ),
        "a stale quote": ("n-a", "a", {"box_key": public, "quote": quote.hex()}, "Stale"),
        "no quote": ("n-a", "a", {"box_key": public}, "no box_key and quote"),
        "the zero key": ("n-a", "a", {"box_key": "00" * 32, "quote": quote.hex()}, "X25519"),
    }
    for case, (node, platform, answer, message) in answers.items():
        now = NOW + 3600 if case == "a stale quote" else NOW
        with pytest.raises(RecoveryKeyRefused) as refused:
            verify_recovery_key(node, platform, answer, verifier, POLICY, now)
        assert message.lower() in str(refused.value).lower(), (case, refused.value)
    good = {"box_key": public, "quote": quote.hex()}
    assert verify_recovery_key("n-a", "a", good, verifier, POLICY, NOW).key.encode().hex() == public


def test_only_a_recovering_enclave_has_a_recovery_key() -> None:
    lost = lost_cluster()
    member = lost.members.enclaves[0]
    with pytest.raises(EnclaveStateError, match="not recovering"):
        member.recovery_key(NOW)
    assert len(bytes.fromhex(lost.leader.recovery_key(NOW)[0])) == 32


def test_a_later_loss_is_not_reopened_by_the_shares_of_an_earlier_recovery() -> None:
    """The ledger keeps the boxes of a completed recovery. Enclaves that lose their state
    again replay them, but each recovery has its own session key: the old boxes do not open,
    so the cluster stays sealed until the holders submit again (found by the bench)."""
    lost = lost_cluster()
    for holder in ("rec-1", "rec-3"):
        lost.submit(holder, lost.boxes(holder))
    assert all(e.recover() == "" and e.has_master_secret for e in lost.fresh.enclaves)
    again = Ledger(recovering("n-a", "a"), recovering("n-b", "b"), history=lost.fresh.entries)
    for enclave in again.enclaves:
        assert enclave.state.recovery.complete_index  # the old ceremony, replayed
        problem = enclave.recover()
        assert "does not match its commitment" in problem, problem
        assert not enclave.has_master_secret


# --- the split -----------------------------------------------------------------------------------


def test_the_split_is_signed_with_the_enclaves_quoted_ledger_signing_key_and_commits() -> None:
    """The split carries the proof the state checks: the key the enclave signs the ledger
    with (the same as in its ``ledger.sign`` entries), a quote of this platform and code
    binding that key, and that key's signature over exactly this set."""
    leader, ledger = genesis_node()
    made = leader.recovery_split(NOW)
    key = bytes.fromhex(made.public_key)
    assert made.public_key == leader.ledger_signature(NOW).public_key
    verified = QuoteVerifier(VENDOR.public_key).verify(
        bytes.fromhex(made.quote),
        POLICY,
        report_data_for(SIGNER_LABEL, key),
        role=EnclaveRole.KM,
        now=NOW,
    )
    assert (verified.platform_id, verified.identity) == ("a", KM_ID)
    message = split_message(canonical_split(made.recovery_set))
    assert signature_holds(key, message, bytes.fromhex(made.signature))
    assert ledger.commit(made.encode()) == SharesCommitted(1, ["rec-1", "rec-2", "rec-3"], 2)
    assert ledger.state.recovery.current == made.recovery_set


# --- a recovery -----------------------------------------------------------------------------------


def test_two_of_three_shares_bring_back_every_key_generation_on_fresh_enclaves() -> None:
    lost = lost_cluster()
    outputs: list[str] = []

    first = lost.submit("rec-1", lost.boxes("rec-1"))
    assert first == ShareAccepted("rec-1", 1, 1, 2, False)
    for enclave in lost.fresh.enclaves:  # one share of two: nothing is taken up
        assert enclave.recover() == ""
        assert not enclave.has_master_secret
        with pytest.raises(EnclaveStateError) as refused:
            enclave.key_fingerprint("db", 1)
        outputs.append(str(refused.value))

    second = lost.submit("rec-3", lost.boxes("rec-3"))
    assert second == ShareAccepted("rec-3", 1, 2, 2, True)
    outputs += views(lost.fresh.enclaves)
    for enclave in lost.fresh.enclaves:
        assert enclave.recover() == ""
        assert enclave.has_master_secret and enclave.sealed_dirty
        assert enclave.cluster_id == lost.split.cluster_id
        got = {g: enclave.key_fingerprint("db", g) for g in GENERATIONS}
        assert got == lost.fingerprints, enclave.name
        assert enclave.recover() == ""  # asked again: nothing changes
    outputs += views(lost.fresh.enclaves)

    # The recovered node seals its secret anew: a restart of the same code opens it.
    restarted = bare_enclave("n-a", "a")
    Ledger(restarted, history=lost.fresh.entries)
    restarted.restore_sealed_state(lost.leader.sealed_state())
    assert restarted.binding_error == ""
    assert restarted.key_fingerprint("db", 3) == lost.fingerprints[3]

    # A completed recovery makes a fresh split due; the recovered leader makes and signs it,
    # of the same secret, and the ledger takes it.
    state = lost.leader.state
    due = state.recovery.due(state.identities)
    assert due is not None and due.generation == 2
    again = lost.leader.recovery_split(NOW)
    assert lost.fresh.commit(again.encode()) == SharesCommitted(2, ["rec-1", "rec-2", "rec-3"], 2)
    assert again.recovery_set.master_commitment == lost.split.master_commitment
    assert rebuilt_secret(again.recovery_set) == rebuilt_secret(lost.split)
    assert_no_secret(outputs, lost)


def garbage(lost: LostCluster) -> dict[str, str]:
    """A valid-looking box that is not a sealed box at all."""
    return {"n-b": base64.b64encode(secrets.token_bytes(80)).decode()}


#: What the host (or a careless holder) sends n-b in place of rec-2's share, and what n-b's
#: ``recover`` then names.
BAD_BOXES = {
    "a box of random bytes": (garbage, "'rec-2'"),
    "another value sealed to n-b": (
        lambda lost: boxes_for(secrets.token_bytes(32), [lost.follower]),
        "'rec-2' does not match its commitment",
    ),
    "n-a's box copied for n-b": (
        lambda lost: {"n-b": lost.boxes("rec-2")["n-a"]},
        "'rec-2' does not match its commitment",
    ),
    "rec-1's share as rec-2's": (
        lambda lost: {"n-b": lost.boxes("rec-1")["n-b"]},
        "'rec-2' does not match its commitment",
    ),
    "no box for n-b": (lambda lost: {}, "the share of 'rec-2' is not boxed to node 'n-b'"),
}


@pytest.mark.parametrize("case", BAD_BOXES)
def test_a_bad_box_for_one_node_leaves_it_without_a_secret_and_says_why(case: str) -> None:
    lost = lost_cluster()
    make, named = BAD_BOXES[case]
    lost.submit("rec-1", lost.boxes("rec-1"))
    boxes = {"n-a": lost.boxes("rec-2")["n-a"], **make(lost)}
    assert lost.submit("rec-2", boxes) == ShareAccepted("rec-2", 1, 2, 2, True)

    assert lost.leader.recover() == ""
    assert lost.leader.key_fingerprint("db", 2) == lost.fingerprints[2]
    problem = lost.follower.recover()
    assert named in problem and "1 valid share(s) of the 2 needed" in problem, problem
    assert not lost.follower.has_master_secret
    assert lost.follower.recover() == problem  # asking again takes nothing up either
    assert not lost.follower.has_master_secret
    # The next split is due, and only the node that took the secret up can make it.
    with pytest.raises(EnclaveStateError, match="no master secret"):
        lost.follower.recovery_split(NOW)
    assert lost.leader.recovery_split(NOW).recovery_set.generation == 2
    assert_no_secret([problem, *views(lost.fresh.enclaves)], lost)


def test_the_leader_refuses_a_share_it_cannot_use_at_once_naming_the_holder() -> None:
    lost = lost_cluster()
    leader, follower = lost.leader, lost.follower
    generation = lost.split.generation
    real = lost.boxes("rec-1")
    refusals: dict[str, tuple[str, int, dict[str, str], type[Exception], str]] = {
        "a bogus share": (
            "rec-1",
            generation,
            boxes_for(secrets.token_bytes(32), [leader, follower]),
            BogusShare,
            "'rec-1' does not match its commitment",
        ),
        "another holder's share": (
            "rec-1",
            generation,
            lost.boxes("rec-2"),
            BogusShare,
            "'rec-1'",
        ),
        "not a sealed box": (
            "rec-1",
            generation,
            {"n-a": base64.b64encode(secrets.token_bytes(80)).decode()},
            BogusShare,
            "'rec-1'",
        ),
        "not base64": ("rec-1", generation, {"n-a": "%%%%"}, BogusShare, "'rec-1'"),
        "the follower's box under the leader's name": (
            "rec-1",
            generation,
            {"n-a": real["n-b"]},
            BogusShare,
            "'rec-1'",
        ),
        "a box missing for this node": (
            "rec-1",
            generation,
            {"n-b": real["n-b"]},
            RecoveryError,
            "not boxed to node 'n-a'",
        ),
        "another generation": (
            "rec-1",
            generation + 1,
            real,
            RecoveryError,
            "a share of split 2; the ledger's split is 1",
        ),
        "no holder of that name": ("nobody", generation, real, UnknownHolder, "'nobody'"),
    }
    outputs: list[str] = []
    for case, (holder, gen, boxes, error, message) in refusals.items():
        with pytest.raises(error) as refused:
            leader.check_recovery_share(holder, gen, boxes)
        assert message in str(refused.value), (case, refused.value)
        if isinstance(refused.value, BogusShare):
            assert refused.value.name == holder, case
        outputs.append(str(refused.value))
    assert not leader.has_master_secret
    leader.check_recovery_share("rec-1", generation, real)  # the real one passes

    # An enclave that holds the secret is not recovering: it takes no share.
    member = lost.members.enclaves[0]
    with pytest.raises(EnclaveStateError) as refused:
        member.check_recovery_share(
            "rec-1", generation, boxes_for(lost.shares["rec-1"].value, [member])
        )
    outputs.append(str(refused.value))
    # Nor does an enclave whose ledger holds no split.
    with pytest.raises(RecoveryError, match="no recovery split"):
        bare_enclave("n-c", "c").check_recovery_share("rec-1", 1, real)
    assert_no_secret([*outputs, *views([leader, member])], lost)


def test_recover_takes_nothing_up_before_the_ledger_completes_or_without_a_split() -> None:
    lost = lost_cluster()
    assert [e.recover() for e in lost.fresh.enclaves] == ["", ""]
    assert not any(e.has_master_secret for e in lost.fresh.enclaves)
    nothing = bare_enclave("n-c", "c")
    assert nothing.recover() == "" and not nothing.has_master_secret
    # The members keep their secret whatever the ledger says.
    member = lost.members.enclaves[1]
    assert member.recover() == "" and member.key_fingerprint("db", 1) == lost.fingerprints[1]


def test_a_box_to_one_node_does_not_open_on_another() -> None:
    """A share boxed to n-b's recovery key opens nowhere else, not even on n-b's platform
    under another node name or another build of the KM enclave."""
    lost = lost_cluster()
    real = lost.boxes("rec-1")
    impostors = [recovering("n-c", "b"), recovering("n-b", "b", OTHER_KM)]
    Ledger(*impostors, history=lost.fresh.entries)
    for impostor in impostors:
        with pytest.raises(BogusShare):
            impostor.check_recovery_share("rec-1", 1, {impostor.name: real["n-b"]})
