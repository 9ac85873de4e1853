"""Keys in transit from a KM enclave to an attested service enclave: X25519 boxes.

Both ends hold a static X25519 key pair generated inside the enclave for its lifetime (the
service binds its public key into its local-attestation report, so the KM enclave knows that
only the attested instance can open what it sends). A message is ``sender public key | box``.

Why not an anonymous sealed box per key: it costs a key-pair generation and two scalar
multiplications to encrypt and one to decrypt, about 90 us per release on the machines this
runs on, while a box between two fixed key pairs needs the Diffie-Hellman step once per pair
and is then a symmetric cipher (about 5 us). Confidentiality is the same: the key can be read
only with one of the two private keys, which never leave their enclaves. The service enclave's
key is static either way, so the sealed box's ephemeral sender key bought no forward secrecy.
"""

from __future__ import annotations

from collections import OrderedDict

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

PUBLIC_KEY_SIZE = 32
#: Precomputed peers kept per enclave: a KM enclave talks to one service enclave at a time,
#: plus its restarts; a few spare entries cost nothing.
CACHE_SIZE = 16


class KeyBoxError(Exception):
    """A message could not be opened (wrong recipient, tampered, truncated)."""


class KeyBoxes:
    """An enclave's static box key pair and the boxes it has precomputed with its peers."""

    def __init__(self) -> None:
        self._private = PrivateKey.generate()
        self.public = bytes(self._private.public_key)
        self._boxes: OrderedDict[bytes, Box] = OrderedDict()

    def _box(self, peer_public: bytes) -> Box:
        box = self._boxes.get(peer_public)
        if box is None:
            box = Box(self._private, PublicKey(peer_public))
            self._boxes[peer_public] = box
            if len(self._boxes) > CACHE_SIZE:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(peer_public)
        return box

    def seal(self, recipient_public: bytes, plaintext: bytes) -> bytes:
        """``plaintext`` readable only by the holder of ``recipient_public``'s private key."""
        return self.public + bytes(self._box(recipient_public).encrypt(plaintext))

    @staticmethod
    def sender(message: bytes) -> bytes:
        """The box key a message claims to come from (checked by whoever vouches for it)."""
        if len(message) <= PUBLIC_KEY_SIZE:
            raise KeyBoxError("message too short")
        return bytes(message[:PUBLIC_KEY_SIZE])

    def open(self, message: bytes) -> bytes:
        """The plaintext of a message sealed to us; ``KeyBoxError`` if it is not one."""
        if len(message) <= PUBLIC_KEY_SIZE:
            raise KeyBoxError("message too short")
        sender, box = message[:PUBLIC_KEY_SIZE], message[PUBLIC_KEY_SIZE:]
        try:
            return self._box(sender).decrypt(box)
        except CryptoError:
            raise KeyBoxError("message was not sealed to this enclave, or was altered") from None

    def __repr__(self) -> str:
        return f"KeyBoxes(public={self.public.hex()[:16]}..., peers={len(self._boxes)})"
