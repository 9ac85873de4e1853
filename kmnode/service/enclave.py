"""Service-enclave logic: answer local attestation, accept provisioned keys, run workloads.

Keys arrive in a box (``attest.keybox``) to an X25519 key pair generated inside this enclave
and bound into its local-attestation report, so only this enclave instance can open them; and
each comes with the KM enclave's own local report vouching for the box key it was sealed with,
so a key boxed by anyone else (the host knows this enclave's public key too) is refused. The
workload used by the tests and benchmarks proves possession of a key without revealing it: an
HMAC of a challenge.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Collection

from attest import local
from attest.errors import AttestationError
from attest.hardware import EnclaveContext
from attest.keybox import KeyBoxError, KeyBoxes


class ProvisioningError(Exception):
    """A provisioned key could not be accepted (wrong recipient, corrupt, malformed)."""


#: What every proof-of-possession MAC starts with (domain separation: see ``prove``).
PROOF_LABEL = b"kmsim proof of possession\0"


class ServiceEnclave:
    """``trusted_km``: the KM measurements whose boxes this enclave opens (its own build's)."""

    def __init__(self, context: EnclaveContext, trusted_km: Collection[bytes]) -> None:
        self.context = context
        self._trusted_km = frozenset(trusted_km)
        self._boxes = KeyBoxes()
        self._keys: dict[tuple[str, int], bytes] = {}

    def answer_challenge(self, km_measurement: bytes, challenge: bytes) -> bytes:
        """Local attestation response for our node's KM enclave."""
        return local.respond(self.context, km_measurement, challenge, self._boxes.public)

    def accept_key(self, ciphertext: bytes, vouch: bytes) -> tuple[str, int]:
        """Open a key boxed to this enclave by a KM enclave that vouched for its box key (a
        local report from this platform, for this enclave, by a trusted KM measurement)."""
        try:
            local.verify_vouch(
                self.context, vouch, self._trusted_km, KeyBoxes.sender(ciphertext),
                self._boxes.public,
            )  # fmt: skip
        except (AttestationError, KeyBoxError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise ProvisioningError(f"provisioned key rejected: {reason}") from None
        try:
            envelope = json.loads(self._boxes.open(ciphertext))
            name, generation = envelope["key"], envelope["generation"]
            material = bytes.fromhex(envelope["material"])
        except (KeyBoxError, ValueError, KeyError, TypeError) as exc:
            raise ProvisioningError(f"provisioned key rejected: {type(exc).__name__}") from None
        if not isinstance(name, str) or not isinstance(generation, int) or len(material) != 32:
            raise ProvisioningError("provisioned key envelope is malformed")
        self._keys[(name, generation)] = material
        return name, generation

    def holds(self, name: str, generation: int) -> bool:
        return (name, generation) in self._keys

    def prove(self, name: str, generation: int, challenge: bytes) -> str:
        """HMAC-BLAKE2b of ``challenge`` under the key, equal across enclaves iff keys are.

        The MAC covers a fixed label before the challenge, so whoever can ask for proofs (the
        host, the operator API) gets MACs of "proof of possession" messages only, never the
        MAC of bytes of its choosing under the operational key: the proof is not an oracle for
        any other use of the key.
        """
        key = self._keys.get((name, generation))
        if key is None:
            raise ProvisioningError(f"no key {name!r} generation {generation} provisioned")
        return hmac.new(key, PROOF_LABEL + challenge, hashlib.blake2b).hexdigest()

    def __repr__(self) -> str:
        return f"ServiceEnclave(platform={self.context.platform_id!r}, keys={len(self._keys)})"
