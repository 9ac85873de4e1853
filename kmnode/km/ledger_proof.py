"""What a KM enclave's ledger signatures say, byte for byte, for the signer and every verifier.

Two statements are signed with the enclave's ledger-signing key (bound to the enclave by a quote
whose report data is ``report_data_for(SIGNER_LABEL, public key)``):

* a *head*: "my applied chain is ``chain`` at index ``index``", in a ``ledger.sign`` entry;
* a *snapshot*: "this state image, with digest ``digest``, is mine at index ``index`` (term
  ``term``) with chain ``chain``", in the snapshot's own envelope.

Each message starts with its own domain label, so no signature of one kind can be read as the
other, and the key signs nothing else: there is no way to obtain its signature over bytes of
one's choosing. The state machine, the enclave and the offline verifier (``kmnode.ledger``) all
build the messages here, so they cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

#: Label of the report data that binds a ledger-signing key to its enclave's quote.
SIGNER_LABEL = b"ledger-signer"
_HEAD_DOMAIN = b"kmsim ledger head v1\0"
_SNAPSHOT_DOMAIN = b"kmsim ledger snapshot v1\0"
_SPLIT_DOMAIN = b"kmsim recovery split v1\0"
#: First bytes of a signed snapshot image (``SignedSnapshot.encode``).
SNAPSHOT_MAGIC = b"KMSIGNEDSTATE1\n"
#: Largest envelope header read (a quote is ~1 KiB): a damaged length cannot make us read more.
MAX_HEADER = 64 * 1024


def head_message(index: int, chain_hash: bytes) -> bytes:
    """The bytes a ``ledger.sign`` signature covers."""
    return _HEAD_DOMAIN + index.to_bytes(8, "big") + chain_hash


def snapshot_message(index: int, term: int, chain_hash: bytes, digest: bytes) -> bytes:
    """The bytes a snapshot signature covers."""
    return (
        _SNAPSHOT_DOMAIN + index.to_bytes(8, "big") + term.to_bytes(8, "big") + chain_hash + digest
    )


def state_digest(state: bytes) -> bytes:
    return hashlib.blake2b(state, digest_size=32, person=b"kmsim-snapshot").digest()


def split_message(canonical_split: bytes) -> bytes:
    """The bytes a recovery split's signature covers (its canonical JSON, hashed)."""
    return _SPLIT_DOMAIN + hashlib.blake2b(canonical_split, digest_size=32).digest()


def signature_holds(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s over ``message`` (malformed input: no)."""
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class Proof:
    """A ledger-signing key, the quote binding it to an enclave, and one signature by it."""

    public_key: bytes
    quote: bytes
    signature: bytes


@dataclass(frozen=True)
class SignedSnapshot:
    """A KM state image with its enclave's signature over (index, term, chain hash, digest)."""

    index: int
    term: int
    chain_hash: bytes
    proof: Proof
    state: bytes

    def message(self) -> bytes:
        return snapshot_message(self.index, self.term, self.chain_hash, state_digest(self.state))

    def encode(self) -> bytes:
        header = json.dumps(
            {
                "index": self.index,
                "term": self.term,
                "chain_hash": self.chain_hash.hex(),
                "public_key": self.proof.public_key.hex(),
                "quote": self.proof.quote.hex(),
                "signature": self.proof.signature.hex(),
            },
            sort_keys=True,
        ).encode()
        return SNAPSHOT_MAGIC + len(header).to_bytes(4, "big") + header + self.state

    @classmethod
    def decode(cls, data: bytes) -> SignedSnapshot | None:
        """The envelope in ``data``; None if ``data`` is a bare state image (no envelope at
        all); ValueError if it starts like an envelope but is not a well-formed one."""
        if not data.startswith(SNAPSHOT_MAGIC):
            return None
        start = len(SNAPSHOT_MAGIC) + 4
        size = int.from_bytes(data[len(SNAPSHOT_MAGIC) : start], "big")
        if size > MAX_HEADER or len(data) < start + size:
            raise ValueError("snapshot envelope header is truncated or too large")
        try:
            head = json.loads(data[start : start + size])
            signed = cls(
                index=_count(head["index"]),
                term=_count(head["term"]),
                chain_hash=_hex(head["chain_hash"], 32),
                proof=Proof(
                    public_key=_hex(head["public_key"], 32),
                    quote=_hex(head["quote"], None),
                    signature=_hex(head["signature"], 64),
                ),
                state=data[start + size :],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"snapshot envelope header is malformed ({exc})") from None
        return signed


def state_image(data: bytes) -> bytes:
    """The KM state image in a snapshot's data, with or without its envelope."""
    signed = SignedSnapshot.decode(data)
    return data if signed is None else signed.state


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"{value!r} is not an index or term")
    return value


def _hex(value: object, size: int | None) -> bytes:
    if not isinstance(value, str):
        raise ValueError("not a hex string")
    raw = bytes.fromhex(value)
    if size is not None and len(raw) != size:
        raise ValueError(f"{len(raw)} bytes where {size} belong")
    return raw
