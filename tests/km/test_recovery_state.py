"""The replicated recovery records: which split of the master secret the ledger needs, which
split it accepts, and which holders' shares count in a recovery, all through ``KMState.apply``.

Holders, their keys and the threshold change through passed proposals, as governance changes
them. The splits are the ones the leader's enclave makes and signs (``KMEnclave.recovery_split``).
The forged ones are of two kinds: a split that differs from the due one in one respect (made
with the secret, which the holders together rebuild with the public library) signed by an
enclave the state trusts, so that only the check the case is about refuses it; and a split a
host put together without any such enclave (its own key, a quote that binds another key or
comes from an enclave the ledger does not trust, a signature over another set).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

import pytest
from nacl.signing import SigningKey

from attest.certs import TcbStatus
from attest.hardware import Platform, VendorRoot
from kmnode.identity import IdentityKeys
from kmnode.km.commands import ClusterInitialised, KeyGeneration, ProposalChanged, Refused
from kmnode.km.enclave import EnclaveStateError, KMEnclave
from kmnode.km.recovery_commands import RecoveryShares, ShareAccepted, SharesCommitted
from kmnode.km.recovery_state import SplitDue
from kmnode.km.state import KMState, encode_command
from kmnode.recovery.shares import (
    BogusShare,
    RecoveryHolder,
    RecoverySet,
    ShareUnopened,
    UnknownHolder,
    WrongSecret,
    check_share,
    combine,
    open_share,
    split,
)
from tests.km.enclaves import KM_ID, NOW, PLATFORMS, bare_enclave, km_node
from tests.km.recovery_helpers import (
    ADMIN,
    ADMIN_ROLES,
    HOLDERS,
    OTHER_KM,
    Ledger,
    SplitSigner,
    box,
    genesis_entries,
    genesis_node,
    identity_set,
    open_shares,
    proposal,
    quoted_signer,
    rebuilt_secret,
    secret_forms,
    settled,
    share_command,
    signed,
    with_set,
)

SORTED = ["rec-1", "rec-2", "rec-3"]
#: A box's content does not matter to the state (only to the enclaves); its form does.
SOME_KEY = HOLDERS["rec-1"].public(["recovery"]).box_key


def holders(keys: dict[str, IdentityKeys]) -> tuple[RecoveryHolder, ...]:
    """What a split is due to: the holders by name, with their X25519 keys."""
    return tuple(RecoveryHolder(n, keys[n].public(["recovery"]).box_key) for n in sorted(keys))


def due(state: KMState) -> SplitDue | None:
    return state.recovery.due(state.identities)


def with_split() -> tuple[KMEnclave, Ledger, RecoveryShares]:
    """The genesis node of a cluster with three holders, and its first split (2 of 3), as its
    enclave signed it."""
    leader, ledger = genesis_node()
    first = leader.recovery_split(NOW)
    assert ledger.commit(first.encode()) == SharesCommitted(1, SORTED, 2)
    return leader, ledger, first


def assert_refused(ledger: Ledger, command: bytes, message: str) -> Refused:
    """``command`` commits refused, saying ``message``, and changes nothing in the state."""
    before = settled(ledger.state)
    refused = ledger.commit(command)
    assert isinstance(refused, Refused) and message in refused.error, refused
    assert settled(ledger.state) == before
    return refused


def command_with(signed_split: RecoveryShares, **fields: object) -> bytes:
    """``signed_split``'s command with ``fields`` replaced, checked or not (what a member's
    host could commit)."""
    return encode_command(**{**json.loads(signed_split.encode()), **fields})


def signed_share(holder: str, generation: int = 1) -> bytes:
    return share_command(holder, generation, {"n-a": box(secrets.token_bytes(32), SOME_KEY)})


def unsigned_share() -> bytes:
    boxes = {"n-a": box(secrets.token_bytes(32), SOME_KEY)}
    return encode_command("recovery.share", generation=1, boxes=boxes)


def threshold(count: int) -> dict[str, object]:
    return {"op": "recovery.threshold", "threshold": count}


def remove(name: str) -> dict[str, object]:
    return {"op": "identity.remove", "name": name}


# --- what is due --------------------------------------------------------------------------------


def test_genesis_holders_get_a_split_the_enclave_makes_and_each_holder_opens_its_own() -> None:
    leader = bare_enclave("n-a", "a")
    leader.genesis()
    ledger = Ledger(leader)
    with pytest.raises(EnclaveStateError, match="no recovery split is due"):
        leader.recovery_split(NOW)
    results = ledger.commit_all(*genesis_entries(leader.cluster_id, threshold=3))
    assert results[0] == ClusterInitialised("t") and all(r.ok for r in results)
    state = leader.state

    assert due(state) == SplitDue(holders(HOLDERS), 3, 1)
    command = leader.recovery_split(NOW)
    made = command.recovery_set
    assert (made.cluster_id, made.generation, made.threshold) == (leader.cluster_id, 1, 3)
    assert [(s.name, s.index) for s in made.shares] == [(n, i) for i, n in enumerate(SORTED, 1)]
    assert ledger.commit(command.encode()) == SharesCommitted(1, SORTED, 3)
    assert due(state) is None
    assert state.recovery.current == made
    assert state.recovery.view(state.identities)["split_due"] is False
    with pytest.raises(EnclaveStateError, match="no recovery split is due"):
        leader.recovery_split(NOW)

    shares = open_shares(made, SORTED)
    assert [s.index for s in shares.values()] == [1, 2, 3]
    with pytest.raises(ShareUnopened, match="rec-1"):
        open_share(made, "rec-1", HOLDERS["rec-2"].box_secret)
    secret = combine(made, shares.values())
    assert made.master_commitment == state.recovery.master_commitment
    outputs = repr(state) + repr(leader) + "".join(repr(s) for s in shares.values())
    for value in [secret, *(s.value for s in shares.values())]:
        assert all(form not in outputs for form in secret_forms(value))


def test_no_split_without_holders_and_none_above_the_holders() -> None:
    leader = bare_enclave("n-a", "a")
    leader.genesis()
    ledger = Ledger(leader)
    ledger.commit_all(*genesis_entries(leader.cluster_id, holders=()))
    state = ledger.state
    assert due(state) is None
    assert "no identity has the recovery role" in state.recovery.problem(state.identities)
    refused = ledger.commit(proposal(threshold(1)))
    assert isinstance(refused, ProposalChanged) and refused.state == "failed"
    assert refused.error == "threshold 1 exceeds the 0 recovery holders"

    ledger.govern(*(identity_set(k) for k in HOLDERS.values()))
    before = state.recovery.capture()
    refused = ledger.commit(proposal(threshold(4)))
    assert isinstance(refused, ProposalChanged) and refused.state == "failed"
    assert refused.error == "threshold 4 exceeds the 3 recovery holders"
    assert state.recovery.capture() == before
    ledger.govern(threshold(3))
    assert ledger.commit(leader.recovery_split(NOW).encode()) == SharesCommitted(1, SORTED, 3)

    # A holder leaves while the threshold names all three: no split can be made, and why shows.
    ledger.govern(remove("rec-3"))
    assert due(state) is None
    problem = "the threshold 3 exceeds the 2 recovery holders"
    assert state.recovery.problem(state.identities) == problem
    assert state.recovery.view(state.identities)["problem"] == problem
    with pytest.raises(EnclaveStateError):
        leader.recovery_split(NOW)
    ledger.govern(threshold(0))  # back to a majority
    assert due(state) == SplitDue(holders({n: HOLDERS[n] for n in ("rec-1", "rec-2")}), 2, 2)


NEW_KEY = IdentityKeys.generate("rec-2")
NEWCOMER = IdentityKeys.generate("rec-0")
LATECOMER = IdentityKeys.generate("rec-9")
#: A change of governance, the holders' keys a split is due to after it, and its threshold.
CHANGES: dict[str, tuple[dict[str, object], dict[str, IdentityKeys], int]] = {
    "holder added": (identity_set(NEWCOMER), {**HOLDERS, "rec-0": NEWCOMER}, 3),
    "holder removed": (remove("rec-2"), {n: HOLDERS[n] for n in ("rec-1", "rec-3")}, 2),
    "recovery role dropped": (
        identity_set(HOLDERS["rec-2"], ["auditor"]),
        {n: HOLDERS[n] for n in ("rec-1", "rec-3")},
        2,
    ),
    "box key changed": (identity_set(NEW_KEY), {**HOLDERS, "rec-2": NEW_KEY}, 2),
    "threshold changed": (threshold(3), HOLDERS, 3),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_of_holders_keys_or_threshold_makes_a_new_split_of_the_same_secret_due(
    change: str,
) -> None:
    leader, ledger, signed_first = with_split()
    first = signed_first.recovery_set
    secret = rebuilt_secret(first)
    action, keys, count = CHANGES[change]
    ledger.govern(action)
    assert due(ledger.state) == SplitDue(holders(keys), count, 2)

    signed_second = leader.recovery_split(NOW)
    second = signed_second.recovery_set
    assert ledger.commit(signed_second.encode()) == SharesCommitted(2, sorted(keys), count)
    assert due(ledger.state) is None
    assert second.master_commitment == first.master_commitment
    assert ledger.state.recovery.master_commitment == first.master_commitment
    assert ledger.state.recovery.current == second
    # Each holder opens the new split with the key the ledger now names; k of them rebuild
    # the same secret as before.
    shares = [open_share(second, n, keys[n].box_secret) for n in sorted(keys)]
    assert combine(second, shares[-count:]) == secret
    # A share of the first split is not a share of the second.
    old = open_share(first, "rec-1", HOLDERS["rec-1"].box_secret)
    with pytest.raises(BogusShare, match="rec-1"):
        check_share(second, "rec-1", old)
    if change == "box key changed":  # the old key opens nothing any more
        with pytest.raises(ShareUnopened):
            open_share(second, "rec-2", HOLDERS["rec-2"].box_secret)
    if "removed" in change or "dropped" in change:
        with pytest.raises(UnknownHolder):
            second.entry("rec-2")


def test_generations_count_up_over_successive_changes_and_the_commitment_stays() -> None:
    leader, ledger, first = with_split()
    changes = [
        identity_set(NEWCOMER),
        remove("rec-2"),
        identity_set(IdentityKeys.generate("rec-1")),
        threshold(3),
        threshold(0),
    ]
    for generation, change in enumerate(changes, 2):
        ledger.govern(change)
        command = leader.recovery_split(NOW)
        made = command.recovery_set
        assert made.generation == generation, change
        assert ledger.commit(command.encode()).ok, change
        assert ledger.state.recovery.current == made, change
        assert made.master_commitment == first.recovery_set.master_commitment, change


def test_changes_that_do_not_touch_the_split_make_none_due() -> None:
    leader, ledger, _ = with_split()
    ledger.govern(
        identity_set(IdentityKeys.generate("audit"), ["auditor"]),
        identity_set(ADMIN, [*ADMIN_ROLES, "auditor"]),
        identity_set(HOLDERS["rec-1"]),  # the same identity again
        threshold(2),  # what the majority was
    )
    assert ledger.commit(signed("key.rotate", key="db")) == KeyGeneration("db", 2)
    assert due(ledger.state) is None
    with pytest.raises(EnclaveStateError):
        leader.recovery_split(NOW)


def test_the_threshold_changes_only_through_a_passed_proposal() -> None:
    """``recovery.threshold`` is a governance action: committed bare (a member host proposing
    it), it must not lower the number of holders that together hold the cluster's secret."""
    _, ledger, _ = with_split()
    bare = encode_command("recovery.threshold", threshold=1)
    assert_refused(ledger, bare, "unknown operation 'recovery.threshold'")
    assert ledger.state.recovery.threshold == 0
    assert due(ledger.state) is None


def test_a_failed_proposal_leaves_the_threshold_as_it_was() -> None:
    """A proposal applies all its actions or none: one that fails after its threshold action
    must not leave the new threshold behind."""
    _, ledger, _ = with_split()
    failed = ledger.commit(proposal(threshold(3), remove("nobody")))
    assert isinstance(failed, ProposalChanged) and failed.state == "failed", failed
    assert ledger.state.recovery.threshold == 0
    assert due(ledger.state) is None


# --- which split the ledger takes ----------------------------------------------------------------

#: An enclave of the allowed KM code on member n-b's platform (not the leader's): the state
#: takes what it signs, so a split it signs is refused only by the check its case is about.
MEMBER_SIGNER = quoted_signer(PLATFORMS["b"])

#: A split differing from the due one (holders, threshold 2, generation 2 of the ledger's
#: cluster) in one respect, made with the right secret unless the case says otherwise; and
#: what the refusal says.
Forge = Callable[[bytes, tuple[RecoveryHolder, ...], str], RecoverySet]
FORGED: dict[str, tuple[Forge, str]] = {
    "an earlier generation": (
        lambda s, h, c: split(s, h, 2, cluster_id=c, generation=1),
        "generation 1, the ledger expects 2",
    ),
    "a later generation": (
        lambda s, h, c: split(s, h, 2, cluster_id=c, generation=3),
        "generation 3, the ledger expects 2",
    ),
    "another threshold": (
        lambda s, h, c: split(s, h, 3, cluster_id=c, generation=2),
        "threshold 3, the ledger expects 2",
    ),
    "a holder left out": (
        lambda s, h, c: split(s, h[:2], 2, cluster_id=c, generation=2),
        "holders are not the recovery identities",
    ),
    "a stranger for a holder": (
        lambda s, h, c: split(
            s, (*h[:2], RecoveryHolder("eve", h[2].box_key)), 2, cluster_id=c, generation=2
        ),
        "holders are not the recovery identities",
    ),
    "the holders in another order": (
        lambda s, h, c: split(s, h[::-1], 2, cluster_id=c, generation=2),
        "holders are not the recovery identities",
    ),
    "another cluster id": (
        lambda s, h, c: split(s, h, 2, cluster_id="f" * 32, generation=2),
        "names another cluster",
    ),
    "another secret": (
        lambda s, h, c: split(secrets.token_bytes(32), h, 2, cluster_id=c, generation=2),
        "of another secret than the ledger's",
    ),
}


def second_split_due() -> tuple[KMEnclave, Ledger]:
    """A ledger with a first split, after a holder's key changed: split 2 is due."""
    leader, ledger, _ = with_split()
    ledger.govern(identity_set(NEW_KEY))
    return leader, ledger


def test_the_due_split_signed_by_an_allowed_enclave_on_a_members_platform_is_taken() -> None:
    """The state trusts the KM code on a member's platform to split only its own secret: any
    such enclave's signature counts, not only the leader's. The signer the forged splits
    below are signed with is one, so each of them is refused by its own check alone."""
    _, ledger = second_split_due()
    expected = due(ledger.state)
    assert expected is not None
    secret = rebuilt_secret(ledger.state.recovery.current or pytest.fail("no split"))
    made = split(secret, expected.holders, 2, cluster_id=ledger.state.cluster_id, generation=2)
    assert ledger.commit(MEMBER_SIGNER.sign(made).encode()) == SharesCommitted(2, SORTED, 2)
    assert ledger.state.recovery.current == made


@pytest.mark.parametrize("case", FORGED)
def test_a_split_other_than_the_due_one_is_refused_and_changes_nothing(case: str) -> None:
    leader, ledger = second_split_due()
    expected = due(ledger.state)
    assert expected is not None and expected.generation == 2
    secret = rebuilt_secret(ledger.state.recovery.current or pytest.fail("no split"))
    forge, message = FORGED[case]
    forged = MEMBER_SIGNER.sign(forge(secret, expected.holders, leader.cluster_id))
    refused = assert_refused(ledger, forged.encode(), message)
    assert due(ledger.state) == expected
    assert all(form not in refused.error for form in secret_forms(secret))
    # The split the state asked for still commits.
    assert ledger.commit(leader.recovery_split(NOW).encode()).ok


def host_split(ledger: Ledger) -> RecoverySet:
    """The split a host without the master secret can build: the due holders, threshold,
    generation and cluster id, random shares that match their own commitments, and the
    ledger's master commitment copied (a secret of the host's choosing if there is none yet)."""
    expected = due(ledger.state)
    assert expected is not None
    public = split(
        secrets.token_bytes(32),
        expected.holders,
        expected.threshold,
        cluster_id=ledger.state.cluster_id,
        generation=expected.generation,
    )
    commitment = ledger.state.recovery.master_commitment or public.master_commitment
    return RecoverySet.model_validate({**public.model_dump(), "master_commitment": commitment})


def test_a_host_can_build_a_split_that_every_holders_check_passes_on() -> None:
    """Why a split must be signed: under the ledger's commitment, a host's split passes each
    holder's ``share show`` check; only the recovery itself would find the secret gone (the
    failure CCF's users met, microsoft/CCF#1051). Taken, it would replace the split that can
    rebuild the secret."""
    _, ledger = second_split_due()
    forged = host_split(ledger)
    keys = {**HOLDERS, "rec-2": NEW_KEY}
    shares = [open_share(forged, n, keys[n].box_secret) for n in SORTED]  # every check passes
    assert forged.master_commitment == ledger.state.recovery.master_commitment
    with pytest.raises(WrongSecret):
        combine(forged, shares)


#: When a host offers its own split: the first one (no commitment on the ledger yet: a secret
#: of its choosing), or a later one under the ledger's commitment.
MOMENTS: dict[str, Callable[[], tuple[KMEnclave, Ledger]]] = {
    "the first split": genesis_node,
    "a later split": second_split_due,
}
#: How a host without a trusted enclave's help signs its split, given the split the leader's
#: enclave signed for the same moment; and what the refusal says.
HostProof = Callable[[RecoverySet, RecoveryShares], RecoveryShares]
HOST_PROOFS: dict[str, tuple[HostProof, str]] = {
    "the leader's signature of its own split": (
        lambda forged, real: with_set(real, forged),
        "recovery split does not verify under its key",
    ),
    "the host's key under the leader's quote": (
        lambda forged, real: SplitSigner(SigningKey.generate(), bytes.fromhex(real.quote)).sign(
            forged
        ),
        "recovery split: the quote does not bind the signing key",
    ),
    "an enclave on a platform no member runs on": (
        lambda forged, _: quoted_signer(PLATFORMS["c"]).sign(forged),
        "recovery split by platform 'c', not a member's",
    ),
    "another build on a member's platform": (
        lambda forged, _: quoted_signer(PLATFORMS["a"], OTHER_KM).sign(forged),
        "recovery split by an enclave the policy does not allow",
    ),
    "a quote that is no quote": (
        lambda forged, _: SplitSigner(SigningKey.generate(), b"KMQ1" * 4).sign(forged),
        "recovery split: quote or signature is malformed",
    ),
}


@pytest.mark.parametrize("proof", HOST_PROOFS)
@pytest.mark.parametrize("moment", MOMENTS)
def test_a_split_no_trusted_enclave_signed_is_refused(moment: str, proof: str) -> None:
    leader, ledger = MOMENTS[moment]()
    expected = due(ledger.state)
    real = leader.recovery_split(NOW)
    sign, message = HOST_PROOFS[proof]
    assert_refused(ledger, sign(host_split(ledger), real).encode(), message)
    assert due(ledger.state) == expected
    assert ledger.commit(real.encode()).ok
    assert ledger.state.recovery.current == real.recovery_set


#: Member n-a's platform name under a certificate from a vendor root the host made itself: its
#: quotes say "the allowed KM code on platform 'a'" and bind any key the host likes.
COUNTERFEIT_A = Platform(
    "a",
    TcbStatus.UP_TO_DATE,
    b"counterfeit".ljust(32, b"\0"),
    VendorRoot(b"host".ljust(32, b"\0")),
)


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_split_under_a_quote_no_genuine_platform_made_is_refused(moment: str) -> None:
    """A quote is only as good as its platform's certificate: one no vendor-certified
    platform signed says nothing about which code holds the key it binds."""
    leader, ledger = MOMENTS[moment]()
    counterfeit = quoted_signer(COUNTERFEIT_A).sign(host_split(ledger))
    assert_refused(ledger, counterfeit.encode(), "recovery split")
    assert ledger.commit(leader.recovery_split(NOW).encode()).ok


@pytest.mark.parametrize("case", ["another split the enclave made", "two holders' boxes swapped"])
def test_a_split_changed_after_its_enclave_signed_it_is_refused(case: str) -> None:
    leader, ledger = second_split_due()
    real = leader.recovery_split(NOW)
    made = real.recovery_set
    if case == "another split the enclave made":
        changed = leader.recovery_split(NOW).recovery_set
        assert changed != made
    else:
        one, two, *rest = made.shares
        swapped = (
            one.model_copy(update={"boxed": two.boxed}),
            two.model_copy(update={"boxed": one.boxed}),
        )
        changed = made.model_copy(update={"shares": (*swapped, *rest)})
    assert_refused(ledger, with_set(real, changed).encode(), "recovery split does not verify")
    assert ledger.commit(real.encode()).ok


def test_a_split_by_a_build_or_platform_governance_no_longer_allows_is_refused() -> None:
    """The leader's own enclave, once its build is disallowed (an upgrade to a new build) or
    its platform revoked, makes splits the ledger refuses; the allowed build, and an enclave
    on a platform still trusted, have theirs taken."""
    leader, ledger = second_split_due()
    km = {"role": "km"}
    ledger.govern(
        {"op": "policy.allow", **km, "measurement": OTHER_KM.measurement.hex()},
        {"op": "policy.disallow", **km, "measurement": KM_ID.measurement.hex()},
    )
    old_build = leader.recovery_split(NOW)
    assert_refused(
        ledger, old_build.encode(), "recovery split by an enclave the policy does not allow"
    )
    assert_refused(
        ledger, MEMBER_SIGNER.sign(old_build.recovery_set).encode(), "the policy does not allow"
    )
    upgraded = quoted_signer(PLATFORMS["a"], OTHER_KM).sign(old_build.recovery_set)
    assert ledger.commit(upgraded.encode()) == SharesCommitted(2, SORTED, 2)

    leader, ledger = second_split_due()
    ledger.govern({"op": "policy.revoke_platform", "platform_id": "a"})
    revoked = leader.recovery_split(NOW)
    assert_refused(
        ledger, revoked.encode(), "recovery split by an enclave the policy does not allow"
    )
    assert ledger.commit(MEMBER_SIGNER.sign(revoked.recovery_set).encode()).ok


def test_another_clusters_enclave_split_the_old_split_and_a_replay_are_refused() -> None:
    _, ledger, first = with_split()
    assert_refused(ledger, first.encode(), "the recovery split on the ledger is current")

    ledger.govern(identity_set(NEW_KEY))
    # Another cluster's genuine enclave on member n-a's platform, the same holders.
    stranger, _ = genesis_node()
    assert_refused(ledger, stranger.recovery_split(NOW).encode(), "names another cluster")
    assert_refused(ledger, first.encode(), "generation 1, the ledger expects 2")


def test_a_split_before_any_holder_and_a_malformed_set_are_refused() -> None:
    leader, ledger, first = with_split()
    empty = km_node("n-a", "a", cluster_id=leader.cluster_id)
    assert_refused(Ledger(empty), first.encode(), "no identity has the recovery role")

    body = first.recovery_set.model_dump(mode="json")
    ledger.govern(identity_set(NEW_KEY))
    # The enclave's key, quote and signature around a set that is not well formed: refused
    # for its form, before any signature is looked at.
    malformed = {
        "threshold exceeds the number of holders": {**body, "threshold": 4},
        "a holder appears twice": {**body, "shares": [body["shares"][0]] * 3},
        "boxed is 3 bytes, not 80": {
            **body,
            "shares": [{**body["shares"][0], "boxed": "AAAA"}, *body["shares"][1:]],
        },
    }
    for message, recovery_set in malformed.items():
        refused = assert_refused(ledger, command_with(first, recovery_set=recovery_set), message)
        assert refused.error.startswith("'recovery_set"), refused
    unsigned = encode_command("recovery.shares", recovery_set=body)
    assert_refused(ledger, unsigned, "'public_key': Field required")


# --- shares in a recovery -----------------------------------------------------------------------


def test_shares_count_only_from_the_splits_holders_once_each_until_complete() -> None:
    _, ledger, _ = with_split()
    state = ledger.state
    ledger.govern(identity_set(LATECOMER))  # a holder named after the split
    recovery_before = state.recovery.capture()

    refusals: dict[bytes, tuple[str, str]] = {
        unsigned_share(): ("recovery.share needs a signed request", "forbidden"),
        signed_share("ops"): ("needs the recovery role", "forbidden"),
        signed_share("nobody"): ("no identity named 'nobody'", "unknown_identity"),
        signed_share("rec-9"): ("'rec-9' holds no share of split 1", "refused"),
        signed_share("rec-1", generation=2): ("the ledger's split is 1", "refused"),
        signed_share("rec-1", generation=0): ("the ledger's split is 1", "refused"),
    }
    for command, (message, code) in refusals.items():
        refused = ledger.commit(command)
        assert isinstance(refused, Refused), (message, refused)
        assert message in refused.error and refused.code == code, refused
    assert state.recovery.capture() == recovery_before

    first_index = state.applied_index + 1
    accepted = signed_share("rec-2")
    assert ledger.commit(accepted) == ShareAccepted("rec-2", 1, 1, 2, False)
    assert state.recovery.complete_index == 0
    again = ledger.commit(signed_share("rec-2"))
    assert again == Refused("'rec-2' already submitted its share", "replay")
    same_request = ledger.commit(accepted)
    assert isinstance(same_request, Refused) and same_request.code == "replay"
    assert state.recovery.submitted["rec-2"].index == first_index

    complete_index = state.applied_index + 1
    assert ledger.commit(signed_share("rec-3")) == ShareAccepted("rec-3", 1, 2, 2, True)
    assert state.recovery.complete_index == complete_index
    assert sorted(state.recovery.submitted) == ["rec-2", "rec-3"]
    late = ledger.commit(signed_share("rec-1"))
    assert late == Refused(f"split 1 has already rebuilt the secret (at index {complete_index})")
    assert sorted(state.recovery.submitted) == ["rec-2", "rec-3"]

    # A completed recovery makes a fresh split due (to the holders the ledger names now).
    assert due(state) == SplitDue(holders({**HOLDERS, "rec-9": LATECOMER}), 3, 2)
    view = state.recovery.view(state.identities)
    assert view["submitted"] == ["rec-2", "rec-3"] and view["complete_index"] == complete_index


def test_a_share_before_any_split_and_without_identities_is_refused() -> None:
    _, ledger = genesis_node()
    refused = ledger.commit(signed_share("rec-1"))
    assert refused == Refused("the ledger holds no recovery split")

    legacy = km_node("n-a", "a", genesis=True)  # a ledger without identities
    refused = Ledger(legacy).commit(unsigned_share())
    assert refused == Refused("recovery.share needs a signed request", "forbidden")


# --- snapshots ------------------------------------------------------------------------------------


@pytest.mark.parametrize("submitted", [0, 1, 2])
def test_a_snapshot_keeps_the_split_and_the_shares_of_a_recovery(submitted: int) -> None:
    leader, ledger = second_split_due()
    assert ledger.commit(leader.recovery_split(NOW).encode()).ok
    for holder in SORTED[:submitted]:
        assert ledger.commit(signed_share(holder, generation=2)).ok
    state = ledger.state
    blob = state.snapshot()
    restored = KMState.restore(blob)
    assert restored.recovery == state.recovery
    assert restored.recovery.boxed_to == holders({**HOLDERS, "rec-2": NEW_KEY})
    assert sorted(restored.recovery.submitted) == SORTED[:submitted]
    assert restored.recovery.complete_index == state.recovery.complete_index
    assert bool(restored.recovery.complete_index) == (submitted == 2)
    assert restored.snapshot() == blob
    assert due(restored) == due(state)
    # And both go on alike (the next share is taken, or refused after completion, by both).
    follow = signed_share("rec-3", generation=2)
    assert restored.apply(state.applied_index + 1, follow) == ledger.commit(follow)
    assert restored.snapshot() == state.snapshot()
