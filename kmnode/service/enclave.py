"""Service-enclave logic: answer local attestation, accept provisioned keys, run workloads.

Keys arrive in a box (``attest.keybox``) to an X25519 key pair generated inside this enclave
and bound into its local-attestation report, so only this enclave instance can open them. The
workload used by the tests and benchmarks proves possession of a key without revealing it: an
HMAC of a challenge.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from attest import local
from attest.hardware import EnclaveContext
from attest.keybox import KeyBoxError, KeyBoxes


class ProvisioningError(Exception):
    """A provisioned key could not be accepted (wrong recipient, corrupt, malformed)."""


class ServiceEnclave:
    def __init__(self, context: EnclaveContext) -> None:
        self.context = context
        self._boxes = KeyBoxes()
        self._keys: dict[tuple[str, int], bytes] = {}

    def answer_challenge(self, km_measurement: bytes, challenge: bytes) -> bytes:
        """Local attestation response for our node's KM enclave."""
        return local.respond(self.context, km_measurement, challenge, self._boxes.public)

    def accept_key(self, ciphertext: bytes) -> tuple[str, int]:
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
        """HMAC-BLAKE2b of ``challenge`` under the key: equal across enclaves iff keys are."""
        key = self._keys.get((name, generation))
        if key is None:
            raise ProvisioningError(f"no key {name!r} generation {generation} provisioned")
        return hmac.new(key, challenge, hashlib.blake2b).hexdigest()

    def __repr__(self) -> str:
        return f"ServiceEnclave(platform={self.context.platform_id!r}, keys={len(self._keys)})"
