"""The replicated recovery records: which split of the master secret the ledger needs, which
split it accepts, and which holders' shares count in a recovery, all through ``KMState.apply``.

Holders, their keys and the threshold change through passed proposals, as governance changes
them. The splits are the ones the leader's enclave makes (``KMEnclave.recovery_split``); the
forged ones are what a lying leader could make with the secret (the holders together rebuild it
with the public library), each differing from the due split in one respect, or what a host
could make without it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest

from kmnode.identity import IdentityKeys
from kmnode.km.commands import ClusterInitialised, KeyGeneration, ProposalChanged, Refused
from kmnode.km.enclave import EnclaveStateError, KMEnclave
from kmnode.km.recovery_commands import ShareAccepted, SharesCommitted
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
from tests.km.enclaves import bare_enclave, km_node
from tests.km.recovery_helpers import (
    ADMIN,
    ADMIN_ROLES,
    HOLDERS,
    Ledger,
    box,
    genesis_entries,
    genesis_node,
    identity_set,
    open_shares,
    proposal,
    rebuilt_secret,
    secret_forms,
    settled,
    share_command,
    shares_command,
    signed,
)

SORTED = ["rec-1", "rec-2", "rec-3"]
#: A box's content does not matter to the state (only to the enclaves); its form does.
SOME_KEY = HOLDERS["rec-1"].public(["recovery"]).box_key


def holders(keys: dict[str, IdentityKeys]) -> tuple[RecoveryHolder, ...]:
    """What a split is due to: the holders by name, with their X25519 keys."""
    return tuple(RecoveryHolder(n, keys[n].public(["recovery"]).box_key) for n in sorted(keys))


def due(state: KMState) -> SplitDue | None:
    return state.recovery.due(state.identities)


def with_split() -> tuple[KMEnclave, Ledger, RecoverySet]:
    """The genesis node of a cluster with three holders, and its first split (2 of 3)."""
    leader, ledger = genesis_node()
    first = leader.recovery_split()
    assert ledger.commit(shares_command(first)) == SharesCommitted(1, SORTED, 2)
    return leader, ledger, first


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
        leader.recovery_split()
    results = ledger.commit_all(*genesis_entries(leader.cluster_id, threshold=3))
    assert results[0] == ClusterInitialised("t") and all(r.ok for r in results)
    state = leader.state

    assert due(state) == SplitDue(holders(HOLDERS), 3, 1)
    made = leader.recovery_split()
    assert (made.cluster_id, made.generation, made.threshold) == (leader.cluster_id, 1, 3)
    assert [(s.name, s.index) for s in made.shares] == [(n, i) for i, n in enumerate(SORTED, 1)]
    assert ledger.commit(shares_command(made)) == SharesCommitted(1, SORTED, 3)
    assert due(state) is None
    assert state.recovery.view(state.identities)["split_due"] is False
    with pytest.raises(EnclaveStateError, match="no recovery split is due"):
        leader.recovery_split()

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
    assert ledger.commit(shares_command(leader.recovery_split())) == SharesCommitted(1, SORTED, 3)

    # A holder leaves while the threshold names all three: no split can be made, and why shows.
    ledger.govern(remove("rec-3"))
    assert due(state) is None
    problem = "the threshold 3 exceeds the 2 recovery holders"
    assert state.recovery.problem(state.identities) == problem
    assert state.recovery.view(state.identities)["problem"] == problem
    with pytest.raises(EnclaveStateError):
        leader.recovery_split()
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
    leader, ledger, first = with_split()
    secret = rebuilt_secret(first)
    action, keys, count = CHANGES[change]
    ledger.govern(action)
    assert due(ledger.state) == SplitDue(holders(keys), count, 2)

    second = leader.recovery_split()
    assert ledger.commit(shares_command(second)) == SharesCommitted(2, sorted(keys), count)
    assert due(ledger.state) is None
    assert second.master_commitment == first.master_commitment
    assert ledger.state.recovery.master_commitment == first.master_commitment
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
        made = leader.recovery_split()
        assert made.generation == generation, change
        assert ledger.commit(shares_command(made)).ok, change
        assert ledger.state.recovery.current == made, change
        assert made.master_commitment == first.master_commitment, change


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
        leader.recovery_split()


def test_the_threshold_changes_only_through_a_passed_proposal() -> None:
    """``recovery.threshold`` is a governance action: committed bare (a member host proposing
    it), it must not lower the number of holders that together hold the cluster's secret."""
    _, ledger, _ = with_split()
    before = settled(ledger.state)
    refused = ledger.commit(encode_command("recovery.threshold", threshold=1))
    assert isinstance(refused, Refused), refused
    assert settled(ledger.state) == before
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


@pytest.mark.parametrize("case", FORGED)
def test_a_split_other_than_the_due_one_is_refused_and_changes_nothing(case: str) -> None:
    leader, ledger, first = with_split()
    ledger.govern(identity_set(NEW_KEY))
    expected = due(ledger.state)
    assert expected is not None and expected.generation == 2
    secret = rebuilt_secret(first)
    forge, message = FORGED[case]
    before = settled(ledger.state)
    refused = ledger.commit(shares_command(forge(secret, expected.holders, leader.cluster_id)))
    assert isinstance(refused, Refused) and message in refused.error, refused
    assert settled(ledger.state) == before
    assert due(ledger.state) == expected
    assert all(form not in refused.error for form in secret_forms(secret))
    # The split the state asked for still commits.
    assert ledger.commit(shares_command(leader.recovery_split())).ok


def test_a_split_no_enclave_made_is_refused_even_under_the_ledgers_commitment() -> None:
    """A host without the secret can still build a split that passes every check the state
    makes: the due holders, threshold, generation and cluster id, the ledger's master
    commitment copied, and random shares that match their own commitments. Each holder's
    ``share show`` check passes on it; only the recovery itself would find the secret gone
    (the failure CCF's users met, microsoft/CCF#1051). The state must not take it: it would
    replace the split that can rebuild the secret."""
    _, ledger, _ = with_split()
    ledger.govern(identity_set(NEW_KEY))
    expected = due(ledger.state)
    assert expected is not None
    public = split(
        secrets.token_bytes(32),
        expected.holders,
        expected.threshold,
        cluster_id=ledger.state.cluster_id,
        generation=expected.generation,
    )
    forged = RecoverySet.model_validate(
        {**public.model_dump(), "master_commitment": ledger.state.recovery.master_commitment}
    )
    keys = {**HOLDERS, "rec-2": NEW_KEY}
    shares = [open_share(forged, n, keys[n].box_secret) for n in SORTED]  # every check passes
    with pytest.raises(WrongSecret):
        combine(forged, shares)
    before = settled(ledger.state)
    result = ledger.commit(shares_command(forged))
    assert isinstance(result, Refused), result
    assert settled(ledger.state) == before


def test_another_clusters_enclave_split_the_old_split_and_a_replay_are_refused() -> None:
    _, ledger, first = with_split()
    before = settled(ledger.state)
    replay = ledger.commit(shares_command(first))
    assert replay == Refused("the recovery split on the ledger is current")
    assert settled(ledger.state) == before

    ledger.govern(identity_set(NEW_KEY))
    stranger, _ = genesis_node()  # another cluster, another secret, the same holders
    cases = {
        shares_command(stranger.recovery_split()): "names another cluster",
        shares_command(first): "generation 1, the ledger expects 2",
    }
    before = settled(ledger.state)
    for command, message in cases.items():
        refused = ledger.commit(command)
        assert isinstance(refused, Refused) and message in refused.error, refused
    assert settled(ledger.state) == before


def test_a_split_before_any_holder_and_a_malformed_set_are_refused() -> None:
    leader, ledger, first = with_split()
    empty = km_node("n-a", "a", cluster_id=leader.cluster_id)
    refused = Ledger(empty).commit(shares_command(first))
    assert isinstance(refused, Refused) and "no identity has the recovery role" in refused.error

    body = first.model_dump(mode="json")
    ledger.govern(identity_set(NEW_KEY))
    before = settled(ledger.state)
    malformed = {
        "threshold above the holders": {**body, "threshold": 4},
        "a share twice": {**body, "shares": [body["shares"][0]] * 3},
        "a box cut short": {
            **body,
            "shares": [{**body["shares"][0], "boxed": "AAAA"}, *body["shares"][1:]],
        },
    }
    for case, recovery_set in malformed.items():
        refused = ledger.commit(encode_command("recovery.shares", recovery_set=recovery_set))
        assert isinstance(refused, Refused), case
    assert settled(ledger.state) == before


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
    leader, ledger, _ = with_split()
    ledger.govern(identity_set(NEW_KEY))
    ledger.commit(shares_command(leader.recovery_split()))
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
