"""Recovery shares: any k open the master secret, k-1 do not, and a bogus share is refused at
once, naming its holder, before any ceremony could end on it."""

from __future__ import annotations

import json
import random
import secrets
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from kmnode.recovery.shares import (
    MAX_SET_JSON_BYTES,
    BogusShare,
    InvalidRecoveryParameters,
    NotEnoughShares,
    RecoveryError,
    RecoveryHolder,
    RecoverySet,
    RecoverySetInvalid,
    Share,
    ShareUnopened,
    UnknownHolder,
    WrongSecret,
    check_share,
    combine,
    open_share,
    share_commitment,
    split,
)

CLUSTER = "c-test"


@dataclass(frozen=True)
class Holders:
    """Recovery operators with their X25519 secrets, as their laptops would hold them."""

    secrets: dict[str, bytes]

    @classmethod
    def make(cls, n: int) -> Holders:
        return cls({f"op{i}": bytes(PrivateKey.generate()) for i in range(n)})

    def public(self) -> list[RecoveryHolder]:
        return [
            RecoveryHolder(name, PrivateKey(sk).public_key.encode().hex())
            for name, sk in self.secrets.items()
        ]

    def open_all(self, rset: RecoverySet) -> list[Share]:
        return [open_share(rset, name, sk) for name, sk in self.secrets.items()]


def _setup(n: int = 5, k: int = 3, generation: int = 1) -> tuple[bytes, Holders, RecoverySet]:
    master = secrets.token_bytes(32)
    holders = Holders.make(n)
    return (
        master,
        holders,
        split(master, holders.public(), k, cluster_id=CLUSTER, generation=generation),
    )


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 7).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))), st.randoms())
def test_any_k_shares_open_it_and_k_minus_1_do_not(nk: tuple[int, int], rnd: random.Random) -> None:
    n, k = nk
    master, holders, rset = _setup(n, k)
    shares = holders.open_all(rset)
    rnd.shuffle(shares)
    assert combine(rset, shares[:k]) == master
    assert combine(rset, shares) == master  # more than k is fine too
    with pytest.raises(NotEnoughShares) as info:
        combine(rset, shares[: k - 1])
    assert (info.value.have, info.value.need) == (k - 1, k)


def test_a_share_given_twice_counts_once() -> None:
    _, holders, rset = _setup(5, 3)
    shares = holders.open_all(rset)
    with pytest.raises(NotEnoughShares):
        combine(rset, [shares[0], shares[1], shares[0]])


def _flipped(share: Share) -> Share:
    value = bytearray(share.value)
    value[7] ^= 1
    return replace(share, value=bytes(value))


def test_bogus_shares_are_refused_at_check_naming_the_holder() -> None:
    master, holders, rset = _setup(4, 2)
    a, b = holders.open_all(rset)[:2]
    # the same holders' share of a later split of the same secret
    later = split(master, holders.public(), 2, cluster_id=CLUSTER, generation=2)
    b_later = open_share(later, "op1", holders.secrets["op1"])
    bogus = {
        "flipped byte": _flipped(b),
        "another holder's share": replace(a, name="op1"),
        "another holder's share at its index": Share("op1", b.index, a.value),
        "another generation's share": b_later,
        "garbage": Share.from_b64("op1", b.index, "not base64 !!"),
        "too short": Share("op1", b.index, b.value[:16]),
        "too long": Share("op1", b.index, b.value + b"\0"),
        "wrong index": Share("op1", a.index, b.value),
    }
    for what, share in bogus.items():
        with pytest.raises(BogusShare) as info:
            check_share(rset, "op1", share)
        assert info.value.name == "op1", what
        assert "op1" in str(info.value), what
        # combine refuses it too, before rebuilding anything
        with pytest.raises(BogusShare):
            combine(rset, [a, share])
    check_share(rset, "op1", b)  # the real one passes
    assert Share.from_b64("op1", b.index, b.to_b64()) == b


def test_a_share_of_someone_outside_the_set_is_refused() -> None:
    _, holders, rset = _setup(3, 2)
    share = holders.open_all(rset)[0]
    with pytest.raises(UnknownHolder):
        check_share(rset, "mallory", replace(share, name="mallory"))


def test_the_wrong_box_key_cannot_open_a_share() -> None:
    _, holders, rset = _setup(3, 2)
    with pytest.raises(ShareUnopened):
        open_share(rset, "op0", holders.secrets["op1"])
    with pytest.raises(ShareUnopened):
        open_share(rset, "op0", bytes(PrivateKey.generate()))
    with pytest.raises(ShareUnopened):
        open_share(rset, "op0", b"short")


def test_a_host_swapping_boxes_is_caught_when_the_share_is_opened() -> None:
    _, holders, rset = _setup(3, 2)
    doc = json.loads(rset.to_json())
    doc["shares"][0]["boxed"], doc["shares"][1]["boxed"] = (
        doc["shares"][1]["boxed"],
        doc["shares"][0]["boxed"],
    )
    swapped = RecoverySet.from_json(json.dumps(doc))
    # op0 now finds op1's box: it does not open with op0's key
    with pytest.raises(ShareUnopened):
        open_share(swapped, "op0", holders.secrets["op0"])


def test_forged_commitments_cannot_open_to_a_wrong_secret() -> None:
    """A host that rewrites every share commitment to fit shares of its own choosing is caught
    by the master commitment: the cluster never opens to a secret it did not have."""
    _, _, rset = _setup(3, 2)
    forged_values = {entry.name: secrets.token_bytes(32) for entry in rset.shares}
    forged = rset.model_copy(
        update={
            "shares": tuple(
                entry.model_copy(
                    update={
                        "commitment": share_commitment(
                            CLUSTER, 1, entry.name, entry.index, forged_values[entry.name]
                        )
                    }
                )
                for entry in rset.shares
            )
        }
    )
    forged_shares = [Share(e.name, e.index, forged_values[e.name]) for e in rset.shares]
    with pytest.raises(WrongSecret):
        combine(forged, forged_shares)


def test_the_set_round_trips_through_json_and_still_opens() -> None:
    master, holders, rset = _setup(5, 3)
    text = rset.to_json()
    again = RecoverySet.from_json(text)
    assert again == rset
    assert RecoverySet.from_json(text.encode()) == rset
    assert combine(again, holders.open_all(again)[2:]) == master


def _mutations(doc: dict[str, object]) -> dict[str, object]:
    shares = doc["shares"]
    assert isinstance(shares, list)
    first = shares[0]
    return {
        "not json": "{",
        "a list": [],
        "an unknown field": {**doc, "extra": 1},
        "threshold zero": {**doc, "threshold": 0},
        "threshold above n": {**doc, "threshold": len(shares) + 1},
        "threshold as string": {**doc, "threshold": "2"},
        "no shares": {**doc, "shares": []},
        "duplicate holder": {**doc, "shares": [first, {**first, "index": 2}, *shares[2:]]},
        "indices not 1..n": {**doc, "shares": [{**first, "index": 9}, *shares[1:]]},
        "boxed not base64": {**doc, "shares": [{**first, "boxed": "@@@@"}, *shares[1:]]},
        "boxed short": {**doc, "shares": [{**first, "boxed": "AAAA"}, *shares[1:]]},
        "commitment not hex": {**doc, "shares": [{**first, "commitment": "z" * 64}, *shares[1:]]},
        "bad holder name": {**doc, "shares": [{**first, "name": "Op 0"}, *shares[1:]]},
        "negative generation": {**doc, "generation": -1},
        "deep": {**doc, "cluster_id": [[[[[["x"]]]]]]},
    }


def test_garbage_and_tampered_set_texts_are_refused_with_a_typed_error() -> None:
    _, _, rset = _setup(3, 2)
    doc = json.loads(rset.to_json())
    for what, bad in _mutations(doc).items():
        text = bad if isinstance(bad, str) else json.dumps(bad)
        with pytest.raises(RecoverySetInvalid):
            RecoverySet.from_json(text)
            pytest.fail(what)
    with pytest.raises(RecoverySetInvalid, match="at most"):
        RecoverySet.from_json(" " * (MAX_SET_JSON_BYTES + 1))


@pytest.mark.parametrize(
    ("n", "k", "why"),
    [(3, 0, "threshold"), (3, 4, "threshold"), (0, 1, "holders"), (256, 2, "holders")],
)
def test_split_refuses_impossible_thresholds(n: int, k: int, why: str) -> None:
    holders = [RecoveryHolder(f"op{i}", "11" * 32) for i in range(n)]
    with pytest.raises(InvalidRecoveryParameters, match=why):
        split(secrets.token_bytes(32), holders, k, cluster_id=CLUSTER, generation=0)


def test_split_refuses_bad_holders_and_secrets() -> None:
    good = Holders.make(2).public()
    cases: list[tuple[bytes, list[RecoveryHolder]]] = [
        (secrets.token_bytes(32), [good[0], good[0]]),
        (secrets.token_bytes(32), [good[0], RecoveryHolder("op9", "zz" * 32)]),
        (secrets.token_bytes(32), [good[0], RecoveryHolder("op9", "11" * 31)]),
        (secrets.token_bytes(32), [good[0], RecoveryHolder("op9", "00" * 32)]),
        (secrets.token_bytes(32), [good[0], RecoveryHolder("Bad Name", good[1].box_key)]),
        (secrets.token_bytes(31), good),
    ]
    for master, holders in cases:
        with pytest.raises(InvalidRecoveryParameters):
            split(master, holders, 1, cluster_id=CLUSTER, generation=0)
    with pytest.raises(InvalidRecoveryParameters):
        split(secrets.token_bytes(32), good, True, cluster_id=CLUSTER, generation=0)
    with pytest.raises(InvalidRecoveryParameters):
        split(secrets.token_bytes(32), good, 1, cluster_id="", generation=0)


def test_no_secret_in_any_repr_or_error_message() -> None:
    marker = b"\xa5SECRET-MARKER-\x5a" * 2  # 32 bytes, recognisable in hex, base64 or raw
    holders = Holders.make(3)
    rset = split(marker, holders.public(), 2, cluster_id=CLUSTER, generation=0)
    shares = holders.open_all(rset)
    assert combine(rset, shares[:2]) == marker
    texts = [
        repr(rset),
        str(rset),
        rset.to_json(),
        *(repr(s) for s in shares),
        repr(holders.public()),
    ]
    errors: list[RecoveryError] = []
    for attempt in (
        lambda: combine(rset, shares[:1]),
        lambda: check_share(rset, "op0", _flipped(shares[0])),
        lambda: open_share(rset, "op0", holders.secrets["op1"]),
        lambda: split(marker, holders.public(), 9, cluster_id=CLUSTER, generation=0),
        lambda: split(marker[:31], holders.public(), 2, cluster_id=CLUSTER, generation=0),
    ):
        with pytest.raises(RecoveryError) as info:
            attempt()
        errors.append(info.value)
    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    secret_forms = [marker.hex(), "SECRET-MARKER"]
    for share in shares:
        secret_forms += [share.value.hex(), share.to_b64()]
    for sk in holders.secrets.values():
        secret_forms.append(sk.hex())
    for text in texts:
        for form in secret_forms:
            assert form not in text
