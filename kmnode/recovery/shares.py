"""k-of-n recovery shares of the 32-byte master secret: split, box, check, combine.

Shamir's scheme comes from pycryptodome (``Crypto.Protocol.SecretSharing.Shamir``), which
shares 16-byte secrets over GF(2^128); the master secret is split into two halves, each half
shared on its own polynomial, and a holder keeps the pair of shares at one index (32 bytes).
Fewer than ``threshold`` shares say nothing about the secret; any ``threshold`` rebuild it.

Each share is boxed (a libsodium sealed box) to its holder's X25519 key, so the recovery set
can live on the ledger, on untrusted hosts. Two public commitments make a ceremony fail early
and loudly instead of at its end (CCF's users saw a bogus share only after the last one,
microsoft/CCF#1051):

* per share, BLAKE2b-256 over (tag, cluster id, generation, holder name, index, share): a
  submitted share is checked against it the moment it arrives, and a bogus one is refused
  naming its holder. The hash binds the holder, the index and the generation, so a share of
  another holder or of an earlier split never passes as this one.
* for the master secret, BLAKE2b-256 over (tag, cluster id, secret): the rebuilt secret is
  checked against it, so a recovery set whose share commitments were forged consistently still
  cannot open a cluster to a wrong secret. It leaves the generation out on purpose: every split
  of the same secret carries the same master commitment, which the ledger can compare.

Neither commitment needs a salt or a key: what they hash is 256 bits of uniform randomness (the
master secret; a share at a non-zero index is a uniform value of the same size), so finding it
from the hash is a 2^256 preimage search. Someone holding k-1 shares and the commitment of
another still faces both unknown halves at once (the commitment covers the 32 bytes together),
2^256 guesses. With ``threshold == 1`` each share *is* the secret (Shamir with one point): only
the box protects it, as it must.

No secret (the master secret, a share) appears in a repr or an exception message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, NamedTuple, Self

from Crypto.Protocol.SecretSharing import Shamir
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from kmnode.identity import IdentityName
from kmnode.jsondepth import deeper_than

MASTER_BYTES = 32
SHARE_BYTES = 32
_HALF = 16
MAX_HOLDERS = 255
#: A sealed box adds an ephemeral public key (32) and a MAC (16) to the 32-byte share.
BOXED_BYTES = SHARE_BYTES + 48
#: The largest recovery set text ``from_json`` parses: 255 holders need about 60 KiB.
MAX_SET_JSON_BYTES = 256 << 10
_SHARE_TAG = b"kmsim-recovery-share1"
_MASTER_TAG = b"kmsim-recovery-master1"

Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ClusterId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class RecoveryError(ValueError):
    """Recovery refused something; the message names what, never a secret."""


class InvalidRecoveryParameters(RecoveryError):
    """``split`` was given a threshold, holders, keys or a secret it cannot use."""


class RecoverySetInvalid(RecoveryError):
    """A recovery set text that is not a well-formed, self-consistent set."""


class UnknownHolder(RecoveryError):
    """A name that holds no share in this recovery set."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name!r} holds no share in this recovery set")
        self.name = name


class ShareUnopened(RecoveryError):
    """The boxed share did not open with the key given (not the holder's key, or tampered)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the share of {name!r} does not open with this key")
        self.name = name


class BogusShare(RecoveryError):
    """A share that does not match its holder's commitment: refused at once, naming the holder."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the share submitted as {name!r} does not match its commitment")
        self.name = name


class NotEnoughShares(RecoveryError):
    """Fewer distinct valid shares than the threshold."""

    def __init__(self, have: int, need: int) -> None:
        super().__init__(f"{have} valid share(s) of the {need} needed")
        self.have = have
        self.need = need


class WrongSecret(RecoveryError):
    """The shares combined to a secret other than the one the set commits to."""

    def __init__(self) -> None:
        super().__init__("the shares rebuild a secret that does not match the master commitment")


class RecoveryHolder(NamedTuple):
    """A recovery operator: an identity name and its X25519 public key (hex)."""

    name: str
    box_key: str


@dataclass(frozen=True)
class Share:
    """One holder's opened share: the two 16-byte Shamir shares at ``index``, concatenated."""

    name: str
    index: int
    value: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Share(name={self.name!r}, index={self.index})"

    def to_b64(self) -> str:
        """The share as a holder pastes it when submitting (``kmctl recovery submit``)."""
        return base64.b64encode(self.value).decode("ascii")

    @classmethod
    def from_b64(cls, name: str, index: int, text: str) -> Self:
        """A submitted share; garbage becomes a share that ``check_share`` refuses as bogus."""
        try:
            value = base64.b64decode(text, validate=True)
        except ValueError:
            value = b""
        return cls(name, index, value)


class BoxedShare(BaseModel):
    """A holder's entry in a recovery set: public, so it may sit on the ledger and on hosts."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: IdentityName
    index: Annotated[int, Field(ge=1, le=MAX_HOLDERS)]
    #: The share sealed to the holder's X25519 key (base64).
    boxed: Annotated[str, StringConstraints(min_length=1, max_length=2 * BOXED_BYTES)]
    #: BLAKE2b-256 over (tag, cluster id, generation, name, index, share), hex.
    commitment: Digest

    @model_validator(mode="after")
    def _boxed_is_a_sealed_share(self) -> Self:
        try:
            raw = base64.b64decode(self.boxed, validate=True)
        except ValueError:
            raise ValueError("boxed is not base64") from None
        if len(raw) != BOXED_BYTES:
            raise ValueError(f"boxed is {len(raw)} bytes, not {BOXED_BYTES}")
        return self


class RecoverySet(BaseModel):
    """The boxed shares of one split of the master secret, with what checks them."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cluster_id: ClusterId
    #: Which split this is: a new one on every change of holders or threshold.
    generation: Annotated[int, Field(ge=0, lt=1 << 63)]
    threshold: Annotated[int, Field(ge=1, le=MAX_HOLDERS)]
    #: BLAKE2b-256 over (tag, cluster id, master secret), hex.
    master_commitment: Digest
    shares: Annotated[tuple[BoxedShare, ...], Field(min_length=1, max_length=MAX_HOLDERS)]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [s.name for s in self.shares]
        if len(set(names)) != len(names):
            raise ValueError("a holder appears twice")
        if sorted(s.index for s in self.shares) != list(range(1, len(self.shares) + 1)):
            raise ValueError("share indices are not 1..n")
        if self.threshold > len(self.shares):
            raise ValueError("threshold exceeds the number of holders")
        return self

    def entry(self, name: str) -> BoxedShare:
        """The entry of holder ``name``, or ``UnknownHolder``."""
        for boxed in self.shares:
            if boxed.name == name:
                return boxed
        raise UnknownHolder(name)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> RecoverySet:
        """Parse a set from untrusted text: bounded in size and depth, every field checked."""
        if len(text) > MAX_SET_JSON_BYTES:
            raise RecoverySetInvalid(f"a recovery set is at most {MAX_SET_JSON_BYTES} bytes")
        if deeper_than(text, 4):
            raise RecoverySetInvalid("a recovery set nests at most 4 levels")
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise RecoverySetInvalid(f"not a recovery set: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    """Where and what the first validation error is, without the input (one line)."""
    first = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "set"
    return f"{where}: {first['msg']}"


def _fields(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different tuples hash the same bytes."""
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def share_commitment(cluster_id: str, generation: int, name: str, index: int, value: bytes) -> str:
    """The public commitment to one holder's share (see the module docstring for why it is safe)."""
    data = _fields(
        _SHARE_TAG,
        cluster_id.encode(),
        struct.pack(">Q", generation),
        name.encode(),
        struct.pack(">Q", index),
        value,
    )
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def master_commitment(cluster_id: str, master: bytes) -> str:
    """The public commitment to the master secret; the same for every split of it."""
    data = _fields(_MASTER_TAG, cluster_id.encode(), master)
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def _public_key(holder: RecoveryHolder) -> PublicKey:
    key = holder.box_key
    if not isinstance(key, str) or len(key) != 64:
        raise InvalidRecoveryParameters(f"the key of {holder.name!r} is not 64 hex digits")
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raise InvalidRecoveryParameters(f"the key of {holder.name!r} is not hex") from None
    if raw == bytes(32):
        raise InvalidRecoveryParameters(f"the key of {holder.name!r} is the zero point")
    return PublicKey(raw)


def _check_split_args(
    master: bytes,
    holders: Sequence[RecoveryHolder],
    threshold: int,
    cluster_id: str,
    generation: int,
) -> None:
    if not isinstance(master, bytes) or len(master) != MASTER_BYTES:
        raise InvalidRecoveryParameters(f"the master secret must be {MASTER_BYTES} bytes")
    if not 1 <= len(holders) <= MAX_HOLDERS:
        raise InvalidRecoveryParameters(f"1 to {MAX_HOLDERS} holders, not {len(holders)}")
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise InvalidRecoveryParameters("the threshold must be an integer")
    if not 1 <= threshold <= len(holders):
        raise InvalidRecoveryParameters(
            f"the threshold must be 1 to {len(holders)} (the holders), not {threshold}"
        )
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise InvalidRecoveryParameters("the generation must be a non-negative integer")
    names = [h.name for h in holders]
    if len(set(names)) != len(names):
        raise InvalidRecoveryParameters("holder names must be distinct")
    if not isinstance(cluster_id, str) or not cluster_id:
        raise InvalidRecoveryParameters("the cluster id must be a non-empty string")


def split(
    master: bytes,
    holders: Sequence[RecoveryHolder],
    threshold: int,
    *,
    cluster_id: str,
    generation: int,
) -> RecoverySet:
    """Split ``master`` ``threshold``-of-``len(holders)``, each share boxed to its holder."""
    _check_split_args(master, holders, threshold, cluster_id, generation)
    keys = [_public_key(h) for h in holders]
    n = len(holders)
    low = Shamir.split(threshold, n, master[:_HALF], ssss=False)
    high = Shamir.split(threshold, n, master[_HALF:], ssss=False)
    entries = []
    for holder, key, (index, a), (index_b, b) in zip(holders, keys, low, high, strict=True):
        assert index == index_b  # pycryptodome numbers shares 1..n in order
        value = a + b
        entries.append(
            {
                "name": holder.name,
                "index": index,
                "boxed": base64.b64encode(SealedBox(key).encrypt(value)).decode("ascii"),
                "commitment": share_commitment(cluster_id, generation, holder.name, index, value),
            }
        )
    try:
        return RecoverySet.model_validate(
            {
                "cluster_id": cluster_id,
                "generation": generation,
                "threshold": threshold,
                "master_commitment": master_commitment(cluster_id, master),
                "shares": tuple(BoxedShare.model_validate(e) for e in entries),
            }
        )
    except ValidationError as exc:  # a holder name or cluster id the set cannot hold
        raise InvalidRecoveryParameters(_first_error(exc)) from None


def check_share(recovery_set: RecoverySet, name: str, share: Share) -> None:
    """Refuse at once (``BogusShare(name)``) a share that is not ``name``'s in this set."""
    entry = recovery_set.entry(name)
    if share.name != name or share.index != entry.index or len(share.value) != SHARE_BYTES:
        raise BogusShare(name)
    expected = share_commitment(
        recovery_set.cluster_id, recovery_set.generation, name, entry.index, share.value
    )
    if not hmac.compare_digest(expected, entry.commitment):
        raise BogusShare(name)


def open_share(recovery_set: RecoverySet, name: str, box_secret: bytes) -> Share:
    """Open ``name``'s boxed share with its X25519 secret, locally, and check it at once."""
    entry = recovery_set.entry(name)
    try:
        value = SealedBox(PrivateKey(box_secret)).decrypt(base64.b64decode(entry.boxed))
    except (CryptoError, ValueError, TypeError):
        raise ShareUnopened(name) from None
    share = Share(name, entry.index, value)
    check_share(recovery_set, name, share)  # a host that swapped boxes is caught here
    return share


def combine(recovery_set: RecoverySet, shares: Iterable[Share]) -> bytes:
    """Rebuild the master secret from at least ``threshold`` distinct valid shares.

    Every share is checked first (the first bogus one is refused by name); a holder's share
    given twice counts once. The result is checked against the master commitment.
    """
    valid: dict[str, Share] = {}
    for share in shares:
        check_share(recovery_set, share.name, share)
        valid[share.name] = share
    if len(valid) < recovery_set.threshold:
        raise NotEnoughShares(len(valid), recovery_set.threshold)
    chosen = sorted(valid.values(), key=lambda s: s.index)[: recovery_set.threshold]
    low = Shamir.combine([(s.index, s.value[:_HALF]) for s in chosen], ssss=False)
    high = Shamir.combine([(s.index, s.value[_HALF:]) for s in chosen], ssss=False)
    master = low + high
    expected = master_commitment(recovery_set.cluster_id, master)
    if not hmac.compare_digest(expected, recovery_set.master_commitment):
        raise WrongSecret()
    return master
