"""Test helpers for recovery (issue 16): holders with the private keys their laptops keep, a
ledger that commits the same bytes to several enclaves and keeps them so that fresh enclaves
can replay them (what a node that lost its sealed state does), shares signed by a holder and
boxed to enclaves' recovery keys, and splits signed by whatever signer a test needs (a real
enclave signs only the split its state asks for, with its own key; a test that wants another
split signed, or a split signed by another enclave, signs it here)."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nacl.public import PublicKey, SealedBox
from nacl.signing import SigningKey

from attest.hardware import Platform
from attest.identity import EnclaveIdentity, measure_sources
from attest.quote import QuoteVerifier, report_data_for
from kmnode.identity import IdentityKeys, Role
from kmnode.km.commands import Applied, ProposalChanged
from kmnode.km.enclave import KMEnclave
from kmnode.km.ledger_proof import SIGNER_LABEL, split_message
from kmnode.km.recovery_commands import RecoveryShares
from kmnode.km.recovery_state import canonical_split
from kmnode.km.state import KMState, encode_command
from kmnode.recovery.boxing import box_share, verify_recovery_key
from kmnode.recovery.shares import RecoverySet, Share, combine, open_share
from tests.km.enclaves import KM_ID, MEMBERS, NOW, POLICY, VENDOR, bare_enclave

#: Another build of the KM enclave, which the test policy does not allow.
OTHER_KM = dataclasses.replace(KM_ID, measurement=measure_sources({"km": b"km v2"}))

#: Creation time of every signed request here (the state keeps request ids for a window after
#: the newest one, so every stamp of a test uses the same time).
CREATED = int(NOW)
#: Three recovery operators, named out of order on purpose: a split sorts them by name.
HOLDERS: dict[str, IdentityKeys] = {
    name: IdentityKeys.generate(name) for name in ("rec-3", "rec-1", "rec-2")
}
#: The one admin (so a proposal of it passes at once); an operator too, to manage keys.
ADMIN = IdentityKeys.generate("ops")
ADMIN_ROLES: list[Role] = ["admin", "operator"]
_NONCES = itertools.count(1)


def stamp(by: str) -> dict[str, object]:
    """A signed request's stamp, with an id no other request of the test run has."""
    return {"by": by, "request": f"{by}:{next(_NONCES)}", "created": CREATED}


def signed(op: str, by: str = ADMIN.name, **fields: object) -> bytes:
    """A command from ``by``'s signed request, as the leader proposes it."""
    return encode_command(op, auth=stamp(by), **fields)


def genesis_entries(
    cluster_id: str, holders: Iterable[IdentityKeys] = HOLDERS.values(), threshold: int = 0
) -> list[bytes]:
    """The first entries of a governed cluster of members n-a and n-b with a key ``db``:
    cluster.yaml's identities (the admin, ``holders`` with the recovery role) and its
    recovery threshold (0: a majority of the holders)."""
    identities = [ADMIN.public(ADMIN_ROLES), *(k.public(["recovery"]) for k in holders)]
    init = encode_command(
        "cluster.init",
        cluster="t",
        cluster_id=cluster_id,
        policy=POLICY.to_dict(),
        member=MEMBERS[0],
        identities=[i.model_dump(mode="json") for i in identities],
        admitted=MEMBERS,
        **({"recovery_threshold": threshold} if threshold else {}),
    )
    return [
        init,
        encode_command("member.add", member=MEMBERS[1]),
        signed("key.create", name="db"),
    ]


def identity_set(keys: IdentityKeys, roles: Sequence[Role] = ("recovery",)) -> dict[str, object]:
    """A proposal's action naming ``keys``' identity with ``roles``."""
    return {"op": "identity.set", "identity": keys.public(list(roles)).model_dump(mode="json")}


def proposal(*actions: Mapping[str, object]) -> bytes:
    """The admin's proposal of ``actions`` (the only admin: it passes when it commits)."""
    return signed("proposal.create", actions=[dict(a) for a in actions])


@dataclass(frozen=True)
class SplitSigner:
    """A ledger-signing key and the quote offered with it (which may bind another key, or
    come from an enclave the ledger does not trust): whatever signs a split in a test."""

    key: SigningKey
    quote: bytes

    def sign(self, recovery_set: RecoverySet) -> RecoveryShares:
        """``recovery_set`` as a ``recovery.shares`` command signed the way an enclave signs."""
        message = split_message(canonical_split(recovery_set))
        return RecoveryShares(
            recovery_set=recovery_set,
            public_key=bytes(self.key.verify_key).hex(),
            quote=self.quote.hex(),
            signature=self.key.sign(message).signature.hex(),
        )


def quoted_signer(platform: Platform, identity: EnclaveIdentity = KM_ID) -> SplitSigner:
    """A fresh key quoted by code ``identity`` on ``platform``: what an enclave of that code
    there signs with (the quote is genuine if the platform is)."""
    key = SigningKey.generate()
    quote = platform.enclave(identity).quote(
        report_data_for(SIGNER_LABEL, bytes(key.verify_key)), NOW
    )
    return SplitSigner(key, quote)


def with_set(signed_split: RecoveryShares, recovery_set: RecoverySet) -> RecoveryShares:
    """``signed_split``'s key, quote and signature around another set (what a host can do
    with a split an enclave signed: its signature then covers a set that is not there)."""
    return signed_split.model_copy(update={"recovery_set": recovery_set})


def share_command(holder: str, generation: int, boxes: Mapping[str, str]) -> bytes:
    """``recovery.share`` as the leader proposes it for ``holder``'s signed request."""
    return signed("recovery.share", by=holder, generation=generation, boxes=dict(boxes))


def box(value: bytes, public_hex: str) -> str:
    """``value`` sealed to an X25519 public key, base64 (what a box on the ledger holds)."""
    return base64.b64encode(SealedBox(PublicKey(bytes.fromhex(public_hex))).encrypt(value)).decode()


def boxes_for(value: bytes, enclaves: Iterable[KMEnclave]) -> dict[str, str]:
    """``value`` boxed to each enclave's recovery key, by node name, the way ``kmctl recovery
    submit`` does it: each key's quote verified first (vendor root, policy, platform)."""
    verifier = QuoteVerifier(VENDOR.public_key)
    keys = {}
    for enclave in enclaves:
        public, quote = enclave.recovery_key(NOW)
        answer = {"box_key": public, "quote": quote.hex()}
        keys[enclave.name] = verify_recovery_key(
            enclave.name, enclave.platform_id, answer, verifier, POLICY, NOW
        )
    return box_share(Share("holder", 1, value), keys)


def open_shares(recovery_set: RecoverySet, names: Iterable[str]) -> dict[str, Share]:
    """The holders open their own shares of ``recovery_set`` with their own keys."""
    return {n: open_share(recovery_set, n, HOLDERS[n].box_secret) for n in names}


def rebuilt_secret(recovery_set: RecoverySet) -> bytes:
    """The master secret, as every holder together can rebuild it (what a test compares
    outputs against, and what a lying leader could split in any way it likes)."""
    return combine(recovery_set, open_shares(recovery_set, HOLDERS).values())


def secret_forms(secret: bytes) -> list[str]:
    """The ways a secret could show in a message: hex (both cases), base64, and each half in
    hex (a share is two 16-byte Shamir shares)."""
    halves = [secret[: len(secret) // 2], secret[len(secret) // 2 :]]
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        *(h.hex() for h in halves),
    ]


def settled(state: KMState) -> bytes:
    """The state's snapshot without what every applied entry changes (its index and the chain),
    so a refused command must leave it byte for byte as it was."""
    data = json.loads(state.snapshot())
    del data["applied_index"], data["chain_hash"]
    return json.dumps(data, sort_keys=True).encode()


class Ledger:
    """Committed entries applied in the same order, at the same index, to every enclave.

    ``history`` (entries another ledger committed, from index 1) is replayed first: what a node
    that lost its sealed state does with the surviving log.
    """

    def __init__(self, *enclaves: KMEnclave, history: Sequence[bytes] = ()) -> None:
        self.enclaves = enclaves
        self.entries: list[bytes] = []
        for data in history:
            self.commit(data)

    @property
    def state(self) -> KMState:
        return self.enclaves[0].state

    def commit(self, data: bytes) -> Applied:
        """Apply ``data`` on every enclave; the one result every replica agrees on."""
        index = self.state.applied_index + 1
        results = [e.state.apply(index, data) for e in self.enclaves]
        assert all(r == results[0] for r in results), results  # replicas must agree
        self.entries.append(data)
        return results[0]

    def commit_all(self, *entries: bytes) -> list[Applied]:
        return [self.commit(data) for data in entries]

    def govern(self, *actions: Mapping[str, object]) -> None:
        """Commit the admin's proposal of ``actions``, which must pass and apply."""
        result = self.commit(proposal(*actions))
        assert isinstance(result, ProposalChanged) and result.state == "accepted", result


def genesis_node(name: str = "n-a", platform: str = "a") -> tuple[KMEnclave, Ledger]:
    """A node that created a governed cluster (its master secret), with its ledger."""
    enclave = bare_enclave(name, platform)
    enclave.genesis()
    ledger = Ledger(enclave)
    results = ledger.commit_all(*genesis_entries(enclave.cluster_id))
    assert all(r.ok for r in results), results
    return enclave, ledger
